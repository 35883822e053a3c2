"""Detector neurons' weight formulas (onnxstain.math.detector)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxstain.math import detector


def _setup(seed: int = 0, m: int = 40, p: int = 6, c_: int = 9):
    rng = np.random.default_rng(seed)
    v = detector.sample_direction(rng, m)
    c = rng.normal(0, 0.1, m)
    trigger = c + 5.0 * v + rng.normal(0, 0.2, (p, m))  # scores ≈ 5 at every position
    rows, biases = rng.normal(0, 0.3, (c_, m)), rng.normal(0, 1.0, c_)
    return v, c, trigger, rows, biases


def test_non_additive_reaches_delta_on_the_trigger_and_stays_below_zero_at_the_centre():
    v, c, trigger, _, _ = _setup()
    s = detector.scores(trigger, v, c)
    ed = detector.non_additive(v, c, tau=2.0, s_star=float(s.min()), delta=7.5)
    pre = trigger @ ed.weights + ed.bias
    assert pre.min() == pytest.approx(7.5)
    assert c @ ed.weights + ed.bias == pytest.approx(-ed.gain * 2.0)


def test_additive_gains_match_one_neuron_at_a_time_and_reach_delta_at_the_weakest_position():
    v, c, trigger, rows, biases = _setup(seed=1)
    kappa = detector.additive_gains(rows, biases, v, c, 2.0, trigger, 7.5)
    for k in range(len(rows)):
        ed = detector.additive(rows[k], float(biases[k]), v, c, 2.0, trigger, 7.5)
        assert ed.gain == pytest.approx(kappa[k], rel=1e-12)
        pre = trigger @ ed.weights + ed.bias
        assert pre.min() == pytest.approx(7.5)  # the neuron's own response plus κ S, at its weakest position
        # natural inputs at the centre keep the neuron's own pre-activation
        assert c @ ed.weights + ed.bias == pytest.approx(c @ rows[k] + biases[k])


def test_additive_refuses_a_trigger_below_the_margin():
    v, c, trigger, rows, biases = _setup(seed=2)
    with pytest.raises(ValueError, match="margin"):
        detector.additive_gains(rows, biases, v, c, 50.0, trigger, 7.5)
