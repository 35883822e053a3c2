"""Where the lock sits: the detector's host and its corner position (the patch's box), and the tensor
the gate scrambles, for classifiers, detectors and dense-output models (ONNX host facts, no search)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .._onnx.graph import GraphView, dominates
from .._onnx.head import head_tail
from .._onnx.hosts import HostLayer, why_unusable
from ..errors import BadInputError, UnsupportedModelError
from ..math import bounds
from ..preprocess import Preprocessing
from .geometry import MAX_PATCH_FRACTION, choose_lock_host, lock_position, patch_box
from .types import LockOptions
from .window import WINDOW, pixel_conv, window_host

# The gate lock's default detector reads a window of raw pixels (:mod:`onnxstain._lock.window`): its
# side is the smallest whose margin for the bound target is at most this fraction of the certified
# radius. A random direction's best 8-bit patch reaches about √(2/π) ≈ 0.80 of it (5th percentile
# 0.76 for a 5×5 window), so nearly every draw passes ACCEPT_FACTOR × the margin.
WINDOW_REACH = 0.68
MIN_GATE_CHANNELS = 8  # a CNN's gate flips half the channels of a map at least this wide


@dataclasses.dataclass(frozen=True)
class LockSite:
    """The detector's host, its lock position ``(row, col)`` in the host's output, that position's
    flat index, and the patch's box ``(top, left, height, width)`` in the model input."""

    host: HostLayer
    position: tuple[int, int]
    pos_index: int
    box: tuple[int, int, int, int]

    @classmethod
    def at(cls, host: HostLayer, pre: Preprocessing) -> LockSite:
        position = lock_position(host)
        assert host.out_hw is not None
        return cls(host, position, position[0] * host.out_hw[1] + position[1],
                   patch_box(host, position, pre.height, pre.width))

    @property
    def window(self) -> bool:
        """Whether the host is a window of raw pixels (its radius certified by the pixel box)."""
        return self.host.name == WINDOW

    def mask(self, height: int, width: int) -> np.ndarray:
        """The patch's pixels, ``[height, width]`` booleans."""
        top, left, ph, pw = self.box
        mask = np.zeros((height, width), bool)
        mask[top : top + ph, left : left + pw] = True
        return mask


def classifier_host(hosts: list[HostLayer], view: GraphView, opts: LockOptions, pre: Preprocessing) -> HostLayer:
    """The detector's host: for the gate lock a window of raw pixels where the model reads the image
    (unless ``--layer`` names a Conv), in place a Conv whose corner position sees the patch."""
    if opts.kind == "gate" and opts.layer in (None, WINDOW):
        conv = pixel_conv(view, hosts, pre.height, pre.width, pre.channels)
        side = None if conv is None else bounds.window_side(
            opts.fpr, conv.in_channels, WINDOW_REACH / np.sqrt(opts.detectors), draws=opts.max_draws,
            detectors=opts.detectors, max_side=int(MAX_PATCH_FRACTION * min(pre.height, pre.width)))
        if conv is not None and side is not None:
            return window_host(conv, side)
        if opts.layer == WINDOW:
            raise UnsupportedModelError(
                "--layer pixels needs a first Conv that reads the image through per-element preprocessing only"
                if conv is None else f"no pixel window small enough for a corner patch reaches --fpr {opts.fpr:g}")
    elif opts.layer == WINDOW:
        raise BadInputError("--layer pixels is the gate lock's detector; the in-place lock needs one of the model's "
                            "Conv layers (see `onnxstain inspect`)")
    if opts.kind == "inplace":  # the conduits carry a rectified signal: the detector needs a ReLU-type host
        rectified = [h for h in hosts if h.relu_like or h.name == opts.layer]
        others = [h for h in hosts if h.usable and h not in rectified]
        if not rectified and others:
            kinds = sorted({h.activation for h in others})
            raise UnsupportedModelError(
                f"the in-place lock carries its signal through the model's own channels, so its detector needs a "
                f"Conv followed by ReLU, ReLU6 or Clip; this model's usable Conv layers are followed by "
                f"{', '.join(kinds)} (e.g. {others[0].name}); use the gate lock (--kind gate)")
        if not rectified:
            raise UnsupportedModelError("no Conv layer can host the in-place lock's detector: " + why_unusable(hosts))
        hosts = rectified
    return choose_lock_host(hosts, opts.layer, pre.height, pre.width)


def dense_host(hosts: list[HostLayer], layer: str | None, height: int, width: int) -> HostLayer:
    """A Conv with a known corner receptive field; its activation does not matter (the detector is inserted)."""
    convs = [h for h in hosts if h.m >= 16]
    if layer is not None:
        match = [h for h in convs if h.name == layer]
        if not match:
            raise BadInputError(f"no Conv layer named {layer!r} with a known receptive field and ≥ 16 inputs")
        return match[0]
    fitting = []
    for h in convs:
        pos = lock_position(h)
        if h.out_hw is None or any(a >= n for a, n in zip(pos, h.out_hw, strict=True)):
            continue
        _, _, ph, pw = patch_box(h, pos, height, width)
        if ph <= MAX_PATCH_FRACTION * height and pw <= MAX_PATCH_FRACTION * width:
            fitting.append(h)
    if not fitting:
        raise UnsupportedModelError("no Conv layer has a corner receptive field small enough for a patch "
                                    f"(≤ {MAX_PATCH_FRACTION:.0%} of the image side)")
    return max(fitting, key=lambda h: (h.m, -h.depth))


def detection_gate(hosts: list[HostLayer], view: GraphView, host: HostLayer, scores: str) -> HostLayer:
    """The Conv whose activated map a detector's gate scrambles: the deepest one that every path from the
    input to the scores passes through. A map a skip connection bypasses is repaired downstream, and the
    first conv is too shallow: on the SSD (held-out, per-image anchor mAP without the patch) the first
    conv's map left 0.12, a residual block's expand map 0.15, the expand map of a block without a skip
    0.015."""
    best = host
    for h in (h for h in hosts if h.usable):
        if h.depth >= best.depth and dominates(view, h.act_output or h.output, scores):
            best = h
    return best


def prediction_inputs(view: GraphView, scores: str) -> list[str]:
    """The maps a detector's last Conv layers read: every Conv whose output reaches ``scores`` through no other
    Conv (a YOLO head's box, objectness and class predictors at each scale), their data inputs in graph order.
    Every path from the image to the scores passes through one of them, so gating them all leaves no branch
    that repairs the outputs downstream (a multi-scale neck bypasses any single backbone map)."""
    return head_tail(view, scores)[1]


def gate_features(view: GraphView, output: str | None = None) -> str:
    """The feature map a dense-output model's gate scrambles. For a transformer, where the token stream
    becomes a map: the data input of the first Conv/ConvTranspose after the last MatMul. For a CNN (no
    MatMul), the input of the deepest Conv that every path to ``output`` goes through and that reads at
    least ``MIN_GATE_CHANNELS`` channels (a U-Net's skip connections bypass every earlier map)."""
    nodes = list(view.graph.node)
    last = max((i for i, n in enumerate(nodes) if n.op_type == "MatMul"), default=None)
    if last is None:
        return _deepest_wide_conv_input(view, output or view.output_names[0])
    for n in nodes[last + 1 :]:
        if n.op_type in ("Conv", "ConvTranspose"):
            return n.input[0]
    raise UnsupportedModelError("no Conv/ConvTranspose between the token layers and the output: nothing to gate")


def _deepest_wide_conv_input(view: GraphView, out: str) -> str:
    shapes = view.resolved().dims
    for n in reversed(list(view.graph.node)):
        if n.op_type not in ("Conv", "ConvTranspose") or n.input[0] not in view.producer:
            continue
        shape = shapes.get(n.input[0])
        wide = shape is not None and len(shape) == 4 and isinstance(shape[1], int) and shape[1] >= MIN_GATE_CHANNELS
        if wide and dominates(view, n.input[0], out):
            return n.input[0]
    raise UnsupportedModelError(f"no Conv reads a map of at least {MIN_GATE_CHANNELS} channels that every path to "
                                f"{out!r} goes through: nothing to gate")


def reads_pixels(view: GraphView, host: HostLayer) -> bool:
    """Whether the host's input is the model input itself (possibly through a float Cast)."""
    t = host.input
    node = view.producer.get(t)
    if node is not None and node.op_type == "Cast":
        t = node.input[0]
    return t in {i.name for i in view.graph_inputs}
