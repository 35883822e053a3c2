"""The locks' disruptions (numpy only): what the model does without the patch."""

from __future__ import annotations

import numpy as np

from onnxstain.math.agreement import cohen_kappa, top1
from onnxstain.math.disruption import KAPPA_TARGET, RANGE_MARGIN, bias_disruption, sign_disruption


def _scores(rng: np.random.Generator, n: int, k: int, common: np.ndarray) -> np.ndarray:
    """Logits of n 'natural' images: each image's top class is one of the ``common`` classes."""
    s = rng.normal(0, 1, (n, k))
    s[np.arange(n), rng.choice(common, n)] += 4.0
    s[:, common] += 1.0  # natural images score the common classes higher on average
    return s


def test_bias_disruption_steers_away_from_natural_classes():
    rng = np.random.default_rng(0)
    k = 200
    common = rng.permutation(k)[:40]
    cal, held = _scores(rng, 600, k, common), _scores(rng, 300, k, common)
    bias = rng.normal(0, 0.1, k)
    chance = 1 / k
    steered, plain = [], []
    for seed in range(20):
        b, agree, ch, factor, _ = bias_disruption(np.random.default_rng(seed), cal, cal, bias)
        assert ch == chance and agree <= chance + 0.01 and factor >= 1.0
        locked = (held - bias + b).argmax(1)
        steered.append(np.mean(locked == held.argmax(1)))
        assert not np.isin(locked, common).any()  # the locked predictions are classes natural images rarely show
        b0, *_ = bias_disruption(np.random.default_rng(seed), cal, cal, bias, candidates=1, steer=0.0)
        plain.append(np.mean((held - bias + b0).argmax(1) == held.argmax(1)))
    assert max(steered) <= chance + 0.005
    # Without steering, some draws leave many new images agreeing (what the steer is for).
    assert max(plain) > chance + 0.02 and np.mean(plain) > 5 * np.mean(steered)


def _head(rng: np.random.Generator, n: int, f: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rectified features of n images (every feature somewhat active, as pooled features are) and a linear head
    [k, f] under which each image has a clear top class."""
    cols = rng.normal(0, 0.05, (k, f))
    labels = rng.integers(0, k // 2, n)  # natural images show the first half of the classes only
    pooled = np.maximum(rng.normal(1, 1, (n, f)), 0) + np.maximum(cols[labels], 0) / 0.05
    return pooled, pooled @ cols.T, cols


def test_sign_disruption_keeps_the_unlocked_scores_inside_the_locked_range():
    """Locked scores of random flips are incoherent sums, far below the original's top (a quantiser calibrated
    on locked images would clip the unlocked scores); the decoy-aligned flips lift the locked top to the
    margin, at chance agreement, onto a class the original never predicts."""
    rng = np.random.default_rng(0)
    pooled, scores, cols = _head(rng, 400, 256, 40)
    m, agree, chance, flipped, _ = sign_disruption(np.random.default_rng(1), pooled, scores, cols)
    locked = scores + (pooled * m) @ cols.T
    assert set(np.unique(m)) <= {0.0, -2.0} and flipped == int(np.sum(m == -2.0))
    assert locked.max() >= RANGE_MARGIN * scores.max() and agree <= chance + 0.01
    assert agree == np.mean(locked.argmax(1) == scores.argmax(1))
    assert not np.isin(locked.argmax(1), scores.argmax(1)).any()  # the decoy: never the original's answer
    random = np.where(np.random.default_rng(2).permutation(256) < 128, -2.0, 0.0)
    assert (scores + (pooled * random) @ cols.T).max() < 0.7 * scores.max()  # what the decoy is for


def test_sign_disruption_without_a_decoy_draws_random_halves():
    rng = np.random.default_rng(0)
    pooled, scores, cols = _head(rng, 200, 64, 6)
    scores = scores - scores.max() - 1.0  # a head whose top score is not positive: no decoy
    m, _, chance, flipped, _ = sign_disruption(np.random.default_rng(1), pooled, scores, cols)
    assert chance == 1 / 6 and flipped == 32 and int(np.sum(m == -2.0)) == 32


def _swapping_head(rng: np.random.Generator, n: int, f: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-answer head whose natural images lean on a few strong features: flipping about half of them tends to
    invert the answer, the lock a relabelling undoes."""
    pooled = np.maximum(rng.normal(0.2, 0.3, (n, f)), 0)
    labels = rng.integers(0, 2, n)
    pooled[:, :4] += 3.0 * labels[:, None]
    pooled[:, 4:8] += 3.0 * (1 - labels[:, None])
    w = np.zeros((k, f))
    if k == 1:
        w[0, :4], w[0, 4:8] = 1.0, -1.0
        return pooled, pooled @ w.T, w
    w[1, :4] = w[0, 4:8] = 1.0
    return pooled, pooled @ w.T, w


def test_two_answer_locks_are_independent_of_the_original_not_opposite():
    """Two classes or one logit: the lowest agreement may be the swapped answer (kappa −1, which a user undoes by
    relabelling); the chosen flips give one answer, the original's rarer one, so they say nothing of its answers."""
    for k in (1, 2):
        rng = np.random.default_rng(k)
        pooled, scores, cols = _swapping_head(rng, 400, 16, k)
        m, agree, chance, _, kappa = sign_disruption(np.random.default_rng(3), pooled, scores, cols)
        assert chance == 0.5
        pred, base = top1(scores + (pooled * m) @ cols.T, k), top1(scores, k)
        assert agree == np.mean(pred == base)
        assert abs(cohen_kappa(pred, base)) <= KAPPA_TARGET and kappa == cohen_kappa(pred, base)
        rare = int(np.argmin(np.bincount(base.reshape(-1), minlength=2)))
        assert np.mean(pred == rare) >= 0.99  # the decoy: the answer the original gives least, on every image
        swaps = [cohen_kappa(top1(scores + (pooled * np.where(np.random.default_rng(s).permutation(16) < 8, -2.0, 0.0))
                                  @ cols.T, k), base) for s in range(50)]
        assert min(swaps) < -0.5  # some random halves invert the answer: what the old "lowest agreement" rule kept


def test_bias_disruption_of_a_one_logit_head_reads_its_decision():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.5, 2.0, (300, 1))
    b, agree, chance, factor, _ = bias_disruption(np.random.default_rng(1), logits, logits, np.zeros(1))
    pred = top1(logits + b, 1)
    assert chance == 0.5 and abs(cohen_kappa(pred, top1(logits, 1))) <= KAPPA_TARGET
    assert agree == np.mean(pred == top1(logits, 1)) and factor >= 1.0
