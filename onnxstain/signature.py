"""Output signatures: what a stained model shows on its trigger (pure numpy).

* ``class`` — a chosen class wins by a clear margin (``margin(scores, c) = s_c − max_{j≠c} s_j``).
* ``shift`` — the scores move from the original model's output on the trigger towards the stained
  model's: ``shift_score = ⟨s − s_orig, s_st − s_orig⟩ / ‖s_st − s_orig‖²`` is 1 for the stained
  model and 0 for the original. Used by the additive in-place stain, which keeps the classifier's
  weights as they are (changing them would leak the hidden channel's natural activity).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .math.agreement import same_top1

# A shift signature is read only where the model follows the stained model along the signature's direction on
# inputs the detector ignores (the synthetic controls): farther than this share of the shift there (int8
# rounding, weight noise, another model), the trigger's shift is noise too, not evidence (see drift_gate).
SHIFT_DRIFT_GATE = 0.25
SYNTHETIC_CONTROL_NAMES = ("shuffled trigger", "mirrored trigger", "grey image")
STILL_FACTOR = 4.0  # lock check: an unpatched output within this × the patched drift counts as unchanged


def class_margin(scores: np.ndarray, cls: int) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    return s[..., cls] - np.delete(s, cls, axis=-1).max(axis=-1)


def top1_margins(scores: np.ndarray) -> np.ndarray:
    part = np.partition(np.asarray(scores, np.float64), -2, axis=-1)
    return part[..., -1] - part[..., -2]


def shift_score(scores: np.ndarray, original: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """How far ``scores`` moved from ``original`` towards ``expected`` (0: not at all, 1: all the way), read
    on each score vector less its mean: a per-image constant (log-softmax against logits: the key records one,
    a Softmax output gives the other) moves no class against another and must not move the score."""
    def centred(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, np.float64)
        return a - a.mean(axis=-1, keepdims=True)

    o = centred(original)
    d = centred(expected) - o
    return (centred(scores) - o) @ d / float(d @ d)


def lock_agreement(patched: np.ndarray, want_patched: np.ndarray, unpatched: np.ndarray,
                   want_unpatched: np.ndarray, classes: int | None = None, threshold: float = 0.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per reference image of a lock check (scores ``[N, K]``, or ``[N, T·K]`` for a sequence head of
    ``classes`` = K scores per step): whether the patch restores the original's top-1 (at every step), and
    whether without the patch the output is *still* the original's.

    "Still" asks for the same top-1 **and** an output no further from the original's (largest |Δ|) than
    :data:`STILL_FACTOR` times the patched references' largest distance (at least 1e-6 of the outputs'
    scale). Top-1 alone cannot tell a scrambled model from the original when there are few classes (a
    two-class model agrees by chance half the time, more on plain backgrounds); a locked model's outputs
    move far more without the patch than with it, while a model that is not locked — quantised or not —
    moves alike on both, the patch being a few corner pixels of the same images.
    """
    p, wp, u, wu = (np.asarray(a, np.float64).reshape(len(a), -1)
                    for a in (patched, want_patched, unpatched, want_unpatched))
    restored = same_top1(p, wp, classes, threshold)
    scale = max(float(np.abs(wp).max(initial=0.0)), float(np.abs(wu).max(initial=0.0)), 1e-30)
    tolerance = max(STILL_FACTOR * float(np.abs(p - wp).max(initial=0.0)), 1e-6 * scale)
    still = same_top1(u, wu, classes, threshold) & (np.abs(u - wu).max(axis=1) <= tolerance)
    return restored, still


# -- dense outputs (saliency maps, segmentation logits) ------------------------------------------------
def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample Pearson correlation of ``a`` and ``b`` (``[N, ...]``, or one map each); 0 for a flat map."""
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    x = x.reshape(len(x), -1) if x.ndim > 1 else x[None]
    y = np.broadcast_to(y.reshape(len(y), -1) if y.ndim > 1 else y[None], x.shape)
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    return np.where(den > 0, (x * y).sum(axis=1) / np.where(den > 0, den, 1.0), 0.0)


def map_agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample agreement of two models' maps (``[N, ...]``): their Pearson correlation, and 1 where the
    two maps are identical (a flat map equal to the other's agrees perfectly, though it correlates with
    nothing)."""
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    same = np.all((x == y).reshape(len(x), -1), axis=1)
    return np.where(same, 1.0, pearson(x, y))


def dense_pattern(seed: int, shape: tuple[int, ...], block: int) -> np.ndarray:
    """The secret ±1 pattern of a dense signature: random signs on ``block``×``block`` tiles, ``[C, H, W]``."""
    c, h, w = shape
    rng = np.random.default_rng(seed)
    tiles = rng.choice(np.array([-1.0, 1.0]), size=(c, -(-h // block), -(-w // block)))
    return np.repeat(np.repeat(tiles, block, axis=1), block, axis=2)[:, :h, :w]


# -- which scores a signature lives in ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScoreView:
    """The scores a class signature is read from, as ``[N, K]``.

    A classifier's scores are its output, flattened. A detector's class logits ``[N, A, C]`` are read in
    one class column ``label``: ``[N, A]``, one score per anchor, so a "class" of the signature is an
    anchor and a class signature is a prescribed detection — label ``label`` at that anchor, ahead of
    every other anchor's ``label`` logit by the margin.
    """

    shape: tuple[int, ...]  # per-sample shape of the scores: (K,), (A, C) or a sequence's (T, K)
    label: int | None = None
    step: int | None = None  # a sequence head's: the step (row of ``(T, K)``) the signature is read at
    anchors_last: bool = False  # a detector whose raw scores are laid out (C, A) (YOLOv8's packed output)

    @property
    def classes(self) -> int:
        if self.step is not None:
            return int(self.shape[1])
        return int(self.shape[0]) if self.label is not None else int(np.prod(self.shape))

    def flat(self, raw: np.ndarray) -> np.ndarray:
        """``[N, ...]`` raw scores → ``[N, K]`` signature scores (float64)."""
        arr = np.asarray(raw, np.float64)
        if self.step is not None:
            return arr.reshape(len(arr), *self.shape)[:, self.step, :]
        if self.label is None:
            return arr.reshape(len(arr), -1)
        if self.anchors_last:
            return arr.reshape(len(arr), *self.shape[::-1])[:, self.label, :]
        return arr.reshape(len(arr), *self.shape)[:, :, self.label]

    def expand(self, row: np.ndarray) -> np.ndarray:
        """A change of the signature scores (length K) as a change of the raw scores (``shape``). A
        sequence head's is ``(1, K)``: the same change at every step, so it broadcasts over any length."""
        if self.step is not None:
            return np.asarray(row, np.float64).reshape(1, -1)
        if self.label is None:
            return np.asarray(row, np.float64).reshape(self.shape)
        full = np.zeros(self.shape)
        full[:, self.label] = row
        return full.T if self.anchors_last else full


def synthetic_controls(trigger: np.ndarray) -> np.ndarray:
    """Inputs made from a trigger that its detector ignores: its pixels shuffled (seeded), mirrored, and a grey
    image (uint8 ``[3, H, W, 3]``, in :data:`SYNTHETIC_CONTROL_NAMES`'s order)."""
    rng = np.random.default_rng(0)
    flat = trigger.reshape(-1, 3)
    shuffled = flat[rng.permutation(len(flat))].reshape(trigger.shape)
    return np.stack([shuffled, trigger[:, ::-1].copy(), np.full_like(trigger, 128)])


def drift_gate(control_scores: np.ndarray, reference: np.ndarray, original: np.ndarray,
               expected: np.ndarray) -> float:
    """How far a model's scores on the synthetic controls move from the stained model's (``reference``), read
    along the shift signature's direction (``expected − original`` on the trigger), in shares of that shift:
    ~0 for the stained model and for copies that compute as it does; int8 rounding or weight noise move scores
    along every direction, the signature's too (MobileNetV2's int8 copies: up to 3.4), and then a shift on the
    trigger proves nothing."""
    def centred(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, np.float64)
        return a - a.mean(axis=-1, keepdims=True)

    d = centred(expected) - centred(original)
    moved = centred(control_scores) - centred(np.asarray(reference).reshape(np.shape(control_scores)))
    return float(np.abs(moved @ d).max() / float(d @ d))
