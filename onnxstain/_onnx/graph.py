"""A read/write view of an ONNX graph: who produces and consumes each tensor, and weight access.

Weights can be initializers, ``Constant`` nodes, or the output of a ``DequantizeLinear`` of constant
codes, scale and zero point (QDQ int8 weights): :meth:`GraphView.array` returns the dequantized
values, and writing one re-encodes it in the quantized domain (see :mod:`.quant`: per-channel
weights get a new scale for each edited channel only; a Conv/Gemm int32 bias keeps its scale equal
to ``input_scale · weight_scale``). Writing a weight that several nodes share makes a private copy
for the node being edited (copy-on-write), so the other users are untouched. Values are written
back in the tensor's own dtype (fp16 weights stay fp16, int8 codes stay int8).

``Q → DQ`` pairs on activations (fake quantization) are seen through by :meth:`skip_fake_quant`
and described by :meth:`fake_quant`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import BadModelError
from . import quant
from .shapes import Shapes, resolve
from .tensors import stored_array, tensor_array


class GraphView:
    def __init__(self, model: onnx.ModelProto, input_shape: tuple[int, ...] | None = None) -> None:
        """``input_shape``: the concrete input shape the model is analysed for (its tensors' static
        shapes, :meth:`resolved`); by default the declared one, a dynamic batch taken as 1."""
        self.model = model
        self.graph = model.graph
        self.input_shape = input_shape
        self._resolved: Shapes | None = None
        self.refresh()

    def resolved(self) -> Shapes:
        """Static shapes of every tensor (and the values of shape-only tensors) for ``input_shape``."""
        if self._resolved is None:
            self._resolved = resolve(self.model, self.input_shape)
        return self._resolved

    def value(self, name: str) -> np.ndarray | None:
        """A constant's value, or a shape-only tensor's value for the analysed input shape."""
        arr = self.array(name)
        if arr is None:
            arr = self.resolved().values.get(name)
        return arr

    def refresh(self) -> None:
        g = self.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in g.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
            if node.op_type == "Constant" and any(a.name == "value" for a in node.attribute):
                self.constant_nodes[node.output[0]] = node
        # DequantizeLinear of constant codes / scale / zero point: a quantized weight
        self.dequantized: dict[str, onnx.NodeProto] = {}
        for node in g.node:
            if (node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx")
                    and all(self._is_stored(t) for t in node.input if t)
                    and not self.attr(node, "block_size", 0)):
                self.dequantized[node.output[0]] = node
        init_names = set(self.initializers)
        self.graph_inputs = [i for i in g.input if i.name not in init_names]
        self.output_names = [o.name for o in g.output]

    # -- naming ------------------------------------------------------------------------------------
    def node_name(self, node: onnx.NodeProto) -> str:
        """The node's name, or a stable synthetic one (``Conv#12``) when the exporter left it empty."""
        if node.name:
            return node.name
        return f"{node.op_type}#{self.index(node)}"

    def index(self, node: onnx.NodeProto) -> int:
        for i, n in enumerate(self.graph.node):
            if n is node:
                return i
        raise KeyError(node.name)

    def find_node(self, name: str) -> onnx.NodeProto | None:
        for i, node in enumerate(self.graph.node):
            if node.name == name or (not node.name and f"{node.op_type}#{i}" == name):
                return node
        return None

    def node(self, name: str) -> onnx.NodeProto:
        """The node :meth:`find_node` finds, for a caller that knows it exists (ValueError otherwise)."""
        node = self.find_node(name)
        if node is None:
            raise ValueError(f"node {name} is not in the model")
        return node

    def opset(self, domain: str = "") -> int:
        for imp in self.model.opset_import:
            if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
                return int(imp.version)
        return 0

    # -- weights -----------------------------------------------------------------------------------
    def _is_stored(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes

    def is_constant(self, name: str) -> bool:
        return self._is_stored(name) or name in self.dequantized

    def is_quantized(self, name: str) -> bool:
        return name in self.dequantized

    def _stored(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return tensor_array(self.initializers[name])  # external data is read from disk
        node = self.constant_nodes.get(name)
        if node is not None:
            attr = next(a for a in node.attribute if a.name == "value")
            return stored_array(attr.t)
        return None

    def array(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (a quantized weight is dequantized), or None."""
        if name in self.dequantized:
            return self.quantized(name).dequantize()
        return self._stored(name)

    def constant(self, name: str) -> np.ndarray:
        """The value :meth:`array` returns, for a caller that knows ``name`` is a constant (ValueError otherwise)."""
        arr = self.array(name)
        if arr is None:
            raise ValueError(f"{name} is not a constant tensor")
        return arr

    def same_constant(self, a: str, b: str) -> bool:
        """Whether tensors ``a`` and ``b`` hold equal constants (True too when neither is a constant)."""
        x, y = self.array(a), self.array(b)
        if x is None or y is None:
            return x is None and y is None
        return bool(np.array_equal(x, y))

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of a constant tensor, without reading its data (external data stays on disk)."""
        if name in self.initializers:
            return tuple(int(d) for d in self.initializers[name].dims)
        node = self.constant_nodes.get(name)
        if node is not None:
            return tuple(int(d) for d in next(a for a in node.attribute if a.name == "value").t.dims)
        dq = self.dequantized.get(name)
        if dq is not None:
            return self.shape(dq.input[0])
        return None

    def quantized(self, name: str) -> quant.Quantized:
        """Codes, scale, zero point and axis of the quantized weight ``name`` (a DQ output)."""
        dq = self.dequantized[name]
        q = self._stored(dq.input[0])
        scale = self._stored(dq.input[1])
        assert q is not None and scale is not None
        zp = self._stored(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if zp is None:
            zp = np.zeros(scale.shape, q.dtype)
        axis = int(self.attr(dq, "axis", 1))
        axis = axis % q.ndim if q.ndim else 0
        return quant.Quantized(q, scale, zp, axis)

    def fake_quant(self, node: onnx.NodeProto) -> tuple[float, float, str] | None:
        """(lowest, highest value, DQ output) of a ``QuantizeLinear`` whose only consumer dequantizes it.

        Per-tensor constant scale and zero point only. The lowest value is 0 when the pair cuts the
        negative side (uint8 with zero point 0, int8 with zero point −128): a ReLU in effect.
        """
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
            return None
        dq = self.only_consumer(node.output[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        if len(node.input) < 2 or self._stored(node.input[1]) is None:
            return None
        if list(dq.input[1:]) != list(node.input[1:]) and not all(
            self.same_constant(a, b) for a, b in zip(dq.input[1:], node.input[1:], strict=False)
        ):
            return None
        scale = self._stored(node.input[1])
        zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        zp = self._stored(zp_name) if zp_name else np.zeros((), np.uint8)
        if scale is None or zp is None or scale.size != 1 or zp.size != 1:
            return None
        lo, hi = quant.qrange(zp.dtype)
        s, z = float(scale.reshape(())), int(zp.reshape(()))
        return (lo - z) * s, (hi - z) * s, dq.output[0]

    def skip_fake_quant(self, tensor: str) -> str:
        """Follow ``tensor`` through ``Q → DQ`` pairs that are its only consumers; the last float tensor."""
        while True:
            node = self.only_consumer(tensor)
            fq = None if node is None else self.fake_quant(node)
            if fq is None:
                return tensor
            tensor = fq[2]

    def fake_quant_after(self, tensor: str) -> tuple[float, float] | None:
        """(lowest, highest) value a ``Q → DQ`` pair right after ``tensor`` can represent, if any."""
        node = self.only_consumer(tensor)
        fq = None if node is None else self.fake_quant(node)
        return None if fq is None else (fq[0], fq[1])

    def weight_users(self, name: str) -> int:
        return len(self.consumers.get(name, []))

    def set_input_array(self, node: onnx.NodeProto, input_index: int, value: np.ndarray) -> str:
        """Replace the constant feeding ``node.input[input_index]``; return the tensor name used.

        A constant shared with other nodes is copied first, so only ``node`` sees the new value.
        The dtype of the stored tensor is kept.
        """
        name = node.input[input_index]
        if name in self.dequantized:
            return self._set_quantized(node, input_index, value)
        old = self.array(name)
        if old is None:
            raise ValueError(f"input {input_index} of {self.node_name(node)} is not a constant")
        if value.shape != old.shape:
            raise ValueError(f"new value for {name} has shape {value.shape}, expected {old.shape}")
        new = np.asarray(value).astype(old.dtype, copy=False)
        if self.weight_users(name) > 1:
            fresh = self._fresh_name(name)
            self.graph.initializer.append(numpy_helper.from_array(new, fresh))
            node.input[input_index] = fresh
            self.refresh()
            return fresh
        if name in self.initializers:
            tensor = self.initializers[name]
            replacement = numpy_helper.from_array(new, name)
            tensor.CopyFrom(replacement)
        else:
            attr = next(a for a in self.constant_nodes[name].attribute if a.name == "value")
            attr.t.CopyFrom(numpy_helper.from_array(new, attr.t.name))
        return name

    def _set_quantized(self, node: onnx.NodeProto, input_index: int, value: np.ndarray) -> str:
        """Write a DQ weight: new codes (and per-channel scales) in its integer type.

        When ``node`` is a Conv/Gemm whose bias is an int32 DQ, the bias scale of every channel whose
        weight scale changed becomes ``input_scale · weight_scale`` again (the bias values are kept).
        """
        name = node.input[input_index]
        old = self.quantized(name)
        new = quant.requantize(old, value, name)
        name = self._store_quantized(node, input_index, old, new)
        if input_index == 1 and node.op_type in ("Conv", "Gemm") and len(node.input) > 2 \
                and node.input[2] in self.dequantized and new.per_axis:
            self._sync_bias_scale(node, old, new)
        return name

    def _sync_bias_scale(self, node: onnx.NodeProto, w_old: quant.Quantized, w_new: quant.Quantized) -> None:
        bias = self.quantized(node.input[2])
        if bias.q.dtype != np.int32 or bias.scale.size != w_new.scale.size:
            return
        moved = w_new.scale != w_old.scale
        if not moved.any():
            return
        x_scale = None
        producer = self.producer.get(node.input[0])
        if producer is not None and producer.op_type == "DequantizeLinear":
            arr = self._stored(producer.input[1])
            if arr is not None and arr.size == 1:
                x_scale = arr.astype(bias.scale.dtype).reshape(())
        target = bias.scale.copy()
        if x_scale is not None:
            target[moved] = (x_scale * w_new.scale.astype(bias.scale.dtype))[moved]
        else:
            ratio = bias.scale.astype(np.float64) / w_old.scale.astype(np.float64)
            target[moved] = (ratio * w_new.scale.astype(np.float64))[moved]
        self._store_quantized(node, 2, bias, quant.rescale(bias, target, node.input[2]))

    def _store_quantized(self, node: onnx.NodeProto, input_index: int, old: quant.Quantized,
                         new: quant.Quantized) -> str:
        name = node.input[input_index]
        dq = self.dequantized[name]
        parts = [(0, old.q, new.q), (1, old.scale, new.scale)]
        if len(dq.input) > 2 and dq.input[2]:
            parts.append((2, old.zero_point, new.zero_point))
        elif np.any(new.zero_point != 0):
            raise ValueError(f"{name}: a zero point is needed but the DequantizeLinear has none")
        if self.weight_users(name) > 1:
            # the DQ output feeds other nodes too: a private DQ for ``node``, placed after the shared one
            fresh = onnx.NodeProto()
            fresh.CopyFrom(dq)
            fresh.name = self._fresh_name(dq.name or "DequantizeLinear")
            fresh.output[0] = self._fresh_name(name)
            for i, _, arr in parts:
                fresh.input[i] = self.add_initializer(arr, dq.input[i])
            self.graph.node.insert(self.index(dq) + 1, fresh)
            node.input[input_index] = fresh.output[0]
            self.refresh()
            return fresh.output[0]
        if any(self.weight_users(dq.input[i]) > 1 for i, _, _ in parts):
            # codes, scale or zero point shared with another DQ: private copies for this one
            for i, _, arr in parts:
                dq.input[i] = self.add_initializer(arr, dq.input[i])
            self.refresh()
            return name
        for i, before, arr in parts:
            if not np.array_equal(before, arr):
                self._write_stored(dq.input[i], arr)
        return name

    def _write_stored(self, name: str, value: np.ndarray) -> None:
        if name in self.initializers:
            self.initializers[name].CopyFrom(numpy_helper.from_array(value, name))
        else:
            attr = next(a for a in self.constant_nodes[name].attribute if a.name == "value")
            attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))

    def add_initializer(self, value: np.ndarray, hint: str) -> str:
        return self.put_initializer(value, self._fresh_name(hint))

    def put_initializer(self, value: np.ndarray, name: str) -> str:
        """A new initializer named ``name`` (which the caller made fresh)."""
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        self.initializers[name] = self.graph.initializer[-1]
        return name

    def _fresh_name(self, base: str) -> str:
        taken = set(self.initializers) | set(self.producer) | {i.name for i in self.graph.input}
        i = 1
        while f"{base}.{i}" in taken:
            i += 1
        return f"{base}.{i}"

    # -- attributes --------------------------------------------------------------------------------
    @staticmethod
    def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def clip_bounds(self, node: onnx.NodeProto) -> tuple[float | None, float | None]:
        """(min, max) of a Clip node, from attributes (opset < 11) or constant inputs."""
        lo = self.attr(node, "min")
        hi = self.attr(node, "max")
        if len(node.input) > 1 and node.input[1]:
            lo = self._scalar(node, node.input[1])
        if len(node.input) > 2 and node.input[2]:
            hi = self._scalar(node, node.input[2])
        return (None if lo is None else float(lo), None if hi is None else float(hi))

    def _scalar(self, node: onnx.NodeProto, tensor: str) -> float | None:
        a = self.array(tensor)
        if a is not None and a.size != 1:
            raise BadModelError(f"{node.op_type} node {node.name!r}: its bound {tensor!r} has shape {list(a.shape)}, "
                                "not a scalar")
        return None if a is None else float(a.reshape(()))

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and tensor not in self.output_names:
            return users[0]
        return None


def dominates(view: GraphView, tensor: str, output: str) -> bool:
    """Whether every path from the model input to ``output`` goes through ``tensor``."""
    seen = {i.name for i in view.graph_inputs} | set(view.initializers) | set(view.constant_nodes)
    stack = [i.name for i in view.graph_inputs]
    while stack:
        t = stack.pop()
        for node in view.consumers.get(t, []):
            for out in node.output:
                if out != tensor and out not in seen:
                    seen.add(out)
                    stack.append(out)
    return output not in seen


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Static shapes of every tensor for the model's declared input shape (a dynamic batch taken as 1):
    shape inference, then folding and one onnxruntime run where it is not enough (:mod:`.shapes`)."""
    return resolve(model).dims
