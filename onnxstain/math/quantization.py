"""What int8 weight quantisation does to a linear classifier (numpy only).

Symmetric per-tensor int8, as onnxruntime's ``quantize_dynamic`` and ``quantize_static`` do by default
(``per_channel=False``): one scale ``max |w| / 127`` for the whole tensor, so a single large weight coarsens
every other one.
"""

from __future__ import annotations

import numpy as np

from .agreement import top1_agreement


def per_tensor_int8(w: np.ndarray) -> np.ndarray:
    """``w`` rounded to symmetric int8 codes with one scale and read back as floats."""
    w = np.asarray(w, np.float64)
    peak = float(np.abs(w).max())
    if peak == 0.0:
        return w.copy()
    scale = peak / 127.0
    return np.clip(np.rint(w / scale), -127, 127) * scale


def int8_head_agreement(scores: np.ndarray, features: np.ndarray, weights: np.ndarray) -> float:
    """Top-1 agreement with ``scores`` (the float model's) once the head's ``weights`` ``[K, C]`` are int8 per
    tensor: the scores move by ``features @ (Q(W) − W)ᵀ``. The rest of the model is left exact."""
    moved = np.asarray(scores, np.float64) + np.asarray(features, np.float64) @ (per_tensor_int8(weights) -
                                                                                 np.asarray(weights, np.float64)).T
    return float(top1_agreement(moved, scores).mean())
