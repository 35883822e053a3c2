"""Verification: does a model carry the stain described by a key?

* **Black-box** — run the model on the key's 8-bit trigger and on controls (the trigger with its
  pixels shuffled, its mirror image, and natural photos when available). Stained iff the signature
  class wins by at least the key's threshold on the trigger and on no control.
* **White-box** — when the model still has the key's host tensor: read the detector neuron
  through a feature tap. Stained iff it reaches the threshold on the trigger at every selected
  position, and stays below it on the controls.

The decision needs the black-box check and, when it is available, the white-box check.
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
from ._onnx.inputs import image_input
from ._onnx.io import load_model, write_bytes_atomic
from .errors import KeyMismatchError
from .keys import Key, load_key
from .math import bounds
from .patch import Patch, paste_pixels, smooth_backgrounds
from .preprocess import Preprocessing
from .runtime import run_batches, session, with_outputs
from .sanity import refuse_nonfinite
from .signature import ScoreView, class_margin, dense_pattern, pearson, shift_score

REPORT_FORMAT = "onnxstain-verify-report"
REPORT_VERSION = 1


@dataclasses.dataclass
class Check:
    name: str
    available: bool
    passed: bool
    score: float | None
    threshold: float | None
    detail: str


@dataclasses.dataclass
class VerifyResult:
    stained: bool
    score: float
    threshold: float
    fpr_bound: bounds.Bound
    natural_bound: bounds.Bound
    checks: list[Check]
    model: str
    model_sha256: str
    key_commitment: str
    notes: list[str]
    kind: str = "stain"  # "stain" or "lock": what the key describes

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "kind": self.kind,
            "stained": self.stained,
            "score": self.score,
            "threshold": self.threshold,
            "fpr_bound": self.fpr_bound.value,
            "fpr_bound_log10": self.fpr_bound.log10,
            "fpr_bound_detail": self.fpr_bound.to_dict(),
            "natural_bound": self.natural_bound.to_dict(),
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "model": self.model,
            "model_sha256": self.model_sha256,
            "key_commitment": self.key_commitment,
            "notes": self.notes,
        }

    def write_json(self, path: str | Path) -> None:
        write_bytes_atomic(path, json.dumps(self.to_dict(), indent=2).encode() + b"\n")


def _controls(trigger: np.ndarray, count: int, pre: Preprocessing) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    flat = trigger.reshape(-1, 3)
    shuffled = flat[rng.permutation(len(flat))].reshape(trigger.shape)
    images = [shuffled, trigger[:, ::-1].copy(), np.full_like(trigger, 128)]
    names = ["shuffled trigger", "mirrored trigger", "grey image"]
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
) -> VerifyResult:
    key = key if isinstance(key, Key) else load_key(key)
    loaded = load_model(model)
    pre = Preprocessing.from_dict(key["preprocessing"])
    info = image_input(loaded.model)
    if info.height and info.width and (info.height, info.width) != (pre.height, pre.width):
        raise KeyMismatchError(f"the key was made for a {pre.height}x{pre.width} input; this model takes "
                               f"{info.height}x{info.width}")
    refuse_nonfinite(loaded, pre, providers)
    view = GraphView(loaded.model)
    scores_name = key["model"]["scores"]
    if scores_name not in view.output_names:
        if len(view.output_names) != 1:
            raise KeyMismatchError(f"the model has no output {scores_name!r} the key expects")
        scores_name = view.output_names[0]
    if key.kind == "lock":
        return _verify_lock(loaded, view, key, pre, scores_name, providers)
    trigger = key.trigger_pixels()
    controls, control_names = _controls(trigger, natural_controls, pre)
    batch = np.concatenate([trigger[None], controls])
    x = pre.to_input(batch)
    notes: list[str] = []
    wb_tensor = key["white_box"]["tensor"]
    has_tap = wb_tensor in view.producer
    outputs = [scores_name] + ([wb_tensor] if has_tap else [])
    sess = session(with_outputs(loaded.model, outputs) if has_tap else loaded.model, providers)
    res = run_batches(sess, x, outputs, batch=8)
    classes = int(key["model"]["classes"])
    score_view = ScoreView.from_dict(key["model"].get("score_view"), classes)
    raw = res[scores_name]
    if raw[0].size != int(np.prod(score_view.shape)):
        raise KeyMismatchError(f"the key expects {int(np.prod(score_view.shape))} output scores; this model gives "
                               f"{raw[0].size}")
    scores = score_view.flat(raw)
    sig = key["signature"]
    bb_threshold = float(sig["threshold"])
    if sig.get("type") == "pattern":
        pattern = dense_pattern(int(sig["pattern_seed"]), tuple(key["model"]["dense_shape"]), int(sig["block"]))
        corr = pearson(scores, pattern.reshape(1, -1))
        bb_trigger = float(corr[0])
        worst = int(np.argmax(corr[1:])) + 1
        bb_pass = bb_trigger >= bb_threshold and float(corr[1:].max()) < bb_threshold
        detail = (f"the trigger's output map correlates {bb_trigger:.3g} with the key's pattern (expected "
                  f"{sig['expected_margin']:.3g}); best control {corr[worst]:.3g} ({control_names[worst - 1]})")
    elif sig.get("type", "class") == "shift":
        original, expected = key.array("signature", "original"), key.array("signature", "expected")
        bb_trigger = float(shift_score(scores[0], original, expected))
        bb_pass = bb_trigger >= bb_threshold
        detail = (f"the trigger's scores moved {bb_trigger:.3g} of the way from the original model's output "
                  "towards the stained model's (1 = stained, 0 = original)")
    else:
        cls = int(sig["class"])
        margins = class_margin(scores, cls)
        bb_trigger = float(margins[0])
        worst = int(np.argmax(margins[1:])) + 1
        bb_pass = bb_trigger >= bb_threshold and float(margins[1:].max()) < bb_threshold
        what = f"class {cls}" if score_view.label is None else f"label {score_view.label} at anchor {cls}"
        detail = (f"{what} wins the trigger by {bb_trigger:.3g} (expected {sig['expected_margin']:.3g}); "
                  f"best control margin {margins[worst]:.3g} ({control_names[worst - 1]})")
    checks = [Check("black-box", True, bb_pass, bb_trigger, bb_threshold, detail)]
    if has_tap:
        act = res[wb_tensor].astype(np.float64)
        ch = int(key["white_box"]["channel"])
        sel = np.asarray(key["white_box"]["positions"], dtype=int)
        per_pos = act[:, ch].reshape(len(batch), -1)
        wb_threshold = float(key["white_box"]["threshold"])
        wb_trigger = float(per_pos[0, sel].min()) if per_pos.shape[1] > sel.max() else float(per_pos[0].min())
        wb_controls = float(per_pos[1:].max())
        # In-place additive stains hide in a working neuron, which is legitimately active on controls.
        hidden = key["mode"] == "inplace" and key["variant"] == "additive"
        wb_pass = wb_trigger >= wb_threshold and (wb_controls < wb_threshold or hidden)
        checks.append(Check(
            "white-box", True, wb_pass, wb_trigger, wb_threshold,
            f"detector reads {wb_trigger:.4g} on the trigger (expected {key['white_box']['expected']:.4g}); "
            f"max on controls {wb_controls:.3g}"))
    else:
        checks.append(Check("white-box", False, False, None, None,
                            f"tensor {wb_tensor!r} is not in this model (renamed or re-exported); "
                            "black-box result only"))
        notes.append("white-box check unavailable: the model's tensors differ from the stained model's")
    stained = all(c.passed for c in checks if c.available)
    det = key["detector"]
    radii = key.array("detector", "trigger_radii")
    m = int(key["host"]["m"])
    # Another key of the same construction may have used up to max_draws directions (see bounds.md).
    cross = bounds.cross_key_bound(radii, float(det["tau0"]), m,
                                   positions_weight=np.full(radii.size, int(det["max_draws"])))
    natural = bounds.Bound.from_dict(key["bound"])
    return VerifyResult(
        stained=stained, score=bb_trigger, threshold=bb_threshold, fpr_bound=cross, natural_bound=natural,
        checks=checks, model=str(loaded.path), model_sha256=loaded.sha256, key_commitment=key.commitment,
        notes=notes,
    )


def _verify_lock(loaded, view: GraphView, key: Key, pre: Preprocessing, scores_name: str,
                 providers: list[str] | None) -> VerifyResult:
    """A model carries the lock iff the patch restores the original's outputs and its absence does not.

    The key records the original model's scores on seeded synthetic reference images, with and
    without the patch; no photos are needed.
    """
    t = key["trigger"]
    patch = Patch(key.trigger_pixels(), int(t["top"]), int(t["left"]))
    refs_info = key["references"]
    refs = smooth_backgrounds(int(refs_info["count"]), pre.height, pre.width, seed=int(refs_info["seed"]))
    batch = np.concatenate([paste_pixels(refs, patch), refs])
    n = len(refs)
    wb_tensor = key["white_box"]["tensor"]
    has_tap = wb_tensor in view.producer
    outputs = [scores_name] + ([wb_tensor] if has_tap else [])
    sess = session(with_outputs(loaded.model, outputs) if has_tap else loaded.model, providers)
    res = run_batches(sess, pre.to_input(batch), outputs, batch=8)
    scores = res[scores_name].astype(np.float64).reshape(2 * n, -1)
    want_p, want_u = (key.array("references", which).reshape(n, -1) for which in ("patched_scores", "unpatched_scores"))
    if refs_info.get("metric") == "correlation":
        scores = _pooled_maps(res[scores_name], key)
    if scores.shape[1] != want_p.shape[1]:
        raise KeyMismatchError(f"the key expects {want_p.shape[1]} output scores; this model gives {scores.shape[1]}")
    err = float(np.abs(scores[:n] - want_p).max())
    if refs_info.get("metric") == "correlation":
        # dense outputs: an image "gives the expected output" when its map correlates ≥ 0.99 with the original's
        corr_p, corr_u = pearson(scores[:n], want_p), pearson(scores[n:], want_u)
        unlocked = float(np.mean(corr_p >= 0.99))
        still = float(np.mean(corr_u >= 0.99))
        what = (f"output maps correlating ≥ 0.99 with the original's (min {corr_p.min():.4f}; max |Δ| {err:.3g}); "
                f"without it {100 * still:.0f}% do (mean correlation {corr_u.mean():.3f})")
    else:
        unlocked = float(np.mean(scores[:n].argmax(1) == want_p.argmax(1)))
        still = float(np.mean(scores[n:].argmax(1) == want_u.argmax(1)))
        what = f"the expected top-1 (max |Δscore| {err:.3g}); without it {100 * still:.0f}% do"
    score = unlocked - still
    bb_pass = unlocked == 1.0 and still <= 0.5
    checks = [Check("black-box", True, bb_pass, score, 0.5,
                    f"with the patch {100 * unlocked:.0f}% of {n} reference images give {what}")]
    notes: list[str] = []
    if has_tap:
        fired = white_box_signal(res[wb_tensor], key["white_box"])
        wb_pass = bool(fired[:n].min() >= 0.5 and fired[n:].max() <= 0.0)
        checks.append(Check("white-box", True, wb_pass, float(fired[:n].min()), 0.5,
                            f"the detector fires on {int((fired[:n] >= 0.5).sum())}/{n} patched and "
                            f"{int((fired[n:] > 0).sum())}/{n} unpatched references"))
    else:
        checks.append(Check("white-box", False, False, None, None,
                            f"tensor {wb_tensor!r} is not in this model; black-box result only"))
        notes.append("white-box check unavailable: the model's tensors differ from the locked model's")
    bound = bounds.Bound.from_dict(key["bound"])
    return VerifyResult(
        stained=all(c.passed for c in checks if c.available), score=score, threshold=0.5, fpr_bound=bound,
        natural_bound=bound, checks=checks, model=str(loaded.path), model_sha256=loaded.sha256,
        key_commitment=key.commitment, notes=notes, kind="lock",
    )


def _pooled_maps(values: np.ndarray, key: Key) -> np.ndarray:
    """Output maps average-pooled as the key's references were (dense-output locks), flattened per image."""
    from .dense_lock import pool_maps

    y = np.asarray(values, np.float64)
    if list(y.shape[1:]) != [int(d) for d in key["model"]["dense_shape"]]:
        raise KeyMismatchError(f"the key expects output maps of shape {key['model']['dense_shape']}; this model "
                               f"gives {list(y.shape[1:])}")
    pooled = pool_maps(y)
    return pooled.reshape(len(pooled), -1)


def white_box_signal(values: np.ndarray, white_box: dict[str, Any]) -> np.ndarray:
    """Per image, the lock's detector output as a fraction of its value on the patch (0: locked, 1: open).

    ``values`` is the key's white-box tensor: the gate's AND of detectors (one channel) or, in place,
    the host's activated output, of which the detector is ``white_box["channel"]``; the maximum is
    over every position, since the signal of any position reaches the head.
    """
    arr = np.asarray(values, dtype=np.float64)
    if white_box.get("channel") is not None:
        arr = arr[:, int(white_box["channel"])]
    return arr.reshape(len(arr), -1).max(axis=1) / float(white_box.get("expected", 1.0))
