"""The lock's options and result, and the small records its stages hand to each other.

:class:`LockOptions` and :class:`LockResult` are public (``onnxstain.LockOptions``, also importable from
:mod:`onnxstain._lock.pipeline`); :class:`PatchFound` and :class:`LockEdit` are what the search and edit stages
(:mod:`onnxstain._lock.search`, :mod:`onnxstain._lock.edit`) return.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from ..keys import WhiteBoxSection
from ..math import bounds
from ..patch import Patch


@dataclasses.dataclass
class LockOptions:
    kind: Literal["auto", "gate", "inplace", "shuffle"] = "auto"  # auto: shuffle where it locks the model, else gate
    layer: str | None = None
    detectors: int = 1
    fpr: float = 1e-6
    seed: int | None = None
    max_draws: int = 32  # only some random directions reach the margin from a small patch (in the bound)
    max_steps: int = 600
    occlusion_steps: int = 15  # occlusion-aware refinement of the patch (0: keep the plain patch)
    occlusion_lr: float = 8.0  # its step size (Adam on 0..255 pixels; tools/lock_refine.py measures it)
    providers: list[str] | None = None
    batch: int = 32


@dataclasses.dataclass
class LockResult:
    output: Path
    kind: str
    key_path: Path
    record_path: Path
    host: str
    detectors: int
    patch_box: tuple[int, int, int, int]  # top, left, height, width in the model input
    input_hw: tuple[int, int]  # the model input's height and width the lock was made at
    bound: bounds.Bound
    threshold: float
    trigger_scores: list[float]
    natural_max_score: float
    natural_firings: int
    natural_samples: int
    locked_agreement: float
    unlocked_agreement: float  # with the patch's signal, vs the original, on clean calibration images (gate: 1)
    chance: float
    flipped_features: int
    calibration_images: int
    draws: int
    search_steps: int
    timings: dict[str, float]
    notes: list[str]
    model_sha256: str
    occlusion: dict[str, float] | None = None  # occlusion-aware refinement: steps, KL at start and end
    kappa: float | None = None  # two answers (two classes, one logit): Cohen's kappa of the locked answers
    packed_detector: bool = False  # a packed YOLO-style output (int8 keeps its gate lock only dynamically)
    metric: str = "top-1"  # what the agreements measure: "top-1" or "correlation" (dense outputs: mean Pearson)
    blocks: int | None = None  # a shuffle lock: the channel blocks it reorders
    gap: float | None = None  # ... and the smallest gap between its patch's sort keys, in pixel levels


@dataclasses.dataclass
class PatchFound:
    """The search's answer: the detectors' directions ``[d, m]``, the 8-bit patch, its scores ``[d]`` at the
    lock position, the natural scores of the accepted draw, and what the search cost."""

    dirs: np.ndarray
    patch: Patch
    scores: np.ndarray
    natural: np.ndarray
    draws: int
    steps: int
    occlusion: dict[str, float] | None = None


@dataclasses.dataclass
class LockEdit:
    """The edit's answer: the locked model, how the key reads its detector, and what the lock did."""

    model: onnx.ModelProto
    white_box: WhiteBoxSection
    info: dict[str, Any]  # the key's lock section fields particular to this kind
    locked_agreement: float
    chance: float
    flipped: int
    kappa: float | None = None  # two answers: Cohen's kappa of the locked answers with the original's
