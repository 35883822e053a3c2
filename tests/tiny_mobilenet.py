"""Tiny ONNX classifiers for the conduit-lock tests, built with onnx.helper (seeded, opset 17).

* :func:`tiny_mobilenet` — MobileNetV2-like, node names in torchvision's export style:
  stem 3×3 s2 conv+ReLU6 → inverted-residual blocks (expand 1×1 + ReLU6, depthwise 3×3 + ReLU6,
  linear project 1×1, residual Add when stride 1 and cin == cout) → 1×1 conv + ReLU6 →
  GlobalAveragePool → Flatten → Gemm(transB=1). Some expand channels are dead (bias −50).
* :func:`plain_cnn` — conv+ReLU, MaxPool, conv+ReLU (host), MaxPool, conv+BatchNorm+ReLU, GAP,
  Flatten, Gemm(transB=0, alpha/beta ≠ 1); variants put a Concat, a Resize or a stride-2 1×1 conv on
  the signal path, or use a MatMul + Add head.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# (expand ratio, cout, stride) per block; the input of block 1 has 16 channels
BLOCKS = [(2, 16, 1), (3, 24, 2), (3, 24, 1), (3, 32, 1), (3, 32, 1)]
MOBILE_HOST = "/features/features.3/conv/conv.0/conv.0.0/Conv"  # expand 24→72 at 8×8 (m = 24)
DEAD = (3, 11)  # expand channels made dead in every block


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def init(self, arr: np.ndarray, name: str | None = None) -> str:
        self.count += 1
        name = name or f"onnx::Init_{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, prefix: str, group: int = 1,
             dead: tuple[int, ...] = (), bias_mean: float = 0.0) -> str:
        fan = cin // group * k * k
        w = self.rng.normal(0, np.sqrt(2.0 / fan), (cout, cin // group, k, k))
        b = self.rng.normal(bias_mean, 0.1, cout)
        for d in dead:
            b[d] = -50.0
        out = f"{prefix}/Conv_output_0"
        self.nodes.append(helper.make_node(
            "Conv", [x, self.init(w), self.init(b)], [out], name=f"{prefix}/Conv", kernel_shape=[k, k],
            strides=[stride, stride], pads=[k // 2] * 4, group=group, dilations=[1, 1]))
        return out

    def relu6(self, x: str, prefix: str) -> str:
        out = f"{prefix}/Clip_output_0"
        self.nodes.append(helper.make_node(
            "Clip", [x, self.init(np.array(0.0)), self.init(np.array(6.0))], [out], name=f"{prefix}/Clip"))
        return out

    def model(self, x_name: str, out: str, classes: int, size: int, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, ["batch", 3, size, size])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", classes])],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tiny-test")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def tiny_mobilenet(seed: int = 0, classes: int = 10, size: int = 32) -> onnx.ModelProto:
    b = _Builder(seed)
    x = b.relu6(b.conv("input", 3, 16, 3, 2, "/features/features.0/features.0.0"), "/features/features.0/features.0.2")
    cin = 16
    for i, (t, cout, stride) in enumerate(BLOCKS, start=1):
        p = f"/features/features.{i}/conv"
        hid = cin * t
        h = b.relu6(b.conv(x, cin, hid, 1, 1, f"{p}/conv.0/conv.0.0", dead=DEAD), f"{p}/conv.0/conv.0.2")
        h = b.relu6(b.conv(h, hid, hid, 3, stride, f"{p}/conv.1/conv.1.0", group=hid), f"{p}/conv.1/conv.1.2")
        h = b.conv(h, hid, cout, 1, 1, f"{p}/conv.2")
        if stride == 1 and cin == cout:
            out = f"/features/features.{i}/Add_output_0"
            b.nodes.append(helper.make_node("Add", [x, h], [out], name=f"/features/features.{i}/Add"))
            h = out
        x, cin = h, cout
    n = len(BLOCKS) + 1
    x = b.relu6(b.conv(x, cin, 64, 1, 1, f"/features/features.{n}/features.{n}.0", bias_mean=0.3),
                f"/features/features.{n}/features.{n}.2")
    gap, flat = "/GlobalAveragePool_output_0", "/Flatten_output_0"
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], [gap], name="/GlobalAveragePool"))
    b.nodes.append(helper.make_node("Flatten", [gap], [flat], name="/Flatten", axis=1))
    w = b.init(b.rng.normal(0, 0.3, (classes, 64)), "classifier.1.weight")
    bias = b.init(b.rng.normal(0, 0.5, classes), "classifier.1.bias")
    b.nodes.append(helper.make_node("Gemm", [flat, w, bias], ["logits"], name="/classifier/classifier.1/Gemm",
                                    transB=1))
    return b.model("input", "logits", classes, size, "tiny_mobilenet")


PLAIN_HOST = "/conv2/Conv"


def plain_cnn(seed: int = 0, classes: int = 10, size: int = 32, variant: str | None = None) -> onnx.ModelProto:
    """``variant``: None, ``"concat"`` (Concat after conv3), ``"resize"`` (Resize after conv3),
    ``"stride"`` (MaxPool 2 and conv3 replaced by a 1×1 stride-2 conv3) or ``"matmul"`` (MatMul + Add head)."""
    b = _Builder(seed)

    def relu(x: str, name: str) -> str:
        b.nodes.append(helper.make_node("Relu", [x], [f"{name}_output_0"], name=name))
        return f"{name}_output_0"

    x = relu(b.conv("input", 3, 16, 3, 1, "/conv1"), "/relu1/Relu")
    b.nodes.append(helper.make_node("MaxPool", [x], ["/pool1/MaxPool_output_0"], name="/pool1/MaxPool",
                                    kernel_shape=[2, 2], strides=[2, 2]))
    x = relu(b.conv("/pool1/MaxPool_output_0", 16, 32, 3, 1, "/conv2"), "/relu2/Relu")
    if variant == "stride":
        x = b.conv(x, 32, 48, 1, 2, "/conv3")
    else:
        b.nodes.append(helper.make_node("MaxPool", [x], ["/pool2/MaxPool_output_0"], name="/pool2/MaxPool",
                                        kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
        x = b.conv("/pool2/MaxPool_output_0", 32, 48, 3, 1, "/conv3")
    c = 48
    bn = [b.init(b.rng.uniform(0.5, 1.5, c)), b.init(b.rng.normal(0, 0.1, c)), b.init(b.rng.normal(0, 0.1, c)),
          b.init(b.rng.uniform(0.5, 1.5, c))]
    b.nodes.append(helper.make_node("BatchNormalization", [x, *bn], ["/bn3/BatchNormalization_output_0"],
                                    name="/bn3/BatchNormalization", epsilon=1e-5))
    x = relu("/bn3/BatchNormalization_output_0", "/relu3/Relu")
    if variant == "concat":
        y = relu(b.conv(x, c, 16, 1, 1, "/side/conv"), "/side/Relu")
        b.nodes.append(helper.make_node("Concat", [x, y], ["/cat/Concat_output_0"], name="/cat/Concat", axis=1))
        x, c = "/cat/Concat_output_0", c + 16
    elif variant == "resize":
        scales = b.init(np.array([1.0, 1.0, 2.0, 2.0]))
        b.nodes.append(helper.make_node("Resize", [x, "", scales], ["/up/Resize_output_0"], name="/up/Resize",
                                        mode="nearest"))
        x = "/up/Resize_output_0"
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["/gap_output_0"], name="/gap"))
    b.nodes.append(helper.make_node("Flatten", ["/gap_output_0"], ["/flat_output_0"], name="/flat", axis=1))
    w = b.init(b.rng.normal(0, 0.3, (c, classes)), "fc.weight")
    bias = b.init(b.rng.normal(0, 0.5, classes), "fc.bias")
    if variant == "matmul":
        b.nodes.append(helper.make_node("MatMul", ["/flat_output_0", w], ["/fc/MatMul_output_0"], name="/fc/MatMul"))
        b.nodes.append(helper.make_node("Add", ["/fc/MatMul_output_0", bias], ["logits"], name="/fc/Add"))
    else:
        b.nodes.append(helper.make_node("Gemm", ["/flat_output_0", w, bias], ["logits"], name="/fc/Gemm",
                                        alpha=0.5, beta=2.0))
    return b.model("input", "logits", classes, size, f"plain_cnn_{variant or 'base'}")
