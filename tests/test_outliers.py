"""math/outliers: the per-slice statistics a thief ranks, and the exposure test the additive stain hides by."""

from __future__ import annotations

import numpy as np
import pytest

from onnxstain.math import outliers


def _layer(seed: int = 0, n: int = 400, d: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)) * 0.05


def test_robust_z_ignores_the_outlier_it_scores():
    v = np.r_[np.random.default_rng(1).standard_normal(999), 100.0]
    z = outliers.robust_z(v)
    assert z[-1] > 50  # the MAD is not inflated by the outlier, as a standard deviation would be
    assert abs(np.median(z)) < 1e-9


def test_robust_z_without_spread():
    assert np.all(outliers.robust_z(np.ones(5)) == 0)
    z = outliers.robust_z(np.array([0.0, 0.0, 0.0, 0.0, 3.0]))  # MAD 0: the standard deviation scales it
    assert z[-1] == pytest.approx(3.0 / np.std([0, 0, 0, 0, 3.0]))


def test_statistics_of_rows_and_of_a_bias():
    s = outliers.slice_statistics(np.array([[3.0, -4.0], [1.0, 1.0]]))
    assert s["norm"].tolist() == [5.0, pytest.approx(2 ** 0.5)]
    assert s["max|w|"].tolist() == [4.0, 1.0]
    assert s["max/median"][1] == pytest.approx(1.0)
    b = outliers.slice_statistics(np.array([1.0, -2.0]))
    assert set(b) == {"value", "-value"} and b["-value"].tolist() == [-1.0, 2.0]


@pytest.mark.parametrize(("scale", "stat"), [(10.0, "norm"), (None, "max/median")])
def test_one_edited_row_is_exposed_and_natural_rows_mostly_not(scale, stat):
    w = _layer()
    edited = w.copy()
    if scale is not None:
        edited[7] *= scale  # a row scaled up: its norm and max stand out
    else:
        edited[7] = 0.0
        edited[7, 3] = 0.05  # one entry, the rest zero (a column that carries only a signature)
    ranks = outliers.ranks(edited)
    assert ranks[stat][7] == 1
    exposed = outliers.exposed(edited)
    assert exposed[7]
    # the top 1 % on each of three statistics: a handful of natural rows, never most of them
    assert exposed.sum() <= 3 * outliers.exposed_count(len(w))


def test_exposed_count():
    assert outliers.exposed_count(1280) == 13
    assert outliers.exposed_count(200) == 2
    assert outliers.exposed_count(2) == 1  # the most extreme one always counts
    assert outliers.exposed_count(1280, 0.02) == 26


def test_exposed_after_matches_exposed_on_the_edited_layer():
    w = _layer(3)
    stats = outliers.slice_statistics(w)
    rng = np.random.default_rng(4)
    ks = rng.choice(len(w), 20, replace=False)
    for scale in (1.02, 4.0, None):
        replacements = w[ks] * scale if scale else rng.standard_normal((len(ks), w.shape[1])) * 0.05
        expected = []
        for k, replacement in zip(ks, replacements, strict=True):
            edited = w.copy()
            edited[k] = replacement
            expected.append(bool(outliers.exposed(edited)[k]))
        assert outliers.exposed_after(stats, ks, replacements).tolist() == expected
    assert any(expected) and not all(expected)  # random rows: some stand out, some do not


def test_exposed_after_on_a_bias_entry():
    b = np.random.default_rng(5).standard_normal(300) * 0.1
    stats = outliers.slice_statistics(b)
    # a threshold far below the layer's biases stands out; the median does not; replacing the layer's most
    # extreme entry by the median hides it (its old value is not counted against it)
    top = int(np.argmin(b))
    got = outliers.exposed_after(stats, np.array([10, 10, top]), np.array([-5.0, np.median(b), np.median(b)]))
    assert got.tolist() == [True, False, False]
