"""Conduit lock pass (in place): carry a detector's signal to the classifier through existing channels.

Only initializer values change: node count, op types, tensor names, initializer names and shapes
stay those of the input model. The wiring, for a MobileNetV2-like graph (host = an expand conv)::

    host Conv row k0 := detector                 Clip(0,6) → 6 at ``position`` with the patch, 0 otherwise
    depthwise row k0 := centre tap 1, bias 0     (the channel index is kept: same lane)
    project row j    := e_k0 at the centre tap   → residual-stream lane j
    every conv adding into that stream: row j := 0, bias j := 0      ("lane-clear": j is 0 naturally)
    every other conv reading a lane tensor: column := 0              (no leak; free, the lane is 0 naturally)
    next block expand row k := e_j, depthwise k := identity, project row j' := e_k   (hidden conduit)
    ...
    last Conv row c := e_lane → Clip → GlobalAveragePool → Flatten → head feature c = γ
    head bias := b_lock,  head column c := (b_orig − b_lock) / γ

so the scores are ``W f + b_lock`` without the patch (feature c is exactly 0) and ``W f + b_orig``
with it. γ = v · |P| / (H_f · W_f) for global average pooling (v for global max pooling), with v the
detector's activated value (the host's upper clip, 6 for ReLU6) and |P| the number of final positions
the signal lands on (1, or more after a MaxPool).

The walk is generic. From the host's activated output it follows the consumers of the lane tensor:

* exactly one consumer carries the lane: an element-wise op (Relu, LeakyRelu, Clip with lo ≤ 0,
  Identity, Dropout, BatchNormalization — its channel is set to the identity), a residual ``Add``
  (the other input's channel is made exactly 0: zeroed conv rows, BatchNorm channels or constants,
  through Relu/Clip/MaxPool/Add), MaxPool, global pooling (GlobalAveragePool, GlobalMaxPool,
  ReduceMean/ReduceMax over H, W), Flatten/Reshape/Squeeze to ``[N, C]``, or the head itself;
  when no element-wise consumer exists, the Conv with the fewest convs between it and the head
  carries it (identity row at one tap; a depthwise conv keeps the channel index);
* every other Conv consumer is blocked (the lane's input column is zeroed);
* anything else (Concat, Mul gates, Resize, AveragePool, attention, a second element-wise consumer,
  a shared weight, a Conv none of whose taps lands on the signal position...) is refused with an
  :class:`~onnxstain.errors.UnsupportedModelError` naming the node.

A conduit row may use any tap, not only the centre: output ``o`` reads lane position ``p`` through tap
``t`` when ``o·s − pad_begin + t·d == p``. The centre tap is preferred; a tap that keeps the most
signal positions wins. This is exact for every tap; only a Conv where no tap of any output lands on
the signal position (e.g. a 1×1 stride-2 conv and an odd position) is refused.

Channel choice: every overwritten channel loses its natural feature. Each lane (a channel index
shared by a chain of tensors) costs Σ over the tensors it zeroes and the layers reading them of
``activity[t][x] · ‖reader's column x‖`` (readers: convs, and the head for the last lane). Dead
channels (activity exactly 0) cost nothing and are preferred. ``activity`` maps the tensors named by
:func:`conduit_taps` to the per-channel (axis 1) mean |value| over calibration images and positions;
without it, the activity is estimated from the producing conv's row norm. Ties go to the
lowest index, so plans are deterministic.

API notes:

* :func:`prepare_conduit` returns the model with every conduit edit, the detector row silenced and
  the original head. Its host input is what the detector reads in the locked model (a residual lane
  can clear host-input channels: ``plan.host_input_zeroed``) and its scores are what the locked model
  gives *with* the patch — the exact unlocked reference. The original model's scores differ from it
  by the lost channels' contribution, which in place cannot be avoided.
* :func:`apply_conduit` takes ``signal``: the detector's activated value on the patch, required when
  the host activation has no upper clip (plain ReLU).
* :class:`ConduitLock` also lists the zeroed input columns (``columns``).
* :func:`conduit_taps` takes an optional ``position`` (only its refusals depend on it); it names every
  tensor the cost reads, residual-stream Add outputs and the classifier input included.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NoReturn

import numpy as np
import onnx

from .._onnx.graph import GraphView
from .._onnx.head import Head
from .._onnx.hosts import HostLayer, write_neuron
from .._onnx.padding import same_onnx_pads
from ..errors import UnsupportedModelError
from .builder import copy_model
from .result import PassResult, result
from .stain import write_head

_GATE = "use the gate lock (--kind gate), which inserts its nodes"
_ELEMENTWISE = {"Relu", "LeakyRelu", "Clip", "Identity", "Dropout", "BatchNormalization"}
_PASSIVE = _ELEMENTWISE | {"Add", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax",
                           "Flatten", "Reshape", "Squeeze"}
_CHANNELWISE = _ELEMENTWISE | {"Add", "MaxPool"}
_SHAPE_ONLY = {"Shape", "Size"}


def _refuse(msg: str) -> NoReturn:
    raise UnsupportedModelError(f"conduit lock: {msg}; {_GATE}")


# -- public data -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConduitEdit:
    """One weight edit. ``op``:

    * ``zero-column``: input column ``column`` := 0 in every row of the Conv reading it;
    * ``zero-row``: output row ``channel`` and its bias := 0;
    * ``identity-row``: row ``channel`` := 1 at (``column``, ``tap``), 0 elsewhere, bias 0;
    * ``bn-identity`` / ``bn-zero``: BatchNormalization channel ``channel`` := identity / 0;
    * ``zero-const``: entry ``channel`` of the per-channel constant ``node.input[column]`` := 0.
    """

    op: str
    node: str
    channel: int
    column: int = -1
    tap: tuple[int, int] = (0, 0)
    role: str = ""


@dataclasses.dataclass(frozen=True)
class ConduitLane:
    """One channel index carried (or cleared) along a chain of tensors."""

    kind: str  # "detector" | "conduit"
    source: str  # node whose row defines the lane (the host for the detector)
    channel: int
    tensors: tuple[str, ...]  # tensors carrying the signal in this channel
    cleared: tuple[str, ...]  # tensors forced to exactly 0 in this channel
    cost: float  # estimated loss (Σ activity · reader column norm); 0 for dead channels


@dataclasses.dataclass
class ConduitPlan:
    """Where the lanes go and every weight edit, with channels chosen; no detector or head values yet.

    ``host_input_zeroed`` lists host-input channels that a residual lane clears (exactly 0 in the
    locked model); ``host_input_intact`` is False when the clears change other host-input features
    too, in which case the detector must be built on :func:`prepare_conduit`'s features.
    """

    host: HostLayer
    head: Head
    position: tuple[int, int]
    detector_channel: int
    head_feature: int
    lanes: list[ConduitLane]
    edits: list[ConduitEdit]
    value_ops: list[tuple[str, float]]  # ("clip", hi) / ("scale", f) applied to the detector value
    final_positions: int
    host_input_zeroed: list[int]  # host-input channels that are exactly 0 in the locked model
    host_input_intact: bool  # False: other host-input features change too (build φ on prepare_conduit)
    used_activity: bool
    notes: list[str]
    _fingerprint: tuple[int, tuple[str, ...]] = dataclasses.field(repr=False, default=(0, ()))

    def gamma(self, signal: float) -> float:
        """Head feature value on the patch, for a detector activated value ``signal``."""
        v = float(signal)
        for op, x in self.value_ops:
            v = min(v, x) if op == "clip" else v * x
        return v

    @property
    def overwritten(self) -> list[tuple[str, int, str]]:
        return [(e.node, e.channel, e.role) for e in self.edits if e.op != "zero-column"]

    def describe(self) -> str:
        lines = [f"conduit plan: host {self.host.name} channel {self.detector_channel} at {self.position}, "
                 f"head feature {self.head_feature}, {self.final_positions} final position(s)"]
        for lane in self.lanes:
            lines.append(f"  {lane.kind:8s} {lane.source} ch {lane.channel} cost {lane.cost:.4g} "
                         f"({len(lane.tensors)} lane tensors, {len(lane.cleared)} cleared)")
        rows = self.overwritten
        lines.append(f"  detector row + {len(rows)} rows/channels overwritten, "
                     f"{sum(e.op == 'zero-column' for e in self.edits)} columns zeroed")
        if self.host_input_zeroed:
            lines.append(f"  host input channels zeroed: {self.host_input_zeroed}")
        return "\n".join(lines)


@dataclasses.dataclass
class ConduitLock:
    """The in-place lock pass's result and what the key and the notes need of it."""

    edit: PassResult  # the edited copy (weights only: no added node)
    gamma: float  # head feature value on the patch (0 on natural inputs)
    head_feature: int  # c
    channels: list[tuple[str, int, str]]  # (node name, output channel, role)
    notes: list[str]
    columns: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (conv, zeroed input column)

    @property
    def model(self) -> onnx.ModelProto:
        return self.edit.model


# -- planning --------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Link:
    conv: str
    src: int  # lane index read (column)
    dst: int  # lane index written (row)
    tap: tuple[int, int]
    cin_g: int


@dataclasses.dataclass
class _Lane:
    kind: str
    source: str
    size: int  # channel count of its tensors
    group_of: tuple[int, int, int] | None = None  # (previous lane, cin_g, cout_g) for grouped carriers
    fixed: int | None = None
    tensors: list[str] = dataclasses.field(default_factory=list)
    cleared: list[str] = dataclasses.field(default_factory=list)
    clear_rows: list[str] = dataclasses.field(default_factory=list)
    block_cols: list[str] = dataclasses.field(default_factory=list)
    bn_identity: list[str] = dataclasses.field(default_factory=list)
    bn_zero: list[str] = dataclasses.field(default_factory=list)
    const_zero: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    row_nodes: list[str] = dataclasses.field(default_factory=list)  # nodes whose row/channel x it writes


class _Walker:
    def __init__(self, model: onnx.ModelProto, host: HostLayer, position: tuple[int, int], head: Head) -> None:
        self.view = GraphView(model)
        self.shapes = self.view.resolved().dims
        self.host = host
        self.head = head
        self.position = (int(position[0]), int(position[1]))
        self.lanes: list[_Lane] = []
        self.links: list[_Link] = []
        self.value_ops: list[tuple[str, float]] = []
        self.lane_tensors: set[str] = set()
        self.pooled_positions: int | None = None
        self.final_positions = 0
        self.final_lane = 0
        head_node = self.view.find_node(head.node)
        if head_node is None:
            _refuse(f"the classifier node {head.node} is not in the model")
        self.head_node = head_node
        self.reach = self._reach_head()

    # -- helpers -----------------------------------------------------------------------------------
    def name(self, node: onnx.NodeProto) -> str:
        return self.view.node_name(node)

    def _reach_head(self) -> dict[int, float]:
        """Fewest Convs between each node and the head (inf when the head is not reachable)."""
        reach: dict[int, float] = {id(self.head_node): 0.0}
        for node in reversed(self.view.graph.node):
            if node is self.head_node:
                continue
            best = math.inf
            for out in node.output:
                for c in self.view.consumers.get(out, []):
                    r = reach.get(id(c), math.inf)
                    best = min(best, r + (1.0 if c.op_type == "Conv" else 0.0))
            reach[id(node)] = best
        return reach

    def hw(self, tensor: str) -> tuple[int, int] | None:
        s = self.shapes.get(tensor)
        if s is None or len(s) != 4 or not isinstance(s[2], int) or not isinstance(s[3], int):
            return None
        return (s[2], s[3])

    def check_private(self, node: onnx.NodeProto, indices: tuple[int, ...], what: str) -> None:
        for i in indices:
            if i >= len(node.input) or not node.input[i]:
                continue
            t = node.input[i]
            if not self.view.is_constant(t):
                _refuse(f"{self.name(node)} ({node.op_type}): its {what} {t} is not a constant")
            if self.view.weight_users(t) > 1:
                _refuse(f"{self.name(node)} ({node.op_type}): its {what} {t} is shared with other nodes")

    def constant(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
        """The value of ``node.input[index]``; refused (as by :meth:`check_private`) when not a constant."""
        arr = self.view.array(node.input[index])
        if arr is None:
            _refuse(f"{self.name(node)} ({node.op_type}): its {what} {node.input[index]} is not a constant")
        return arr

    def conv_geometry(self, node: onnx.NodeProto):
        w = self.view.array(node.input[1])
        if w is None or w.ndim != 4:
            _refuse(f"{self.name(node)} (Conv) is not a 2-D convolution with constant weights")
        k = (int(w.shape[2]), int(w.shape[3]))
        s = tuple(int(v) for v in self.view.attr(node, "strides", [1, 1]))
        d = tuple(int(v) for v in self.view.attr(node, "dilations", [1, 1]))
        pads = [int(v) for v in self.view.attr(node, "pads", [0, 0, 0, 0])]
        auto_pad = self.view.attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        in_hw, out_hw = self.hw(node.input[0]), self.hw(node.output[0])
        if in_hw is None or out_hw is None:
            _refuse(f"{self.name(node)} (Conv): spatial size unknown (shape inference failed)")
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = same_onnx_pads(in_hw, k, s, d, auto_pad == "SAME_UPPER")
        elif auto_pad == "VALID":
            pads = [0, 0, 0, 0]
        return w, k, s, d, (pads[0], pads[1]), out_hw

    @staticmethod
    def _map(ps, k, s, d, pad, out_hw, taps):
        """Output positions reached from ``ps`` through tap (th, tw), for every tap in ``taps``."""
        best: tuple[tuple, tuple[int, int], set] | None = None
        centre = (k[0] // 2, k[1] // 2)
        for th, tw in taps:
            hit = set()
            for ph, pw in ps:
                qh, qw = ph + pad[0] - th * d[0], pw + pad[1] - tw * d[1]
                if qh % s[0] or qw % s[1]:
                    continue
                oh, ow = qh // s[0], qw // s[1]
                if 0 <= oh < out_hw[0] and 0 <= ow < out_hw[1]:
                    hit.add((oh, ow))
            key = (-len(hit), abs(th - centre[0]) + abs(tw - centre[1]), th, tw)
            if hit and (best is None or key < best[0]):
                best = (key, (th, tw), hit)
        return best

    # -- the walk ----------------------------------------------------------------------------------
    def walk(self) -> None:
        """Follow the lane from the host's activated output to the classifier, recording lanes and edits."""
        tensor = self._start_lane()
        positions = {self.position}
        flat = False
        cur = 0
        while True:
            at_head, convs, passive = self._lane_users(tensor)
            if at_head:
                self._reach_head_input(cur, tensor, convs, passive, flat)
                break
            if len(passive) > 1:
                _refuse(f"the lane tensor {tensor} feeds {self.name(passive[0])} ({passive[0].op_type}) and "
                        f"{self.name(passive[1])} ({passive[1].op_type}); neither can be blocked")
            if passive:
                tensor, positions, flat = self._through_passive(cur, passive[0], convs, tensor, positions, flat)
            else:
                cur, tensor, positions = self._through_conv(cur, convs, tensor, positions, flat)
            self.lanes[cur].tensors.append(tensor)
            self.lane_tensors.add(tensor)
        self.final_positions = self.pooled_positions or len(positions)
        self.final_lane = cur

    def _check_host(self) -> tuple[onnx.NodeProto, str]:
        """Refuse a host (or classifier) the conduit cannot use; the host node and its activated output."""
        host = self.host
        if host.op != "Conv":
            _refuse(f"host {host.name} is a {host.op}; an in-place conduit needs a Conv host with positions")
        if host.act_output is None or not host.relu_like:
            _refuse(f"host {host.name} has no ReLU-type activation ({host.activation})")
        if host.bias is None and host.batchnorm is None:
            _refuse(f"host {host.name} has no bias to hold the detector's threshold")
        if host.out_hw is None:
            _refuse(f"host {host.name}: output spatial size unknown")
        if not (0 <= self.position[0] < host.out_hw[0] and 0 <= self.position[1] < host.out_hw[1]):
            _refuse(f"position {self.position} is outside the host output {host.out_hw}")
        hnode = self.view.find_node(host.name)
        if hnode is None:
            _refuse(f"host {host.name} is not in the model")
        self.check_private(hnode, (1, 2), "weight")
        if host.batchnorm is not None:
            self.check_private(self.view.node(host.batchnorm), (1, 2, 3, 4), "parameter")
        if self.head.bias is None:
            _refuse(f"the classifier {self.head.node} has no bias to lock")
        self.check_private(self.head_node, (1, 2), "weight")
        if self.head.bias_add is not None:
            add = self.view.node(self.head.bias_add)
            self.check_private(add, tuple(i for i, t in enumerate(add.input) if t == self.head.bias), "bias")
        return hnode, host.act_output

    def _start_lane(self) -> str:
        """The detector lane (host row, its BatchNorm, its activation); the tensor the walk starts from."""
        hnode, act_output = self._check_host()
        host = self.host
        lane = _Lane("detector", host.name, host.out_channels, row_nodes=[host.name])
        if host.batchnorm is not None:
            lane.row_nodes.append(host.batchnorm)
        lane.tensors += [t for t in dict.fromkeys([hnode.output[0], host.output, act_output])]
        self.lanes.append(lane)
        self.lane_tensors.update(lane.tensors)
        if host.act_high is not None:
            self.value_ops.append(("clip", float(host.act_high)))
        return act_output

    def _lane_users(self, tensor: str) -> tuple[bool, list[onnx.NodeProto], list[onnx.NodeProto]]:
        """(the head reads ``tensor``, its Conv readers, its passive readers); anything else is refused."""
        if tensor in self.view.output_names:
            _refuse(f"the lane tensor {tensor} is a model output")
        users = self.view.consumers.get(tensor, [])
        if not users:
            _refuse(f"the lane tensor {tensor} has no consumer on the way to the classifier")
        at_head = False
        convs: list[onnx.NodeProto] = []
        passive: list[onnx.NodeProto] = []
        for u in users:
            if u.op_type in _SHAPE_ONLY:  # reads the shape, not the values
                continue
            if sum(1 for t in u.input if t == tensor) > 1:
                _refuse(f"{self.name(u)} ({u.op_type}) reads the lane tensor {tensor} twice")
            if u is self.head_node:
                at_head = True
            elif u.op_type == "Conv":
                if u.input[0] != tensor:
                    _refuse(f"{self.name(u)} (Conv) takes the lane tensor {tensor} as a weight")
                convs.append(u)
            elif u.op_type in _PASSIVE:
                if u.op_type != "Add" and u.input[0] != tensor:
                    _refuse(f"{self.name(u)} ({u.op_type}) reads the lane tensor {tensor} as a parameter")
                passive.append(u)
            else:
                _refuse(f"{self.name(u)} ({u.op_type}) reads the lane tensor {tensor}; "
                        f"a {u.op_type} on the signal path is not supported")
        return at_head, convs, passive

    def _reach_head_input(self, cur: int, tensor: str, convs: list[onnx.NodeProto],
                          passive: list[onnx.NodeProto], flat: bool) -> None:
        """The lane is the classifier's input: it must be pooled, and every other reader blocked."""
        if passive:
            _refuse(f"the classifier input {tensor} also feeds {self.name(passive[0])} "
                    f"({passive[0].op_type}), which cannot be blocked")
        if not flat or self.head_node.input[0] != tensor:
            _refuse(f"the lane reaches the classifier {self.head.node} as a spatial map, "
                    "not as a pooled channel")
        for u in convs:
            self.block(cur, u)

    def _through_passive(self, cur: int, carrier: onnx.NodeProto, convs: list[onnx.NodeProto], tensor: str,
                         positions: set, flat: bool) -> tuple[str, set, bool]:
        """Carry the lane through its one passive reader (the Conv readers are blocked)."""
        if math.isinf(self.reach[id(carrier)]):
            _refuse(f"the lane leaks into {self.name(carrier)} ({carrier.op_type}), "
                    "which does not lead to the classifier")
        for u in convs:
            self.block(cur, u)
        return self.passive(cur, carrier, tensor, positions, flat)

    def _through_conv(self, cur: int, convs: list[onnx.NodeProto], tensor: str, positions: set,
                      flat: bool) -> tuple[int, str, set]:
        """Carry the lane through the Conv reader nearest the classifier (the others are blocked);
        (lane index, tensor, signal positions) after it."""
        reachable = [u for u in convs if not math.isinf(self.reach[id(u)])]
        if not reachable:
            _refuse(f"no consumer of the lane tensor {tensor} leads to the classifier")
        order = {id(n): i for i, n in enumerate(self.view.graph.node)}
        carrier = min(reachable, key=lambda u: (self.reach[id(u)], order[id(u)]))
        for u in convs:
            if u is not carrier:
                self.block(cur, u)
        if flat:
            _refuse(f"{self.name(carrier)} (Conv) reads the pooled lane; not supported")
        cur, positions = self.conv_carrier(cur, carrier, positions)
        return cur, carrier.output[0], positions

    def block(self, cur: int, conv: onnx.NodeProto) -> None:
        self.check_private(conv, (1,), "weight")
        self.lanes[cur].block_cols.append(self.name(conv))

    def conv_carrier(self, cur: int, conv: onnx.NodeProto, positions: set) -> tuple[int, set]:
        self.check_private(conv, (1, 2), "weight")
        w, k, s, d, pad, out_hw = self.conv_geometry(conv)
        group = int(self.view.attr(conv, "group", 1))
        cout, cin_g = int(w.shape[0]), int(w.shape[1])
        cout_g = cout // group
        taps = [(th, tw) for th in range(k[0]) for tw in range(k[1])]
        best = self._map(positions, k, s, d, pad, out_hw, taps)
        if best is None:
            _refuse(f"{self.name(conv)} (Conv, kernel {k}, stride {s}, pads {pad}): no tap of any output "
                    f"position lands on the signal position(s) {sorted(positions)}")
        _, tap, hit = best
        name = self.name(conv)
        if group > 1 and cin_g == 1 and cout_g == 1:  # depthwise: the channel index is kept
            self.links.append(_Link(name, cur, cur, tap, cin_g))
            self.lanes[cur].row_nodes.append(name)
            self.lanes[cur].block_cols.append(name)
            nxt = cur
        else:
            lane = _Lane("conduit", name, cout, row_nodes=[name])
            if group > 1:
                lane.group_of = (cur, cin_g, cout_g)
            self.lanes[cur].block_cols.append(name)
            self.lanes.append(lane)
            nxt = len(self.lanes) - 1
            self.links.append(_Link(name, cur, nxt, tap, cin_g))
        return nxt, hit

    def passive(self, cur: int, node: onnx.NodeProto, tensor: str, positions: set,
                flat: bool) -> tuple[str, set, bool]:
        """Carry the lane through a passive op: (its output, the signal positions there, pooled)."""
        op, name, lane = node.op_type, self.name(node), self.lanes[cur]
        out = node.output[0]
        if op in ("Relu", "LeakyRelu", "Identity", "Dropout"):
            if op == "Dropout" and len(node.output) > 1 and node.output[1] and self.view.consumers.get(node.output[1]):
                _refuse(f"{name} (Dropout) has its mask used")
            return out, positions, flat
        if op == "Clip":
            lo, hi = self.view.clip_bounds(node)
            if (lo is not None and lo > 0) or (hi is not None and hi <= 0):
                _refuse(f"{name} (Clip [{lo}, {hi}]) does not keep 0 at 0 and pass a positive value")
            if hi is not None:
                self.value_ops.append(("clip", hi))
            return out, positions, flat
        if op == "BatchNormalization":
            if self.view.attr(node, "training_mode", 0):
                _refuse(f"{name} (BatchNormalization) is in training mode")
            self.check_private(node, (1, 2, 3, 4), "parameter")
            lane.bn_identity.append(name)
            lane.row_nodes.append(name)
            return out, positions, flat
        if op == "Add":
            self._residual_add(cur, node, tensor)
            return out, positions, flat
        if op == "MaxPool":
            return out, self._max_pool(node, tensor, positions), flat
        if op in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax"):
            return out, {(0, 0)}, self._global_pool(node, tensor, positions, flat)
        if op in ("Flatten", "Reshape", "Squeeze"):
            s_in, s_out = self.shapes.get(tensor), self.shapes.get(out)
            pooled = flat or (s_in is not None and len(s_in) == 4 and s_in[2] == 1 and s_in[3] == 1)
            ok = (pooled and s_out is not None and len(s_out) == 2 and s_out[1] == lane.size
                  and (op != "Flatten" or int(self.view.attr(node, "axis", 1)) == 1))
            if not ok:
                _refuse(f"{name} ({op}) does not turn the pooled lane into [N, channels] one to one")
            return out, positions, True
        _refuse(f"{name} ({op}) on the signal path is not supported")

    def _residual_add(self, cur: int, node: onnx.NodeProto, tensor: str) -> None:
        """The lane through an ``Add``: the other input's channel is made exactly 0."""
        name, lane = self.name(node), self.lanes[cur]
        other = node.input[1] if node.input[0] == tensor else node.input[0]
        s_in, s_out = self.shapes.get(tensor), self.shapes.get(node.output[0])
        if s_in is None or s_out is None or s_in[1:] != s_out[1:]:
            _refuse(f"{name} (Add) broadcasts the lane tensor {tensor} to another shape")
        if self.view.is_constant(other):
            self.zero_const(cur, node, list(node.input).index(other), lane.size)
        else:
            self.clear(cur, other, name)

    def _max_pool(self, node: onnx.NodeProto, tensor: str, positions: set) -> set:
        """The output positions a MaxPool carries the signal positions to (every window holding one)."""
        name = self.name(node)
        if len(node.output) > 1 and node.output[1] and self.view.consumers.get(node.output[1]):
            _refuse(f"{name} (MaxPool) has its indices used")
        k = tuple(int(v) for v in self.view.attr(node, "kernel_shape"))
        s = tuple(int(v) for v in self.view.attr(node, "strides", [1, 1]))
        d = tuple(int(v) for v in self.view.attr(node, "dilations", [1, 1]))
        pads = [int(v) for v in self.view.attr(node, "pads", [0, 0, 0, 0])]
        in_hw, out_hw = self.hw(tensor), self.hw(node.output[0])
        if in_hw is None or out_hw is None or len(k) != 2:
            _refuse(f"{name} (MaxPool): spatial size unknown")
        auto_pad = self.view.attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = same_onnx_pads(in_hw, k, s, d, auto_pad == "SAME_UPPER")
        hit = set()
        for th in range(k[0]):
            for tw in range(k[1]):
                r = self._map(positions, k, s, d, (pads[0], pads[1]), out_hw, [(th, tw)])
                if r is not None:
                    hit |= r[2]
        if not hit:
            _refuse(f"{name} (MaxPool) drops the signal position(s) {sorted(positions)}")
        return hit

    def _global_pool(self, node: onnx.NodeProto, tensor: str, positions: set, flat: bool) -> bool:
        """The lane through a global pooling over height and width; whether its output is ``[N, C]``."""
        op, name = node.op_type, self.name(node)
        if flat:
            _refuse(f"{name} ({op}) pools an already pooled lane")
        if op in ("ReduceMean", "ReduceMax"):
            axes = self.view.attr(node, "axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                arr = self.view.array(node.input[1])
                axes = None if arr is None else [int(a) for a in arr.reshape(-1)]
            if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
                _refuse(f"{name} ({op}) does not reduce over height and width only")
            keep = int(self.view.attr(node, "keepdims", 1))
        else:
            keep = 1
        hw = self.hw(tensor)
        if hw is None:
            _refuse(f"{name} ({op}): spatial size unknown")
        if op in ("GlobalAveragePool", "ReduceMean"):
            self.value_ops.append(("scale", len(positions) / float(hw[0] * hw[1])))
        self.pooled_positions = len(positions)
        return keep == 0

    def zero_const(self, cur: int, node: onnx.NodeProto, index: int, size: int) -> None:
        """Zero entry x of a per-channel constant added to a lane (``[C]`` on ``[N, C]``, ``[C, 1, 1]``...)."""
        arr = self.view.array(node.input[index])
        out_shape = self.shapes.get(node.output[0])
        rank = len(out_shape) if out_shape is not None else 0
        shape = [1] * (rank - (arr.ndim if arr is not None else 0)) + (list(arr.shape) if arr is not None else [])
        if arr is None or rank < 2 or len(shape) != rank or shape[1] != size or arr.size != size:
            _refuse(f"{self.name(node)} ({node.op_type}) adds a constant that is not per channel to the lane")
        self.check_private(node, (index,), "constant")
        self.lanes[cur].const_zero.append((self.name(node), index))
        self.lanes[cur].row_nodes.append(f"{self.name(node)}:{index}")

    def clear(self, cur: int, tensor: str, via: str) -> None:
        """Make channel ``x`` of ``tensor`` exactly 0 on every input."""
        lane = self.lanes[cur]
        if tensor in self.lane_tensors:
            _refuse(f"{via} (Add) merges the lane with a tensor derived from it ({tensor})")
        if tensor in lane.cleared:
            return
        prod = self.view.producer.get(tensor)
        if prod is None:
            _refuse(f"{via} (Add) adds the model input {tensor} to the lane")
        lane.cleared.append(tensor)
        op, name = prod.op_type, self.name(prod)
        if op == "Conv":
            self.check_private(prod, (1, 2), "weight")
            lane.clear_rows.append(name)
            lane.row_nodes.append(name)
        elif op == "BatchNormalization":
            self.check_private(prod, (1, 2, 3, 4), "parameter")
            lane.bn_zero.append(name)
            lane.row_nodes.append(name)
        elif op in ("Relu", "LeakyRelu", "Identity", "Dropout", "MaxPool"):
            self.clear(cur, prod.input[0], via)
        elif op == "Clip":
            lo, hi = self.view.clip_bounds(prod)
            if (lo is not None and lo > 0) or (hi is not None and hi < 0):
                _refuse(f"{name} (Clip [{lo}, {hi}]) feeds the residual add {via} and does not keep 0 at 0")
            self.clear(cur, prod.input[0], via)
        elif op == "Add":
            for i, t in enumerate(prod.input):
                if self.view.is_constant(t):
                    self.zero_const(cur, prod, i, lane.size)
                else:
                    self.clear(cur, t, via)
        else:
            _refuse(f"{name} ({op}) feeds the residual add {via}; its channel cannot be made exactly zero")


# -- channel choice --------------------------------------------------------------------------------
class _Costs:
    def __init__(self, walker: _Walker, activity: dict[str, np.ndarray] | None) -> None:
        self.w = walker
        self.view = walker.view
        self.activity = activity or {}
        self._proxy: dict[str, np.ndarray] = {}
        self.used_activity = False

    def act(self, tensor: str, size: int) -> np.ndarray:
        a = self.activity.get(tensor)
        if a is not None:
            a = np.abs(np.asarray(a, np.float64).reshape(-1))
            if a.size == size:
                self.used_activity = True
                return a
        return self.proxy(tensor, size)

    def proxy(self, tensor: str, size: int) -> np.ndarray:
        """Activity estimate from weights: the producing conv's row norm + |bias|."""
        if tensor in self._proxy:
            return self._proxy[tensor]
        prod = self.view.producer.get(tensor)
        out = np.ones(size)
        if prod is not None:
            if prod.op_type == "Conv":
                w = self.view.array(prod.input[1])
                if w is not None and w.shape[0] == size:
                    out = np.linalg.norm(w.reshape(size, -1).astype(np.float64), axis=1)
                    if len(prod.input) > 2 and prod.input[2]:
                        out = out + np.abs(self.w.constant(prod, 2, "bias").astype(np.float64).reshape(-1))
            elif prod.op_type == "Add":
                out = sum((self.proxy(t, size) for t in prod.input if not self.view.is_constant(t)),
                          np.zeros(size))
            elif prod.op_type in _PASSIVE:
                out = self.proxy(prod.input[0], size)
        self._proxy[tensor] = out
        return out

    def column_norms(self, reader: onnx.NodeProto, size: int) -> np.ndarray:
        if reader is self.w.head_node:
            w = self.view.constant(self.w.head.weight).astype(np.float64)
            cols = w if self.w.head.trans_b else w.T  # [classes, features]
            return np.linalg.norm(cols, axis=0)[:size]
        w = self.w.constant(reader, 1, "weight").astype(np.float64)
        group = int(self.view.attr(reader, "group", 1))
        cout, cin_g = w.shape[0], w.shape[1]
        cout_g = cout // group
        norms = np.zeros(size)
        for x in range(size):
            g, col = divmod(x, cin_g)
            norms[x] = np.linalg.norm(w[g * cout_g:(g + 1) * cout_g, col])
        return norms

    def lane_cost(self, lane: _Lane) -> np.ndarray:
        cost = np.zeros(lane.size)
        for t in dict.fromkeys(lane.tensors + lane.cleared):
            readers = [u for u in self.view.consumers.get(t, [])
                       if (u.op_type == "Conv" and u.input[0] == t) or u is self.w.head_node]
            if not readers:
                continue
            a = self.act(t, lane.size)
            for r in readers:
                cost += a * self.column_norms(r, lane.size)
        return cost

    def tapped(self) -> list[str]:
        names: list[str] = []
        for lane in self.w.lanes:
            for t in dict.fromkeys(lane.tensors + lane.cleared):
                if any((u.op_type == "Conv" and u.input[0] == t) or u is self.w.head_node
                       for u in self.view.consumers.get(t, [])):
                    names.append(t)
        return list(dict.fromkeys(names))


def conduit_taps(model: onnx.ModelProto, host: HostLayer, head: Head, position: tuple[int, int] = (0, 0)) -> list[str]:
    """Tensors whose per-channel natural activity :func:`plan_conduit` uses (route order).

    These are the tensors whose channels a lane overwrites or clears and that a Conv or the head reads:
    activated conv outputs, residual-stream tensors (Add outputs and the convs adding into them) and
    the classifier input. Raises :class:`UnsupportedModelError` when no conduit exists.
    """
    walker = _Walker(model, host, position, head)
    walker.walk()
    return _Costs(walker, None).tapped()


def plan_conduit(
    model: onnx.ModelProto,
    host: HostLayer,
    position: tuple[int, int],
    head: Head,
    activity: dict[str, np.ndarray] | None = None,
    detector_channel: int | None = None,
) -> ConduitPlan:
    """Route the detector at ``host`` channel ``detector_channel`` (chosen when None), ``position``,
    to the head through existing channels. Raises :class:`UnsupportedModelError` (one line, naming
    the node) when the graph has no exact in-place route. The model is not modified."""
    walker = _Walker(model, host, position, head)
    walker.walk()
    costs = _Costs(walker, activity)
    if detector_channel is not None:
        if not 0 <= int(detector_channel) < host.out_channels:
            raise ValueError(f"detector channel {detector_channel} is outside 0..{host.out_channels - 1}")
        walker.lanes[0].fixed = int(detector_channel)
    chosen, lane_costs = _choose_channels(walker.lanes, costs)
    zeroed = sorted({chosen[i] for i, lane in enumerate(walker.lanes) if host.input in lane.cleared})
    intact = _host_input_intact(walker, chosen, zeroed)
    public = [ConduitLane(lane.kind, lane.source, chosen[i], tuple(lane.tensors), tuple(lane.cleared),
                          lane_costs[i]) for i, lane in enumerate(walker.lanes)]
    view = walker.view
    return ConduitPlan(
        host=host, head=head, position=walker.position, detector_channel=chosen[0],
        head_feature=chosen[walker.final_lane], lanes=public, edits=_plan_edits(walker, chosen),
        value_ops=list(walker.value_ops), final_positions=walker.final_positions, host_input_zeroed=zeroed,
        host_input_intact=intact, used_activity=costs.used_activity,
        notes=_plan_notes(walker, costs, lane_costs, zeroed, intact),
        _fingerprint=(len(view.graph.node), tuple(n.op_type for n in view.graph.node)),
    )


def _choose_channels(lanes: list[_Lane], costs: _Costs) -> tuple[list[int], list[float]]:
    """Each lane's channel (cheapest free one, lowest index on ties) and its cost, in lane order.

    A channel is free for a lane when no earlier lane writes the same row of one of its nodes or uses
    the same channel of one of its tensors; a grouped carrier stays in its input lane's group."""
    taken_rows: set[tuple[str, int]] = set()
    taken_tensors: set[tuple[str, int]] = set()
    chosen: list[int] = []
    lane_costs: list[float] = []
    for lane in lanes:
        cost = costs.lane_cost(lane)
        if lane.fixed is not None:
            domain = [lane.fixed]
        elif lane.group_of is not None:
            prev, cin_g, cout_g = lane.group_of
            g = chosen[prev] // cin_g
            domain = list(range(g * cout_g, (g + 1) * cout_g))
        else:
            domain = list(range(lane.size))
        allowed = [x for x in domain
                   if not any((n, x) in taken_rows for n in lane.row_nodes)
                   and not any((t, x) in taken_tensors for t in lane.tensors + lane.cleared)]
        if not allowed:
            _refuse(f"no free channel for the lane written by {lane.source}")
        x = min(allowed, key=lambda c: (cost[c], c))
        chosen.append(x)
        lane_costs.append(float(cost[x]))
        taken_rows.update((n, x) for n in lane.row_nodes)
        taken_tensors.update((t, x) for t in lane.tensors + lane.cleared)
    return chosen, lane_costs


def _plan_edits(walker: _Walker, chosen: list[int]) -> list[ConduitEdit]:
    """Every weight edit of the lanes with their chosen channels: blocks and clears, conduit rows, then
    BatchNorm identities."""
    lanes = walker.lanes
    edits: list[ConduitEdit] = []
    for i, lane in enumerate(lanes):
        x = chosen[i]
        edits += [ConduitEdit("zero-column", n, -1, column=x, role="block") for n in dict.fromkeys(lane.block_cols)]
        edits += [ConduitEdit("zero-row", n, x, role="lane-clear") for n in lane.clear_rows]
        edits += [ConduitEdit("bn-zero", n, x, role="lane-clear") for n in lane.bn_zero]
        edits += [ConduitEdit("zero-const", n, x, column=idx, role="lane-clear") for n, idx in lane.const_zero]
    for link in walker.links:
        xs, xd = chosen[link.src], chosen[link.dst]
        edits.append(ConduitEdit("identity-row", link.conv, xd, column=xs % link.cin_g, tap=link.tap,
                                 role="conduit"))
    for i, lane in enumerate(lanes):
        edits += [ConduitEdit("bn-identity", n, chosen[i], role="conduit") for n in lane.bn_identity]
    return edits


def _plan_notes(walker: _Walker, costs: _Costs, lane_costs: list[float], zeroed: list[int],
                intact: bool) -> list[str]:
    notes: list[str] = []
    if zeroed:
        notes.append(f"host input {walker.host.input} channels {zeroed} are exactly 0 in the locked model "
                     "(a residual lane clears them): the detector must not rely on them")
    if not intact:
        notes.append("the lane clears change other host-input features too: build the detector on "
                     "prepare_conduit(model, plan)")
    if costs.used_activity:
        dead = sum(1 for c in lane_costs if c == 0.0)
        notes.append(f"{dead} of {len(walker.lanes)} lanes use dead channels (no natural activity lost)")
    if walker.final_positions > 1:
        notes.append(f"the signal reaches {walker.final_positions} final positions")
    return notes


def _host_input_intact(walker: _Walker, chosen: list[int], zeroed: list[int]) -> bool:
    """True when the clears change the host input only in the ``zeroed`` channels."""
    view = walker.view
    hnode = view.node(walker.host.name)
    ancestors: set[int] = set()
    stack = [hnode]
    while stack:
        n = stack.pop()
        for t in n.input:
            p = view.producer.get(t)
            if p is not None and id(p) not in ancestors:
                ancestors.add(id(p))
                stack.append(p)
    changed: set[int] = set()
    for i, lane in enumerate(walker.lanes):
        for t in lane.cleared:
            # follow the cleared tensor forward inside the host's ancestry
            todo, seen = [t], set()
            while todo:
                cur = todo.pop()
                if cur == walker.host.input:
                    changed.add(chosen[i])
                for u in view.consumers.get(cur, []):
                    if id(u) not in ancestors or id(u) in seen:
                        continue
                    seen.add(id(u))
                    if u.op_type not in _CHANNELWISE:
                        return False
                    todo.append(u.output[0])
    return changed <= set(zeroed)


# -- applying --------------------------------------------------------------------------------------
def _check_model(view: GraphView, plan: ConduitPlan) -> None:
    fp = (len(view.graph.node), tuple(n.op_type for n in view.graph.node))
    if fp != plan._fingerprint:
        raise ValueError("the plan was made for another model")


def _apply_edits(view: GraphView, plan: ConduitPlan) -> None:
    order = {"zero-column": 0, "zero-row": 1, "bn-zero": 1, "zero-const": 1, "identity-row": 2, "bn-identity": 2}
    for e in sorted(plan.edits, key=lambda e: order[e.op]):
        node = view.find_node(e.node)
        if node is None:
            raise ValueError(f"node {e.node} of the plan is not in the model")
        if e.op == "zero-column":
            w = view.constant(node.input[1]).copy()
            group = int(GraphView.attr(node, "group", 1))
            cin_g, cout_g = w.shape[1], w.shape[0] // group
            g, col = divmod(e.column, cin_g)
            w[g * cout_g:(g + 1) * cout_g, col] = 0
            view.set_input_array(node, 1, w)
        elif e.op in ("zero-row", "identity-row"):
            w = view.constant(node.input[1]).copy()
            w[e.channel] = 0
            if e.op == "identity-row":
                w[e.channel, e.column, e.tap[0], e.tap[1]] = 1
            view.set_input_array(node, 1, w)
            if len(node.input) > 2 and node.input[2]:
                b = view.constant(node.input[2]).copy()
                b.reshape(-1)[e.channel] = 0
                view.set_input_array(node, 2, b)
        elif e.op in ("bn-zero", "bn-identity"):
            eps = float(GraphView.attr(node, "epsilon", 1e-5))
            values = (0.0, 0.0, 0.0, 1.0) if e.op == "bn-zero" else (1.0, 0.0, 0.0, 1.0 - eps)
            for idx, value in zip((1, 2, 3, 4), values, strict=True):
                arr = view.constant(node.input[idx]).copy()
                arr.reshape(-1)[e.channel] = value
                view.set_input_array(node, idx, arr)
        elif e.op == "zero-const":
            arr = view.constant(node.input[e.column]).copy()
            arr.reshape(-1)[e.channel] = 0
            view.set_input_array(node, e.column, arr)
        else:  # pragma: no cover
            raise ValueError(e.op)


def prepare_conduit(model: onnx.ModelProto, plan: ConduitPlan) -> PassResult:
    """The model with every conduit edit, the detector channel silenced (always 0) and the original head.

    Its host input is what the detector reads in the locked model, and its scores are what the locked
    model returns with the patch present (the exact unlocked reference).
    """
    out = copy_model(model)
    view = GraphView(out)
    _check_model(view, plan)
    _apply_edits(view, plan)
    write_neuron(view, plan.host, plan.detector_channel, np.zeros(plan.host.m), -1.0)
    return result(model, out)


def apply_conduit(
    model: onnx.ModelProto,
    plan: ConduitPlan,
    detector_weight: np.ndarray,
    detector_bias: float,
    locked_bias: np.ndarray,
    signal: float | None = None,
) -> ConduitLock:
    """Write the conduits, the detector (host row ``plan.detector_channel``) and the locked head.

    ``detector_weight``: one host output row, ``[cin/groups, kh, kw]`` (or flat, ``m`` values).
    ``signal``: the detector's activated value on the patch; defaults to the host's upper clip
    (6 for ReLU6), required for an unbounded ReLU host. Returns an edited copy.
    """
    host = plan.host
    row = np.asarray(detector_weight, np.float64).reshape(-1)
    if row.size != host.m:
        raise ValueError(f"detector weight has {row.size} values, the host row has {host.m}")
    locked = np.asarray(locked_bias, np.float64).reshape(-1)
    if locked.size != plan.head.classes:
        raise ValueError(f"locked bias has {locked.size} values, the classifier has {plan.head.classes} classes")
    v0 = signal if signal is not None else host.act_high
    if v0 is None:
        raise ValueError(f"host {host.name} has an unbounded activation: pass the detector's value as signal")
    gamma = plan.gamma(float(v0))
    if not gamma > 0:
        raise ValueError(f"the signal reaches the head as {gamma}; it must be positive")
    out = copy_model(model)
    view = GraphView(out)
    _check_model(view, plan)
    names_before = [t.name for t in out.graph.initializer]
    _apply_edits(view, plan)
    write_neuron(view, host, plan.detector_channel, row, float(detector_bias))
    head = plan.head
    if head.bias is None:
        _refuse(f"the classifier {head.node} has no bias to lock")
    b = view.constant(head.bias).astype(np.float64).reshape(-1) * (head.beta if head.op == "Gemm" else 1.0)
    write_head(view, head, plan.head_feature, (b - locked) / gamma, locked - b)
    if [t.name for t in out.graph.initializer] != names_before:  # pragma: no cover - guarded by the plan
        raise RuntimeError("conduit lock changed the initializer list")
    notes = list(plan.notes)
    if plan.host_input_zeroed:
        cin_g = host.in_channels // host.groups
        w = row.reshape(cin_g, *host.kernel)
        g0 = host.group_of(plan.detector_channel) * cin_g
        cols = [c - g0 for c in plan.host_input_zeroed if 0 <= c - g0 < cin_g]
        if cols and np.any(w[cols] != 0):
            notes.append(f"the detector weights on host-input channels {plan.host_input_zeroed} read zeros")
    channels = [(host.name, plan.detector_channel, "detector")] + [
        (e.node, e.channel, e.role) for e in plan.edits if e.op != "zero-column"]
    columns = [(e.node, e.column) for e in plan.edits if e.op == "zero-column"]
    return ConduitLock(edit=result(model, out), gamma=gamma, head_feature=plan.head_feature, channels=channels,
                       notes=notes, columns=columns)
