"""Verification: does a model carry the stain described by a key?

* **Black-box** — run the model on the key's 8-bit trigger and on controls (the trigger with its
  pixels shuffled, its mirror image, a grey image, and natural photos when available). Stained iff the
  signature class wins by at least the key's threshold on the trigger and on none of the controls made
  from the trigger. Natural photos are reported, not decisive: a model may rightly see the signature's
  class in a photo, and the black-box chance bound already covers a model that favours any class.
* **White-box** — when the model still has the key's host tensor: read the detector neuron
  through a feature tap. Stained iff it reaches the threshold on the trigger at every selected
  position, and stays below it on the controls. For a detector built to a designed level (every
  non-additive stain: an overwritten neuron, an inserted branch) the threshold is that level less a
  stated ``tolerance`` (default 0.75 of it), so that weight drift from quantisation or noise is read
  as what it is, not as a missing stain. (An additive stain hides in a working neuron: its threshold
  is the key's, midway between that neuron's own response to the trigger and the designed level.)

* **Weights** — in-place stains: the host channel's row (or its change, for an additive stain) read from the
  stored weights and compared with the key's direction. Read when the outputs cannot show the signature
  (they drift from the stained model's: int8, noise) or do not show it (static int8 clipped the detector's
  firing, or its classifier column was cut); then the verdict rests on it. In the second case it overrules
  two failed checks, so it is held to at least the stain's default standard (``FALLBACK_LOG10``).

The decision needs the black-box check and, when it is available, the white-box check; ``basis`` says
which of them it rests on (``"black-box only"`` when the host tensor is gone: renamed, fused or
re-exported; ``"weights"`` as above). Every check reports its margin (score − threshold).
``fpr_bound`` is the probability, over the key's random direction, that a model carrying an
independently drawn stain of the same construction would pass this verification: the chance its
detector fires on our trigger (a *cross-key* bound, computed from the trigger's own feature radii).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from ._onnx.graph import GraphView
from ._onnx.head import decision_threshold
from ._onnx.inputs import image_input
from ._onnx.io import load_model, write_bytes_atomic
from ._stain.result import StainOptions
from .errors import BadInputError, BadKeyError, KeyMismatchError
from .keys import Key, ShuffleSection, WhiteBoxSection, decode_png, load_key
from .math import bounds, chance
from .math.maps import pool_maps
from .math.shuffle import placed_blocks, row_fingerprints, stored_order_match
from .patch import Patch, paste_pixels, smooth_backgrounds
from .preprocess import Preprocessing
from .runtime import image_rows, run_batches, session, with_outputs
from .sanity import refuse_nonfinite
from .signature import (
    SHIFT_DRIFT_GATE,
    SYNTHETIC_CONTROL_NAMES,
    ScoreView,
    class_margin,
    dense_pattern,
    drift_gate,
    lock_agreement,
    pearson,
    shift_score,
    synthetic_controls,
)

# The weight check read where the outputs do not show the signature overrules two failed checks: it must meet the
# key's bound and at least the stain's default standard of evidence (its --fpr), whatever a key was made with.
FALLBACK_LOG10 = float(np.log10(StainOptions().fpr))
REPORT_FORMAT = "onnxstain-verify-report"
REPORT_VERSION = 2  # 2: each check's margin, the verdict's basis, the white-box tolerance
# The share of a detector's designed firing level that drift may take before the white-box check fails. The
# bounds count any firing at all (a score above τ); the check asks for a quarter of the designed level on the
# trigger and less on every control, so that quantisation and weight noise read as drift, not as no stain.
WHITE_BOX_TOLERANCE = 0.75
SYNTHETIC_CONTROLS = 3  # shuffled trigger, mirrored trigger, grey image: decisive controls


WEAK_BOUND_LOG10 = -2.0  # a cross-key bound above 1 % proves little ...


def weak_bound(cross: bounds.Bound, natural: bounds.Bound) -> bool:
    """... unless the key was made for a loose target itself (``--fpr 0.05``): weak above both 1 % and ten
    times the key's natural-input bound."""
    return cross.log10 > max(WEAK_BOUND_LOG10, natural.log10 + 1.0)


@dataclasses.dataclass
class Check:
    name: str
    available: bool
    passed: bool
    score: float | None
    threshold: float | None
    detail: str
    margin: float | None = None  # score − threshold: how far the check is from flipping
    # a shift signature's drift gate (signature.drift_gate): how far the model strays on the controls
    drift: float | None = None

    def __post_init__(self) -> None:
        if self.margin is None and self.score is not None and self.threshold is not None:
            self.margin = float(self.score) - float(self.threshold)


@dataclasses.dataclass
class VerifyResult:
    stained: bool
    score: float  # the deciding check's: the black box's, or the weight check's cosine where the outputs drift
    threshold: float
    fpr_bound: bounds.Bound
    natural_bound: bounds.Bound
    checks: list[Check]
    model: str
    model_sha256: str
    key_commitment: str
    notes: list[str]
    kind: str = "stain"  # "stain" or "lock": what the key describes
    # the signature's own black-box chance (an unrelated model shows every prescribed class): ∏ 1/|A_t|
    chance_log10: float | None = None
    chance_text: str | None = None
    tolerance: float | None = None  # the white-box tolerance applied (overwritten neurons), else None
    # the model-signing signature and signed statement beside the model, if any (onnxstain.fleet.signing)
    signature: dict[str, Any] | None = None
    images: int = 0  # the images verify ran through the model (triggers, controls, references)

    @property
    def drifted(self) -> bool:
        """The outputs drift too far from the stained model's to read a shift signature (the black box's gate)."""
        return any(c.drift is not None and c.drift > SHIFT_DRIFT_GATE for c in self.checks if c.name == "black-box")

    @property
    def basis(self) -> str:
        """What the verdict rests on: both checks, the black box alone (the host tensor is gone), or the weights
        (the outputs drift too far from the stained model's to read the signature, or they do not show it and the
        detector's row is still in the weights)."""
        weights = next((c for c in self.checks if c.name == "weights" and c.available), None)
        if weights is not None and (weights.passed or self.drifted):
            return "weights"
        return "black-box and white-box" if all(c.available for c in self.checks) else "black-box only"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "kind": self.kind,
            "stained": self.stained,
            "basis": self.basis,
            "white_box_tolerance": self.tolerance,
            "score": self.score,
            "threshold": self.threshold,
            "fpr_bound": self.fpr_bound.value,
            "fpr_bound_log10": self.fpr_bound.log10,
            "fpr_bound_detail": self.fpr_bound.to_dict(),
            "natural_bound": self.natural_bound.to_dict(),
            "black_box_chance": None if self.chance_log10 is None else 10.0 ** self.chance_log10,
            "black_box_chance_log10": self.chance_log10,
            "black_box_chance_detail": self.chance_text,
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "model": self.model,
            "model_sha256": self.model_sha256,
            "key_commitment": self.key_commitment,
            "notes": self.notes,
            "signature": self.signature,
            "images": self.images,
        }

    def write_json(self, path: str | Path) -> None:
        write_bytes_atomic(path, json.dumps(self.to_dict(), indent=2).encode() + b"\n")


def _controls(trigger: np.ndarray, count: int, pre: Preprocessing) -> tuple[np.ndarray, list[str]]:
    images = list(synthetic_controls(trigger))
    names = list(SYNTHETIC_CONTROL_NAMES)
    try:
        from . import naturalset

        nat = naturalset.natural_images("heldout", size=(pre.height, pre.width), views=1)
        take = nat.pixels[:count]
        images.extend(take)
        names.extend(f"natural photo {pid}" for pid in nat.photo_ids[:count])
    except Exception:  # natural photos are optional on a runtime-only box
        pass
    return np.stack(images), names


def verify(
    model: str | Path,
    key: Key | str | Path,
    providers: list[str] | None = None,
    natural_controls: int = 16,
    tolerance: float = WHITE_BOX_TOLERANCE,
    signer_key: str | Path | None = None,
    unlock: Key | str | Path | None = None,
) -> VerifyResult:
    """Whether ``model`` carries the stain or lock of ``key`` (see the module's docstring). A model-signing
    signature beside the model is reported (checked with ``signer_key``, a PEM public key); it does not change
    the verdict. ``unlock``: the lock key of a stained copy that was then locked (``issue --both``): its patch
    is pasted into every image the stain's check sends, so the model computes as the stained one did."""
    patch = None
    if unlock is not None:
        lock_key = unlock if isinstance(unlock, Key) else load_key(unlock)
        if lock_key.kind != "lock":
            raise BadKeyError("--unlock takes the copy's lock key, not a stain key")
        key = key if isinstance(key, Key) else load_key(key)
        sizes = [(k.preprocessing.height, k.preprocessing.width) for k in (key, lock_key)]
        if sizes[0] != sizes[1]:
            raise KeyMismatchError(f"the lock key is for {sizes[1][0]}x{sizes[1][1]} inputs, the key for "
                                   f"{sizes[0][0]}x{sizes[0][1]}: --unlock takes the lock of the same copy")
        patch = key_patch(lock_key)
    res = _verify(model, key, providers, natural_controls, tolerance, patch)
    from .fleet.signing import check_signatures

    found = check_signatures(res.model, signer_key, res.key_commitment)
    if found is not None:
        res.signature = dataclasses.asdict(found)
        res.notes.append(f"signature: {found.detail}")
    return res


def _verify(model: str | Path, key: Key | str | Path, providers: list[str] | None, natural_controls: int,
            tolerance: float, patch: Patch | None = None) -> VerifyResult:
    if not 0.0 <= tolerance < 1.0:
        raise BadInputError(f"the white-box tolerance must be in [0, 1), not {tolerance}")
    key = key if isinstance(key, Key) else load_key(key)
    loaded = load_model(model)
    pre = key.preprocessing
    info = image_input(loaded.model)
    key.check_input_size(info.height, info.width)
    view = GraphView(loaded.model)
    scores_name = key.model.scores
    if scores_name not in view.output_names:
        if len(view.output_names) != 1:
            raise KeyMismatchError(f"the model has no output {scores_name!r} the key expects")
        scores_name = view.output_names[0]
    if key.kind == "lock":
        if patch is not None:
            raise BadKeyError("--unlock opens a locked copy for its stain's check; this key is a lock's")
        return _verify_lock(loaded, view, key, pre, scores_name, providers, tolerance)
    sig = key.signature
    assert sig is not None  # a stain key has one (checked on load)
    trigger = key.trigger_pixels()
    triggers = key_triggers(key)
    controls, control_names = _controls(trigger, natural_controls, pre)
    batch = np.concatenate([triggers, controls])
    if patch is not None:
        batch = paste_pixels(batch, patch)
    x = pre.to_input(batch)
    wb_tensor = key.white_box.tensor
    has_tap = wb_tensor in view.producer
    outputs = [scores_name] + ([wb_tensor] if has_tap else [])
    sess = _session(loaded, pre, outputs, has_tap, providers)
    res = run_batches(sess, x, outputs, batch=8)
    raw = res[scores_name]
    image_rows(raw, scores_name, len(x))
    black = _black_box(key, raw, len(triggers), control_names)
    notes: list[str] = []
    designed = key.variant == "non-additive"
    if has_tap:
        white = _white_box(key, res[wb_tensor].astype(np.float64), len(triggers), tolerance if designed else None)
    else:
        white = Check("white-box", False, False, None, None,
                      f"tensor {wb_tensor!r} is not in this model (renamed or re-exported): not read")
        notes.append("white-box check unavailable: the model's tensors differ from the stained model's")
    checks = [black, white]
    drifted = black.drift is not None and black.drift > SHIFT_DRIFT_GATE
    stained, deciding = _decide(key, loaded.model, checks, drifted, notes)
    cross = _cross_key_bound(key, len(triggers))
    if weak_bound(cross, key.bound):
        notes.append(f"the cross-key bound {cross} is weak: the key's triggers lie far from the calibration "
                     "centre, so it does not rule out that another key's detector fires on them; the verdict "
                     "rests on the black-box signature" + (" and its chance bound" if sig.chance_log10 is not None
                                                           else ""))
    chance_log10 = sig.chance_log10
    chance_text = None
    if chance_log10 is not None:
        allowed = ([tr.allowed for tr in sig.triggers or ()] if sig.kind == "multi-class"
                   else [sig.allowed or _score_view(key).classes])
        chance_text = chance.describe_chance(allowed)
    assert deciding.score is not None and deciding.threshold is not None
    return VerifyResult(
        stained=stained, score=deciding.score, threshold=deciding.threshold,
        fpr_bound=cross, natural_bound=key.bound, checks=checks,
        model=str(loaded.path), model_sha256=loaded.sha256, key_commitment=key.commitment, notes=notes,
        chance_log10=None if chance_log10 is None else float(chance_log10), chance_text=chance_text,
        tolerance=tolerance if designed and has_tap else None, images=len(x),
    )


def _decide(key: Key, model: Any, checks: list[Check], drifted: bool, notes: list[str]) -> tuple[bool, Check]:
    """The verdict and the check that heads the report, from the output checks (``checks[0]`` the black box),
    reading the weights where the outputs cannot show the signature or do not show it. Appends the weight check
    it read to ``checks`` and its note to ``notes``."""
    black = checks[0]
    if drifted:  # the signature cannot be read from this model's outputs: read the detector from its weights
        weights = weight_check(key, model)
        checks.append(weights)
        notes.append("the model's outputs drift from the stained model's (int8, noise, another model): the verdict "
                     "rests on the weight check" if weights.available else
                     "the model's outputs drift from the stained model's and the key has no weight check (it "
                     "predates it): not read as stained")
        return weights.passed, weights if weights.available else black
    if all(c.passed for c in checks if c.available):
        return True, black
    if key.mode == "inplace":
        # The outputs do not show the signature, yet the detector's row may still be in the weights: static int8
        # calibrated on photos alone clips an overwritten neuron's firing on the trigger (RapidOCR's classifier),
        # or a thief zeroed its classifier column. The row is evidence of origin with its own bound, held here to
        # the key's bound and at least the stain's default standard (it overrules two failed checks).
        weights = weight_check(key, model, target_log10=min(float(key.bound.log10), FALLBACK_LOG10))
        if weights.available:
            checks.append(weights)
            if weights.passed:
                notes.append("the signature does not show in the outputs (" + ", ".join(
                    c.name for c in checks[:2] if c.available and not c.passed) + " failed: the detector's "
                    "firing clipped by int8, or its path to the scores cut), but its row is in the weights: the "
                    "verdict rests on the weight check; a model without this stain passes either way with "
                    "probability at most the sum of the two checks' bounds")
                return True, weights
    return False, black


def _session(loaded: Any, pre: Preprocessing, outputs: list[str], has_tap: bool, providers: list[str] | None) -> Any:
    """The one session verify runs (the white-box tap added as an output), refused when not finite."""
    sess = session(with_outputs(loaded.model, outputs) if has_tap else loaded.model, providers)
    refuse_nonfinite(loaded, pre, providers, sess=sess)
    return sess


def _black_box(key: Key, raw: np.ndarray, n_trig: int, control_names: list[str]) -> Check:
    """The signature read from the output scores: rows ``[:n_trig]`` are the triggers, the rest controls."""
    sig = key.signature
    assert sig is not None
    score_view = _score_view(key)
    scores = _signature_scores(key, raw)
    threshold = float(sig.threshold)
    if sig.kind == "multi-class":
        # every trigger must show its own class by its threshold; controls are not part of the decision (the
        # chance bound covers any model independent of the key, and a few-class model is often confident)
        trig_list = sig.triggers or ()
        per = [(float(class_margin(scores[t], tr.cls)), float(tr.threshold)) for t, tr in enumerate(trig_list)]
        hits = sum(m >= thr for m, thr in per)
        worst = min(range(n_trig), key=lambda t: per[t][0] / per[t][1])
        value = per[worst][0] / per[worst][1]
        return Check("black-box", True, hits == n_trig, value, 1.0,
                     f"{hits} of {n_trig} triggers show their own class by their threshold (weakest: trigger "
                     f"{worst + 1}, class {trig_list[worst].cls}, margin {per[worst][0]:.3g} vs "
                     f"{per[worst][1]:.3g}; score = margin / threshold)")
    if sig.kind == "pattern":
        assert sig.pattern_seed is not None and sig.block is not None and key.model.dense_shape is not None
        if raw[0].size != int(np.prod(key.model.dense_shape)):
            raise KeyMismatchError(f"the key expects output maps of shape {list(key.model.dense_shape)}; this "
                                   f"model gives {list(raw.shape[1:])}")
        pattern = dense_pattern(sig.pattern_seed, tuple(key.model.dense_shape), sig.block)
        corr = pearson(scores, pattern.reshape(1, -1))
        value = float(corr[0])
        worst = int(np.argmax(corr[1:])) + 1
        return Check("black-box", True, value >= threshold and float(corr[1:].max()) < threshold, value, threshold,
                     f"the trigger's output map correlates {value:.3g} with the key's pattern (expected "
                     f"{sig.expected_margin:.3g}); best control {corr[worst]:.3g} ({control_names[worst - 1]})")
    if sig.kind == "shift":
        assert sig.original is not None and sig.expected is not None
        original, expected = sig.original.array(), sig.expected.array()
        if original.size != scores.shape[1]:
            raise KeyMismatchError(f"the key's shift signature has {original.size} scores; this model gives "
                                   f"{scores.shape[1]}")
        value = float(shift_score(scores[0], original, expected))
        detail = (f"the trigger's scores moved {value:.3g} of the way from the original model's output towards the "
                  "stained model's (1 = stained, 0 = original)")
        if sig.controls is None:
            return Check("black-box", True, value >= threshold, value, threshold,
                         detail + "; no drift gate (the key predates it: a drifted model can pass by chance)")
        gate = drift_gate(scores[n_trig:n_trig + SYNTHETIC_CONTROLS], sig.controls.array(), original, expected)
        passed = value >= threshold and gate <= SHIFT_DRIFT_GATE
        return Check("black-box", True, passed, value, threshold, drift=gate, detail=
                     detail + f"; on the controls the scores drift {gate:.3g} of the shift from the stained model's "
                     f"(at most {SHIFT_DRIFT_GATE:g} to read the signature"
                     + ("" if gate <= SHIFT_DRIFT_GATE else ": this model drifts too far (int8, noise, another "
                        "model), the trigger's shift is not evidence") + ")")
    margins = class_margin(scores, sig.cls)
    value = float(margins[0])
    synthetic, natural = margins[1:1 + SYNTHETIC_CONTROLS], margins[1 + SYNTHETIC_CONTROLS:]
    worst = int(np.argmax(synthetic)) + 1
    what = f"class {sig.cls}" if score_view.label is None else f"label {score_view.label} at anchor {sig.cls}"
    detail = (f"{what} wins the trigger by {value:.3g} (expected {sig.expected_margin:.3g}); best control made "
              f"from the trigger {margins[worst]:.3g} ({control_names[worst - 1]})")
    if len(natural):
        shows = int((natural >= threshold).sum())
        detail += (f"; {shows} of {len(natural)} natural photos show {what} by the threshold"
                   + (" (not decisive: the black-box chance bound covers a model that favours a class)" if shows
                      else ""))
    return Check("black-box", True, value >= threshold and float(synthetic.max()) < threshold, value, threshold,
                 detail)


def black_box_check(key: Key, raw: np.ndarray, n_trig: int) -> Check:
    """The black-box check on outputs ``raw`` of the key's triggers (``n_trig`` rows) followed by the synthetic
    controls made from the first (:func:`onnxstain.signature.synthetic_controls`): what an endpoint allows."""
    return _black_box(key, raw, n_trig, list(SYNTHETIC_CONTROL_NAMES))


def screen_triggers(key: Key, raw: np.ndarray) -> tuple[float, bool]:
    """The signature read on the key's triggers alone (rows of ``raw``, as :func:`key_triggers` orders them):
    ``(score / threshold, passed)``. A screen, not a verdict: :func:`verify` adds the controls and the white box
    (``onnxstain identify`` screens every key of a registry this way, then verifies the keys that pass)."""
    sig = key.signature
    assert sig is not None
    scores = _signature_scores(key, raw)
    if sig.kind == "multi-class":
        ratio = min(float(class_margin(scores[t], tr.cls)) / float(tr.threshold)
                    for t, tr in enumerate(sig.triggers or ()))
        return ratio, ratio >= 1.0
    if sig.kind == "shift":
        assert sig.original is not None and sig.expected is not None
        value = float(shift_score(scores[0], sig.original.array(), sig.expected.array()))
    elif sig.kind == "class":
        value = float(class_margin(scores[0], sig.cls))
    else:
        raise KeyMismatchError(f"a {sig.kind} signature is read from output maps, not screened among classifier keys")
    return value / float(sig.threshold), value >= float(sig.threshold)


def cross_key_bound(key: Key) -> bounds.Bound:
    """The chance that a model carrying an independently drawn stain passes this key (see :func:`verify`)."""
    return _cross_key_bound(key, len(key_triggers(key)))


def _white_box(key: Key, act: np.ndarray, n_trig: int, tolerance: float | None) -> Check:
    """The detector's own activation: trigger t fires its channel at every selected position, no control does.

    ``tolerance`` (detectors built to a designed level): the threshold is that level ``expected`` less that
    share of it, instead of the key's recorded threshold."""
    sig, wb = key.signature, key.white_box
    assert sig is not None and wb.channel is not None and wb.positions is not None and wb.threshold is not None
    sel = np.asarray(wb.positions, dtype=int)
    threshold = float(wb.threshold) if tolerance is None else (1.0 - tolerance) * float(wb.expected)
    chans = [tr.white_box_channel for tr in sig.triggers or ()] if sig.kind == "multi-class" else [wb.channel]
    channels = act.shape[1] if act.ndim > 1 else 0
    key.check_channel(channels, wb.tensor)
    if max(chans) >= channels:
        raise KeyMismatchError(f"the key's triggers read white-box channel {max(chans)}; tensor {wb.tensor!r} "
                               f"of this model has {channels} channel(s)")
    on_trigger = float("inf")
    for t, c_t in enumerate(chans):
        per_pos = act[:, c_t].reshape(len(act), -1)
        on = per_pos[t, sel] if per_pos.shape[1] > sel.max() else per_pos[t]
        on_trigger = min(on_trigger, float(on.min()))
    on_controls = float(act[n_trig:][:, chans].max())
    # In-place additive stains hide in a working neuron, which is legitimately active on controls.
    hidden = key.mode == "inplace" and key.variant == "additive"
    passed = on_trigger >= threshold and (on_controls < threshold or hidden)
    rule = (f"threshold {threshold:.4g} = the designed {wb.expected:.4g} less the tolerance {tolerance:g}"
            if tolerance is not None else f"threshold {threshold:.4g}")
    return Check("white-box", True, passed, on_trigger, threshold,
                 f"detector reads {on_trigger:.4g} on the trigger (expected {wb.expected:.4g}; {rule}); "
                 f"max on controls {on_controls:.3g}")


def weight_check(key: Key, model: Any, target_log10: float | None = None) -> Check:
    """The detector read from the weights (in-place stains): the cosine between the key's direction ``v`` and the
    host channel's row (an overwritten neuron) or that row's change from the original's (a hidden one), in the
    host layer found by name or among the stored tensors of its shape (renamed, fused, int8). For a model
    without this key the row is fixed independently of ``v``, so the cosine's tail is the spherical cap; the
    check passes where that p-value — times the layer's channels (the hidden stain chose its channel after
    drawing ``v``) and the candidate tensors — is within ``target_log10`` (default: the key's own bound)."""
    from ._onnx.layer_rows import LayerRows, candidate_rows, row_change
    from .math import identify as ident

    wb, ch, v = key.white_box, key.host.host_channel, key.feature_detector.direction
    if key.mode != "inplace" or ch is None or v is None or wb.original_row is None or wb.channels is None:
        return Check("weights", False, False, None, None, "the key has no weight check (inserted stains, keys "
                                                           "written before it)")
    m, direction, original = key.host.m, v.array(), wb.original_row.array()
    found = LayerRows(model).rows(key.host.name, None)
    candidates = [found] if found is not None else candidate_rows(model, (wb.channels, m))
    candidates = [r for r in candidates if r.shape == (wb.channels, m)]
    if not candidates:
        return Check("weights", False, False, None, None, f"no weight tensor of the host layer's shape "
                                                          f"({wb.channels} × {m}) in this model")
    hidden = key.variant == "additive"
    vectors = np.stack([row_change(r[ch], original) if hidden else r[ch] for r in candidates])
    cos = ident.cosines(vectors, np.tile(direction, (len(vectors), 1)))
    best = int(np.argmax(cos))
    choices = len(candidates) * (wb.channels if hidden else 1)
    log10_p = float(ident.log10_tail(cos[best:best + 1], m)[0]) + float(np.log10(choices))
    target = float(key.bound.log10) if target_log10 is None else target_log10
    threshold = ident.threshold(m, keys=choices, target=10.0 ** max(target, -300.0))
    where = "by name" if found is not None else f"among {len(candidates)} tensors of its shape"
    return Check("weights", True, log10_p <= target, float(cos[best]), threshold,
                 f"host layer found {where}; the channel's {'change from the original row' if hidden else 'row'} has "
                 f"cosine {cos[best]:.4g} with the key's direction: an unrelated model scores this high with "
                 f"probability ≤ {bounds.format_probability(min(0.0, log10_p))} (passes within "
                 + ("the key's bound " if target_log10 is None else "") + f"{bounds.format_probability(target)})")


def _cross_key_bound(key: Key, n_trig: int) -> bounds.Bound:
    """Another key of the same construction may have used up to max_draws directions per detector, and carry
    as many detectors as this one: any of them firing on any of our triggers (see bounds.md §5, §8)."""
    sig, det = key.signature, key.feature_detector
    assert sig is not None
    if sig.kind == "multi-class":
        radii = np.concatenate([tr.trigger_radii.array().ravel() for tr in sig.triggers or ()])
    else:
        if det.trigger_radii is None:
            raise BadKeyError("the key's detector.trigger_radii is missing (a stain key needs it)")
        radii = det.trigger_radii.array()
    return bounds.cross_key_bound(radii, float(det.tau0), key.host.m,
                                  positions_weight=np.full(radii.size, det.max_draws * n_trig))


def to_logits(values: np.ndarray, activation: str | None) -> np.ndarray:
    """The model's output mapped back to the scores the signature was made in (up to a per-sample shift,
    which no margin sees): ``log p`` after a Softmax, ``log(p / (1 − p))`` after a Sigmoid."""
    y = np.asarray(values, np.float64)
    if activation == "softmax":
        return np.log(np.maximum(y, np.finfo(np.float64).tiny))
    if activation == "sigmoid":
        p = np.clip(y, np.finfo(np.float64).tiny, 1.0 - np.finfo(np.float32).epsneg)
        return np.log(p) - np.log1p(-p)
    return y


def _verify_lock(loaded, view: GraphView, key: Key, pre: Preprocessing, scores_name: str,
                 providers: list[str] | None, tolerance: float) -> VerifyResult:
    """A model carries the lock iff the patch restores the original's outputs and its absence does not.

    The key records the original model's scores on seeded synthetic reference images, with and
    without the patch; no photos are needed. Black box: the patch must give the original's output on at
    least half more of the references than its absence does (score = share with the patch − share
    without ≥ 0.5; the locked model as written scores 1, a model without this lock about 0). The
    references are synthetic and their top-1 margins small (0.1 to 2 on MobileNetV2): int8 rounding flips
    many of them, so a quantised copy may read as not locked here; its lock is measured on natural photos
    (``quantize``'s report, the lock audit). White box: the detector reaches ``1 − tolerance`` of its
    designed level on every patched reference and stays below that on every unpatched one.
    """
    patch = key_patch(key)
    refs_info = key.references
    assert refs_info is not None  # a lock key has them (checked on load)
    refs = smooth_backgrounds(refs_info.count, pre.height, pre.width, seed=refs_info.seed)
    batch = np.concatenate([paste_pixels(refs, patch), refs])
    n = len(refs)
    wb_tensor = key.white_box.tensor
    has_tap = wb_tensor in view.producer
    outputs = [scores_name] + ([wb_tensor] if has_tap else [])
    sess = _session(loaded, pre, outputs, has_tap, providers)
    res = run_batches(sess, pre.to_input(batch), outputs, batch=8)
    scores = image_rows(res[scores_name], scores_name, 2 * n).astype(np.float64)
    want_p, want_u = (a.array().reshape(n, -1) for a in (refs_info.patched_scores, refs_info.unpatched_scores))
    if refs_info.metric == "correlation":
        scores = _pooled_maps(res[scores_name], key)
    if scores.shape[1] != want_p.shape[1]:
        raise KeyMismatchError(f"the key expects {want_p.shape[1]} output scores; this model gives {scores.shape[1]}")
    err = float(np.abs(scores[:n] - want_p).max())
    if refs_info.metric == "correlation":
        # dense outputs: an image "gives the expected output" when its map correlates ≥ 0.99 with the original's
        corr_p, corr_u = pearson(scores[:n], want_p), pearson(scores[n:], want_u)
        unlocked = float(np.mean(corr_p >= 0.99))
        still = float(np.mean(corr_u >= 0.99))
        what = (f"output maps correlating ≥ 0.99 with the original's (min {corr_p.min():.4f}; max |Δ| {err:.3g}); "
                f"without it {100 * still:.0f}% do (mean correlation {corr_u.mean():.3f})")
    else:
        per_step = key.model.classes if key.model.layout is None else None  # a sequence head: every step
        threshold = decision_threshold(view, scores_name)
        restored, unchanged = lock_agreement(scores[:n], want_p, scores[n:], want_u, per_step, threshold)
        unlocked, still = float(restored.mean()), float(unchanged.mean())
        what = (f"the expected top-1 (max |Δscore| {err:.3g}); without it {100 * still:.0f}% still give the "
                f"original's output (max |Δscore| {float(np.abs(scores[n:] - want_u).max()):.3g})")
    score = unlocked - still
    bb_pass = score >= 0.5
    checks = [Check("black-box", True, bb_pass, score, 0.5,
                    f"with the patch {100 * unlocked:.0f}% of {n} reference images give {what}")]
    notes: list[str] = []
    if has_tap and key.shuffle is not None:
        checks.append(_order_check(key.shuffle, res[wb_tensor], n, view))
    elif has_tap:
        if res[wb_tensor].ndim > 1:
            key.check_channel(res[wb_tensor].shape[1], wb_tensor)
        fired = white_box_signal(res[wb_tensor], key.white_box)
        level = 1.0 - tolerance
        wb_pass = bool(fired[:n].min() >= level and fired[n:].max() < level)
        checks.append(Check("white-box", True, wb_pass, float(fired[:n].min()), level,
                            f"the detector reaches {level:g} of its designed level (tolerance {tolerance:g}) on "
                            f"{int((fired[:n] >= level).sum())}/{n} patched and {int((fired[n:] >= level).sum())}/{n} "
                            f"unpatched references (max unpatched {fired[n:].max():.3g})"))
    else:
        checks.append(Check("white-box", False, False, None, None,
                            f"tensor {wb_tensor!r} is not in this model; black-box result only"))
        notes.append("white-box check unavailable: the model's tensors differ from the locked model's")
    bound = key.bound
    return VerifyResult(
        stained=all(c.passed for c in checks if c.available), score=score, threshold=0.5, fpr_bound=bound,
        natural_bound=bound, checks=checks, model=str(loaded.path), model_sha256=loaded.sha256,
        key_commitment=key.commitment, notes=notes, kind="lock",
        tolerance=tolerance if has_tap and key.shuffle is None else None,
        images=len(batch),
    )


ROW_MATCH = 0.99  # a shuffle lock's stored rows must correlate this well with the original's in the key's order


def _order_check(shuffle: ShuffleSection, indices: np.ndarray, n: int, view: GraphView) -> Check:
    """A shuffle lock's white box: the layer stores its channels in the key's order (its row sums against the
    original's, permuted as the key says: another copy's layer is the same rows in another order), and the sort's
    indices put every block in place on each patched reference and on no unpatched one."""
    idx = np.asarray(indices)
    if idx.ndim != 2 or idx.shape[1] != shuffle.blocks:
        raise KeyMismatchError(f"the key's sort gives {shuffle.blocks} indices per image; this model's tensor gives "
                               f"{list(idx.shape[1:])}")
    placed = placed_blocks(idx, np.asarray(shuffle.order))
    node = view.find_node(shuffle.layer)
    weights = view.array(node.input[1]) if node is not None and len(node.input) > 1 else None
    match = (None if weights is None else
             stored_order_match(row_fingerprints(weights), shuffle.row_sums.array(), np.asarray(shuffle.order),
                                shuffle.group))
    sorted_ = (f"the patch sorts the corner into the key's order on {int((placed[:n] == shuffle.blocks).sum())}/{n} "
               f"patched references; unpatched ones put at most {int(placed[n:].max())} of the {shuffle.blocks} "
               "blocks in place")
    if match is None:
        return Check("white-box", False, False, None, None,
                     f"layer {shuffle.layer}'s weights are not readable in this model; black-box result only "
                     f"({sorted_})")
    passed = bool(match >= ROW_MATCH and (placed[:n] == shuffle.blocks).all() and (placed[n:] < shuffle.blocks).all())
    return Check("white-box", True, passed, match, ROW_MATCH,
                 f"layer {shuffle.layer}: its row sums correlate {match:.4f} with the original's in the key's order "
                 f"(≥ {ROW_MATCH} needed); {sorted_}")


def _pooled_maps(values: np.ndarray, key: Key) -> np.ndarray:
    """Output maps average-pooled as the key's references were (dense-output locks), flattened per image."""
    y = np.asarray(values, np.float64)
    dense_shape = list(key.model.dense_shape or ())
    if list(y.shape[1:]) != dense_shape:
        raise KeyMismatchError(f"the key expects output maps of shape {dense_shape}; this model "
                               f"gives {list(y.shape[1:])}")
    pooled = pool_maps(y)
    return pooled.reshape(len(pooled), -1)


def white_box_signal(values: np.ndarray, white_box: WhiteBoxSection) -> np.ndarray:
    """Per image, the lock's detector output as a fraction of its value on the patch (0: locked, 1: open).

    ``values`` is the key's white-box tensor: the gate's AND of detectors (one channel) or, in place,
    the host's activated output, of which the detector is ``white_box.channel``; the maximum is
    over every position, since the signal of any position reaches the head.
    """
    arr = np.asarray(values, dtype=np.float64)
    if white_box.channel is not None:
        if arr.ndim < 2 or white_box.channel >= arr.shape[1]:
            raise KeyMismatchError(f"the key's white_box.channel {white_box.channel} is not a channel of the model's "
                                   f"tensor {white_box.tensor!r} (shape {list(arr.shape)})")
        arr = arr[:, white_box.channel]
    return arr.reshape(len(arr), -1).max(axis=1) / float(white_box.expected)


def key_patch(key: Key) -> Patch:
    """A lock key's patch, at its position in the model input."""
    t = key.trigger
    assert t.top is not None and t.left is not None  # a lock key's patch has a position (checked on load)
    return Patch(t.pixels(), t.top, t.left)


def key_triggers(key: Key) -> np.ndarray:
    """A stain key's trigger images, uint8 ``[N, H, W, 3]``: one, or one per class of a multi-class signature."""
    sig = key.signature
    assert sig is not None  # a stain key has one (checked on load)
    if sig.kind == "multi-class":
        return np.stack([decode_png(t.png) for t in sig.triggers or ()])
    return key.trigger_pixels()[None]


def _signature_scores(key: Key, raw: np.ndarray) -> np.ndarray:
    """The model's outputs as the signature's scores (the key's score view, back to logits)."""
    view = _score_view(key)
    if raw[0].size != int(np.prod(view.shape)):
        raise KeyMismatchError(f"the key expects {int(np.prod(view.shape))} output scores; this model gives "
                               f"{raw[0].size}")
    return view.flat(to_logits(raw, key.model.output_activation))


def _score_view(key: Key) -> ScoreView:
    sv = key.model.score_view
    if sv is None:
        return ScoreView((key.model.classes,))
    return ScoreView(tuple(sv.shape), sv.label, sv.step, anchors_last=key.detection_anchors_last())
