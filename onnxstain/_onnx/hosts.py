"""Host-layer discovery: which layers can hold a detector neuron, and how to read/write one neuron.

A *host* is a linear layer whose output neurons each see an ``m``-dimensional input vector φ:

* ``Conv`` (grouped and depthwise included: a neuron sees ``C_in/group · k_h · k_w`` inputs);
* ``Gemm`` (either ``transB``; ``alpha``/``beta`` respected);
* ``MatMul`` with a constant ``[in, out]`` weight followed by an ``Add`` of a constant bias.

An unfolded ``BatchNormalization`` after a Conv is part of the neuron's affine map. The activation
that follows decides whether and how the layer can host a detector (:mod:`onnxstain.math.activations`,
docs/bounds.md "Activations other than ReLU"):

* ReLU, ReLU6 / ``Clip(0, hi)``, HardSwish, HardSigmoid, SiLU, GELU (erf and tanh) and Mish are exactly
  0 in float32 below their *zero point* (0 for the rectifiers, −4 for HardSwish, −6 for GELU, −110 for
  SiLU and Mish). An in-place detector's pre-activation is offset to it, so "not firing" is still an
  exact 0: these layers host both modes.
* LeakyReLU, PReLU and ELU have a negative lobe that never reaches 0: an overwritten neuron would leak
  into the scores on every natural input, so they host inserted detectors only (``inplace_reason``).
* Sigmoid, Tanh and other squashing functions (gates, outputs) and layers without an activation host
  nothing (``reason``).

Activations are recognised as single ops and as exported decompositions (``x · Sigmoid(x)``,
``Div → Erf → Add → Mul → Mul``, the tanh GELU, ``x · Tanh(Softplus(x))``, ``x · HardSigmoid(x)``,
``x · Clip(x + 3, 0, 6) / 6``, ``Max``/``Min`` pairs), matched numerically on probe points.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx

from ..math import activations
from .graph import GraphView
from .padding import same_onnx_pads

MIN_DIMENSION = 16
GELU_ZERO = activations.ZERO_POINTS["gelu"]  # GELU(x) == 0.0 exactly in float32 for x ≤ GELU_ZERO


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
    bias_add: str | None  # name of the Add node carrying the bias (a MatMul's, or a Conv's without a bias input)
    activation: str  # a kind of activations.HOST_KINDS ("relu", "silu", "gelu_tanh" ...), "none" or the op name
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
    act_params: tuple[float, ...] = ()  # LeakyReLU/ELU α; PReLU slopes; HardSigmoid α, β
    act_node: str | None = None  # the activation's first node
    act_label: str = ""  # the activation's ops as exported ("Sigmoid·Mul", "Gelu(tanh)" ...)
    inplace_reason: str = ""  # why a usable host cannot take an in-place detector ("" when it can)
    in_rank: int | None = None  # rank of the input tensor, when known

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
        return self.activation in ("gelu", "gelu_tanh")

    @property
    def zero_point(self) -> float | None:
        """Pre-activations at or below this give exactly 0 after the activation; None if none do."""
        if self.activation not in activations.HOST_KINDS:
            return None
        return activations.zero_point(self.activation, self.act_params)

    @property
    def inplace(self) -> bool:
        """Whether the layer can take an in-place (overwritten or additive) detector."""
        return self.usable and not self.inplace_reason

    @property
    def token_layer(self) -> bool:
        """A MatMul whose input is not known to be ``[batch, features]`` (tokens, or an unknown rank)."""
        return self.op == "MatMul" and self.in_rank != 2

    def activate(self, pre: np.ndarray) -> np.ndarray:
        """The activation applied to pre-activations in float64 (PReLU: channels on the last axis)."""
        return activations.apply(self.activation, pre, self.act_params, self.act_high)

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


@dataclasses.dataclass(frozen=True)
class Activation:
    """The activation applied to a layer's pre-activation tensor, as recognised in the graph."""

    kind: str  # a member of activations.HOST_KINDS, "none", or the op name of another activation
    output: str | None  # tensor after the activation
    high: float | None = None  # upper clip (ReLU6, a Clip, or a fake-quant range's top)
    params: tuple[float, ...] = ()  # LeakyReLU/ELU α; PReLU slopes; HardSigmoid α, β
    node: str | None = None  # the activation's first node
    label: str = ""  # the ops as exported: "Relu", "Sigmoid·Mul", "Gelu(tanh)", "Div·Erf·Add·Mul·Mul" ...


_SINGLE_OPS = {"LeakyRelu": "leaky_relu", "PRelu": "prelu", "Elu": "elu", "HardSwish": "hardswish",
               "HardSigmoid": "hardsigmoid", "Mish": "mish", "Gelu": "gelu"}
_OTHER_ACTIVATIONS = ("Sigmoid", "Tanh", "Selu", "Celu", "Softplus", "Softsign", "ThresholdedRelu", "Clip")
_MAX_DECOMPOSITION = 16  # nodes of an exported activation decomposition (the tanh GELU has 9)


def _activation(view: GraphView, tensor: str) -> Activation:
    """The activation applied to ``tensor``: a single op, or an element-wise decomposition of a known one.

    In a QDQ model the activation may be folded into the quantization that follows (a ``Q → DQ``
    pair whose range starts at exactly 0 is a ReLU clipped at its top code); a ReLU-type activation
    followed by such a pair takes the pair's upper end when it is lower. The output tensor is then
    the dequantized one.
    """
    node = view.only_consumer(tensor)
    if node is not None:
        single = _single_activation(view, node)
        if single is not None:
            return single
    decomposed = _decomposed_activation(view, tensor)
    if decomposed is not None and decomposed.kind != "elementwise":
        return decomposed
    if node is not None and node.op_type in _OTHER_ACTIVATIONS:
        return Activation(node.op_type, node.output[0], node=view.node_name(node), label=node.op_type)
    if decomposed is not None:
        return decomposed
    users = view.consumers.get(tensor, [])
    where = ("a graph output" if tensor in view.output_names else
             f"{len(users)} nodes" if len(users) > 1 else f"a {users[0].op_type}" if users else "nothing")
    return Activation("none", None, label=where)


def _single_activation(view: GraphView, node: onnx.NodeProto) -> Activation | None:
    name = view.node_name(node)
    fq = view.fake_quant(node)
    lo: float | None
    hi: float | None
    out: str | None
    if fq is not None:
        lo, hi, out = fq
        if lo != 0.0:
            inner = _activation(view, out)
            if inner.kind == "none":
                return Activation("QuantizeLinear", out, node=name, label="QuantizeLinear")
            return inner
        act = Activation("clip", out, hi, node=name, label="QuantizeLinear·DequantizeLinear")
    elif node.op_type == "Relu":
        act = Activation("relu", node.output[0], node=name, label="Relu")
    elif node.op_type == "Clip":
        lo, hi = view.clip_bounds(node)
        if lo is None or lo != 0.0:
            return None  # recognised as the op "Clip" (not cut at zero) unless part of a decomposition
        kind = "relu6" if hi is not None and abs(hi - 6.0) < 1e-6 else "clip"
        act = Activation(kind, node.output[0], hi, node=name, label="Clip")
    elif node.op_type in _SINGLE_OPS:
        kind = _SINGLE_OPS[node.op_type]
        params: tuple[float, ...] = ()
        label = node.op_type
        if kind in ("leaky_relu", "elu"):
            params = (float(view.attr(node, "alpha", 0.01 if kind == "leaky_relu" else 1.0)),)
        elif kind == "hardsigmoid":
            params = (float(view.attr(node, "alpha", 0.2)), float(view.attr(node, "beta", 0.5)))
        elif kind == "prelu":
            slope = view.array(node.input[1]) if view.is_constant(node.input[1]) else None
            if slope is None:
                return None
            params = tuple(float(a) for a in np.asarray(slope, np.float64).reshape(-1))
        elif kind == "gelu":
            approx = view.attr(node, "approximate", b"none")
            approx = approx.decode() if isinstance(approx, bytes) else approx
            if approx == "tanh":
                kind, label = "gelu_tanh", "Gelu(tanh)"
        return Activation(kind, node.output[0], params=params, node=name, label=label)
    else:
        return None
    out = act.output
    assert out is not None
    after = view.fake_quant_after(out)
    if after is None:
        return act
    high = after[1] if act.high is None else min(act.high, after[1])
    return dataclasses.replace(act, output=view.skip_fake_quant(out), high=high)


def _decomposed_activation(view: GraphView, tensor: str) -> Activation | None:
    """A known activation exported as element-wise ops on ``tensor`` with scalar constants.

    The smallest closed region of such ops that starts at ``tensor`` and ends in one tensor (every
    other tensor of the region used only inside it) is grown in graph order; each time it closes,
    the region is evaluated in float64 on probe points and matched against the known activations
    (:func:`activations.identify`). The last match wins (GELU's ``x · (1 + erf)`` closes before its
    ``· 0.5``). This recognises every order and spelling exporters use: ``Div/Mul → Erf → Add → Mul → Mul``,
    ``Pow``/``Mul`` tanh GELU, ``x · Sigmoid(x)``, ``x · Tanh(Softplus(x))``, ``x · HardSigmoid(x)``,
    ``x · Clip(x + 3, 0, 6) / 6``, ``Max(x, 0)`` / ``Min`` pairs.
    """
    users = view.consumers.get(tensor, [])
    if tensor in view.output_names or not users or any(n.op_type not in activations.ELEMENTWISE for n in users):
        return None
    order = {id(n): i for i, n in enumerate(view.graph.node)}
    values: dict[str, np.ndarray] = {tensor: activations.PROBES}
    region: list[onnx.NodeProto] = []
    in_region: set[int] = set()
    best = closed = None
    while len(region) < _MAX_DECOMPOSITION:
        open_ = [t for t in values if t in view.output_names
                 or any(id(n) not in in_region for n in view.consumers.get(t, []))]
        if len(open_) == 1 and open_[0] != tensor:
            closed = (open_[0], len(region))
            match = activations.identify(activations.PROBES, values[open_[0]])
            if match is not None:
                best = (open_[0], match, len(region))
        nxt = [n for t in open_ for n in view.consumers.get(t, []) if id(n) not in in_region]
        if not nxt:
            break
        node = min(nxt, key=lambda n: order[id(n)])
        args = _probe_args(view, node, values)
        if args is None:
            break
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        with np.errstate(all="ignore"):
            probed = np.asarray(activations.ELEMENTWISE[node.op_type](args, attrs), np.float64)
        if probed.shape != activations.PROBES.shape:
            break
        region.append(node)
        in_region.add(id(node))
        values[node.output[0]] = probed
    if best is None:
        if closed is None or np.allclose(values[closed[0]], activations.PROBES):
            return None  # nothing closes, or an Identity
        out, size = closed  # an element-wise function of the pre-activation that is no known activation
        return Activation("elementwise", out, node=view.node_name(region[0]),
                          label="·".join(n.op_type for n in region[:size]))
    out, (kind, params, high), size = best
    used = region[:size]
    return Activation(kind, out, high, params, node=view.node_name(used[0]),
                      label="·".join(n.op_type for n in used))


def _probe_args(view: GraphView, node: onnx.NodeProto, values: dict[str, np.ndarray]) -> list | None:
    """The node's inputs on the probe points (scalar constants as floats), or None if it is not a
    single-output element-wise op over the region and scalar constants."""
    if node.op_type not in activations.ELEMENTWISE or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    args: list = []
    for t in node.input:
        if not t:
            args.append(None)
        elif t in values:
            args.append(values[t])
        elif view.is_constant(t):
            arr = view.array(t)
            if arr is None or arr.size != 1 or arr.dtype.kind not in "fiu":
                return None
            args.append(float(arr.reshape(-1)[0]))
        else:
            return None
    if all(not isinstance(a, np.ndarray) for a in args):
        return None
    return args


def gelu_output(view: GraphView, tensor: str) -> str | None:
    """The output tensor of an exact (erf) GELU applied to ``tensor`` (the ``Gelu`` op or any
    exported decomposition), or None."""
    act = _activation(view, tensor)
    return act.output if act.kind == "gelu" else None


def _act_fields(act: Activation, inplace_reason: str) -> dict:
    return {"activation": act.kind, "act_output": act.output, "act_high": act.high, "act_params": act.params,
            "act_node": act.node, "act_label": act.label, "inplace_reason": inplace_reason}


def _activation_reasons(act: Activation) -> tuple[str, str]:
    """(why the layer cannot host any detector, why it cannot host one in place); "" when it can."""
    if act.kind == "none":
        return (f"no activation after the layer (its output goes to {act.label or 'nothing'}; a host needs ReLU, "
                "ReLU6, LeakyReLU, PReLU, HardSwish, SiLU, GELU or Mish)"), ""
    if act.kind == "elementwise":
        return (f"the element-wise function after the layer ({act.label}, from node {act.node!r}) is not a "
                "recognised activation (ReLU, ReLU6, LeakyReLU, PReLU, HardSwish, SiLU, GELU or Mish)"), ""
    if act.kind not in activations.HOST_KINDS:
        return (f"activation {act.kind} (node {act.node!r}) is not cut at zero and is not a rectifier-like "
                "activation a detector can sit under"), ""
    if act.high is not None and not act.high > 0:
        return (f"the activation after the layer ({act.label}, node {act.node!r}) is clipped at {act.high:g}: its "
                "output cannot rise above zero, so no detector can signal through it"), ""
    if act.kind == "prelu" and len(act.params) > 1:
        return "", ""  # per-channel slopes: the in-place edit zeroes the stained channel's (a ReLU there)
    if activations.zero_point(act.kind, act.params) is None:
        side = activations.NEGATIVE_SIDE.get(act.kind, "below zero")
        return "", (f"{act.label} (node {act.node!r}) has no exact zero (negative side {side}): an overwritten "
                    "neuron would leak into the scores on every natural input; use --mode insert")
    return "", ""


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
    if group < 1 or (len(strides), len(dil), len(pads)) != (2, 2, 4):  # an invalid 2-D Conv: not a host
        return None
    in_shape = shapes.get(node.input[0])
    out_shape = shapes.get(node.output[0])
    in_hw = _hw(in_shape)
    out_hw = _hw(out_shape)
    auto_pad = view.attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and in_hw and out_hw:
        pads = same_onnx_pads(in_hw, (kh, kw), strides, dil, auto_pad == "SAME_UPPER")
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out = node.output[0]
    bias_add = None
    if bias is None:
        bias, out, bias_add = _channel_bias_add(view, out, cout) or (None, out, None)
    bn = None
    nxt = view.only_consumer(out)
    if nxt is not None and nxt.op_type == "BatchNormalization" and all(
        view.is_constant(t) for t in nxt.input[1:5]
    ):
        bn = view.node_name(nxt)
        out = nxt.output[0]
    act = _activation(view, out)
    reason, inplace_reason = _activation_reasons(act)
    m = cin_g * kh * kw
    if reason:
        pass
    elif m < MIN_DIMENSION:
        kind = "depthwise: " if group > 1 and cin_g == 1 else ""
        reason = f"{kind}m={m} < {MIN_DIMENSION}: too few inputs"
    elif out_hw is None:
        reason = "output spatial size unknown (shape inference failed)"
    elif min(out_hw) < 1:
        reason = f"output spatial size {out_hw[0]}x{out_hw[1]} is empty"
    return HostLayer(
        name=view.node_name(node), op="Conv", input=node.input[0], output=out,
        weight=node.input[1], bias=bias, batchnorm=bn, bias_add=bias_add, **_act_fields(act, inplace_reason),
        in_channels=cin_g * group, out_channels=cout, kernel=(kh, kw), strides=strides,
        pads=(pads[0], pads[1], pads[2], pads[3]), dilations=dil, groups=group,
        trans_b=False, alpha=1.0, beta=1.0, in_hw=in_hw, out_hw=out_hw,
        receptive_field=fields.get(out), depth=depth.get(id(node), 0), usable=not reason, reason=reason,
        in_rank=len(in_shape) if in_shape is not None else None,
    )


def _channel_bias_add(view: GraphView, tensor: str, channels: int) -> tuple[str, str, str] | None:
    """A Conv's bias kept in the ``Add`` after it (a Conv without a bias input, then ``+ b`` with ``b`` a
    constant ``[C, 1, 1]`` or ``[1, C, 1, 1]``: CNTK's exports, the ONNX model zoo's MNIST and FER+):
    (the constant, the Add's output, the Add's name); None otherwise."""
    add = view.only_consumer(tensor)
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return None
    other = add.input[1] if add.input[0] == tensor else add.input[0]
    if other == tensor or not view.is_constant(other):
        return None
    shape = view.shape(other)
    if shape is None or not 3 <= len(shape) <= 4 or int(np.prod(shape)) != channels or shape[-3] != channels:
        return None  # one value per channel, on the channel axis of an [N, C, H, W] map
    return other, add.output[0], view.node_name(add)


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
    act = _activation(view, node.output[0])
    act_reason, inplace_reason = _activation_reasons(act)
    reason = reason or act_reason or (f"m={in_f}: too few inputs for a detector" if in_f < 2 else "")
    return HostLayer(
        name=view.node_name(node), op="Gemm", input=node.input[0], output=node.output[0],
        weight=node.input[1], bias=bias, batchnorm=None, bias_add=None,
        **_act_fields(act, inplace_reason), in_channels=int(in_f), out_channels=int(out_f), kernel=(1, 1),
        strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), groups=1, trans_b=trans_b,
        alpha=float(view.attr(node, "alpha", 1.0)), beta=float(view.attr(node, "beta", 1.0)),
        in_hw=None, out_hw=None, receptive_field=None, depth=depth.get(id(node), 0),
        usable=not reason, reason=reason, in_rank=2,
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
    act = _activation(view, out)
    reason, inplace_reason = _activation_reasons(act)
    if bias is None:
        reason = "MatMul without a constant bias Add"
    elif not reason and in_f < 2:
        reason = f"m={in_f}: too few inputs for a detector"
    in_shape = shapes.get(node.input[0])
    tokens = in_shape[1] if in_shape is not None and len(in_shape) == 3 and isinstance(in_shape[1], int) else None
    return HostLayer(
        name=view.node_name(node), op="MatMul", input=node.input[0], output=out,
        weight=node.input[1], bias=bias, batchnorm=None, bias_add=bias_add,
        **_act_fields(act, inplace_reason), in_channels=in_f, out_channels=out_f, kernel=(1, 1), strides=(1, 1),
        pads=(0, 0, 0, 0), dilations=(1, 1), groups=1, trans_b=False, alpha=1.0, beta=1.0,
        in_hw=None, out_hw=None, receptive_field=None, depth=depth.get(id(node), 0),
        usable=not reason, reason=reason, tokens=tokens,
        in_rank=len(in_shape) if in_shape is not None else None,
    )


def _hw(shape) -> tuple[int, int] | None:
    if shape is None or len(shape) != 4:
        return None
    h, w = shape[2], shape[3]
    if isinstance(h, int) and isinstance(w, int):
        return (h, w)
    return None


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
_SHAPE_ONLY_OPS = {"Shape", "Size"}
_GLOBAL_OPS = {"GlobalAveragePool", "GlobalMaxPool", "Flatten", "Gemm", "MatMul", "Reshape",
               "ReduceMean", "ReduceMax", "ReduceSum", "Resize", "Upsample", "ConvTranspose"}


def receptive_fields(view: GraphView, shapes=None) -> dict[str, ReceptiveField]:
    """Receptive field of every 4-D tensor on spatial paths from the image input.

    A tensor reached from the image through an op that mixes positions (global pooling, Flatten,
    MatMul, resizing) has no field, and neither has anything computed from it: an FPN's Add of an
    upsampled deeper level depends on pixels far outside its lateral branch's window. Shapes are not
    values (``Shape`` ends the dependence).

    Element-wise ops (activations, BatchNorm, Add, Mul, Concat, Transpose of an NHWC input...) take the
    union of their inputs' fields (branches that meet — a residual's skip, a ShuffleNet's two halves —
    see different windows, and a position depends on every pixel either sees); Conv and pooling layers
    grow it.
    """
    if shapes is None:
        shapes = view.resolved().dims
    fields: dict[str, ReceptiveField] = {}
    spread: set[str] = set()  # tensors whose values depend on the image with no field (every pixel may count)
    for inp in view.graph_inputs:
        fields[inp.name] = ReceptiveField((1, 1), (1, 1), (0.0, 0.0))
    for node in view.graph.node:
        if node.op_type in _SHAPE_ONLY_OPS:
            continue  # a shape, not the image's values: constant for the analysed size
        incoming = [fields[t] for t in node.input if t in fields]
        if any(t in spread for t in node.input) or (incoming and node.op_type in _GLOBAL_OPS):
            spread.update(node.output)  # e.g. an FPN's Add of an upsampled deeper level: no local field
            continue
        if not incoming:
            continue
        src = _union(incoming)
        if src is None:  # inputs at different strides meet: no one field describes the result
            spread.update(node.output)
            continue
        if node.op_type in _SPATIAL_OPS:
            if node.op_type == "Conv":
                w = view.shape(node.input[1])
                if w is None or len(w) != 4:
                    spread.update(node.output)
                    continue
                k = (w[2], w[3])
            else:
                k = tuple(view.attr(node, "kernel_shape", [1, 1]))
            s = tuple(view.attr(node, "strides", [1, 1]))
            d = tuple(view.attr(node, "dilations", [1, 1]))
            pads = list(view.attr(node, "pads", [0, 0, 0, 0]))
            if (len(k), len(s), len(d), len(pads)) != (2, 2, 2, 4):  # not a valid 2-D window: no field
                spread.update(node.output)
                continue
            auto_pad = view.attr(node, "auto_pad", b"NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
            if auto_pad in ("SAME_UPPER", "SAME_LOWER") and shapes:
                ih, oh = _hw(shapes.get(node.input[0])), _hw(shapes.get(node.output[0]))
                if ih and oh:
                    pads = same_onnx_pads(ih, k, s, d, auto_pad == "SAME_UPPER")
            size = tuple(src.size[i] + (k[i] - 1) * d[i] * src.jump[i] for i in range(2))
            jump = tuple(src.jump[i] * s[i] for i in range(2))
            start = tuple(src.start[i] + ((k[i] - 1) * d[i] / 2 - pads[i]) * src.jump[i] for i in range(2))
            field = ReceptiveField(size, jump, start)
        elif node.op_type == "Slice":
            sliced = _sliced_field(view, node, src, shapes.get(node.input[0]) if shapes else None)
            if sliced is None:
                spread.update(node.output)
                continue
            field = sliced
        elif node.op_type == "Pad":
            pad_list = pad_amounts(view, node)
            if pad_list is None or len(pad_list) != 8:
                spread.update(node.output)
                continue
            start = tuple(src.start[i] - pad_list[2 + i] * src.jump[i] for i in range(2))
            field = ReceptiveField(src.size, src.jump, start)
        else:
            field = src
        for out in node.output:
            fields[out] = field
    return fields


def _sliced_field(view: GraphView, node: onnx.NodeProto, src: ReceptiveField, shape) -> ReceptiveField | None:
    """The field after a ``Slice``: on a spatial axis of an NCHW map (2 or 3) output position ``p`` is input
    position ``start + step · p`` (a YOLOv5/YOLOX *Focus* stem takes every other pixel at four offsets, then
    concatenates them: a 2×2 window with stride 2); other axes keep the field. None when the slice is not
    constant or steps backwards on a spatial axis."""
    def operand(index: int, attribute: str) -> list[int] | bool | None:
        """The slice's operand (opset 10+: an input; before: an attribute); None absent, False unknown."""
        if len(node.input) > 1:
            if index >= len(node.input) or not node.input[index]:
                return None
            arr = view.value(node.input[index])
            return False if arr is None else [int(v) for v in np.asarray(arr).reshape(-1)]
        got = view.attr(node, attribute)
        return None if got is None else [int(v) for v in got]

    starts, axes, steps = operand(1, "starts"), operand(3, "axes"), operand(4, "")
    if not isinstance(starts, list) or axes is False or steps is False:
        return None
    axes_list = axes if isinstance(axes, list) else list(range(len(starts)))
    steps_list = steps if isinstance(steps, list) else [1] * len(starts)
    jump, start = list(src.jump), list(src.start)
    for axis, first, step in zip(axes_list, starts, steps_list, strict=True):
        if axis % 4 not in (2, 3):
            continue
        i = axis % 4 - 2
        if step < 1:
            return None
        if first < 0:
            dim = shape[axis % 4] if shape is not None and len(shape) == 4 else None
            if not isinstance(dim, int):
                return None
            first = max(0, dim + first)
        start[i] += first * jump[i]
        jump[i] *= step
    return ReceptiveField(src.size, (jump[0], jump[1]), (start[0], start[1]))


def pad_amounts(view: GraphView, node: onnx.NodeProto) -> list[int] | None:
    """A ``Pad`` node's pads (attribute before opset 11, else its constant or shape-derived input)."""
    pads: list[int] | None = view.attr(node, "pads")
    if pads is None and len(node.input) > 1 and node.input[1]:
        arr = view.value(node.input[1])
        pads = None if arr is None else [int(p) for p in arr.reshape(-1)]
    return pads


def _union(fields: list[ReceptiveField]) -> ReceptiveField | None:
    """The smallest field holding every one of ``fields`` at each position (they must share the jump)."""
    first = fields[0]
    if any(f.jump != first.jump for f in fields[1:]):
        return None
    if all(f == first for f in fields[1:]):
        return first
    size, start = [], []
    for i in range(2):
        lo = min(f.start[i] - (f.size[i] - 1) / 2 for f in fields)
        hi = max(f.start[i] + (f.size[i] - 1) / 2 for f in fields)
        size.append(round(hi - lo) + 1)
        start.append((lo + hi) / 2)
    return ReceptiveField((size[0], size[1]), first.jump, (start[0], start[1]))


# -- reading and writing one neuron ----------------------------------------------------------------
def layer_affine(view: GraphView, host: HostLayer) -> tuple[np.ndarray, np.ndarray]:
    """Effective weights ``[C_out, m]`` over φ and biases ``[C_out]`` of every neuron of the layer.

    BatchNorm and Gemm alpha/beta are included. Names are read from the graph as it is now.
    """
    _, weight_name, bias_node, bias_index = _current_tensors(view, host)
    w = view.constant(weight_name).astype(np.float64)
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
        scale, shift = _bn_affine(view, host.batchnorm)
        rows = rows * scale[:, None]
        b = b * scale + shift
    return rows, b


def stored_layer(view: GraphView, host: HostLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The layer as its tensors hold it, channel by channel, as :func:`write_neuron` writes it with
    ``keep_batchnorm``: rows ``[C, m]`` and biases ``[C]`` (under an unfolded BatchNorm the Conv rows and the
    BN shift), with the factors back to :func:`layer_affine`'s effective map: effective row = stored row ×
    ``row_scale``, and a change of the effective bias is the stored bias's change × ``bias_scale``."""
    rows, b = layer_affine(view, host)
    row_scale, bias_scale, stored_b = np.ones(len(b)), np.ones(len(b)), b
    if host.batchnorm is not None:
        scale, _ = _bn_affine(view, host.batchnorm)
        row_scale = np.where(np.isfinite(scale) & (np.abs(scale) >= 1e-12), scale, 1.0)
        stored_b = np.asarray(view.array(view.node(host.batchnorm).input[2]), np.float64).reshape(-1) * np.ones(len(b))
    elif host.op == "Gemm":
        row_scale = row_scale * host.alpha
        if host.beta:
            bias_scale, stored_b = bias_scale * host.beta, b / host.beta
    return rows / row_scale[:, None], stored_b, row_scale, bias_scale


def neuron_affine(view: GraphView, host: HostLayer, channel: int) -> tuple[np.ndarray, float]:
    """Effective (weights over φ, bias) of one neuron, BatchNorm and Gemm alpha/beta included."""
    rows, b = layer_affine(view, host)
    return rows[channel].copy(), float(b[channel])


def _bn_affine(view: GraphView, batchnorm: str) -> tuple[np.ndarray, np.ndarray]:
    node = view.node(batchnorm)
    gamma, beta, mean, var = (np.asarray(view.array(t), np.float64) for t in node.input[1:5])
    eps = float(view.attr(node, "epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _current_tensors(view: GraphView, host: HostLayer) -> tuple[onnx.NodeProto, str, onnx.NodeProto | None, int]:
    """(node, weight tensor, node holding the bias, its input index) as the graph is *now*.

    Names are read from the nodes, not from ``host``: a copy-on-write may have renamed them.
    """
    node = host_node(view, host)
    if host.op == "MatMul" or host.bias_add:  # the bias in an Add after the layer
        add = view.find_node(host.bias_add) if host.bias_add else None
        if add is None:
            return node, node.input[1], None, 0
        idx = 1 if add.input[0] == node.output[0] else 0
        return node, node.input[1], add, idx
    if len(node.input) > 2 and node.input[2]:
        return node, node.input[1], node, 2
    return node, node.input[1], None, 0


def write_neuron(view: GraphView, host: HostLayer, channel: int, row: np.ndarray, bias: float,
                 keep_batchnorm: bool = False) -> None:
    """Make neuron ``channel`` compute ``row · φ + bias`` before its activation (in place).

    With an unfolded BatchNorm, the BN channel is set to the identity and the affine map goes into the
    Conv; with ``keep_batchnorm`` (a hidden edit: an identity BN channel stands out among its neighbours'
    statistics) it keeps its scale, mean and variance, the Conv row is stored divided by the BN scale and
    the bias goes into the BN shift, unless the channel's BN scale is unusable (0, or not finite). The
    identity is the default: a Conv output that is not scaled back down by its BN keeps a per-tensor int8
    range of the pre-BN activations narrow (RapidOCR's overwritten channel quantised 92 % → 87 % kept).
    A Conv without a bias input and without BatchNorm cannot take a bias in place; it is refused before
    anything changes.
    """
    node, weight_name, bias_node, bias_index = _current_tensors(view, host)
    if host.batchnorm is None and bias_node is None:
        raise ValueError(f"{host.name} has no bias to edit")
    w = view.constant(weight_name).copy()
    r = np.asarray(row, np.float64)
    if keep_batchnorm and host.batchnorm is not None and _write_through_batchnorm(view, host, node, bias_node,
                                                                                  channel, r, bias):
        return
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
        bn = view.node(host.batchnorm)
        eps = float(view.attr(bn, "epsilon", 1e-5))
        for idx, value in ((1, 1.0), (2, bias), (3, 0.0), (4, 1.0 - eps)):
            arr = view.constant(bn.input[idx]).copy()
            arr[channel] = value
            view.set_input_array(bn, idx, arr)
        bias, scale = 0.0, 1.0
    else:
        scale = host.beta if host.op == "Gemm" else 1.0
    if bias_node is None:  # only with a BatchNorm (refused above otherwise), which now holds the bias
        return
    b = view.constant(bias_node.input[bias_index]).copy()
    b.reshape(-1)[channel] = bias / scale
    view.set_input_array(bias_node, bias_index, b)


def permute_channels(view: GraphView, host: HostLayer, order: np.ndarray) -> None:
    """Store a Conv's output channels in another order (in place): stored channel ``q`` computes what channel
    ``order[q]`` computed (its weight row, bias, unfolded BatchNorm parameters and channel-bias ``Add``
    entry move with it). A grouped Conv is refused: its channels read their own group's inputs."""
    if host.op != "Conv" or host.groups != 1:
        raise ValueError(f"{host.name}: only an ungrouped Conv's output channels can be reordered")
    order = np.asarray(order, np.int64)
    node, weight_name, bias_node, bias_index = _current_tensors(view, host)
    view.set_input_array(node, 1, view.constant(weight_name)[order].copy())
    if bias_node is not None:
        b = view.constant(bias_node.input[bias_index])
        view.set_input_array(bias_node, bias_index, b.reshape(-1)[order].reshape(b.shape).copy())
    if host.batchnorm is not None:
        bn = view.node(host.batchnorm)
        for idx in (1, 2, 3, 4):
            view.set_input_array(bn, idx, view.constant(bn.input[idx]).reshape(-1)[order].copy())


def _write_through_batchnorm(view: GraphView, host: HostLayer, node: onnx.NodeProto,
                             bias_node: onnx.NodeProto | None, channel: int, row: np.ndarray, bias: float) -> bool:
    """``write_neuron`` under an unfolded BatchNorm that keeps its statistics: Conv row ``row / scale``, BN shift
    ``bias − scale (b_conv − mean)``. False (nothing written) where the channel's BN scale is unusable."""
    assert host.batchnorm is not None and host.op == "Conv"
    bn = view.node(host.batchnorm)
    gamma, mean, var = (float(np.asarray(view.array(bn.input[i]), np.float64).reshape(-1)[channel]) for i in (1, 3, 4))
    scale = gamma / np.sqrt(var + float(view.attr(bn, "epsilon", 1e-5)))
    if not np.isfinite(scale) or abs(scale) < 1e-12:
        return False
    w = view.constant(node.input[1]).copy()
    w[channel] = (row / scale).reshape(w.shape[1:])
    view.set_input_array(node, 1, w)
    b_conv = 0.0 if bias_node is None else float(np.asarray(view.array(node.input[2]), np.float64).reshape(-1)[channel])
    beta = view.constant(bn.input[2]).copy()
    beta.reshape(-1)[channel] = bias - scale * (b_conv - mean)
    view.set_input_array(bn, 2, beta)
    return True


def host_node(view: GraphView, host: HostLayer) -> onnx.NodeProto:
    node = view.find_node(host.name)
    if node is None:
        raise KeyError(host.name)
    return node
