"""Box mathematics for SSD-style detectors: anchors, box coding, NMS and detection mAP.

Pure numpy. The conventions are those of the TensorFlow Object Detection API, as used by
``ssd_mobilenet_v2_coco``: anchors are ``(ycenter, xcenter, h, w)`` and boxes
``(ymin, xmin, ymax, xmax)``, all normalised to the image (0..1); box encodings are the Faster R-CNN
box coder's ``(ty, tx, th, tw)`` with scale factors ``(10, 10, 5, 5)``; scores are sigmoids of the
class logits; NMS is greedy and per class.

``mean_average_precision`` scores one model's detections against another's (pseudo ground truth,
e.g. the original model's confident detections), which is how detection fidelity is measured
without labelled data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = [
    "Detections",
    "average_precision",
    "coco_mean_average_precision",
    "decode",
    "encode",
    "iou",
    "mean_average_precision",
    "nms",
    "postprocess",
    "sigmoid",
    "ssd_anchors",
]

SSD_FEATURE_SIZES = (19, 10, 5, 3, 2, 1)
# ssd_mobilenet_v2_coco's pipeline.config says 0.3333, not 1/3; the frozen graph's anchors match 0.3333 to 1 ulp
# (1/3 moves some anchor sides by up to 8e-5).
SSD_ASPECT_RATIOS = (1.0, 2.0, 0.5, 3.0, 0.3333)
SCALE_FACTORS = (10.0, 10.0, 5.0, 5.0)
# The post-processing frozen into ssd_mobilenet_v2_coco_2018_03_29 (its graph's constants; the
# training pipeline.config's batch_non_max_suppression says score_threshold 1e-8).
SSD_SCORE_THRESHOLD = 0.3
_EPS = 1e-8  # the box coder's epsilon (TF OD API ``faster_rcnn_box_coder.EPSILON``)


# -- anchors -------------------------------------------------------------------------------------


def ssd_layer_specs(
    num_layers: int,
    min_scale: float = 0.2,
    max_scale: float = 0.95,
    aspect_ratios: Sequence[float] = SSD_ASPECT_RATIOS,
    reduce_lowest: bool = True,
    interpolated_ratio: float = 1.0,
) -> list[list[tuple[float, float]]]:
    """``(scale, aspect_ratio)`` of every anchor of a cell, per layer (TF ``create_ssd_anchors``)."""
    if num_layers < 1:
        raise ValueError("num_layers must be positive")
    if num_layers == 1:
        scales = [min_scale, 1.0]
    else:
        scales = [min_scale + (max_scale - min_scale) * i / (num_layers - 1) for i in range(num_layers)] + [1.0]
    specs: list[list[tuple[float, float]]] = []
    for layer in range(num_layers):
        scale, scale_next = scales[layer], scales[layer + 1]
        if layer == 0 and reduce_lowest:
            specs.append([(0.1, 1.0), (scale, 2.0), (scale, 0.5)])
            continue
        cell = [(scale, float(a)) for a in aspect_ratios]
        if interpolated_ratio > 0:
            cell.append((float(np.sqrt(scale * scale_next)), interpolated_ratio))
        specs.append(cell)
    return specs


def ssd_anchors(
    feature_sizes: Sequence[int] = SSD_FEATURE_SIZES,
    min_scale: float = 0.2,
    max_scale: float = 0.95,
    aspect_ratios: Sequence[float] = SSD_ASPECT_RATIOS,
    reduce_lowest: bool = True,
) -> np.ndarray:
    """SSD anchors ``[A, 4]`` float32 ``(ycenter, xcenter, h, w)``, in the TF OD API order.

    TF's ``multiple_grid_anchor_generator`` on square feature maps with base anchor size 1: layer
    ``i`` has scale ``s_i = min + (max - min) i / (L - 1)``; each cell of layer 0 (with
    ``reduce_lowest``) holds ``(0.1, 1)``, ``(s_0, 2)``, ``(s_0, 0.5)``; every other cell holds one
    anchor per aspect ratio at ``s_i`` plus ``sqrt(s_i s_{i+1})`` at ratio 1 (``s_L = 1``). An
    anchor of scale ``s`` and ratio ``a`` has ``h = s / sqrt(a)``, ``w = s sqrt(a)``; the cell
    ``(i, j)`` of an ``n × n`` map is centred at ``((i + 0.5) / n, (j + 0.5) / n)``. Order: layer,
    row, column, anchor. The arithmetic is float32, as in the graph. For ssd_mobilenet_v2_coco
    (the defaults) this gives 1917 anchors.
    """
    specs = ssd_layer_specs(len(feature_sizes), min_scale, max_scale, aspect_ratios, reduce_lowest)
    f32 = np.float32
    out = []
    for size, cell in zip(feature_sizes, specs, strict=True):
        scales = np.array([s for s, _ in cell], f32)
        ratio_sqrts = np.sqrt(np.array([a for _, a in cell], f32))
        heights = scales / ratio_sqrts
        widths = scales * ratio_sqrts
        stride = f32(1.0) / f32(size)
        centres = np.arange(size, dtype=f32) * stride + f32(0.5) * stride
        k = len(cell)
        yc = np.repeat(centres, size * k)  # row-major over (row, column, anchor)
        xc = np.tile(np.repeat(centres, k), size)
        h = np.tile(heights, size * size)
        w = np.tile(widths, size * size)
        out.append(np.stack([yc, xc, h, w], axis=1))
    return np.concatenate(out).astype(f32)


def anchors_to_corners(anchors: np.ndarray) -> np.ndarray:
    """``(ycenter, xcenter, h, w)`` → ``(ymin, xmin, ymax, xmax)``."""
    a = np.asarray(anchors)
    half = a[:, 2:] / 2
    return np.concatenate([a[:, :2] - half, a[:, :2] + half], axis=1)


def corners_to_anchors(boxes: np.ndarray) -> np.ndarray:
    """``(ymin, xmin, ymax, xmax)`` → ``(ycenter, xcenter, h, w)``."""
    b = np.asarray(boxes)
    size = b[:, 2:] - b[:, :2]
    return np.concatenate([b[:, :2] + size / 2, size], axis=1)


# -- box coder -----------------------------------------------------------------------------------


def decode(
    box_encodings: np.ndarray, anchors: np.ndarray, scale_factors: Sequence[float] = SCALE_FACTORS
) -> np.ndarray:
    """Faster R-CNN box coder: ``(ty, tx, th, tw)`` ``[A, 4]`` relative to anchors → ``(ymin, xmin, ymax, xmax)``."""
    t = np.asarray(box_encodings, np.float32).reshape(-1, 4)
    a = np.asarray(anchors, np.float32)
    if t.shape != a.shape:
        raise ValueError(f"box encodings {t.shape} and anchors {a.shape} differ")
    # Multiplications by the reciprocals, as in the frozen graph (float32 throughout).
    ry, rx, rh, rw = (np.float32(1.0 / s) for s in scale_factors)
    half = np.float32(0.5)
    yca, xca, ha, wa = a.T
    h = np.exp(t[:, 2] * rh) * ha
    w = np.exp(t[:, 3] * rw) * wa
    yc = t[:, 0] * ry * ha + yca
    xc = t[:, 1] * rx * wa + xca
    return np.stack([yc - h * half, xc - w * half, yc + h * half, xc + w * half], axis=1)


def encode(boxes: np.ndarray, anchors: np.ndarray, scale_factors: Sequence[float] = SCALE_FACTORS) -> np.ndarray:
    """Inverse of :func:`decode` (the box coder's ``encode``, with its epsilon on sizes)."""
    c = corners_to_anchors(np.asarray(boxes, np.float64))
    a = np.asarray(anchors, np.float64)
    ha, wa = a[:, 2] + _EPS, a[:, 3] + _EPS
    h, w = c[:, 2] + _EPS, c[:, 3] + _EPS
    sy, sx, sh, sw = scale_factors
    return np.stack(
        [(c[:, 0] - a[:, 0]) / ha * sy, (c[:, 1] - a[:, 1]) / wa * sx, np.log(h / ha) * sh, np.log(w / wa) * sw],
        axis=1,
    ).astype(np.float32)


# -- IoU, NMS, post-processing -------------------------------------------------------------------


def area(boxes: np.ndarray) -> np.ndarray:
    """Areas of ``(ymin, xmin, ymax, xmax)`` boxes (0 for empty or inverted boxes)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.maximum(b[:, 2] - b[:, 0], 0.0) * np.maximum(b[:, 3] - b[:, 1], 0.0)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union ``[N, M]`` of ``(ymin, xmin, ymax, xmax)`` boxes (0 when a box is empty)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ymin = np.maximum(a[:, None, 0], b[None, :, 0])
    xmin = np.maximum(a[:, None, 1], b[None, :, 1])
    ymax = np.minimum(a[:, None, 2], b[None, :, 2])
    xmax = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.maximum(ymax - ymin, 0.0) * np.maximum(xmax - xmin, 0.0)
    area_a, area_b = area(a), area(b)
    union = area_a[:, None] + area_b[None, :] - inter
    valid = (area_a[:, None] > 0) & (area_b[None, :] > 0) & (union > 0)
    return np.where(valid, inter / np.where(valid, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.6, max_output: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first.

    A box is dropped when its IoU with a kept, higher-scoring box is strictly above
    ``iou_threshold`` (``tf.image.non_max_suppression``). Equal scores keep the lower index first.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    s = np.asarray(scores).reshape(-1)
    if len(b) != len(s):
        raise ValueError(f"{len(b)} boxes but {len(s)} scores")
    limit = len(b) if max_output is None else max(0, int(max_output))
    order = np.argsort(-s, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < limit:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        if not rest.size:
            break
        order = rest[iou(b[best], b[rest])[0] <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


@dataclasses.dataclass
class Detections:
    """Detections of one image: ``boxes`` ``[N, 4]`` (ymin, xmin, ymax, xmax), ``scores`` ``[N]``, ``classes`` ``[N]``.

    Classes are label ids: the column of the class logits (with a background column 0, the TF OD
    API's 1-based COCO ids).
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        self.classes = np.asarray(self.classes, np.int64).reshape(-1)
        if not len(self.boxes) == len(self.scores) == len(self.classes):
            raise ValueError("boxes, scores and classes must have the same length")

    def __len__(self) -> int:
        return len(self.scores)

    def above(self, min_score: float) -> Detections:
        """The detections with ``score >= min_score``."""
        keep = self.scores >= min_score
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep])

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (float32 in, float32 out)."""
    x = np.asarray(x, np.float32)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(np.float32)


def postprocess(
    boxes: np.ndarray,
    class_logits: np.ndarray,
    *,
    background: bool = True,
    score_threshold: float = SSD_SCORE_THRESHOLD,
    iou_threshold: float = 0.6,
    max_per_class: int = 100,
    max_total: int = 100,
    clip: bool = True,
) -> Detections:
    """Decoded boxes ``[A, 4]`` and class logits ``[A, C]`` → the detections of one image.

    The TF OD API's post-processor as frozen into ssd_mobilenet_v2_coco_2018_03_29: sigmoid scores;
    column 0 skipped when ``background``; boxes clipped to the unit square (and dropped if empty
    after clipping) when ``clip``; per class, boxes with score strictly above ``score_threshold``
    (0.3 in the frozen graph; the training config's 1e-8 keeps almost every box) go through greedy
    NMS (``iou_threshold``, at most ``max_per_class`` kept); then the best ``max_total`` over all
    classes, by decreasing score (ties: lower class, then NMS order).
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = sigmoid(np.asarray(class_logits, np.float32).reshape(len(b), -1))
    if clip:
        b = np.clip(b, np.float32(0.0), np.float32(1.0))
        nonempty = area(b) > 0
    else:
        nonempty = np.ones(len(b), bool)
    first = 1 if background else 0
    # Classes with the best scores first, so the running top-``max_total`` bar rises early: a box
    # strictly below the bar can never make the final list, so NMS of a class stops there. The
    # result is exactly that of running every class to completion.
    cols = np.arange(first, scores.shape[1])
    cols = cols[np.argsort(-scores[:, cols].max(axis=0, initial=-np.inf), kind="stable")] if cols.size else cols
    kept_scores: list[np.ndarray] = []
    kept_index: list[np.ndarray] = []
    kept_class: list[np.ndarray] = []
    top = np.zeros(0, np.float32)  # the best max_total scores kept so far
    for c in cols:
        cand = np.flatnonzero(nonempty & (scores[:, c] > score_threshold))
        if len(top) >= max_total > 0:
            cand = cand[scores[cand, c] >= top[-1]]
        if not cand.size or max_total <= 0:
            continue
        kept = cand[nms(b[cand], scores[cand, c], iou_threshold, max_per_class)]
        kept_scores.append(scores[kept, c])
        kept_index.append(kept)
        kept_class.append(np.full(len(kept), c, np.int64))
        top = np.sort(np.concatenate([top, scores[kept, c]]))[::-1][:max_total]
    if not kept_scores:
        return Detections.empty()
    all_scores = np.concatenate(kept_scores)
    all_index = np.concatenate(kept_index)
    all_class = np.concatenate(kept_class)
    rank = np.concatenate([np.arange(len(k)) for k in kept_index])
    order = np.lexsort((rank, all_class, -all_scores))[:max_total]
    return Detections(b[all_index[order]], all_scores[order], all_class[order])


# -- mAP against pseudo ground truth ---------------------------------------------------------------


def average_precision(tp: np.ndarray, n_references: int) -> float:
    """All-point interpolated AP from the TP (1) / FP (0) flags of predictions in decreasing score order.

    ``AP = Σ_k ΔTP_k · max_{j ≥ k} precision_j / n_references``, with integer ``ΔTP``, so a run
    of true positives covering every reference gives exactly 1.0.
    """
    if n_references <= 0:
        raise ValueError("average precision needs at least one reference")
    flags = np.asarray(tp, bool)
    if not flags.size:
        return 0.0
    tps = np.cumsum(flags)
    precision = tps / np.arange(1, len(flags) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(flags * envelope) / n_references)


def _match_class(
    predictions: Sequence[Detections], references: Sequence[Detections], cls: int, iou_threshold: float
) -> tuple[np.ndarray, int]:
    """TP flags of class ``cls`` predictions (all images, decreasing score) and the reference count."""
    pred_boxes = [det.boxes[det.classes == cls] for det in predictions]
    ref_boxes = [ref.boxes[ref.classes == cls] for ref in references]
    scores = [det.scores[det.classes == cls] for det in predictions]
    s = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    img = np.concatenate([np.full(len(x), i) for i, x in enumerate(scores)]) if scores else np.zeros(0, int)
    row = np.concatenate([np.arange(len(x)) for x in scores]) if scores else np.zeros(0, int)
    order = np.argsort(-s, kind="stable")
    n_ref = sum(len(r) for r in ref_boxes)
    used = [np.zeros(len(r), bool) for r in ref_boxes]
    overlaps = [iou(p, r) if len(p) and len(r) else None for p, r in zip(pred_boxes, ref_boxes, strict=True)]
    tp = np.zeros(len(order), bool)
    for rank, k in enumerate(order):
        image = int(img[k])
        table = overlaps[image]
        if table is None:
            continue
        ious = np.where(used[image], -1.0, table[int(row[k])])
        best = int(np.argmax(ious))
        if ious[best] >= iou_threshold:
            used[image][best] = True
            tp[rank] = True
    return tp, n_ref


def mean_average_precision(
    predictions: Sequence[Detections],
    references: Sequence[Detections],
    iou_threshold: float = 0.5,
    min_reference_score: float = 0.5,
) -> float:
    """Detection mAP of ``predictions`` against pseudo ground truth ``references`` (one entry per image).

    The references are the detections of ``references`` with ``score >= min_reference_score``
    (typically the original model's). Per class present in the references, the predictions of all
    images are ranked by score; each is a true positive when the unmatched reference of its class
    and image with the highest IoU has ``IoU >= iou_threshold`` (COCO-style greedy matching);
    AP is all-point interpolated; the result is the mean over those classes. Identical predictions
    and references give exactly 1.0. NaN when no reference reaches ``min_reference_score``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} prediction sets but {len(references)} reference sets")
    refs = [r.above(min_reference_score) for r in references]
    classes = np.unique(np.concatenate([r.classes for r in refs])) if refs else np.zeros(0, int)
    if not classes.size:
        return float("nan")
    aps = []
    for cls in classes:
        tp, n_ref = _match_class(predictions, refs, int(cls), iou_threshold)
        aps.append(average_precision(tp, n_ref))
    return float(sum(aps) / len(aps))


def coco_mean_average_precision(
    predictions: Sequence[Detections], references: Sequence[Detections], min_reference_score: float = 0.5
) -> float:
    """COCO-style mAP@[.5:.95]: :func:`mean_average_precision` averaged over IoU thresholds 0.50, 0.55, …, 0.95.

    (All-point interpolation rather than COCO's 101 recall points; no area ranges or detection cap.)
    """
    thresholds = np.linspace(0.5, 0.95, 10)
    values = [mean_average_precision(predictions, references, float(t), min_reference_score) for t in thresholds]
    return float(sum(values) / len(values))
