"""TorchPrefix (the differentiable torch interpreter of an ONNX graph prefix) against onnxruntime."""

from __future__ import annotations

import io
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxstain.errors import BadInputError, UnsupportedModelError
from onnxstain.runtime import with_outputs
from onnxstain.torchprefix import SUPPORTED_OPS, TorchPrefix, torch_prefix

REPO = Path(__file__).resolve().parents[1]
MOBILENET = Path(os.environ.get("ONNXSTAIN_CACHE", REPO / ".cache")) / "models" / "mobilenet_v2" / "mobilenet_v2.onnx"
F32 = TensorProto.FLOAT
F16 = TensorProto.FLOAT16
I64 = TensorProto.INT64
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
ort.set_default_logger_severity(3)  # no warnings about deprecated attributes we test on purpose


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return rng(seed).standard_normal(shape).astype(np.float32)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, Sequence[Any], int]],
    outputs: Sequence[str],
    inits: dict[str, np.ndarray] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info(n, t, list(s)) for n, s, t in inputs],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def single(
    op: str,
    x_shape: Sequence[Any],
    consts: Sequence[np.ndarray | None] = (),
    opset: int = 17,
    n_out: int = 1,
    x_type: int = F32,
    **attrs: Any,
) -> onnx.ModelProto:
    """A model with one node op(x, *consts); None in consts is a missing optional input."""
    ins, inits = ["x"], {}
    for i, c in enumerate(consts):
        if c is None:
            ins.append("")
        else:
            ins.append(f"c{i}")
            inits[f"c{i}"] = np.asarray(c)
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, ins, outs, name=f"{op}_0", **attrs)
    return make_model([node], [("x", x_shape, x_type)], outs, inits, opset)




def ort_run(model: onnx.ModelProto, x: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    m = with_outputs(model, names)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inp = next(i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer})
    return sess.run(list(names), {inp: x})


def assert_close(got: np.ndarray, ref: np.ndarray, atol: float, name: str = "") -> None:
    """Equal shapes; |got - ref| ≤ atol · max(1, |ref|max) (relative for large values); inf/nan equal."""
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    if ref.dtype.kind not in "fc":
        np.testing.assert_array_equal(got, ref, err_msg=name)
        return
    g, r = got.astype(np.float64), ref.astype(np.float64)
    fin = np.isfinite(r)
    np.testing.assert_array_equal(g[~fin], r[~fin], err_msg=name)
    scale = max(1.0, float(np.abs(r[fin]).max(initial=0.0)))
    err = float(np.abs(g[fin] - r[fin]).max(initial=0.0))
    assert err <= atol * scale, f"{name}: max abs diff {err:.3g} > {atol * scale:.3g}"


def check(
    model: onnx.ModelProto, x: np.ndarray, outputs: Sequence[str] | None = None, atol: float = 1e-5
) -> TorchPrefix:
    """TorchPrefix(model, outputs)(x) equals onnxruntime's values for the same tensors."""
    names = list(outputs) if outputs is not None else [o.name for o in model.graph.output]
    ref = ort_run(model, x, names)
    tp = TorchPrefix(model, names)
    got = tp(torch.from_numpy(np.ascontiguousarray(x)))
    assert len(got) == len(names)
    for n, g, r in zip(names, got, ref, strict=True):
        assert_close(g.detach().numpy(), r, atol, n)
    return tp


def export(module: torch.nn.Module, x: torch.Tensor, opset: int) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        torch.onnx.export(
            module.eval(),
            (x,),
            f,
            dynamo=False,
            opset_version=opset,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        )
    return onnx.load_from_string(f.getvalue())


# --------------------------------------------------------------------------------------------------
# convolutions
# --------------------------------------------------------------------------------------------------

CONV_CASES: dict[str, tuple[dict[str, Any], tuple[int, ...], bool]] = {
    "basic": ({"pads": [1, 1, 1, 1]}, (6, 4, 3, 3), True),
    "stride2": ({"strides": [2, 2], "pads": [1, 1, 1, 1]}, (6, 4, 3, 3), True),
    "asym_pads": ({"pads": [0, 1, 2, 0], "strides": [2, 1]}, (6, 4, 3, 3), True),
    "dilation": ({"dilations": [2, 1], "pads": [2, 1, 2, 1]}, (6, 4, 3, 3), True),
    "group2": ({"group": 2, "pads": [1, 1, 1, 1]}, (6, 2, 3, 3), True),
    "depthwise": ({"group": 4, "pads": [1, 1, 1, 1], "strides": [2, 2]}, (4, 1, 3, 3), True),
    "same_upper": ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (6, 4, 4, 3), True),
    "same_lower": ({"auto_pad": "SAME_LOWER", "strides": [2, 2]}, (6, 4, 4, 3), True),
    "same_upper_s1_even_k": ({"auto_pad": "SAME_UPPER"}, (6, 4, 2, 2), True),
    "valid": ({"auto_pad": "VALID"}, (6, 4, 3, 3), False),
    "kernel_shape_no_bias": ({"kernel_shape": [1, 1]}, (6, 4, 1, 1), False),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d(case: str) -> None:
    attrs, wshape, bias = CONV_CASES[case]
    consts = [randn(*wshape, seed=1)] + ([randn(wshape[0], seed=2)] if bias else [])
    check(single("Conv", ["N", 4, 9, 8], consts, **attrs), randn(2, 4, 9, 8))


def test_conv1d_and_3d() -> None:
    m = single("Conv", ["N", 4, 9], [randn(5, 4, 3, seed=1), randn(5, seed=2)], pads=[1, 2], strides=[2])
    check(m, randn(2, 4, 9))
    m = single("Conv", ["N", 2, 4, 5, 6], [randn(3, 2, 3, 3, 3, seed=1)], pads=[1, 0, 1, 1, 0, 1])
    check(m, randn(2, 2, 4, 5, 6))


CONVT_CASES: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "basic": ({}, (4, 3, 3, 3)),
    "stride2_pad_outpad": ({"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, (4, 3, 3, 3)),
    "asym_pads": ({"strides": [2, 2], "pads": [0, 1, 1, 0]}, (4, 3, 3, 3)),
    "group2_dilation": ({"group": 2, "dilations": [2, 1], "pads": [1, 1, 1, 1]}, (4, 2, 3, 3)),
    "output_shape": ({"strides": [2, 2], "output_shape": [11, 12]}, (4, 3, 3, 3)),
    "same_upper": ({"strides": [2, 2], "auto_pad": "SAME_UPPER"}, (4, 3, 4, 3)),
    "same_lower": ({"strides": [2, 2], "auto_pad": "SAME_LOWER"}, (4, 3, 4, 3)),
}


@pytest.mark.parametrize("case", list(CONVT_CASES))
def test_conv_transpose(case: str) -> None:
    attrs, wshape = CONVT_CASES[case]
    cout = wshape[1] * attrs.get("group", 1)
    m = single("ConvTranspose", ["N", 4, 5, 6], [randn(*wshape, seed=1), randn(cout, seed=2)], **attrs)
    check(m, randn(2, 4, 5, 6))


# --------------------------------------------------------------------------------------------------
# Gemm / MatMul / Einsum
# --------------------------------------------------------------------------------------------------

GEMM_CASES: dict[str, tuple[dict[str, Any], tuple[int, ...] | None]] = {
    "transB1": ({"transB": 1}, (4,)),
    "transB0": ({"transB": 0}, (4,)),
    "alpha_beta_transB1": ({"transB": 1, "alpha": 0.5, "beta": 2.0}, (4,)),
    "alpha_beta_transB0_C2d": ({"alpha": 1.5, "beta": -0.5}, (3, 4)),
    "C_row": ({"transB": 1}, (1, 4)),
    "C_scalar": ({"beta": 0.3}, ()),
    "no_C": ({"transB": 1, "alpha": 2.0}, None),
    "transA": ({"transA": 1, "transB": 1}, (4,)),
}


@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_gemm(case: str) -> None:
    attrs, cshape = GEMM_CASES[case]
    b = randn(4, 5, seed=1) if attrs.get("transB") else randn(5, 4, seed=1)
    consts = [b] if cshape is None else [b, randn(*cshape, seed=2)]
    if attrs.get("transA"):
        check(single("Gemm", [5, "M"], consts, **attrs), randn(5, 3))
    else:
        check(single("Gemm", ["N", 5], consts, **attrs), randn(3, 5))


def test_matmul_and_einsum() -> None:
    check(single("MatMul", ["N", 3, 5], [randn(5, 4, seed=1)]), randn(2, 3, 5))
    check(single("MatMul", ["N", 1, 3, 5], [randn(4, 5, 6, seed=1)]), randn(2, 1, 3, 5))
    check(single("MatMul", ["N", 5], [randn(5, seed=1)]), randn(3, 5))
    check(single("Einsum", ["N", 3, 5], [randn(5, 4, seed=1)], equation="bij,jk->bik"), randn(2, 3, 5))
    check(single("Einsum", ["N", 3, 4, 5], equation="bchw -> bhwc"), randn(2, 3, 4, 5))
    check(single("Einsum", ["N", 3, 4], equation="...ij->...i"), randn(2, 3, 4))


# --------------------------------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------------------------------

UNARY = [
    "Relu", "Sigmoid", "Tanh", "Exp", "Neg", "Abs", "Erf", "Sin", "Cos", "Floor", "Ceil",
    "Round", "Sign", "Softsign", "Softplus", "HardSwish", "Identity",
]  # fmt: skip
POSITIVE_UNARY = ["Log", "Sqrt", "Reciprocal"]


@pytest.mark.parametrize("op", UNARY + POSITIVE_UNARY)
def test_unary(op: str) -> None:
    x = randn(2, 3, 4) * 3
    if op in POSITIVE_UNARY:
        x = np.abs(x) + 0.5
    check(single(op, ["N", 3, 4], opset=17), x)


ATTR_ACTIVATIONS: list[tuple[str, dict[str, Any], int]] = [
    ("LeakyRelu", {"alpha": 0.2}, 17),
    ("LeakyRelu", {}, 11),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 17),
    ("HardSigmoid", {}, 13),
    ("Elu", {"alpha": 0.7}, 17),
    ("Selu", {}, 17),
    ("Celu", {"alpha": 1.3}, 17),
    ("ThresholdedRelu", {"alpha": 0.5}, 17),
    ("Mish", {}, 18),
    ("Gelu", {}, 20),
    ("Gelu", {"approximate": "tanh"}, 20),
]


@pytest.mark.parametrize(("op", "attrs", "opset"), ATTR_ACTIVATIONS)
def test_activation_attrs(op: str, attrs: dict[str, Any], opset: int) -> None:
    check(single(op, ["N", 3, 4], opset=opset, **attrs), randn(2, 3, 4) * 3)


def test_prelu() -> None:
    check(single("PRelu", ["N", 3, 4, 5], [randn(3, 1, 1, seed=1)]), randn(2, 3, 4, 5))


BINARY_CONSTS: dict[str, np.ndarray] = {
    "Add": randn(3, 1, seed=5),
    "Sub": randn(4, seed=5),
    "Mul": randn(1, 3, 4, seed=5),
    "Div": np.abs(randn(4, seed=5)) + 0.5,
    "Pow": np.array(2.0, np.float32),
    "MatMul": randn(4, 2, seed=5),
}


@pytest.mark.parametrize("op", list(BINARY_CONSTS))
def test_binary_broadcast(op: str) -> None:
    check(single(op, ["N", 3, 4], [BINARY_CONSTS[op]]), randn(2, 3, 4))


@pytest.mark.parametrize("exponent", [0.5, 3.0, 1.0])
def test_pow(exponent: float) -> None:
    x = np.abs(randn(2, 3)) + 0.1
    check(single("Pow", ["N", 3], [np.array(exponent, np.float32)]), x)
    check(single("Pow", ["N", 3], [np.abs(randn(3, seed=3)).astype(np.float32)]), x)


@pytest.mark.parametrize("op", ["Max", "Min", "Sum", "Mean"])
def test_variadic(op: str) -> None:
    check(single(op, ["N", 3, 4], [randn(4, seed=1), randn(3, 1, seed=2)]), randn(2, 3, 4))
    check(single(op, ["N", 3, 4]), randn(2, 3, 4))


def test_compare_where_logic() -> None:
    nodes = [
        helper.make_node("Round", ["x"], ["r"]),
        helper.make_node("Equal", ["r", "zero"], ["eq"]),
        helper.make_node("Greater", ["x", "half"], ["gt"]),
        helper.make_node("Less", ["x", "mhalf"], ["lt"]),
        helper.make_node("Or", ["gt", "lt"], ["or"]),
        helper.make_node("Not", ["or"], ["not"]),
        helper.make_node("And", ["not", "eq"], ["and"]),
        helper.make_node("Where", ["and", "x", "ten"], ["y"]),
        helper.make_node("GreaterOrEqual", ["x", "zero"], ["ge"]),
        helper.make_node("LessOrEqual", ["x", "zero"], ["le"]),
        helper.make_node("Xor", ["ge", "le"], ["xor"]),
        helper.make_node("Where", ["xor", "y", "x"], ["y2"]),
    ]
    consts = {
        "zero": np.array(0.0, np.float32),
        "half": np.array(0.3, np.float32),
        "mhalf": np.array(-0.3, np.float32),
        "ten": np.array(10.0, np.float32),
    }
    m = make_model(nodes, [("x", ["N", 7], F32)], ["y2"], consts)
    check(m, randn(3, 7), ["y2", "and", "xor"])


def test_div_and_mod_on_integers() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Div", ["s", "two"], ["d"]),
        helper.make_node("Mod", ["s", "three"], ["m"]),
        helper.make_node("Neg", ["s"], ["ns"]),
        helper.make_node("Div", ["ns", "two"], ["nd"]),
    ]
    m = make_model(
        nodes,
        [("x", ["N", 7, 5], F32)],
        ["d"],
        {"two": np.array(2, np.int64), "three": np.array(3, np.int64)},
    )
    check(m, randn(3, 7, 5), ["d", "m", "nd"])


# --------------------------------------------------------------------------------------------------
# Clip / Softmax
# --------------------------------------------------------------------------------------------------


def test_clip_forms() -> None:
    x = randn(2, 3, 4) * 4
    check(single("Clip", ["N", 3, 4], opset=6, min=-1.0, max=2.0), x)  # attributes (opset < 11)
    check(single("Clip", ["N", 3, 4], opset=6, max=2.0), x)
    f = np.float32
    check(single("Clip", ["N", 3, 4], [f(0.0), f(6.0)], opset=11), x)  # inputs (opset >= 11)
    check(single("Clip", ["N", 3, 4], [f(-0.5)], opset=13), x)  # min only
    check(single("Clip", ["N", 3, 4], [None, f(1.5)], opset=13), x)  # max only
    check(single("Clip", ["N", 3, 4], opset=13), x)  # no bounds
    # bounds that depend on the input
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["lo"], keepdims=0, axes=[0, 1, 2]),
        helper.make_node("Clip", ["x", "lo", "hi"], ["y"]),
    ]
    check(make_model(nodes, [("x", ["N", 3, 4], F32)], ["y"], {"hi": f(1.0)}, opset=13), x)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize(("opset", "axis"), [(11, None), (11, 1), (11, -1), (11, 2), (13, None), (13, 1)])
def test_softmax_axis_semantics(op: str, opset: int, axis: int | None) -> None:
    attrs = {} if axis is None else {"axis": axis}
    check(single(op, ["N", 3, 4, 5], opset=opset, **attrs), randn(2, 3, 4, 5) * 2)


# --------------------------------------------------------------------------------------------------
# pooling and normalisation
# --------------------------------------------------------------------------------------------------

MAXPOOL_CASES: dict[str, dict[str, Any]] = {
    "k3s2p1": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    "k3s2_ceil": {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    "k2s2_asym": {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1]},
    "k3_dilation": {"kernel_shape": [3, 3], "dilations": [2, 2], "pads": [1, 1, 1, 1]},
    "same_upper": {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    "same_lower": {"kernel_shape": [2, 2], "strides": [1, 1], "auto_pad": "SAME_LOWER"},
    "big_pads": {"kernel_shape": [3, 3], "pads": [2, 2, 2, 2]},
    "ceil_asym": {"kernel_shape": [3, 2], "strides": [2, 3], "pads": [1, 0, 0, 1], "ceil_mode": 1},
}


@pytest.mark.parametrize("case", list(MAXPOOL_CASES))
def test_maxpool(case: str) -> None:
    check(single("MaxPool", ["N", 3, 9, 10], **MAXPOOL_CASES[case]), randn(2, 3, 9, 10))


AVGPOOL_CASES: dict[str, dict[str, Any]] = {
    "k3s2p1": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    "k3s2p1_incl": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    "asym": {"kernel_shape": [3, 3], "pads": [0, 1, 2, 0]},
    "asym_incl": {"kernel_shape": [3, 3], "pads": [0, 1, 2, 0], "count_include_pad": 1},
    "ceil": {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    "ceil_pads": {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    "same_upper": {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    "same_lower_incl": {
        "kernel_shape": [2, 2],
        "strides": [1, 1],
        "auto_pad": "SAME_LOWER",
        "count_include_pad": 1,
    },
}


@pytest.mark.parametrize("case", list(AVGPOOL_CASES))
def test_avgpool(case: str) -> None:
    check(single("AveragePool", ["N", 3, 9, 10], **AVGPOOL_CASES[case]), randn(2, 3, 9, 10))


def test_pool_1d_and_global() -> None:
    check(single("MaxPool", ["N", 3, 9], kernel_shape=[3], strides=[2]), randn(2, 3, 9))
    check(single("AveragePool", ["N", 3, 9], kernel_shape=[2], pads=[1, 1]), randn(2, 3, 9))
    check(single("GlobalAveragePool", ["N", 3, 5, 4]), randn(2, 3, 5, 4))
    check(single("GlobalAveragePool", ["N", 3, 5]), randn(2, 3, 5))
    check(single("GlobalMaxPool", ["N", 3, 5, 4]), randn(2, 3, 5, 4))


def test_normalizations() -> None:
    x = randn(2, 3, 4, 5) * 2 + 1
    bn = [randn(3, seed=1), randn(3, seed=2), randn(3, seed=3), np.abs(randn(3, seed=4)) + 0.5]
    check(single("BatchNormalization", ["N", 3, 4, 5], bn, epsilon=1e-3), x)
    check(single("BatchNormalization", ["N", 3, 4, 5], bn, opset=9), x)
    check(single("InstanceNormalization", ["N", 3, 4, 5], bn[:2], epsilon=1e-4), x)
    check(single("LayerNormalization", ["N", 3, 4, 5], [randn(5, seed=1), randn(5, seed=2)]), x)
    check(single("LayerNormalization", ["N", 3, 4, 5], [randn(3, 4, 5, seed=1)], axis=1), x)
    check(single("LayerNormalization", ["N", 3, 4, 5], [randn(4, 1, seed=1)], axis=-2), x)
    check(single("LRN", ["N", 3, 4, 5], size=3, alpha=1e-2, beta=0.7, bias=1.5), x)


@pytest.mark.parametrize(("group", "bias"), [(1, False), (2, True)])
def test_batchnorm_after_conv_is_fused(group: int, bias: bool) -> None:
    bn = {
        "s": randn(6, seed=1),
        "b": randn(6, seed=2),
        "m": randn(6, seed=3),
        "v": np.abs(randn(6, seed=4)) + 0.5,
        "w": randn(6, 4 // group, 3, 3, seed=5),
        "cb": randn(6, seed=6),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "cb"] if bias else ["x", "w"], ["c"], group=group, pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], epsilon=1e-3),
        helper.make_node("Relu", ["n"], ["y"]),
    ]
    m = make_model(nodes, [("x", ["N", 4, 5, 6], F32)], ["y"], bn, opset=15)
    x = randn(2, 4, 5, 6)
    tp = check(m, x, ["y"])
    assert tp.runtime_ops == ["Conv+BatchNormalization", "Relu"]
    tp = check(m, x, ["y", "c"])  # the Conv output is wanted too: no fusion
    assert tp.runtime_ops == ["Conv", "BatchNormalization", "Relu"]


# --------------------------------------------------------------------------------------------------
# reductions
# --------------------------------------------------------------------------------------------------

REDUCE_CASES: list[tuple[str, int, list[int] | None, int, int]] = [
    # op, opset, axes, keepdims, noop_with_empty_axes
    ("ReduceMean", 13, [2, 3], 1, 0),  # axes attribute
    ("ReduceMean", 18, [2, 3], 1, 0),  # axes input
    ("ReduceMean", 18, [-1], 0, 0),
    ("ReduceMean", 18, None, 0, 0),  # all axes
    ("ReduceSum", 11, [1], 0, 0),  # attribute
    ("ReduceSum", 13, [1, -1], 1, 0),  # input
    ("ReduceSum", 13, None, 1, 1),  # noop
    ("ReduceMax", 13, [1], 1, 0),
    ("ReduceMax", 18, [0, 2], 0, 0),
    ("ReduceMin", 18, [3], 1, 0),
    ("ReduceProd", 18, [1, 2], 1, 0),
    ("ReduceL1", 18, [3], 1, 0),
    ("ReduceL2", 18, [3], 0, 0),
    ("ReduceSumSquare", 18, [2], 1, 0),
    ("ReduceLogSumExp", 18, [1], 1, 0),
]


@pytest.mark.parametrize(("op", "opset", "axes", "keepdims", "noop"), REDUCE_CASES)
def test_reduce(op: str, opset: int, axes: list[int] | None, keepdims: int, noop: int) -> None:
    attrs: dict[str, Any] = {"keepdims": keepdims}
    if noop:
        attrs["noop_with_empty_axes"] = 1
    axes_as_input = opset >= 18 or (op == "ReduceSum" and opset >= 13)
    consts: list[np.ndarray] = []
    if axes is not None:
        if axes_as_input:
            consts = [np.array(axes, np.int64)]
        else:
            attrs["axes"] = axes
    x = randn(2, 3, 4, 5) * 0.5 + 1.0
    check(single(op, ["N", 3, 4, 5], consts, opset=opset, **attrs), x)


def test_argmax() -> None:
    x = randn(2, 3, 4)
    check(single("ArgMax", ["N", 3, 4], axis=1), x)
    check(single("ArgMin", ["N", 3, 4], axis=-1, keepdims=0), x)
    x2 = np.round(x)  # ties
    check(single("ArgMax", ["N", 3, 4], axis=2, select_last_index=1), x2)


# --------------------------------------------------------------------------------------------------
# shape manipulation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2, -1, 4])
def test_flatten(axis: int) -> None:
    check(single("Flatten", ["N", 3, 4, 5], axis=axis), randn(2, 3, 4, 5))


@pytest.mark.parametrize("shape", [[0, -1], [-1, 0, 5], [0, 3, 2, 10], [2, 0, 4, -1], [-1], [0, 12, 5], [0, 0, 0, 0]])
def test_reshape(shape: list[int]) -> None:
    check(single("Reshape", ["N", 3, 4, 5], [np.array(shape, np.int64)]), randn(2, 3, 4, 5))


def test_reshape_allowzero() -> None:
    x0 = np.zeros((2, 0, 4), np.float32)
    check(single("Reshape", ["N", "C", 4], [np.array([2, 4, 0], np.int64)], opset=14, allowzero=1), x0)
    check(single("Reshape", ["N", "C", 4], [np.array([2, 0, 4], np.int64)], opset=14), x0)
    check(single("Reshape", ["N", 3, 4], [np.array([-1, 6], np.int64)], opset=14, allowzero=1), randn(2, 3, 4))


def test_transpose_concat() -> None:
    x = randn(2, 3, 4)
    check(single("Transpose", ["N", 3, 4], perm=[2, 0, 1]), x)
    check(single("Transpose", ["N", 3, 4]), x)
    check(single("Concat", ["N", 3, 4], [randn(2, 2, 4, seed=1)], axis=1), x)
    check(single("Concat", ["N", 3, 4], [randn(2, 3, 1, seed=1), randn(2, 3, 2, seed=2)], axis=-1), x)


SPLIT_CASES: list[tuple[int, dict[str, Any], np.ndarray | None, int]] = [
    (11, {"axis": 1, "split": [2, 4]}, None, 2),  # split attribute
    (13, {"axis": 1}, np.array([1, 2, 3], np.int64), 3),  # split input
    (13, {"axis": -1}, None, 2),  # equal parts
    (18, {"axis": 1, "num_outputs": 3}, None, 3),  # num_outputs, divisible
    (18, {"axis": 2, "num_outputs": 2}, None, 2),  # num_outputs, last chunk smaller
    (13, {"axis": 1}, None, 1),
]


@pytest.mark.parametrize(("opset", "attrs", "sizes", "n"), SPLIT_CASES)
def test_split(opset: int, attrs: dict[str, Any], sizes: np.ndarray | None, n: int) -> None:
    consts = [] if sizes is None else [sizes]
    check(single("Split", ["N", 6, 5, 4], consts, opset=opset, n_out=n, **attrs), randn(2, 6, 5, 4))


SLICE_CASES: list[tuple[list[int], list[int], list[int] | None, list[int] | None]] = [
    ([1], [3], None, None),
    ([1, 0], [INT64_MAX, -1], [1, 2], None),
    ([-1], [INT64_MIN], [2], [-1]),  # full reverse
    ([4, -2], [0, -7], [-1, 1], [-2, -1]),  # negative steps, negative axes
    ([0, 1], [7, 100], [3, 2], [3, 2]),  # steps > 1, end past the dim
    ([-100], [2], [3], None),
    ([10], [-100], [3], [-1]),  # start past the end, negative step
    ([2], [2], [1], None),  # empty
]


@pytest.mark.parametrize(("starts", "ends", "axes", "steps"), SLICE_CASES)
def test_slice(starts: list[int], ends: list[int], axes: list[int] | None, steps: list[int] | None) -> None:
    consts: list[np.ndarray | None] = [np.array(starts, np.int64), np.array(ends, np.int64)]
    if axes is not None or steps is not None:
        consts.append(None if axes is None else np.array(axes, np.int64))
    if steps is not None:
        consts.append(np.array(steps, np.int64))
    check(single("Slice", ["N", 5, 6, 7], consts, opset=13), randn(2, 5, 6, 7))


def test_slice_legacy_and_dynamic() -> None:
    x = randn(2, 5, 6)
    check(single("Slice", ["N", 5, 6], opset=9, starts=[1, -3], ends=[4, 1000], axes=[1, 2]), x)
    # bounds computed from the input's shape at run time
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i2"], ["d"]),
        helper.make_node("Div", ["d", "two"], ["half"]),
        helper.make_node("Unsqueeze", ["half", "ax0"], ["end"]),
        helper.make_node("Slice", ["x", "zero", "end", "ax2"], ["y"]),
    ]
    inits = {
        "i2": np.array(2, np.int64),
        "two": np.array(2, np.int64),
        "ax0": np.array([0], np.int64),
        "zero": np.array([0], np.int64),
        "ax2": np.array([2], np.int64),
    }
    check(make_model(nodes, [("x", ["N", 5, "W"], F32)], ["y"], inits, opset=13), x)


GATHER_CASES: list[tuple[np.ndarray, int]] = [
    (np.array(1, np.int64), 0),
    (np.array(-1, np.int64), 1),
    (np.array([2, 0, 2], np.int64), 1),
    (np.array([-1, 0], np.int64), 2),
    (np.array([[0, 1], [3, -2]], np.int64), 2),
    (np.array([1, 0], np.int32), -1),
]


@pytest.mark.parametrize(("idx", "axis"), GATHER_CASES)
def test_gather(idx: np.ndarray, axis: int) -> None:
    check(single("Gather", [3, 3, 4, 5], [idx], axis=axis), randn(3, 3, 4, 5))


def test_gather_elements_tile_depth_space() -> None:
    x = randn(2, 3, 4)
    idx = rng(1).integers(-3, 3, size=(2, 2, 4)).astype(np.int64)
    check(single("GatherElements", ["N", 3, 4], [idx], axis=1), x)
    check(single("Tile", ["N", 3, 4], [np.array([1, 2, 3], np.int64)]), x)
    x4 = randn(2, 8, 3, 4)
    check(single("DepthToSpace", ["N", 8, 3, 4], blocksize=2), x4)
    check(single("DepthToSpace", ["N", 8, 3, 4], blocksize=2, mode="CRD"), x4)
    check(single("SpaceToDepth", ["N", 3, 4, 6], blocksize=2), randn(2, 3, 4, 6))


@pytest.mark.parametrize("opset", [11, 13, 21])
def test_squeeze_unsqueeze(opset: int) -> None:
    x = randn(2, 1, 4, 1)

    def axes(a: list[int]) -> dict[str, Any]:
        return {"axes": a} if opset < 13 else {}

    def ins(a: list[int]) -> list[np.ndarray]:
        return [np.array(a, np.int64)] if opset >= 13 else []

    check(single("Squeeze", ["N", 1, 4, 1], ins([1, -1]), opset=opset, **axes([1, -1])), x)
    check(single("Squeeze", ["N", 1, 4, 1], opset=opset), x)
    check(single("Unsqueeze", ["N", 1, 4, 1], ins([0, -1]), opset=opset, **axes([0, -1])), x)
    check(single("Unsqueeze", ["N", 1, 4, 1], ins([2, 5, 1]), opset=opset, **axes([2, 5, 1])), x)


def test_shape_constant_of_shape_expand() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Shape", ["x"], ["s12"], start=1, end=-1),
        helper.make_node("Shape", ["x"], ["s_last"], start=-1),
        helper.make_node(
            "ConstantOfShape",
            ["s"],
            ["ones"],
            value=numpy_helper.from_array(np.array([1.5], np.float32)),
        ),
        helper.make_node("Mul", ["x", "ones"], ["xm"]),
        helper.make_node("Expand", ["b", "s"], ["be"]),
        helper.make_node("Add", ["xm", "be"], ["y"]),
        helper.make_node("Expand", ["x", "big"], ["xe"]),
        helper.make_node("Size", ["x"], ["n"]),
        helper.make_node("Cast", ["n"], ["nf"], to=F32),
        helper.make_node("Div", ["x", "nf"], ["xn"]),
    ]
    inits = {"b": randn(1, 4, seed=2), "big": np.array([3, 1, 1, 4], np.int64)}
    m = make_model(nodes, [("x", ["N", 3, 4], F32)], ["y"], inits, opset=17)
    tp = check(m, randn(2, 3, 4), ["y", "s", "s12", "s_last", "xe", "n", "xn"])
    assert "Shape" in tp.runtime_ops  # the shape of x is computed at run time


def test_cast_dropout_identity_range() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT32),
        helper.make_node("Cast", ["xi"], ["xf"], to=F32),
        helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BOOL),
        helper.make_node("CastLike", ["xi", "x"], ["xl"]),
        helper.make_node("Dropout", ["x", "ratio"], ["d", "mask"]),
        helper.make_node("Identity", ["d"], ["i"]),
        helper.make_node("Range", ["r0", "r1", "r2"], ["r"]),
        helper.make_node("Add", ["i", "r"], ["y"]),
    ]
    inits = {
        "ratio": np.array(0.5, np.float32),
        "r0": np.array(0.0, np.float32),
        "r1": np.array(2.0, np.float32),
        "r2": np.array(0.5, np.float32),
    }
    m = make_model(nodes, [("x", ["N", 4], F32)], ["y"], inits, opset=15)
    check(m, randn(3, 4) * 4, ["y", "xf", "xb", "xl", "mask", "r"])


PAD_CASES: list[tuple[int, str, list[int], list[int] | None]] = [
    (11, "constant", [0, 0, 1, 2, 0, 0, 2, 1], None),
    (11, "constant", [0, 0, -1, 2, 0, 1, 0, -2], None),  # negative pads crop
    (11, "reflect", [0, 0, 2, 1, 0, 0, 1, 2], None),
    (11, "edge", [0, 0, 1, 0, 0, 0, 2, 3], None),
    (18, "constant", [1, 2, 3, 0], [2, -1]),  # axes input
    (19, "wrap", [0, 0, 1, 2, 0, 0, 2, 1], None),
    (2, "constant", [0, 1, 1, 0, 0, 1, 0, 2], None),  # pads attribute
    (2, "reflect", [0, 0, 1, 1, 0, 0, 1, 1], None),
]


@pytest.mark.parametrize(("opset", "mode", "pads", "axes"), PAD_CASES)
def test_pad(opset: int, mode: str, pads: list[int], axes: list[int] | None) -> None:
    x = randn(2, 3, 4, 5)
    if opset < 11:
        m = single("Pad", ["N", 3, 4, 5], opset=opset, mode=mode, pads=pads, value=0.5)
    else:
        consts: list[np.ndarray | None] = [np.array(pads, np.int64)]
        if mode == "constant":
            consts.append(np.array(-1.25, np.float32))
        if axes is not None:
            consts += [None] if mode != "constant" else []
            consts.append(np.array(axes, np.int64))
        m = single("Pad", ["N", 3, 4, 5], consts, opset=opset, mode=mode)
    check(m, x)


# --------------------------------------------------------------------------------------------------
# Resize / Upsample
# --------------------------------------------------------------------------------------------------

CTM = "coordinate_transformation_mode"
RESIZE_CASES: list[tuple[str, dict[str, Any], list[float] | None, list[int] | None]] = [
    ("nearest_default_up2", {}, [1, 1, 2, 2], None),
    ("nearest_asym_floor", {CTM: "asymmetric", "nearest_mode": "floor"}, [1, 1, 2, 3], None),
    ("nearest_down", {}, [1, 1, 0.5, 0.5], None),
    ("nearest_ceil_align", {CTM: "align_corners", "nearest_mode": "ceil"}, [1, 1, 1.7, 0.6], None),
    ("nearest_prefer_ceil_sizes", {"nearest_mode": "round_prefer_ceil"}, None, [2, 3, 7, 13]),
    ("nearest_tf_half", {CTM: "tf_half_pixel_for_nn"}, [1, 1, 1.5, 2.5], None),
    ("nearest_half_symmetric", {CTM: "half_pixel_symmetric"}, [1, 1, 1.5, 0.7], None),
    ("linear_half_pixel", {"mode": "linear"}, [1, 1, 2, 2], None),
    ("linear_half_pixel_down", {"mode": "linear"}, [1, 1, 0.6, 0.75], None),
    ("linear_pytorch_half", {"mode": "linear", CTM: "pytorch_half_pixel"}, None, [2, 3, 1, 9]),
    ("linear_align_corners", {"mode": "linear", CTM: "align_corners"}, None, [2, 3, 9, 11]),
    ("linear_asymmetric", {"mode": "linear", CTM: "asymmetric"}, [1, 1, 1.5, 3], None),
    ("linear_half_symmetric", {"mode": "linear", CTM: "half_pixel_symmetric"}, [1, 1, 1.5, 2.5], None),
]


@pytest.mark.parametrize(("case", "attrs", "scales", "sizes"), RESIZE_CASES, ids=[c[0] for c in RESIZE_CASES])
def test_resize(case: str, attrs: dict[str, Any], scales: list[float] | None, sizes: list[int] | None) -> None:
    x = randn(2, 3, 5, 6)
    consts: list[np.ndarray | None] = [None, None if scales is None else np.array(scales, np.float32)]
    if sizes is not None:
        consts.append(np.array(sizes, np.int64))
    check(single("Resize", ["N", 3, 5, 6], consts, opset=13, **attrs), x)


def test_resize_legacy_and_axes() -> None:
    x = randn(2, 3, 5, 6)
    sc = np.array([1, 1, 2, 3], np.float32)
    check(single("Resize", ["N", 3, 5, 6], [sc], opset=10), x)
    check(single("Resize", ["N", 3, 5, 6], [sc], opset=10, mode="linear"), x)
    check(single("Upsample", ["N", 3, 5, 6], [sc], opset=9), x)
    check(single("Upsample", ["N", 3, 5, 6], [sc], opset=9, mode="linear"), x)
    check(single("Upsample", ["N", 3, 5, 6], opset=7, scales=[1.0, 1.0, 2.0, 2.0]), x)
    down = np.array([1, 1, 0.5, 0.5], np.float32)
    check(single("Resize", ["N", 3, 5, 6], [down], opset=10), x)  # ceil when downsampling
    axes_scales = np.array([2, 0.5], np.float32)
    check(single("Resize", ["N", 3, 5, 6], [None, axes_scales], opset=18, axes=[2, 3], mode="linear"), x)
    check(single("Resize", ["N", 3, 5, 6], [np.zeros(0, np.float32), np.array([1, 1, 2, 2], np.float32)], opset=11), x)


# --------------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zp_type", [np.uint8, np.int8])
def test_fake_quant_activations(zp_type: type) -> None:
    zp = np.array(128 if zp_type is np.uint8 else 3, zp_type)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"]),
    ]
    m = make_model(nodes, [("x", ["N", 3, 8], F32)], ["y"], {"s": np.array(1 / 32, np.float32), "zp": zp}, 13)
    x = randn(2, 3, 8) * 3  # saturates on both sides with scale 1/32
    tp = check(m, x)
    xt = torch.from_numpy(x).requires_grad_(True)
    tp(xt)[0].sum().backward()
    assert xt.grad is not None
    lo, hi = (0 - 128, 255 - 128) if zp_type is np.uint8 else (-128 - 3, 127 - 3)
    inside = (x / (1 / 32) > lo + 0.5) & (x / (1 / 32) < hi - 0.5)
    assert np.all(xt.grad.numpy()[inside] == 1.0)  # straight-through inside the range
    assert np.all(xt.grad.numpy()[~inside & ((x * 32 < lo - 1) | (x * 32 > hi + 1))] == 0.0)


def test_per_channel_dequantized_weights_are_folded() -> None:
    w = rng(3).integers(-127, 128, size=(6, 4, 3, 3)).astype(np.int8)
    scales = (np.abs(randn(6, seed=4)) / 50 + 1e-3).astype(np.float32)
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("Conv", ["xd", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = {
        "wq": w,
        "ws": scales,
        "wz": np.zeros(6, np.int8),
        "xs": np.array(0.0625, np.float32),
        "xz": np.array(0, np.int8),
        "b": randn(6, seed=5),
    }
    m = make_model(nodes, [("x", ["N", 4, 6, 6], F32)], ["y"], inits, opset=13)
    tp = check(m, randn(2, 4, 6, 6), atol=1e-4)
    assert "DequantizeLinear" in tp.runtime_ops and tp.runtime_ops.count("DequantizeLinear") == 1
    assert tp.runtime_ops == ["QuantizeLinear", "DequantizeLinear", "Conv"]


# --------------------------------------------------------------------------------------------------
# model-level properties
# --------------------------------------------------------------------------------------------------


def _conv_relu_chain(weights_as: str = "init", fp16: bool = False) -> onnx.ModelProto:
    """x → Conv(W) → Relu → Conv(W) (the same W) → Add(bias) → GlobalAveragePool → Flatten → Gemm."""
    w = randn(4, 4, 3, 3, seed=1) * 0.3
    gw, gb = randn(5, 4, seed=2), randn(5, seed=3)
    t = np.float16 if fp16 else np.float32
    consts = {"w": w.astype(t), "bias": randn(1, 4, 1, 1, seed=4).astype(t), "gw": gw.astype(t), "gb": gb.astype(t)}
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, np.ndarray] = {}
    if weights_as == "constant":
        nodes += [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in consts.items()]
    else:
        inits = consts
    nodes += [
        helper.make_node("Conv", ["x", "w"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "bias"], ["a"]),
        helper.make_node("GlobalAveragePool", ["a"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], transB=1),
    ]
    return make_model(nodes, [("x", ["N", 4, 7, 6], F16 if fp16 else F32)], ["y"], inits, opset=13)


def test_shared_initializer_and_intermediate_outputs() -> None:
    m = _conv_relu_chain()
    tp = check(m, randn(2, 4, 7, 6), ["c2", "r1", "y", "c1"])
    assert tp.runtime_ops.count("Conv") == 2
    assert len(list(tp.buffers())) == 4  # w registered once


def test_only_the_needed_slice_is_built() -> None:
    m = _conv_relu_chain()
    tp = TorchPrefix(m, ["r1"])
    assert tp.runtime_ops == ["Conv", "Relu"]
    # an unsupported op after the requested tensor is fine
    m.graph.node.append(helper.make_node("TopK", ["y", "k"], ["v", "i"], name="topk"))
    m.graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), "k"))
    check(m, randn(1, 4, 7, 6), ["r1", "c2"])


def test_weights_in_constant_nodes() -> None:
    tp = check(_conv_relu_chain("constant"), randn(2, 4, 7, 6), ["y", "a"])
    assert "Constant" not in tp.runtime_ops
    assert all(not b.requires_grad for b in tp.buffers())
    assert list(tp.parameters()) == []


def test_fp16_initializers() -> None:
    x = randn(2, 4, 7, 6)
    # a pure fp16 model: ORT computes in fp16, we in fp32
    m = _conv_relu_chain(fp16=True)
    ref = ort_run(m, x.astype(np.float16), ["y", "c2"])
    tp = TorchPrefix(m, ["y", "c2"])
    got = tp(torch.from_numpy(x.astype(np.float16).astype(np.float32)))
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.float32
        assert_close(g.detach().numpy(), r, 2e-2)
    # fp16 weights cast to fp32 in the graph: exact
    nodes = [
        helper.make_node("Cast", ["w16"], ["w"], to=F32),
        helper.make_node("Cast", ["b16"], ["b"], to=F32),
        helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = {"w16": randn(3, 4, 3, 3, seed=1).astype(np.float16), "b16": randn(3, seed=2).astype(np.float16)}
    tp = check(make_model(nodes, [("x", ["N", 4, 7, 6], F32)], ["y"], inits, 13), x)
    assert tp.runtime_ops == ["Conv"]


def _variant_model(opset: int) -> onnx.ModelProto:
    """The same computation with the op signatures of each opset (attributes vs inputs)."""
    i64 = np.int64
    inits: dict[str, np.ndarray] = {
        "w": randn(6, 3, 3, 3, seed=1) * 0.3,
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], i64),
        "starts": np.array([0, -1], i64),
        "ends": np.array([INT64_MAX, INT64_MIN], i64),
        "axes_sl": np.array([1, 3], i64),
        "steps": np.array([2, -1], i64),
        "ax23": np.array([2, 3], i64),
        "ax1": np.array([1], i64),
        "split": np.array([1, 2], i64),
    }
    new = opset >= 13
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant"),
        helper.make_node("Conv", ["p", "w"], ["c"]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["cl"]),
        helper.make_node("Slice", ["cl", "starts", "ends", "axes_sl", "steps"], ["sl"]),
        helper.make_node("ReduceMean", ["sl", "ax23"], ["m"], keepdims=1)
        if opset >= 18
        else helper.make_node("ReduceMean", ["sl"], ["m"], keepdims=1, axes=[2, 3]),
        helper.make_node("Squeeze", ["m", "ax23"], ["sq"])
        if new
        else helper.make_node("Squeeze", ["m"], ["sq"], axes=[2, 3]),
        helper.make_node("Split", ["sq", "split"], ["s1", "s2"], axis=1)
        if new
        else helper.make_node("Split", ["sq"], ["s1", "s2"], axis=1, split=[1, 2]),
        helper.make_node("ReduceSum", ["s2", "ax1"], ["rs"], keepdims=1)
        if new
        else helper.make_node("ReduceSum", ["s2"], ["rs"], keepdims=1, axes=[1]),
        helper.make_node("Concat", ["s1", "rs", "s2"], ["cat"], axis=1),
        helper.make_node("Softmax", ["cat"], ["sm"], axis=1),
        helper.make_node("Unsqueeze", ["sm", "ax1"], ["y"])
        if new
        else helper.make_node("Unsqueeze", ["sm"], ["y"], axes=[1]),
    ]
    return make_model(nodes, [("x", ["N", 3, 6, 6], F32)], ["y"], inits, opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_opset_variants(opset: int) -> None:
    check(_variant_model(opset), randn(3, 3, 6, 6), ["y", "sl", "cl"])


def test_dynamic_batch() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(4 * 4 * 4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x))
            return self.fc(h.reshape(h.shape[0], -1))

    torch.manual_seed(0)
    m = export(Net(), torch.randn(2, 3, 8, 8), 13)
    tp = TorchPrefix(m, ["y"])
    for batch in (1, 3):
        x = randn(batch, 3, 8, 8, seed=batch)
        (got,) = tp(torch.from_numpy(x))
        assert got.shape == (batch, 5)
        assert_close(got.detach().numpy(), ort_run(m, x, ["y"])[0], 1e-5)


def test_errors() -> None:
    m = _conv_relu_chain()
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    bad.graph.node.insert(1, helper.make_node("NonMaxSuppression", ["c1"], ["nms"], name="nms0"))
    bad.graph.node[2].input[0] = "nms"  # Relu reads the unsupported op's output
    with pytest.raises(UnsupportedModelError, match=r"NonMaxSuppression node 'nms0'") as ei:
        TorchPrefix(bad, ["y"])
    assert "\n" not in str(ei.value)
    custom = single("Gelu", ["N", 3], opset=17)
    custom.graph.node[0].domain = "com.microsoft"
    custom.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(UnsupportedModelError, match=r"com\.microsoft"):
        TorchPrefix(custom, ["y0"])
    with pytest.raises(UnsupportedModelError, match="nearest and linear"):
        TorchPrefix(single("Resize", ["N", 3, 4, 4], [None, np.array([1, 1, 2, 2], np.float32)], mode="cubic"), ["y0"])
    with pytest.raises(BadInputError, match="nope"):
        TorchPrefix(m, ["nope"])
    two = make_model([helper.make_node("Add", ["x", "z"], ["y"])], [("x", [2], F32), ("z", [2], F32)], ["y"])
    with pytest.raises(UnsupportedModelError, match="2 inputs"):
        TorchPrefix(two, ["y"])
    with pytest.raises(UnsupportedModelError, match="'z'"):
        TorchPrefix(two, ["y"], input_name="x")


def test_input_name_may_be_a_hidden_tensor_and_outputs_may_be_constant() -> None:
    m = _conv_relu_chain()
    x = randn(2, 4, 7, 6)
    r1, y = ort_run(m, x, ["r1", "y"])
    tp = torch_prefix(m, ["y", "w"], input_name="r1")
    got_y, got_w = tp(torch.from_numpy(r1))
    assert_close(got_y.detach().numpy(), y, 1e-5)
    assert_close(got_w.numpy(), numpy_helper.to_array(m.graph.initializer[0]), 0)
    assert "Relu" not in tp.runtime_ops


def test_module_to_and_repeated_calls() -> None:
    m = _conv_relu_chain()
    tp = TorchPrefix(m, ["y", "r1"]).to(torch.device("cpu"))
    x = randn(2, 4, 7, 6)
    with torch.no_grad():
        a = tp(torch.from_numpy(x))
        b = tp(torch.from_numpy(x))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    ref = ort_run(m, x, ["y", "r1"])
    assert_close(a[0].numpy(), ref[0], 1e-5)
    tp.double()
    (y64, _) = tp(torch.from_numpy(x))
    assert y64.dtype == torch.float64
    assert_close(y64.detach().numpy(), ref[0], 1e-5)


def test_supported_ops_cover_the_brief() -> None:
    wanted = [
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Sqrt",
        "Reciprocal",
        "Neg",
        "Exp",
        "Log",
        "Abs",
        "Erf",
        "Tanh",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Relu",
        "LeakyRelu",
        "Clip",
        "Max",
        "Min",
        "Softmax",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "AveragePool",
        "MaxPool",
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "Flatten",
        "Reshape",
        "Transpose",
        "Concat",
        "Split",
        "Slice",
        "Gather",
        "Unsqueeze",
        "Squeeze",
        "Shape",
        "Constant",
        "ConstantOfShape",
        "Identity",
        "Cast",
        "Dropout",
        "Expand",
        "Where",
        "Equal",
        "Pad",
        "Resize",
        "Upsample",
        "Einsum",
        "QuantizeLinear",
        "DequantizeLinear",
    ]
    assert set(wanted) <= SUPPORTED_OPS


# --------------------------------------------------------------------------------------------------
# exported models: ViT-like transformer, MobileNet-like blocks, gradients
# --------------------------------------------------------------------------------------------------


class TinyViT(torch.nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, patch: int = 4, size: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.patch = torch.nn.Conv2d(3, dim, patch, stride=patch)
        n = (size // patch) ** 2
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.pos = torch.nn.Parameter(torch.randn(1, n + 1, dim) * 0.1)
        self.ln1 = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.ln2 = torch.nn.LayerNorm(dim)
        self.fc1 = torch.nn.Linear(dim, 2 * dim)
        self.fc2 = torch.nn.Linear(2 * dim, dim)
        self.act = torch.nn.GELU()
        self.ln = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        b, n, d = x.shape
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos
        h = self.ln1(x)
        qkv = self.qkv(h).reshape(b, n + 1, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n + 1, d))
        x = x + self.fc2(self.act(self.fc1(self.ln2(x))))
        return self.head(self.ln(x)[:, 0])


@pytest.mark.parametrize("opset", [14, 17])
def test_tiny_vit(opset: int) -> None:
    torch.manual_seed(0)
    m = export(TinyViT(), torch.randn(2, 3, 16, 16), opset)
    ops = {n.op_type for n in m.graph.node}
    assert {"Conv", "Concat", "MatMul", "Softmax", "Erf", "Transpose", "Reshape"} <= ops
    assert ("LayerNormalization" in ops) == (opset >= 17)
    softmax_out = next(n.output[0] for n in m.graph.node if n.op_type == "Softmax")
    tp = check(m, randn(3, 3, 16, 16), ["y", softmax_out])
    x1 = randn(1, 3, 16, 16, seed=7)
    assert_close(tp(torch.from_numpy(x1))[0].detach().numpy(), ort_run(m, x1, ["y"])[0], 1e-5)


def test_gradient_matches_finite_differences() -> None:
    m = _variant_model(17)
    tp = TorchPrefix(m, ["sl"], dtype=torch.float64)
    x = torch.from_numpy(randn(1, 3, 6, 6).astype(np.float64)).requires_grad_(True)

    def f(t: torch.Tensor) -> torch.Tensor:
        y = tp(t)[0]
        return (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)).sum()

    f(x).backward()
    assert x.grad is not None
    eps = 1e-6
    fd = torch.zeros_like(x)
    flat = x.detach().reshape(-1)
    with torch.no_grad():
        for i in range(flat.numel()):
            d = torch.zeros_like(flat)
            d[i] = eps
            fd.reshape(-1)[i] = (f((flat + d).reshape(x.shape)) - f((flat - d).reshape(x.shape))) / (2 * eps)
    assert torch.allclose(x.grad, fd, atol=1e-6), float((x.grad - fd).abs().max())


class MobileBlocks(torch.nn.Module):
    """Conv → ReLU6 → depthwise Conv → ReLU6 → pointwise Conv → Add residual, twice, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.Conv2d(8, 16, 1),
                torch.nn.BatchNorm2d(16),
                torch.nn.ReLU6(),
                torch.nn.Conv2d(16, 16, 3, padding=1, groups=16),
                torch.nn.ReLU6(),
                torch.nn.Conv2d(16, 8, 1),
            )
            for _ in range(2)
        )
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.relu6(self.stem(x))
        for b in self.blocks:
            x = x + b(x)
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("opset", [11, 13])
def test_mobilenet_like_blocks_gradient(opset: int) -> None:
    torch.manual_seed(0)
    net = MobileBlocks()
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
    m = export(net, torch.randn(1, 3, 16, 16), opset)
    assert "Clip" in {n.op_type for n in m.graph.node}
    tp = check(m, randn(2, 3, 16, 16), ["y"])
    x = torch.from_numpy(randn(1, 3, 16, 16)).requires_grad_(True)
    tp(x)[0].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    # the torch module and its interpretation agree, gradients included
    x2 = x.detach().clone().requires_grad_(True)
    net(x2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# the real MobileNetV2
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mobilenet_v2_prefix() -> None:
    if not MOBILENET.exists():
        pytest.skip(f"{MOBILENET} is missing (built by the models/mobilenet_v2.py recipe)")
    m = onnx.load(str(MOBILENET))
    inits = {t.name: t for t in m.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in m.graph.node if n.op_type == "Constant" and n.attribute}
    feature = None
    for n in m.graph.node:
        w = inits.get(n.input[1]) if n.op_type == "Conv" else None
        w = w if w is not None else (consts.get(n.input[1]) if n.op_type == "Conv" else None)
        if w is not None and list(w.dims) == [1280, 320, 1, 1]:
            feature = n.input[0]
    assert feature is not None, "no Conv with a [1280, 320, 1, 1] weight"
    logits = m.graph.output[0].name
    inp = next(i for i in m.graph.input if i.name not in inits)
    shape = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
    tp = TorchPrefix(m, [feature, logits])
    x = rng(11).standard_normal([4, *shape[1:]]).astype(np.float32)
    ref = ort_run(m, x, [feature, logits])
    got = tp(torch.from_numpy(x))
    for name, g, r in zip([feature, logits], got, ref, strict=True):
        err = float(np.abs(g.detach().numpy() - r).max() / np.abs(r).max())
        assert err <= 1e-4, f"{name}: relative error {err:.3g}"
    prefix = TorchPrefix(m, [feature])  # what the trigger search differentiates
    xb = torch.from_numpy(x[:1]).requires_grad_(True)
    prefix(xb)[0].sum().backward()  # warm-up
    times = []
    for _ in range(5):
        xb.grad = None
        t0 = time.perf_counter()
        prefix(xb)[0].sum().backward()
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    assert xb.grad is not None and bool(torch.isfinite(xb.grad).all())
    print(f"\nMobileNetV2 prefix up to {feature!r}: forward+backward at batch 1: {dt * 1e3:.1f} ms")


# --------------------------------------------------------------------------------------------------
# recurrent
# --------------------------------------------------------------------------------------------------


class _CRNNTail(torch.nn.Module):
    """EasyOCR's shape: a bidirectional, batch-first LSTM over a sequence of features, then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = torch.nn.LSTM(8, 6, bidirectional=True, batch_first=True)
        self.out = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0])


def test_lstm_exported_by_torch_and_its_gradient() -> None:
    model = export(_CRNNTail(), torch.zeros(2, 7, 8), 17)
    assert any(n.op_type == "LSTM" for n in model.graph.node)
    x = randn(3, 7, 8)
    tp = check(model, x, atol=1e-5)
    xt = torch.from_numpy(x).requires_grad_(True)
    tp(xt)[0].sum().backward()
    assert xt.grad is not None and float(xt.grad.abs().sum()) > 0


@pytest.mark.parametrize(("direction", "states"), [("reverse", True), ("forward", True), ("bidirectional", False),
                                                  ("bidirectional", True)])
def test_lstm_node_forms(direction: str, states: bool) -> None:
    """Every output (Y, Y_h, Y_c) of a hand-built node, against onnxruntime."""
    layout = 0
    dirs, hidden, size, steps, batch = (2 if direction == "bidirectional" else 1), 4, 3, 5, 2
    g = rng(3)
    consts = [g.standard_normal((dirs, 4 * hidden, size)).astype(np.float32) * 0.5,
              g.standard_normal((dirs, 4 * hidden, hidden)).astype(np.float32) * 0.5,
              g.standard_normal((dirs, 8 * hidden)).astype(np.float32) * 0.1, None]
    state_shape = (dirs, batch, hidden)
    if states:
        consts += [g.standard_normal(state_shape).astype(np.float32), g.standard_normal(state_shape).astype(np.float32)]
    model = single("LSTM", [steps, batch, size], consts, n_out=3, hidden_size=hidden, direction=direction,
                   layout=layout)
    check(model, randn(steps, batch, size, seed=4), ["y0", "y1", "y2"])


@pytest.mark.parametrize(("extra", "attrs", "why"), [
    ([None, None, None, randn(1, 12)], {}, "peepholes"),
    ([], {"layout": 1}, "layout 1"),
    ([], {"clip": 3.0}, "clip"),
    ([], {"activations": ["Sigmoid", "Relu", "Tanh"]}, "activations"),
])
def test_lstm_forms_refused_at_construction(extra: list[Any], attrs: dict[str, Any], why: str) -> None:
    consts = [randn(1, 16, 3), randn(1, 16, 4), None, *extra]
    model = single("LSTM", [5, 2, 3], consts, n_out=1, hidden_size=4, **attrs)
    with pytest.raises(UnsupportedModelError, match=why):
        TorchPrefix(model, ["y0"])
