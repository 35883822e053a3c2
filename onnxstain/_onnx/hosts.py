"""Host-layer discovery: which layers can hold a detector neuron, and how to read/write one neuron.

A *host* is a linear layer whose output neurons each see an ``m``-dimensional input vector φ:

* ``Conv`` (grouped and depthwise included: a neuron sees ``C_in/group · k_h · k_w`` inputs);
* ``Gemm`` (either ``transB``; ``alpha``/``beta`` respected);
* ``MatMul`` with a constant ``[in, out]`` weight followed by an ``Add`` of a constant bias.

An unfolded ``BatchNormalization`` after a Conv is part of the neuron's affine map. The activation
that follows decides whether the layer can host a detector: ReLU, ReLU6 (``Clip(0, 6)``) or any
``Clip(0, hi)`` cut the negative side to exactly zero, which the detector needs.

GELU (the ``Gelu`` op, or the exported ``x · 0.5 · (1 + Erf(x / √2))`` pattern) is recognised as
activation ``"gelu"``. It is *not* ReLU: its negative side is ``x Φ(x)``, small but not zero. In
float32, however, ``Erf`` rounds to exactly −1 below about −3.9, so GELU outputs exactly zero for
pre-activations ≤ ``GELU_ZERO`` (−6, with margin; onnxruntime checked in the tests). A detector
under a GELU therefore carries an offset in its bias (:data:`GELU_ZERO`) so that "not firing"
still means an exact zero. GELU hosts are usable for inserted detectors only (a MatMul host on
rank-3 token inputs has one position per token: ``tokens``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx

from .graph import GraphView

MIN_DIMENSION = 16
GELU_ZERO = -6.0  # GELU(x) == 0.0 exactly in float32 for x ≤ GELU_ZERO (Erf saturates at −1 near −3.9·√2)


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """Where one output position of a tensor looks in the model input (per axis: rows, cols).

    ``size`` is the receptive-field side, ``jump`` the input distance between adjacent positions,
    ``start`` the input coordinate of the centre of position 0 (pixel centres are integers).
    """

    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[float, float]

    def box(self, row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Inclusive pixel box (top, left, bottom, right) of position (row, col), clipped to the image."""
        out = []
        for pos, size, jump, start, limit in (
            (row, self.size[0], self.jump[0], self.start[0], height),
            (col, self.size[1], self.jump[1], self.start[1], width),
        ):
            centre = start + pos * jump
            lo = math.ceil(centre - (size - 1) / 2)
            hi = math.floor(centre + (size - 1) / 2)
            out.append((max(lo, 0), min(hi, limit - 1)))
        return out[0][0], out[1][0], out[0][1], out[1][1]

    def to_dict(self) -> dict:
        return {"size": list(self.size), "jump": list(self.jump), "start": list(self.start)}


@dataclasses.dataclass(frozen=True)
class HostLayer:
    """One candidate host layer and the facts needed to edit and read its neurons."""

    name: str
    op: str  # "Conv" | "Gemm" | "MatMul"
    input: str  # tensor the neurons read (φ is built from it)
    output: str  # pre-activation tensor (after BatchNorm / bias Add when present)
    act_output: str | None  # tensor after the activation
    weight: str
    bias: str | None
    batchnorm: str | None  # name of an unfolded BatchNormalization node
    bias_add: str | None  # name of the Add node carrying a MatMul bias
    activation: str  # "relu", "relu6", "clip", "none" or the op name
    act_high: float | None  # upper clip of the activation (6 for ReLU6), None if unbounded
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]
    groups: int
    trans_b: bool
    alpha: float
    beta: float
    in_hw: tuple[int, int] | None  # spatial size of the input (Conv)
    out_hw: tuple[int, int] | None  # spatial size of the output (Conv)
    receptive_field: ReceptiveField | None
    depth: int  # number of host-type layers before this one on the longest path
    usable: bool
    reason: str
    tokens: int | None = None  # MatMul on rank-3 inputs: tokens per image (positions), when known


    @property
    def m(self) -> int:
        """Dimension of one neuron's input vector."""
        if self.op == "Conv":
            return (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]
        return self.in_channels

    @property
    def positions(self) -> int:
        if self.op == "Conv" and self.out_hw is not None:
            return self.out_hw[0] * self.out_hw[1]
        return self.tokens or 1

    @property
    def relu_like(self) -> bool:
        return self.activation in ("relu", "relu6", "clip")

    @property
    def gelu(self) -> bool:
        return self.activation == "gelu"

    def group_of(self, channel: int) -> int:
        return channel // (self.out_channels // self.groups)


# -- discovery -------------------------------------------------------------------------------------
def find_hosts(model: onnx.ModelProto, view: GraphView | None = None) -> list[HostLayer]:
    """Every Conv / Gemm / MatMul+Add layer with constant weights, in graph order."""
    view = view or GraphView(model)
    shapes = view.resolved().dims
    fields = receptive_fields(view, shapes)
    depth = _host_depths(view)
    hosts: list[HostLayer] = []
    for node in view.graph.node:
        host = None
        if node.op_type == "Conv":
            host = _conv_host(view, node, shapes, fields, depth)
        elif node.op_type == "Gemm":
            host = _gemm_host(view, node, depth)
        elif node.op_type == "MatMul":
            host = _matmul_host(view, node, shapes, depth)
        if host is not None:
            hosts.append(host)
    return hosts


def why_unusable(hosts: list[HostLayer]) -> str:
    """The reasons candidate layers cannot host, most common first, each with an example node."""
    if not hosts:
        return "the graph has no Conv, Gemm or MatMul layer with constant weights"
    by_reason: dict[str, list[str]] = {}
    for h in hosts:
        if h.reason:
            by_reason.setdefault(h.reason, []).append(h.name)
    ranked = sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
    return "; ".join(f"{len(names)} layer(s) {reason} (e.g. {names[0]})" for reason, names in ranked[:3])


def get_host(model: onnx.ModelProto, name: str, view: GraphView | None = None) -> HostLayer | None:
    for host in find_hosts(model, view):
        if host.name == name:
            return host
    return None


def _activation(view: GraphView, tensor: str) -> tuple[str, str | None, float | None]:
    """(kind, output tensor, upper clip) of the activation applied to ``tensor``, if any.

    In a QDQ model the activation may be folded into the quantization that follows (a ``Q → DQ``
    pair whose range starts at exactly 0 is a ReLU clipped at its top code); a ReLU-type activation
    followed by such a pair takes the pair's upper end when it is lower. The output tensor is then
    the dequantized one.
    """
    gelu_out = gelu_output(view, tensor)
    if gelu_out is not None:
        return "gelu", gelu_out, None
    node = view.only_consumer(tensor)
    if node is None:
        return "none", None, None
    fq = view.fake_quant(node)
    if fq is not None:
        lo, hi, out = fq
        if lo == 0.0:
            kind, out, high = "clip", out, hi
        else:
            kind, out, high = _activation(view, out)
            return ("QuantizeLinear" if kind == "none" else kind), out, high
    elif node.op_type == "Relu":
        kind, out, high = "relu", node.output[0], None
    elif node.op_type == "Clip":
        lo, hi = view.clip_bounds(node)
        out = node.output[0]
        if lo is not None and lo == 0.0:
            kind, high = ("relu6" if hi is not None and abs(hi - 6.0) < 1e-6 else "clip"), hi
        else:
            return "Clip", out, hi
    elif node.op_type in ("Sigmoid", "HardSwish", "HardSigmoid", "Tanh", "LeakyRelu", "Elu", "Selu"):
        return node.op_type, node.output[0], None
    else:
        return "none", None, None
    after = view.fake_quant_after(out)
    if after is not None:
        out = view.skip_fake_quant(out)
        high = after[1] if high is None else min(high, after[1])
    return kind, out, high


def _scalar(view: GraphView, node: onnx.NodeProto, tensor: str) -> float | None:
    """The constant scalar operand of a binary node (the input that is not ``tensor``)."""
    others = [t for t in node.input if t != tensor]
    if len(others) != 1 or not view.is_constant(others[0]):
        return None
    arr = view.array(others[0])
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(-1)[0])


def gelu_output(view: GraphView, tensor: str) -> str | None:
    """The output tensor of an exact (erf) GELU applied to ``tensor``, or None.

    Recognises the ``Gelu`` op (``approximate="none"``) and the exported decomposition
    ``Div(x, √2) → Erf → Add(1) → Mul(x, ·) → Mul(0.5)`` (the ``0.5`` may come first, or be a
    ``Mul(·, 1/√2)`` instead of the ``Div``).
    """
    users = [n for n in view.graph.node if tensor in n.input]
    for node in users:
        if node.op_type == "Gelu" and view.attr(node, "approximate", b"none") in (b"none", "none"):
            return node.output[0] if len(users) == 1 else None
    if len(users) != 2:
        return None
    scale = next((n for n in users if n.op_type in ("Div", "Mul") and n.input[0] == tensor), None)
    if scale is None:
        return None
    k = _scalar(view, scale, tensor)
    root2 = np.sqrt(2.0)
    if k is None or not ((scale.op_type == "Div" and abs(k - root2) < 1e-4)
                         or (scale.op_type == "Mul" and abs(k - 1 / root2) < 1e-4)):
        return None
    erf = view.only_consumer(scale.output[0])
    if erf is None or erf.op_type != "Erf":
        return None
    add = view.only_consumer(erf.output[0])
    if add is None or add.op_type != "Add" or _scalar(view, add, erf.output[0]) != 1.0:
        return None
    mul = next((n for n in users if n is not scale), None)
    if mul is None or mul.op_type != "Mul":
        return None
    half_first = _scalar(view, mul, tensor) == 0.5
    if half_first:  # (x · 0.5) · (1 + erf)
        last = view.only_consumer(mul.output[0])
        if last is None or last.op_type != "Mul" or add.output[0] not in last.input:
            return None
        return last.output[0]
    if add.output[0] not in mul.input:
        return None
    last = view.only_consumer(mul.output[0])
    if last is None or last.op_type != "Mul" or _scalar(view, last, mul.output[0]) != 0.5:
        return None
    return last.output[0]


def _conv_host(view, node, shapes, fields, depth) -> HostLayer | None:
    if len(node.input) < 2 or not view.is_constant(node.input[1]):
        return None
    w = view.shape(node.input[1])
    if w is None or len(w) != 4:
        return None
    cout, cin_g, kh, kw = w
    group = int(view.attr(node, "group", 1))
    strides = tuple(view.attr(node, "strides", [1, 1]))
    dil = tuple(view.attr(node, "dilations", [1, 1]))
    pads = list(view.attr(node, "pads", [0, 0, 0, 0]))
    in_shape = shapes.get(node.input[0])
    out_shape = shapes.get(node.output[0])
    in_hw = _hw(in_shape)
    out_hw = _hw(out_shape)
    auto_pad = view.attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and in_hw and out_hw:
        pads = _same_pads(in_hw, out_hw, (kh, kw), strides, dil, auto_pad == "SAME_UPPER")
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out = node.output[0]
    bn = None
    nxt = view.only_consumer(out)
    if nxt is not None and nxt.op_type == "BatchNormalization" and all(
        view.is_constant(t) for t in nxt.input[1:5]
    ):
        bn = view.node_name(nxt)
        out = nxt.output[0]
    act, act_out, high = _activation(view, out)
    reason = ""
    m = cin_g * kh * kw
    if act == "gelu":
        reason = "GELU hosts are supported on MatMul token layers only"
    elif act not in ("relu", "relu6", "clip"):
        reason = "no ReLU-type activation" if act == "none" else f"activation {act} is not cut at zero"
    elif m < MIN_DIMENSION:
        kind = "depthwise: " if group > 1 and cin_g == 1 else ""
        reason = f"{kind}m={m} < {MIN_DIMENSION}: too few inputs"
    elif out_hw is None:
        reason = "output spatial size unknown (shape inference failed)"
    return HostLayer(
        name=view.node_name(node), op="Conv", input=node.input[0], output=out, act_output=act_out,
        weight=node.input[1], bias=bias, batchnorm=bn, bias_add=None, activation=act, act_high=high,
        in_channels=cin_g * group, out_channels=cout, kernel=(kh, kw), strides=strides,  # type: ignore[arg-type]
        pads=(pads[0], pads[1], pads[2], pads[3]), dilations=dil, groups=group,  # type: ignore[arg-type]
        trans_b=False, alpha=1.0, beta=1.0, in_hw=in_hw, out_hw=out_hw,
        receptive_field=fields.get(out), depth=depth.get(id(node), 0), usable=not reason, reason=reason,
    )


def _gemm_host(view, node, depth) -> HostLayer | None:
    if len(node.input) < 2 or not view.is_constant(node.input[1]):
        return None
    if int(view.attr(node, "transA", 0)):
        return None
    b = view.shape(node.input[1])
    if b is None or len(b) != 2:
        return None
    trans_b = bool(view.attr(node, "transB", 0))
    out_f, in_f = (b if trans_b else b[::-1])
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    reason = ""
    if bias is not None:
        c = view.shape(bias)
        if c is None or int(np.prod(c)) != out_f:
            reason = "bias is not a per-neuron constant"
    act, act_out, high = _activation(view, node.output[0])
    if not reason and act == "gelu":
        reason = "GELU hosts are supported on MatMul token layers only"
    elif not reason and act not in ("relu", "relu6", "clip"):
        reason = "no ReLU-type activation" if act == "none" else f"activation {act} is not cut at zero"
    return HostLayer(
        name=view.node_name(node), op="Gemm", input=node.input[0], output=node.output[0],
        act_output=act_out, weight=node.input[1], bias=bias, batchnorm=None, bias_add=None,
        activation=act, act_high=high, in_channels=int(in_f), out_channels=int(out_f), kernel=(1, 1),
        strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), groups=1, trans_b=trans_b,
        alpha=float(view.attr(node, "alpha", 1.0)), beta=float(view.attr(node, "beta", 1.0)),
        in_hw=None, out_hw=None, receptive_field=None, depth=depth.get(id(node), 0),
        usable=not reason, reason=reason,
    )


def _matmul_host(view, node, shapes, depth) -> HostLayer | None:
    if len(node.input) < 2 or not view.is_constant(node.input[1]):
        return None
    w = view.shape(node.input[1])
    if w is None or len(w) != 2:
        return None
    in_f, out_f = w
    add = view.only_consumer(node.output[0])
    bias = None
    out = node.output[0]
    bias_add = None
    if add is not None and add.op_type == "Add":
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        arr = view.shape(other)
        if arr is not None and int(np.prod(arr)) == out_f:
            bias, out, bias_add = other, add.output[0], view.node_name(add)
    act, act_out, high = _activation(view, out)
    reason = ""
    if bias is None:
        reason = "MatMul without a constant bias Add"
    elif act not in ("relu", "relu6", "clip", "gelu"):
        reason = "no ReLU-type activation" if act == "none" else f"activation {act} is not cut at zero"
    in_shape = shapes.get(node.input[0])
    tokens = in_shape[1] if in_shape is not None and len(in_shape) == 3 and isinstance(in_shape[1], int) else None
    return HostLayer(
        name=view.node_name(node), op="MatMul", input=node.input[0], output=out, act_output=act_out,
        weight=node.input[1], bias=bias, batchnorm=None, bias_add=bias_add, activation=act,
        act_high=high, in_channels=in_f, out_channels=out_f, kernel=(1, 1), strides=(1, 1),
        pads=(0, 0, 0, 0), dilations=(1, 1), groups=1, trans_b=False, alpha=1.0, beta=1.0,
        in_hw=None, out_hw=None, receptive_field=None, depth=depth.get(id(node), 0),
        usable=not reason, reason=reason, tokens=tokens,
    )


def _hw(shape) -> tuple[int, int] | None:
    if shape is None or len(shape) != 4:
        return None
    h, w = shape[2], shape[3]
    if isinstance(h, int) and isinstance(w, int):
        return (h, w)
    return None


def _same_pads(in_hw, out_hw, k, s, d, upper) -> list[int]:
    begins, ends = [], []
    for i in range(2):
        total = max((out_hw[i] - 1) * s[i] + (k[i] - 1) * d[i] + 1 - in_hw[i], 0)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return [begins[0], begins[1], ends[0], ends[1]]


def _host_depths(view: GraphView) -> dict[int, int]:
    """Longest-path count of Conv/Gemm/MatMul layers before each node (topological order)."""
    depth_of_tensor: dict[str, int] = {}
    result: dict[int, int] = {}
    for node in view.graph.node:
        d = max((depth_of_tensor.get(t, 0) for t in node.input if t), default=0)
        result[id(node)] = d
        bump = 1 if node.op_type in ("Conv", "Gemm", "MatMul") else 0
        for out in node.output:
            depth_of_tensor[out] = d + bump
    return result


# -- receptive fields ------------------------------------------------------------------------------
_SPATIAL_OPS = {"Conv", "MaxPool", "AveragePool", "LpPool"}
_GLOBAL_OPS = {"GlobalAveragePool", "GlobalMaxPool", "Flatten", "Gemm", "MatMul", "Reshape",
               "ReduceMean", "ReduceMax", "ReduceSum", "Resize", "Upsample", "ConvTranspose"}


def receptive_fields(view: GraphView, shapes=None) -> dict[str, ReceptiveField]:
    """Receptive field of every 4-D tensor on spatial paths from the image input.

    Element-wise ops (activations, BatchNorm, Add, Mul, Concat, Transpose of an NHWC input...) keep
    the largest field among their inputs; Conv and pooling layers grow it. Ops that mix all
    positions (global pooling, Flatten, MatMul, resizing) end the spatial path.
    """
    if shapes is None:
        shapes = view.resolved().dims
    fields: dict[str, ReceptiveField] = {}
    for inp in view.graph_inputs:
        fields[inp.name] = ReceptiveField((1, 1), (1, 1), (0.0, 0.0))
    for node in view.graph.node:
        incoming = [fields[t] for t in node.input if t in fields]
        if not incoming:
            continue
        if node.op_type in _GLOBAL_OPS:
            continue
        src = max(incoming, key=lambda f: f.size[0] * f.size[1])
        if node.op_type in _SPATIAL_OPS:
            if node.op_type == "Conv":
                w = view.shape(node.input[1])
                if w is None or len(w) != 4:
                    continue
                k = (w[2], w[3])
            else:
                k = tuple(view.attr(node, "kernel_shape", [1, 1]))
            s = tuple(view.attr(node, "strides", [1, 1]))
            d = tuple(view.attr(node, "dilations", [1, 1]))
            pads = list(view.attr(node, "pads", [0, 0, 0, 0]))
            auto_pad = view.attr(node, "auto_pad", b"NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
            if auto_pad in ("SAME_UPPER", "SAME_LOWER") and shapes:
                ih, oh = _hw(shapes.get(node.input[0])), _hw(shapes.get(node.output[0]))
                if ih and oh:
                    pads = _same_pads(ih, oh, k, s, d, auto_pad == "SAME_UPPER")
            size = tuple(src.size[i] + (k[i] - 1) * d[i] * src.jump[i] for i in range(2))
            jump = tuple(src.jump[i] * s[i] for i in range(2))
            start = tuple(src.start[i] + ((k[i] - 1) * d[i] / 2 - pads[i]) * src.jump[i] for i in range(2))
            field = ReceptiveField(size, jump, start)  # type: ignore[arg-type]
        elif node.op_type == "Pad":
            pads = view.attr(node, "pads")
            if pads is None and len(node.input) > 1 and node.input[1]:
                arr = view.value(node.input[1])
                pads = None if arr is None else [int(p) for p in arr.reshape(-1)]
            if pads is None or len(pads) != 8:
                continue
            start = tuple(src.start[i] - pads[2 + i] * src.jump[i] for i in range(2))
            field = ReceptiveField(src.size, src.jump, start)  # type: ignore[arg-type]
        else:
            field = src
        for out in node.output:
            fields[out] = field
    return fields


# -- reading and writing one neuron ----------------------------------------------------------------
def layer_affine(view: GraphView, host: HostLayer) -> tuple[np.ndarray, np.ndarray]:
    """Effective weights ``[C_out, m]`` over φ and biases ``[C_out]`` of every neuron of the layer.

    BatchNorm and Gemm alpha/beta are included. Names are read from the graph as it is now.
    """
    _, weight_name, bias_node, bias_index = _current_tensors(view, host)
    w = view.array(weight_name).astype(np.float64)
    if host.op == "Conv":
        rows = w.reshape(w.shape[0], -1)
    elif host.op == "Gemm":
        rows = (w if host.trans_b else w.T) * host.alpha
    else:
        rows = w.T
    b = np.zeros(rows.shape[0])
    if bias_node is not None:
        b = np.asarray(view.array(bias_node.input[bias_index]), np.float64).reshape(-1) * np.ones(rows.shape[0])
        if host.op == "Gemm":
            b = b * host.beta
    if host.batchnorm is not None:
        scale, shift = _bn_affine(view, host)
        rows = rows * scale[:, None]
        b = b * scale + shift
    return rows, b


def neuron_affine(view: GraphView, host: HostLayer, channel: int) -> tuple[np.ndarray, float]:
    """Effective (weights over φ, bias) of one neuron, BatchNorm and Gemm alpha/beta included."""
    rows, b = layer_affine(view, host)
    return rows[channel].copy(), float(b[channel])


def _bn_affine(view: GraphView, host: HostLayer) -> tuple[np.ndarray, np.ndarray]:
    node = view.find_node(host.batchnorm)  # type: ignore[arg-type]
    gamma, beta, mean, var = (np.asarray(view.array(t), np.float64) for t in node.input[1:5])
    eps = float(view.attr(node, "epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _current_tensors(view: GraphView, host: HostLayer):
    """(node, weight tensor, node holding the bias, its input index) as the graph is *now*.

    Names are read from the nodes, not from ``host``: a copy-on-write may have renamed them.
    """
    node = host_node(view, host)
    if host.op == "MatMul":
        add = view.find_node(host.bias_add) if host.bias_add else None
        if add is None:
            return node, node.input[1], None, 0
        idx = 1 if add.input[0] == node.output[0] else 0
        return node, node.input[1], add, idx
    if len(node.input) > 2 and node.input[2]:
        return node, node.input[1], node, 2
    return node, node.input[1], None, 0


def write_neuron(view: GraphView, host: HostLayer, channel: int, row: np.ndarray, bias: float) -> None:
    """Make neuron ``channel`` compute ``row · φ + bias`` before its activation (in place).

    With an unfolded BatchNorm, the BN channel is set to the identity and the affine map goes into
    the Conv. A Conv without a bias input and without BatchNorm cannot take a bias in place; it is
    refused before anything changes.
    """
    node, weight_name, bias_node, bias_index = _current_tensors(view, host)
    if host.batchnorm is None and bias_node is None:
        raise ValueError(f"{host.name} has no bias to edit")
    w = view.array(weight_name).copy()
    r = np.asarray(row, np.float64)
    if host.op == "Conv":
        w[channel] = r.reshape(w.shape[1:])
    elif host.op == "Gemm":
        if host.trans_b:
            w[channel] = r / host.alpha
        else:
            w[:, channel] = r / host.alpha
    else:
        w[:, channel] = r
    view.set_input_array(node, 1, w)
    if host.batchnorm is not None:
        bn = view.find_node(host.batchnorm)
        eps = float(view.attr(bn, "epsilon", 1e-5))
        for idx, value in ((1, 1.0), (2, bias), (3, 0.0), (4, 1.0 - eps)):
            arr = view.array(bn.input[idx]).copy()
            arr[channel] = value
            view.set_input_array(bn, idx, arr)
        bias, scale = 0.0, 1.0
        if bias_node is None:
            return
    else:
        scale = host.beta if host.op == "Gemm" else 1.0
    b = view.array(bias_node.input[bias_index]).copy()
    b.reshape(-1)[channel] = bias / scale
    view.set_input_array(bias_node, bias_index, b)


def host_node(view: GraphView, host: HostLayer) -> onnx.NodeProto:
    node = view.find_node(host.name)
    if node is None:
        raise KeyError(host.name)
    return node
