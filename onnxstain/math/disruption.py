"""Lock disruptions: what a lock does to the model's outputs when the patch is absent (numpy only).

Both are computed exactly from the calibration pass, because a locked model's unpatched outputs are
a known function of the original's: the gate multiplies the classifier's input features by ``1 + m``
(:func:`sign_disruption`), the in-place lock swaps the classifier's bias (:func:`bias_disruption`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .agreement import chance_agreement, cohen_kappa, decision_classes, top1

RANGE_MARGIN = 1.25  # the locked scores' top reaches this many times the original's, on the calibration images
ALIGNED_STEPS = 20  # the decoy-aligned fraction of the features is searched in steps of 1/ALIGNED_STEPS
KAPPA_TARGET = 0.05  # two answers: a disruption is kept when |Cohen's kappa| on the calibration images is at most this
CONSTANT_SHARE = 0.99  # two answers: the decoy flips make the locked answer one answer on this share of the images
BINARY_TRIES = 4  # two answers: this many times ``tries`` random patterns are drawn (each costs one product)


class Disruption(NamedTuple):
    """A lock's disruption and what it does on the calibration images."""

    values: np.ndarray  # the gate's m (−2 on the flipped features) or the in-place lock's new bias
    agreement: float  # top-1 agreement of the locked answers with the original's
    chance: float  # 1/K (1/2 for a one-logit head)
    size: float  # the gate: features flipped; in place: the bias factor k
    kappa: float  # Cohen's kappa of the locked answers with the original's (0: independent)


def _binary(scores: np.ndarray) -> bool:
    """Whether the head gives two answers (two scores, or one logit): see :func:`sign_disruption`."""
    return decision_classes(scores.shape[1]) == 2


def _locked_rank(pred: np.ndarray, base: np.ndarray, chance: float, binary: bool) -> tuple[float, float]:
    """How far a disruption's answers are from locked (0 when locked), then a tie-break: for two answers
    ``|kappa|`` above :data:`KAPPA_TARGET`, then the distance of the agreement from chance; else the
    agreement above chance + 1 point, then the agreement."""
    agree = float(np.mean(pred == base))
    if binary:
        return max(0.0, abs(cohen_kappa(pred, base)) - KAPPA_TARGET), abs(agree - chance)
    return max(0.0, agree - chance - 0.01), agree


def sign_disruption(rng: np.random.Generator, pooled: np.ndarray, scores: np.ndarray,
                    cols: np.ndarray, tries: int = 8) -> Disruption:
    """The gate's disruption ``m``: −2 on about half of the head's input features, 0 elsewhere.

    Locked, the gate multiplies the features by ``1 + m``: those features change sign, magnitudes stay the
    same, and the predictions are unrelated to the original's. (A random per-feature scale leaves a few
    percent agreement even when large.) Locked scores are exact, ``scores + cols · (features ⊙ m)``, so the
    agreement on the calibration images is computed here.

    Which features flip is not left to chance alone. A static int8 quantiser calibrated on natural images
    sets the range of the classifier's output from the *locked* model's scores; random flips make them
    incoherent sums (MobileNetV2: top 7 against the original's 29), so the patched quantised model's scores
    clip at that range and its top-1 is lost. So the flips follow the sign of one *decoy* class's weights on
    a fraction of the features (random signs elsewhere): the decoy's locked score grows with that fraction,
    which is the smallest (in steps of 1/``ALIGNED_STEPS``) that lifts the locked scores' top to
    ``RANGE_MARGIN`` × the original's top. The range a quantiser calibrates on locked images then holds the
    unlocked scores. Decoys are classes the original never predicts on the calibration images, the ones it
    scores lowest on average first (locked, most images' prediction is the decoy); a pattern is kept when its
    agreement is at most chance (1/K) plus one point. Where no decoy gets there (a head whose top score is not
    positive), ``tries`` random patterns are drawn and the one with the lowest agreement is kept.

    A head with two answers (two classes, or one logit) is judged by kappa, not agreement: a model that answers
    the opposite of the original is the original with its labels swapped (kappa −1). Its decoy is the answer the
    original gives least, the flips aligned until the locked model gives it on nearly every image
    (:func:`_answer_decoys`; kappa 0 on any image set). Failing that, of ``BINARY_TRIES × tries`` random
    patterns the one whose locked answers are closest to independent of the original's is kept (smallest
    ``|kappa|``, :func:`~onnxstain.math.agreement.cohen_kappa`; a pattern within :data:`KAPPA_TARGET` of 0,
    then the agreement closest to chance).
    Returns the :class:`Disruption` (``size``: the flipped features).
    """
    k = scores.shape[1]
    base = top1(scores, k)
    n = pooled.shape[1]
    chance = chance_agreement(k)
    binary = _binary(scores)

    def locked(m: np.ndarray) -> np.ndarray:
        return top1(scores + (pooled * m) @ cols.T, k)

    decoys = _answer_decoys(rng, pooled, scores, cols) if binary else _decoy_patterns(rng, pooled, scores, cols, tries)
    for m in decoys:
        pred = locked(m)
        if _locked_rank(pred, base, chance, binary)[0] == 0.0:
            return Disruption(m, float(np.mean(pred == base)), chance, int(np.sum(m != 0)), cohen_kappa(pred, base))
    best: tuple[tuple[float, float], np.ndarray, np.ndarray] | None = None
    for _ in range(tries * (BINARY_TRIES if binary else 1)):
        m = np.zeros(n)
        m[rng.permutation(n)[: n // 2]] = -2.0
        pred = locked(m)
        rank = _locked_rank(pred, base, chance, binary)
        if best is None or rank < best[0]:
            best = (rank, m, pred)
        if rank[0] == 0.0 and not binary:
            break
    assert best is not None
    _, m, pred = best
    return Disruption(m, float(np.mean(pred == base)), chance, n // 2, cohen_kappa(pred, base))


def _decoy_patterns(rng: np.random.Generator, pooled: np.ndarray, scores: np.ndarray, cols: np.ndarray,
                    tries: int) -> list[np.ndarray]:
    """For up to ``tries`` decoy classes, the flips with the smallest aligned fraction whose locked scores reach
    ``RANGE_MARGIN`` × the original's top score (see :func:`sign_disruption`); none where the top is not
    positive or no class is free of the original's predictions."""
    top = float(scores.max())
    if top <= 0 or scores.shape[1] < 3:
        return []
    n = pooled.shape[1]
    predicted = np.bincount(scores.argmax(1), minlength=scores.shape[1]) > 0
    # each class's locked score with every feature aligned: a flipped feature j adds −2 w_kj x_j, so flipping
    # where w_kj < 0 adds 2 Σ |w_kj| x_j
    able = (scores + 2.0 * pooled @ np.maximum(-cols, 0.0).T).max(axis=0) >= RANGE_MARGIN * top
    # the classes natural images support least first (every image's prediction becomes the decoy: an image
    # of the decoy's own class would agree), among those that can reach the target
    decoys = [int(k) for k in np.argsort(scores.mean(axis=0), kind="stable") if able[k] and not predicted[k]][:tries]
    found = []
    for k in decoys:
        order, coin = rng.permutation(n), np.asarray(rng.random(n) < 0.5)
        for step in range(1, ALIGNED_STEPS + 1):
            flip = coin.copy()
            aligned = order[: (n * step) // ALIGNED_STEPS]
            flip[aligned] = cols[k, aligned] < 0
            m = np.where(flip, -2.0, 0.0)
            if float((scores + (pooled * m) @ cols.T).max()) >= RANGE_MARGIN * top:
                found.append(m)
                break
    return found


def _answer_decoys(rng: np.random.Generator, pooled: np.ndarray, scores: np.ndarray, cols: np.ndarray
                   ) -> list[np.ndarray]:
    """Two answers: flips that make the locked model give one answer, the one the original gives least.

    Flipping feature ``j`` moves the locked margin of that answer over the other by ``−2 δ_j x_j`` (``δ`` the
    margin's weights: the difference of the two columns, or ± the one logit's), so flipping where ``δ_j < 0``
    raises it. The aligned fraction (random signs elsewhere) is the smallest, in steps of 1/``ALIGNED_STEPS``,
    whose locked answers are that one answer on at least :data:`CONSTANT_SHARE` of the calibration images: a
    constant answer says nothing of the original's on any image, where random flips that are independent of
    it on the calibration images may not be on others."""
    k = scores.shape[1]
    answers = top1(scores, k).reshape(-1)
    decoy = int(np.argmin(np.bincount(answers, minlength=2)))
    # the decoy's margin over the other answer, as weights on the features
    delta = cols[decoy] - cols[1 - decoy] if k == 2 else (2 * decoy - 1) * cols[0]
    n = pooled.shape[1]
    order, coin = rng.permutation(n), np.asarray(rng.random(n) < 0.5)
    for step in range(1, ALIGNED_STEPS + 1):
        flip = coin.copy()
        aligned = order[: (n * step) // ALIGNED_STEPS]
        flip[aligned] = delta[aligned] < 0
        m = np.where(flip, -2.0, 0.0)
        if float(np.mean(top1(scores + (pooled * m) @ cols.T, k) == decoy)) >= CONSTANT_SHARE:
            return [m]
    return []


def half_sign_flips(rng: np.random.Generator, channels: int) -> tuple[np.ndarray, int]:
    """A gate disruption for a feature map: −2 on a random half of its channels (their sign flips when
    locked), 0 elsewhere. Used where the outputs are not a classifier's scores (detectors), so no
    calibration agreement can be computed in closed form."""
    m = np.zeros(channels)
    m[rng.permutation(channels)[: max(1, channels // 2)]] = -2.0
    return m, max(1, channels // 2)


def bias_disruption(rng: np.random.Generator, base_scores: np.ndarray, orig_scores: np.ndarray, bias: np.ndarray,
                    candidates: int = 8, steer: float = 4.0) -> Disruption:
    """The in-place lock's disruption: a logit bias ``b + k σ u`` (``σ`` the mean per-image spread of the
    original's logits; one logit: its spread over the images), exact on the calibration images (without the
    patch the locked scores are the base model's with the bias swapped).

    A bias shift is all an in-place lock can add without the patch, so the predictions concentrate on
    the few classes where ``k σ u`` is high, and an image still agrees with the original when its own
    class is one of them. On new photos that depends on which classes they show: with ``u`` standard
    normal, 20 % of 400 draws on MobileNetV2 agreed above chance + 2 points on the held-out photos
    although every one was at chance + 1 point on the calibration photos. So ``u = g − steer · z``
    (``g`` standard normal, ``z`` the standardised mean calibration logit of each class) favours the
    classes the original rarely scores on natural images, and of ``candidates`` draws the one whose
    predictions fall least often in the original's top 5 (calibration) is kept: 0 of 300 draws above
    chance + 2 points on the held-out photos (max 1.3 %, mean 0.01 %).
    ``k`` is the smallest that brings the calibration agreement to chance plus one point (two answers: ``|kappa|``
    within :data:`KAPPA_TARGET` of 0, as for :func:`sign_disruption`).
    Returns the :class:`Disruption` (``values``: the new bias; ``size``: ``k``)."""
    classes = orig_scores.shape[1]
    base = top1(orig_scores, classes)[:, 0]
    top5 = np.argsort(-orig_scores, axis=1)[:, :5]
    chance = chance_agreement(classes)
    binary = _binary(orig_scores)
    # the per-image spread of the logits (one logit: its spread over the images)
    spread = float(orig_scores.std(axis=1).mean() if classes > 1 else orig_scores.std())
    mean = orig_scores.mean(axis=0)
    z = (mean - mean.mean()) / max(float(mean.std()), 1e-12)
    best: tuple[tuple[float, float], np.ndarray, np.ndarray, float] | None = None
    for _ in range(candidates):
        u = rng.standard_normal(orig_scores.shape[1]) - steer * z
        for k in (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0):
            pred = top1(base_scores + k * spread * u, classes)[:, 0]  # the base model's scores, bias b → b + kσu
            missed = _locked_rank(pred, base, chance, binary)[0]
            if missed == 0.0:
                break
        near = float(np.mean((top5 == pred[:, None]).any(axis=1)))
        rank = (missed, near)  # first meet the target, then the fewest near hits
        if best is None or rank < best[0]:
            best = (rank, bias + k * spread * u, pred, k)
    assert best is not None
    _, new_bias, pred, k = best
    return Disruption(new_bias, float(np.mean(pred == base)), chance, k, cohen_kappa(pred, base))
