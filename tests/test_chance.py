"""The black-box chance of a class signature and the number of triggers it needs (pure numpy, no onnx)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxstain.math import chance


@pytest.mark.parametrize(("classes", "target", "expected"), [
    (2, 1e-9, 30), (5, 1e-9, 13), (10, 1e-9, 9), (1000, 1e-9, 3),
    (2, 2e-3, 9), (5, 2e-3, 4), (10, 2e-3, 3), (1000, 2e-3, 1),
    (2, 0.05, 5), (10, 0.05, 2), (2, 0.5, 1), (10, 0.1, 1),
])
def test_triggers_needed_is_the_smallest_that_reaches_the_target(classes, target, expected):
    t = chance.triggers_needed(classes, target)
    assert t == expected
    assert classes ** (-t) <= target
    assert t == 1 or classes ** (-(t - 1)) > target


def test_triggers_needed_refuses_beyond_the_cap_and_without_choice():
    assert chance.triggers_needed(2, 1e-12, cap=32) is None  # needs 40
    assert chance.triggers_needed(2, 1e-9, cap=32) == 30
    assert chance.triggers_needed(1, 0.5) is None
    with pytest.raises(ValueError):
        chance.triggers_needed(2, 0.0)


def test_chance_target_defaults_to_the_floor_and_follows_a_larger_fpr():
    assert chance.chance_target(1e-9) == chance.CHANCE_FLOOR
    assert chance.chance_target(0.05) == 0.05
    assert chance.chance_target(1e-9, explicit=1e-9) == 1e-9
    with pytest.raises(ValueError):
        chance.chance_target(1e-9, explicit=1.5)


def test_single_trigger_suffices_only_with_many_classes():
    target = chance.chance_target(1e-9)
    assert chance.single_suffices(1000, target)
    assert not any(chance.single_suffices(k, target) for k in (2, 5, 10, 100, 999))
    assert not chance.single_suffices(1, 0.9)


def test_log10_chance_is_the_product_of_the_draws():
    assert chance.log10_chance([2] * 10) == pytest.approx(-10 * math.log10(2))
    assert chance.log10_chance([990]) == pytest.approx(-math.log10(990))
    assert chance.log10_chance([5, 2]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        chance.log10_chance([])
    with pytest.raises(ValueError):
        chance.log10_chance([2, 0])


def test_describe_chance():
    assert chance.describe_chance([2] * 9) == "2^-9 = 2.0e-03 (9 triggers, each its class)"
    assert chance.describe_chance([990]) == "1/990 = 1.0e-03 (one trigger)"


def test_chance_bound_holds_for_a_model_independent_of_the_key():
    """Monte Carlo: a fixed 'model' (any rule mapping triggers to classes, here a biased one) shows every
    class of independently drawn uniform signatures no more often than K^-T (with sampling slack)."""
    rng = np.random.default_rng(0)
    k, t, n = 3, 3, 200_000
    predictions = np.array([0, 0, 1])  # the independent model's top-1 on each trigger (any fixed choice)
    drawn = rng.integers(0, k, size=(n, t))
    rate = float(np.mean(np.all(drawn == predictions, axis=1)))
    bound = 10.0 ** chance.log10_chance([k] * t)
    assert rate <= bound + 4 * math.sqrt(bound / n)


def test_union_log10():
    assert chance.union_log10(-9.0, 10) == pytest.approx(-8.0)
    assert chance.union_log10(-0.1, 10) == 0.0
    with pytest.raises(ValueError):
        chance.union_log10(-3.0, 0)
