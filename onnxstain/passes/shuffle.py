"""Shuffle lock pass: a layer's channels stored out of order, put back in order by the corner's pixels.

The producer's output channels are stored in blocks, reordered (:func:`~onnxstain._onnx.hosts.permute_channels`),
and every reader of its output reads it through::

    Slice(window: the first K values of the corner, [N, K]) → TopK(K, largest) → indices [N, K]
    indices·g + (0 … g−1), then the channels past K·g in place            → order [N, C]
    GatherND(output, order [N, C, 1], batch_dims 1)                       → the output, reordered
    (opset 11: GatherElements(output, order expanded to the output's shape, axis 1))

Without the patch the corner's values sort in some other order and the blocks reach the wrong readers;
with it the order is ``σ⁻¹`` and the output is exactly the original layer's (a gather only moves values).
Nothing in the model holds ``σ``: not a gate to bypass (the stored layer *is* the disruption), not a
detector to pin or to read the patch from.
"""

from __future__ import annotations

import numpy as np
import onnx

from .._onnx.graph import GraphView
from .._onnx.hosts import HostLayer, permute_channels
from .builder import NodeBuilder
from .result import PassResult, result

MIN_OPSET = 11  # GatherElements, TopK with k as an input (GatherND's batch axis from opset 12)


def insert_shuffle(model: onnx.ModelProto, producer: HostLayer, target: str, window: str, side: int, blocks: int,
                   group: int, stored: np.ndarray) -> PassResult:
    """Reorder ``producer``'s output channels as ``stored`` (stored channel ``q`` is original channel
    ``stored[q]``) and read them back at ``target`` (its output, or after an activation that treats every
    channel alike) through the sort of ``blocks`` values of ``window``'s top-left ``side × side`` corner
    (``[N, c, H, W]``, c-major). The result's ``signal`` is the sort's indices ``[N, K]`` (what the white-box
    check reads)."""
    b = NodeBuilder(model)
    view: GraphView = b.view
    if b.opset < MIN_OPSET:
        raise ValueError(f"the shuffle lock needs opset {MIN_OPSET} or later (the model has {b.opset})")
    channels = producer.out_channels
    permute_channels(view, producer, stored)
    node, fresh = b.repoint(target)
    corner = b.slice_hw(window, [0, 0], [side, side])
    flat = b.node("Reshape", [corner, b.const(np.array([0, -1]), "onnx::Reshape_shape", np.int64)])
    keys = b.node("Slice", [flat, b.const(np.array([0]), "onnx::Slice_starts", np.int64),
                            b.const(np.array([blocks]), "onnx::Slice_ends", np.int64),
                            b.const(np.array([1]), "onnx::Slice_axes", np.int64)])
    out_values, out_indices = b.tensor_name("TopK"), b.tensor_name("TopK")
    b.nodes.append(onnx.helper.make_node(
        "TopK", [keys, b.const(np.array([blocks]), "onnx::TopK_k", np.int64)], [out_values, out_indices],
        name=b.name("TopK"), axis=1, largest=1, sorted=1))
    order = out_indices
    if group > 1:
        col = b.node("Reshape", [order, b.const(np.array([0, blocks, 1]), "onnx::Reshape_shape", np.int64)])
        scaled = b.node("Mul", [col, b.const(np.array(group), "onnx::Mul_const", np.int64)])
        spread = b.node("Add", [scaled, b.const(np.arange(group).reshape(1, 1, group), "onnx::Add_const", np.int64)])
        order = b.node("Reshape", [spread, b.const(np.array([0, -1]), "onnx::Reshape_shape", np.int64)])
    rest = channels - blocks * group
    if rest:
        # the channels past K·g, in place for every image: [N, 1]·0 + (K·g … C−1)
        first = b.node("Slice", [out_indices, b.const(np.array([0]), "onnx::Slice_starts", np.int64),
                                 b.const(np.array([1]), "onnx::Slice_ends", np.int64),
                                 b.const(np.array([1]), "onnx::Slice_axes", np.int64)])
        zero = b.node("Mul", [first, b.const(np.array(0), "onnx::Mul_const", np.int64)])
        tail = b.node("Add", [zero, b.const(np.arange(blocks * group, channels).reshape(1, rest), "onnx::Add_const",
                                            np.int64)])
        order = b.node("Concat", [order, tail], axis=1)
    # the reordered output keeps the producer's tensor name (every reader and graph output unchanged); the
    # node gets a fresh name of its own
    if b.opset >= 12:  # GatherND with a batch axis: each image's channels by its own order, whole maps moved
        shaped = b.node("Reshape", [order, b.const(np.array([0, channels, 1]), "onnx::Reshape_shape", np.int64)])
        b.nodes.append(onnx.helper.make_node("GatherND", [fresh, shaped], [target], name=b.name("GatherND"),
                                             batch_dims=1))
    else:  # opset 11: GatherElements, the order expanded to the map's every position
        rank = 2 + len(producer.kernel)  # a Conv's output: [N, C, spatial...]
        shaped = b.node("Reshape", [order, b.const(np.array([0, channels] + [1] * (rank - 2)),
                                                   "onnx::Reshape_shape", np.int64)])
        expanded = b.node("Expand", [shaped, b.node("Shape", [fresh])])
        b.nodes.append(onnx.helper.make_node("GatherElements", [fresh, expanded], [target],
                                             name=b.name("GatherElements"), axis=1))
    b.splice(view.index(node) + 1)
    return result(model, b.model, out_indices)

