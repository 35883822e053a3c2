"""Trigger search: find pixels that drive a detector's score far above its firing margin.

Two solvers:

* :func:`box_maximiser` — closed form where the host sees raw inputs linearly: the maximiser of
  ``v · x`` over a box is ``hi`` where ``v > 0`` and ``lo`` elsewhere.
* :func:`ascend` — projected gradient ascent (Adam) over pixel values in ``[0, 255]`` for a
  differentiable score function (torch). It maximises a soft minimum over the selected positions
  (so every selected position fires, not just one) and stops as soon as the target is reached:
  the search is as long as the bound target needs, not a fixed budget.

Torch is imported lazily inside :func:`ascend`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


def box_maximiser(v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """argmax of ``v · x`` over ``lo ≤ x ≤ hi`` (element-wise)."""
    return np.where(v > 0, hi, lo)


@dataclasses.dataclass
class AscentResult:
    pixels: np.ndarray  # float pixels [H, W, 3] in 0..255
    score: float  # soft-min objective reached (float pixels)
    min_score: float  # minimum over the selected positions
    steps: int
    reached: bool
    history: list[float]


def soft_min(values, temperature: float):
    import torch

    return -temperature * torch.logsumexp(-values / temperature, dim=-1) + temperature * float(
        np.log(values.shape[-1])
    )


def ascend(
    score_fn: Callable,
    init_pixels: np.ndarray,
    target: float,
    max_steps: int = 300,
    lr: float = 4.0,
    free_mask: np.ndarray | None = None,
    temperature: float = 0.5,
    min_steps: int = 0,
    progress: Callable[[int, float], None] | None = None,
    check_every: int = 10,
) -> AscentResult:
    """Maximise ``softmin(score_fn(pixels))`` by Adam on pixel values, clamped to ``[0, 255]``.

    ``score_fn`` maps a float tensor of pixels ``[1, H, W, 3]`` (0..255) to per-position scores
    ``[1, P]``. ``free_mask`` (``[H, W]`` bool) restricts which pixels may change (a patch).
    Stops when the minimum over positions reaches ``target`` (checked every ``check_every`` steps).
    """
    import torch

    base = torch.tensor(init_pixels[None], dtype=torch.float32)
    param = base.clone().requires_grad_(True)
    mask = None
    if free_mask is not None:
        mask = torch.tensor(free_mask[None, :, :, None], dtype=torch.float32)
    opt = torch.optim.Adam([param], lr=lr)
    history: list[float] = []
    best = (-np.inf, param.detach().clone(), -np.inf)
    step = 0
    reached = False
    for step in range(1, max_steps + 1):
        opt.zero_grad(set_to_none=True)
        x = param if mask is None else base + (param - base) * mask
        s = score_fn(x)
        obj = soft_min(s, temperature).sum()
        (-obj).backward()
        opt.step()
        with torch.no_grad():
            param.clamp_(0.0, 255.0)
        smin = float(s.detach().min())
        history.append(smin)
        if smin > best[2]:
            best = (float(obj.detach()), x.detach().clone(), smin)
        if progress is not None:
            progress(step, smin)
        if step >= min_steps and step % check_every == 0 and best[2] >= target:
            reached = True
            break
    if not reached and best[2] >= target:
        reached = True
    pixels = best[1][0].clamp(0, 255).numpy().astype(np.float64)
    return AscentResult(pixels=pixels, score=best[0], min_score=best[2], steps=step, reached=reached,
                        history=history)


def quantise(pixels: np.ndarray) -> np.ndarray:
    """Float pixels → uint8, as an 8-bit PNG stores them."""
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
