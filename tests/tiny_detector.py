"""A tiny SSD-style detector built with onnx.helper (seeded, opset 17), for the detector tests.

Backbone: 3×3 conv(3→8)+ReLU → 3×3 s2 conv(8→16)+ReLU → 3×3 s2 conv(16→24)+ReLU (corner patch
5×5 px) → 1×1 conv(24→32)+ReLU6 (feature map 1, 12×12 at 48 px) → 3×3 s2 conv(32→48)+ReLU6
(feature map 2, 6×6). Each feature map has a 3×3 class-predictor conv (``ANCHORS`` × ``LABELS``
channels) and a 3×3 box-predictor conv (``ANCHORS`` × 4), laid out as the TF Object Detection API
exports them: Transpose to NHWC, Reshape to ``[B, -1, LABELS]`` / ``[B, -1, 4]``, Concat over the
anchors. Outputs ``class_logits`` ``[B, A, LABELS]`` (label 0: background) and ``box_encodings``
``[B, A, 4]``. The class biases favour the background, so natural images give few detections.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE = 48
ANCHORS = 3  # per cell
LABELS = 6  # background + 5
GRIDS = (12, 6)
TOTAL_ANCHORS = ANCHORS * sum(g * g for g in GRIDS)


class _Initializers(list):
    """The initializers of a graph being built: :meth:`add` stores one and returns its name."""

    def add(self, name: str, arr) -> str:
        self.append(numpy_helper.from_array(np.asarray(arr), name))
        return name


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    """The model of ``graph``: opset 17, IR 8, checked."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tiny-test")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_detector(seed: int = 0, size: int = SIZE) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits = _Initializers()
    init = inits.add

    def conv(x: str, name: str, cin: int, cout: int, k: int, s: int, act: str | None, bias=None) -> str:
        w = init(f"{name}.weight", rng.normal(0, np.sqrt(2 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32))
        b = init(f"{name}.bias", (rng.normal(0, 0.05, cout) if bias is None else bias).astype(np.float32))
        y = f"/{name}/Conv_output_0"
        nodes.append(helper.make_node("Conv", [x, w, b], [y], name=f"/{name}/Conv", kernel_shape=[k, k],
                                      pads=[k // 2] * 4, strides=[s, s]))
        if act == "relu":
            nodes.append(helper.make_node("Relu", [y], [f"/{name}/Relu_output_0"], name=f"/{name}/Relu"))
            return f"/{name}/Relu_output_0"
        if act == "relu6":
            lo, hi = init(f"{name}.min", np.array(0.0, np.float32)), init(f"{name}.max", np.array(6.0, np.float32))
            nodes.append(helper.make_node("Clip", [y, lo, hi], [f"/{name}/Clip_output_0"], name=f"/{name}/Clip"))
            return f"/{name}/Clip_output_0"
        return y

    x = conv("input", "backbone.conv1", 3, 8, 3, 1, "relu")
    x = conv(x, "backbone.conv2", 8, 16, 3, 2, "relu")
    x = conv(x, "backbone.conv3", 16, 24, 3, 2, "relu")
    f1 = conv(x, "backbone.conv4", 24, 32, 1, 1, "relu6")
    f2 = conv(f1, "backbone.conv5", 32, 48, 3, 2, "relu6")
    classes, boxes = [], []
    for i, (f, cin) in enumerate(((f1, 32), (f2, 48))):
        for kind, per, out in (("class", LABELS, classes), ("box", 4, boxes)):
            bias = np.zeros(ANCHORS * per)
            if kind == "class":
                bias = np.tile(np.r_[3.0, np.full(LABELS - 1, -3.0)], ANCHORS)
            y = conv(f, f"head.{kind}_predictor.{i}", cin, ANCHORS * per, 3, 1, None, bias=bias)
            t = f"/head.{kind}_predictor.{i}/Transpose_output_0"
            nodes.append(helper.make_node("Transpose", [y], [t], name=t[:-9], perm=[0, 2, 3, 1]))
            shape = init(f"head.{kind}_predictor.{i}.shape", np.array([0, -1, per], np.int64))
            r = f"/head.{kind}_predictor.{i}/Reshape_output_0"
            nodes.append(helper.make_node("Reshape", [t, shape], [r], name=r[:-9]))
            out.append(r)
    nodes.append(helper.make_node("Concat", classes, ["class_logits"], name="/head/Concat", axis=1))
    nodes.append(helper.make_node("Concat", boxes, ["box_encodings"], name="/head/Concat_1", axis=1))
    graph = helper.make_graph(
        nodes, "tiny_detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("class_logits", TensorProto.FLOAT, ["batch", TOTAL_ANCHORS, LABELS]),
         helper.make_tensor_value_info("box_encodings", TensorProto.FLOAT, ["batch", TOTAL_ANCHORS, 4])],
        inits,
    )
    return _finish(graph)


PACKED_CLASSES = 3
PACKED_GRIDS = (12, 6)
PACKED_ANCHORS = sum(g * g for g in PACKED_GRIDS)


def tiny_packed_detector(seed: int = 0, size: int = SIZE, focus: bool = False, anchors_last: bool = False
                         ) -> onnx.ModelProto:
    """A tiny YOLOX-style detector with one packed output ``[B, A, 4 + 1 + PACKED_CLASSES]``: per cell of two
    feature maps (12×12 and 6×6 at 48 px) the raw box, then the sigmoid of the objectness and of each class,
    concatenated per map, flattened, concatenated over the maps and transposed (as YOLOX exports it).
    ``focus``: a YOLOv5/YOLOX *Focus* stem first (every other pixel at four offsets, concatenated: 12 channels
    at half the size). ``anchors_last``: no final transpose, ``[B, 4 + 1 + PACKED_CLASSES, A]`` (as YOLOv8
    exports its output)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits = _Initializers()
    init = inits.add

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{name}_output_0"], name=name, **attrs))
        return f"{name}_output_0"

    def conv(x: str, name: str, cin: int, cout: int, k: int, s: int, act: bool, bias=None) -> str:
        w = init(f"{name}.weight", rng.normal(0, np.sqrt(2 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32))
        b = init(f"{name}.bias", (rng.normal(0, 0.05, cout) if bias is None else np.asarray(bias)).astype(np.float32))
        y = node("Conv", [x, w, b], f"/{name}/Conv", kernel_shape=[k, k], pads=[k // 2] * 4, strides=[s, s])
        return node("Relu", [y], f"/{name}/Relu") if act else y

    x, cin, stride1 = "input", 3, 1
    if focus:
        parts = []
        for i, (r, c) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
            starts = init(f"focus.starts{i}", np.array([r, c], np.int64))
            ends = init(f"focus.ends{i}", np.array([size, size], np.int64))
            axes = init(f"focus.axes{i}", np.array([2, 3], np.int64))
            steps = init(f"focus.steps{i}", np.array([2, 2], np.int64))
            parts.append(node("Slice", ["input", starts, ends, axes, steps], f"/focus/Slice_{i}"))
        x, cin, stride1 = node("Concat", parts, "/focus/Concat", axis=1), 12, 1
    else:
        stride1 = 2
    x = conv(x, "backbone.conv1", cin, 16, 3, stride1, True)
    x = conv(x, "backbone.conv2", 16, 24, 3, 2, True)
    f1 = conv(x, "backbone.conv3", 24, 32, 3, 1, True)  # 12×12
    f2 = conv(f1, "backbone.conv4", 32, 48, 3, 2, True)  # 6×6
    width = 5 + PACKED_CLASSES
    flat = []
    for i, (f, c) in enumerate(((f1, 32), (f2, 48))):
        stem = conv(f, f"head.stem.{i}", c, 32, 1, 1, True)
        reg = conv(stem, f"head.reg.{i}", 32, 4, 3, 1, False)
        obj = node("Sigmoid", [conv(stem, f"head.obj.{i}", 32, 1, 3, 1, False, bias=[-2.0])], f"/head.obj.{i}/Sigmoid")
        cls = node("Sigmoid", [conv(stem, f"head.cls.{i}", 32, PACKED_CLASSES, 3, 1, False,
                                    bias=np.full(PACKED_CLASSES, -1.0))], f"/head.cls.{i}/Sigmoid")
        packed = node("Concat", [reg, obj, cls], f"/head/Concat_{i}", axis=1)
        shape = init(f"head.shape.{i}", np.array([0, width, -1], np.int64))
        flat.append(node("Reshape", [packed, shape], f"/head/Reshape_{i}"))
    joined = node("Concat", flat, "/head/Concat", axis=2)
    if anchors_last:
        nodes.append(helper.make_node("Identity", [joined], ["output"], name="/head/Identity"))
    else:
        nodes.append(helper.make_node("Transpose", [joined], ["output"], name="/head/Transpose", perm=[0, 2, 1]))
    out_shape = ["batch", width, PACKED_ANCHORS] if anchors_last else ["batch", PACKED_ANCHORS, width]
    graph = helper.make_graph(
        nodes, "tiny_packed_detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        inits,
    )
    return _finish(graph)
