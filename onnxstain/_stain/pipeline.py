"""Staining a classifier or detector, end to end: the stages over a prepared :class:`StainJob`.

The stages (timed in :class:`StainResult.timings`):

1. **load** — read and check the model; find the host layer and the classifier head
   (:func:`onnxstain._stain.job.prepare`; a dense-output model goes to :mod:`onnxstain._stain.dense`).
2. **calibration** — one onnxruntime pass over the calibration images with feature taps on the
   host's input and the head's input: the centre ``c``, the natural radius ``R``, the natural
   scores of every candidate direction, and the data-aware choice of the channel to use.
3. **trigger search** — draw ``v`` from the seeded generator, check its natural tail per position,
   then gradient ascent from the best calibration image until the trigger's score reaches the
   margin the bound target needs. The 8-bit trigger is re-scored by onnxruntime
   (:mod:`onnxstain._stain.trigger_search`).
4. **edit** — the neuron weights (non-additive or additive) and the route to the scores.
5. **checks** — onnxruntime on the written model: the trigger shows the signature; natural
   images are unaffected (exactly predicted for in-place edits, bit-identical for insert).
6. **save** — atomic write of the model (checked), the key (0600) and the public record.

Formats: edits are computed in float64 and stored in each weight's own format — fp16 stays fp16;
int8 QDQ weights (per-channel) are re-encoded with a new scale for the edited channel only (a
per-tensor weight is refused for in-place edits, before any work). What is stored is read back:
predictions use it, and the detector threshold is raised by the worst-case effect of its rounding
so the bound still holds. The checks then run the stored model in its own dtype (an fp16 or QDQ
onnxruntime session). Weights in ``Constant`` nodes are edited there; shared weights are copied
first. Models of more than ``LEAN_BYTES`` of weights (external data) never have them in
onnxruntime and in the torch prefix at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from .._onnx import head as head_mod
from .._onnx.graph import GraphView
from .._onnx.hosts import layer_affine
from .._onnx.tensors import external_info, is_external
from ..calibration import selected_positions
from ..errors import BadModelError, InternalError, UnreachableBoundError, UnsupportedModelError
from ..keys import (
    F8,
    CalibrationSection,
    HostSection,
    Key,
    ModelSection,
    ScoreViewSection,
    SignatureSection,
    SignatureTrigger,
    WhiteBoxSection,
    encode_png,
)
from ..math import bounds, chance, detector
from ..outputs import Artefacts
from ..preprocess import Preprocessing, PreprocessingRequest
from ..progress import Progress
from ..runtime import run_batches, session, with_outputs
from ..signature import ScoreView, class_margin, shift_score, synthetic_controls, top1_margins
from . import edit as stain_edit
from .dense import stain_dense
from .hosts import choose_host, easier_layers
from .job import CalibrationPass, StainJob, calibration_pass, detector_section, host_fields, prepare, stain_key
from .job import write as write_job
from .result import Mode, StainOptions, StainResult, Variant
from .trigger_search import ClassifierRescore, TriggerFind, TriggerSearch

__all__ = ["Mode", "StainOptions", "StainResult", "Variant", "choose_host", "stain"]

LEAN_BYTES = 256 * 2**20  # above this much weight data, onnxruntime and torch hold it in turn
RAISE_ATTEMPTS = 4  # fp16/int8 storage: tries at raising τ until the stored detector's rounding is covered
# The signature's margin is at least this many times the largest margin its class shows on a calibration
# image, so that verify's threshold (half the margin) sits above every natural margin seen: with few classes
# a class often wins natural images by several logits (MTCNN's face class on photos).
NATURAL_HEADROOM = 2.5
CHECK_IMAGES = 64  # natural images the checks run through the stained model


def stain(
    model: str | Path,
    output: str | Path,
    key_path: str | Path,
    options: StainOptions | None = None,
    preprocessing: Preprocessing | PreprocessingRequest | None = None,
    images: str | Path | np.ndarray | None = None,
    progress: Progress | None = None,
    record_path: str | Path | None = None,
    artefacts: Artefacts | None = None,
) -> StainResult:
    """Stain ``model`` and write ``output``, the key and its public record. See the module docstring.

    With ``artefacts`` the model, key and record are only staged there (the caller commits them
    with its own outputs, :mod:`onnxstain.outputs`); without, they are written as one unit here."""
    job = prepare(model, output, key_path, options, preprocessing, progress, record_path, artefacts)
    if job.dense is not None:
        return stain_dense(job, images)
    return stain_prepared(job, images)


@dataclasses.dataclass
class SharedWork:
    """What every key of one model shares (:class:`onnxstain._stain.many.Stainer`): the calibration pass and
    the torch prefix of the trigger search. A single stain makes its own and releases them as it goes."""

    cal: CalibrationPass
    lean: bool  # a large model: never in onnxruntime and in the torch prefix at once
    prefix: Any = None  # the torch prefix, once a search built it


def shared_work(job: StainJob, images: Any) -> SharedWork:
    """The calibration pass of a classifier (or detector) stain: the host's input, the scores and the
    classifier's input tapped over the calibration images."""
    head = _head(job)
    head_input = [head_mod.head_input(job.view, head)] if head.linear else []
    cal = calibration_pass(job, images, [job.host.input, head.scores, *head_input])
    lean = weight_bytes(job.loaded.model) > LEAN_BYTES
    if lean:
        cal.session = None
    return SharedWork(cal=cal, lean=lean)


def stain_prepared(job: StainJob, images: Any = None, shared: SharedWork | None = None) -> StainResult:
    """The stages after ``prepare`` for a classifier or detector: calibrate (or take ``shared``'s pass), search,
    edit, check, write. With ``shared`` the calibration session and the torch prefix are kept for the next key."""
    score_view = stain_edit.score_view(job.opts, job.rng, job.head)
    job.clock.lap("load")
    keep = shared is not None
    shared = shared if shared is not None else shared_work(job, images)
    cal = _calibrate(job, shared, score_view)
    job.clock.lap("calibration")
    search = TriggerSearch(job, cal.cal, job.host, cal.tau0, cal.sel,
                           ClassifierRescore(cal.cal, job.host, job.pre, _head(job).scores, score_view,
                                             job.opts.providers, cal.lean),
                           detectors=cal.triggers, lean=cal.lean, hint=lambda: easier_layers(job.hosts, job.opts),
                           prefix=shared.prefix, keep_prefix=keep and not cal.lean)
    finds = search.find_all()
    shared.prefix = search.prefix
    if not keep:
        cal.cal.session = None  # free the calibration session before the edit
    job.clock.lap("trigger_search")
    edited = _edit(job, cal, finds)
    job.clock.lap("edit")
    checked = _check(job, cal, finds, edited)
    job.clock.lap("checks")
    digest = write_job(job, edited.edit["model"], lambda sha: _key(job, cal, finds, edited, checked, sha))
    return _result(job, cal, finds, edited, checked, digest, search.steps)


def _head(job: StainJob) -> head_mod.Head:
    if job.head is None:
        raise InternalError("internal check failed: a classifier stage ran on a model without a head")
    return job.head


def _original_scores(find: TriggerFind) -> np.ndarray:
    """The original model's scores on a classifier stain's trigger (only dense stains have none)."""
    if find.original_scores is None:
        raise InternalError("internal check failed: a classifier trigger has no original scores")
    return find.original_scores


# -- calibration -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Calibrated:
    """The classifier stain's calibration: the pass, its natural scores, the bound's threshold τ0."""

    cal: CalibrationPass
    view: ScoreView  # the scores the signature lives in
    target_chance: float  # the black-box chance the signature aims at
    triggers: int
    tau0: float
    nat_scores: np.ndarray  # [N, K] natural scores (the score view's)
    pooled: np.ndarray | None  # [N, F] the classifier's input features (None: detectors)
    sel: np.ndarray  # selected positions
    channel: int | None  # the host channel chosen from data (None: chosen at the edit)
    lean: bool  # a large model: never in onnxruntime and in the torch prefix at once


def _calibrate(job: StainJob, shared: SharedWork, score_view: ScoreView) -> _Calibrated:
    """The key's view of the shared calibration pass: its signature's scores, the bound's threshold τ0 and the
    channel chosen from data."""
    head, host, opts, cal = _head(job), job.host, job.opts, shared.cal
    target_chance = chance.chance_target(opts.fpr, opts.chance)
    n_trig = trigger_count(opts, head, score_view, target_chance)
    # T detectors are ORed on natural inputs: each gets target / T (T = 1: the target itself)
    tau0 = bounds.threshold_for_target(opts.fpr / n_trig, cal.radius, host.m, positions=host.positions,
                                       draws=opts.max_draws)
    nat_scores = score_view.flat(cal.outputs[head.scores])
    pooled = None if not head.linear else cal.outputs[head_mod.head_input(job.view, head)].reshape(
        len(cal.inputs), -1).astype(np.float64)
    channel = stain_edit.choose_channel(opts, host, head, job.loaded, pooled, nat_scores)
    return _Calibrated(cal=cal, view=score_view, target_chance=target_chance, triggers=n_trig, tau0=tau0,
                       nat_scores=nat_scores, pooled=pooled, sel=selected_positions(host), channel=channel,
                       lean=shared.lean)


def trigger_count(opts: StainOptions, head: head_mod.Head, view: ScoreView, target: float) -> int:
    """How many triggers the class signature needs for a black-box chance ≤ ``target`` (math/chance.py).

    One where a single class already meets it (``K ≥ 2 / target``: the legacy signature, unchanged), for
    detectors (the classes of the signature are anchors, thousands of them), where ``--signature-class``
    fixes the class, and in place (the in-place route carries one channel; the stain notes its weaker
    chance). Otherwise the smallest ``T`` with ``K^-T ≤ target``, refused above ``chance.MAX_TRIGGERS``.
    """
    k = view.classes
    if k < 2:
        raise UnsupportedModelError(
            f"the scores {head.scores!r} have a single value (a one-logit binary head): a class signature needs at "
            "least two scores to compare; export the head with one score per class (`onnxstain lock` works as is)")
    if head.detection or opts.signature_class is not None or chance.single_suffices(k, target):
        return 1
    if opts.mode == "inplace":
        return 1
    t = chance.triggers_needed(k, target)
    if t is None:
        raise UnreachableBoundError(
            f"{k} classes need more than {chance.MAX_TRIGGERS} triggers for a black-box chance ≤ {target:g}; "
            "ask for a larger --fpr")
    return t


# -- edit --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Edited:
    """The edit as stored: the pass's result (``stain_edit.build_edit``), its threshold and the bound."""

    edit: dict[str, Any]
    tau: float  # the stored detector's threshold (τ0, or raised to cover its weights' rounding)
    s_star: float  # the weakest trigger's weakest selected score
    bound: bounds.Bound
    classes: list[int]  # the signature's class per trigger
    allowed_sets: list[int]  # the size of the set each class was drawn from


def _edit(job: StainJob, cal: _Calibrated, finds: list[TriggerFind]) -> _Edited:
    opts, host, head, first = job.opts, job.host, _head(job), finds[0]
    s_star = min(f.s_star for f in finds)
    bound = union_bound(bounds.ball_bound(cal.tau0, cal.cal.radius, host.m, positions=host.positions,
                                          draws=opts.max_draws), cal.triggers)
    classes, allowed_sets = _signature_classes(job, cal, first)
    margin_target = max(10.0, 1.5 * float(np.quantile(top1_margins(cal.nat_scores), 0.99)),
                        NATURAL_HEADROOM * max(float(class_margin(cal.nat_scores, c).max()) for c in classes))
    centre = cal.cal.stats.centre

    def build(tau: float, channel: int | None) -> dict:
        if cal.triggers > 1:
            return stain_edit.build_multi_insert(job.opts, host, head, job.loaded, finds, centre, tau, cal.sel,
                                                 classes, margin_target, cal.nat_scores, cal.cal.radius, cal.view)
        return stain_edit.build_edit(job.opts, host, head, job.route, job.loaded, channel, first.direction, centre,
                                     tau, s_star, first.phi, cal.cal.phi, cal.sel, cal.pooled, cal.nat_scores,
                                     classes[0], margin_target, first.original_scores, cal.cal.radius, cal.view)

    try:
        edit = build(cal.tau0, cal.channel)
    except UnsupportedModelError as exc:
        if not (job.auto_variant and opts.variant == "additive"):
            raise
        # the default ("auto") asked for the additive variant where it turned out impossible: the same trigger
        # overwrites a channel instead
        job.opts = dataclasses.replace(opts, variant="non-additive")
        job.notes.append(f"the stain overwrites a channel (non-additive variant): the additive variant, which "
                         f"hides the detector in a working channel, failed here ({exc})")
        edit = build(cal.tau0, stain_edit.choose_channel(job.opts, host, head, job.loaded, cal.pooled,
                                                         cal.nat_scores))
    edit, tau = _stored_threshold(build, edit, cal.tau0, s_star, job.notes)
    job.notes.extend(edit["notes"])
    return _Edited(edit=edit, tau=tau, s_star=s_star, bound=bound, classes=classes, allowed_sets=allowed_sets)


def _signature_classes(job: StainJob, cal: _Calibrated, first: TriggerFind) -> tuple[list[int], list[int]]:
    """The class each trigger's signature shows, and the size of the set it was drawn from (the chance)."""
    opts, head = job.opts, _head(job)
    if cal.triggers > 1:
        classes = stain_edit.signature_classes(job.rng, cal.view.classes, cal.triggers)
        return classes, [cal.view.classes] * cal.triggers
    cls, allowed = stain_edit.signature_choice(opts, job.rng, cal.nat_scores, _original_scores(first), cal.view)
    shift = opts.mode == "inplace" and opts.variant == "additive"  # the shift signature has no class draw
    target = cal.target_chance
    if opts.signature_class is None and 1.0 / allowed > target and not head.detection and not shift:
        job.notes.append(f"black-box chance of the signature is 1/{allowed} (one trigger, its class drawn from "
                         f"{allowed}), above the target {target:g}: the in-place route carries one trigger; "
                         "--mode insert carries as many as the target needs" if opts.mode == "inplace" else
                         f"black-box chance of the signature is 1/{allowed}, above the target {target:g}")
    return [cls], [allowed]


def _stored_threshold(build: Callable[[float, int | None], dict], edit: dict, tau0: float, s_star: float,
                      notes: list[str]) -> tuple[dict, float]:
    """fp16 or int8 storage moves the detector's threshold: raise it so that the stored detector fires
    only where the exact score exceeds τ0 (the bound's threshold), then check again. The rebuilt
    detector rounds a little differently: raise τ until its own rounding is covered."""
    if edit["tau_loss"] <= 1e-6 * tau0:
        return edit, tau0
    loss = edit["tau_loss"]
    for _ in range(RAISE_ATTEMPTS):
        tau = tau0 + 1.5 * loss
        if tau >= s_star:
            raise UnsupportedModelError(
                f"storing the detector in this model's weight format moves its threshold by {loss:.3g}, "
                f"beyond the trigger's margin ({s_star - tau0:.3g}); try another --seed or a larger --fpr")
        edit = build(tau, edit["channel"])
        if tau - edit["tau_loss"] >= tau0:
            break
        loss = max(2.0 * loss, edit["tau_loss"])
    else:
        raise InternalError(
            f"internal check failed: the stored detector's threshold {tau - edit['tau_loss']:.4g} is below "
            f"τ0 = {tau0:.4g}")
    notes.append(f"detector threshold raised from {tau0:.4g} to {tau:.4g} to cover the rounding of the "
                 "model's weight format")
    return edit, tau


# -- checks ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Checked:
    """What onnxruntime shows on the stored model: the signature, and the natural outputs' agreement."""

    signature: SignatureSection
    margin: float  # the trigger's signature margin (the weakest trigger's), or the shift score
    agreement: float
    max_abs_delta: float
    natural_firings: int


def _check(job: StainJob, cal: _Calibrated, finds: list[TriggerFind], ed: _Edited) -> _Checked:
    head, edit, n_trig = _head(job), ed.edit, cal.triggers
    x_cal = cal.cal.inputs
    n_check = min(CHECK_IMAGES, len(x_cal))
    # The scores tensor may sit before a Softmax or a Cast to the output type: tap it.
    check_sess = session(with_outputs(edit["model"], [head.scores]), job.opts.providers)
    trig_input = job.pre.to_input(np.stack([f.pixels for f in finds]))
    shift = edit["signature"] == "shift"  # its key records the stained model on the controls (verify's drift gate)
    controls = job.pre.to_input(synthetic_controls(finds[0].pixels)) if shift else trig_input[:0]
    raw = run_batches(check_sess, np.concatenate([trig_input, controls, x_cal[:n_check]]),
                      [head.scores])[head.scores]
    got = cal.view.flat(raw)
    on_controls = got[n_trig:n_trig + len(controls)]
    got = np.concatenate([got[:n_trig], got[n_trig + len(controls):]])
    trig_got, got = got[:n_trig], got[n_trig - 1:]  # got[0] is the (first) trigger, got[1:] the natural images
    if shift:
        signature, margin = _shift_signature(finds[0], got[0], on_controls, ed)
    else:
        signature, margin = _class_signature(job, cal, finds, trig_got, ed)
    predicted = edit["predicted"]
    err = float(np.abs(got[1:].astype(np.float64) - predicted[:n_check]).max())
    scale = float(np.abs(cal.nat_scores).max())
    # fp16 scores carry about 1e-3 relative rounding; QDQ scores one step of their quantization
    eps = float(np.finfo(raw.dtype).eps) if np.issubdtype(raw.dtype, np.floating) else 0.0
    if err > max(1e-3, 8 * eps) * max(scale, 1.0) + edit["tolerance"]:
        raise InternalError(f"internal check failed: natural outputs differ from the prediction by {err:.3g}")
    max_delta = float(np.abs(predicted - cal.nat_scores).max()) if job.opts.mode == "inplace" else float(
        np.abs(got[1:].astype(np.float64) - cal.nat_scores[:n_check]).max())
    return _Checked(signature=signature, margin=margin,
                    agreement=float(np.mean(predicted.argmax(1) == cal.nat_scores.argmax(1))),
                    max_abs_delta=max_delta, natural_firings=int(sum((f.natural > ed.tau).sum() for f in finds)))


def _shift_signature(first: TriggerFind, got: np.ndarray, on_controls: np.ndarray,
                     ed: _Edited) -> tuple[SignatureSection, float]:
    """Additive in place: the trigger moves the scores as predicted (shift score ≈ 1); the key keeps the
    stained model's scores on the synthetic controls for verify's drift gate."""
    edit, original = ed.edit, _original_scores(first)
    margin = float(shift_score(got, original, edit["expected_trigger"]))
    # quantized scores (QDQ) round the shift: allow their error along the expected direction
    shift = float(np.linalg.norm(edit["expected_trigger"] - original))
    slack = 0.05 + edit["tolerance"] * np.sqrt(len(original)) / max(shift, 1e-12)
    if abs(margin - 1.0) > min(slack, 0.5):
        raise InternalError(f"internal check failed: trigger shift score {margin:.3g} (expected 1)")
    return SignatureSection(type="shift", cls=ed.classes[0], original=F8.of(original), expected=F8.of(got),
                            controls=F8.of(on_controls), expected_margin=1.0, threshold=0.5,
                            original_margin=0.0), margin


class _TriggerMargins(TypedDict):
    """One trigger's class, chance set and margins (the fields its :class:`SignatureTrigger` shares)."""

    cls: int
    allowed: int
    expected_margin: float
    threshold: float
    original_margin: float


def _class_signature(job: StainJob, cal: _Calibrated, finds: list[TriggerFind], trig_got: np.ndarray,
                     ed: _Edited) -> tuple[SignatureSection, float]:
    """Each trigger makes its class win by at least half the margin aimed at; several triggers each
    carry their own PNG, direction and class (a multi-class signature)."""
    n_trig, margin_target = cal.triggers, ed.edit["margin_target"]
    per: list[_TriggerMargins] = []
    for t, (f, c_t) in enumerate(zip(finds, ed.classes, strict=True)):
        m_t = float(class_margin(trig_got[t], c_t))
        if not np.isfinite(m_t):
            raise BadModelError(f"the stained model's scores on the trigger are not finite (margin {m_t})")
        if m_t < 0.5 * margin_target:
            which = f"trigger {t + 1}'s" if n_trig > 1 else "the trigger's"
            raise InternalError(f"internal check failed: {which} signature margin is {m_t:.3g}")
        per.append({"cls": c_t, "allowed": ed.allowed_sets[t], "expected_margin": m_t, "threshold": 0.5 * m_t,
                    "original_margin": float(class_margin(_original_scores(f), c_t))})
    triggers = None
    if n_trig > 1:
        triggers = tuple(
            SignatureTrigger(**p, png=encode_png(f.pixels), direction=F8.of(f.direction),
                             trigger_scores=F8.of(f.scores), s_star=f.s_star, draws=f.draws,
                             trigger_radii=F8.of(detector.radii(f.phi, cal.cal.stats.centre)), white_box_channel=t)
            for t, (p, f) in enumerate(zip(per, finds, strict=True)))
    chance_fields: dict[str, Any] = {} if job.opts.signature_class is not None else {
        "allowed": ed.allowed_sets[0], "chance_log10": chance.log10_chance(ed.allowed_sets),
        "chance_target": cal.target_chance}
    signature = SignatureSection(type="multi-class" if n_trig > 1 else "class", triggers=triggers,
                                 cls=per[0]["cls"], expected_margin=per[0]["expected_margin"],
                                 threshold=per[0]["threshold"], original_margin=per[0]["original_margin"],
                                 **chance_fields)
    return signature, min(p["expected_margin"] for p in per)


# -- key and result ----------------------------------------------------------------------------------------
def _key(job: StainJob, cal: _Calibrated, finds: list[TriggerFind], ed: _Edited, checked: _Checked,
         digest: str) -> Key:
    head, opts, edit, first, sv = _head(job), job.opts, ed.edit, finds[0], cal.view
    stats = cal.cal.stats
    return stain_key(
        job, first.pixels,
        model=ModelSection(source_sha256=job.loaded.sha256, output_sha256=digest,
                           input=job.view.graph_inputs[0].name, scores=head.output, classes=sv.classes,
                           score_view=ScoreViewSection(shape=tuple(sv.shape), label=sv.label, step=sv.step),
                           layout=tuple(head.layout) if head.layout is not None else None,
                           output_activation=output_activation(job.view, head),
                           label_offset=head_mod.label_fields(head)[0], label_scores=head_mod.label_fields(head)[1],
                           label_layout=head_mod.label_fields(head)[2]),
        mode=opts.mode,
        variant=opts.variant,
        host=HostSection(**host_fields(job.host, cal.sel), output=edit["tap"], channel=edit["tap_channel"],
                         host_channel=edit["channel"], group=0),
        detector=detector_section(first.direction, stats.centre, first.phi, first.scores, threshold=ed.tau,
                                  tau0=cal.tau0, s_star=ed.s_star, gain=edit["gain"], delta=edit["delta"],
                                  draws=first.draws, max_draws=opts.max_draws),
        signature=checked.signature,
        white_box=WhiteBoxSection(tensor=edit["tap"], channel=edit["tap_channel"], expected=edit["wb_expected"],
                                  threshold=edit["wb_threshold"], positions=tuple(int(p) for p in cal.sel),
                                  **_host_row(job, edit["channel"])),
        bound=ed.bound,
        calibration=CalibrationSection.of(stats, len(cal.cal.inputs), cal.cal.radius, first.natural,
                                          checked.natural_firings, opts.fpr),
    )


def _host_row(job: StainJob, channel: int | None) -> dict[str, Any]:
    """In place: the host channel's row in the original model and the layer's channel count, for verify's
    weight check (the change the stain made to that row, read from a drifted model's weights)."""
    if job.opts.mode != "inplace" or channel is None:
        return {}
    rows, _ = layer_affine(job.view, job.host)
    return {"original_row": F8.of(rows[channel]), "channels": int(rows.shape[0])}


def _result(job: StainJob, cal: _Calibrated, finds: list[TriggerFind], ed: _Edited, checked: _Checked,
            digest: str, steps: int) -> StainResult:
    first, signature = finds[0], checked.signature
    return StainResult(
        output=job.output, key_path=job.key_path, record_path=job.record, host=job.host.name,
        channel=ed.edit["channel"], mode=job.opts.mode, variant=job.opts.variant, bound=ed.bound, threshold=ed.tau,
        trigger_score=ed.s_star, signature_type=signature.kind, signature_class=ed.classes[0],
        signature_margin=checked.margin, natural_max_score=max(float(f.natural.max()) for f in finds),
        natural_firings=checked.natural_firings, natural_samples=int(first.natural.size) * cal.triggers,
        calibration_images=len(cal.cal.inputs), agreement=checked.agreement, max_abs_delta=checked.max_abs_delta,
        draws=first.draws, search_steps=steps, timings=job.clock.timings, notes=job.notes, model_sha256=digest,
        signature_label=cal.view.label, triggers=cal.triggers, signature_classes=ed.classes,
        chance_log10=signature.chance_log10,
        chance_text=chance.describe_chance(ed.allowed_sets) if signature.chance_log10 is not None else None,
    )


def output_activation(view: GraphView, head: head_mod.Head) -> str | None:
    """``"softmax"`` or ``"sigmoid"`` when the graph output is the scores through one (verify maps the
    output back to the scores' margins), else ``None`` (the output is the scores, or their log-softmax)."""
    node, seen = view.producer.get(head.output), None
    while node is not None and head.scores not in node.output:
        if node.op_type in ("Softmax", "Sigmoid"):
            seen = node.op_type.lower()
        node = view.producer.get(node.input[0]) if node.input else None
    return seen


def union_bound(one: bounds.Bound, detectors: int) -> bounds.Bound:
    """The natural-input bound of ``detectors`` ORed detectors, each bounded by ``one`` (a union bound)."""
    if detectors == 1:
        return one
    log10 = chance.union_log10(one.log10, detectors)
    statement = (f"Union over the signature's {detectors} detectors, each bounded as follows: {one.statement} "
                 f"Together: ≤ {bounds.format_probability(log10)}.")
    return bounds.Bound.from_log10(log10, one.kind, {**one.params, "ored_detectors": detectors}, statement)


def weight_bytes(model: Any) -> int:
    """Bytes of initializer data, whether in memory or in external data."""
    total = 0
    for t in model.graph.initializer:
        if is_external(t):
            length = external_info(t)[2]
            total += length if length is not None else 0
        else:
            total += t.ByteSize()
    return total
