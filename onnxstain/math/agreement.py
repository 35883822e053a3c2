"""Top-1 agreement of classifier scores, image by image (numpy only).

A classifier gives ``K`` scores per image; a sequence head (a text recogniser's per-step classifier) gives
``T × K``, one row of ``K`` per step, and its top-1 is read step by step: the top-1 over all ``T·K``
flattened scores would compare one (step, class) pair and ignore the rest of the sequence.
"""

from __future__ import annotations

import numpy as np


def top1(scores: np.ndarray, classes: int | None = None) -> np.ndarray:
    """Per image, the top class at each step: ``[N, T]`` (``T = 1`` for a plain classifier). ``classes``:
    the scores per step; ``None`` (or a size the rows are not a multiple of) reads each row as one step."""
    s = np.asarray(scores)
    s = s.reshape(len(s), -1)
    k = classes if classes and s.shape[1] % classes == 0 else s.shape[1]
    return s.reshape(len(s), -1, k).argmax(-1)


def top1_agreement(pred: np.ndarray, ref: np.ndarray, classes: int | None = None) -> np.ndarray:
    """Per image, the fraction of steps whose top-1 class is the same in ``pred`` and ``ref`` (0 or 1 for a
    plain classifier)."""
    return (top1(pred, classes) == top1(ref, classes)).mean(axis=1)


def same_top1(pred: np.ndarray, ref: np.ndarray, classes: int | None = None) -> np.ndarray:
    """Per image, whether every step's top-1 class is the same (a sequence read the same)."""
    return (top1(pred, classes) == top1(ref, classes)).all(axis=1)
