"""Packed YOLO-style detector outputs ``[B, anchors, 4 + k]`` (box, then objectness/class probabilities): the head
is found, insert stains and gate locks work on them, and receptive fields go through a *Focus* stem."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from corpus_models import corpus_model
from tiny_detector import PACKED_ANCHORS, PACKED_CLASSES, SIZE, tiny_packed_detector
from tinymodels import smooth_images

import onnxstain
from onnxstain import LockOptions, Preprocessing, StainOptions
from onnxstain._onnx.graph import GraphView
from onnxstain._onnx.head import PACKED_BOX, find_scores_head, missing_head_reason
from onnxstain._onnx.hosts import ReceptiveField, receptive_fields
from onnxstain.keys import load_key
from onnxstain.math.detection_agreement import anchor_map, anchor_scores
from onnxstain.quantize import packed_tail
from onnxstain.runtime import session
from onnxstain.signature import ScoreView

PRE = Preprocessing(height=SIZE, width=SIZE, resize=None)


def test_the_packed_output_is_a_detector_head_with_box_columns_first():
    head = find_scores_head(GraphView(tiny_packed_detector()))
    assert head is not None and head.detection and head.output == "output"
    assert head.layout == (PACKED_ANCHORS, 5 + PACKED_CLASSES) and head.first_label == PACKED_BOX
    assert head.probabilities  # the objectness and class columns come from Sigmoids


def test_an_anchors_last_output_is_read_transposed():
    """YOLOv8's export ``[B, 4 + k, anchors]``: the same head, its raw scores laid out labels first."""
    head = find_scores_head(GraphView(tiny_packed_detector(anchors_last=True)))
    assert head is not None and head.anchors_last and head.layout == (PACKED_ANCHORS, 5 + PACKED_CLASSES)
    view = ScoreView(head.layout, 6, anchors_last=True)
    raw = np.arange(2 * 8 * PACKED_ANCHORS, dtype=np.float64).reshape(2, 8, PACKED_ANCHORS)
    assert np.array_equal(view.flat(raw), raw[:, 6, :])
    row = np.arange(PACKED_ANCHORS, dtype=np.float64)
    assert view.expand(row).shape == (8, PACKED_ANCHORS) and np.array_equal(view.expand(row)[6], row)
    assert np.array_equal(anchor_scores(raw, head.layout, True)[1, 7], raw[1, :, 7])


def test_an_output_without_packing_is_not_read_as_packed():
    """[B, positions, 8] made by one Conv, a reshape and a transpose (no Concat of box and scores: a per-position
    embedding, say): no head, and the refusal says what a packed output needs."""
    h = onnx.helper
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.1, (8, 3, 4, 4)).astype(np.float32), "w")
    shape = onnx.numpy_helper.from_array(np.array([0, 8, -1], np.int64), "shape")
    nodes = [h.make_node("Conv", ["input", "w"], ["c"], kernel_shape=[4, 4], strides=[4, 4]),
             h.make_node("Reshape", ["c", "shape"], ["r"]),
             h.make_node("Transpose", ["r"], ["output"], perm=[0, 2, 1])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 48, 48])],
                         [h.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 144, 8])], [w, shape])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    view = GraphView(model)
    assert find_scores_head(view) is None
    assert "no Concat" in missing_head_reason(view)


def test_a_focus_stem_gives_a_strided_receptive_field():
    """Every other pixel at four offsets, concatenated, then a 3×3 conv: each position sees a 6×6 window at
    stride 2 — checked against onnxruntime: pixels outside the window do not move the corner position."""
    model = tiny_packed_detector(focus=True)
    view = GraphView(model)
    conv1 = "/backbone.conv1/Conv_output_0"
    field = receptive_fields(view)[conv1]
    assert field == ReceptiveField((6, 6), (2, 2), (0.5, 0.5))
    probe = onnx.helper.make_tensor_value_info(conv1, onnx.TensorProto.FLOAT, None)
    model.graph.output.append(probe)
    sess = session(model)
    rng = np.random.default_rng(0)
    x = rng.random((1, 3, SIZE, SIZE), dtype=np.float32)
    top, left, bottom, right = field.box(1, 1, SIZE, SIZE)
    base = sess.run([conv1], {"input": x})[0][0, :, 1, 1]
    outside, inside = x.copy(), x.copy()
    outside[..., bottom + 1 :, :] = rng.random(outside[..., bottom + 1 :, :].shape)
    outside[..., :, right + 1 :] = rng.random(outside[..., :, right + 1 :].shape)
    inside[..., top:bottom + 1, left:right + 1] += 0.5
    assert np.array_equal(sess.run([conv1], {"input": outside})[0][0, :, 1, 1], base)
    assert not np.allclose(sess.run([conv1], {"input": inside})[0][0, :, 1, 1], base)


@pytest.fixture(scope="module", params=["anchors first", "anchors last"])
def workdir(tmp_path_factory, request):
    d = tmp_path_factory.mktemp("packed")
    onnx.save(tiny_packed_detector(seed=1, focus=True, anchors_last=request.param == "anchors last"), d / "model.onnx")
    PRE.save(d / "model.preprocessing.json")
    return d


def test_an_insert_stain_on_a_packed_output(workdir):
    images = smooth_images(160, size=SIZE, seed=1)
    res = onnxstain.stain(workdir / "model.onnx", workdir / "s.onnx", workdir / "s.key", images=images,
                          options=StainOptions(mode="insert", seed=0, fpr=1e-3))
    key = load_key(workdir / "s.key")
    assert key.model.label_offset == PACKED_BOX and key.model.label_scores == "probabilities"
    last = find_scores_head(GraphView(onnx.load(workdir / "model.onnx"))).anchors_last
    assert key.model.label_layout == ("anchors_last" if last else None)
    assert PACKED_BOX <= res.signature_label < 5 + PACKED_CLASSES  # a score column, never the box
    assert onnxstain.verify(workdir / "s.onnx", workdir / "s.key").stained
    assert not onnxstain.verify(workdir / "model.onnx", workdir / "s.key").stained
    x = PRE.to_input(smooth_images(32, size=SIZE, seed=5))
    a = session(onnx.load(workdir / "model.onnx")).run(None, {"input": x})[0]
    b = session(onnx.load(workdir / "s.onnx")).run(None, {"input": x})[0]
    assert np.array_equal(a, b)  # natural outputs bit-identical


@pytest.fixture(scope="module")
def locked(workdir):
    return onnxstain.lock(workdir / "model.onnx", workdir / "l.onnx", workdir / "l.key",
                          images=smooth_images(160, size=SIZE, seed=2),
                          options=LockOptions(kind="gate", seed=0, fpr=1e-3))


def test_a_gate_lock_on_a_packed_output_gates_every_predictor_input(workdir, locked):
    res = locked
    key = load_key(workdir / "l.key")
    assert key.lock is not None and key.lock.gated is not None
    assert len(key.lock.gated.split(", ")) == 2  # the two scales' predictor stems (box, objectness, classes)
    assert res.metric == "anchor mAP" and res.locked_agreement <= 0.05
    assert onnxstain.verify(workdir / "l.onnx", workdir / "l.key").stained
    audit = onnxstain.audit_lock(workdir / "model.onnx", workdir / "l.onnx", workdir / "l.key",
                                 images=smooth_images(64, size=SIZE, seed=9))
    assert audit.condition("patch").agreement == 1.0 and audit.condition("patch").max_abs_delta == 0.0


def test_static_int8_keeps_the_packed_tail_in_float_and_the_lock(workdir, locked):
    """``quantize`` leaves the nodes after the last Conv layers (sigmoids, packing) in float, says so, and the
    quantised locked model still opens with the patch and stays locked without it (anchor mAP)."""
    model = onnx.load(workdir / "l.onnx")
    tail = packed_tail(GraphView(model, PRE.input_shape()))
    names = {n.name: n.op_type for n in model.graph.node}
    assert tail and all(names[t] != "Conv" for t in tail) and "/head/Concat" in tail
    q = onnxstain.quantize(workdir / "l.onnx", workdir / "q.onnx", workdir / "l.key",
                           images=smooth_images(64, size=SIZE, seed=4))
    assert q.metric == "anchor mAP" and any("stay in float" in n for n in q.notes)
    assert q.closed is not None and q.agreement - q.closed >= 0.5
    plain = onnxstain.quantize(workdir / "model.onnx", workdir / "q0.onnx", images=smooth_images(64, size=SIZE, seed=4),
                               preprocessing=PRE)
    assert plain.metric == "anchor mAP"  # no key: the detector head says how to judge it


def test_the_anchor_map_reads_probabilities_after_the_box():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 50, (1, 10, 4)), rng.uniform(0, 0.2, (1, 10, 2))], axis=2)
    scores[0, 3, 5] = 0.9
    moved = scores.copy()
    moved[0, 3, 5], moved[0, 7, 5] = 0.0, 0.9
    assert anchor_map(scores, scores, PACKED_BOX, True) == 1.0
    assert anchor_map(scores, moved, PACKED_BOX, True) == 0.0
    assert np.isnan(anchor_map(scores * [1, 1, 1, 1, 0, 0], scores, PACKED_BOX, True))  # the box is no score


@pytest.mark.slow
def test_ddddocr_detector(tmp_path):
    """ddddocr's YOLOX-style detector (torch 1.9, opset 11; a Focus stem; [1, 3549, 6]): refused before. Insert
    stain verified, natural outputs unchanged; gate lock exact with the patch and locked without it."""
    model = corpus_model("ddddocr_det")
    from onnxstain.naturalset import natural_images

    images = natural_images("calibration", size=(416, 416), views=1).pixels[:128]
    onnxstain.stain(model, tmp_path / "s.onnx", tmp_path / "s.key", images=images,
                    options=StainOptions(mode="insert", seed=0))
    assert onnxstain.verify(tmp_path / "s.onnx", tmp_path / "s.key").stained
    assert not onnxstain.verify(model, tmp_path / "s.key").stained
    res = onnxstain.lock(model, tmp_path / "l.onnx", tmp_path / "l.key", images=images,
                         options=LockOptions(kind="gate", seed=0))
    assert res.locked_agreement <= 0.05
    audit = onnxstain.audit_lock(model, tmp_path / "l.onnx", tmp_path / "l.key", views=1)
    assert audit.condition("no patch").passed and audit.condition("patch").max_abs_delta == 0.0


@pytest.mark.slow
def test_nudenet_yolov8n_anchors_last(tmp_path):
    """A real YOLOv8n export ([B, 22, 2100] at 320 px: box rows, then 18 class rows). Its wheel's licence
    (AGPL-3.0) keeps it out of the dependencies and CI: this runs where it was installed by hand
    (``pip install --no-deps nudenet==3.4.2``)."""
    spec = importlib.util.find_spec("nudenet")
    if spec is None or spec.origin is None:
        pytest.skip("nudenet not installed (AGPL-3.0: never a dependency; install it by hand to run this)")
    model = Path(spec.origin).parent / "320n.onnx"
    pre = Preprocessing(height=320, width=320, resize=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    from onnxstain.naturalset import natural_images

    images = natural_images("calibration", size=(320, 320), views=1).pixels[:128]
    onnxstain.stain(model, tmp_path / "s.onnx", tmp_path / "s.key", images=images, preprocessing=pre,
                    options=StainOptions(mode="insert", seed=0))
    assert load_key(tmp_path / "s.key").model.label_layout == "anchors_last"
    assert onnxstain.verify(tmp_path / "s.onnx", tmp_path / "s.key").stained
    assert not onnxstain.verify(model, tmp_path / "s.key").stained
    res = onnxstain.lock(model, tmp_path / "l.onnx", tmp_path / "l.key", images=images, preprocessing=pre,
                         options=LockOptions(kind="gate", seed=0))
    assert res.host == "pixels" and res.locked_agreement <= 0.05
    audit = onnxstain.audit_lock(model, tmp_path / "l.onnx", tmp_path / "l.key", views=1)
    assert audit.passed, [(c.name, c.agreement) for c in audit.conditions if not c.passed]
    for mode in ("dynamic", "static"):
        q = onnxstain.quantize(tmp_path / "l.onnx", tmp_path / f"{mode}.onnx", tmp_path / "l.key", mode=mode)
        assert q.metric == "anchor mAP" and q.agreement >= 0.95 and q.closed is not None and q.closed <= 0.05
