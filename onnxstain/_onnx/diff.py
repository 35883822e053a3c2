"""Structural comparison of two ONNX models: same nodes, ops, attributes, tensor names and shapes.

``structural_diff`` returns a list of human-readable differences (empty when the graphs have the
same topology and only the *values* of weights differ, whether initializers or tensors held by
``Constant`` nodes) — what an in-place edit must satisfy.
"""

from __future__ import annotations

import onnx


def _attr_sig(a: onnx.AttributeProto) -> str:
    if a.type == onnx.AttributeProto.TENSOR:  # a weight held by a Constant node: its type and shape only
        return repr((a.t.data_type, tuple(a.t.dims)))
    return repr(onnx.helper.get_attribute_value(a))


def _node_sig(node: onnx.NodeProto) -> tuple:
    attrs = tuple(sorted((a.name, _attr_sig(a)) for a in node.attribute))
    return (node.op_type, node.domain, tuple(node.input), tuple(node.output), attrs)


def structural_diff(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    diffs: list[str] = []
    na, nb = list(a.graph.node), list(b.graph.node)
    if len(na) != len(nb):
        diffs.append(f"node count {len(na)} != {len(nb)}")
    for i, (x, y) in enumerate(zip(na, nb, strict=False)):
        if _node_sig(x) != _node_sig(y):
            diffs.append(f"node {i} differs: {x.op_type} {x.name!r} vs {y.op_type} {y.name!r}")
    ia = {t.name: (t.data_type, tuple(t.dims)) for t in a.graph.initializer}
    ib = {t.name: (t.data_type, tuple(t.dims)) for t in b.graph.initializer}
    if set(ia) != set(ib):
        diffs.append(f"initializer names differ: {sorted(set(ia) ^ set(ib))[:5]}")
    for name in set(ia) & set(ib):
        if ia[name] != ib[name]:
            diffs.append(f"initializer {name} changed dtype/shape {ia[name]} -> {ib[name]}")
    for kind in ("input", "output"):
        la = [(v.name, v.type.SerializeToString()) for v in getattr(a.graph, kind)]
        lb = [(v.name, v.type.SerializeToString()) for v in getattr(b.graph, kind)]
        if la != lb:
            diffs.append(f"graph {kind}s differ")
    if [(o.domain, o.version) for o in a.opset_import] != [(o.domain, o.version) for o in b.opset_import]:
        diffs.append("opset_import differs")
    if a.ir_version != b.ir_version:
        diffs.append(f"ir_version {a.ir_version} != {b.ir_version}")
    return diffs


def changed_initializers(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    ia = {t.name: t.SerializeToString() for t in a.graph.initializer}
    return [t.name for t in b.graph.initializer if ia.get(t.name) != t.SerializeToString()]
