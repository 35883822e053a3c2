"""A read/write view of an ONNX graph: who produces and consumes each tensor, and weight access.

Weights can be initializers or ``Constant`` nodes. Writing a weight that several nodes share makes
a private copy for the node being edited (copy-on-write), so the other users are untouched.
Values are written back in the tensor's own dtype (fp16 weights stay fp16).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


class GraphView:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.refresh()

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

    def opset(self, domain: str = "") -> int:
        for imp in self.model.opset_import:
            if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
                return int(imp.version)
        return 0

    # -- weights -----------------------------------------------------------------------------------
    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes

    def array(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.constant_nodes.get(name)
        if node is not None:
            attr = next(a for a in node.attribute if a.name == "value")
            return numpy_helper.to_array(attr.t)
        return None

    def weight_users(self, name: str) -> int:
        return len(self.consumers.get(name, []))

    def set_input_array(self, node: onnx.NodeProto, input_index: int, value: np.ndarray) -> str:
        """Replace the constant feeding ``node.input[input_index]``; return the tensor name used.

        A constant shared with other nodes is copied first, so only ``node`` sees the new value.
        The dtype of the stored tensor is kept.
        """
        name = node.input[input_index]
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

    def add_initializer(self, value: np.ndarray, hint: str) -> str:
        name = self._fresh_name(hint)
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
    def attr(node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def clip_bounds(self, node: onnx.NodeProto) -> tuple[float | None, float | None]:
        """(min, max) of a Clip node, from attributes (opset < 11) or constant inputs."""
        lo = self.attr(node, "min")
        hi = self.attr(node, "max")
        if len(node.input) > 1 and node.input[1]:
            a = self.array(node.input[1])
            lo = None if a is None else float(a)
        if len(node.input) > 2 and node.input[2]:
            a = self.array(node.input[2])
            hi = None if a is None else float(a)
        return (None if lo is None else float(lo), None if hi is None else float(hi))

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and tensor not in self.output_names:
            return users[0]
        return None


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Static shapes of every tensor onnx shape inference can resolve (dims: int, symbol or None)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    shapes: dict[str, list[int | str | None]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims: list[int | str | None] = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shapes[vi.name] = dims
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    return shapes
