"""The locks' disruptions (numpy only): what the model does without the patch."""

from __future__ import annotations

import numpy as np

from onnxstain.math.disruption import bias_disruption


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
        b, agree, ch, factor = bias_disruption(np.random.default_rng(seed), cal, cal, bias)
        assert ch == chance and agree <= chance + 0.01 and factor >= 1.0
        locked = (held - bias + b).argmax(1)
        steered.append(np.mean(locked == held.argmax(1)))
        assert not np.isin(locked, common).any()  # the locked predictions are classes natural images rarely show
        b0, *_ = bias_disruption(np.random.default_rng(seed), cal, cal, bias, candidates=1, steer=0.0)
        plain.append(np.mean((held - bias + b0).argmax(1) == held.argmax(1)))
    assert max(steered) <= chance + 0.005
    # Without steering, some draws leave many new images agreeing (what the steer is for).
    assert max(plain) > chance + 0.02 and np.mean(plain) > 5 * np.mean(steered)
