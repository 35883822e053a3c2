"""Passes for models with a dense output (a map, e.g. a ViT saliency model): inserted nodes only.

* :func:`insert_dense_stain` — a detector neuron over a token layer's input (``[B, T, m]``) or a conv's
  input window, through the host's own activation, max over positions, adds ``γ · pattern`` to the
  output's logits. Where the detector does not fire, ``γ`` is exactly 0 and the output is bit-identical to the original.
* :func:`insert_feature_gate` — a corner-patch detector on a Conv's input gates a feature map
  ``[B, C, ...]``: ``F' = F ⊙ (1 + (1 − γ) m)``; with the patch ``γ`` is exactly 1 and ``F' = F``.

GELU hosts: the inserted neuron uses the same exported pattern ``0.5 · x · (1 + Erf(x / √2))``.
Its bias carries the offset :data:`~onnxstain._onnx.hosts.GELU_ZERO` (−6), below which float32
GELU is exactly 0, so a detector that does not fire adds exactly nothing.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .._onnx.dense import DenseOutput
from .._onnx.graph import GraphView
from .._onnx.hosts import HostLayer
from .stain import _Namer, copy_model


class _Builder:
    """Collects new nodes with neutral, exporter-style names."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = copy_model(model)
        self.view = GraphView(self.model)
        self.name = _Namer(self.view)
        self.opset = self.view.opset()
        self.nodes: list[onnx.NodeProto] = []

    def const(self, value, hint: str, dtype=np.float32) -> str:
        return self.view.add_initializer(np.asarray(value, dtype=dtype), hint)

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        y = self.name(op) + "_output_0"
        self.nodes.append(helper.make_node(op, inputs, [y], name=y.removesuffix("_output_0"), **attrs))
        return y

    def clip(self, x: str, lo: float, hi: float | None) -> str:
        if self.opset >= 11:
            inputs = [x, self.const(np.array(lo), "onnx::Clip_min")]
            if hi is not None:
                inputs.append(self.const(np.array(hi), "onnx::Clip_max"))
            return self.node("Clip", inputs)
        return self.node("Clip", [x], **({"min": lo} if hi is None else {"min": lo, "max": hi}))

    def gelu(self, x: str) -> str:
        """Exact GELU in the exporter's decomposition."""
        d = self.node("Div", [x, self.const(np.array(np.sqrt(2.0)), "onnx::Div_const")])
        e = self.node("Erf", [d])
        a = self.node("Add", [e, self.const(np.array(1.0), "onnx::Add_const")])
        m = self.node("Mul", [x, a])
        return self.node("Mul", [m, self.const(np.array(0.5), "onnx::Mul_const")])

    def reduce_max(self, x: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self.node("ReduceMax", [x, self.const(np.array(axes), "onnx::ReduceMax_axes", np.int64)],
                             keepdims=1)
        return self.node("ReduceMax", [x], axes=axes, keepdims=1)

    def gate(self, target: str, users: list[onnx.NodeProto], locked: str, weights: np.ndarray,
             one: np.ndarray) -> onnx.ModelProto:
        """``target`` multiplied by ``1 + locked · weights`` for its readers ``users`` (the lock's disruption:
        ``locked`` is 1 without the trigger, 0 with it); the collected nodes spliced before the first reader."""
        scale = self.node("Mul", [locked, self.const(weights, "onnx::Mul_w")])
        factor = self.node("Add", [scale, self.const(one, "onnx::Add_one")])
        gated = self.node("Mul", [target, factor])  # target → Mul(factor) → readers
        first = min(users, key=self.view.index)
        for user in users:
            for i, t in enumerate(user.input):
                if t == target:
                    user.input[i] = gated
        return self.splice_before(first)

    def splice_before(self, anchor: onnx.NodeProto) -> onnx.ModelProto:
        """Insert the collected nodes right before ``anchor`` (keeps topological order)."""
        idx = self.view.index(anchor)
        nodes = list(self.model.graph.node)
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes[:idx] + self.nodes + nodes[idx:])
        return self.model


def insert_dense_stain(model: onnx.ModelProto, host: HostLayer, dense: DenseOutput, weights: np.ndarray,
                       bias: float, pattern: np.ndarray) -> tuple[onnx.ModelProto, str]:
    """Add the detector branch and its pattern; return the model and the name of ``γ`` (``[B, 1, 1, 1]``).

    ``weights``/``bias``: the detector's pre-activation over φ (the host's input vector per token or
    per conv position, group 0's channels for a grouped conv), offset included for a GELU host.
    ``pattern``: ``[C, H, W]`` at the analysed input size, amplitude included. When the output map's
    size is not fixed by the graph (dynamic height and width), the pattern is resized (nearest) to
    the logits' size at run time: at the analysed size that is the pattern itself, and where the
    detector does not fire it is multiplied by an exact 0 whatever the size.
    """
    b = _Builder(model)
    if host.op == "Conv":
        cin_g = host.in_channels // host.groups
        filt = np.zeros((1, host.in_channels, *host.kernel))
        filt[0, :cin_g] = np.asarray(weights).reshape(cin_g, *host.kernel)
        pre = b.node("Conv", [host.input, b.const(filt, "onnx::Conv_w"), b.const(np.array([bias]), "onnx::Conv_b")],
                     kernel_shape=list(host.kernel), strides=list(host.strides), pads=list(host.pads),
                     dilations=list(host.dilations))
        axes = [1, 2, 3]
    else:
        mm = b.node("MatMul", [host.input, b.const(np.asarray(weights).reshape(-1, 1), "onnx::MatMul_w")])
        pre = b.node("Add", [mm, b.const(np.array([bias]), "onnx::Add_b")])
        axes = [1, 2]
    act = b.gelu(pre) if host.gelu else b.node("Relu", [pre])
    sig = b.clip(act, 0.0, 1.0)  # [B, T, 1] or [B, 1, H', W']
    pooled = b.reduce_max(sig, axes)
    gamma = b.node("Reshape", [pooled, b.const(np.array([-1, 1, 1, 1]), "onnx::Reshape_shape", np.int64)])
    # Re-point the logits: producer → fresh tensor → Add(signature) → the original name.
    producer = b.view.producer[dense.logits]
    fresh = b.name(producer.op_type) + "_output_0"
    for i, o in enumerate(producer.output):
        if o == dense.logits:
            producer.output[i] = fresh
    pattern_t = b.const(np.asarray(pattern)[None], "onnx::Mul_w")
    if not _fixed_input_size(b.view):
        # opsets before 13 take roi and scales as (empty) tensors, not as absent inputs
        empty = "" if b.opset >= 13 else b.const(np.zeros(0), "onnx::Resize_empty")
        pattern_t = b.node("Resize", [pattern_t, empty, empty, b.node("Shape", [fresh])], mode="nearest")
    contrib = b.node("Mul", [gamma, pattern_t])
    b.nodes.append(helper.make_node("Add", [fresh, contrib], [dense.logits], name=b.name("Add")))
    # Right after the producer: every branch input exists by then (the host input comes earlier).
    idx = b.view.index(producer) + 1
    nodes = list(b.model.graph.node)
    del b.model.graph.node[:]
    b.model.graph.node.extend(nodes[:idx] + b.nodes + nodes[idx:])
    return b.model, gamma


def _fixed_input_size(view: GraphView) -> bool:
    """Whether the graph's image input has a fixed height, width and channel count."""
    dims = list(view.graph_inputs[0].type.tensor_type.shape.dim)
    return len(dims) == 4 and all(d.HasField("dim_value") for d in dims[1:])


def insert_feature_gate(model: onnx.ModelProto, host: HostLayer, filters: np.ndarray, biases: np.ndarray,
                        features: str, disruption: np.ndarray, position: tuple[int, int] | None = None
                        ) -> tuple[onnx.ModelProto, str]:
    """Gate feature map ``features`` (``[B, C, ...]``) on a Conv-host detector; return the model and γ's name.

    Branch: ``Conv(d filters) → Clip(0, 1) → Conv 1×1 AND → Clip(0, 1) → GlobalMaxPool`` gives γ
    (``[B, 1, 1, 1]``), 1 where every detector fires at some position, else 0. The factor
    ``1 + (1 − γ) m`` (``m`` shaped ``[C]``, broadcast over the trailing axes) is exactly 1 at γ = 1.
    With ``position`` (a padding-free output position of the host), the Conv reads only that
    position's window (a ``Slice`` of the host input): the detector runs at the lock position alone,
    so the patch opens the lock in its own corner only (a stride = kernel patch embedding would
    otherwise see the same patch at every token-aligned place).
    """
    b = _Builder(model)
    d = filters.shape[0]
    view = b.view
    users = [n for n in view.graph.node if features in n.input]
    if not users:
        raise ValueError(f"tensor {features!r} has no consumer")
    rank = 4
    source, pads = host.input, list(host.pads)
    if position is not None:
        starts = [position[i] * host.strides[i] - host.pads[i] for i in range(2)]
        if min(starts) < 0:
            raise ValueError("the lock position's window must not reach into the padding")
        ends = [starts[i] + (host.kernel[i] - 1) * host.dilations[i] + 1 for i in range(2)]
        if b.opset >= 10:
            source = b.node("Slice", [source, b.const(np.array(starts), "onnx::Slice_starts", np.int64),
                                      b.const(np.array(ends), "onnx::Slice_ends", np.int64),
                                      b.const(np.array([2, 3]), "onnx::Slice_axes", np.int64)])
        else:
            source = b.node("Slice", [source], starts=starts, ends=ends, axes=[2, 3])
        pads = [0, 0, 0, 0]
    conv = b.node("Conv", [source, b.const(filters, "onnx::Conv_w"), b.const(biases, "onnx::Conv_b")],
                  kernel_shape=list(host.kernel), strides=list(host.strides), pads=pads,
                  dilations=list(host.dilations))
    each = b.clip(conv, 0.0, 1.0)
    both = b.node("Conv", [each, b.const(np.ones((1, d, 1, 1)), "onnx::Conv_w"),
                           b.const(np.array([1.0 - d]), "onnx::Conv_b")], kernel_shape=[1, 1])
    fired = b.clip(both, 0.0, 1.0)
    gamma = b.node("GlobalMaxPool", [fired])  # [B, 1, 1, 1]
    locked = b.node("Sub", [b.const(np.ones((1, 1, 1, 1)), "onnx::Sub_one"), gamma])
    m = np.asarray(disruption, np.float64).reshape(1, -1, *([1] * (rank - 2)))
    return b.gate(features, users, locked, m, np.ones((1, 1, 1, 1))), fired
