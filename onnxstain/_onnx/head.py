"""The classifier head, and how a host channel reaches it.

``find_head`` finds the layer producing the model's scores: a Gemm (or MatMul + Add) whose output
is the graph output, possibly through Softmax/Identity, a Cast between float types or (QDQ models) a
``Q → DQ`` pair; ``Head.scores`` is then the dequantized scores. Failing that, a convolutional
classifier (a Conv with one filter per class, then global average pooling: ``op == "ConvPool"``).
``direct_route`` tells whether a host's activated channel ``k`` reaches that head as feature ``k``
through pooling and reshaping only (GlobalAveragePool / GlobalMaxPool / ReduceMean over H, W, then
Flatten / Reshape / Squeeze), which is what an in-place route through existing channels needs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from .graph import GraphView
from .hosts import HostLayer

_PASS_THROUGH = {"Identity", "Softmax", "LogSoftmax", "Sigmoid", "Relu"}  # monotone in each score
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_RESHAPES = {"Flatten", "Reshape", "Squeeze", "Transpose"}
_ELEMENTWISE = {"Identity", "Dropout"}


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
    # QDQ models: the range and step of the ``Q → DQ`` pair on the scores (``scores`` is its output)
    scores_range: tuple[float, float] | None = None
    scores_step: float = 0.0
    # detectors (``op == "Detection"``): the class logits' per-sample shape (anchors, labels)
    layout: tuple[int, int] | None = None
    # a detector's first label column (1: column 0 is the background, SSD-style; 4: a packed YOLO-style output
    # whose columns 0–3 are the box) and whether its label columns hold probabilities (after a Sigmoid) or logits
    first_label: int = 1
    probabilities: bool = False
    anchors_last: bool = False  # the raw scores are laid out [labels, anchors] per sample (YOLOv8's export)
    # sequence heads (a MatMul + Add on ``[N, T, D]`` features, e.g. a CTC text recogniser): T, the steps
    # the same classifier scores (its per-sample output is ``(steps, classes)``) at the analysed size
    steps: int | None = None

    @property
    def detection(self) -> bool:
        return self.layout is not None

    @property
    def linear(self) -> bool:
        """A Gemm or MatMul classifier reading pooled features: columns a stain or a lock can route through.
        A detector's class head and a convolutional classifier (``op == "ConvPool"``) have none."""
        return self.op in ("Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class DirectRoute:
    pool: str  # "mean" or "max"
    positions: int  # spatial positions averaged (for "mean")
    feature_offset: int  # host channel k is head feature k + offset
    # a non-overlapping MaxPool before the global pooling (PaddleOCR's MobileNetV3 tail): its window, and
    # the host map's (height, width) it tiles exactly; the global pool then reads the windows' maxima
    window: tuple[int, int] | None = None
    map_hw: tuple[int, int] | None = None
    # per-channel Mul/Add constants on the way (a Keras BatchNormalization after the activation, as tf2onnx
    # writes it): (node, input index, identity value). The in-place edit makes the stained channel's entry
    # the identity, so the head reads the detector itself; every other channel keeps its scale and shift.
    affine: tuple[tuple[str, int, float], ...] = ()
    # other linear heads reading the same features (MTCNN's box and landmark regressors beside the face
    # classifier): the in-place edit zeroes their column of the stained channel and compensates it as the
    # classifier's, so they never see the detector
    siblings: tuple[Head, ...] = ()


def find_head(view: GraphView) -> Head | None:
    for out in view.output_names:
        node = view.producer.get(out)
        while node is not None:
            if _dequantized_fake_quant(view, node):
                node = view.producer[node.input[0]]  # the QuantizeLinear: step over the pair
            elif not (node.op_type in _PASS_THROUGH or _float_cast(view, node)):
                break
            node = view.producer.get(node.input[0])
        if node is None:
            continue
        if node.op_type == "Gemm" and view.is_constant(node.input[1]) and not view.attr(node, "transA", 0):
            w = view.shape(node.input[1])
            if w is None or len(w) != 2:
                continue
            trans_b = bool(view.attr(node, "transB", 0))
            classes, in_f = (w if trans_b else w[::-1])
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            b_shape = None if bias is None else view.shape(bias)
            if b_shape is not None and int(np.prod(b_shape)) != classes:
                bias = None
            return Head(view.node_name(node), "Gemm", node.input[1], bias, None, trans_b,
                        float(view.attr(node, "alpha", 1.0)), float(view.attr(node, "beta", 1.0)),
                        *_scores(view, node.output[0], out, int(classes), int(in_f)))
        if node.op_type == "Add":
            mm = next((view.producer.get(t) for t in node.input
                       if view.producer.get(t) is not None and view.producer[t].op_type == "MatMul"), None)
            if mm is not None and view.is_constant(mm.input[1]):
                w = view.shape(mm.input[1])
                bias = next(t for t in node.input if t != mm.output[0])
                if w is not None and len(w) == 2 and view.is_constant(bias):
                    rank, steps = _rows(view, node.output[0], w[1])
                    if rank > 3:  # a per-pixel classifier: a dense output, not a head
                        continue
                    return Head(view.node_name(mm), "MatMul", mm.input[1], bias, view.node_name(node),
                                False, 1.0, 1.0, *_scores(view, node.output[0], out, w[1], w[0]), steps=steps)
    return find_conv_pool_head(view)


_SHAPE_ONLY = {"Flatten", "Reshape", "Squeeze", "Identity", "Dropout"}


def find_conv_pool_head(view: GraphView) -> Head | None:
    """A convolutional classifier: a Conv with one filter per class, (a ReLU,) global average pooling over
    height and width (``GlobalAveragePool``, or ``ReduceMean`` over the spatial axes), shape-only ops, then
    the output (through Softmax and the like): mini-Xception, SqueezeNet, NIN. Its scores are the pooled
    ``[N, K]``; ``op == "ConvPool"``, ``weight`` the Conv's ``[K, C, kh, kw]``, and :func:`head_input` the map
    the Conv reads. It has no columns to route a stain through in place (insert mode); a gate lock gates its
    input map channel by channel."""
    dims = view.resolved()
    for out in view.output_names:
        scores, node = out, view.producer.get(out)
        while node is not None and (node.op_type in _PASS_THROUGH or _float_cast(view, node)):
            scores, node = node.input[0], view.producer.get(node.input[0])
        shape = dims.get(scores)
        if node is None or not shape or len(shape) != 2 or not isinstance(shape[1], int):
            continue
        while node is not None and node.op_type in _SHAPE_ONLY:
            node = view.producer.get(node.input[0])
        if node is None or not _spatial_mean(view, node):
            continue
        conv = view.producer.get(node.input[0])
        while conv is not None and conv.op_type in ("Relu", "Identity"):
            conv = view.producer.get(conv.input[0])
        if conv is None or conv.op_type != "Conv" or not view.is_constant(conv.input[1]):
            continue
        w = view.shape(conv.input[1])
        if w is None or len(w) != 4 or int(view.attr(conv, "group", 1)) != 1 or w[0] != shape[1]:
            continue
        bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        return Head(view.node_name(conv), "ConvPool", conv.input[1], bias, None, False, 1.0, 1.0, scores, out,
                    int(w[0]), int(w[1]))
    return None


def _spatial_mean(view: GraphView, node: onnx.NodeProto) -> bool:
    """``node`` averages an NCHW map over height and width."""
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    axes = view.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1] and view.is_constant(node.input[1]):
        axes = list(view.constant(node.input[1]).reshape(-1))
    return axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]


def _rows(view: GraphView, scores: str, classes: int) -> tuple[int, int | None]:
    """Rank of a MatMul head's scores and, for ``[N, T, K]`` scores, T at the analysed input size."""
    dims = view.resolved().get(scores)
    if dims is None or len(dims) <= 2:
        return 2, None
    if len(dims) == 3 and isinstance(dims[1], int) and dims[2] == classes:
        return 3, int(dims[1])
    return len(dims), None


def missing_head_reason(view: GraphView) -> str:
    """Why no head was found, naming each graph output, the node that makes it and what it looks like."""
    dims = view.resolved().dims
    parts = []
    for out in view.output_names:
        shape = dims.get(out)
        node = view.producer.get(out)
        made = f"from {view.node_name(node)} ({node.op_type})" if node is not None else "an input or a constant"
        text = f"output {out!r} {list(shape) if shape else '[?]'} {made}"
        if _time_major(view, node, shape):
            text += (" holds per-step scores laid out time-major ([T, N, K]: a classifier on [T·N, D] reshaped, as "
                     "CTC recognisers are often exported); onnxstain reads sequence scores batch-first: export them "
                     "as [N, T, K] (e.g. a transpose before the output)")
        elif shape and len(shape) == 3 and isinstance(shape[-1], int) and shape[-1] > PACKED_BOX:
            text += (" looks like packed boxes and scores but no Concat of the head's maps makes it (a "
                     "packed YOLO-style output is read where the graph concatenates the box and the scores)")
        elif node is not None and node.op_type not in {"Gemm", "MatMul", "Add"} | _PASS_THROUGH:
            text += " is not made by a Gemm or MatMul+Add classifier"
        parts.append(text)
    return "; ".join(parts) or "the graph has no outputs"


def _time_major(view: GraphView, node: onnx.NodeProto | None, shape) -> bool:
    """A Reshape of a classifier's ``[T·N, K]`` scores (a Gemm, or a MatMul's bias Add, float or dynamically
    quantised) to ``[T, N, K]`` at the analysed batch of one: a time-major sequence output."""
    if node is None or node.op_type != "Reshape" or not shape or len(shape) != 3 or shape[1] != 1:
        return False
    src = view.producer.get(node.input[0])
    scores = view.resolved().get(node.input[0])
    if src is None or src.op_type not in ("Gemm", "MatMul", "Add") or scores is None:
        return False
    return tuple(scores) == (shape[0], shape[2]) and isinstance(shape[0], int) and shape[0] > 1


def no_head_message(view: GraphView, why: str) -> str:
    """The refusal for a model with neither head: what the job needs it for (``why``), then each output."""
    return ("no classifier head (a Gemm or MatMul+Add producing the output) or detector head (per-anchor class "
            f"scores beside per-anchor boxes), {why}: {missing_head_reason(view)}")


def find_scores_head(view: GraphView) -> Head | None:
    """The head a class signature can be read from: a classifier's, else a detector's."""
    return find_head(view) or find_detection_head(view)


def find_detection_head(view: GraphView) -> Head | None:
    """A detector's class scores: a graph output ``[B, A, C]`` beside a box output over the same ``A``
    anchors — ``[B, A, 4]``, ``[B, A, 1, 4]``, or ``[B, A, 4 k]`` for box distributions (GFL / NanoDet
    heads). With several scales (one pair of outputs each) the first pair is used. The scores tensor is
    the logits: the input of a trailing Sigmoid or Softmax, if any (through a Transpose / Reshape that
    only lays them out). Such a head has no classifier weights to edit (insert only). Failing that, a
    packed output (:func:`find_packed_detection_head`)."""
    shapes = view.resolved().dims
    known = {o: shapes.get(o) for o in view.output_names}

    def boxes_of(shape) -> bool:
        return (bool(shape) and len(shape) in (3, 4) and isinstance(shape[-1], int) and shape[-1] % 4 == 0
                and isinstance(shape[1], int) and all(d == 1 for d in shape[2:-1]))

    for out, shape in known.items():
        if not shape or len(shape) != 3 or not all(isinstance(d, int) for d in shape[1:]):
            continue
        anchors, labels = shape[1], shape[2]
        if not isinstance(anchors, int) or not isinstance(labels, int):
            continue
        if labels < 2 or labels == 4:
            continue
        if not any(o != out and s is not None and boxes_of(s) and s[1] == anchors and (s[-1] == 4 or s[-1] != labels)
                   for o, s in known.items()):
            continue
        scores, node = out, view.producer.get(out)
        while node is not None and node.op_type in ("Identity", "Transpose", "Reshape") and \
                _squashed_before(view, node.input[0]):
            node = view.producer.get(node.input[0])
        if node is not None and node.op_type in ("Sigmoid", "Softmax"):
            scores, node = node.input[0], view.producer.get(node.input[0])
        if node is None or (scores != out and shapes.get(scores) != shape):
            scores, node = out, view.producer.get(out)  # the logits are laid out differently: add to the output
        if node is None:
            continue
        return Head(view.node_name(node), "Detection", "", None, None, False, 1.0, 1.0, scores, out, labels, 0,
                    layout=(anchors, labels))
    return find_packed_detection_head(view)


def label_fields(head: Head) -> tuple[int | None, str | None, str | None]:
    """The key's ``model.label_offset``, ``model.label_scores`` and ``model.label_layout`` of a detector whose
    labels are not the SSD convention (a packed output); None otherwise, so other keys stay as they were."""
    if not head.detection or (head.first_label == 1 and not head.probabilities):
        return None, None, None
    return (head.first_label, "probabilities" if head.probabilities else "logits",
            "anchors_last" if head.anchors_last else None)


PACKED_BOX = 4  # a packed detector output's first columns: the box (x, y, w, h or corners)
_PACKING = {"Concat", "Reshape", "Transpose", "Identity", "Flatten", "Squeeze", "Unsqueeze"}


def find_packed_detection_head(view: GraphView) -> Head | None:
    """A YOLO-style packed output ``[B, A, 4 + k]``: per anchor (``A`` of them, more than the columns) the box,
    then ``k ≥ 1`` scores — objectness and class scores (YOLOv5, YOLOX, ddddocr) or class scores alone — made
    by concatenating the head's maps (a ``Concat`` within a few layout-only ops of the output). The label
    columns are ``4 … 4 + k − 1`` (``first_label`` 4); they are probabilities when a ``Sigmoid`` feeds the
    packing (so the fidelity metric reads them as they are), logits otherwise. The signature is added to the
    output itself, like any detector's insert stain. The anchors-last layout ``[B, 4 + k, A]`` (YOLOv8's
    export: the box rows, then the class rows) is read the same way (``anchors_last``); ``layout`` is
    ``(A, 4 + k)`` either way."""
    dims = view.resolved().dims
    for out in view.output_names:
        shape = dims.get(out)
        if not shape or len(shape) != 3 or not isinstance(shape[1], int) or not isinstance(shape[2], int):
            continue
        anchors, width = shape[1], shape[2]
        last = anchors < width  # [B, 4 + k, A]
        if last:
            anchors, width = width, anchors
        if width <= PACKED_BOX or anchors <= width:
            continue
        leaves = _packing_leaves(view, out)
        if leaves is None:
            continue
        node = view.producer[out]
        return Head(view.node_name(node), "Detection", "", None, None, False, 1.0, 1.0, out, out, width, 0,
                    layout=(anchors, width), first_label=PACKED_BOX, probabilities="Sigmoid" in leaves,
                    anchors_last=last)
    return None


def head_tail(view: GraphView, scores: str) -> tuple[list[onnx.NodeProto], list[str]]:
    """The nodes between a detector's last Conv layers and ``scores`` (every node on a path from a Conv to the
    scores that passes no other Conv: a packed output's box decoding, sigmoids and packing), and the maps those
    Conv layers read (a YOLO head's box, objectness and class predictors at each scale), both in graph order."""
    tail: dict[str, onnx.NodeProto] = {}
    maps: dict[str, None] = {}
    seen: set[str] = set()
    frontier = [scores]
    while frontier:
        tensor = frontier.pop()
        node = view.producer.get(tensor)
        if node is None or tensor in seen:
            continue
        seen.add(tensor)
        if node.op_type == "Conv":
            maps[node.input[0]] = None
            continue
        tail[view.node_name(node)] = node
        frontier += [t for t in node.input if t and t in view.producer]
    order = {id(n): i for i, n in enumerate(view.graph.node)}
    nodes = sorted(tail.values(), key=lambda n: order[id(n)])
    return nodes, sorted(maps, key=lambda t: order[id(view.producer[t])] if t in view.producer else -1)


def _packing_leaves(view: GraphView, out: str, depth: int = 8) -> set[str] | None:
    """The op types that feed the layout-only ops (Concat, Reshape, Transpose…) producing ``out``, or None
    when no Concat packs it (then it is not a packed detector output)."""
    leaves: set[str] = set()
    packed = False
    frontier = [(out, 0)]
    while frontier:
        tensor, d = frontier.pop()
        node = view.producer.get(tensor)
        if node is None:
            continue
        if node.op_type in _PACKING and d < depth:
            packed |= node.op_type == "Concat"
            inputs = node.input if node.op_type == "Concat" else node.input[:1]
            frontier += [(t, d + 1) for t in inputs if t]
        else:
            leaves.add(node.op_type)
    return leaves if packed else None


def _squashed_before(view: GraphView, tensor: str) -> bool:
    """Whether a Sigmoid/Softmax produces ``tensor`` through layout-only ops."""
    node = view.producer.get(tensor)
    while node is not None and node.op_type in ("Identity", "Transpose", "Reshape"):
        node = view.producer.get(node.input[0])
    return node is not None and node.op_type in ("Sigmoid", "Softmax")


def _scores(view: GraphView, tensor: str, out: str, classes: int, in_f: int
            ) -> tuple[str, str, int, int, tuple[float, float] | None, float]:
    """(scores, output, classes, in_features, range, step): scores after a trailing ``Q → DQ`` if any."""
    after = view.fake_quant_after(tensor)
    if after is None:
        return tensor, out, classes, in_f, None, 0.0
    lo, hi = after
    node = view.only_consumer(tensor)
    assert node is not None
    scale = view.array(node.input[1])
    return view.skip_fake_quant(tensor), out, classes, in_f, (lo, hi), float(np.asarray(scale).reshape(()))


def _dequantized_fake_quant(view: GraphView, node: onnx.NodeProto) -> bool:
    """A ``DequantizeLinear`` of a ``QuantizeLinear`` (fake quantization of the scores in a QDQ model)."""
    if node.op_type != "DequantizeLinear":
        return False
    q = view.producer.get(node.input[0])
    return q is not None and q.op_type == "QuantizeLinear"


def _float_cast(view: GraphView, node: onnx.NodeProto) -> bool:
    """A ``Cast`` between float types (fp16 models converted with ``keep_io_types`` end in one)."""
    return node.op_type == "Cast" and view.attr(node, "to") in _FLOAT_TYPES


def decision_threshold(view: GraphView, output: str) -> float:
    """Where a one-score output decides: 1/2 when a Sigmoid makes it (through shape-only ops and float casts:
    a probability), else 0 (a logit). Classifiers with several scores do not need it (their top-1 is the
    largest score)."""
    node = view.producer.get(output)
    while node is not None and (node.op_type in _SHAPE_ONLY or _float_cast(view, node)):
        node = view.producer.get(node.input[0])
    return 0.5 if node is not None and node.op_type == "Sigmoid" else 0.0


def head_input(view: GraphView, head: Head) -> str:
    node = view.find_node(head.node)
    assert node is not None
    return node.input[0]


def direct_route(view: GraphView, host: HostLayer, head: Head) -> tuple[DirectRoute | None, str]:
    """How the host's activated channels reach the head, or (None, why not).

    The route may transpose the map (a tf2onnx model's NHWC tail), pool it (GlobalAveragePool /
    GlobalMaxPool, or ReduceMean / ReduceMax over exactly the spatial axes, in either layout), and
    reshape the pooled ``[N, C]`` features (Flatten / Reshape / Squeeze / Transpose / Identity /
    Dropout, fake quantization) before the head reads channel ``k`` as its feature ``k``.
    """
    if host.act_output is None:
        return None, f"{host.name} has no activation output"
    tensor = view.skip_fake_quant(host.act_output)
    channel_axis = 1
    positions = host.positions
    pool = None
    window: tuple[int, int] | None = None
    affine: list[tuple[str, int, float]] = []
    siblings: tuple[Head, ...] = ()
    head_node = view.find_node(head.node)
    while pool is None:
        users = view.consumers.get(tensor, [])
        if len(users) > 1 and host.op != "Conv" and head_node in users and not siblings:
            found = [linear_reader(view, u) for u in users if u is not head_node]
            if all(s is not None and s.in_features == host.out_channels for s in found):
                siblings, users = tuple(s for s in found if s is not None), [head_node]
        if len(users) != 1:
            return None, (f"the output of {host.name} feeds {len(users)} layers; only a host whose channels go "
                          "straight to the classifier (pooling, then the head) can be routed in place")
        node = users[0]
        if node.op_type in _ELEMENTWISE:
            tensor = view.skip_fake_quant(node.output[0])
            continue
        if (step := _per_channel(view, node, tensor, host.out_channels, channel_axis, 4 if host.op == "Conv" else 2)):
            affine.append(step)
            tensor = view.skip_fake_quant(node.output[0])
            continue
        if node.op_type == "Transpose" and host.op == "Conv":
            perm = [int(p) for p in view.attr(node, "perm", [0, 3, 2, 1])]
            if len(perm) != 4 or perm[0] != 0:
                return None, f"{view.node_name(node)} moves the batch axis"
            channel_axis = perm.index(channel_axis)
            tensor = view.skip_fake_quant(node.output[0])
            continue
        if node.op_type == "MaxPool" and host.op == "Conv" and channel_axis == 1 and window is None:
            window, why = _tiling_window(view, node, host)
            if window is None:
                return None, why
            tensor = view.skip_fake_quant(node.output[0])
            continue
        pool, why = _pooling(view, node, host, channel_axis)
        if pool is None:
            return None, why
        if pool == "none":
            positions = 1
    if pool != "none":
        tensor = node.output[0]
    why = _to_head(view, tensor, host, head_node, {s.node for s in siblings}, affine)
    if why:
        return None, why
    if head.in_features != host.out_channels:
        return None, (f"the classifier reads {head.in_features} features, {host.name} gives {host.out_channels} "
                      "channels: not one to one")
    return DirectRoute(pool=pool if pool != "none" else "mean", positions=positions, feature_offset=0,
                       window=window, map_hw=host.out_hw if window else None, affine=tuple(affine),
                       siblings=siblings), ""


def _pooling(view: GraphView, node: onnx.NodeProto, host: HostLayer, channel_axis: int) -> tuple[str | None, str]:
    """How ``node`` pools the host's map: "mean" or "max", "none" for a Gemm/MatMul host's features (they need
    no pooling), or (None, why not)."""
    if node.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
        if channel_axis != 1:
            return None, f"{view.node_name(node)} pools a transposed map"
        return ("mean" if node.op_type == "GlobalAveragePool" else "max"), ""
    if node.op_type in ("ReduceMean", "ReduceMax"):
        axes = view.attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = list(view.constant(node.input[1]).reshape(-1))
        spatial = sorted({0, 1, 2, 3} - {0, channel_axis})
        if host.op != "Conv" or axes is None or sorted(int(a) % 4 for a in axes) != spatial:
            return None, f"{view.node_name(node)} reduces over axes other than height and width"
        return ("mean" if node.op_type == "ReduceMean" else "max"), ""
    if host.op != "Conv":
        return "none", ""
    return None, (f"the channels of {host.name} reach the classifier through {view.node_name(node)} "
                  f"({node.op_type}); routing through further layers in place is not supported")


def _to_head(view: GraphView, tensor: str, host: HostLayer, head_node: onnx.NodeProto | None,
             sibling_nodes: set[str], affine: list[tuple[str, int, float]]) -> str:
    """Walk the pooled features to the head through shape-only ops and per-channel affine steps (appended
    to ``affine``); "" when the head reads them, else why not."""
    while True:
        tensor = view.skip_fake_quant(tensor)  # QDQ models quantize the pooled features
        # a Shape reads only the features' shape (paddle2onnx computes the Reshape's target from it)
        users = [u for u in view.consumers.get(tensor, [])
                 if u.op_type != "Shape" and view.node_name(u) not in sibling_nodes]
        if len(users) != 1:
            return "the pooled features are used by more than the classifier"
        nxt = users[0]
        if nxt is head_node:
            return ""
        if (step := _per_channel(view, nxt, tensor, host.out_channels, 1, 2)):
            affine.append(step)
            tensor = nxt.output[0]
            continue
        if nxt.op_type not in _RESHAPES | _ELEMENTWISE:
            return f"{view.node_name(nxt)} ({nxt.op_type}) sits between {host.name} and the classifier"
        tensor = nxt.output[0]


def linear_reader(view: GraphView, node: onnx.NodeProto) -> Head | None:
    """``node`` as a linear head over its input features: a Gemm with constant weights and a bias of one
    value per output, or a MatMul with constant weights whose only reader adds such a bias; else None."""
    if node.op_type == "Gemm" and len(node.input) > 2 and view.is_constant(node.input[1]) \
            and not view.attr(node, "transA", 0):
        w = view.shape(node.input[1])
        bias_shape = view.shape(node.input[2]) if node.input[2] else None
        if w is None or len(w) != 2 or bias_shape is None:
            return None
        trans_b = bool(view.attr(node, "transB", 0))
        outs, in_f = (w if trans_b else w[::-1])
        if int(np.prod(bias_shape)) != outs:
            return None
        return Head(view.node_name(node), "Gemm", node.input[1], node.input[2], None, trans_b,
                    float(view.attr(node, "alpha", 1.0)), float(view.attr(node, "beta", 1.0)), node.output[0],
                    node.output[0], int(outs), int(in_f))
    if node.op_type == "MatMul" and view.is_constant(node.input[1]):
        w = view.shape(node.input[1])
        add = view.only_consumer(node.output[0])
        if w is None or len(w) != 2 or add is None or add.op_type != "Add":
            return None
        bias = next(t for t in add.input if t != node.output[0])
        bias_shape = view.shape(bias) if view.is_constant(bias) else None
        if bias_shape is None or int(np.prod(bias_shape)) != w[1]:
            return None
        return Head(view.node_name(node), "MatMul", node.input[1], bias, view.node_name(add), False, 1.0, 1.0,
                    add.output[0], add.output[0], int(w[1]), int(w[0]))
    return None


def _per_channel(view: GraphView, node: onnx.NodeProto, tensor: str, channels: int, channel_axis: int,
                 rank: int) -> tuple[str, int, float] | None:
    """``node`` scales (Mul) or shifts (Add) ``tensor`` by a constant with one value per channel:
    (node, the constant's input index, the identity value), else None."""
    if node.op_type not in ("Mul", "Add") or len(node.input) != 2 or list(node.input).count(tensor) != 1:
        return None
    index = 1 - list(node.input).index(tensor)
    const = node.input[index]
    shape = view.shape(const)
    if not view.is_constant(const) or shape is None or len(shape) > rank:
        return None
    full = (1,) * (rank - len(shape)) + tuple(int(d) for d in shape)
    if full[channel_axis] != channels or any(d != 1 for i, d in enumerate(full) if i != channel_axis):
        return None
    return view.node_name(node), index, 1.0 if node.op_type == "Mul" else 0.0


def _tiling_window(view: GraphView, node: onnx.NodeProto, host: HostLayer) -> tuple[tuple[int, int] | None, str]:
    """A MaxPool whose windows tile the host's map exactly (stride = kernel, no pads, no dilation)."""
    name = view.node_name(node)
    kernel = [int(k) for k in view.attr(node, "kernel_shape", [])]
    strides = [int(s) for s in view.attr(node, "strides", kernel)]
    pads = [int(p) for p in view.attr(node, "pads", [0] * 4)]
    dil = [int(d) for d in view.attr(node, "dilations", [1, 1])]
    auto = view.attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if len(kernel) != 2 or strides != kernel or any(pads) or dil != [1, 1] or auto not in ("NOTSET", "VALID"):
        return None, f"{name} (MaxPool) has overlapping or padded windows; only windows that tile the map route"
    if host.out_hw is None or host.out_hw[0] % kernel[0] or host.out_hw[1] % kernel[1]:
        return None, f"{name} (MaxPool) windows {kernel} do not tile the {host.name} map {host.out_hw} exactly"
    return (kernel[0], kernel[1]), ""


def graph_output_info(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    return next(o for o in model.graph.output if o.name == name)
