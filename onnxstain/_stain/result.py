"""What a stain is asked for (:class:`StainOptions`, checked before any work) and what it reports
(:class:`StainResult`). Both are public (``onnxstain.StainOptions``, ``onnxstain.StainResult``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from ..errors import BadInputError
from ..math import bounds
from ..seeds import check_seed

Mode = Literal["inplace", "insert"]
Variant = Literal["auto", "non-additive", "additive"]


@dataclasses.dataclass
class StainOptions:
    mode: Mode = "inplace"
    variant: Variant = "auto"  # in place: additive where the route allows it (see job.resolve_variant)
    layer: str | None = None
    channel: int | None = None
    signature_class: int | None = None
    seed: int | None = None
    fpr: float = 1e-9
    max_draws: int = 8
    max_steps: int = 400
    providers: list[str] | None = None
    batch: int = 32
    chance: float | None = None  # black-box chance target (None: max(fpr, chance.CHANCE_FLOOR))

    def check(self) -> None:
        """Refuse options out of their range, one line each (``BadInputError``)."""
        if self.mode not in ("inplace", "insert"):
            raise BadInputError(f"unknown mode {self.mode!r}")
        if self.variant not in ("auto", "non-additive", "additive"):
            raise BadInputError(f"unknown variant {self.variant!r}")
        if not 0 < self.fpr < 1:
            raise BadInputError("--fpr must be between 0 and 1")
        if self.chance is not None and not 0 < self.chance < 1:
            raise BadInputError("--chance must be between 0 and 1")
        check_seed(self.seed)


@dataclasses.dataclass
class StainResult:
    output: Path
    key_path: Path
    record_path: Path
    host: str
    channel: int | None
    mode: str
    variant: str
    bound: bounds.Bound
    threshold: float
    trigger_score: float
    signature_type: str  # "class" (class wins by a margin) or "shift" (scores move as predicted)
    signature_class: int
    signature_margin: float
    natural_max_score: float
    natural_firings: int
    natural_samples: int
    calibration_images: int
    agreement: float
    max_abs_delta: float
    draws: int
    search_steps: int
    timings: dict[str, float]
    notes: list[str]
    model_sha256: str
    signature_label: int | None = None  # detectors: the label shown at anchor ``signature_class``
    triggers: int = 1  # triggers of the signature (several: each its own class; see math/chance.py)
    signature_classes: list[int] = dataclasses.field(default_factory=list)
    chance_log10: float | None = None  # black-box chance: log10 ∏ 1/|A_t| (None: the class was fixed)
    chance_text: str | None = None
