"""Staining, end to end: calibrate, draw a detector, find its trigger, edit, check, write the key.

The stages (timed in :class:`StainResult.timings`):

1. **load** — read and check the model; find the host layer and the classifier head.
2. **calibration** — one onnxruntime pass over the calibration images with feature taps on the
   host's input and the head's input: the centre ``c``, the natural radius ``R``, the natural
   scores of every candidate direction, and the data-aware choice of the channel to use.
3. **trigger search** — draw ``v`` from the seeded generator, check its natural tail per position,
   then gradient ascent from the best calibration image until the trigger's score reaches the
   margin the bound target needs. The 8-bit trigger is re-scored by onnxruntime.
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
import time
from pathlib import Path
from typing import Literal

import numpy as np

from . import stain_edit
from ._onnx import head as head_mod
from ._onnx.dense import find_dense_output
from ._onnx.graph import GraphView
from ._onnx.hosts import MIN_DIMENSION, HostLayer, find_hosts, why_unusable
from ._onnx.inputs import infer_preprocessing
from ._onnx.io import load_model
from .calibration import (
    ACCEPT_FACTOR,
    SEARCH_FACTOR,
    calibration_pixels,
    margin_ratio,
    natural_radius,
    refuse_underflowing_target,
    selected_positions,
)
from .errors import BadInputError, BadModelError, InternalError, UnreachableBoundError, UnsupportedModelError
from .features import neuron_inputs
from .keys import (
    F8,
    CalibrationSection,
    DetectorSection,
    HostSection,
    Key,
    ModelSection,
    ScoreViewSection,
    SignatureSection,
    SignatureTrigger,
    TriggerSection,
    WhiteBoxSection,
    encode_png,
    envelope,
    public_record_path,
)
from .math import bounds, chance, detector
from .math.trigger import ascend, quantise
from .outputs import Artefacts, job_plan, write_unit
from .preprocess import Preprocessing
from .progress import Progress, Silent
from .runtime import run_batches, session, with_outputs
from .sanity import refuse_nonfinite
from .scoring import detector_scores
from .signature import class_margin, shift_score, top1_margins

Mode = Literal["inplace", "insert"]
Variant = Literal["non-additive", "additive"]

LEAN_BYTES = 256 * 2**20  # above this much weight data, onnxruntime and torch hold it in turn
RAISE_ATTEMPTS = 4  # fp16/int8 storage: tries at raising τ until the stored detector's rounding is covered


@dataclasses.dataclass
class StainOptions:
    mode: Mode = "inplace"
    variant: Variant = "non-additive"
    layer: str | None = None
    channel: int | None = None
    signature_class: int | None = None
    seed: int | None = None
    fpr: float = 1e-9
    max_draws: int = 8
    max_steps: int = 400
    providers: list[str] | None = None
    batch: int = 32
    chance: float | None = None  # black-box chance target (None: max(fpr, chance.CHANCE_FLOOR))


@dataclasses.dataclass
class StainResult:
    output: Path
    key_path: Path
    record_path: Path
    host: str
    channel: int | None
    mode: str
    variant: str
    bound: bounds.Bound
    threshold: float
    trigger_score: float
    signature_type: str  # "class" (class wins by a margin) or "shift" (scores move as predicted)
    signature_class: int
    signature_margin: float
    natural_max_score: float
    natural_firings: int
    natural_samples: int
    calibration_images: int
    agreement: float
    max_abs_delta: float
    draws: int
    search_steps: int
    timings: dict[str, float]
    notes: list[str]
    model_sha256: str
    signature_label: int | None = None  # detectors: the label shown at anchor ``signature_class``
    triggers: int = 1  # triggers of the signature (several: each its own class; see math/chance.py)
    signature_classes: list[int] = dataclasses.field(default_factory=list)
    chance_log10: float | None = None  # black-box chance: log10 ∏ 1/|A_t| (None: the class was fixed)
    chance_text: str | None = None


# -- helpers -----------------------------------------------------------------------------------------
def choose_host(hosts: list[HostLayer], view: GraphView, head: head_mod.Head, mode: Mode,
                layer: str | None) -> HostLayer:
    if mode == "inplace" and head.detection:
        raise UnsupportedModelError(
            "this is a detector (per-anchor class scores beside box outputs): its class head is not a "
            "pooled classifier, so the stain cannot be routed through existing channels in place; use --mode insert")
    if layer is not None:
        match = [h for h in hosts if h.name == layer]
        if not match:
            raise BadInputError(f"no layer named {layer!r} (see `onnxstain inspect`)")
        host = match[0]
        if not host.usable:
            raise UnsupportedModelError(f"layer {layer!r} cannot host a detector: {host.reason}")
        if host.token_layer:
            raise UnsupportedModelError(
                f"layer {layer!r} is a MatMul over tokens (its input is not [batch, features]): classifier stains "
                "need a Conv, Gemm or [batch, features] MatMul host (token hosts serve dense-output models in "
                "--mode insert)")
        if mode == "inplace" and host.inplace_reason:
            raise UnsupportedModelError(f"layer {layer!r} cannot host an in-place detector: {host.inplace_reason}")
        if mode == "inplace":
            route, why = head_mod.direct_route(view, host, head)
            if route is None:
                raise UnsupportedModelError(f"cannot route layer {layer!r} to the output in place: {why}; "
                                            "use --mode insert")
        return host
    usable = [h for h in hosts if h.usable and not h.token_layer]
    if not usable:
        raise UnsupportedModelError("the model has no usable host layer (a Conv, Gemm or MatMul+Add followed by "
                                    "ReLU, ReLU6, LeakyReLU, PReLU, HardSwish, SiLU, GELU or Mish, with at least "
                                    f"{MIN_DIMENSION} inputs per neuron): " + why_unusable(hosts))
    if mode == "inplace":
        routes = {h.name: head_mod.direct_route(view, h, head) for h in usable}
        routable = [h for h in usable if routes[h.name][0] is not None]
        if not routable:
            deepest = max(usable, key=lambda h: h.depth)
            raise UnsupportedModelError("no host layer reaches the classifier through pooling only, so the stain "
                                        f"cannot be routed in place (the deepest, {deepest.name}: "
                                        f"{routes[deepest.name][1]}); use --mode insert")
        exact = [h for h in routable if not h.inplace_reason]
        if not exact:
            raise UnsupportedModelError(f"layer {routable[-1].name!r} reaches the classifier, but its "
                                        f"{routable[-1].inplace_reason}")
        usable = exact
    if head.detection:
        # A detector's deepest layers are narrow and 1×1 (a hard margin): take the layer that needs the
        # smallest margin for the bound, the deeper one on ties.
        return min(usable, key=lambda h: (round(margin_ratio(h), 2), -h.depth))
    return max(usable, key=lambda h: (h.depth, h.m))


# -- the whole job -----------------------------------------------------------------------------------
def stain(
    model: str | Path,
    output: str | Path,
    key_path: str | Path,
    options: StainOptions | None = None,
    preprocessing: Preprocessing | None = None,
    images: str | Path | np.ndarray | None = None,
    progress: Progress | None = None,
    record_path: str | Path | None = None,
    artefacts: Artefacts | None = None,
) -> StainResult:
    """Stain ``model`` and write ``output``, the key and its public record. See the module docstring.

    With ``artefacts`` the model, key and record are only staged there (the caller commits them
    with its own outputs, :mod:`onnxstain.outputs`); without, they are written as one unit here."""
    opts = options or StainOptions()
    prog = progress or Silent()
    timings: dict[str, float] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    out_path = Path(output)
    key_path = Path(key_path)
    record = Path(record_path) if record_path else public_record_path(key_path)
    job_plan(model, out_path, key_path, record).check()
    loaded = load_model(model)
    if opts.mode not in ("inplace", "insert"):
        raise BadInputError(f"unknown mode {opts.mode!r}")
    if opts.variant not in ("non-additive", "additive"):
        raise BadInputError(f"unknown variant {opts.variant!r}")
    if not 0 < opts.fpr < 1:
        raise BadInputError("--fpr must be between 0 and 1")
    if opts.chance is not None and not 0 < opts.chance < 1:
        raise BadInputError("--chance must be between 0 and 1")
    if opts.seed is not None and not 0 <= opts.seed < 2**63:
        raise BadInputError(f"--seed must be a non-negative integer below 2^63, not {opts.seed}")
    pre, pre_notes = infer_preprocessing(loaded.model, loaded.path, preprocessing)
    refuse_nonfinite(loaded, pre, opts.providers)
    notes += pre_notes
    view = GraphView(loaded.model, pre.input_shape())
    head = head_mod.find_scores_head(view)
    if head is None and (dense := find_dense_output(view)) is not None:
        from .dense_stain import stain_dense

        return stain_dense(loaded, dense, out_path, key_path, record, opts, pre, notes, images, prog, t0,
                           artefacts=artefacts)
    if head is None:
        raise UnsupportedModelError("no classifier head (a Gemm or MatMul+Add producing the output) or detector "
                                    "head (per-anchor class scores beside per-anchor boxes) "
                                    "found; the black-box signature needs one")
    hosts = find_hosts(loaded.model, view)
    host = choose_host(hosts, view, head, opts.mode, opts.layer)
    refuse_underflowing_target(opts.fpr, host, opts.max_draws)
    if opts.mode == "inplace":
        _check_quantized_weights(view, host, head, opts.variant)
    route = None
    if opts.mode == "inplace":
        route, _ = head_mod.direct_route(view, host, head)
    seed = opts.seed if opts.seed is not None else int(np.random.SeedSequence().entropy % (2**63))
    rng = np.random.default_rng(seed)
    score_view = stain_edit.score_view(opts, rng, head)
    timings["load"] = time.perf_counter() - t0

    # -- calibration ---------------------------------------------------------------------------------
    t1 = time.perf_counter()
    pixels = calibration_pixels(images, pre, prog)
    x_cal = pre.to_input(pixels)
    taps = [host.input, head.scores] + ([] if head.detection else [head_mod.head_input(view, head)])
    tapped = with_outputs(loaded.model, taps)
    sess = session(tapped, opts.providers)
    with prog.task("calibration pass", total=len(x_cal)) as task:
        cal = run_batches(sess, x_cal, taps, batch=opts.batch, progress=task.advance)
    # A large model never has its weights in onnxruntime and in the torch prefix at the same time.
    lean = weight_bytes(loaded.model) > LEAN_BYTES
    if lean:
        sess = None
    phi_all = neuron_inputs(host, cal[host.input])  # group 0 for now
    group = 0
    stats = detector.FeatureStats.from_features(phi_all)
    radius = natural_radius(stats.max_radius, host)
    positions = host.positions
    target_chance = chance.chance_target(opts.fpr, opts.chance)
    n_trig = trigger_count(opts, head, score_view, target_chance)
    # T detectors are ORed on natural inputs: each gets target / T (T = 1: the target itself)
    tau0 = bounds.threshold_for_target(opts.fpr / n_trig, radius, host.m, positions=positions, draws=opts.max_draws)
    nat_scores = score_view.flat(cal[head.scores])
    pooled = None if head.detection else cal[taps[2]].reshape(len(x_cal), -1).astype(np.float64)
    sel = selected_positions(host)
    channel = stain_edit.choose_channel(opts, host, head, loaded, pooled, nat_scores)
    timings["calibration"] = time.perf_counter() - t1

    # -- directions and trigger search -------------------------------------------------------------------
    t2 = time.perf_counter()
    import torch

    from .torchprefix import prefix_for_input

    torch.manual_seed(seed % (2**31))
    prefix = None
    target = SEARCH_FACTOR * tau0
    weights = np.full(host.positions, opts.max_draws * n_trig)  # the other key may carry T detectors too

    def cross_ok(_smin: float, radii: np.ndarray) -> bool:
        return bounds.cross_key_bound(radii, tau0, host.m, positions_weight=weights).value <= opts.fpr / n_trig

    steps_total = 0
    finds: list[stain_edit.TriggerFind] = []

    def search(which: str, task) -> stain_edit.TriggerFind | None:
        nonlocal prefix, sess, steps_total
        for draw in range(1, opts.max_draws + 1):
            v = detector.sample_direction(rng, host.m)
            s_nat = detector.scores(phi_all, v, stats.centre)  # [N, P]
            if float(s_nat.max()) >= 0.5 * tau0:
                notes.append(f"{which}draw {draw}: natural scores reach {s_nat.max():.3g} ≥ τ0/2; direction rejected")
                continue
            soft = -np.log(np.exp(-s_nat[:, sel]).sum(axis=1))
            init = pixels[int(np.argmax(soft))].astype(np.float64)
            if prefix is None:
                prefix = prefix_for_input(loaded.model, [host.input], pre.input_shape(), opts.providers)
            fn = detector_scores(prefix, host, pre, v[None], stats.centre, group, sel)

            def report(step, smin, task=task, draw=draw):
                task.update(f"trigger search ({which}draw {draw}): step {step}, score {smin:.2f} / {target:.2f}")

            res = ascend(fn, init, score_target=target, accept=cross_ok, max_steps=opts.max_steps,
                         progress=report)
            steps_total += res.steps
            trig = quantise(res.pixels)
            if lean:
                prefix = fn = None
            if sess is None:
                sess = session(tapped, opts.providers)
            got_t = run_batches(sess, pre.to_input(trig), [host.input, head.scores])
            if lean:
                sess = None
            phi_t = neuron_inputs(host, got_t[host.input])[0]
            s_t = detector.scores(phi_t, v, stats.centre)
            s_star = float(s_t[sel].min())
            if s_star < ACCEPT_FACTOR * tau0:
                notes.append(f"{which}draw {draw}: the 8-bit trigger reached {s_star:.3g} < {ACCEPT_FACTOR} τ0 = "
                             f"{ACCEPT_FACTOR * tau0:.3g}; resampled")
                continue
            return stain_edit.TriggerFind(v, trig, phi_t, s_t, s_star, s_nat,
                                          score_view.flat(got_t[head.scores])[0], draw)
        return None

    with prog.task("trigger search", total=None) as task:
        for t in range(n_trig):
            found = search(f"trigger {t + 1}/{n_trig}, " if n_trig > 1 else "", task)
            if found is None:
                which = f" for trigger {t + 1} of {n_trig}" if n_trig > 1 else ""
                raise UnreachableBoundError(
                    f"no trigger{which} reached the margin needed for --fpr {opts.fpr:g} at layer {host.name} "
                    f"(τ0/R = {tau0 / radius:.2f}) within {opts.max_draws} draws; {_easier_layers(hosts, opts)}")
            finds.append(found)
    first = finds[0]
    v, trig, phi_t, s_t, s_nat, orig_trig_scores = (first.direction, first.pixels, first.phi, first.scores,
                                                    first.natural, first.original_scores)
    s_star = min(f.s_star for f in finds)
    draws = first.draws
    prefix = sess = None  # free the torch prefix and the calibration session before the edit
    timings["trigger_search"] = time.perf_counter() - t2

    # -- edit ----------------------------------------------------------------------------------------------
    t3 = time.perf_counter()
    tau = tau0
    bound = union_bound(bounds.ball_bound(tau0, radius, host.m, positions=positions, draws=opts.max_draws), n_trig)
    trig_input = pre.to_input(np.stack([f.pixels for f in finds]))
    if n_trig == 1:
        cls, allowed = stain_edit.signature_choice(opts, rng, nat_scores, orig_trig_scores, score_view)
        classes, allowed_sets = [cls], [allowed]
        shift = opts.mode == "inplace" and opts.variant == "additive"  # the shift signature has no class draw
        if opts.signature_class is None and 1.0 / allowed > target_chance and not head.detection and not shift:
            notes.append(f"black-box chance of the signature is 1/{allowed} (one trigger, its class drawn from "
                         f"{allowed}), above the target {target_chance:g}: the in-place route carries one trigger; "
                         "--mode insert carries as many as the target needs" if opts.mode == "inplace" else
                         f"black-box chance of the signature is 1/{allowed}, above the target {target_chance:g}")
    else:
        classes = stain_edit.signature_classes(rng, score_view.classes, n_trig)
        cls, allowed_sets = classes[0], [score_view.classes] * n_trig
    margin_target = max(10.0, 1.5 * float(np.quantile(top1_margins(nat_scores), 0.99)))

    def build(tau: float, channel) -> dict:
        if n_trig > 1:
            return stain_edit.build_multi_insert(opts, host, head, loaded, finds, stats.centre, tau, sel, classes,
                                                 margin_target, nat_scores, radius)
        return stain_edit.build_edit(opts, host, head, route, loaded, channel, v, stats.centre, tau, s_star, phi_t,
                                     phi_all, sel, pooled, nat_scores, cls, margin_target, orig_trig_scores, radius,
                                     score_view)

    edit = build(tau, channel)
    if edit["tau_loss"] > 1e-6 * tau0:
        # fp16 or int8 storage moves the detector's threshold: raise it so that the stored detector
        # fires only where the exact score exceeds τ0 (the bound's threshold), then check again.
        # The rebuilt detector rounds a little differently: raise τ until its own rounding is covered.
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
    margin_target = edit["margin_target"]
    notes += edit["notes"]
    stained = edit["model"]
    channel = edit["channel"]
    timings["edit"] = time.perf_counter() - t3

    # -- checks --------------------------------------------------------------------------------------------
    t4 = time.perf_counter()
    n_check = min(64, len(x_cal))
    # The scores tensor may sit before a Softmax or a Cast to the output type: tap it.
    check_sess = session(with_outputs(stained, [head.scores]), opts.providers)
    raw = run_batches(check_sess, np.concatenate([trig_input, x_cal[:n_check]]), [head.scores])[head.scores]
    got = score_view.flat(raw)
    trig_got, got = got[:n_trig], got[n_trig - 1:]  # got[0] is the (first) trigger, got[1:] the natural images
    if edit["signature"] == "shift":
        trig_margin = float(shift_score(got[0], orig_trig_scores, edit["expected_trigger"]))
        # quantized scores (QDQ) round the shift: allow their error along the expected direction
        shift = float(np.linalg.norm(edit["expected_trigger"] - orig_trig_scores))
        slack = 0.05 + edit["tolerance"] * np.sqrt(len(orig_trig_scores)) / max(shift, 1e-12)
        if abs(trig_margin - 1.0) > min(slack, 0.5):
            raise InternalError(f"internal check failed: trigger shift score {trig_margin:.3g} (expected 1)")
        signature = SignatureSection(type="shift", cls=cls, original=F8.of(orig_trig_scores), expected=F8.of(got[0]),
                                     expected_margin=1.0, threshold=0.5, original_margin=0.0)
    else:
        per = []
        for t, (f, c_t) in enumerate(zip(finds, classes, strict=True)):
            m_t = float(class_margin(trig_got[t], c_t))
            if not np.isfinite(m_t):
                raise BadModelError(f"the stained model's scores on the trigger are not finite (margin {m_t})")
            if m_t < 0.5 * margin_target:
                which = f"trigger {t + 1}'s" if n_trig > 1 else "the trigger's"
                raise InternalError(f"internal check failed: {which} signature margin is {m_t:.3g}")
            per.append({"cls": c_t, "allowed": allowed_sets[t], "expected_margin": m_t, "threshold": 0.5 * m_t,
                        "original_margin": float(class_margin(f.original_scores, c_t))})
        trig_margin = min(p["expected_margin"] for p in per)
        triggers = None
        if n_trig > 1:
            triggers = tuple(
                SignatureTrigger(**p, png=encode_png(f.pixels), direction=F8.of(f.direction),
                                 trigger_scores=F8.of(f.scores), s_star=f.s_star, draws=f.draws,
                                 trigger_radii=F8.of(detector.radii(f.phi, stats.centre)), white_box_channel=t)
                for t, (p, f) in enumerate(zip(per, finds, strict=True)))
        chance_fields = {} if opts.signature_class is not None else {
            "allowed": allowed_sets[0], "chance_log10": chance.log10_chance(allowed_sets),
            "chance_target": target_chance}
        signature = SignatureSection(type="multi-class" if n_trig > 1 else "class", triggers=triggers,
                                     **{k: per[0][k] for k in ("cls", "expected_margin", "threshold",
                                                               "original_margin")}, **chance_fields)
    predicted = edit["predicted"]
    err = float(np.abs(got[1:].astype(np.float64) - predicted[:n_check]).max())
    scale = float(np.abs(nat_scores).max())
    # fp16 scores carry about 1e-3 relative rounding; QDQ scores one step of their quantization
    eps = float(np.finfo(raw.dtype).eps) if np.issubdtype(raw.dtype, np.floating) else 0.0
    if err > max(1e-3, 8 * eps) * max(scale, 1.0) + edit["tolerance"]:
        raise InternalError(f"internal check failed: natural outputs differ from the prediction by {err:.3g}")
    agreement = float(np.mean(predicted.argmax(1) == nat_scores.argmax(1)))
    max_delta = float(np.abs(predicted - nat_scores).max()) if opts.mode == "inplace" else float(
        np.abs(got[1:].astype(np.float64) - nat_scores[:n_check]).max())
    natural_firings = int(sum((f.natural > tau).sum() for f in finds))
    check_sess = None
    timings["checks"] = time.perf_counter() - t4

    # -- save ----------------------------------------------------------------------------------------------
    t5 = time.perf_counter()
    with write_unit(artefacts) as writer:  # staged, synced; key, record, then model renamed (outputs.py)
        digest = writer.stage_model(stained, out_path, source=loaded)
        key = Key(
            **envelope("stain"),
            model=ModelSection(source_sha256=loaded.sha256, output_sha256=digest, input=view.graph_inputs[0].name,
                               scores=head.output, classes=score_view.classes,
                               score_view=ScoreViewSection(shape=tuple(score_view.shape), label=score_view.label,
                                                            step=score_view.step),
                               layout=tuple(head.layout) if head.detection else None,
                               output_activation=output_activation(view, head)),
            preprocessing=pre,
            mode=opts.mode,
            variant=opts.variant,
            seed=seed,
            host=HostSection(name=host.name, op=host.op, input=host.input, output=edit["tap"],
                             channel=edit["tap_channel"], host_channel=channel, group=group, m=host.m,
                             positions=host.positions, selected_positions=tuple(int(p) for p in sel),
                             kernel=tuple(host.kernel), strides=tuple(host.strides), pads=tuple(host.pads),
                             dilations=tuple(host.dilations), groups=host.groups,
                             out_hw=tuple(host.out_hw) if host.out_hw else None),
            detector=DetectorSection(direction=F8.of(v), centre=F8.of(stats.centre), threshold=tau, tau0=tau0,
                                     s_star=s_star, gain=edit["gain"], delta=edit["delta"], trigger_scores=F8.of(s_t),
                                     trigger_radii=F8.of(detector.radii(phi_t, stats.centre)), draws=draws,
                                     max_draws=opts.max_draws),
            trigger=TriggerSection(png=encode_png(trig), height=pre.height, width=pre.width),
            signature=signature,
            white_box=WhiteBoxSection(tensor=edit["tap"], channel=edit["tap_channel"], expected=edit["wb_expected"],
                                      threshold=edit["wb_threshold"], positions=tuple(int(p) for p in sel)),
            bound=bound,
            calibration=CalibrationSection.of(stats, len(x_cal), radius, s_nat, natural_firings, opts.fpr),
        )
        writer.stage_key(key, key_path, record)
    timings["save"] = time.perf_counter() - t5
    timings["total"] = time.perf_counter() - t0
    return StainResult(
        output=out_path, key_path=key_path, record_path=record, host=host.name,
        channel=channel, mode=opts.mode, variant=opts.variant, bound=bound, threshold=tau,
        trigger_score=s_star, signature_type=signature.kind, signature_class=cls, signature_margin=trig_margin,
        natural_max_score=max(float(f.natural.max()) for f in finds), natural_firings=natural_firings,
        natural_samples=int(s_nat.size) * n_trig, calibration_images=len(x_cal), agreement=agreement,
        max_abs_delta=max_delta, draws=draws, search_steps=steps_total, timings=timings, notes=notes,
        model_sha256=digest, signature_label=score_view.label, triggers=n_trig, signature_classes=classes,
        chance_log10=signature.chance_log10,
        chance_text=chance.describe_chance(allowed_sets) if signature.chance_log10 is not None else None,
    )


def trigger_count(opts: StainOptions, head: head_mod.Head, view, target: float) -> int:
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


def _check_quantized_weights(view: GraphView, host: HostLayer, head: head_mod.Head, variant: str) -> None:
    """Refuse, before any work, an in-place edit of int8 weights quantized per tensor.

    A per-channel weight takes the edit with a new scale for the edited channel only; a per-tensor
    one would have to re-encode every channel (or saturate), so it is refused with the ways out.
    """
    edited = [("host layer", host.weight)]
    if variant == "non-additive":
        edited.append(("classifier", head.weight))
    for what, tensor in edited:
        if view.is_quantized(tensor) and not view.quantized(tensor).per_axis:
            raise UnsupportedModelError(
                f"the {what} weight {tensor!r} is int8 quantized per tensor: an in-place stain needs per-channel "
                "scales; quantize with per_channel=True, use --mode insert, or stain the float model and "
                "quantize afterwards")


def weight_bytes(model) -> int:
    """Bytes of initializer data, whether in memory or in external data."""
    from ._onnx.tensors import external_info, is_external

    total = 0
    for t in model.graph.initializer:
        if is_external(t):
            length = external_info(t)[2]
            total += length if length is not None else 0
        else:
            total += t.ByteSize()
    return total


def _easier_layers(hosts: list[HostLayer], opts: StainOptions) -> str:
    """Which layers need the smallest margin ratio τ0/R for this target (higher m, fewer positions)."""
    needs = []
    for h in hosts:
        if h.usable:
            ratio = bounds.threshold_for_target(opts.fpr, 1.0, h.m, positions=h.positions, draws=opts.max_draws)
            needs.append((ratio, h.name, h.m))
    needs.sort()
    best = ", ".join(f"{name} (m={m}, needs τ0/R={ratio:.2f})" for ratio, name, m in needs[:3])
    return f"layers that need the smallest margin for this target: {best}; or ask for a larger --fpr"
