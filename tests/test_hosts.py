"""Host discovery, reading/writing one neuron, and receptive fields (onnxstain/_onnx/hosts.py).

Every numeric claim is checked against onnxruntime on tiny models built with ``onnx.helper``:
the pre-activation tensor ``host.output`` is exposed as an extra graph output and compared with
``neuron_inputs(host, x) @ w_k + b_k``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tinymodels import no_host_model, tiny_cnn

from onnxstain._onnx.graph import GraphView, tensor_shapes
from onnxstain._onnx.hosts import (
    HostLayer,
    ReceptiveField,
    find_hosts,
    neuron_affine,
    receptive_fields,
    stored_layer,
    write_neuron,
)
from onnxstain.features import neuron_inputs
from onnxstain.runtime import with_outputs

BATCH = 3


# -- helpers ---------------------------------------------------------------------------------------
def _t(name: str, arr, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype), name)


def _const(name: str, arr, dtype=np.float32) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=_t(name, arr, dtype))


def _model(nodes, inits, in_shape, outputs=("y",), elem=TensorProto.FLOAT, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", elem, list(in_shape))],
        [helper.make_tensor_value_info(o, elem, None) for o in outputs], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    # Give the outputs their inferred shapes (the checker wants a shape on graph outputs).
    g = onnx.shape_inference.infer_shapes(model).graph
    inferred = {vi.name: vi for vi in list(g.value_info) + list(g.output) if vi.type.tensor_type.HasField("shape")}
    for out in model.graph.output:
        if out.name in inferred:
            out.CopyFrom(inferred[out.name])
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray, names) -> dict[str, np.ndarray]:
    """Run ``model`` with ``names`` exposed as outputs; no graph fusion (BN/activation stay separate)."""
    tapped = with_outputs(model, names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(tapped.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    return dict(zip(names, sess.run(list(names), feed), strict=True))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _host(model: onnx.ModelProto, name: str) -> HostLayer:
    hosts = {h.name: h for h in find_hosts(model)}
    assert name in hosts, f"{name} not found among {sorted(hosts)}"
    return hosts[name]


def _pre_activation(host: HostLayer, out: np.ndarray) -> np.ndarray:
    """ORT pre-activation tensor → [N, P, out_channels]."""
    if host.op == "Conv":
        n, c = out.shape[:2]
        return out.reshape(n, c, -1).transpose(0, 2, 1)
    if out.ndim == 2:
        return out[:, None, :]
    return out.reshape(out.shape[0], -1, out.shape[-1])


def _predicted(host: HostLayer, view: GraphView, x_in: np.ndarray, k: int) -> np.ndarray:
    """φ·w_k + b_k for neuron k at every position: [N, P]."""
    phi = neuron_inputs(host, x_in, host.group_of(k)).astype(np.float64)
    row, b = neuron_affine(view, host, k)
    assert row.shape == (host.m,)
    return phi @ row + b


def _activation_nodes(act: str | None, src: str, out: str = "y") -> tuple[list, list]:
    if act is None:
        return [helper.make_node("Identity", [src], [out], name="ident")], []
    if act == "relu":
        return [helper.make_node("Relu", [src], [out], name="act")], []
    if act == "relu6":
        return ([helper.make_node("Clip", [src, "lo", "hi"], [out], name="act")],
                [_t("lo", 0.0), _t("hi", 6.0)])
    return [helper.make_node(act, [src], [out], name="act")], []


def conv_model(cin=3, cout=5, kernel=(3, 3), size=(11, 11), *, seed=0, group=1, bias=True, bn=False,
               act: str | None = "relu", dtype=np.float32, const_weight=False, **attrs) -> onnx.ModelProto:
    """x → Conv (+BatchNormalization) → activation → y, with static shapes."""
    rng = np.random.default_rng(seed)
    inits = []
    nodes = []
    w = rng.normal(0, 0.5, (cout, cin // group, *kernel))
    if const_weight:
        nodes.append(_const("w", w, dtype))
    else:
        inits.append(_t("w", w, dtype))
    ins = ["x", "w"]
    if bias:
        inits.append(_t("b", rng.normal(0, 0.3, cout), dtype))
        ins.append("b")
    nodes.append(helper.make_node("Conv", ins, ["c"], name="conv", group=group, kernel_shape=list(kernel), **attrs))
    last = "c"
    if bn:
        nodes.append(helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bnout"], name="bn",
                                      epsilon=1e-3))
        inits += [_t("g", rng.uniform(0.5, 2.0, cout), dtype), _t("be", rng.normal(0, 0.5, cout), dtype),
                  _t("mu", rng.normal(0, 0.5, cout), dtype), _t("var", rng.uniform(0.3, 2.0, cout), dtype)]
        last = "bnout"
    act_nodes, act_inits = _activation_nodes(act, last)
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    return _model(nodes + act_nodes, inits + [_t(i.name, numpy_helper.to_array(i), dtype) for i in act_inits],
                  (BATCH, cin, *size), elem=elem)


def gemm_model(d=20, out=7, *, seed=0, trans_b=1, alpha=1.0, beta=1.0, bias_shape="vec", act="relu",
               const_weight=False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.4, (out, d) if trans_b else (d, out))
    nodes, inits = [], []
    if const_weight:
        nodes.append(_const("w", w))
    else:
        inits.append(_t("w", w))
    ins = ["x", "w"]
    if bias_shape is not None:
        b = rng.normal(0, 0.3, out)
        inits.append(_t("b", b.reshape(1, out) if bias_shape == "row" else b))
        ins.append("b")
    nodes.append(helper.make_node("Gemm", ins, ["g"], name="fc", transB=trans_b, alpha=alpha, beta=beta))
    act_nodes, act_inits = _activation_nodes(act, "g")
    return _model(nodes + act_nodes, inits + act_inits, (BATCH, d))


def matmul_model(d=20, out=6, *, seed=0, tokens: int | None = None, bias_first=False, act="relu",
                 bias=True) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [_t("w", rng.normal(0, 0.4, (d, out)))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm")]
    last = "mm"
    if bias:
        inits.append(_t("b", rng.normal(0, 0.3, out)))
        nodes.append(helper.make_node("Add", ["b", "mm"] if bias_first else ["mm", "b"], ["lin"], name="addb"))
        last = "lin"
    act_nodes, act_inits = _activation_nodes(act, last)
    shape = (BATCH, d) if tokens is None else (BATCH, tokens, d)
    return _model(nodes + act_nodes, inits + act_inits, shape)


def _input_for(model: onnx.ModelProto, seed: int = 1) -> np.ndarray:
    t = model.graph.input[0].type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else BATCH for d in t.shape.dim]
    dtype = np.float16 if t.elem_type == TensorProto.FLOAT16 else np.float32
    return np.random.default_rng(seed).normal(0, 1, shape).astype(dtype)


# -- 1. neuron_affine + neuron_inputs reproduce the pre-activation ----------------------------------------
CONV_CASES = {
    "plain_s2_p1": dict(strides=[2, 2], pads=[1, 1, 1, 1]),
    "asym_pads": dict(size=(9, 10), pads=[0, 1, 1, 0]),
    "same_upper_s2_even": dict(size=(10, 10), strides=[2, 2], auto_pad="SAME_UPPER"),
    "same_upper_s2_odd": dict(size=(11, 12), strides=[2, 2], auto_pad="SAME_UPPER"),
    "same_lower_s2": dict(size=(10, 11), strides=[2, 2], auto_pad="SAME_LOWER"),
    "dilation2": dict(size=(12, 11), dilations=[2, 2], pads=[2, 1, 2, 3]),
    "rect_kernel_stride": dict(kernel=(3, 5), size=(9, 13), strides=[1, 2], pads=[1, 2, 1, 2]),
    "valid_s3": dict(size=(13, 14), strides=[3, 3]),
    "grouped2": dict(cin=4, cout=6, group=2, pads=[1, 1, 1, 1]),
    "grouped3_s2": dict(cin=6, cout=9, group=3, strides=[2, 2], pads=[1, 0, 0, 1]),
    "depthwise": dict(cin=4, cout=4, group=4, pads=[1, 1, 1, 1]),
    "depthwise_mult2": dict(cin=3, cout=6, group=3, strides=[2, 2], pads=[1, 1, 1, 1]),
    "no_bias": dict(bias=False, pads=[1, 1, 1, 1]),
    "batchnorm": dict(bn=True, pads=[1, 1, 1, 1], strides=[2, 2]),
    "batchnorm_no_bias_grouped": dict(cin=4, cout=6, group=2, bn=True, bias=False),
    "const_weight": dict(const_weight=True, pads=[1, 1, 1, 1]),
    "relu6": dict(act="relu6", pads=[1, 1, 1, 1]),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_affine_matches_onnxruntime(case):
    model = conv_model(seed=sorted(CONV_CASES).index(case), **CONV_CASES[case])
    host = _host(model, "conv")
    view = GraphView(model)
    x = _input_for(model)
    got = _run(model, x, [host.input, host.output])
    pre = got[host.output]
    assert host.out_hw == tuple(pre.shape[2:])
    assert host.out_channels == pre.shape[1]
    assert host.positions == pre.shape[2] * pre.shape[3]
    assert host.m == (host.in_channels // host.groups) * host.kernel[0] * host.kernel[1]
    assert (host.batchnorm is not None) == CONV_CASES[case].get("bn", False)
    actual = _pre_activation(host, pre)
    for g in range(host.groups):
        phi = neuron_inputs(host, got[host.input], g)
        assert phi.shape == (BATCH, host.positions, host.m)
    for k in range(host.out_channels):
        np.testing.assert_allclose(_predicted(host, view, got[host.input], k), actual[:, :, k],
                                   rtol=1e-4, atol=1e-4, err_msg=f"{case}: neuron {k}")


@pytest.mark.parametrize(("size", "strides", "mode", "expected"), [
    ((10, 10), [2, 2], "SAME_UPPER", (0, 0, 1, 1)),
    ((11, 12), [2, 2], "SAME_UPPER", (1, 0, 1, 1)),
    ((10, 11), [2, 2], "SAME_LOWER", (1, 1, 0, 1)),
    ((7, 7), [1, 1], "SAME_UPPER", (1, 1, 1, 1)),
])
def test_auto_pad_resolved_to_explicit_pads(size, strides, mode, expected):
    host = _host(conv_model(size=size, strides=strides, auto_pad=mode), "conv")
    assert host.pads == expected


def test_wrong_group_gives_other_channels():
    """φ of group 1 must differ from φ of group 0 (guards against ignoring ``group``)."""
    model = conv_model(cin=4, cout=6, group=2, pads=[1, 1, 1, 1])
    host = _host(model, "conv")
    x = _input_for(model)
    assert host.group_of(2) == 0 and host.group_of(3) == 1 and host.group_of(5) == 1
    assert not np.allclose(neuron_inputs(host, x, 0), neuron_inputs(host, x, 1))


@pytest.mark.parametrize(("trans_b", "alpha", "beta", "bias_shape"), [
    (1, 1.0, 1.0, "vec"),
    (0, 1.0, 1.0, "vec"),
    (1, 0.7, 1.9, "vec"),
    (0, -1.3, 0.4, "row"),
    (1, 2.5, 1.0, None),
])
def test_gemm_affine_matches_onnxruntime(trans_b, alpha, beta, bias_shape):
    model = gemm_model(trans_b=trans_b, alpha=alpha, beta=beta, bias_shape=bias_shape)
    host = _host(model, "fc")
    assert (host.op, host.trans_b, host.in_channels, host.out_channels) == ("Gemm", bool(trans_b), 20, 7)
    assert host.alpha == pytest.approx(alpha) and host.beta == pytest.approx(beta)
    assert host.m == 20 and host.positions == 1
    view = GraphView(model)
    x = _input_for(model)
    got = _run(model, x, [host.input, host.output])
    actual = _pre_activation(host, got[host.output])
    for k in range(host.out_channels):
        np.testing.assert_allclose(_predicted(host, view, got[host.input], k), actual[:, :, k], rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize(("tokens", "bias_first"), [(None, False), (None, True), (5, False)])
def test_matmul_add_affine_matches_onnxruntime(tokens, bias_first):
    model = matmul_model(tokens=tokens, bias_first=bias_first)
    host = _host(model, "mm")
    assert (host.op, host.in_channels, host.out_channels, host.m) == ("MatMul", 20, 6, 20)
    assert host.output == "lin" and host.bias == "b" and host.bias_add == "addb"
    view = GraphView(model)
    x = _input_for(model)
    got = _run(model, x, [host.input, host.output])
    actual = _pre_activation(host, got[host.output])
    assert actual.shape[1] == (tokens or 1)
    for k in range(host.out_channels):
        np.testing.assert_allclose(_predicted(host, view, got[host.input], k), actual[:, :, k], rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("bn", [False, True])
def test_tiny_cnn_all_hosts_match_onnxruntime(bn):
    """Hosts fed by an intermediate tensor (not the graph input), symbolic batch dimension."""
    model = tiny_cnn(seed=3, size=15, bn=bn)
    hosts = find_hosts(model)
    assert [h.op for h in hosts] == ["Conv", "Conv", "Gemm"]
    view = GraphView(model)
    x = np.random.default_rng(0).normal(0, 1, (2, 3, 15, 15)).astype(np.float32)
    names = sorted({t for h in hosts for t in (h.input, h.output)})
    got = _run(model, x, names)
    for host in hosts:
        actual = _pre_activation(host, got[host.output])
        for k in range(host.out_channels):
            np.testing.assert_allclose(_predicted(host, view, got[host.input], k), actual[:, :, k],
                                       rtol=1e-4, atol=1e-4, err_msg=f"{host.name}[{k}]")


# -- 2. write_neuron ------------------------------------------------------------------------------------
def _check_write(model, host_name, k, *, seed=0, rtol=1e-4, atol=1e-4, scale=0.5, keep_batchnorm=False):
    """Write a random neuron k; check ORT's new pre-activation and that the other neurons are untouched."""
    host = _host(model, host_name)
    x = _input_for(model, seed=seed + 7)
    before = _run(model, x, [host.input, host.output])
    rng = np.random.default_rng(seed)
    row = rng.normal(0, scale, host.m)
    bias = float(rng.normal(0, 1))
    edited = _copy(model)
    view = GraphView(edited)
    write_neuron(view, host, k, row, bias, keep_batchnorm=keep_batchnorm)
    onnx.checker.check_model(edited)
    after = _run(edited, x, [host.input, host.output])
    np.testing.assert_array_equal(after[host.input], before[host.input])
    phi = neuron_inputs(host, after[host.input], host.group_of(k)).astype(np.float64)
    new = _pre_activation(host, after[host.output])
    old = _pre_activation(host, before[host.output])
    np.testing.assert_allclose(new[:, :, k], phi @ row + bias, rtol=rtol, atol=atol)
    others = [j for j in range(host.out_channels) if j != k]
    np.testing.assert_allclose(new[:, :, others], old[:, :, others], rtol=rtol, atol=atol)
    assert not np.allclose(new[:, :, k], old[:, :, k])
    return edited, view, host, row, bias


WRITE_CASES = {
    "conv": (lambda: conv_model(strides=[2, 2], pads=[1, 1, 1, 1]), "conv", 3),
    "conv_batchnorm": (lambda: conv_model(bn=True, pads=[1, 1, 1, 1]), "conv", 1),
    "conv_batchnorm_no_bias": (lambda: conv_model(bn=True, bias=False, pads=[0, 1, 1, 0]), "conv", 4),
    "conv_grouped_second_group": (lambda: conv_model(cin=4, cout=6, group=2, pads=[1, 1, 1, 1]), "conv", 4),
    "conv_same_upper": (lambda: conv_model(size=(10, 11), strides=[2, 2], auto_pad="SAME_UPPER"), "conv", 0),
    "conv_const_weight": (lambda: conv_model(const_weight=True, pads=[1, 1, 1, 1]), "conv", 2),
    "gemm_transB1": (lambda: gemm_model(trans_b=1, alpha=0.7, beta=1.9), "fc", 5),
    "gemm_transB0": (lambda: gemm_model(trans_b=0, alpha=-1.3, beta=0.4, bias_shape="row"), "fc", 0),
    "gemm_const_weight": (lambda: gemm_model(trans_b=0, alpha=2.0, beta=0.5, const_weight=True), "fc", 6),
    "matmul_add": (lambda: matmul_model(), "mm", 2),
    "matmul_add_bias_first_tokens": (lambda: matmul_model(tokens=4, bias_first=True), "mm", 5),
}


@pytest.mark.parametrize("case", sorted(WRITE_CASES))
def test_write_neuron_matches_onnxruntime(case):
    build, name, k = WRITE_CASES[case]
    model = build()
    n_init = len(model.graph.initializer)
    edited, view, host, row, bias = _check_write(model, name, k)
    # The edit is in place: no new tensors, and reading the neuron back gives what was written.
    assert len(edited.graph.initializer) == n_init
    back_row, back_bias = neuron_affine(view, host, k)
    np.testing.assert_allclose(back_row, row, rtol=1e-5, atol=1e-6)
    assert back_bias == pytest.approx(bias, rel=1e-5, abs=1e-6)
    # The original model object is untouched.
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]),
                                  numpy_helper.to_array(build().graph.initializer[0]))


def test_write_neuron_batchnorm_channel_becomes_identity():
    model = conv_model(bn=True, pads=[1, 1, 1, 1])
    _, view, _, _, bias = _check_write(model, "conv", 2)
    bn = view.find_node("bn")
    gamma, beta, mean, var = (view.array(t) for t in bn.input[1:5])
    eps = view.attr(bn, "epsilon")
    assert gamma[2] == 1.0 and mean[2] == 0.0
    assert beta[2] == pytest.approx(bias, rel=1e-6)
    assert var[2] + eps == pytest.approx(1.0, abs=1e-6)
    assert view.array("b")[2] == 0.0
    # Other BN channels unchanged.
    orig = GraphView(model)
    for t in bn.input[1:5]:
        np.testing.assert_array_equal(np.delete(view.array(t), 2), np.delete(orig.array(t), 2))


@pytest.mark.parametrize("case", ["conv_batchnorm", "conv_batchnorm_no_bias"])
def test_write_neuron_keep_batchnorm_matches_onnxruntime(case):
    build, name, k = WRITE_CASES[case]
    _, view, host, row, bias = _check_write(build(), name, k, keep_batchnorm=True)
    back_row, back_bias = neuron_affine(view, host, k)
    np.testing.assert_allclose(back_row, row, rtol=1e-5, atol=1e-6)
    assert back_bias == pytest.approx(bias, rel=1e-5, abs=1e-6)


def test_write_neuron_keep_batchnorm_keeps_its_statistics():
    """A hidden edit under an unfolded BatchNorm keeps the channel's BN scale, mean and variance (an identity
    BN channel would stand out among its neighbours); the Conv row is stored over the BN scale, the bias goes
    into the BN shift, and the Conv's own bias is left alone."""
    model = conv_model(bn=True, pads=[1, 1, 1, 1])
    _, view, _, row, bias = _check_write(model, "conv", 2, keep_batchnorm=True)
    bn = view.find_node("bn")
    orig = GraphView(model)
    for i, t in enumerate(bn.input[1:5]):
        if i != 1:  # gamma, mean, var: all channels as they were
            np.testing.assert_array_equal(view.array(t), orig.array(t))
    np.testing.assert_array_equal(np.delete(view.array(bn.input[2]), 2), np.delete(orig.array(bn.input[2]), 2))
    np.testing.assert_array_equal(view.array("b"), orig.array("b"))
    gamma, mean, var = (orig.array(bn.input[i])[2] for i in (1, 3, 4))
    scale = gamma / np.sqrt(var + view.attr(bn, "epsilon"))
    np.testing.assert_allclose(view.array("w")[2].reshape(-1), row / scale, rtol=1e-5)
    assert view.array(bn.input[2])[2] == pytest.approx(bias - scale * (orig.array("b")[2] - mean), rel=1e-5)
    rows, b, row_scale, _ = stored_layer(view, _host(model, "conv"))  # what the hiding rule ranks
    np.testing.assert_allclose(rows[2], row / scale, rtol=1e-5)
    assert b[2] == pytest.approx(view.array(bn.input[2])[2]) and row_scale[2] == pytest.approx(scale)


def test_write_neuron_keep_batchnorm_without_scale_becomes_identity():
    """A BN channel whose scale is 0 cannot carry a row: it is set to the identity and the Conv takes the map."""
    model = conv_model(bn=True, pads=[1, 1, 1, 1])
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    gamma = next(t for t in model.graph.initializer if t.name == bn.input[1])
    g = numpy_helper.to_array(gamma).copy()
    g[2] = 0.0
    gamma.CopyFrom(numpy_helper.from_array(g, gamma.name))
    host = _host(model, "conv")
    view = GraphView(_copy(model))
    write_neuron(view, host, 2, np.ones(host.m), 0.5, keep_batchnorm=True)
    bn = view.find_node("bn")
    assert view.array(bn.input[1])[2] == 1.0 and view.array(bn.input[3])[2] == 0.0
    assert view.array(bn.input[2])[2] == pytest.approx(0.5)
    back_row, back_bias = neuron_affine(view, host, 2)
    np.testing.assert_allclose(back_row, np.ones(host.m), rtol=1e-5)
    assert back_bias == pytest.approx(0.5, rel=1e-5)


def _shared_weight_model(const_weight=False) -> onnx.ModelProto:
    """x → conv_a(w, ba) → relu ─┐
       x → conv_b(w, bb) → relu ─┴ Add → y   (one weight tensor shared by both Convs)."""
    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.5, (6, 3, 3, 3))
    nodes, inits = [], [_t("ba", rng.normal(0, 0.3, 6)), _t("bb", rng.normal(0, 0.3, 6))]
    if const_weight:
        nodes.append(_const("w", w))
    else:
        inits.append(_t("w", w))
    nodes += [
        helper.make_node("Conv", ["x", "w", "ba"], ["ca"], name="conv_a", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ca"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["x", "w", "bb"], ["cb"], name="conv_b", kernel_shape=[3, 3], strides=[1, 1],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["cb"], ["rb"], name="relu_b"),
        helper.make_node("Add", ["ra", "rb"], ["y"], name="add"),
    ]
    return _model(nodes, inits, (BATCH, 3, 8, 9))


@pytest.mark.parametrize("const_weight", [False, True])
def test_write_neuron_shared_weight_leaves_other_conv_alone(const_weight):
    model = _shared_weight_model(const_weight)
    x = _input_for(model)
    before = _run(model, x, ["ca", "cb"])
    edited, view, _, _, _ = _check_write(model, "conv_a", 1)
    after = _run(edited, x, ["ca", "cb"])
    np.testing.assert_array_equal(after["cb"], before["cb"])
    conv_a, conv_b = view.find_node("conv_a"), view.find_node("conv_b")
    assert conv_b.input[1] == "w" and conv_a.input[1] != "w"
    np.testing.assert_array_equal(view.array("w"), GraphView(model).array("w"))
    # conv_b, now the only user of "w", can be edited too, without touching conv_a.
    hosts = {h.name: h for h in find_hosts(edited)}
    _check_write(edited, "conv_b", 4, seed=3)
    assert hosts["conv_a"].weight == conv_a.input[1]


def test_write_two_neurons_of_host_with_shared_weight():
    model = _shared_weight_model()
    host = _host(model, "conv_a")
    x = _input_for(model)
    rng = np.random.default_rng(0)
    rows = {1: rng.normal(0, 0.5, host.m), 4: rng.normal(0, 0.5, host.m)}
    biases = {1: 0.3, 4: -0.2}
    edited = _copy(model)
    view = GraphView(edited)
    for k in rows:
        write_neuron(view, host, k, rows[k], biases[k])
    got = _run(edited, x, [host.input, host.output])
    phi = neuron_inputs(host, got[host.input]).astype(np.float64)
    new = _pre_activation(host, got[host.output])
    for k in rows:
        np.testing.assert_allclose(new[:, :, k], phi @ rows[k] + biases[k], rtol=1e-4, atol=1e-4,
                                   err_msg=f"neuron {k}")


def test_write_two_neurons_same_host_unshared():
    model = conv_model(bn=True, pads=[1, 1, 1, 1])
    host = _host(model, "conv")
    x = _input_for(model)
    rng = np.random.default_rng(1)
    rows = {0: rng.normal(0, 0.5, host.m), 3: rng.normal(0, 0.5, host.m)}
    edited = _copy(model)
    view = GraphView(edited)
    for k in rows:
        write_neuron(view, host, k, rows[k], 0.1 * k)
    got = _run(edited, x, [host.input, host.output])
    phi = neuron_inputs(host, got[host.input]).astype(np.float64)
    new = _pre_activation(host, got[host.output])
    for k in rows:
        np.testing.assert_allclose(new[:, :, k], phi @ rows[k] + 0.1 * k, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bn", [False, True])
def test_write_neuron_fp16(bn):
    model = conv_model(dtype=np.float16, bn=bn, pads=[1, 1, 1, 1], strides=[2, 2])
    edited, *_ = _check_write(model, "conv", 2, rtol=2e-2, atol=3e-2, scale=0.3)
    for init in edited.graph.initializer:
        assert init.data_type == TensorProto.FLOAT16, init.name


def test_write_neuron_without_bias_raises():
    model = conv_model(bias=False, pads=[1, 1, 1, 1])
    host = _host(model, "conv")
    view = GraphView(_copy(model))
    with pytest.raises(ValueError, match="no bias"):
        write_neuron(view, host, 0, np.ones(host.m), 0.5)


def test_write_neuron_failure_leaves_model_unchanged():
    model = conv_model(bias=False, pads=[1, 1, 1, 1])
    host = _host(model, "conv")
    view = GraphView(_copy(model))
    with pytest.raises(ValueError):
        write_neuron(view, host, 0, np.ones(host.m), 0.5)
    np.testing.assert_array_equal(view.array("w"), GraphView(model).array("w"))


# -- 3. receptive fields ---------------------------------------------------------------------------------
def _rf_chain_model(height: int, width: int) -> onnx.ModelProto:
    """Spatial chain with stride 2, symmetric/asymmetric/auto pads, MaxPools, dilation and a residual Add.

    x[2,H,W] → c1 3×3 s2 p1 → r1 ─┬→ a 3×3 p1 ─┐
                                   └→ b 5×5 p2 ─┴ Add → mp 2×2 s2 → c3 3×3 pads[0,1,1,0] → r3
    → mp2 3×3 s2 p1 → c4 3×3 dil2 p2 → y 3×3 SAME_UPPER s2
    All weights positive and the input positive, so any input change propagates through Relu and MaxPool.
    """
    rng = np.random.default_rng(11)
    inits: list = []
    nodes = []

    def conv(src, dst, cout, cin, k, **attrs):
        inits.append(_t(f"w_{dst}", rng.uniform(0.05, 0.2, (cout, cin, *k))))
        nodes.append(helper.make_node("Conv", [src, inits[-1].name], [dst], name=dst, kernel_shape=list(k), **attrs))

    conv("x", "c1", 3, 2, (3, 3), strides=[2, 2], pads=[1, 1, 1, 1])
    nodes.append(helper.make_node("Relu", ["c1"], ["r1"], name="r1"))
    conv("r1", "a", 3, 3, (3, 3), pads=[1, 1, 1, 1])
    conv("r1", "b", 3, 3, (5, 5), pads=[2, 2, 2, 2])
    nodes.append(helper.make_node("Add", ["a", "b"], ["res"], name="res"))
    nodes.append(helper.make_node("MaxPool", ["res"], ["mp"], name="mp", kernel_shape=[2, 2], strides=[2, 2]))
    conv("mp", "c3", 3, 3, (3, 3), pads=[0, 1, 1, 0])
    nodes.append(helper.make_node("Relu", ["c3"], ["r3"], name="r3"))
    nodes.append(helper.make_node("MaxPool", ["r3"], ["mp2"], name="mp2", kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 1, 1, 1]))
    conv("mp2", "c4", 3, 3, (3, 3), dilations=[2, 2], pads=[2, 2, 2, 2])
    conv("c4", "y", 2, 3, (3, 3), strides=[2, 2], auto_pad="SAME_UPPER")
    return _model(nodes, inits, ("n", 2, height, width))


def _influence(model, names, shape) -> dict[str, np.ndarray]:
    """For each tensor: bool [H_in, W_in, H_out, W_out], True where an input pixel changes an output position.

    One ORT batch: the base image and, for every pixel, a copy with that pixel raised by 100.
    """
    _, c, h, w = shape
    base = np.random.default_rng(0).uniform(0, 1, (1, c, h, w)).astype(np.float32)
    batch = np.repeat(base, h * w + 1, axis=0)
    for i in range(h):
        for j in range(w):
            batch[1 + i * w + j, :, i, j] += 100.0
    got = _run(model, batch, names)
    out = {}
    for name in names:
        t = got[name]
        diff = np.abs(t[1:] - t[:1]).max(axis=1)  # [h*w, Ho, Wo]
        out[name] = (diff > 1e-2).reshape(h, w, *t.shape[2:])
    return out


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def _probe_positions(ho: int, wo: int) -> set[tuple[int, int]]:
    return {(0, 0), (ho // 2, wo // 2), (ho - 1, wo - 1), (0, wo - 1), (ho - 1, 0)}


RF_TENSORS = ["c1", "a", "b", "res", "mp", "c3", "mp2", "c4", "y"]
# 23×31: every layer tiles its (padded) input exactly, so the analytic box is the exact dependency box.
TILED = (23, 31)
# 23×21: the 2×2/s2 MaxPool and the 3×3/s2 MaxPool drop their last column; the analytic box can only be larger.
DROPPING = (23, 21)


@pytest.fixture(scope="module")
def rf_chains():
    out = {}
    for hw in (TILED, DROPPING):
        model = _rf_chain_model(*hw)
        out[hw] = (model, _influence(model, RF_TENSORS, (1, 2, *hw)))
    return out


@pytest.mark.parametrize("name", RF_TENSORS)
def test_receptive_field_boxes_match_dependencies(rf_chains, name):
    model, influence = rf_chains[TILED]
    fields = receptive_fields(GraphView(model), tensor_shapes(model))
    mask = influence[name]
    for r, c in _probe_positions(*mask.shape[2:]):
        assert fields[name].box(r, c, *TILED) == _bbox(mask[:, :, r, c]), f"{name} at ({r}, {c})"


@pytest.mark.parametrize("name", RF_TENSORS)
def test_receptive_field_boxes_cover_dependencies(rf_chains, name):
    """Where a layer drops trailing pixels the analytic box is a superset; it must never miss a pixel."""
    model, influence = rf_chains[DROPPING]
    fields = receptive_fields(GraphView(model), tensor_shapes(model))
    mask = influence[name]
    ho, wo = mask.shape[2:]
    for r in range(ho):
        for c in range(wo):
            top, left, bottom, right = fields[name].box(r, c, *DROPPING)
            t2, l2, b2, r2 = _bbox(mask[:, :, r, c])
            assert top <= t2 and left <= l2 and bottom >= b2 and right >= r2, f"{name} at ({r}, {c})"
            assert top == t2 and left == l2, f"{name} at ({r}, {c}): leading edges are exact"


def test_host_receptive_field_is_its_output_field(rf_chains):
    model, influence = rf_chains[TILED]
    hosts = {h.name: h for h in find_hosts(model)}
    for name in ("c1", "c3", "y"):  # y: SAME_UPPER pads resolved by find_hosts from the inferred shapes
        host, mask = hosts[name], influence[name]
        assert host.out_hw == mask.shape[2:]
        for r, c in _probe_positions(*host.out_hw):
            assert host.receptive_field.box(r, c, *TILED) == _bbox(mask[:, :, r, c]), f"{name} at ({r}, {c})"


def test_receptive_field_sizes_and_jumps(rf_chains):
    model, _ = rf_chains[TILED]
    f = receptive_fields(GraphView(model), tensor_shapes(model))
    assert f["x"].size == (1, 1) and f["x"].jump == (1, 1)
    assert f["c1"].size == (3, 3) and f["c1"].jump == (2, 2)
    assert f["res"].size == (11, 11)  # the 5×5 branch wins over the 3×3 one
    assert f["mp"].size == (13, 13) and f["mp"].jump == (4, 4)
    assert f["y"].jump == (16, 16)


def _same_upper_pair() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1", kernel_shape=[3, 3], strides=[2, 2],
                         auto_pad="SAME_UPPER"),
        helper.make_node("Conv", ["c1", "w2"], ["y"], name="y", kernel_shape=[3, 3], auto_pad="SAME_LOWER"),
    ]
    inits = [_t("w1", rng.uniform(0.1, 1, (2, 1, 3, 3))), _t("w2", rng.uniform(0.1, 1, (2, 2, 3, 3)))]
    return _model(nodes, inits, ("n", 1, 12, 13))


def test_receptive_fields_same_pads_with_shapes():
    model = _same_upper_pair()
    influence = _influence(model, ["c1", "y"], (1, 1, 12, 13))
    fields = receptive_fields(GraphView(model), tensor_shapes(model))
    for name in ("c1", "y"):
        for r, c in _probe_positions(*influence[name].shape[2:]):
            assert fields[name].box(r, c, 12, 13) == _bbox(influence[name][:, :, r, c]), f"{name} at ({r}, {c})"


def test_receptive_fields_without_shapes_handles_auto_pad():
    model = _same_upper_pair()
    assert receptive_fields(GraphView(model)) == receptive_fields(GraphView(model), tensor_shapes(model))


def test_receptive_field_through_pad_node():
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], name="pad", mode="constant"),
        helper.make_node("Conv", ["p", "w"], ["y"], name="conv", kernel_shape=[3, 3], strides=[2, 2]),
    ]
    inits = [_t("pads", [0, 0, 2, 1, 0, 0, 1, 2], np.int64), _t("w", rng.uniform(0.1, 1, (2, 1, 3, 3)))]
    model = _model(nodes, inits, ("n", 1, 9, 10))
    influence = _influence(model, ["y"], (1, 1, 9, 10))["y"]
    field = receptive_fields(GraphView(model), tensor_shapes(model))["y"]
    for r, c in _probe_positions(*influence.shape[2:]):
        assert field.box(r, c, 9, 10) == _bbox(influence[:, :, r, c]), (r, c)


def test_box_is_clipped_and_inclusive():
    f = ReceptiveField(size=(7, 4), jump=(4, 2), start=(0.0, 0.5))
    assert f.box(0, 0, 100, 100) == (0, 0, 3, 2)  # rows -3..3 clipped, cols -1..2 clipped
    assert f.box(2, 3, 100, 100) == (5, 5, 11, 8)
    assert f.box(24, 49, 100, 100) == (93, 97, 99, 99)  # rows 93..102, cols 97..100 clipped


# -- 4. usability ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("act", "kind"), [("relu", "relu"), ("relu6", "relu6")])
def test_relu_like_hosts_are_usable(act, kind):
    host = _host(conv_model(cin=3, act=act, pads=[1, 1, 1, 1]), "conv")  # m = 27
    assert host.usable and host.reason == ""
    assert host.activation == kind and host.relu_like
    assert host.act_output == "y"
    assert host.act_high == (6.0 if kind == "relu6" else None)


def test_clip_via_attributes_and_other_upper_bound():
    # Opset 6 Clip with attributes.
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Clip", ["c"], ["y"], name="clip", min=0.0, max=6.0)]
    model = _model(nodes, [_t("w", rng.normal(size=(4, 2, 3, 3))), _t("b", np.zeros(4))], (1, 2, 6, 6), opset=9)
    host = _host(model, "conv")
    assert host.usable and host.activation == "relu6" and host.act_high == 6.0
    # Clip(0, 4) from Constant nodes: usable, cut at 4.
    nodes = [_const("lo", 0.0), _const("hi", 4.0),
             helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="clip")]
    model = _model(nodes, [_t("w", rng.normal(size=(4, 2, 3, 3))), _t("b", np.zeros(4))], (1, 2, 6, 6))
    host = _host(model, "conv")
    assert host.usable and host.activation == "clip" and host.act_high == 4.0
    # Clip(-1, 6) does not cut at zero.
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="clip")]
    model = _model(nodes, [_t("w", rng.normal(size=(4, 2, 3, 3))), _t("b", np.zeros(4)), _t("lo", -1.0),
                           _t("hi", 6.0)], (1, 2, 6, 6))
    host = _host(model, "conv")
    assert not host.usable and host.reason


@pytest.mark.parametrize("model_fn", [
    lambda: conv_model(act="Sigmoid", pads=[1, 1, 1, 1]),
    lambda: gemm_model(act="Sigmoid"),
    lambda: matmul_model(act="Tanh"),
])
def test_squashing_activation_is_unusable(model_fn):
    host = find_hosts(model_fn())[0]
    assert not host.usable
    assert "activation" in host.reason and host.activation in host.reason
    assert not host.relu_like


def test_leaky_relu_hosts_inserted_detectors_only():
    host = find_hosts(conv_model(act="LeakyRelu", pads=[1, 1, 1, 1]))[0]
    assert host.usable and host.reason == "" and not host.relu_like and not host.inplace
    assert host.activation == "leaky_relu" and host.zero_point is None
    assert "LeakyRelu" in host.inplace_reason and repr(host.act_node) in host.inplace_reason


@pytest.mark.parametrize("model_fn", [
    lambda: conv_model(act=None, pads=[1, 1, 1, 1]),  # Conv → Identity
    lambda: gemm_model(act=None),
    lambda: matmul_model(act=None),
])
def test_activation_less_layer_is_unusable(model_fn):
    host = find_hosts(model_fn())[0]
    assert not host.usable and host.reason
    assert host.activation == "none" and host.act_output is None


def test_pre_activation_as_graph_output_is_unusable():
    """A layer whose output is also a graph output has no exclusive activation: not a host."""
    model = conv_model(pads=[1, 1, 1, 1])
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    host = _host(model, "conv")
    assert not host.usable and host.reason


def test_depthwise_is_unusable():
    host = _host(conv_model(cin=8, cout=8, group=8, pads=[1, 1, 1, 1]), "conv")
    assert host.m == 9 and host.groups == 8 and host.in_channels == 8
    assert not host.usable and "depthwise" in host.reason and "9" in host.reason


def test_matmul_without_bias_is_unusable():
    host = _host(matmul_model(bias=False), "mm")
    assert not host.usable and "bias" in host.reason


def test_no_host_model_has_no_usable_host():
    hosts = find_hosts(no_host_model())
    assert hosts and not any(h.usable for h in hosts)
    assert hosts[0].op == "Gemm" and hosts[0].activation == "Sigmoid"


def test_tiny_cnn_host_facts():
    hosts = {h.name: h for h in find_hosts(tiny_cnn(bn=True, hidden=24))}
    assert set(hosts) == {"conv1", "conv2", "fc"}
    c1, c2, fc = hosts["conv1"], hosts["conv2"], hosts["fc"]
    assert c1.usable and c1.m == 27 and c1.out_hw == (8, 8) and c1.positions == 64 and c1.activation == "relu"
    assert c2.batchnorm == "bn2" and c2.output == "bn2" and c2.activation == "relu6"
    assert not c2.usable and "m=8" in c2.reason  # 1×1 over 8 channels: too few inputs
    assert not fc.usable and fc.activation == "none"
    assert (c1.depth, c2.depth, fc.depth) == (0, 1, 2)
    assert find_hosts(tiny_cnn(hidden=24))[1].batchnorm is None


def test_non_constant_weight_is_not_a_host():
    nodes = [helper.make_node("Relu", ["x"], ["w"], name="mk"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = _model(nodes, [], (4, 4))
    assert find_hosts(model) == []


def test_branches_that_meet_take_the_union_of_their_fields():
    """Two 3×3 branches with opposite asymmetric pads (as TF 'same' Pad nodes give) see windows shifted
    against each other: the Add's positions depend on both (NanoDet's ShuffleNet halves; the largest-only
    rule kept one window and the lock's patch missed the other's pixels)."""
    rng = np.random.default_rng(5)
    inits = [_t("wa", rng.uniform(0.1, 1, (2, 2, 3, 3))), _t("wb", rng.uniform(0.1, 1, (2, 2, 3, 3))),
             _t("wc", rng.uniform(0.1, 1, (2, 2, 3, 3)))]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="a", kernel_shape=[3, 3], pads=[2, 2, 0, 0]),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="b", kernel_shape=[3, 3], pads=[0, 0, 2, 2]),
        helper.make_node("Add", ["a", "b"], ["res"], name="res"),
        helper.make_node("Conv", ["res", "wc"], ["y"], name="y", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    model = _model(nodes, inits, ("n", 2, 12, 12))
    fields = receptive_fields(GraphView(model), tensor_shapes(model))
    influence = _influence(model, ["res", "y"], (1, 2, 12, 12))
    assert fields["res"].size == (5, 5)
    for name in ("res", "y"):
        mask = influence[name]
        for r, c in _probe_positions(*mask.shape[2:]):
            assert fields[name].box(r, c, 12, 12) == _bbox(mask[:, :, r, c]), f"{name} at ({r}, {c})"


def test_an_upsampled_branch_leaves_no_field():
    """An FPN's lateral Add of an upsampled deeper level: the sum depends on pixels far outside the lateral
    window (NanoDet's gate lock chose a Conv after such an Add and its corner patch did not decide it)."""
    rng = np.random.default_rng(6)
    inits = [_t("wa", rng.uniform(0.1, 1, (2, 2, 3, 3))), _t("wd", rng.uniform(0.1, 1, (2, 2, 3, 3))),
             _t("wy", rng.uniform(0.1, 1, (2, 2, 3, 3))), _t("scales", np.array([1.0, 1.0, 2.0, 2.0]))]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="a", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "wd"], ["d"], name="d", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["d", "", "scales"], ["up"], name="up", mode="nearest"),
        helper.make_node("Add", ["a", "up"], ["fpn"], name="fpn"),
        helper.make_node("Shape", ["fpn"], ["fpn_shape"], name="fpn_shape"),
        helper.make_node("Conv", ["fpn", "wy"], ["y"], name="y", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    model = _model(nodes, inits, ("n", 2, 12, 12))
    fields = receptive_fields(GraphView(model), tensor_shapes(model))
    assert fields["a"].size == (3, 3) and fields["d"].size == (5, 5)
    assert "up" not in fields and "fpn" not in fields and "y" not in fields
    assert {h.name: h for h in find_hosts(model)}["y"].receptive_field is None
