"""The key file's schema: one frozen record per section, read with every field checked.

The sections (see README "Key file"):

* ``model`` — the source and output models' SHA-256, the input, the scores output and its layout;
* ``preprocessing`` — :class:`onnxstain.preprocess.Preprocessing`;
* ``host`` — the layer the detector reads (geometry, positions, the lock position);
* ``detector`` — direction(s), centre, thresholds, the trigger's scores and radii, draws;
* ``trigger`` — the 8-bit trigger (stain) or patch and its position (lock) as a PNG;
* ``signature`` — what the trigger makes the stained model output (stain keys);
* ``white_box`` — the tensor and channel of the detector's signal;
* ``references`` — the original model's scores on seeded reference images (lock keys);
* ``lock`` and ``occlusion`` — what the lock changed and measured (lock keys);
* ``bound`` — :class:`onnxstain.math.bounds.Bound`; ``calibration`` — the calibration set's statistics.

:meth:`KeyBody.from_dict` refuses with a :class:`onnxstain.fields.FieldError` naming the field;
:meth:`KeyBody.to_dict` gives back the JSON object (keys written before ``schema_version`` existed read
and write without it, so their commitment is unchanged).
"""

# ruff: noqa: RUF009  -- every field is a dataclasses.field built by fields.spec (checker in its metadata)

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from typing import Any, ClassVar, Self

import numpy as np

from .fields import (
    F8,
    PROBABILITY,
    Array,
    Custom,
    FieldError,
    Int,
    Ints,
    Nested,
    Num,
    NumMap,
    Record,
    Str,
    fail,
    spec,
)
from .math import bounds
from .preprocess import Preprocessing

KEY_FORMAT = "onnxstain-key"
KEY_VERSION = 1  # the file format's generation: a reader of version 1 reads these keys
SCHEMA_VERSION = 1  # the typed schema of key version 1 (absent in keys written before it was recorded)
SUPPORTED_SCHEMA_VERSIONS = (1,)

SHA256 = Str(pattern="[0-9a-f]{64}")
ANY_STR = Str(pattern="(?s).*")  # a string, possibly empty
_UINT31 = 2**31 - 1


def _png_reader(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise FieldError(path, f"is {type(value).__name__}, not a base64 PNG string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(path, "is not valid base64") from None
    if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        raise FieldError(path, "is not a PNG image")
    return value


def decode_png(data: str, path: str = "trigger.png", size: tuple[int, int] | None = None) -> np.ndarray:
    """The base64 PNG as uint8 RGB ``[H, W, 3]`` (a :class:`FieldError` if it does not decode, or if its
    ``(height, width)`` is not ``size``, checked before the pixels are decoded)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            if size is not None and (img.height, img.width) != size:
                raise FieldError(path, f"is a {img.height}x{img.width} image; the key says {size[0]}x{size[1]}")
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FieldError:
        raise
    except Exception:  # PIL raises many kinds on a corrupt image (decompression bombs included)
        raise FieldError(path, "is not a readable PNG image") from None


def _preprocessing_reader(value: Any, path: str) -> Preprocessing:
    return Preprocessing.read(value, path, complete=True)


def _bound_reader(value: Any, path: str) -> bounds.Bound:
    if not isinstance(value, dict):
        raise FieldError(path, f"is {type(value).__name__}, not an object")
    allowed = {"value", "log10", "kind", "params", "statement"}
    for name in sorted(set(value) - allowed):
        raise FieldError(f"{path}.{name}", "is not a known field")
    for name in sorted(allowed - set(value)):
        raise FieldError(f"{path}.{name}", "is missing")
    PROBABILITY.read(value["value"], f"{path}.value")
    log10 = value["log10"]
    if log10 != "-inf":
        Num(hi=0.0).read(log10, f"{path}.log10")
    Str(choices=bounds.KINDS).read(value["kind"], f"{path}.kind")
    ANY_STR.read(value["statement"], f"{path}.statement")
    params = value["params"]
    if not isinstance(params, dict):
        raise FieldError(f"{path}.params", f"is {type(params).__name__}, not an object")
    for k, v in params.items():
        if not (v is None or isinstance(v, str | int | float | list)):
            raise FieldError(f"{path}.params.{k}", f"is a {type(v).__name__}, not a number, string or list")
    try:
        return bounds.Bound.from_dict(value)
    except (TypeError, ValueError) as exc:
        raise FieldError(path, f"is inconsistent: {exc}") from None


def _overwritten(value: Any, path: str) -> tuple[tuple[str, int, str], ...]:
    """The in-place lock's overwritten channels: ``[layer, channel, role]`` rows."""
    if not isinstance(value, list):
        raise FieldError(path, f"is {type(value).__name__}, not a list")
    rows = []
    for i, row in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(row, list) or len(row) != 3:
            raise FieldError(where, "is not a [layer, channel, role] row")
        rows.append((Str().read(row[0], f"{where}[0]"), Int(lo=0).read(row[1], f"{where}[1]"),
                     Str().read(row[2], f"{where}[2]")))
    return tuple(rows)


def _rows(value: tuple[tuple[Any, ...], ...]) -> list[list[Any]]:
    return [list(row) for row in value]


# -- sections ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScoreViewSection(Record):
    """How the raw scores become signature scores: per-sample shape, and a detector's label."""

    shape: tuple[int, ...] = spec(Ints(lo=1, min_length=1, max_length=2))
    label: int | None = spec(Int(lo=0, nullable=True))
    # a sequence head's step (row of the (steps, classes) scores) the signature is read at; added since
    step: int | None = spec(Int(lo=0, nullable=True), optional=True)

    def check(self, path: str) -> None:
        if self.label is not None and (len(self.shape) != 2 or self.label >= self.shape[1]):
            fail(f"{path}.label", f"is {self.label}, not a label of scores shaped {list(self.shape)}")
        if self.step is not None and (len(self.shape) != 2 or self.label is not None or self.step >= self.shape[0]):
            fail(f"{path}.step", f"is {self.step}, not a step of sequence scores shaped {list(self.shape)}")


@dataclasses.dataclass(frozen=True)
class ModelSection(Record):
    source_sha256: str = spec(SHA256)
    output_sha256: str = spec(SHA256)
    input: str = spec(Str())
    scores: str = spec(Str())
    classes: int = spec(Int(lo=1))
    score_view: ScoreViewSection | None = spec(Nested(ScoreViewSection), optional=True)
    # a detector's (anchors, labels); written (null for a classifier) unless the output is a map
    layout: tuple[int, ...] | None = spec(Ints(lo=1, length=2), optional=True,
                                          write_null=lambda s: s.dense_shape is None)
    dense_shape: tuple[int, ...] | None = spec(Ints(lo=1, min_length=1, max_length=4), optional=True)
    # a detector's first label column and what its label columns hold; absent: 1 (column 0 is the background)
    # and logits. A packed YOLO-style output [N, anchors, 4 + k]: 4, and "probabilities" after a Sigmoid
    label_offset: int | None = spec(Int(lo=0), optional=True)
    label_scores: str | None = spec(Str(choices=("logits", "probabilities")), optional=True)
    # "anchors_last": the raw scores are laid out [labels, anchors] per sample (YOLOv8's packed output); the
    # layout above stays (anchors, labels). Absent: anchors first
    label_layout: str | None = spec(Str(choices=("anchors_last",)), optional=True)
    # the squashing of a classifier's output (verify reads margins as logits); null: the scores themselves
    output_activation: str | None = spec(Str(choices=("softmax", "sigmoid")), optional=True)

    def check(self, path: str) -> None:
        sv = self.score_view
        if sv is not None:
            if sv.step is not None:
                want = sv.shape[1]
            else:
                want = sv.shape[0] if sv.label is not None else int(np.prod(sv.shape))
            if want != self.classes:
                fail(f"{path}.classes", f"is {self.classes}; the score view {list(sv.shape)} gives {want}")


@dataclasses.dataclass(frozen=True)
class HostSection(Record):
    name: str = spec(Str())
    op: str = spec(Str())
    input: str = spec(Str())
    m: int = spec(Int(lo=1))
    positions: int = spec(Int(lo=1))
    selected_positions: tuple[int, ...] = spec(Ints(lo=0, min_length=1))
    kernel: tuple[int, ...] = spec(Ints(lo=1, min_length=1, max_length=3))
    strides: tuple[int, ...] = spec(Ints(lo=1, min_length=1, max_length=3))
    pads: tuple[int, ...] = spec(Ints(lo=0, min_length=2, max_length=6))
    dilations: tuple[int, ...] = spec(Ints(lo=1, min_length=1, max_length=3))
    groups: int = spec(Int(lo=1))
    out_hw: tuple[int, ...] | None = spec(Ints(lo=1, length=2, nullable=True))
    # stain keys: the tapped tensor and channel, the host's own channel (in place), its group
    output: str | None = spec(Str(), optional=True)
    channel: int | None = spec(Int(lo=0), optional=True)
    host_channel: int | None = spec(Int(lo=0), optional=True, write_null=lambda s: s.output is not None)
    group: int | None = spec(Int(lo=0), optional=True)
    activation: str | None = spec(Str(), optional=True)  # dense (token) hosts
    # lock keys: the output position (row, column) the lock reads; dense locks: the detector's positions
    lock_position: tuple[int, ...] | None = spec(Ints(lo=0, length=2), optional=True)
    detector_positions: tuple[int, ...] | None = spec(Ints(lo=0, min_length=1), optional=True)

    def check(self, path: str) -> None:
        for name in ("selected_positions", "detector_positions"):
            values = getattr(self, name) or ()
            if values and max(values) >= self.positions:
                fail(f"{path}.{name}", f"has position {max(values)}; the host has {self.positions}")
        n = len(self.kernel)
        for name in ("strides", "dilations"):
            if len(getattr(self, name)) != n:
                fail(f"{path}.{name}", f"has {len(getattr(self, name))} values; the kernel has {n} dimensions")
        if len(self.pads) != 2 * n:
            fail(f"{path}.pads", f"has {len(self.pads)} values; the kernel's {n} dimensions need {2 * n}")
        if self.group is not None and self.group >= self.groups:
            fail(f"{path}.group", f"is {self.group}; the host has {self.groups} group(s)")
        if self.lock_position is not None and self.out_hw is not None and any(
                p >= s for p, s in zip(self.lock_position, self.out_hw, strict=True)):
            fail(f"{path}.lock_position", f"{list(self.lock_position)} is outside the host's output "
                                          f"{list(self.out_hw)}")


@dataclasses.dataclass(frozen=True)
class DetectorSection(Record):
    centre: F8 = spec(Array(ndim=1))
    threshold: float = spec(Num())
    tau0: float = spec(Num(positive=True))
    trigger_scores: F8 = spec(Array(ndim=1))
    draws: int = spec(Int(lo=0))
    max_draws: int = spec(Int(lo=1))
    direction: F8 | None = spec(Array(ndim=1), optional=True)  # a stain's one direction
    directions: F8 | None = spec(Array(ndim=2), optional=True)  # a lock's detectors, one row each
    detectors: int | None = spec(Int(lo=1), optional=True)
    s_star: float | None = spec(Num(), optional=True)
    gain: float | None = spec(Num(), optional=True)
    delta: float | None = spec(Num(), optional=True)
    offset: float | None = spec(Num(), optional=True)
    trigger_radii: F8 | None = spec(Array(ndim=1, nonneg=True), optional=True)

    def check(self, path: str) -> None:
        if (self.direction is None) == (self.directions is None):
            fail(f"{path}.direction", "and detector.directions: a key has exactly one of them")
        if self.draws > self.max_draws:
            fail(f"{path}.draws", f"is {self.draws}, above max_draws {self.max_draws}")
        m = self.centre.shape[0]
        if self.direction is not None and self.direction.shape != (m,):
            fail(f"{path}.direction", f"has shape {list(self.direction.shape)}; the centre has {m} values")
        if self.directions is not None:
            d = self.directions.shape[0]
            if self.directions.shape[1] != m:
                fail(f"{path}.directions", f"has shape {list(self.directions.shape)}; the centre has {m} values")
            if self.detectors is not None and self.detectors != d:
                fail(f"{path}.detectors", f"is {self.detectors}; directions has {d} rows")


@dataclasses.dataclass(frozen=True)
class TriggerSection(Record):
    png: str = spec(Custom(_png_reader, str))
    height: int = spec(Int(lo=1))
    width: int = spec(Int(lo=1))
    top: int | None = spec(Int(lo=0), optional=True)  # a lock's patch position
    left: int | None = spec(Int(lo=0), optional=True)

    def pixels(self) -> np.ndarray:
        return decode_png(self.png)

    def check(self, path: str) -> None:
        if (self.top is None) != (self.left is None):
            fail(f"{path}.{'top' if self.top is None else 'left'}", "is missing")
        decode_png(self.png, f"{path}.png" if path else "png", (self.height, self.width))


@dataclasses.dataclass(frozen=True)
class SignatureTrigger(Record):
    """One trigger of a multi-trigger class signature (few-class models): its class, detector and image."""

    cls: int = spec(Int(lo=0), name="class")
    allowed: int = spec(Int(lo=1))  # size of the set the class was drawn from
    expected_margin: float = spec(Num())
    threshold: float = spec(Num(positive=True))  # verify divides each trigger's margin by it
    original_margin: float = spec(Num())
    png: str = spec(Str())
    direction: F8 = spec(Array(ndim=1))
    trigger_scores: F8 = spec(Array(ndim=1))
    trigger_radii: F8 = spec(Array(ndim=1, nonneg=True))
    s_star: float = spec(Num())
    draws: int = spec(Int(lo=1))
    white_box_channel: int = spec(Int(lo=0))


def _triggers(value: Any, path: str) -> tuple[SignatureTrigger, ...]:
    if not isinstance(value, list) or not value:
        raise FieldError(path, "is not a non-empty list of triggers")
    return tuple(SignatureTrigger.from_dict(v, f"{path}[{i}]") for i, v in enumerate(value))


def _trigger_rows(value: tuple[SignatureTrigger, ...]) -> list[dict[str, Any]]:
    return [t.to_dict() for t in value]


@dataclasses.dataclass(frozen=True)
class SignatureSection(Record):
    cls: int = spec(Int(lo=-1), name="class")
    expected_margin: float = spec(Num())
    threshold: float = spec(Num())
    original_margin: float = spec(Num())
    type: str | None = spec(Str(choices=("class", "shift", "pattern", "multi-class")), optional=True)
    original: F8 | None = spec(Array(ndim=1), optional=True)  # shift signatures
    expected: F8 | None = spec(Array(ndim=1), optional=True)
    # the stained model's scores on the synthetic controls (verify's drift gate); added since, absent from older keys
    controls: F8 | None = spec(Array(ndim=2), optional=True)
    pattern_seed: int | None = spec(Int(lo=0, hi=2**32 - 1), optional=True)  # pattern signatures
    block: int | None = spec(Int(lo=1), optional=True)
    amplitude: float | None = spec(Num(), optional=True)
    # class signatures: the black-box chance (math/chance.py); multi-class: every trigger
    allowed: int | None = spec(Int(lo=1), optional=True)
    chance_log10: float | None = spec(Num(hi=0.0), optional=True)
    chance_target: float | None = spec(Num(lo=0.0, hi=1.0), optional=True)
    triggers: tuple[SignatureTrigger, ...] | None = spec(Custom(_triggers, _trigger_rows), optional=True)

    @property
    def kind(self) -> str:
        return self.type or "class"

    def check(self, path: str) -> None:
        need = {"shift": ("original", "expected"), "pattern": ("pattern_seed", "block"),
                "multi-class": ("triggers",)}.get(self.kind, ())
        for name in need:
            if getattr(self, name) is None:
                fail(f"{path}.{name}", f"is missing (a {self.kind} signature needs it)")
        if self.kind == "shift" and self.original and self.expected and self.original.shape != self.expected.shape:
            fail(f"{path}.expected", f"has shape {list(self.expected.shape)}; original has "
                                     f"{list(self.original.shape)}")
        if self.kind == "shift" and self.controls is not None and self.original is not None and (
                self.controls.shape[1:] != self.original.shape):
            fail(f"{path}.controls", f"has shape {list(self.controls.shape)}; original has "
                                     f"{list(self.original.shape)}")
        if self.kind != "pattern" and self.cls < 0:
            fail(f"{path}.class", f"is {self.cls}, not a class")


@dataclasses.dataclass(frozen=True)
class WhiteBoxSection(Record):
    tensor: str = spec(Str())
    channel: int | None = spec(Int(lo=0, nullable=True))
    expected: float = spec(Num(positive=True))
    threshold: float | None = spec(Num(), optional=True)  # stain keys
    positions: tuple[int, ...] | None = spec(Ints(lo=0, min_length=1), optional=True)
    position: int | None = spec(Int(lo=0), optional=True, write_null=lambda s: s.positions is None)  # lock keys
    # in-place stain keys since the weight check (absent from older keys): the host channel's row in the original
    # model (effective, over the neuron inputs) and the host layer's channel count
    original_row: F8 | None = spec(Array(ndim=1), optional=True)
    channels: int | None = spec(Int(lo=1), optional=True)


@dataclasses.dataclass(frozen=True)
class ReferencesSection(Record):
    count: int = spec(Int(lo=1, hi=4096))
    seed: int = spec(Int(lo=0, hi=_UINT31))
    patched_scores: F8 = spec(Array())
    unpatched_scores: F8 = spec(Array())
    metric: str | None = spec(Str(choices=("correlation",)), optional=True)

    def check(self, path: str) -> None:
        for name in ("patched_scores", "unpatched_scores"):
            arr = getattr(self, name)
            if len(arr.shape) < 2 or arr.shape[0] != self.count or arr.size == 0:
                fail(f"{path}.{name}", f"has shape {list(arr.shape)}; {self.count} reference images need "
                                       f"[{self.count}, ...]")
        if self.patched_scores.shape != self.unpatched_scores.shape:
            fail(f"{path}.unpatched_scores", f"has shape {list(self.unpatched_scores.shape)}; patched_scores has "
                                             f"{list(self.patched_scores.shape)}")


_AGREEMENT = Num(lo=-1.0, hi=1.0)  # top-1 / mAP in [0, 1]; a mean Pearson correlation in [-1, 1]


@dataclasses.dataclass(frozen=True)
class LockSection(Record):
    calibration_locked_agreement: float = spec(_AGREEMENT)
    calibration_unlocked_agreement: float = spec(_AGREEMENT)
    chance: float = spec(PROBABILITY)
    flipped_features: int | None = spec(Int(lo=0), optional=True)  # gate lock on a classifier / dense map
    flipped_channels: int | None = spec(Int(lo=0), optional=True)  # gate lock on a detector
    gated: str | None = spec(Str(), optional=True)
    agreement_metric: str | None = spec(Str(), optional=True)
    gated_tensor: str | None = spec(Str(), optional=True)
    metric: str | None = spec(Str(), optional=True)
    gamma: float | None = spec(Num(), optional=True)  # in-place (conduit) lock
    head_feature: int | None = spec(Int(lo=0), optional=True)
    disruption_spread: float | None = spec(Num(), optional=True)
    overwritten: tuple[tuple[str, int, str], ...] | None = spec(Custom(_overwritten, _rows), optional=True)


@dataclasses.dataclass(frozen=True)
class ShuffleSection(Record):
    """A shuffle lock: the Conv whose output channels are stored out of order, and the order the patch puts back."""

    layer: str = spec(Str())
    tensor: str = spec(Str())  # what is read back in order: the layer's activated output (or its output)
    window: str = spec(Str())  # the tensor whose top-left corner the sort reads (the first Conv's input)
    side: int = spec(Int(lo=1))
    channels: int = spec(Int(lo=1))
    blocks: int = spec(Int(lo=2))
    group: int = spec(Int(lo=1))
    order: tuple[int, ...] = spec(Ints(lo=0, min_length=2))  # σ⁻¹: the sorted corner coordinates the patch gives
    gap: float = spec(Num(lo=0.0))  # the patch's smallest gap between consecutive sort keys, in pixel levels
    row_sums: F8 = spec(Array(ndim=1))  # the original layer's row sums, channel by channel (the white box's check)

    def check(self, path: str) -> None:
        if self.row_sums.shape[0] != self.channels:
            fail(f"{path}.row_sums", f"has {self.row_sums.shape[0]} values; the layer has {self.channels} channels")
        if len(self.order) != self.blocks or sorted(self.order) != list(range(self.blocks)):
            fail(f"{path}.order", f"is not an order of the {self.blocks} blocks")
        if self.blocks * self.group > self.channels:
            fail(f"{path}.group", f"is {self.group}: {self.blocks} blocks of it exceed the {self.channels} channels")


@dataclasses.dataclass(frozen=True)
class OcclusionSection(Record):
    steps: int = spec(Int(lo=0))
    kl_start: float = spec(Num())
    kl_end: float = spec(Num())


@dataclasses.dataclass(frozen=True)
class CalibrationSection(Record):
    images: int = spec(Int(lo=1))
    samples: int = spec(Int(lo=1))
    max_radius: float = spec(Num(lo=0.0))
    radius: float = spec(Num(positive=True))
    radius_quantiles: dict[str, float] = spec(NumMap(lo=0.0, keys=r"\d+(\.\d+)?"))
    natural_max_score: float = spec(Num())
    natural_firings: int = spec(Int(lo=0))
    fpr_target: float = spec(Num(positive=True, hi=1.0))

    @classmethod
    def of(cls, stats: Any, images: int, radius: float, natural_scores: np.ndarray, natural_firings: int,
           fpr_target: float) -> CalibrationSection:
        """From the calibration set's feature statistics (a :class:`onnxstain.math.detector.FeatureStats`)."""
        return cls(images=images, samples=stats.samples, max_radius=stats.max_radius, radius=radius,
                   radius_quantiles=stats.radius_quantiles, natural_max_score=float(np.max(natural_scores)),
                   natural_firings=natural_firings, fpr_target=fpr_target)


# -- the whole key -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KeyBody(Record):
    _what: ClassVar[str] = "a JSON object"

    format: str = spec(Str(choices=(KEY_FORMAT,)))
    version: int = spec(Int())
    kind: str = spec(Str(choices=("stain", "lock")))
    nonce: str = spec(Str(pattern="[0-9a-f]{16,}"))
    created: str = spec(ANY_STR)
    tool_version: str = spec(ANY_STR)
    model: ModelSection = spec(Nested(ModelSection))
    preprocessing: Preprocessing = spec(Custom(_preprocessing_reader, lambda p: p.to_dict()))
    mode: str = spec(Str(choices=("inplace", "insert", "gate", "shuffle")))
    variant: str = spec(Str(choices=("non-additive", "additive", "gate", "inplace", "shuffle")))
    seed: int = spec(Int(lo=0))
    host: HostSection = spec(Nested(HostSection))
    trigger: TriggerSection = spec(Nested(TriggerSection))
    white_box: WhiteBoxSection = spec(Nested(WhiteBoxSection))
    bound: bounds.Bound = spec(Custom(_bound_reader, lambda b: b.to_dict()))
    detector: DetectorSection | None = spec(Nested(DetectorSection), optional=True)  # not a shuffle lock's
    calibration: CalibrationSection | None = spec(Nested(CalibrationSection), optional=True)  # not a shuffle's
    signature: SignatureSection | None = spec(Nested(SignatureSection), optional=True)  # stain keys
    references: ReferencesSection | None = spec(Nested(ReferencesSection), optional=True)  # lock keys
    lock: LockSection | None = spec(Nested(LockSection), optional=True)
    occlusion: OcclusionSection | None = spec(Nested(OcclusionSection), optional=True,
                                              write_null=lambda s: s.kind == "lock" and s.mode != "shuffle")
    shuffle: ShuffleSection | None = spec(Nested(ShuffleSection), optional=True)
    schema_version: int | None = spec(Int(), optional=True)

    @classmethod
    def from_dict(cls, data: Any, path: str = "") -> Self:
        # the envelope first, so that a key of another format or version is named as such
        if isinstance(data, dict):
            if data.get("format") != KEY_FORMAT:
                raise FieldError("format", "is missing or wrong: not an onnxstain key")
            if data.get("version") != KEY_VERSION:
                raise FieldError("version", f"is {data.get('version')!r}; this onnxstain reads key version "
                                            f"{KEY_VERSION}")
            sv = data.get("schema_version", SCHEMA_VERSION)
            if sv not in SUPPORTED_SCHEMA_VERSIONS:
                raise FieldError("schema_version", f"is {sv!r}; this onnxstain reads "
                                                   f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}")
        return super().from_dict(data, path)

    def check(self, path: str) -> None:
        lock = self.kind == "lock"
        for name in ("references", "lock") if lock else ("signature",):
            if getattr(self, name) is None:
                fail(name, f"is missing (a {self.kind} key needs it)")
        for name in ("signature",) if lock else ("references", "lock", "occlusion"):
            if getattr(self, name) is not None:
                fail(name, f"is not a field of a {self.kind} key")
        modes = {"stain": (("inplace", "insert"), ("non-additive", "additive")),
                 "lock": (("gate", "inplace", "shuffle"), (self.mode,))}[self.kind]
        if self.mode not in modes[0]:
            fail("mode", f"is {self.mode!r}, not one of {', '.join(modes[0])} (a {self.kind} key)")
        if self.variant not in modes[1]:
            fail("variant", f"is {self.variant!r}, not one of {', '.join(modes[1])} (a {self.kind} {self.mode} key)")
        if self.model.dense_shape is not None and self.model.layout is not None:
            fail("model.layout", "is not a field of a dense-output key")
        shuffled = self.mode == "shuffle"
        for name in ("detector", "calibration", "occlusion") if shuffled else ("detector", "calibration"):
            if shuffled and getattr(self, name) is not None:
                fail(name, "is not a field of a shuffle lock's key")
            if not shuffled and getattr(self, name) is None:
                fail(name, f"is missing (a {self.kind} {self.mode} key needs it)")
        if shuffled != (self.shuffle is not None):
            fail("shuffle", "is missing (a shuffle lock's key needs it)" if shuffled else
                 f"is not a field of a {self.kind} {self.mode} key")
        self._check_detector()
        self._check_trigger()
        self._check_white_box()
        if self.signature is not None:
            self._check_signature(self.signature)

    def _check_detector(self) -> None:
        det, host = self.detector, self.host
        if det is None:
            return
        m = det.centre.shape[0]
        if m != host.m:
            fail("detector.centre", f"has {m} values; the host's detector reads m = {host.m}")
        if self.kind == "stain" and (det.direction is None or det.trigger_radii is None):
            fail(f"detector.{'direction' if det.direction is None else 'trigger_radii'}",
                 "is missing (a stain key needs it)")
        if self.kind == "lock" and det.directions is None:
            fail("detector.directions", "is missing (a lock key needs it)")
        if det.direction is not None:  # a stain: one score and radius per host position
            for name in ("trigger_scores", "trigger_radii"):
                arr = getattr(det, name)
                if arr is not None and arr.shape[0] != host.positions:
                    fail(f"detector.{name}", f"has {arr.shape[0]} values; the host has {host.positions} positions")
        elif det.directions is not None and det.trigger_scores.shape[0] != det.directions.shape[0]:
            fail("detector.trigger_scores", f"has {det.trigger_scores.shape[0]} values; there are "
                                            f"{det.directions.shape[0]} detectors")

    def _check_trigger(self) -> None:
        t, pre = self.trigger, self.preprocessing
        if self.kind == "lock":
            if t.top is None or t.left is None:
                fail("trigger.top", "is missing (a lock key's patch has a position)")
            if t.top + t.height > pre.height or t.left + t.width > pre.width:
                fail("trigger", f"patch {t.height}x{t.width} at ({t.top}, {t.left}) lies outside the "
                                f"{pre.height}x{pre.width} input")
        elif (t.height, t.width) != (pre.height, pre.width):
            fail("trigger.height", f"and width are {t.height}x{t.width}; the input is {pre.height}x{pre.width}")

    def _check_white_box(self) -> None:
        wb = self.white_box
        if wb.position is not None and wb.position >= self.host.positions:
            fail("white_box.position", f"is {wb.position}; the host has {self.host.positions} positions")
        if wb.positions is not None and max(wb.positions) >= self.host.positions:
            fail("white_box.positions", f"has position {max(wb.positions)}; the host has {self.host.positions}")
        if self.kind == "stain" and (wb.threshold is None or wb.positions is None or wb.channel is None):
            missing = "threshold" if wb.threshold is None else "positions" if wb.positions is None else "channel"
            fail(f"white_box.{missing}", "is missing (a stain key needs it)")

    def _check_signature(self, sig: SignatureSection) -> None:
        classes = self.model.classes
        if sig.kind == "class" and sig.cls >= classes:
            fail("signature.class", f"is {sig.cls}; the model has {classes} scores")
        if sig.kind == "shift" and sig.original is not None and sig.original.shape[0] != classes:
            fail("signature.original", f"has {sig.original.shape[0]} values; the model has {classes} scores")
        dense_shape = self.model.dense_shape
        if sig.kind == "pattern" and dense_shape is None:
            fail("model.dense_shape", "is missing (a pattern signature needs the output map's shape)")
        if sig.kind == "pattern" and dense_shape is not None and len(dense_shape) != 3:
            fail("model.dense_shape", f"has {len(dense_shape)} values; a pattern signature's map is "
                                      "[channels, height, width]")
        pre, host = self.preprocessing, self.host
        for i, t in enumerate(sig.triggers or ()):  # each trigger of a multi-class signature, as the first
            where = f"signature.triggers[{i}]"
            if t.cls >= classes:
                fail(f"{where}.class", f"is {t.cls}; the model has {classes} scores")
            if t.direction.shape[0] != host.m:
                fail(f"{where}.direction", f"has {t.direction.shape[0]} values; the host's detector reads "
                                           f"m = {host.m}")
            for name in ("trigger_scores", "trigger_radii"):
                n = getattr(t, name).shape[0]
                if n != host.positions:
                    fail(f"{where}.{name}", f"has {n} values; the host has {host.positions} positions")
            decode_png(t.png, f"{where}.png", (pre.height, pre.width))


