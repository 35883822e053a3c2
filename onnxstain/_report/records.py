"""The evaluate report's records (measurements kept apart from bounds), their JSON form, and the
statements shared with the lock audit: the confidence of every data-driven statement and the
Clopper–Pearson sentence of a measured rate. :func:`onnxstain._report.evaluate.evaluate` fills them."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .._onnx.io import write_bytes_atomic
from ..math import bounds

REPORT_FORMAT = "onnxstain-evaluate-report"
REPORT_VERSION = 1

CONFIDENCE = 0.95


# -- result records ------------------------------------------------------------------------------------
@dataclasses.dataclass
class ImageSetInfo:
    """The natural images used, and what they allow statistically."""

    source: str
    images: int
    photos: int
    views_per_photo: int
    height: int
    width: int
    correlation: str


@dataclasses.dataclass
class DetectorStats:
    """Measured on the natural images: the detector's scores at every (image, position) sample."""

    threshold: float
    positions: int
    samples: int  # images × positions
    firings: int  # samples with S > τ
    images_firing: int  # images with S > τ at some position
    photos_firing: int
    max_score: float
    max_score_over_threshold: float
    max_score_image: int
    max_score_photo: str
    score_quantiles: dict[str, float]
    histogram_edges: list[float]
    histogram_counts: list[int]


@dataclasses.dataclass
class Coverage:
    """Measured: how much of the natural data lies inside the ball of radius R the ball bound assumes."""

    radius: float
    samples_inside: float  # fraction of (image, position) samples with ‖φ − c‖ ≤ R
    images_inside: float  # fraction of images with ‖φ − c‖ ≤ R at every position
    images_outside: int
    photos_outside: int
    max_radius: float
    max_radius_over_r: float
    radius_quantiles: dict[str, float]


@dataclasses.dataclass
class MeasuredRate:
    """A measurement (``rate``) and a one-sided Clopper–Pearson upper confidence bound on the true rate."""

    unit: str  # "image" or "photo"
    firing: int
    total: int
    rate: float
    upper: float
    confidence: float
    statement: str


@dataclasses.dataclass
class PhotoLevel:
    """The same statements with photos as the independent unit (views of one photo are correlated)."""

    photos: int
    data_driven: bounds.Bound
    mixed: bounds.Bound
    measured: MeasuredRate
    statement: str


@dataclasses.dataclass
class Fidelity:
    """Measured: the modified model against the original on the same images."""

    images: int
    agreement: float
    differing: int
    differing_fragile: int
    mean_kl: float
    max_kl: float
    max_abs_delta: float
    fragile_fraction: float
    fragile_margin: float
    metric: str = "top-1"  # "correlation" for dense outputs: agreement is then the mean Pearson correlation of
    # the output maps, "differing" counts maps correlating below 0.999, and KL/fragility do not apply (nan)
    min_correlation: float | None = None


@dataclasses.dataclass
class TriggerCheck:
    """The key's trigger through both models, and the verify decision."""

    selected_positions: list[int]
    threshold: float
    modified_scores: list[float] | None  # S at the selected positions (None: no host tensor)
    original_scores: list[float] | None
    modified_fires: bool | None  # S > τ at every selected position
    original_fires: bool | None
    key_scores: list[float]  # recorded in the key at stain time
    stained: bool
    signature_type: str
    signature_score: float
    signature_threshold: float
    original_stained: bool
    original_signature_score: float
    cross_key_bound: bounds.Bound
    checks: list[dict[str, Any]]


@dataclasses.dataclass
class EvaluateResult:
    original: str
    modified: str
    original_sha256: str
    modified_sha256: str
    key_commitment: str
    host: str
    mode: str
    variant: str
    m: int
    threshold: float
    images: ImageSetInfo
    detector: DetectorStats | None
    coverage: Coverage | None
    ball_bound: bounds.Bound
    data_driven_bound: bounds.Bound | None
    mixed_bound: bounds.Bound | None
    measured: MeasuredRate | None
    photo_level: PhotoLevel | None
    fidelity: Fidelity
    trigger: TriggerCheck
    white_box: bool
    notes: list[str]
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        def opt(b: bounds.Bound | None) -> dict[str, Any] | None:
            return None if b is None else {"type": "bound", **b.to_dict()}

        photo = None
        if self.photo_level is not None:
            pl = self.photo_level
            photo = {"photos": pl.photos, "data_driven": opt(pl.data_driven), "mixed": opt(pl.mixed),
                     "measured": {"type": "measurement", **dataclasses.asdict(pl.measured)},
                     "statement": pl.statement}
        trig = dataclasses.asdict(self.trigger)
        trig["cross_key_bound"] = opt(self.trigger.cross_key_bound)
        return json_safe({
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "original": {"path": self.original, "sha256": self.original_sha256},
            "modified": {"path": self.modified, "sha256": self.modified_sha256},
            "key": {"commitment": self.key_commitment, "host": self.host, "mode": self.mode,
                    "variant": self.variant, "m": self.m, "threshold": self.threshold},
            "images": dataclasses.asdict(self.images),
            "white_box": self.white_box,
            "detector": None if self.detector is None else {"type": "measurement",
                                                            **dataclasses.asdict(self.detector)},
            "coverage": None if self.coverage is None else {"type": "measurement",
                                                            **dataclasses.asdict(self.coverage)},
            "bounds": {
                "ball": opt(self.ball_bound),
                "data_driven": opt(self.data_driven_bound),
                "mixed": opt(self.mixed_bound),
                "measured": None if self.measured is None else {"type": "measurement",
                                                                **dataclasses.asdict(self.measured)},
                "photo_level": photo,
            },
            "fidelity": {"type": "measurement", **dataclasses.asdict(self.fidelity)},
            "trigger": trig,
            "notes": list(self.notes),
            "timings": dict(self.timings),
        })

    def write_json(self, path: str | Path) -> None:
        write_bytes_atomic(path, json.dumps(self.to_dict(), indent=2).encode() + b"\n")



def json_safe(obj: Any) -> Any:
    """Plain JSON: numpy scalars to Python, non-finite floats to "inf"/"-inf"/"nan"."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def clopper_statement(k: int, n: int, unit: str, upper: float) -> str:
    """The sentence of a measured firing rate ``k / n`` and its one-sided Clopper–Pearson upper bound."""
    lg = math.log10(upper) if upper > 0 else -math.inf
    return (f"Measured: {k} of {n} {unit}s fired (rate {k / n:.3g}). With probability ≥ {CONFIDENCE:g} over the "
            f"sample (if the {unit}s are independent draws from the same distribution), the true per-{unit} "
            f"firing rate of this key is ≤ {bounds.format_probability(lg)} (one-sided Clopper–Pearson).")
