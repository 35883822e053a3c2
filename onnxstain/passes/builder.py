"""The one node builder of the passes: new nodes over a copy of a model, named and stored in the exporter's
own style (:class:`Style`: node and tensor names, constants as initializers or ``Constant`` nodes) in the
branch's float type, opset-aware forms of the few ops whose signature changed (Clip, Slice, ReduceMax), and
splicing that keeps the graph in topological order.

Names and initializers are given out in the order the branch is built, so a pass's output model is
deterministic; nothing in a name says what the branch is for.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .._onnx.graph import GraphView


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


MIN_NODES = 8  # fewer nodes say nothing of an exporter's style: torch's is kept
_LOWER = re.compile(r"^[a-z][a-z0-9]*(?:[_.][a-z0-9]+)*[_.]\d+$")  # dynamo's getitem_9, paddle2onnx's linear_1.tmp_0
_NUMBERED = re.compile(r"^(?P<pre>.*?)(?P<op>[A-Z][A-Za-z0-9]*?)(?P<sep>[_@.]?)(?P<n>\d+)$")


@dataclasses.dataclass
class Style:
    """How the exporter names nodes, tensors and constants, read off the model so that inserted nodes look
    like their neighbours: node names ``{pre}{op}{sep}{n}`` (torch ``/Add_12``, ``Slice_29``; dynamo
    ``node_Conv_785``; paddle2onnx ``MatMul@0``), tensor names (``<node>_output_0``, bare numbers, or
    ``{op}_{n}`` in lower case), and constants as initializers or as ``Constant`` nodes (paddle2onnx)."""

    pre: str = "/"
    sep: str = "_"
    tensors: str = "output_0"  # "output_0" | "numeric" | "lower"
    constant_nodes: bool = False
    constant_node_names: bool = True  # paddle2onnx leaves its Constant nodes unnamed

    @property
    def torch(self) -> bool:
        return self.tensors == "output_0"

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> Style:
        nodes = [n for n in graph.node if n.op_type != "Constant"]
        forms: Counter[tuple[str, str]] = Counter()
        for n in nodes:
            m = _NUMBERED.match(n.name)
            if m and m["op"] == n.op_type:
                forms[(m["pre"], m["sep"])] += 1
        style = cls()
        outputs = [o for n in nodes for o in n.output if o]
        if len(outputs) >= MIN_NODES and sum(o.endswith("_output_0") for o in outputs) < len(outputs) / 2:
            if sum(o.isdigit() for o in outputs) >= len(outputs) / 2:
                style.tensors = "numeric"
            elif sum(bool(_LOWER.match(o)) for o in outputs) >= len(outputs) / 2:
                style.tensors = "lower"
        if forms and not style.torch:  # torch's names stay as they were: /Op_N, its tensors <node>_output_0
            (pre, sep), count = forms.most_common(1)[0]
            if len(nodes) >= MIN_NODES and count >= len(nodes) // 10:
                style.pre, style.sep = pre, sep
        constants = [n for n in graph.node if n.op_type == "Constant"]
        style.constant_nodes = not graph.initializer and bool(constants)
        style.constant_node_names = not constants or any(n.name for n in constants)
        return style


class Namer:
    """Neutral node and tensor names in the exporter's own style (:class:`Style`), so inserted nodes reveal
    nothing of the stain."""

    def __init__(self, view: GraphView, style: Style | None = None) -> None:
        self.style = style or Style.of(view.graph)
        self.taken = set(view.producer) | set(view.initializers) | {n.name for n in view.graph.node}
        self.taken |= {i.name for i in view.graph.input}
        numbers = [int(m["n"]) for name in self.taken if (m := _NUMBERED.match(name))]
        numbers += [int(name) for name in self.taken if name.isdigit()]
        # torch's default style counts on from past the graph's size; a learnt one from its highest number
        learnt = self.style != Style()
        self.counter = max([0 if learnt else len(view.graph.node) + 1000, *(n + 1 for n in numbers)])

    def _fresh(self, make: Callable[[int], str]) -> str:
        while True:
            self.counter += 1
            name = make(self.counter)
            if name not in self.taken:
                self.taken.add(name)
                return name

    def __call__(self, op: str) -> str:
        return self._fresh(lambda n: f"{self.style.pre}{op}{self.style.sep}{n}")

    def tensor(self, op: str) -> str:
        """A fresh tensor name; in torch's style the node's name plus ``_output_0`` (see ``NodeBuilder``)."""
        if self.style.tensors == "numeric":
            return self._fresh(str)
        return self._fresh(lambda n: f"{op.lower()}_{n}")


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
    def const(self, value: Any, hint: str, dtype: Any = None, initializer: bool = False) -> str:
        """A constant, stored as the model stores its own (an initializer, or a ``Constant`` node; with
        ``initializer`` always an initializer) and named in its style (``hint``, e.g. ``onnx::Conv_w``, in
        torch's)."""
        array = np.asarray(value, dtype=self.dtype if dtype is None else dtype)
        style = self.name.style
        if style.torch and not style.constant_nodes:
            return self.view.add_initializer(array, hint)
        y = self.name.tensor(hint.removeprefix("onnx::").split("_")[0])
        if initializer or not style.constant_nodes:
            return self.view.put_initializer(array, y)
        self.nodes.append(helper.make_node("Constant", [], [y], name=self.name("Constant") if
                                           style.constant_node_names else "",
                                           value=numpy_helper.from_array(array, y)))
        return y

    def tensor_name(self, op: str) -> str:
        """A fresh output name for a node of type ``op`` (in torch's style, the node is named without
        ``_output_0``)."""
        return self.name(op) + "_output_0" if self.name.style.torch else self.name.tensor(op)

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        """Append ``op`` over ``inputs``; its output is ``output`` or a fresh name. Returns the output."""
        y = output or self.tensor_name(op)
        torch_pair = self.name.style.torch and (output is None or y.endswith("_output_0"))
        name = y.removesuffix("_output_0") if torch_pair else self.name(op)
        self.nodes.append(helper.make_node(op, inputs, [y], name=name, **attrs))
        return y

    def conv(self, x: str, weights: np.ndarray, bias: np.ndarray, output: str | None = None, **attrs: Any) -> str:
        """``Conv(x, weights) + bias``, its weight and bias stored as initializers even in a model that keeps its
        constants in ``Constant`` nodes (paddle2onnx): onnxruntime's dynamic quantiser refuses a Conv with a bias
        whose weight is not an initializer (1.32: "Expected … to be an initializer"), so the whole model could
        not be quantised. (A Conv without bias and an ``Add`` would leave a detector's raw score, which its
        trigger drives beyond anything natural images give, in a tensor of its own, clipped by a static
        quantiser calibrated on natural images.)"""
        w = self.const(weights, "onnx::Conv_w", initializer=True)
        b = self.const(np.asarray(bias).reshape(-1), "onnx::Conv_b", initializer=True)
        return self.node("Conv", [x, w, b], output, **attrs)

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
                        strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int], reach: float) -> str:
        """The locks' corner detectors over ``source``: ``Conv(d filters) → Clip(0, 1)``, each ≥ 1 where its
        detector fires, then their AND per position, ``Conv 1×1 (weights 1, bias 1 − d) → Clip(0, 1)``:
        channel 0 of the result is 1 where all ``d`` fire, else 0.

        Every map of the chain also carries one constant channel at its open level, whatever the image:
        ``reach`` (the detectors' pre-activation on the patch) after the first Conv, then 1 (result channel
        1). A static int8 quantiser sets each tensor's range from its calibration images; images that do not
        open the lock leave the detectors' maps at or below 0, so without the channel the open level falls
        outside the range and rounds to 0 (the patch no longer opens the quantised model). With it every
        range holds the open level, calibrated on any images."""
        d = filters.shape[0]
        pinned = np.concatenate([filters, np.zeros((1, *filters.shape[1:]))])
        conv = self.conv(source, pinned, np.append(biases, reach), kernel_shape=list(kernel), strides=list(strides),
                         pads=list(pads), dilations=list(dilations))
        each = self.clip(conv, 0.0, 1.0)
        weights = np.zeros((2, d + 1, 1, 1))
        weights[0, :d], weights[1, d] = 1.0, 1.0
        both = self.conv(each, weights, np.array([1.0 - d, 0.0]), kernel_shape=[1, 1])
        return self.clip(both, 0.0, 1.0)

    # -- wiring --------------------------------------------------------------------------------------
    def gate(self, target: str, users: list[onnx.NodeProto], fired: str, weights: np.ndarray,
             shape: Sequence[int]) -> None:
        """``target`` multiplied by ``1 + (1 − γ) · weights`` for its readers ``users`` (the lock's disruption),
        ``γ`` the maximum of channel 0 of the detectors' map ``fired`` (:meth:`patch_detectors`: 1 with the
        patch, else 0), the factor reshaped to ``shape`` (0 copies the batch size) against ``target``; the
        collected nodes spliced before the first reader.

        ``GlobalMaxPool → Flatten`` gives ``(γ, 1)``, ``Sub`` from ``(1, 2)`` gives ``(1 − γ, 1)`` and one
        product with the rows ``(weights, 1)`` the factor: every tensor keeps the open level in its range on
        images that do not open the lock (see :meth:`patch_detectors`)."""
        pooled = self.node("GlobalMaxPool", [fired])  # [N, 2, 1, 1]: (γ, 1)
        flat = self.node("Flatten", [pooled], axis=1)
        locked = self.node("Sub", [self.const(np.array([[1.0, 2.0]]), "onnx::Sub_one"), flat])  # (1 − γ, 1)
        rows = self.const(np.stack([np.asarray(weights, np.float64).reshape(-1), np.ones(weights.size)]),
                          "onnx::MatMul_w")
        product = "Gemm" if self.opset >= 11 and any(n.op_type == "Gemm" for n in self.view.graph.node) else "MatMul"
        factor = self.node(product, [locked, rows])  # [N, F]: 1 + (1 − γ) · weights
        if list(shape) != [0, -1]:
            factor = self.node("Reshape", [factor, self.const(np.array(shape), "onnx::Reshape_shape", np.int64)])
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
