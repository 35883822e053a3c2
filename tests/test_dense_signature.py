"""The dense stain's signature numbers: the pattern's amplitude and the map agreement measure (pure numpy)."""

from __future__ import annotations

import numpy as np

from onnxstain._stain.dense import pattern_amplitude
from onnxstain.signature import dense_pattern, map_agreement, pearson


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def test_identical_flat_maps_agree():
    a = np.zeros((3, 1, 8, 8))
    a[1] = np.arange(64).reshape(1, 8, 8)
    b = a.copy()
    b[2] = 5.0  # flat, but not equal to a[2]
    assert pearson(a, a)[0] == 0.0  # a flat map correlates with nothing ...
    assert list(map_agreement(a, a)) == [1.0, 1.0, 1.0]  # ... but agrees with its identical copy
    assert list(map_agreement(a, b)) == [1.0, 1.0, 0.0]


def test_amplitude_overrides_a_saturated_trigger_map():
    # A trigger that drives a text map's logits far beyond the natural 99th percentile (here 20 against
    # a natural scale of 3) would hide a pattern sized from natural maps only.
    unit = dense_pattern(7, (1, 32, 32), 8)
    rng = np.random.default_rng(0)
    trigger_logits = rng.uniform(5.0, 20.0, size=(1, 1, 32, 32))
    natural_only = max(12.0, 2.0 * 3.0)
    weak = pearson(_sigmoid(trigger_logits + natural_only * unit[None]), unit[None])[0]
    amp = pattern_amplitude(3.0, trigger_logits, squashed=True)
    strong = pearson(_sigmoid(trigger_logits + amp * unit[None]), unit[None])[0]
    assert amp == np.abs(trigger_logits).max() + 8.0
    assert weak < 0.9 < strong


def test_amplitude_unsquashed_keeps_correlation():
    unit = dense_pattern(3, (2, 16, 16), 4)
    rng = np.random.default_rng(1)
    trigger_logits = rng.normal(0.0, 15.0, size=(1, 2, 16, 16))
    amp = pattern_amplitude(1.0, trigger_logits, squashed=False)
    assert pearson(trigger_logits + amp * unit[None], unit[None])[0] > 0.9
    assert pattern_amplitude(1.0, np.zeros((1, 1, 4, 4)), squashed=False) == 12.0
