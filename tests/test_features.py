"""neuron_inputs: shape and element order of φ for Gemm, MatMul (token inputs) and Conv hosts."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxstain._onnx.graph import GraphView
from onnxstain._onnx.hosts import HostLayer, find_hosts, neuron_affine
from onnxstain.features import neuron_inputs, phi_at, phi_radii, phi_sum


def _model(nodes, inits, in_shape, out_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _only_host(model: onnx.ModelProto) -> HostLayer:
    hosts = find_hosts(model)
    assert len(hosts) == 1
    return hosts[0]


def _run(model: onnx.ModelProto, x: np.ndarray, name: str) -> np.ndarray:
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    tapped.graph.output.append(helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(tapped.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run([name], {"x": x})[0]


# -- Gemm (rank-2 input) -------------------------------------------------------------------------------
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_phi_is_the_input_row(trans_b):
    rng = np.random.default_rng(0)
    d, out = 12, 5
    w = rng.normal(size=(out, d) if trans_b else (d, out))
    model = _model([helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="fc", transB=trans_b, alpha=0.5),
                    helper.make_node("Relu", ["g"], ["y"])],
                   [("w", w), ("b", rng.normal(size=out))], ("n", d), ("n", out))
    host = _only_host(model)
    assert host.m == d and host.positions == 1
    x = rng.normal(size=(4, d)).astype(np.float32)
    phi = neuron_inputs(host, x)
    assert phi.shape == (4, 1, d) and phi.dtype == np.float32
    np.testing.assert_array_equal(phi[:, 0, :], x)
    # The order of φ matches the order of the neuron's weights.
    pre = _run(model, x, "g")
    view = GraphView(model)
    for k in range(out):
        row, b = neuron_affine(view, host, k)
        np.testing.assert_allclose(phi[:, 0, :] @ row + b, pre[:, k], rtol=1e-5, atol=1e-5)


def test_gemm_phi_casts_to_float32():
    model = _model([helper.make_node("Gemm", ["x", "w"], ["g"], name="fc", transB=1),
                    helper.make_node("Relu", ["g"], ["y"])],
                   [("w", np.ones((3, 6)))], ("n", 6), ("n", 3))
    host = _only_host(model)
    x = np.arange(12, dtype=np.float64).reshape(2, 6)
    for dtype in (np.float64, np.float16):
        phi = neuron_inputs(host, x.astype(dtype))
        assert phi.dtype == np.float32
        np.testing.assert_array_equal(phi[:, 0], x.astype(np.float32))


# -- MatMul with token inputs -----------------------------------------------------------------------------
def _matmul_model(in_shape, d=10, out=4, seed=0):
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["lin"], name="add"),
             helper.make_node("Relu", ["lin"], ["y"])]
    return _model(nodes, [("w", rng.normal(size=(d, out))), ("b", rng.normal(size=out))], in_shape,
                  (*in_shape[:-1], out))


def test_matmul_rank3_tokens_are_positions():
    n, t, d = 3, 7, 10
    model = _matmul_model(("n", t, d), d=d)
    host = _only_host(model)
    assert host.op == "MatMul" and host.m == d and host.usable
    x = np.random.default_rng(1).normal(size=(n, t, d)).astype(np.float32)
    phi = neuron_inputs(host, x)
    assert phi.shape == (n, t, d)  # P = T
    np.testing.assert_array_equal(phi, x)
    pre = _run(model, x, "lin")  # [N, T, out]
    view = GraphView(model)
    for k in range(host.out_channels):
        row, b = neuron_affine(view, host, k)
        np.testing.assert_allclose(phi @ row + b, pre[:, :, k], rtol=1e-5, atol=1e-5)


def test_matmul_rank4_positions_flatten_in_row_major_order():
    x = np.random.default_rng(2).normal(size=(2, 3, 4, 10)).astype(np.float32)
    host = _only_host(_matmul_model(("n", 3, 4, 10)))
    phi = neuron_inputs(host, x)
    assert phi.shape == (2, 12, 10)
    np.testing.assert_array_equal(phi[1, 2 * 4 + 3], x[1, 2, 3])


def test_matmul_rank2_is_one_position():
    x = np.random.default_rng(3).normal(size=(5, 10)).astype(np.float32)
    host = _only_host(_matmul_model(("n", 10)))
    phi = neuron_inputs(host, x)
    assert phi.shape == (5, 1, 10)
    np.testing.assert_array_equal(phi[:, 0], x)


# -- Conv: explicit im2col indexing ------------------------------------------------------------------------
def _conv_host(cin, cout, hw, group=1, **attrs) -> HostLayer:
    kernel = attrs.pop("kernel", (3, 3))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", group=group, kernel_shape=list(kernel),
                              **attrs),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(
        nodes, "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, *hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((cout, cin // group, *kernel), np.float32), "w"),
         numpy_helper.from_array(np.zeros(cout, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _only_host(model)


@pytest.mark.parametrize(("cin", "group", "hw", "attrs"), [
    (2, 1, (6, 7), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    (2, 1, (6, 7), dict(pads=[0, 1, 1, 0])),
    (3, 1, (9, 8), dict(dilations=[2, 2], pads=[1, 2, 0, 1], kernel=(3, 2))),
    (4, 2, (5, 6), dict(strides=[1, 2], pads=[1, 1, 1, 1])),
    (2, 1, (7, 8), dict(strides=[2, 2], auto_pad="SAME_UPPER")),
])
def test_conv_phi_index_order(cin, group, hw, attrs):
    """φ[n, r·W_out + c, (ch·kh + i)·kw + j] = x_pad[n, g·Cg + ch, r·sh + i·dh, c·sw + j·dw]."""
    host = _conv_host(cin, 2 * group, hw, group=group, **attrs)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, cin, *hw)).astype(np.float32)
    top, left, bottom, right = host.pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    kh, kw = host.kernel
    sh, sw = host.strides
    dh, dw = host.dilations
    oh, ow = host.out_hw
    assert oh == (hw[0] + top + bottom - (kh - 1) * dh - 1) // sh + 1
    assert ow == (hw[1] + left + right - (kw - 1) * dw - 1) // sw + 1
    cg = cin // group
    for g in range(group):
        phi = neuron_inputs(host, x, g)
        assert phi.shape == (2, oh * ow, cg * kh * kw) == (2, host.positions, host.m)
        expected = np.empty_like(phi)
        for r in range(oh):
            for c in range(ow):
                for ch in range(cg):
                    for i in range(kh):
                        for j in range(kw):
                            expected[:, r * ow + c, (ch * kh + i) * kw + j] = xp[:, g * cg + ch, r * sh + i * dh,
                                                                                  c * sw + j * dw]
        np.testing.assert_array_equal(phi, expected)


@pytest.mark.parametrize(("cin", "group", "hw", "attrs"), [
    (2, 1, (6, 7), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    (3, 1, (9, 8), dict(dilations=[2, 2], pads=[1, 2, 0, 1], kernel=(3, 2))),
    (4, 2, (5, 6), dict(strides=[1, 2], pads=[1, 1, 1, 1])),
    (2, 1, (7, 8), dict(strides=[2, 2], auto_pad="SAME_UPPER")),
])
def test_phi_sum_radii_and_one_position_without_unfolding(cin, group, hw, attrs):
    """The dense lock's calibration streams φ's sum, radii and lock-position rows without unfolding φ (a large
    input's φ is gigabytes per batch): the same values as from ``neuron_inputs``."""
    host = _conv_host(cin, 2 * group, hw, group=group, **attrs)
    x = np.random.default_rng(5).normal(size=(3, cin, *hw)).astype(np.float32)
    phi = neuron_inputs(host, x).astype(np.float64)
    total, samples = phi_sum(host, x)
    np.testing.assert_allclose(total, phi.reshape(-1, host.m).sum(axis=0), rtol=1e-12, atol=1e-12)
    assert samples == 3 * host.positions
    centre = total / samples + 0.25
    np.testing.assert_allclose(phi_radii(host, x, centre), np.linalg.norm(phi - centre, axis=-1), rtol=1e-12)
    for position in (0, host.positions // 2, host.positions - 1):
        np.testing.assert_array_equal(phi_at(host, x, position), neuron_inputs(host, x)[:, position])


def test_phi_helpers_on_a_gemm_host():
    host = _only_host(_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], [("w", np.ones((3, 5)))],
                             (4, 5), (4, 3)))
    x = np.random.default_rng(6).normal(size=(4, 5)).astype(np.float32)
    total, samples = phi_sum(host, x)
    np.testing.assert_allclose(total, x.astype(np.float64).sum(axis=0))
    assert samples == 4
    np.testing.assert_allclose(phi_radii(host, x, np.zeros(5))[:, 0], np.linalg.norm(x.astype(np.float64), axis=1),
                               rtol=1e-6)
    np.testing.assert_array_equal(phi_at(host, x, 0), x)
