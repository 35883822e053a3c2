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
    min_score: float  # minimum score over the selected positions
    max_radius: float  # largest centred feature radius over all positions
    steps: int
    reached: bool
    history: list[tuple[float, float]]  # (min score, max radius) at each step


def soft_min(values, temperature: float):
    """A smooth minimum over the last axis (equal to the minimum as the temperature goes to 0)."""
    import torch

    return -temperature * torch.logsumexp(-values / temperature, dim=-1) + temperature * float(
        np.log(values.shape[-1])
    )


def ascend(
    score_fn: Callable,
    init_pixels: np.ndarray,
    score_target: float,
    accept: Callable[[float, np.ndarray], bool],
    max_steps: int = 300,
    lr: float = 4.0,
    free_mask: np.ndarray | None = None,
    temperature: float = 0.5,
    radius_weight: float = 0.3,
    progress: Callable[[int, float], None] | None = None,
    check_every: int = 10,
    abandon: tuple[int, float] | None = None,
) -> AscentResult:
    """Drive the detector scores above ``score_target`` while keeping the feature radius small.

    ``score_fn`` maps float pixels ``[1, H, W, 3]`` (0..255) to ``(scores, radii)``: the detector
    scores at the selected positions ``[1, P_sel]`` and the centred feature radii at every position
    ``[1, P]``. The objective is ``softmin(min(scores, cap)) − λ · max(radii)``: scores count up to a
    cap a little above the target, and the radius penalty keeps the trigger *aligned* with the
    detector rather than merely far from natural data (which is what keeps other keys' detectors
    from firing on it). ``λ`` adapts every ``check_every`` steps (down while the scores are short of
    the target, up once they pass it); the search stops as soon as ``accept(min_score, radii)``.
    ``free_mask`` (``[H, W]`` bool) restricts which pixels may change (a patch).
    ``abandon=(step, score)`` gives up at ``step`` when the best score is still below ``score``: how
    high a direction can be driven varies a lot between random directions, and a hopeless one shows
    early, so a caller that may redraw the direction saves the rest of the budget.
    """
    import torch

    base = torch.tensor(init_pixels[None], dtype=torch.float32)
    param = base.clone().requires_grad_(True)
    mask = None
    if free_mask is not None:
        mask = torch.tensor(free_mask[None, :, :, None], dtype=torch.float32)
    opt = torch.optim.Adam([param], lr=lr)
    cap = 1.2 * score_target
    lam = radius_weight
    history: list[tuple[float, float]] = []
    # best = (min score, pixels, radii): the smallest-radius point past the target, else the highest score.
    best: tuple[float, torch.Tensor, np.ndarray] | None = None
    step = 0
    reached = False
    for step in range(1, max_steps + 1):
        opt.zero_grad(set_to_none=True)
        x = param if mask is None else base + (param - base) * mask
        s, r = score_fn(x)
        obj = soft_min(s.clamp(max=cap), temperature).sum() - lam * r.max(dim=-1).values.sum()
        (-obj).backward()
        smin = float(s.detach().min())
        radii = r.detach()[0].numpy().astype(np.float64)
        history.append((smin, float(radii.max())))
        if best is None or _improves(best[0], best[2], smin, radii, score_target):
            best = (smin, x.detach().clone(), radii)
        if progress is not None:
            progress(step, smin)
        if step % check_every == 0:
            if best[0] >= score_target and accept(best[0], best[2]):
                reached = True
                break
            lam = lam * 0.7 if smin < score_target else lam * 1.3
        if abandon is not None and step == abandon[0] and best[0] < abandon[1]:
            break
        opt.step()
        with torch.no_grad():
            param.clamp_(0.0, 255.0)
    assert best is not None
    pixels = best[1][0].clamp(0, 255).numpy().astype(np.float64)
    return AscentResult(pixels=pixels, min_score=best[0], max_radius=float(best[2].max()), steps=step,
                        reached=reached, history=history)


def _improves(best_score: float, best_radii: np.ndarray, smin: float, radii: np.ndarray, score_target: float) -> bool:
    """Whether a step beats the best so far: past the target, a smaller radius (or the first to pass it);
    short of it, a higher score."""
    if smin >= score_target:
        return bool(best_score < score_target or radii.max() < best_radii.max())
    return best_score < score_target and smin > best_score


def quantise(pixels: np.ndarray) -> np.ndarray:
    """Float pixels → uint8, as an 8-bit PNG stores them."""
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class RefineResult:
    pixels: np.ndarray  # float pixels [H, W, 3] in 0..255 (only the free mask differs from the start)
    min_score: float
    kl_start: float  # mean KL(clean ‖ patched) on the first minibatch
    kl_end: float  # running mean over the last steps
    steps: int
    history: list[tuple[float, float]]  # (min score, minibatch KL) at each step


def refine_occlusion(
    score_fn: Callable,
    logits_fn: Callable,
    start_pixels: np.ndarray,
    clean: np.ndarray,
    clean_logits: np.ndarray,
    free_mask: np.ndarray,
    score_floor: float,
    steps: int = 150,
    batch: int = 8,
    lr: float = 2.0,
    seed: int = 0,
    progress: Callable[[int, float, float], None] | None = None,
) -> RefineResult:
    """Make a patch disturb the model as little as possible while its detectors keep firing.

    Minimises the mean ``KL(p(clean) ‖ p(clean with the patch))`` of the model's outputs over
    minibatches of ``clean`` images (uint8 ``[N, H, W, 3]``, with their logits ``clean_logits``)
    plus a hinge ``w · relu(score_floor − min score)`` that keeps every detector above the floor.
    Only the pixels under ``free_mask`` move. ``score_fn`` is evaluated on the patch alone (the
    detectors see nothing else); ``logits_fn`` maps float pixels ``[B, H, W, 3]`` to logits.
    Returns the last iterate whose scores were above the floor (the start if none was).
    """
    import torch

    rng = np.random.default_rng(seed)
    mask = torch.tensor(free_mask[None, :, :, None], dtype=torch.float32)
    base = torch.tensor(start_pixels[None], dtype=torch.float32)
    param = base.clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=lr)
    images = torch.tensor(clean, dtype=torch.float32)
    ref = torch.log_softmax(torch.tensor(clean_logits, dtype=torch.float32), dim=-1)
    weight = 10.0
    best = (start_pixels, float("nan"))
    history: list[tuple[float, float]] = []
    order = rng.permutation(len(clean))
    pos = 0
    for step in range(1, steps + 1):
        if pos + batch > len(order):
            order, pos = rng.permutation(len(clean)), 0
        idx = order[pos : pos + batch]
        pos += batch
        opt.zero_grad(set_to_none=True)
        patch = base + (param - base) * mask
        s, _ = score_fn(patch)
        x = images[idx] * (1 - mask) + patch * mask
        logp = torch.log_softmax(logits_fn(x), dim=-1)
        kl = (ref[idx].exp() * (ref[idx] - logp)).sum(-1).mean()
        smin = float(s.detach().min())
        loss = kl + weight * torch.relu(score_floor - s).sum()
        loss.backward()
        history.append((smin, float(kl.detach())))
        if smin >= score_floor:
            best = (patch.detach()[0].clamp(0, 255).numpy().astype(np.float64), smin)
        if progress is not None:
            progress(step, smin, float(kl.detach()))
        opt.step()
        with torch.no_grad():
            param.clamp_(0.0, 255.0)
    tail = [k for _, k in history[-20:]]
    return RefineResult(pixels=best[0], min_score=best[1], kl_start=history[0][1] if history else float("nan"),
                        kl_end=float(np.mean(tail)) if tail else float("nan"), steps=len(history), history=history)
