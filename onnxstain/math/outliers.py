"""How far a weight slice stands out from its layer: the statistics a thief holding the file would rank.

A layer's weight is read as slices: the rows of a Conv/Gemm weight (one per output channel, the kernel
flattened), the columns of a classifier (one per input feature), the entries of a bias. For every slice
the per-slice statistics below are turned into robust z-scores (median and MAD over the layer) and ranked,
largest first. A slice that ranks in the top ``fraction`` of its layer on any statistic is *exposed*:
pruning or resetting the top-ranked slices is an attack that takes under a second.

The attack suite (``tools/attack_suite.py``) ranks edited slices with these statistics; the additive stain
hides its detector only in channels that none of them expose, before and after the edit (numpy only).
"""

from __future__ import annotations

import math

import numpy as np

EXPOSED_FRACTION = 0.01  # the suite's test: an edit in the top 1 % of its layer on any statistic


def robust_z(values: np.ndarray) -> np.ndarray:
    """``(v − median) / (1.4826 · MAD)``; the standard deviation where the MAD is 0 (and 1 where both are)."""
    v = np.asarray(values, np.float64)
    med = np.median(v)
    mad = float(np.median(np.abs(v - med))) * 1.4826
    return (v - med) / (mad if mad > 0 else (float(np.std(v)) or 1.0))


def slice_statistics(slices: np.ndarray) -> dict[str, np.ndarray]:
    """Per slice (``[n, d]``, one slice per row): its norm, largest magnitude and largest magnitude over
    its median magnitude. Entries of a bias (``[n]`` or ``[n, 1]``) are ranked by value and by −value."""
    s = np.asarray(slices, np.float64)
    if s.ndim == 1 or s.shape[1] == 1:
        v = s.reshape(-1)
        return {"value": v, "-value": -v}
    mags = np.abs(s)
    biggest = mags.max(axis=1)
    return {"norm": np.linalg.norm(s, axis=1), "max|w|": biggest,
            "max/median": biggest / (np.median(mags, axis=1) + 1e-12)}


def ranks(slices: np.ndarray) -> dict[str, np.ndarray]:
    """Per statistic, each slice's rank in its layer, 1 for the most extreme (robust z, largest first)."""
    out = {}
    for name, values in slice_statistics(slices).items():
        order = np.argsort(-robust_z(values), kind="stable")
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        out[name] = rank
    return out


def exposed_count(n: int, fraction: float = EXPOSED_FRACTION) -> int:
    """How many of ``n`` slices count as the top ``fraction`` (at least the single most extreme one)."""
    return max(1, math.ceil(fraction * n))


def exposed(slices: np.ndarray, fraction: float = EXPOSED_FRACTION) -> np.ndarray:
    """Boolean per slice: in the top ``fraction`` of its layer on at least one statistic."""
    r = ranks(slices)
    limit = exposed_count(len(np.asarray(slices)), fraction)
    return np.any(np.stack([v <= limit for v in r.values()]), axis=0)


def exposed_after(statistics: dict[str, np.ndarray], indices: np.ndarray, replacements: np.ndarray,
                  fraction: float = EXPOSED_FRACTION) -> np.ndarray:
    """Per ``indices[i]``: whether that slice of a layer whose :func:`slice_statistics` are ``statistics`` would
    be in the top ``fraction`` on any statistic once replaced, alone, by ``replacements[i]`` (a row
    ``[len(indices), d]``, or one bias entry each ``[len(indices)]``).

    A slice's robust z-score is an increasing function of its statistic (the layer's median and MAD are shared
    by every slice), so its rank is one plus the number of other slices whose statistic is larger (ties in its
    favour, as :func:`ranks` breaks them at worst): a sorted search per statistic, for every candidate at once."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    new = slice_statistics(np.asarray(replacements, np.float64).reshape(len(idx), -1))
    hit = np.zeros(len(idx), bool)
    for name, values in statistics.items():
        v = np.asarray(values, np.float64)
        larger = len(v) - np.searchsorted(np.sort(v), new[name], side="right")
        larger -= v[idx] > new[name]  # the replaced slice's old value is not among the others
        hit |= 1 + larger <= exposed_count(len(v), fraction)
    return hit
