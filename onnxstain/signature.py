"""Output signatures: what a stained model shows on its trigger (pure numpy).

* ``class`` — a chosen class wins by a clear margin (``margin(scores, c) = s_c − max_{j≠c} s_j``).
* ``shift`` — the scores move from the original model's output on the trigger towards the stained
  model's: ``shift_score = ⟨s − s_orig, s_st − s_orig⟩ / ‖s_st − s_orig‖²`` is 1 for the stained
  model and 0 for the original. Used by the additive in-place stain, which keeps the classifier's
  weights as they are (changing them would leak the hidden channel's natural activity).
"""

from __future__ import annotations

import numpy as np


def class_margin(scores: np.ndarray, cls: int) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    return s[..., cls] - np.delete(s, cls, axis=-1).max(axis=-1)


def top1_margins(scores: np.ndarray) -> np.ndarray:
    part = np.partition(np.asarray(scores, np.float64), -2, axis=-1)
    return part[..., -1] - part[..., -2]


def shift_score(scores: np.ndarray, original: np.ndarray, expected: np.ndarray) -> np.ndarray:
    d = np.asarray(expected, np.float64) - np.asarray(original, np.float64)
    return (np.asarray(scores, np.float64) - original) @ d / float(d @ d)
