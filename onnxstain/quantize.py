"""``quantize``: int8 a stained or locked model so that its mark and its accuracy survive.

onnxruntime's quantisers need two things they cannot know about a marked model:

* a **lock**'s gate must be open on some calibration images, or a static quantiser may set the gate's
  activation ranges from closed-gate images only and clip the open gate: the patch no longer unlocks the
  quantised model (measured on MobileNetV2 before the gate kept its open levels in range: 11.5 % of the
  quantised original with the patch). Gate locks written since 2026-12-07 keep them in range on any images
  (a constant channel at the open level beside the detectors; locked scores whose range holds the unlocked
  ones), but locks written before do not, and ranges fit to patched images suit the unlocked model best. The
  calibration set here carries the key's patch on every other image; a **shuffle** lock's on every image:
  its unpatched activations past the reordered layer are scrambled, wider than the model's own, and ranges
  that hold them round the unlocked model coarsely (MobileNetV2 static per channel, on clean photos: 89.7 % of
  the quantised original with the patch; patched photos: 98.7 %).
* a **stain**'s detector fires on its trigger far above anything natural images give: calibrated on
  natural images alone, the static quantiser clips the firing and the stain is gone (RapidOCR's direction
  classifier: in place and inserted both fail verify). The stain's triggers join the calibration images.
* an **in-place stain** writes a large classifier weight; one scale per tensor (the quantisers' default)
  then rounds every other weight of the classifier to a few codes (MobileNetV2: 7.7 % top-1 agreement
  against 74 % for the original). Weights are quantised per channel here, and a model older than opset 13
  is upgraded first (per-channel ``DequantizeLinear`` needs it; the quantiser writes an invalid model
  otherwise).

The mark is checked before the model is written; a model that lost it is refused, never written. A
stain: ``verify`` with the key. A lock: on the held-out natural photos, the quantised model with the
patch must agree with the float model with the patch on at least half more of the photos than the
quantised model without the patch does (opened − closed ≥ 0.5, the form of ``verify``'s lock score), or on a
head of few classes half the way from chance (opened − closed ≥ (1 − chance)/2: 0.25 on two answers, where a
lock that leaves the answers at chance closes at 50 %).
``verify``'s own lock check reads synthetic references whose top-1 margins are small: int8 rounding
flips many of them, so its verdict on a quantised lock is reported beside, not required. The report
gives the quantised model's top-1 agreement with the float model it came from (with the patch, for a
lock) on the held-out photos.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ._onnx import head as head_mod
from ._onnx.graph import GraphView
from ._onnx.head import decision_threshold
from ._onnx.inputs import settle_preprocessing
from ._onnx.io import load_model
from ._report.matching import OutputMatch
from .calibration import calibration_pixels
from .errors import BadInputError, MarkLostError
from .keys import Key, load_key
from .math.agreement import top1_agreement
from .math.detection_agreement import anchor_scores, per_image_anchor_map
from .naturalset import natural_images
from .outputs import Artefacts, OutputPlan, write_unit
from .patch import paste_pixels
from .preprocess import Preprocessing, PreprocessingRequest
from .progress import Progress, Silent
from .runtime import run_batches, session
from .stopwatch import Stopwatch
from .verify import VerifyResult, key_patch, key_triggers, verify

Judge = Callable[[np.ndarray, np.ndarray], np.ndarray]  # per image: how the outputs match (1: as the float model)
MODES = ("static", "dynamic")
CALIBRATION_VIEWS = 2  # the built-in calibration photos, two views each
PER_CHANNEL_OPSET = 13  # per-channel DequantizeLinear (its axis attribute) needs it


@dataclasses.dataclass
class QuantizeResult:
    output: Path
    mode: str  # static (QDQ) or dynamic
    per_channel: bool
    calibration_images: int  # 0 for dynamic
    patched_calibration_images: int  # a lock's: the calibration images that carry its patch
    trigger_calibration_images: int  # a stain's: its triggers, added to the calibration images
    verified: VerifyResult | None  # the quantised model against the key (None without a key)
    agreement: float  # agreement (``metric``) of the quantised model with the float model, on held-out photos
    agreement_images: int
    patched: bool  # the agreement images carry the lock's patch
    closed: float | None  # a lock's: the quantised model without the patch against the float model with it
    model_sha256: str
    timings: dict[str, float]
    notes: list[str]
    metric: str = "top-1"  # "top-1", "anchor mAP" (a detector's key) or "correlation" (a dense output's)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "onnxstain-quantize-report", "version": 1, "output": str(self.output),
                "mode": self.mode, "per_channel": self.per_channel, "calibration_images": self.calibration_images,
                "patched_calibration_images": self.patched_calibration_images,
                "trigger_calibration_images": self.trigger_calibration_images,
                "verified": None if self.verified is None else self.verified.to_dict(),
                "agreement": self.agreement, "agreement_images": self.agreement_images, "patched": self.patched,
                "closed": self.closed, "metric": self.metric,
                "model_sha256": self.model_sha256, "timings": self.timings, "notes": self.notes}


def quantize(
    model: str | Path,
    output: str | Path,
    key: Key | str | Path | None = None,
    *,
    mode: str = "static",
    per_channel: bool = True,
    images: str | Path | np.ndarray | None = None,
    preprocessing: Preprocessing | PreprocessingRequest | None = None,
    providers: list[str] | None = None,
    progress: Progress | None = None,
    artefacts: Artefacts | None = None,
) -> QuantizeResult:
    """Write ``model`` quantised to int8 at ``output`` (see the module's docstring); with ``key``, only if the
    quantised model still carries the key's stain or lock."""
    if mode not in MODES:
        raise BadInputError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    OutputPlan().model_input("MODEL", model).model_output("-o", output).check()
    prog = progress or Silent()
    clock = Stopwatch()
    loaded = load_model(model)
    key = load_key(key) if key is not None and not isinstance(key, Key) else key
    pre = key.preprocessing if key is not None else settle_preprocessing(loaded.model, loaded.path, preprocessing)[0]
    patch = key_patch(key) if key is not None and key.kind == "lock" else None
    calib = np.zeros((0, pre.height, pre.width, 3), np.uint8)
    triggers = 0
    if mode == "static":
        calib = (calibration_pixels(images, pre, prog) if images is not None else
                 natural_images("calibration", size=(pre.height, pre.width), views=CALIBRATION_VIEWS).pixels)
        if patch is not None:
            calib = calib.copy()
            every = 1 if key is not None and key.shuffle is not None else 2
            calib[::every] = paste_pixels(calib[::every], patch)
        elif key is not None:  # a stain's triggers set the ranges that its detector's firing passes through
            trigger_pixels = key_triggers(key)
            calib, triggers = np.concatenate([calib, trigger_pixels]), len(trigger_pixels)
    # the source model at the size it runs at (a dynamic size leaves shapes unknown): its head says which nodes
    # stay in float and how the quantised outputs are judged
    view = GraphView(loaded.model, pre.input_shape())
    clock.lap("load")
    with tempfile.TemporaryDirectory(prefix=".onnxstain-quantize-") as tmp:
        quantised = Path(tmp) / "model.int8.onnx"
        notes: list[str] = []
        source = _per_channel_source(loaded.model, loaded.path, Path(tmp), notes) if per_channel else loaded.path
        with prog.task(f"int8 {mode} quantisation", total=None):
            exclude = packed_tail(view) if mode == "static" else []
            if exclude:
                notes.append(f"{len(exclude)} nodes after the detector's last Conv layers (box decoding, sigmoids, "
                             "packing) stay in float: one int8 scale for boxes and probabilities would round the "
                             "probabilities away")
            _run_quantiser(source, quantised, mode, per_channel, pre.to_input(calib) if len(calib) else None,
                           exclude)
        clock.lap("quantise")
        result = onnx.load(quantised)
        _keep_fields(result, loaded.model)
        judge, metric = _judge(view, key)
        agree, closed, n = _agreement(loaded.path, result, pre, patch, judge, providers)
        clock.lap("agreement")
        checked = None
        if key is not None:
            onnx.save(result, quantised)
            checked = verify(quantised, key, providers=providers)
            _check_mark(key, checked, mode, agree, closed, n, notes)
        clock.lap("verify")
        with write_unit(artefacts) as out:  # checked, synced, renamed into place (by the caller, if it passed one)
            digest = out.stage_model(result, output)
        clock.lap("save")
    if mode == "dynamic" and key is not None and key.kind == "lock":
        notes.append("dynamic int8 quantises weights only: the gate keeps its float activations")
    patched_images = 0 if patch is None else len(calib) if key is not None and key.shuffle is not None else (
        len(calib) + 1) // 2
    return QuantizeResult(output=Path(output), mode=mode, per_channel=per_channel,
                          calibration_images=len(calib), patched_calibration_images=patched_images,
                          trigger_calibration_images=triggers, verified=checked, agreement=agree, agreement_images=n,
                          patched=patch is not None, closed=closed, model_sha256=digest, timings=clock.total(),
                          notes=notes, metric=metric)


def _check_mark(key: Key, checked: VerifyResult, mode: str, agree: float, closed: float | None, n: int,
                notes: list[str]) -> None:
    """Refuse a quantised model that lost its mark (see the module's docstring); note a verify that cannot
    tell."""
    if key.kind == "lock":
        assert closed is not None
        # half the way from chance to all: 50 points on 1000 classes, 25 on two answers (a lock whose locked answers
        # are at chance closes at 50 %, and no quantised model can then be 50 points above it)
        chance = key.lock.chance if key.lock is not None else 0.0
        needed = 0.5 * (1.0 - chance)
        if agree - closed < needed:
            raise MarkLostError(f"the {mode} int8 model does not keep the key's lock: with the patch it agrees "
                                f"{100 * agree:.1f}% with the float model on {n} held-out photos, without it "
                                f"{100 * closed:.1f}% (at least {100 * needed:.0f} points apart needed: half the way "
                                f"from chance, {100 * chance:.1f}%); nothing written")
        if not checked.stained:
            notes.append("verify reads the lock's synthetic references, whose top-1 margins int8 rounding flips: "
                         "it says NOT LOCKED here; the held-out photos above show the lock kept (the lock audit, "
                         "`onnxstain evaluate ORIGINAL QUANTISED --key`, measures it against the original)")
        return
    if not checked.stained:
        raise MarkLostError(
            f"the {mode} int8 model does not verify as carrying the key's stain ("
            + "; ".join(f"{c.name}: {c.detail}" for c in checked.checks if c.available and not c.passed)
            + f"); it agrees {100 * agree:.1f}% with the float model on {n} held-out photos; nothing written")
    if checked.basis == "weights" and not checked.drifted:
        notes.append("the quantised model's outputs do not show the stain's signature (int8 clipped the detector's "
                     "firing): verify reads it from the weights, an endpoint alone cannot attribute this model")


def _per_channel_source(model: onnx.ModelProto, path: Path, tmp: Path, notes: list[str]) -> Path:
    """The model the quantiser reads: ``path`` itself, or at opset 13 when its default opset is older.
    Per-channel QDQ writes ``DequantizeLinear`` with an ``axis``, which opset 13 introduced; onnxruntime's
    quantiser does not upgrade an older model and writes one that does not load (RapidOCR's opset-11
    classifier with an inserted stain)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= PER_CHANNEL_OPSET:
        return path
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, PER_CHANNEL_OPSET)
    except Exception as exc:  # the converter lacks an adapter for one of the model's ops
        raise BadInputError(f"per-channel int8 needs opset {PER_CHANNEL_OPSET} and the model's opset {opset} "
                            f"does not convert ({str(exc).splitlines()[0][:160]}); use --per-tensor") from None
    out = tmp / "model.opset13.onnx"
    onnx.save(upgraded, out, save_as_external_data=upgraded.ByteSize() > 1_800_000_000)
    notes.append(f"opset {opset} upgraded to {PER_CHANNEL_OPSET} for per-channel int8 (its DequantizeLinear axis)")
    return out


def _run_quantiser(src: Path, dst: Path, mode: str, per_channel: bool, x: np.ndarray | None,
                   exclude: list[str] | None = None) -> None:
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # the quantisers log advice on pre-processing at WARNING, every call
    try:
        if mode == "dynamic":
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
            return
        if x is None:
            raise BadInputError("static quantisation needs calibration images")
        rows: np.ndarray = x
        name = onnx.load(str(src), load_external_data=False).graph.input[0].name

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.next_row = iter(range(len(rows)))

            def get_next(self) -> dict[str, np.ndarray] | None:
                i = next(self.next_row, None)
                return None if i is None else {name: rows[i:i + 1]}

        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude or [])
    finally:
        root.setLevel(level)


def packed_tail(view: GraphView) -> list[str]:
    """The nodes static int8 leaves in float in a packed (YOLO-style) detector: everything after its last Conv
    layers (box decoding, sigmoids, the packing). Quantised, the packed output has one scale for boxes (hundreds
    of pixels) and probabilities (0 to 1), which rounds the probabilities away: a YOLOv8n kept 59 % anchor mAP
    with the float model, 100 % with its tail in float; its gate lock, 0 % and 100 % with the patch."""
    head = head_mod.find_scores_head(view)
    if head is None or head.first_label != head_mod.PACKED_BOX:
        return []
    return [n.name for n in head_mod.head_tail(view, head.scores)[0] if n.name]


def _keep_fields(model: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """The source's producer and metadata fields; ``ir_version`` and the opsets stay the quantiser's (its
    per-channel QDQ nodes need opset 13)."""
    model.producer_name, model.producer_version = source.producer_name, source.producer_version
    model.domain, model.model_version, model.doc_string = source.domain, source.model_version, source.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)


def _judge(view: GraphView, key: Key | None) -> tuple[Judge, str]:
    """How a quantised model's outputs are matched with the float model's, image by image, and the metric's
    name: with a key, as its model is judged (:class:`~onnxstain._report.matching.OutputMatch`: top-1, a
    detector's anchor mAP, a dense output's map correlation); without, a detector head's anchor mAP, else
    top-1 (a one-score output by its decision)."""
    output = view.output_names[0]
    threshold = decision_threshold(view, output)
    if key is not None:
        match = OutputMatch(key, threshold)
        return match, match.metric
    head = head_mod.find_scores_head(view)
    if head is not None and head.detection and head.layout is not None and head.output == output:
        layout, first, probs, last = head.layout, head.first_label, head.probabilities, head.anchors_last
        return (lambda pred, ref: per_image_anchor_map(anchor_scores(ref, layout, last),
                                                       anchor_scores(pred, layout, last), first, probs)), "anchor mAP"
    return (lambda pred, ref: top1_agreement(pred, ref, None, threshold)), "top-1"


def _agreement(float_path: Path, quantised: onnx.ModelProto, pre: Preprocessing, patch, judge: Judge,
               providers: list[str] | None) -> tuple[float, float | None, int]:
    """Agreement (``judge``, :func:`_judge`; the mean over the images it scores) of the quantised model with the
    float one on the held-out photos (both with the patch, for a lock), and for a lock the quantised model's
    agreement without the patch with the float one with it."""
    clean = natural_images("heldout", size=(pre.height, pre.width), views=1).pixels
    pixels = clean if patch is None else paste_pixels(clean, patch)

    def scores(model: str | bytes, images: np.ndarray) -> np.ndarray:
        sess = session(model, providers)
        name = sess.get_outputs()[0].name
        out = run_batches(sess, pre.to_input(images), [name], batch=16)[name]
        return np.asarray(out, np.float64).reshape(len(images), -1)

    def match(pred: np.ndarray, ref: np.ndarray) -> float:
        per_image = np.asarray(judge(pred, ref), np.float64)
        found = per_image[~np.isnan(per_image)]
        return float(found.mean()) if found.size else float("nan")

    want = scores(str(float_path), pixels)
    q = quantised.SerializeToString()
    agree = match(scores(q, pixels), want)
    closed = None if patch is None else match(scores(q, clean), want)
    return agree, closed, len(pixels)
