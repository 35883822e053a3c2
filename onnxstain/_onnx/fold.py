"""Fold the parts of a graph that depend on the input's *shape* only, for one fixed input shape.

Exported models compute some tensors from ``Shape`` of the input alone: TensorFlow-style "same"
padding, token counts, the batch-expanded CLS token, and DINOv2's position embedding resized
(bicubic ``Resize``) to the patch grid. For one fixed input shape these are constants.
:func:`shape_only_values` evaluates them once with onnxruntime; :func:`fold_shape_only` returns a
copy of the model where they are initializers, so that a differentiable copy of the prefix
(:mod:`onnxstain.torchprefix`) and shape inference (:mod:`.shapes`) need not handle the ops that
compute them. The copy is for analysis and the trigger search only; edits are made to the original
model, whose dynamic axes stay dynamic.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def value_dependent(model: onnx.ModelProto) -> set[str]:
    """Tensors whose *values* depend on a graph input's values (``Shape``/``Size`` outputs do not)."""
    inits = {t.name for t in model.graph.initializer}
    dep = {i.name for i in model.graph.input if i.name not in inits}
    for node in model.graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        if any(t in dep for t in node.input if t):
            dep.update(node.output)
    return dep


def _frontier(model: onnx.ModelProto, dep: set[str]) -> list[str]:
    """Computed tensors that do not depend on input values but feed nodes that do."""
    frontier: list[str] = []
    seen: set[str] = set()
    produced = {o for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if not any(o in dep for o in node.output):
            continue
        for t in node.input:
            if t and t not in dep and t in produced and t not in seen:
                seen.add(t)
                frontier.append(t)
    return frontier


def shape_only_values(model: onnx.ModelProto, example: np.ndarray, providers: list[str] | None = None,
                      any_batch: bool = False) -> dict[str, np.ndarray]:
    """The value, for ``example``'s shape, of every computed tensor that feeds value-dependent nodes
    without depending on input values itself (empty when there is none).

    ``any_batch``: keep only the values that are the same for a batch of one and a batch of two
    (a ``Reshape`` to ``[N, -1]`` computed from the batch size stays computed).
    """
    from ..runtime import input_name, session, with_outputs

    frontier = _frontier(model, value_dependent(model))
    if not frontier:
        return {}
    sess = session(with_outputs(model, frontier), providers)
    name = input_name(sess)
    values = dict(zip(frontier, (np.asarray(v) for v in sess.run(frontier, {name: example})), strict=True))
    if any_batch:
        twice = np.concatenate([example[:1], example[:1]])
        try:
            other = sess.run(frontier, {name: twice})
        except Exception:  # a graph fixed at batch 1: every value holds for the only batch it takes
            other = list(values.values())
        values = {k: v for (k, v), w in zip(values.items(), other, strict=True)
                  if v.shape == np.shape(w) and np.array_equal(v, w)}
    return values


def fold_values(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with ``values`` stored as initializers and the nodes that only computed them removed."""
    if not values:
        return model
    dep = value_dependent(model)
    nodes = list(model.graph.node)
    keep = [any(o in dep for o in n.output) for n in nodes]
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    todo = [t for i, n in enumerate(nodes) if keep[i] for t in n.input]
    while todo:  # what a kept node reads and is not folded must still be computed
        t = todo.pop()
        i = producer.get(t)
        if t in values or i is None or keep[i]:
            continue
        keep[i] = True
        todo.extend(nodes[i].input)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(n for n, k in zip(nodes, keep, strict=True) if k)
    for name, value in values.items():
        out.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return out


def fold_shape_only(model: onnx.ModelProto, example: np.ndarray, providers: list[str] | None = None,
                    any_batch: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` with every shape-only tensor feeding value-dependent nodes stored as a constant
    (computed for ``example``'s shape; valid for inputs of that shape only, or of that shape with any batch
    size with ``any_batch``)."""
    return fold_values(model, shape_only_values(model, example, providers, any_batch))


def _pad_amounts(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[int] | None:
    """A constant-mode zero ``Pad``'s pads as ints, or None if they are not constant, not zero-valued, or
    given for a subset of axes."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    mode = attrs.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return None
    if "pads" in attrs:  # opset < 11
        return None if float(attrs.get("value", 0.0)) != 0.0 else [int(p) for p in attrs["pads"]]
    if len(node.input) > 3 and node.input[3]:  # axes (opset 18)
        return None
    if len(node.input) > 2 and node.input[2]:
        value = inits.get(node.input[2])
        if value is None or np.any(numpy_helper.to_array(value) != 0):
            return None
    pads = inits.get(node.input[1]) if len(node.input) > 1 else None
    return None if pads is None else [int(p) for p in numpy_helper.to_array(pads).reshape(-1)]


def fuse_pads(model: onnx.ModelProto, keep: set[str] | frozenset[str] = frozenset()) -> onnx.ModelProto:
    """``model`` with every zero ``Pad`` of the spatial axes that feeds only a 2-D ``Conv`` folded into the
    Conv's own pads (asymmetric ones included), as exporters that know the input size write it. Explicit Pads
    (run-time "same" padding, once folded) cost onnxruntime a copy of the map before every such Conv:
    EfficientNet-Lite's 17 take twice the time of its convolutions at batch 32. A Pad whose output is in
    ``keep`` or a graph output stays. The same model (not a copy) when there is nothing to fuse."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    protected = set(keep) | {o.name for o in model.graph.output}
    fused: dict[str, tuple[str, list[int]]] = {}  # Conv output → (its new input, its new pads)
    dropped: set[str] = set()  # Pad outputs
    for node in model.graph.node:
        if node.op_type != "Pad" or node.output[0] in protected or len(consumers.get(node.output[0], [])) != 1:
            continue
        conv = consumers[node.output[0]][0]
        if conv.op_type != "Conv" or conv.input[0] != node.output[0]:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
            continue
        pads = _pad_amounts(node, inits)
        if pads is None or len(pads) != 8 or min(pads) < 0 or any(pads[i] for i in (0, 1, 4, 5)):
            continue
        own = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
        if len(own) != 4:
            continue
        new = [own[0] + pads[2], own[1] + pads[3], own[2] + pads[6], own[3] + pads[7]]
        fused[conv.output[0]] = (node.input[0], new)
        dropped.add(node.output[0])
    if not fused:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        if node.op_type == "Pad" and node.output[0] in dropped:
            continue
        if node.op_type == "Conv" and node.output[0] in fused:
            src, new = fused[node.output[0]]
            node.input[0] = src
            kept = [a for a in node.attribute if a.name != "pads"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("pads", new)])
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
