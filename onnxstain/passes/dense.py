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

from .._onnx.dense import DenseOutput
from .._onnx.graph import GraphView
from .._onnx.hosts import HostLayer
from .builder import NodeBuilder
from .result import PassResult, result


def insert_dense_stain(model: onnx.ModelProto, host: HostLayer, dense: DenseOutput, weights: np.ndarray,
                       bias: float, pattern: np.ndarray) -> PassResult:
    """Add the detector branch and its pattern; the result's ``signal`` is ``γ`` (``[B, 1, 1, 1]``).

    ``weights``/``bias``: the detector's pre-activation over φ (the host's input vector per token or
    per conv position, group 0's channels for a grouped conv), offset included for a GELU host.
    ``pattern``: ``[C, H, W]`` at the analysed input size, amplitude included. When the output map's
    size is not fixed by the graph (dynamic height and width), the pattern is resized (nearest) to
    the logits' size at run time: at the analysed size that is the pattern itself, and where the
    detector does not fire it is multiplied by an exact 0 whatever the size.
    """
    b = NodeBuilder(model)
    if host.op == "Conv":
        cin_g = host.in_channels // host.groups
        filt = np.zeros((1, host.in_channels, *host.kernel))
        filt[0, :cin_g] = np.asarray(weights).reshape(cin_g, *host.kernel)
        pre = b.conv(host.input, filt, np.array([bias]), kernel_shape=list(host.kernel), strides=list(host.strides),
                     pads=list(host.pads), dilations=list(host.dilations))
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
    producer, fresh = b.repoint(dense.logits)
    pattern_t = b.const(np.asarray(pattern)[None], "onnx::Mul_w")
    if not _fixed_input_size(b.view):
        # opsets before 13 take roi and scales as (empty) tensors, not as absent inputs
        empty = "" if b.opset >= 13 else b.const(np.zeros(0), "onnx::Resize_empty")
        pattern_t = b.node("Resize", [pattern_t, empty, empty, b.node("Shape", [fresh])], mode="nearest")
    contrib = b.node("Mul", [gamma, pattern_t])
    b.add_into(dense.logits, fresh, producer, contrib)
    return result(model, b.model, gamma)


def _fixed_input_size(view: GraphView) -> bool:
    """Whether the graph's image input has a fixed height, width and channel count."""
    dims = list(view.graph_inputs[0].type.tensor_type.shape.dim)
    return len(dims) == 4 and all(d.HasField("dim_value") for d in dims[1:])


def insert_feature_gate(model: onnx.ModelProto, host: HostLayer, filters: np.ndarray, biases: np.ndarray,
                        features: str, disruption: np.ndarray, reach: float,
                        position: tuple[int, int] | None = None) -> PassResult:
    """Gate feature map ``features`` (``[B, C, ...]``) on a Conv-host detector; the result's ``signal`` is the
    detectors' AND before the pooling (1 where the patch is).

    Branch: ``Conv(d filters) → Clip(0, 1) → Conv 1×1 AND → Clip(0, 1) → GlobalMaxPool`` gives γ, 1 where
    every detector fires at some position, else 0 (beside a constant channel that keeps the open level in a
    quantiser's ranges: :meth:`NodeBuilder.gate`). The factor ``1 + (1 − γ) m`` (``m`` shaped ``[C]``,
    broadcast over the trailing axes) is exactly 1 at γ = 1. ``reach``: the detectors' pre-activation on the
    patch.
    With ``position`` (a padding-free output position of the host), the Conv reads only that
    position's window (a ``Slice`` of the host input): the detector runs at the lock position alone,
    so the patch opens the lock in its own corner only (a stride = kernel patch embedding would
    otherwise see the same patch at every token-aligned place).
    """
    b = NodeBuilder(model)
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
        source = b.slice_hw(source, starts, ends)
        pads = [0, 0, 0, 0]
    fired = b.patch_detectors(source, filters, biases, host.kernel, host.strides, pads, host.dilations, reach)
    b.gate(features, users, fired, np.asarray(disruption, np.float64), (0, -1, *([1] * (rank - 2))))
    return result(model, b.model, fired)
