"""The lock audit's result: what it measured, the thresholds it judged by, and the report's JSON form.

:func:`onnxstain._report.lock_audit.audit_lock` fills it; :mod:`onnxstain._report.lock_html` renders it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..math import bounds
from .evaluate import ImageSetInfo

REPORT_FORMAT = "onnxstain-lock-audit"
REPORT_VERSION = 1
SLACK = 0.02  # "locked" means top-1 agreement with the original at most chance + 2 points
KAPPA_LOCKED = 0.1  # two answers (two classes, one logit): "locked" means |kappa| with the original ≤ this
EXACT = 0.999  # "the lock is exact" means agreement on the same patched images of at least this
PATCH_COST = 0.95  # target agreement (centre crops) of the unlocked model with the original on clean images
LOCKED_CORRELATION = 0.5  # dense outputs: "locked" means a mean output-map correlation below this
LOCKED_MAP = 0.05  # detectors: "locked" means a mean per-image anchor-level mAP of at most this


@dataclasses.dataclass
class Condition:
    """Measured: top-1 agreement of one model/input pairing with a reference, and how often the lock opened."""

    name: str
    description: str
    images: int
    agreement: float
    centre_agreement: float | None  # on the centre crops only (view 0), when the set has them
    unlocked: float | None  # fraction of images where the lock opened at all (gate signal > 0; white-box)
    mean_gate: float | None  # mean gate signal γ (0 locked, 1 fully open; white-box)
    max_abs_delta: float | None
    expect: str  # "locked", "exact" or "close"
    passed: bool
    # two answers: Cohen's kappa of this condition's answers with the original's on the clean images (0: independent;
    # a model that answers the opposite, kappa −1, is the original relabelled, not locked)
    kappa: float | None = None


@dataclasses.dataclass
class NaturalFirings:
    """Measured: the detectors' AND at every (image, position) sample of the clean images."""

    detectors: int
    positions: int
    samples: int
    firings: int
    images_firing: int
    max_weakest_score: float  # max over samples of the weakest detector's score
    threshold: float


@dataclasses.dataclass
class LockAuditRecord:
    """What the audit measured (:func:`onnxstain._report.lock_audit.audit_lock`); its JSON form is :meth:`report`."""

    original: str
    locked: str
    original_sha256: str
    locked_sha256: str
    key_commitment: str
    lock_kind: str
    host: str
    patch_box: tuple[int, int, int, int]
    classes: int
    chance: float
    images: ImageSetInfo
    centre_crops: int
    conditions: list[Condition]
    firings: NaturalFirings | None
    key_bound: bounds.Bound
    data_driven_bound: bounds.Bound | None
    measured_upper: float | None
    measured_statement: str | None
    notes: list[str]
    timings: dict[str, float]
    metric: str = "top-1"  # "top-1" agreement or "correlation" (mean Pearson of output maps, dense outputs)

    @property
    def two_answers(self) -> bool:
        """Whether "locked" was judged by kappa (a classifier with two answers: the conditions carry it)."""
        return any(c.kappa is not None for c in self.conditions)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.conditions)

    def condition(self, name: str) -> Condition:
        return next(c for c in self.conditions if c.name == name)

    def report(self) -> dict[str, Any]:
        """The JSON report (``onnxstain-lock-audit``), before numpy values and non-finite floats are made plain."""
        def opt(b: bounds.Bound | None) -> dict[str, Any] | None:
            return None if b is None else {"type": "bound", **b.to_dict()}

        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "original": {"path": self.original, "sha256": self.original_sha256},
            "locked": {"path": self.locked, "sha256": self.locked_sha256},
            "key": {"commitment": self.key_commitment, "kind": self.lock_kind, "host": self.host,
                    "patch_box": list(self.patch_box)},
            "classes": self.classes,
            "metric": self.metric,
            "chance": self.chance,
            "images": dataclasses.asdict(self.images),
            "centre_crops": self.centre_crops,
            "conditions": [{"type": "measurement", **dataclasses.asdict(c)} for c in self.conditions],
            "natural_firings": None if self.firings is None else {"type": "measurement",
                                                                  **dataclasses.asdict(self.firings)},
            "bounds": {"key": opt(self.key_bound), "data_driven": opt(self.data_driven_bound),
                       "measured_upper": self.measured_upper, "measured_statement": self.measured_statement},
            "passed": self.passed,
            "notes": list(self.notes),
            "timings": dict(self.timings),
        }
