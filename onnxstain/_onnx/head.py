"""The classifier head, and how a host channel reaches it.

``find_head`` finds the layer producing the model's scores: a Gemm (or MatMul + Add) whose output
is the graph output, possibly through Softmax/Identity or a Cast between float types.
``direct_route`` tells whether a host's activated channel ``k`` reaches that head as feature ``k``
through pooling and reshaping only (GlobalAveragePool / GlobalMaxPool / ReduceMean over H, W, then
Flatten / Reshape / Squeeze), which is what an in-place route through existing channels needs.
"""

from __future__ import annotations

import dataclasses

import onnx

from .graph import GraphView
from .hosts import HostLayer

_PASS_THROUGH = {"Identity", "Softmax", "LogSoftmax", "Sigmoid"}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_RESHAPES = {"Flatten", "Reshape", "Squeeze"}


@dataclasses.dataclass(frozen=True)
class Head:
    node: str  # name of the Gemm / MatMul producing the scores
    op: str
    weight: str
    bias: str | None
    bias_add: str | None
    trans_b: bool
    alpha: float
    beta: float
    scores: str  # tensor holding the scores (pre-softmax)
    output: str  # graph output carrying them
    classes: int
    in_features: int


@dataclasses.dataclass(frozen=True)
class DirectRoute:
    pool: str  # "mean" or "max"
    positions: int  # spatial positions averaged (for "mean")
    feature_offset: int  # host channel k is head feature k + offset


def find_head(view: GraphView) -> Head | None:
    for out in view.output_names:
        node = view.producer.get(out)
        while node is not None and (node.op_type in _PASS_THROUGH or _float_cast(view, node)):
            node = view.producer.get(node.input[0])
        if node is None:
            continue
        if node.op_type == "Gemm" and view.is_constant(node.input[1]) and not view.attr(node, "transA", 0):
            w = view.array(node.input[1])
            trans_b = bool(view.attr(node, "transB", 0))
            classes, in_f = (w.shape if trans_b else w.shape[::-1])
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if bias is not None and view.array(bias) is not None and view.array(bias).size != classes:
                bias = None
            return Head(view.node_name(node), "Gemm", node.input[1], bias, None, trans_b,
                        float(view.attr(node, "alpha", 1.0)), float(view.attr(node, "beta", 1.0)),
                        node.output[0], out, int(classes), int(in_f))
        if node.op_type == "Add":
            mm = next((view.producer.get(t) for t in node.input
                       if view.producer.get(t) is not None and view.producer[t].op_type == "MatMul"), None)
            if mm is not None and view.is_constant(mm.input[1]):
                w = view.array(mm.input[1])
                bias = next(t for t in node.input if t != mm.output[0])
                if w.ndim == 2 and view.is_constant(bias):
                    return Head(view.node_name(mm), "MatMul", mm.input[1], bias, view.node_name(node),
                                False, 1.0, 1.0, node.output[0], out, int(w.shape[1]), int(w.shape[0]))
    return None


def _float_cast(view: GraphView, node: onnx.NodeProto) -> bool:
    """A ``Cast`` between float types (fp16 models converted with ``keep_io_types`` end in one)."""
    return node.op_type == "Cast" and view.attr(node, "to") in _FLOAT_TYPES


def head_input(view: GraphView, head: Head) -> str:
    node = view.find_node(head.node)
    assert node is not None
    return node.input[0]


def direct_route(view: GraphView, host: HostLayer, head: Head) -> tuple[DirectRoute | None, str]:
    """How the host's activated channels reach the head, or (None, why not)."""
    if host.act_output is None:
        return None, "the host has no activation output"
    tensor = host.act_output
    users = view.consumers.get(tensor, [])
    if len(users) != 1:
        return None, (f"the host's output feeds {len(users)} layers; only a host whose channels go "
                      "straight to the classifier (pooling, then the head) can be routed in place")
    node = users[0]
    pool = None
    positions = host.positions
    if node.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
        pool = "mean" if node.op_type == "GlobalAveragePool" else "max"
    elif node.op_type in ("ReduceMean", "ReduceMax"):
        axes = view.attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = list(view.array(node.input[1]).reshape(-1))
        if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
            return None, "the host output is reduced over axes other than height and width"
        pool = "mean" if node.op_type == "ReduceMean" else "max"
    elif host.op != "Conv":
        pool = "none"
        positions = 1
    else:
        return None, (f"the host's channels reach the classifier through a {node.op_type} layer; "
                      "routing through further layers in place is not supported")
    if pool != "none":
        tensor = node.output[0]
    head_node = view.find_node(head.node)
    while True:
        users = view.consumers.get(tensor, [])
        if len(users) != 1:
            return None, "the pooled features are used by more than the classifier"
        nxt = users[0]
        if nxt is head_node:
            break
        if nxt.op_type not in _RESHAPES:
            return None, f"a {nxt.op_type} layer sits between the host and the classifier"
        tensor = nxt.output[0]
    if head.in_features != host.out_channels:
        return None, "the classifier does not read the host's channels one to one"
    return DirectRoute(pool=pool if pool != "none" else "mean", positions=positions, feature_offset=0), ""


def graph_output_info(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    return next(o for o in model.graph.output if o.name == name)
