"""The shuffle lock's math: blocks of channels, the secret order, the patch's value ladder and the bound.

A layer's ``C`` output channels are cut into ``K`` blocks of ``g`` (the last ``C − K·g`` stay in place); the
locked model stores block ``q`` where the original has block ``σ(q)``, for a uniformly random permutation
``σ``. At run time the model sorts ``K`` values of the input's corner window (largest first) and reads block
``idx[i]`` into slot ``i``, ``idx`` the sorted coordinates: the patch gives coordinate ``q`` the rank ``σ(q)``,
so ``idx = σ⁻¹`` and every block returns to its place. No weight of the model holds ``σ``: it is the order of
the patch's pixels.

Bound (data-free, over the key's draw): for any input, its corner induces some fixed order; it puts block
``i`` in place only where that order agrees with ``σ⁻¹``, and for a uniform ``σ`` the probability that at
least ``k`` of the ``K`` blocks are in place is at most ``C(K, k)·(K − k)!/K! = 1/k!``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln

from .bounds import Bound

MIN_BLOCKS = 16  # 16! ≈ 2e13 orders; fewer blocks are refused
PLACED_SHARE = 0.5  # the bound counts an input that puts half of the blocks in place as opening the lock


def plan_blocks(channels: int, keys: int, min_blocks: int = MIN_BLOCKS) -> tuple[int, int] | None:
    """``(K, g)``: the block count ``K ≤ keys`` (the sort keys the window holds) and block size ``g`` that
    cover the most of ``channels`` (``K·g``), the larger ``K`` on a tie; None when fewer than ``min_blocks``
    blocks fit."""
    best: tuple[int, int] | None = None
    for k in range(min(keys, channels), min_blocks - 1, -1):
        g = channels // k
        if best is None or k * g > best[0] * best[1]:
            best = (k, g)
    return best


def draw_order(blocks: int, rng: np.random.Generator) -> np.ndarray:
    """``σ``: stored block ``q`` holds original block ``σ[q]`` (a uniform permutation)."""
    return rng.permutation(blocks)


def channel_order(sigma: np.ndarray, group: int, channels: int) -> np.ndarray:
    """The stored channels as original channel indices: stored channel ``q·g + j`` is ``σ[q]·g + j``; the
    channels past ``K·g`` keep their place."""
    k = len(sigma)
    blocks = (np.asarray(sigma)[:, None] * group + np.arange(group)[None, :]).reshape(-1)
    return np.concatenate([blocks, np.arange(k * group, channels)]).astype(np.int64)


def gather_order(sigma: np.ndarray) -> np.ndarray:
    """``σ⁻¹``: the sorted coordinates the patch must produce (slot ``i`` reads stored block ``σ⁻¹[i]``)."""
    return np.argsort(sigma).astype(np.int64)


def ladder_values(ranks: np.ndarray, low: float, high: float) -> np.ndarray:
    """Evenly spaced target values in ``(low, high)``, highest for rank 0, one step apart. The patch gives sort
    key ``q`` the rank ``σ[q]`` (``ranks = σ``), so that the keys sorted largest first are ``σ⁻¹``."""
    k = len(ranks)
    step = (high - low) / k
    return high - (np.asarray(ranks, np.float64) + 0.5) * step


def placed_blocks(indices: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per row of sorted coordinates ``indices [N, K]``, how many blocks land in their place."""
    return (np.asarray(indices).reshape(len(indices), -1) == np.asarray(order)[None, :]).sum(axis=1)


def row_fingerprints(weights: np.ndarray) -> np.ndarray:
    """One number per output channel of a layer's weights ``[C, ...]``: the sum of its row (float64)."""
    w = np.asarray(weights, np.float64)
    return w.reshape(len(w), -1).sum(axis=1)


def stored_order_match(found: np.ndarray, original: np.ndarray, order: np.ndarray, group: int) -> float:
    """How well a layer's row fingerprints ``found`` match the original's ``original`` stored in the key's order
    (``order`` = σ⁻¹, blocks of ``group``): their Pearson correlation — 1 for the locked layer (int8 rounding
    keeps it near 1), near 0 for the same layer stored in another key's order, or in the original's."""
    expected = np.asarray(original, np.float64)[channel_order(np.argsort(order), group, len(original))]
    found = np.asarray(found, np.float64)
    if found.shape != expected.shape or found.std() == 0 or expected.std() == 0:
        return 0.0
    return float(np.corrcoef(found, expected)[0, 1])


def placement_bound(blocks: int, placed: int | None = None) -> Bound:
    """The probability, over the key's draw, that one input puts at least ``placed`` (default: half) of the
    ``blocks`` in place: ``1/placed!``, whatever the input (data-free)."""
    k = int(placed if placed is not None else math.ceil(PLACED_SHARE * blocks))
    if not 1 <= k <= blocks:
        raise ValueError(f"placed must be in 1..{blocks}, not {k}")
    log10 = -float(gammaln(k + 1)) / math.log(10.0)
    statement = (f"Over the key's draw, the probability that any one input puts at least {k} of the {blocks} "
                 f"channel blocks in their place is at most 1/{k}! (every input, no data assumed); all {blocks} "
                 f"blocks: 1/{blocks}!")
    return Bound.from_log10(log10, "data-free", {"blocks": blocks, "placed": k}, statement)


def blocks_for(fpr: float, keys: int) -> int:
    """The fewest blocks whose bound (half of them placed) meets ``fpr``; more than ``keys`` when none does."""
    for k in range(MIN_BLOCKS, keys + 1):
        if placement_bound(k).value <= fpr:
            return k
    return keys + 1
