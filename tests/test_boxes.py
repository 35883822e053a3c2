"""onnxstain.math.boxes: anchors, box coder, IoU, NMS, SSD post-processing and detection mAP."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxstain.math.boxes import (
    Detections,
    anchors_to_corners,
    average_precision,
    coco_mean_average_precision,
    decode,
    encode,
    iou,
    mean_average_precision,
    nms,
    postprocess,
    sigmoid,
    ssd_anchors,
)

# -- IoU and NMS ---------------------------------------------------------------------------------


def test_iou_hand_computed():
    a = np.array([[0, 0, 2, 2]], float)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6], [0, 0, 1, 4], [1, 1, 1, 3]], float)
    got = iou(a, b)
    assert got.shape == (1, 5)
    # overlap 1 / union 7; identical; disjoint; overlap 2 / union 4+4-2; empty box
    np.testing.assert_allclose(got[0], [1 / 7, 1.0, 0.0, 2 / 6, 0.0])
    assert iou(b, a).shape == (5, 1)


def test_nms_hand_computed():
    boxes = np.array(
        [
            [0, 0, 1, 1],  # A .9
            [0, 0.1, 1, 1.1],  # B .8: IoU(A) = 0.9/1.1 > 0.6 → suppressed
            [0, 2, 1, 3],  # C .7: disjoint → kept
            [0, 0.5, 1, 1.5],  # D .85: IoU(A) = 0.5/1.5 → kept
        ]
    )
    scores = np.array([0.9, 0.8, 0.7, 0.85])
    assert nms(boxes, scores, 0.6).tolist() == [0, 3, 2]
    assert nms(boxes, scores, 0.6, max_output=2).tolist() == [0, 3]
    assert nms(boxes, scores, 0.2).tolist() == [0, 2]  # D goes too (1/3 > 0.2)
    assert nms(np.zeros((0, 4)), np.zeros(0)).tolist() == []


def test_nms_threshold_is_strict_and_ties_keep_lower_index():
    boxes = np.array([[0, 0, 1, 3], [0, 1, 1, 4]], float)  # IoU exactly 2/4
    assert iou(boxes[:1], boxes[1:])[0, 0] == 0.5
    assert nms(boxes, np.array([0.5, 0.9]), 0.5).tolist() == [1, 0]  # not > 0.5: both kept
    assert nms(boxes, np.array([0.5, 0.9]), 0.49).tolist() == [1]
    same = np.array([[0, 0, 1, 1]] * 3, float)
    assert nms(same, np.array([0.7, 0.7, 0.7]), 0.5).tolist() == [0]


# -- anchors and box coder ---------------------------------------------------------------------------


def test_ssd_anchor_count_and_known_values():
    a = ssd_anchors()
    assert a.shape == (1917, 4) and a.dtype == np.float32
    c0 = 0.5 / 19
    r2 = math.sqrt(2)
    # layer 0, cell (0, 0): (0.1, 1), (0.2, 2), (0.2, 0.5)
    np.testing.assert_allclose(a[0], [c0, c0, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(a[1], [c0, c0, 0.2 / r2, 0.2 * r2], rtol=1e-6)
    np.testing.assert_allclose(a[2], [c0, c0, 0.2 * r2, 0.2 / r2], rtol=1e-6)
    np.testing.assert_allclose(a[3, :2], [c0, 1.5 / 19], rtol=1e-6)  # next column, same row
    np.testing.assert_allclose(a[3 * 19, :2], [1.5 / 19, c0], rtol=1e-6)  # next row
    # layer 1 (10×10, scale 0.35) starts at 19*19*3 = 1083: ratios 1, 2, 0.5, 3, 0.3333, then sqrt(0.35*0.5)
    np.testing.assert_allclose(a[1083], [0.05, 0.05, 0.35, 0.35], rtol=1e-6)
    np.testing.assert_allclose(a[1083 + 3, 2:], [0.35 / math.sqrt(3), 0.35 * math.sqrt(3)], rtol=1e-6)
    np.testing.assert_allclose(a[1083 + 5, 2:], [math.sqrt(0.35 * 0.5)] * 2, rtol=1e-6)
    # last layer (1×1, scale 0.95): interpolated anchor sqrt(0.95 * 1.0) at the centre
    np.testing.assert_allclose(a[-1], [0.5, 0.5, math.sqrt(0.95), math.sqrt(0.95)], rtol=1e-6)
    np.testing.assert_allclose(a[-2, 2:], [0.95 / math.sqrt(0.3333), 0.95 * math.sqrt(0.3333)], rtol=1e-6)
    # per-layer counts
    assert len(ssd_anchors((19,))) == 19 * 19 * 3
    assert len(ssd_anchors((19, 10), reduce_lowest=False)) == (361 + 100) * 6


def test_decode_of_zero_encodings_is_the_anchor_and_round_trip():
    a = ssd_anchors()
    np.testing.assert_allclose(decode(np.zeros((len(a), 4)), a), anchors_to_corners(a), atol=1e-7)
    r = np.random.default_rng(0)
    centres = r.uniform(0.1, 0.9, (len(a), 2))
    sizes = r.uniform(0.05, 0.6, (len(a), 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    np.testing.assert_allclose(decode(encode(boxes, a), a), boxes, atol=2e-6)
    t = r.normal(0, 1, (len(a), 4)).astype(np.float32)
    np.testing.assert_allclose(encode(decode(t, a), a), t, atol=1e-4)
    # the coder's scale factors: ty = 10 * (yc - yca) / ha, th = 5 * log(h / ha)
    one = np.array([[0.5, 0.5, 0.2, 0.4]], np.float32)
    box = np.array([[0.42, 0.3, 0.62, 0.7]])  # centre (0.52, 0.5), size (0.2, 0.4)
    np.testing.assert_allclose(encode(box, one), [[1.0, 0.0, 0.0, 0.0]], atol=1e-5)
    with pytest.raises(ValueError):
        decode(np.zeros((3, 4)), a)


# -- post-processing ---------------------------------------------------------------------------------


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_postprocess_hand_computed():
    boxes = np.array([[0, 0, 0.5, 0.5], [0, 0.05, 0.5, 0.55], [0.5, 0.5, 1.2, 1.0], [0.2, 0.2, 0.2, 0.4]], np.float32)
    logits = np.full((4, 3), -20.0, np.float32)  # background, class 1, class 2
    logits[:, 0] = 5.0  # background scores are ignored
    logits[0, 1], logits[1, 1], logits[2, 1] = _logit(0.9), _logit(0.8), _logit(0.2)
    logits[1, 2] = _logit(0.6)
    logits[3, 2] = _logit(0.99)  # empty box: dropped
    det = postprocess(boxes, logits)
    # class 1: box 1 suppressed by box 0 (IoU 0.45/0.55 > 0.6), box 2 below 0.3; class 2: box 1
    assert det.classes.tolist() == [1, 2]
    np.testing.assert_allclose(det.scores, [0.9, 0.6], rtol=1e-6)
    np.testing.assert_allclose(det.boxes, boxes[[0, 1]])
    low = postprocess(boxes, logits, score_threshold=0.1)
    assert low.classes.tolist() == [1, 2, 1]
    np.testing.assert_allclose(low.boxes[2], [0.5, 0.5, 1.0, 1.0])  # clipped to the unit square
    assert postprocess(boxes, logits, score_threshold=0.1, max_total=1).classes.tolist() == [1]
    assert postprocess(boxes, np.full((4, 3), -30.0, np.float32)).scores.size == 0
    np.testing.assert_allclose(sigmoid(np.array([-1000.0, 0.0, 1000.0])), [0.0, 0.5, 1.0])


def _postprocess_reference(boxes, logits, score_threshold, iou_threshold, max_per_class, max_total) -> Detections:
    """Every class to completion, then the global top: the definition the pruned version must equal."""
    b = np.clip(boxes, 0, 1)
    s = sigmoid(logits)
    nonempty = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    rows = []
    for c in range(1, s.shape[1]):
        cand = np.flatnonzero(nonempty & (s[:, c] > score_threshold))
        for rank, k in enumerate(cand[nms(b[cand], s[cand, c], iou_threshold, max_per_class)]):
            rows.append((-s[k, c], c, rank, k))
    rows.sort()
    rows = rows[:max_total]
    return Detections(b[[r[3] for r in rows]], [-r[0] for r in rows], [r[1] for r in rows])


@pytest.mark.parametrize("threshold,max_total", [(0.3, 100), (1e-8, 100), (1e-8, 7), (0.05, 1000)])
def test_postprocess_matches_unpruned_reference(threshold, max_total):
    r = np.random.default_rng(3)
    a = ssd_anchors()
    boxes = decode(r.normal(0, 1, (len(a), 4)).astype(np.float32), a)
    logits = r.normal(-4, 2, (len(a), 21)).astype(np.float32)
    got = postprocess(boxes, logits, score_threshold=threshold, max_total=max_total)
    ref = _postprocess_reference(boxes, logits, threshold, 0.6, 100, max_total)
    assert len(got) == len(ref) > 0
    np.testing.assert_array_equal(got.classes, ref.classes)
    np.testing.assert_array_equal(got.scores, ref.scores)
    np.testing.assert_array_equal(got.boxes, ref.boxes)


# -- mAP -------------------------------------------------------------------------------------------


def _random_detections(r: np.random.Generator, n: int) -> Detections:
    yx = r.uniform(0, 0.7, (n, 2))
    hw = r.uniform(0.05, 0.3, (n, 2))
    return Detections(np.concatenate([yx, yx + hw], 1), r.uniform(0.05, 1.0, n), r.integers(1, 6, n))


def test_map_of_identical_detections_is_exactly_one():
    r = np.random.default_rng(1)
    dets = [_random_detections(r, int(n)) for n in r.integers(0, 25, 12)]
    assert mean_average_precision(dets, dets) == 1.0
    assert coco_mean_average_precision(dets, dets) == 1.0
    assert mean_average_precision(dets, dets, min_reference_score=0.9) == 1.0


def test_map_hand_computed_with_false_positive_and_miss():
    box = lambda y, x: [y, x, y + 0.2, x + 0.2]  # noqa: E731
    refs = [
        Detections([box(0, 0), box(0.5, 0.5), box(0.7, 0.0)], [0.9, 0.8, 0.3], [1, 1, 1]),  # 3rd: below 0.5
        Detections([box(0.1, 0.1), box(0.6, 0.6)], [0.7, 0.95], [1, 2]),
    ]
    preds = [
        Detections([box(0, 0), box(0.3, 0.0), box(0.7, 0.0)], [0.9, 0.8, 0.75], [1, 1, 1]),
        Detections([box(0.1, 0.1), box(0.1, 0.1), box(0.6, 0.6)], [0.7, 0.65, 0.6], [1, 1, 2]),
    ]
    # class 1: three references (the 0.3 one does not count). Ranked predictions: 0.9 TP, 0.8 FP
    # (no overlap), 0.75 FP (only overlaps the discarded reference), 0.7 TP, 0.65 FP (duplicate);
    # one reference (box(0.5, 0.5)) is missed. Precision envelope at the two TPs: 1 and 2/4.
    ap1 = (1 * 1.0 + 1 * 0.5) / 3
    assert average_precision(np.array([1, 0, 0, 1, 0]), 3) == pytest.approx(ap1)
    # class 2: one reference, matched first → AP 1
    assert mean_average_precision(preds, refs) == pytest.approx((ap1 + 1.0) / 2)
    # a class that only the predictions have does not count; no references at all → NaN
    extra = [Detections([box(0.4, 0.4)], [0.99], [7]), Detections.empty()]
    assert math.isnan(mean_average_precision(extra, [Detections.empty(), Detections.empty()]))
    assert mean_average_precision(extra + preds, [Detections.empty(), Detections.empty(), *refs]) == pytest.approx(
        (ap1 + 1.0) / 2
    )
    with pytest.raises(ValueError):
        mean_average_precision(preds, refs[:1])


def test_map_iou_threshold_and_coco_average():
    ref = [Detections([[0, 0, 1, 1]], [0.9], [3])]
    pred = [Detections([[0, 0, 1, 0.72]], [0.8], [3])]  # IoU 0.72
    assert mean_average_precision(pred, ref, iou_threshold=0.7) == 1.0
    assert mean_average_precision(pred, ref, iou_threshold=0.75) == 0.0
    # thresholds 0.50 … 0.70 match (5 of 10)
    assert coco_mean_average_precision(pred, ref) == pytest.approx(0.5)
