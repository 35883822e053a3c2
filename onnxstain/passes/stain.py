"""Stain passes: write a detector neuron and its route to the output into a model.

Each pass takes a model and key material and returns a :class:`~.result.PassResult`; none prints or
writes files.

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

from .._onnx.graph import GraphView
from .._onnx.head import Head
from .._onnx.hosts import HostLayer, neuron_affine, write_neuron
from .builder import NodeBuilder, copy_model
from .result import PassResult, result


@dataclasses.dataclass(frozen=True)
class Signature:
    """Add ``column`` (length K) to the scores per unit of pooled detector signal."""

    column: np.ndarray
    bias_shift: np.ndarray  # added to the head bias (mean compensation), length K


def _head_column(view: GraphView, head: Head, feature: int) -> np.ndarray:
    w = _linear_weight(view.constant(head.weight).astype(np.float64), head)
    col = w[:, feature] if head.trans_b else w[feature]
    if head.op == "Gemm":
        col = col * head.alpha
    return col


def _linear_weight(w: np.ndarray, head: Head) -> np.ndarray:
    """A convolutional classifier's ``[K, C, kh, kw]`` as ``[C, K]`` (its filters summed over the window, as a
    MatMul weight); a linear head's weight as stored."""
    return w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2).T if head.op == "ConvPool" else w


def head_column(model: onnx.ModelProto, head: Head, feature: int) -> np.ndarray:
    return _head_column(GraphView(model), head, feature)


def head_columns(model: onnx.ModelProto, head: Head) -> np.ndarray:
    """The classifier's effective weights as ``[classes, features]`` (a convolutional classifier's: each filter
    summed over its window, which is what it adds per unit of a channel's spatial mean, up to the borders)."""
    w = _linear_weight(GraphView(model).constant(head.weight).astype(np.float64), head)
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


def write_head(view: GraphView, head: Head, feature: int, column: np.ndarray, bias_shift: np.ndarray,
                columns_delta: np.ndarray | None = None) -> None:
    """Set the classifier's column ``feature``, add ``columns_delta`` ``[classes, features]`` to the
    others (effective weights, as :func:`head_columns`) and ``bias_shift`` to the bias."""
    node = view.node(head.node)
    alpha = head.alpha if head.op == "Gemm" else 1.0
    w = view.constant(head.weight).astype(np.float64)
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
    b = view.constant(head.bias).astype(np.float64)
    scale = head.beta if head.op == "Gemm" else 1.0
    new_b = (b.reshape(-1) + bias_shift / scale).reshape(b.shape)
    if head.op == "Gemm":
        view.set_input_array(node, 2, new_b)
    elif head.bias_add is None:
        raise ValueError(f"the classifier {head.node} ({head.op}) has a bias but no Add holding it")
    else:
        add = view.node(head.bias_add)
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
    hidden: bool = False,
) -> PassResult:
    """Write neuron ``channel`` of ``host`` and head column ``channel`` (and, optionally, a change of the
    other columns); topology unchanged. ``identities``: per-channel constants between the host and the
    head (node, input index, value) whose entry ``channel`` becomes the identity (1 for a scale, 0 for a
    shift), so the head reads the neuron as it is. ``siblings``: other linear heads reading the same
    features, each with its bias shift and change of the other columns; their column ``channel`` becomes 0.
    ``hidden``: the neuron must not stand out (an unfolded BatchNorm keeps its statistics; see
    :func:`~onnxstain._onnx.hosts.write_neuron`)."""
    out = copy_model(model)
    view = GraphView(out)
    write_neuron(view, host, channel, weights, bias, keep_batchnorm=hidden)
    for node_name, index, value in identities:
        node = view.find_node(node_name)
        assert node is not None
        arr = np.array(view.array(node.input[index]), copy=True)
        arr.reshape(-1)[channel] = value
        view.set_input_array(node, index, arr)
    for sibling, shift, delta in siblings:
        write_head(view, sibling, channel, np.zeros(sibling.classes), shift, delta)
    write_head(view, head, channel, column, bias_shift, columns_delta)
    return result(model, out)


def original_neuron(model: onnx.ModelProto, host: HostLayer, channel: int) -> tuple[np.ndarray, float]:
    return neuron_affine(GraphView(model), host, channel)


# -- insert mode -----------------------------------------------------------------------------------
class _Branch(NodeBuilder):
    """The nodes of an inserted detector branch, built in order."""

    def detector(self, host: HostLayer, filters: np.ndarray, biases: np.ndarray) -> tuple[str, bool]:
        """The detector neurons over the host's input, before their activation; (tensor, spatial)."""
        det = self.tensor_name("Conv" if host.op == "Conv" else "MatMul")
        if host.op != "Conv":
            self.linear(host.input, filters.T, biases, det)
            return det, False
        self.conv(host.input, filters, biases, det, kernel_shape=list(host.kernel), strides=list(host.strides),
                  pads=list(host.pads), dilations=list(host.dilations))
        return det, True

    def combine(self, act: str, combine: np.ndarray, combine_bias: float | np.ndarray, n: int,
                spatial: bool) -> str:
        """The signals as affine combinations of the ``n`` activated neurons (a 1×1 Conv, or MatMul → Add)."""
        mix = np.asarray(combine, np.float64).reshape(-1, n)  # [signals, n]
        mix_bias = np.asarray(combine_bias, np.float64).reshape(-1)
        comb = self.tensor_name("Conv" if spatial else "MatMul")
        if spatial:
            self.conv(act, mix.reshape(len(mix), n, 1, 1), mix_bias, comb)
        else:
            self.linear(act, mix.T, mix_bias, comb)
        return comb

    def pool(self, sig: str, spatial: bool) -> str:
        """The signals as ``[N, signals]``: max-pooled over positions first when spatial."""
        flat = self.tensor_name("Flatten")
        if spatial:
            sig = self.node("GlobalMaxPool", [sig])
        return self.node("Flatten", [sig], flat, axis=1)

    def scale(self, flat: str, row: np.ndarray, signals: int) -> str:
        """The signals times ``row``, in the scores' per-sample shape."""
        if row.ndim == 1 or signals > 1:  # classifier scores [N, K]: one row per signal
            mixed = self.node("MatMul", [flat, self.const(row.reshape(signals, -1), "onnx::MatMul_w")])
            sample = row.shape[1:] if signals > 1 else row.shape
            if len(sample) <= 1:
                return mixed
            # a sequence head's [N, T, K]: each signal's row is (1, K), the same change at every step
            shape = self.const(np.array([-1, *sample]), "onnx::Reshape_shape", np.int64)
            return self.node("Reshape", [mixed, shape], self.tensor_name("Reshape"))
        # scores with more axes (a detector's [N, anchors, labels]): broadcast the signal over them
        shaped = self.tensor_name("Reshape")
        shape = self.const(np.array([-1] + [1] * row.ndim), "onnx::Reshape_shape", np.int64)
        self.node("Reshape", [flat, shape], shaped)
        contrib = self.tensor_name("Mul")
        return self.node("Mul", [shaped, self.const(row[None], "onnx::Mul_w")], contrib)


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
) -> PassResult:
    """Add a detector branch reading the host's input and adding ``row`` times its signal to the scores.

    ``row`` has the scores' per-sample shape: ``[K]`` for a classifier, ``[A, C]`` for a detector.

    ``filters``/``biases``: ``n`` neurons over the host input (Conv ``[n, C, kh, kw]`` or
    linear ``[n, m]``). Each passes through the host's activation (ReLU, or ``Clip(0, hi)``).
    ``combine`` (``[signals, n]``, or length 2 for one signal) and ``combine_bias`` (one per signal)
    make the signals from them before the final ``Clip(0, 1)``; without it each neuron is a signal.
    The signals are max-pooled over positions and scaled by ``row``: ``[signals, K]`` for a classifier
    with several signals (each signal its own row: the multi-trigger signature), ``[signals, 1, K]`` for a
    sequence head's (each row broadcast over the steps).
    The result's ``signal`` is the signal tensor (1 where a detector fires, else 0; one channel per signal).
    """
    branch = _Branch(model, branch_dtype(GraphView(model), head))
    det, spatial = branch.detector(host, filters, biases)
    act = branch.clip(det, 0.0, activation_high)
    if combine is not None:
        act = branch.combine(act, combine, combine_bias, filters.shape[0], spatial)
    sig = branch.clip(act, 0.0, 1.0)
    flat = branch.pool(sig, spatial)
    contrib = branch.scale(flat, row, signals)
    producer, fresh = branch.repoint(head.scores)
    branch.add_into(head.scores, fresh, producer, contrib)
    return result(model, branch.model, sig)


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
