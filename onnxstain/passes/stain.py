"""Stain passes: write a detector neuron and its route to the output into a model.

Each pass takes a model and key material and returns a new model; none prints or writes files.

* :func:`inplace` — only initializer values change. The detector overwrites (non-additive) or is
  added to (additive) host channel ``k``; the classifier column of feature ``k`` carries the
  signature towards class ``c``.
* :func:`insert` — the host is untouched; a new branch reads the host's input, computes the
  detector, and adds ``strength · e_c`` to the scores only when it fires. On natural inputs the
  branch adds exactly zero, so outputs are bit-identical to the original.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from .._onnx.graph import GraphView
from .._onnx.head import Head
from .._onnx.hosts import HostLayer, neuron_affine, write_neuron


@dataclasses.dataclass(frozen=True)
class Signature:
    """Add ``column`` (length K) to the scores per unit of pooled detector signal."""

    column: np.ndarray
    bias_shift: np.ndarray  # added to the head bias (mean compensation), length K


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _head_column(view: GraphView, head: Head, feature: int) -> np.ndarray:
    w = view.array(head.weight).astype(np.float64)
    col = w[:, feature] if head.trans_b else w[feature]
    if head.op == "Gemm":
        col = col * head.alpha
    return col


def head_column(model: onnx.ModelProto, head: Head, feature: int) -> np.ndarray:
    return _head_column(GraphView(model), head, feature)


def head_columns(model: onnx.ModelProto, head: Head) -> np.ndarray:
    """The classifier's effective weights as ``[classes, features]``."""
    w = GraphView(model).array(head.weight).astype(np.float64)
    cols = w if head.trans_b else w.T
    return cols * (head.alpha if head.op == "Gemm" else 1.0)


def head_affine(model: onnx.ModelProto, head: Head) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's effective weights ``[classes, features]`` and biases ``[classes]`` as stored."""
    view = GraphView(model)
    cols = head_columns(model, head)
    if head.bias is None:
        return cols, np.zeros(cols.shape[0])
    b = np.asarray(view.array(head.bias), np.float64).reshape(-1) * np.ones(cols.shape[0])
    return cols, b * (head.beta if head.op == "Gemm" else 1.0)


def _write_head(view: GraphView, head: Head, feature: int, column: np.ndarray, bias_shift: np.ndarray,
                columns_delta: np.ndarray | None = None) -> None:
    """Set the classifier's column ``feature``, add ``columns_delta`` ``[classes, features]`` to the
    others (effective weights, as :func:`head_columns`) and ``bias_shift`` to the bias."""
    node = view.find_node(head.node)
    alpha = head.alpha if head.op == "Gemm" else 1.0
    w = view.array(head.weight).astype(np.float64)
    if columns_delta is not None:
        w += (columns_delta if head.trans_b else columns_delta.T) / alpha
    col = column / alpha
    if head.trans_b:
        w[:, feature] = col
    else:
        w[feature] = col
    view.set_input_array(node, 1, w)
    if not np.any(bias_shift):
        return
    if head.bias is None:
        raise ValueError("the classifier has no bias to compensate with")
    b = view.array(head.bias).astype(np.float64)
    scale = head.beta if head.op == "Gemm" else 1.0
    new_b = (b.reshape(-1) + bias_shift / scale).reshape(b.shape)
    if head.op == "Gemm":
        view.set_input_array(node, 2, new_b)
    else:
        add = view.find_node(head.bias_add)  # type: ignore[arg-type]
        view.set_input_array(add, list(add.input).index(head.bias), new_b)


def inplace(
    model: onnx.ModelProto,
    host: HostLayer,
    channel: int,
    weights: np.ndarray,
    bias: float,
    head: Head,
    column: np.ndarray,
    bias_shift: np.ndarray,
    columns_delta: np.ndarray | None = None,
    identities: Sequence[tuple[str, int, float]] = (),
    siblings: Sequence[tuple[Head, np.ndarray, np.ndarray | None]] = (),
) -> onnx.ModelProto:
    """Write neuron ``channel`` of ``host`` and head column ``channel`` (and, optionally, a change of the
    other columns); topology unchanged. ``identities``: per-channel constants between the host and the
    head (node, input index, value) whose entry ``channel`` becomes the identity (1 for a scale, 0 for a
    shift), so the head reads the neuron as it is. ``siblings``: other linear heads reading the same
    features, each with its bias shift and change of the other columns; their column ``channel`` becomes 0."""
    out = copy_model(model)
    view = GraphView(out)
    write_neuron(view, host, channel, weights, bias)
    for node_name, index, value in identities:
        node = view.find_node(node_name)
        assert node is not None
        arr = np.array(view.array(node.input[index]), copy=True)
        arr.reshape(-1)[channel] = value
        view.set_input_array(node, index, arr)
    for sibling, shift, delta in siblings:
        _write_head(view, sibling, channel, np.zeros(sibling.classes), shift, delta)
    _write_head(view, head, channel, column, bias_shift, columns_delta)
    return out


def original_neuron(model: onnx.ModelProto, host: HostLayer, channel: int) -> tuple[np.ndarray, float]:
    return neuron_affine(GraphView(model), host, channel)


# -- insert mode -----------------------------------------------------------------------------------
class _Namer:
    """Neutral names in the exporter's own style, so inserted nodes reveal nothing of the stain."""

    def __init__(self, view: GraphView) -> None:
        self.taken = set(view.producer) | set(view.initializers) | {n.name for n in view.graph.node}
        self.taken |= {i.name for i in view.graph.input}
        self.counter = len(view.graph.node) + 1000

    def __call__(self, op: str) -> str:
        while True:
            self.counter += 1
            name = f"/{op}_{self.counter}"
            if name not in self.taken:
                self.taken.add(name)
                return name


def insert(
    model: onnx.ModelProto,
    host: HostLayer,
    head: Head,
    filters: np.ndarray,
    biases: np.ndarray,
    combine: np.ndarray | None,
    combine_bias: float | np.ndarray,
    activation_high: float | None,
    row: np.ndarray,
    signals: int = 1,
) -> tuple[onnx.ModelProto, str]:
    """Add a detector branch reading the host's input and adding ``row`` times its signal to the scores.

    ``row`` has the scores' per-sample shape: ``[K]`` for a classifier, ``[A, C]`` for a detector.

    ``filters``/``biases``: ``n`` neurons over the host input (Conv ``[n, C, kh, kw]`` or
    linear ``[n, m]``). Each passes through the host's activation (ReLU, or ``Clip(0, hi)``).
    ``combine`` (``[signals, n]``, or length 2 for one signal) and ``combine_bias`` (one per signal)
    make the signals from them before the final ``Clip(0, 1)``; without it each neuron is a signal.
    The signals are max-pooled over positions and scaled by ``row``: ``[signals, K]`` for a classifier
    with several signals (each signal its own row: the multi-trigger signature).
    Returns the model and the name of the signal tensor (1 where a detector fires, else 0; one channel
    per signal).
    """
    out = copy_model(model)
    view = GraphView(out)
    name = _Namer(view)
    opset = view.opset()
    nodes: list[onnx.NodeProto] = []
    dtype = branch_dtype(view, head)

    def const(value, hint: str) -> str:
        return view.add_initializer(np.asarray(value, dtype=dtype), hint)

    def clip(x: str, lo: float, hi: float | None) -> str:
        y = name("Clip") + "_output_0"
        if opset >= 11:
            inputs = [x, const(np.array(lo), "onnx::Clip_min")]
            if hi is not None:
                inputs.append(const(np.array(hi), "onnx::Clip_max"))
            nodes.append(helper.make_node("Clip", inputs, [y], name=y[:-9]))
        else:
            attrs = {"min": lo} if hi is None else {"min": lo, "max": hi}
            nodes.append(helper.make_node("Clip", [x], [y], name=y[:-9], **attrs))
        return y

    n = filters.shape[0]
    det = name("Conv" if host.op == "Conv" else "MatMul") + "_output_0"
    if host.op == "Conv":
        attrs = {"kernel_shape": list(host.kernel), "strides": list(host.strides), "pads": list(host.pads),
                 "dilations": list(host.dilations)}
        nodes.append(helper.make_node(
            "Conv", [host.input, const(filters, "onnx::Conv_w"), const(biases, "onnx::Conv_b")], [det],
            name=det[:-9], **attrs))
        spatial = True
    else:
        mm = name("MatMul") + "_output_0"
        nodes.append(helper.make_node("MatMul", [host.input, const(filters.T, "onnx::MatMul_w")], [mm],
                                      name=mm[:-9]))
        nodes.append(helper.make_node("Add", [mm, const(biases, "onnx::Add_b")], [det], name=det[:-9]))
        spatial = False
    act = clip(det, 0.0, activation_high)
    if combine is not None:
        mix = np.asarray(combine, np.float64).reshape(-1, n)  # [signals, n]
        mix_bias = np.asarray(combine_bias, np.float64).reshape(-1)
        comb = name("Conv" if spatial else "MatMul") + "_output_0"
        if spatial:
            nodes.append(helper.make_node(
                "Conv", [act, const(mix.reshape(len(mix), n, 1, 1), "onnx::Conv_w"),
                         const(mix_bias, "onnx::Conv_b")], [comb], name=comb[:-9]))
        else:
            mm = name("MatMul") + "_output_0"
            nodes.append(helper.make_node("MatMul", [act, const(mix.T, "onnx::MatMul_w")],
                                          [mm], name=mm[:-9]))
            nodes.append(helper.make_node("Add", [mm, const(mix_bias, "onnx::Add_b")], [comb],
                                          name=comb[:-9]))
        act = comb
    sig = clip(act, 0.0, 1.0)
    flat = name("Flatten") + "_output_0"
    if spatial:
        pooled = name("GlobalMaxPool") + "_output_0"
        nodes.append(helper.make_node("GlobalMaxPool", [sig], [pooled], name=pooled[:-9]))
        nodes.append(helper.make_node("Flatten", [pooled], [flat], name=flat[:-9], axis=1))
    else:
        nodes.append(helper.make_node("Flatten", [sig], [flat], name=flat[:-9], axis=1))
    if row.ndim == 1 or signals > 1:  # classifier scores [N, K]: one row per signal
        contrib = name("MatMul") + "_output_0"
        nodes.append(helper.make_node("MatMul", [flat, const(row.reshape(signals, -1), "onnx::MatMul_w")], [contrib],
                                      name=contrib[:-9]))
    else:  # scores with more axes (a detector's [N, anchors, labels]): broadcast the signal over them
        shaped = name("Reshape") + "_output_0"
        shape = view.add_initializer(np.array([-1] + [1] * row.ndim, np.int64), "onnx::Reshape_shape")
        nodes.append(helper.make_node("Reshape", [flat, shape], [shaped], name=shaped[:-9]))
        contrib = name("Mul") + "_output_0"
        nodes.append(helper.make_node("Mul", [shaped, const(row[None], "onnx::Mul_w")], [contrib],
                                      name=contrib[:-9]))
    # Re-point the head's score tensor: head → fresh tensor → Add(signal) → original tensor name.
    head_out = head.scores
    producer = view.producer[head_out]
    fresh = name(producer.op_type) + "_output_0"
    for i, o in enumerate(producer.output):
        if o == head_out:
            producer.output[i] = fresh
    nodes.append(helper.make_node("Add", [fresh, contrib], [head_out], name=name("Add")))
    # Insert the new nodes right after the head producer to keep topological order.
    idx = view.index(producer)
    graph_nodes = list(out.graph.node)
    new_order = graph_nodes[: idx + 1] + nodes + graph_nodes[idx + 1 :]
    del out.graph.node[:]
    out.graph.node.extend(new_order)
    return out, sig


def branch_dtype(view: GraphView, head: Head) -> np.dtype:
    """The float type of the inserted branch: the classifier weights' own (fp16 models), else fp32.

    A QDQ model's branch stays in float32 (its inserted constants are not quantized).
    """
    init = view.initializers.get(head.weight)
    if init is not None and init.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        return onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    node = view.constant_nodes.get(head.weight)
    if node is not None:
        t = next(a for a in node.attribute if a.name == "value").t
        if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            return onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.dtype(np.float32)
