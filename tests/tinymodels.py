"""Tiny ONNX models built with onnx.helper, for fast unit tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def tiny_cnn(seed: int = 0, size: int = 16, classes: int = 10, opset: int = 17, bn: bool = False,
             hidden: int = 24) -> onnx.ModelProto:
    """conv3x3(3→8,s2)+ReLU → conv1x1(8→hidden)(+BN)+Clip(0,6) → GAP → Flatten → Gemm(hidden→classes)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[1, 1]),
    ]
    inits = [_init("w1", rng.normal(0, 0.4, (8, 3, 3, 3))), _init("b1", rng.normal(0, 0.1, 8)),
             _init("w2", rng.normal(0, 0.3, (hidden, 8, 1, 1))), _init("b2", rng.normal(0, 0.1, hidden))]
    last = "c2"
    if bn:
        nodes.append(helper.make_node("BatchNormalization", ["c2", "g", "be", "mu", "var"], ["bn2"], name="bn2",
                                      epsilon=1e-5))
        inits += [_init("g", rng.uniform(0.5, 1.5, hidden)), _init("be", rng.normal(0, 0.1, hidden)),
                  _init("mu", rng.normal(0, 0.1, hidden)), _init("var", rng.uniform(0.5, 1.5, hidden))]
        last = "bn2"
    nodes += [
        helper.make_node("Clip", [last, "zero", "six"], ["a2"], name="clip2"),
        helper.make_node("GlobalAveragePool", ["a2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inits += [_init("zero", np.array(0.0)), _init("six", np.array(6.0)),
              _init("wf", rng.normal(0, 0.5, (classes, hidden))), _init("bf", rng.normal(0, 0.1, classes))]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tiny-test")
    model.ir_version = 8
    model.doc_string = "a tiny test model"
    helper.set_model_props(model, {"author": "tests"})
    onnx.checker.check_model(model)
    return model


def no_host_model() -> onnx.ModelProto:
    """A model with no layer that can host a detector (a single Sigmoid over a Gemm)."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w", "b"], ["g"], transB=1),
        helper.make_node("Sigmoid", ["g"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "nohost",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        [_init("w", rng.normal(size=(5, 192))), _init("b", np.zeros(5))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tiny_classifier(seed: int = 0, size: int = 32, classes: int = 10, opset: int = 17,
                    channels: int = 3) -> onnx.ModelProto:
    """A small CNN classifier with a usable host: 3x3 s2 conv(3→16)+ReLU → 3x3 s2 conv(16→32)+ReLU →
    1x1 conv(32→48)+Clip(0,6) (m=32, 8x8 positions) → GAP → Flatten → Gemm(48→classes). ``channels=1``:
    a grey input."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="/conv1/Conv", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="/relu1/Relu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="/conv2/Conv", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="/relu2/Relu"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="/conv3/Conv", kernel_shape=[1, 1]),
        helper.make_node("Clip", ["c3", "zero", "six"], ["a3"], name="/clip3/Clip"),
        helper.make_node("GlobalAveragePool", ["a3"], ["gap"], name="/pool/GlobalAveragePool"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="/Flatten", axis=1),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="/fc/Gemm", transB=1),
    ]
    inits = [
        _init("w1", rng.normal(0, 0.3, (16, channels, 3, 3))), _init("b1", rng.normal(0, 0.1, 16)),
        _init("w2", rng.normal(0, 0.12, (32, 16, 3, 3))), _init("b2", rng.normal(0, 0.1, 32)),
        _init("w3", rng.normal(0, 0.25, (48, 32, 1, 1))), _init("b3", rng.normal(0, 0.2, 48)),
        _init("zero", np.array(0.0)), _init("six", np.array(6.0)),
        _init("wf", rng.normal(0, 0.5, (classes, 48))), _init("bf", rng.normal(0, 0.1, classes)),
    ]
    graph = helper.make_graph(
        nodes, "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tiny-test")
    model.ir_version = 8
    helper.set_model_props(model, {"author": "tests"})
    onnx.checker.check_model(model)
    return model


def smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Seeded, natural-looking (smooth, correlated) uint8 RGB images ``[n, size, size, 3]``."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 4, 4, 3))
    reps = size // 4
    img = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)
    # box blur twice to smooth the blocks, then a little texture
    for _ in range(2):
        pad = np.pad(img, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
        img = sum(pad[:, i : i + size, j : j + size] for i in range(5) for j in range(5)) / 25.0
    img = img + rng.normal(0, 8, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def tiny_mlp(seed: int = 0, size: int = 8, hidden: int = 40, classes: int = 10, trans_b: int = 1,
             matmul: bool = False) -> onnx.ModelProto:
    """Flatten → hidden linear layer + ReLU → Gemm head. The hidden layer is a Gemm (``trans_b``) or
    a MatMul + Add with an ``[in, out]`` weight."""
    rng = np.random.default_rng(seed)
    d = 3 * size * size
    w1 = rng.normal(0, 1 / np.sqrt(d), (hidden, d))
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], name="/flatten/Flatten", axis=1)]
    if matmul:
        nodes += [helper.make_node("MatMul", ["flat", "w1"], ["mm"], name="/fc1/MatMul"),
                  helper.make_node("Add", ["mm", "b1"], ["h"], name="/fc1/Add")]
        w1_init = _init("w1", w1.T)
    else:
        nodes.append(helper.make_node("Gemm", ["flat", "w1", "b1"], ["h"], name="/fc1/Gemm", transB=trans_b))
        w1_init = _init("w1", w1 if trans_b else w1.T)
    nodes += [helper.make_node("Relu", ["h"], ["a"], name="/relu/Relu"),
              helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], name="/fc2/Gemm", transB=1)]
    graph = helper.make_graph(
        nodes, "tiny_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [w1_init, _init("b1", rng.normal(0, 0.1, hidden)), _init("w2", rng.normal(0, 0.5, (classes, hidden))),
         _init("b2", rng.normal(0, 0.1, classes))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tiny-test")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_images(folder, images: np.ndarray) -> None:
    """Save uint8 images ``[N, H, W, 3]`` as numbered PNG files in ``folder``."""
    from PIL import Image

    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")


def tiny_lockable(seed: int = 0, size: int = 48, classes: int = 10, channels: int = 3) -> onnx.ModelProto:
    """A small CNN whose third conv sees a 5x5-pixel corner patch: 3x3 conv(3→8)+ReLU →
    3x3 s2 conv(8→16)+ReLU → 3x3 s2 conv(16→24)+ReLU (m=144) → 1x1 conv(24→32)+ReLU → GAP → Gemm.
    ``channels=1``: a grey input."""
    rng = np.random.default_rng(seed)
    convs = [("conv1", channels, 8, 3, 1), ("conv2", 8, 16, 3, 2), ("conv3", 16, 24, 3, 2), ("conv4", 24, 32, 1, 1)]
    nodes, inits, x = [], [], "input"
    for name, cin, cout, k, s in convs:
        pad = k // 2
        nodes += [helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=f"/{name}/Conv",
                                   kernel_shape=[k, k], pads=[pad] * 4, strides=[s, s]),
                  helper.make_node("Relu", [f"{name}.y"], [f"{name}.a"], name=f"/{name}/Relu")]
        inits += [_init(f"{name}.w", rng.normal(0, np.sqrt(2 / (cin * k * k)), (cout, cin, k, k))),
                  _init(f"{name}.b", rng.normal(0, 0.05, cout))]
        x = f"{name}.a"
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="/pool/GlobalAveragePool"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="/Flatten", axis=1),
              helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="/fc/Gemm", transB=1)]
    inits += [_init("wf", rng.normal(0, 0.5, (classes, 32))), _init("bf", rng.normal(0, 0.1, classes))]
    graph = helper.make_graph(
        nodes, "tiny_lockable",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tiny-test")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_conv_head(seed: int = 0, size: int = 32, classes: int = 6, nhwc: bool = False,
                   channels: int = 3) -> onnx.ModelProto:
    """A convolutional classifier (no Gemm): 3x3 s2 conv(c→16)+ReLU → 3x3 s2 conv(16→32)+ReLU (m=144) →
    3x3 conv(32→classes, padded) → GlobalAveragePool → Flatten → Softmax, as mini-Xception or SqueezeNet
    end. ``nhwc``: the input is ``[N, H, W, c]`` and a Transpose starts the graph (a Keras export)."""
    rng = np.random.default_rng(seed)
    nodes = []
    x = "input"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["input"], ["nchw"], name="/Transpose", perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes += [
        helper.make_node("Conv", [x, "w1", "b1"], ["c1"], name="/conv1/Conv", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="/relu1/Relu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="/conv2/Conv", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="/relu2/Relu"),
        helper.make_node("Conv", ["r2", "wc", "bc"], ["c3"], name="/classifier/Conv", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c3"], ["gap"], name="/pool/GlobalAveragePool"),
        helper.make_node("Flatten", ["gap"], ["scores"], name="/Flatten", axis=1),
        helper.make_node("Softmax", ["scores"], ["probs"], name="/Softmax", axis=1),
    ]
    inits = [
        _init("w1", rng.normal(0, 0.3, (16, channels, 3, 3))), _init("b1", rng.normal(0, 0.1, 16)),
        _init("w2", rng.normal(0, 0.12, (32, 16, 3, 3))), _init("b2", rng.normal(0, 0.1, 32)),
        _init("wc", rng.normal(0, 0.1, (classes, 32, 3, 3))), _init("bc", rng.normal(0, 0.1, classes)),
    ]
    shape = ["batch", size, size, channels] if nhwc else ["batch", channels, size, size]
    graph = helper.make_graph(nodes, "tiny_conv_head",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tiny-test")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_bias_add_cnn(seed: int = 0, size: int = 28, classes: int = 10) -> onnx.ModelProto:
    """The ONNX model zoo's MNIST layout (a CNTK export): grey ``[1, 1, size, size]`` input, every Conv without a
    bias input followed by an ``Add`` of a ``[C, 1, 1]`` constant, then ReLU and MaxPool; MatMul + Add head."""
    rng = np.random.default_rng(seed)
    nodes, inits, x, cin, side = [], [], "input", 1, size
    for i, cout in enumerate((8, 16)):
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"Convolution{i}", kernel_shape=[5, 5],
                                   pads=[2, 2, 2, 2]),
                  helper.make_node("Add", [f"c{i}", f"b{i}"], [f"p{i}"], name=f"Plus{i}"),
                  helper.make_node("Relu", [f"p{i}"], [f"r{i}"], name=f"ReLU{i}"),
                  helper.make_node("MaxPool", [f"r{i}"], [f"m{i}"], name=f"Pooling{i}", kernel_shape=[2, 2],
                                   strides=[2, 2])]
        inits += [_init(f"w{i}", rng.normal(0, np.sqrt(2 / (cin * 25)), (cout, cin, 5, 5))),
                  _init(f"b{i}", rng.normal(0, 0.05, (cout, 1, 1)))]
        x, cin, side = f"m{i}", cout, side // 2
    feats = cin * side * side
    nodes += [helper.make_node("Reshape", [x, "flat"], ["f"], name="Times_reshape"),
              helper.make_node("MatMul", ["f", "wf"], ["t"], name="Times"),
              helper.make_node("Add", ["t", "bf"], ["logits"], name="Plus_out")]
    inits += [numpy_helper.from_array(np.array([1, feats], np.int64), "flat"),
              _init("wf", rng.normal(0, 1 / np.sqrt(feats), (feats, classes))), _init("bf", np.zeros((1, classes)))]
    graph = helper.make_graph(nodes, "tiny_bias_add_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], producer_name="tiny-test")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model
