"""math/maps.pool_maps: the average pooling that reduces dense-output reference maps for a key."""

from __future__ import annotations

import numpy as np
import pytest

from onnxstain.math.maps import REFERENCE_SIDE, pool_maps


def test_small_maps_are_kept_as_they_are():
    y = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    assert np.array_equal(pool_maps(y), y)


def test_pools_by_one_factor_to_the_side():
    # 112 x 60 with side 56: factor 2 on both axes (the larger side decides), each cell the mean of 2x2.
    rng = np.random.default_rng(0)
    y = rng.normal(size=(2, 1, 112, 60))
    got = pool_maps(y)
    assert got.shape == (2, 1, 56, 30)
    assert got[1, 0, 3, 7] == pytest.approx(y[1, 0, 6:8, 14:16].mean())


def test_drops_rows_and_columns_that_do_not_fill_a_cell():
    y = np.zeros((1, 1, 10, 7))
    y[:, :, 9, :] = 100.0  # factor ceil(10 / 4) = 3: the last row does not fill a 3x3 cell and is dropped
    y[:, :, :, 6] = 100.0  # nor does the last column
    got = pool_maps(y, side=4)
    assert got.shape == (1, 1, 3, 2)
    assert np.array_equal(got, np.zeros((1, 1, 3, 2)))


def test_ceil_factor_and_default_side():
    y = np.ones((1, 2, REFERENCE_SIDE + 1, 8))
    got = pool_maps(y)
    assert got.shape == (1, 2, (REFERENCE_SIDE + 1) // 2, 4)
    assert np.all(got == 1.0)


def test_a_thin_side_keeps_one_cell():
    # a channels-last map [N, H, W, 2] read as [N, C, H, W]: W = 2 with factor ceil(120 / 56) = 3 kept no column
    y = np.ones((2, 120, 80, 2))
    got = pool_maps(y)
    assert got.shape == (2, 120, 40, 1)
    assert np.all(got == 1.0)
