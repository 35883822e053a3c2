"""How far a detector's class scores agree with the original's, without decoding boxes (numpy only).

The tool does not know a detector's anchors or box coder, so it compares detections *per anchor*:
every (anchor, label) whose sigmoid score passes a threshold is a detection, placed in a box of its
own (IoU 1 with the same anchor, 0 with any other). :func:`anchor_map` is then the usual mAP
(:func:`onnxstain.math.boxes.mean_average_precision`) with the original model's detections as pseudo
ground truth. It is stricter than a box mAP (a neighbouring anchor with the same box is a miss) and
equal to it — 1.0 — when the scores are identical. ``tools/detector_eval.py`` decodes real boxes where
the anchors are known (the SSD recipe).
"""

from __future__ import annotations

import numpy as np

from .boxes import Detections, mean_average_precision, sigmoid

MIN_SCORE = 0.05  # predictions below this score are not ranked
TOP = 100  # per image, as the SSD post-processing keeps


def anchor_scores(raw: np.ndarray, layout: tuple[int, int], anchors_last: bool = False) -> np.ndarray:
    """Raw detector scores ``[N, ...]`` as ``[N, anchors, labels]`` (``layout``); ``anchors_last``: laid out
    ``[labels, anchors]`` per sample (YOLOv8's packed output)."""
    a, b = layout
    if anchors_last:
        return np.asarray(raw).reshape(-1, b, a).transpose(0, 2, 1)
    return np.asarray(raw).reshape(-1, a, b)


def anchor_detections(logits: np.ndarray, first: int = 1, probabilities: bool = False, min_score: float = MIN_SCORE,
                      top: int = TOP) -> Detections:
    """The ``top`` best (anchor, label) pairs of one image's scores ``[A, C]`` (the columns before ``first``
    skipped: the background of SSD-style heads, the box of a packed YOLO-style output), each in its own unit box
    ``[a, 0, a + 1, 1]``. The scores are logits (their sigmoid is ranked), or ``probabilities`` as they are."""
    scores = np.asarray(logits, np.float64)
    if not probabilities:
        scores = sigmoid(scores)
    flat = scores[:, first:].reshape(-1)
    keep = np.flatnonzero(flat >= min_score)
    keep = keep[np.argsort(-flat[keep], kind="stable")[:top]]
    anchors, labels = np.divmod(keep, scores.shape[1] - first)
    boxes = np.stack([anchors, np.zeros_like(anchors), anchors + 1, np.ones_like(anchors)], axis=1).astype(np.float64)
    return Detections(boxes=boxes, scores=flat[keep], classes=labels + first)


def anchor_map(reference_logits: np.ndarray, logits: np.ndarray, first: int = 1, probabilities: bool = False,
               min_reference_score: float = 0.5) -> float:
    """Anchor-level mAP of ``logits`` ``[N, A, C]`` against the reference model's on the same images
    (NaN when the reference has no detection at ``min_reference_score``); ``first``, ``probabilities``: as
    :func:`anchor_detections`."""
    refs = [anchor_detections(r, first, probabilities) for r in reference_logits]
    preds = [anchor_detections(x, first, probabilities) for x in logits]
    return mean_average_precision(preds, refs, iou_threshold=0.5, min_reference_score=min_reference_score)


def per_image_anchor_map(reference_logits: np.ndarray, logits: np.ndarray, first: int = 1,
                         probabilities: bool = False, min_reference_score: float = 0.5) -> np.ndarray:
    """:func:`anchor_map` image by image, ``[N]``: NaN where the reference detects nothing."""
    return np.array([anchor_map(r[None], x[None], first, probabilities, min_reference_score)
                     for r, x in zip(reference_logits, logits, strict=True)])
