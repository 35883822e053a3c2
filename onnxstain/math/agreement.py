"""Top-1 agreement of classifier scores, image by image (numpy only).

A classifier gives ``K`` scores per image; a sequence head (a text recogniser's per-step classifier) gives
``T × K``, one row of ``K`` per step, and its top-1 is read step by step: the top-1 over all ``T·K``
flattened scores would compare one (step, class) pair and ignore the rest of the sequence.

A head with a single score (a one-logit binary classifier) has two classes: its decision, 1 where the score
passes ``threshold`` — 0 for a logit, 1/2 for the probability a Sigmoid makes of it
(:func:`onnxstain._onnx.head.decision_threshold` tells which a graph output is). Its top-1 is that decision,
and chance is 1/2, not 1/1.

With two classes, agreement is a poor test of a lock: a model that answers the opposite of the original
(agreement 0) or always the same class (agreement = that class's share) tells its user as much as, or
nothing of, the original's answer whatever its agreement. :func:`cohen_kappa` measures what agreement
cannot: 0 when the two answers are independent, ±1 when one determines the other.
"""

from __future__ import annotations

import numpy as np


def top1(scores: np.ndarray, classes: int | None = None, threshold: float = 0.0) -> np.ndarray:
    """Per image, the top class at each step: ``[N, T]`` (``T = 1`` for a plain classifier). ``classes``:
    the scores per step; ``None`` (or a size the rows are not a multiple of) reads each row as one step.
    One score per step: the decision, 1 where it is above ``threshold``."""
    s = np.asarray(scores)
    s = s.reshape(len(s), -1)
    k = classes if classes and s.shape[1] % classes == 0 else s.shape[1]
    if k == 1:  # one logit per step: the binary decision
        return (s > threshold).astype(np.int64)
    return s.reshape(len(s), -1, k).argmax(-1)


def decision_classes(classes: int) -> int:
    """How many answers a head of ``classes`` scores gives: a one-score head decides between two."""
    return max(int(classes), 2)


def chance_agreement(classes: int) -> float:
    """Top-1 agreement of a uniform random answer: 1/K (1/2 for a one-score head)."""
    return 1.0 / decision_classes(classes)


def cohen_kappa(pred: np.ndarray, ref: np.ndarray) -> float:
    """Cohen's kappa of two label arrays of the same shape (every step of every image one rating):
    ``(p_o − p_e) / (1 − p_e)``, ``p_o`` their agreement, ``p_e`` the agreement of independent answers with
    the same label frequencies. 0 when one answer says nothing of the other (a constant answer included);
    0 too when both are one and the same constant (nothing to tell apart)."""
    a, b = np.asarray(pred).reshape(-1), np.asarray(ref).reshape(-1)
    if a.size == 0:
        return 0.0
    labels, idx = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = idx[: a.size], idx[a.size :]
    p_o = float(np.mean(ia == ib))
    pa = np.bincount(ia, minlength=len(labels)) / a.size
    pb = np.bincount(ib, minlength=len(labels)) / b.size
    p_e = float(pa @ pb)
    return 0.0 if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e)


def top1_agreement(pred: np.ndarray, ref: np.ndarray, classes: int | None = None, threshold: float = 0.0
                   ) -> np.ndarray:
    """Per image, the fraction of steps whose top-1 class is the same in ``pred`` and ``ref`` (0 or 1 for a
    plain classifier)."""
    return (top1(pred, classes, threshold) == top1(ref, classes, threshold)).mean(axis=1)


def same_top1(pred: np.ndarray, ref: np.ndarray, classes: int | None = None, threshold: float = 0.0) -> np.ndarray:
    """Per image, whether every step's top-1 class is the same (a sequence read the same)."""
    return (top1(pred, classes, threshold) == top1(ref, classes, threshold)).all(axis=1)
