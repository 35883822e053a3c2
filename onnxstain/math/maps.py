"""Output maps reduced for a key: average pooling of ``[N, C, H, W]`` maps to a small side (numpy only)."""

from __future__ import annotations

import numpy as np

REFERENCE_SIDE = 56  # reference maps are stored average-pooled to at most this side


def pool_maps(y: np.ndarray, side: int = REFERENCE_SIDE) -> np.ndarray:
    """Average-pool maps ``[N, C, H, W]`` by one integer factor so that each side is at most ``side``.

    The factor is ``ceil(max(H, W) / side)``, but never more than the shorter side (a channels-last map
    such as CRAFT's ``[N, H, W, 2]`` read as ``[N, C, H, W]`` has a side of 2: it keeps one cell rather
    than none); rows and columns that do not fill a whole pooling cell at the bottom and right are
    dropped (so the result is ``[N, C, H // k, W // k]``).
    """
    n, c, h, w = y.shape
    k = max(1, min(-(-max(h, w) // side), h, w))
    hh, ww = h // k, w // k
    return y[:, :, : hh * k, : ww * k].reshape(n, c, hh, k, ww, k).mean(axis=(3, 5))
