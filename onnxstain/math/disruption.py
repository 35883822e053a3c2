"""Lock disruptions: what a lock does to the model's outputs when the patch is absent (numpy only).

Both are computed exactly from the calibration pass, because a locked model's unpatched outputs are
a known function of the original's: the gate multiplies the classifier's input features by ``1 + m``
(:func:`sign_disruption`), the in-place lock swaps the classifier's bias (:func:`bias_disruption`).
"""

from __future__ import annotations

import numpy as np

RANGE_MARGIN = 1.25  # the locked scores' top reaches this many times the original's, on the calibration images
ALIGNED_STEPS = 20  # the decoy-aligned fraction of the features is searched in steps of 1/ALIGNED_STEPS


def sign_disruption(rng: np.random.Generator, pooled: np.ndarray, scores: np.ndarray,
                    cols: np.ndarray, tries: int = 8) -> tuple[np.ndarray, float, float, int]:
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
    agreement is at most chance (1/K) plus one point. Where no decoy gets there (two classes; a head whose
    top score is not positive), ``tries`` random patterns are drawn and the one with the lowest agreement is
    kept.
    Returns ``(m, calibration agreement, chance, flipped features)``.
    """
    base = scores.argmax(1)
    n = pooled.shape[1]
    chance = 1.0 / scores.shape[1]
    for m in _decoy_patterns(rng, pooled, scores, cols, tries):
        agree = float(np.mean((scores + (pooled * m) @ cols.T).argmax(1) == base))
        if agree <= chance + 0.01:
            return m, agree, chance, int(np.sum(m != 0))
    best: tuple[float, np.ndarray] | None = None
    for _ in range(tries):
        m = np.zeros(n)
        m[rng.permutation(n)[: n // 2]] = -2.0
        agree = float(np.mean((scores + (pooled * m) @ cols.T).argmax(1) == base))
        if best is None or agree < best[0]:
            best = (agree, m)
        if agree <= chance + 0.01:
            break
    assert best is not None
    return best[1], best[0], chance, n // 2


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


def half_sign_flips(rng: np.random.Generator, channels: int) -> tuple[np.ndarray, int]:
    """A gate disruption for a feature map: −2 on a random half of its channels (their sign flips when
    locked), 0 elsewhere. Used where the outputs are not a classifier's scores (detectors), so no
    calibration agreement can be computed in closed form."""
    m = np.zeros(channels)
    m[rng.permutation(channels)[: max(1, channels // 2)]] = -2.0
    return m, max(1, channels // 2)


def bias_disruption(rng: np.random.Generator, base_scores: np.ndarray, orig_scores: np.ndarray, bias: np.ndarray,
                    candidates: int = 8, steer: float = 4.0) -> tuple[np.ndarray, float, float, float]:
    """The in-place lock's disruption: a logit bias ``b + k σ u`` (``σ`` the mean per-image spread of the
    original's logits), exact on the calibration images (without the patch the locked scores are the
    base model's with the bias swapped).

    A bias shift is all an in-place lock can add without the patch, so the predictions concentrate on
    the few classes where ``k σ u`` is high, and an image still agrees with the original when its own
    class is one of them. On new photos that depends on which classes they show: with ``u`` standard
    normal, 20 % of 400 draws on MobileNetV2 agreed above chance + 2 points on the held-out photos
    although every one was at chance + 1 point on the calibration photos. So ``u = g − steer · z``
    (``g`` standard normal, ``z`` the standardised mean calibration logit of each class) favours the
    classes the original rarely scores on natural images, and of ``candidates`` draws the one whose
    predictions fall least often in the original's top 5 (calibration) is kept: 0 of 300 draws above
    chance + 2 points on the held-out photos (max 1.3 %, mean 0.01 %).
    ``k`` is the smallest that brings the calibration agreement to chance plus one point.
    Returns ``(bias, calibration agreement, chance, k)``."""
    base = orig_scores.argmax(1)
    top5 = np.argsort(-orig_scores, axis=1)[:, :5]
    chance = 1.0 / orig_scores.shape[1]
    spread = float(orig_scores.std(axis=1).mean())
    mean = orig_scores.mean(axis=0)
    z = (mean - mean.mean()) / max(float(mean.std()), 1e-12)
    best: tuple[tuple[float, float], np.ndarray, float, float] | None = None
    for _ in range(candidates):
        u = rng.standard_normal(orig_scores.shape[1]) - steer * z
        for k in (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0):
            pred = (base_scores + k * spread * u).argmax(1)  # the base model's scores, bias b → b + kσu
            agree = float(np.mean(pred == base))
            if agree <= chance + 0.01:
                break
        near = float(np.mean((top5 == pred[:, None]).any(axis=1)))
        rank = (max(0.0, agree - chance - 0.01), near)  # first meet the target, then the fewest near hits
        if best is None or rank < best[0]:
            best = (rank, bias + k * spread * u, agree, k)
    assert best is not None
    return best[1], best[2], chance, best[3]
