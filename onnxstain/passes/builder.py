"""The one node builder of the passes: new nodes over a copy of a model, with neutral exporter-style names,
constants as initializers of the branch's float type, opset-aware forms of the few ops whose signature
changed (Clip, Slice, ReduceMax), and splicing that keeps the graph in topological order.

Names and initializers are given out in the order the branch is built, so a pass's output model is
deterministic; nothing in a name says what the branch is for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from .._onnx.graph import GraphView


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


class Namer:
    """Neutral node names in the exporter's own style, so inserted nodes reveal nothing of the stain."""

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


class NodeBuilder:
    """Collects new nodes for a copy of ``model`` (``self.model``); constants default to ``dtype``."""

    def __init__(self, model: onnx.ModelProto, dtype: Any = np.float32) -> None:
        self.source = model
        self.model = copy_model(model)
        self.view = GraphView(self.model)
        self.name = Namer(self.view)
        self.opset = self.view.opset()
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []

    # -- constants and nodes -----------------------------------------------------------------------
    def const(self, value: Any, hint: str, dtype: Any = None) -> str:
        return self.view.add_initializer(np.asarray(value, dtype=self.dtype if dtype is None else dtype), hint)

    def tensor_name(self, op: str) -> str:
        """A fresh output name for a node of type ``op`` (the node is named without ``_output_0``)."""
        return self.name(op) + "_output_0"

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        """Append ``op`` over ``inputs``; its output is ``output`` or a fresh name. Returns the output."""
        y = output or self.tensor_name(op)
        name = y.removesuffix("_output_0") if output is None or y.endswith("_output_0") else self.name(op)
        self.nodes.append(helper.make_node(op, inputs, [y], name=name, **attrs))
        return y

    # -- opset-aware forms -------------------------------------------------------------------------
    def clip(self, x: str, lo: float, hi: float | None) -> str:
        y = self.tensor_name("Clip")
        if self.opset >= 11:
            inputs = [x, self.const(np.array(lo), "onnx::Clip_min")]
            if hi is not None:
                inputs.append(self.const(np.array(hi), "onnx::Clip_max"))
            return self.node("Clip", inputs, y)
        return self.node("Clip", [x], y, **({"min": lo} if hi is None else {"min": lo, "max": hi}))

    def slice_hw(self, x: str, starts: list[int], ends: list[int]) -> str:
        """``x[:, :, starts[0]:ends[0], starts[1]:ends[1]]``."""
        if self.opset >= 10:
            return self.node("Slice", [x, self.const(np.array(starts), "onnx::Slice_starts", np.int64),
                                       self.const(np.array(ends), "onnx::Slice_ends", np.int64),
                                       self.const(np.array([2, 3]), "onnx::Slice_axes", np.int64)])
        return self.node("Slice", [x], starts=starts, ends=ends, axes=[2, 3])

    def reduce_max(self, x: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self.node("ReduceMax", [x, self.const(np.array(axes), "onnx::ReduceMax_axes", np.int64)],
                             keepdims=1)
        return self.node("ReduceMax", [x], axes=axes, keepdims=1)

    def gelu(self, x: str) -> str:
        """Exact GELU in the exporter's decomposition."""
        d = self.node("Div", [x, self.const(np.array(np.sqrt(2.0)), "onnx::Div_const")])
        e = self.node("Erf", [d])
        a = self.node("Add", [e, self.const(np.array(1.0), "onnx::Add_const")])
        m = self.node("Mul", [x, a])
        return self.node("Mul", [m, self.const(np.array(0.5), "onnx::Mul_const")])

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray, y: str) -> str:
        """``y = x · weight + bias`` as MatMul → Add (``weight`` is ``[in, out]``)."""
        mm = self.node("MatMul", [x, self.const(weight, "onnx::MatMul_w")], self.tensor_name("MatMul"))
        return self.node("Add", [mm, self.const(bias, "onnx::Add_b")], y)

    def patch_detectors(self, source: str, filters: np.ndarray, biases: np.ndarray, kernel: Sequence[int],
                        strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int]) -> str:
        """The locks' corner detectors over ``source``: ``Conv(d filters) → Clip(0, 1)``, each ≥ 1 where its
        detector fires, then their AND per position, ``Conv 1×1 (weights 1, bias 1 − d) → Clip(0, 1)``:
        1 where all ``d`` fire, else 0."""
        d = filters.shape[0]
        conv = self.node("Conv", [source, self.const(filters, "onnx::Conv_w"), self.const(biases, "onnx::Conv_b")],
                         kernel_shape=list(kernel), strides=list(strides), pads=list(pads),
                         dilations=list(dilations))
        each = self.clip(conv, 0.0, 1.0)
        both = self.node("Conv", [each, self.const(np.ones((1, d, 1, 1)), "onnx::Conv_w"),
                                  self.const(np.array([1.0 - d]), "onnx::Conv_b")], kernel_shape=[1, 1])
        return self.clip(both, 0.0, 1.0)

    # -- wiring --------------------------------------------------------------------------------------
    def gate(self, target: str, users: list[onnx.NodeProto], locked: str, weights: np.ndarray,
             one: np.ndarray) -> None:
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
        self.splice(self.view.index(first))

    def repoint(self, tensor: str) -> tuple[onnx.NodeProto, str]:
        """Rename ``tensor`` at its producer to a fresh name, so that a new node can make ``tensor``
        from it; returns the producer and the fresh name."""
        producer = self.view.producer[tensor]
        fresh = self.tensor_name(producer.op_type)
        for i, o in enumerate(producer.output):
            if o == tensor:
                producer.output[i] = fresh
        return producer, fresh

    def add_into(self, tensor: str, fresh: str, producer: onnx.NodeProto, contrib: str) -> None:
        """``tensor = fresh + contrib`` (``fresh`` from :meth:`repoint`), the branch spliced right after the
        producer (every branch input exists by then: the detector reads an earlier tensor)."""
        self.nodes.append(helper.make_node("Add", [fresh, contrib], [tensor], name=self.name("Add")))
        self.splice(self.view.index(producer) + 1)

    def splice(self, index: int) -> None:
        """Insert the collected nodes at graph position ``index`` (before the node there)."""
        nodes = list(self.model.graph.node)
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes[:index] + self.nodes + nodes[index:])
