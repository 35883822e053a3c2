"""The black-box chance of a class signature, and how many triggers it takes (pure numpy; docs/bounds.md §8).

A class signature prescribes, for each of ``T`` triggers, a class ``c_t`` drawn uniformly from an allowed
set ``A_t`` independently of everything else; verification passes only if every trigger shows its class
winning. For any model that does not depend on the key, its prediction on trigger ``t`` is fixed given the
triggers, so ``P(pred_t = c_t) = Σ_a P(pred_t = a) / |A_t| ≤ 1 / |A_t|`` and, the draws being independent,
``P(all T hit) ≤ ∏_t 1 / |A_t|``. With few classes one trigger is a coin flip; ``T`` triggers make up the
strength.

The target for that chance is :func:`chance_target`: the stain's ``--fpr``, but never below
``CHANCE_FLOOR`` — the chance a single class signature has always had on a 1000-class model (one class
out of about a thousand, less the few the draw excludes), which is the issue's bar ("as small as on 1000
classes"). Asking less of it costs one trigger search per factor ``K`` and buys nothing the natural-input
bound does not already state; a caller may pass a smaller target explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CHANCE_FLOOR = 2e-3  # the black-box chance target is never asked below this (a 1000-class single signature)
MAX_TRIGGERS = 32  # more triggers than this are refused (search time grows linearly with T)


def chance_target(fpr: float, explicit: float | None = None) -> float:
    """The target for the black-box chance: ``explicit`` if given, else ``max(fpr, CHANCE_FLOOR)``."""
    target = float(explicit) if explicit is not None else max(float(fpr), CHANCE_FLOOR)
    if not 0.0 < target < 1.0:
        raise ValueError(f"the chance target must be in (0, 1), got {target!r}")
    return target


def single_suffices(classes: int, target: float) -> bool:
    """Whether one trigger with the legacy class choice meets ``target``: ``K ≥ 2 / target``.

    The legacy choice excludes the classes the calibration images and the trigger already favour, so
    its ``|A|`` is a little below ``K``; with ``K ≥ 2/target`` up to half the classes may be excluded.
    """
    return classes >= 2 and classes * target >= 2.0 - 1e-9  # (1000 × 2e-3 is 2 up to rounding)


def triggers_needed(allowed: int, target: float, cap: int = MAX_TRIGGERS) -> int | None:
    """The smallest ``T ≥ 1`` with ``allowed^-T ≤ target``, or ``None`` when ``T`` would exceed ``cap``
    (or ``allowed < 2``, where no number of triggers helps)."""
    if allowed < 2:
        return None
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target!r}")
    t = max(1, math.ceil(math.log(1.0 / target) / math.log(allowed) - 1e-12))
    while allowed ** (-t) > target:  # guard the float rounding of the ratio of logs
        t += 1
    return t if t <= cap else None


def log10_chance(allowed: Sequence[int]) -> float:
    """``log10 ∏_t 1/|A_t|``: the chance that a model independent of the key shows every prescribed class."""
    if len(allowed) == 0 or any(int(a) < 1 for a in allowed):
        raise ValueError(f"every allowed set must be non-empty, got {list(allowed)!r}")
    return -sum(math.log10(int(a)) for a in allowed)


def describe_chance(allowed: Sequence[int]) -> str:
    """One line, e.g. ``2^-9 = 2.0e-03 (9 triggers, each its class)`` or ``1/990 = 1.0e-03 (one trigger)``."""
    log10 = log10_chance(allowed)
    value = f"{10.0 ** log10:.1e}" if log10 > -300 else f"10^{log10:.1f}"
    sizes = sorted({int(a) for a in allowed})
    if len(allowed) == 1:
        return f"1/{int(allowed[0])} = {value} (one trigger)"
    form = f"{sizes[0]}^-{len(allowed)}" if len(sizes) == 1 else " × ".join(f"1/{int(a)}" for a in allowed)
    return f"{form} = {value} ({len(allowed)} triggers, each its class)"


def union_log10(per_detector_log10: float, detectors: int) -> float:
    """``log10`` of ``detectors × 10^per_detector_log10`` clipped to 1: a union over ORed detectors."""
    if detectors < 1:
        raise ValueError("detectors must be >= 1")
    return min(0.0, per_detector_log10 + math.log10(detectors))
