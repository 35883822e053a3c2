"""Per-tensor int8 of a classifier head (math/quantization.py): one large weight coarsens all the others."""

from __future__ import annotations

import numpy as np

from onnxstain.math.quantization import int8_head_agreement, per_tensor_int8


def test_per_tensor_int8_rounds_to_127_levels_of_one_scale():
    w = np.random.default_rng(0).normal(size=(10, 32))
    q = per_tensor_int8(w)
    scale = np.abs(w).max() / 127
    assert np.allclose(q / scale, np.rint(q / scale))
    assert np.abs(q - w).max() <= scale / 2 + 1e-12
    assert np.array_equal(per_tensor_int8(np.zeros(3)), np.zeros(3))


def test_one_large_weight_breaks_the_head_and_the_agreement_shows_it():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, size=(100, 64))
    feats = np.abs(rng.normal(size=(400, 64)))
    scores = feats @ w.T
    assert int8_head_agreement(scores, feats, w) > 0.9
    big = w.copy()
    big[7, 3] = 40.0  # an in-place stain's signature column, 800 × the natural weights
    feats_big = feats.copy()
    feats_big[:, 3] = 0.0  # the overwritten channel is silent on natural images
    assert int8_head_agreement(feats_big @ big.T, feats_big, big) < 0.5
