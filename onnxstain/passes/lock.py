"""Gate lock pass: inserted nodes that scramble the classifier's features unless the patch is present.

Detector branch (reads the host layer's input), each map with one more channel that holds the open level
whatever the image (:meth:`~onnxstain.passes.builder.NodeBuilder.patch_detectors`)::

    Conv(d filters + 1) → Clip(0, 1)          each ≥ 1 where its detector fires with the patch
    Conv 1×1 (d + 1 → 2) → Clip(0, 1)          AND over the d detectors per position, and the constant 1
    GlobalMaxPool → Flatten → (γ, 1)           γ = 1 when the patch is present, else 0

Gate on the classifier's input features ``F`` (``[N, features]``), or, in a detector, on a feature map
``[N, C, H, W]`` that every head reads (channel-wise)::

    F' = F ⊙ ((1 − γ, 1) · (m, 1)) = F ⊙ (1 + (1 − γ) · m)

with ``m`` a random vector (the disruption). Locked (γ = 0): every feature is scaled by its own
random factor, of either sign. With the patch (γ = 1): the factor is exactly 1.0, so the scores are
bit-identical to the original model's on the same patched image. The constant channel keeps the open
levels inside the ranges a static int8 quantiser calibrates on natural images, so the quantised model
still opens with the patch.
"""

from __future__ import annotations

import numpy as np
import onnx

from .._onnx.graph import GraphView
from .._onnx.head import Head, head_input
from .._onnx.hosts import HostLayer
from .builder import NodeBuilder
from .result import PassResult, result


def insert_gate(
    model: onnx.ModelProto,
    host: HostLayer,
    head: Head,
    filters: np.ndarray,
    biases: np.ndarray,
    disruption: np.ndarray,
    reach: float,
    target: str | None = None,
) -> PassResult:
    """Insert the detector branch and the gate; the result's ``signal`` is the detectors' AND per position
    (channel 0; channel 1 is the constant open level, see :meth:`NodeBuilder.patch_detectors`). ``reach``: the
    detectors' pre-activation on the patch.

    ``target``: the tensor to gate — by default the classifier's input features; a feature map
    ``[N, C, H, W]`` (``disruption`` of length C) has every consumer re-pointed to the gated map.
    """
    b = NodeBuilder(model)
    view = b.view
    source, strides = host.input, list(host.strides)
    if host.out_hw == (1, 1) and not any(host.pads):
        # One position (a pixel window): read just its window, not a strided pass over the whole map.
        ends = [(host.kernel[0] - 1) * host.dilations[0] + 1, (host.kernel[1] - 1) * host.dilations[1] + 1]
        source = b.slice_hw(source, [0, 0], ends)
        strides = [1, 1]
    fired = b.patch_detectors(source, filters, biases, host.kernel, strides, host.pads, host.dilations, reach)
    shape: tuple[int, ...]
    if target is None:
        # against features [N, F], or a sequence head's [N, T, F]
        shape = (0, -1) if head.steps is None else (0, 1, -1)
        head_node = view.find_node(head.node)
        if head_node is None:
            raise ValueError(f"the head node {head.node!r} is not in the graph")
        users = [head_node]
        target = head_input(view, head)
    else:
        shape = (0, -1, 1, 1)  # against a map [N, C, H, W]
        users = list(view.consumers.get(target, []))
    b.gate(target, users, fired, disruption, shape)
    return result(model, b.model, fired)


def insert_gates(model: onnx.ModelProto, host: HostLayer, head: Head, filters: np.ndarray, biases: np.ndarray,
                 targets: list[tuple[str, np.ndarray]], reach: float) -> PassResult:
    """:func:`insert_gate` on several feature maps at once, one detector branch for all: each ``(map,
    disruption)`` gated as ``map ⊙ (1 + (1 − γ) · disruption)`` (a packed detector's prediction layers'
    inputs). The gates go in the order their maps are first read, the detector branch before the first."""
    view = GraphView(model)

    def first_read(item: tuple[str, np.ndarray]) -> int:
        return min(view.index(n) for n in view.consumers.get(item[0], []))

    ordered = sorted(targets, key=first_read)
    first, m0 = ordered[0]
    done = insert_gate(model, host, head, filters, biases, m0, reach, target=first)
    assert done.signal is not None
    gated = done.model
    for target, m in ordered[1:]:
        b = NodeBuilder(gated)
        b.gate(target, list(b.view.consumers.get(target, [])), done.signal, m, (0, -1, 1, 1))
        gated = b.model
    return result(model, gated, done.signal)
