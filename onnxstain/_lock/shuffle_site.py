"""Where the shuffle lock reorders channels (ONNX facts, no math).

The layer must be a **cut** of the graph: every path from the image to the protected output passes through
its output, so no skip connection carries the unshuffled signal around it (a residual block's own Conv is not
one: MobileNetV2 still agreed 68 % with its shuffled `features.10` projection). Among the ungrouped Convs that
are cuts and have enough channels for the bound, the one in the middle of the network (by depth) is chosen:
deep enough that the first layers' features do not single the blocks out, early enough that a search over the
order has the rest of the network to run for every guess.
"""

from __future__ import annotations

import dataclasses

from .._onnx import head as head_mod
from .._onnx.graph import GraphView
from .._onnx.hosts import HostLayer
from ..errors import UnsupportedModelError
from ..math import shuffle as shuffle_math
from ..passes.shuffle import MIN_OPSET
from ..preprocess import Preprocessing
from .window import pixel_conv

SIDE = 5  # the corner window: 5×5 pixels, 75 sort keys on a colour model (25 on a grey one), as the gate's patch

_NO_VALUES = {"Shape", "Size"}  # outputs that carry no pixel value (an exporter's dynamic reshapes read them)


def is_cut(view: GraphView, tensor: str, outputs: list[str]) -> bool:
    """Whether every path from the graph's inputs to ``outputs`` passes through ``tensor``."""
    reached = {i.name for i in view.graph_inputs}
    for node in view.graph.node:  # topological order
        if node.op_type in _NO_VALUES:
            continue
        if any(i in reached for i in node.input if i) and tensor not in node.output:
            reached.update(o for o in node.output if o)
    return not any(o in reached for o in outputs)


def read_point(host: HostLayer) -> str:
    """The tensor the reordering is read back at: after the layer's activation when that activation treats every
    channel alike (it commutes with the order), so that the layer and its activation stay one pattern for
    onnxruntime's fusions and a static quantiser's Conv + activation pairs; else the layer's own output (a
    PReLU's slopes are per channel)."""
    if host.act_output is not None and host.activation != "prelu":
        return host.act_output
    return host.output


def shuffle_layers(view: GraphView, hosts: list[HostLayer], outputs: list[str], min_channels: int,
                   first: HostLayer | None) -> list[HostLayer]:
    """The layers the shuffle can reorder, shallowest first: ungrouped Convs with at least ``min_channels``
    output channels, past the image's first Conv ``first``, whose output (and :func:`read_point`) is a cut
    before ``outputs`` and is not itself a graph output."""
    found = []
    for h in sorted(hosts, key=lambda h: h.depth):
        if (h.op != "Conv" or h.groups != 1 or h.out_channels < min_channels or h.output in view.output_names
                or (first is not None and h.name == first.name)):
            continue
        if is_cut(view, h.output, outputs) and is_cut(view, read_point(h), outputs):
            found.append(h)
    return found


def choose_shuffle_layer(layers: list[HostLayer], name: str | None = None) -> HostLayer | None:
    """``name`` when given (None if it is not one of ``layers``), else the middle one by depth."""
    if name is not None:
        return next((h for h in layers if h.name == name), None)
    return layers[len(layers) // 2] if layers else None


@dataclasses.dataclass(frozen=True)
class ShuffleSite:
    """Where a shuffle lock goes: the first Conv (its input's corner is the patch), the layer it reorders, and
    the blocks of ``group`` channels it stores out of order."""

    first: HostLayer
    layer: HostLayer
    blocks: int
    group: int


def shuffle_site(view: GraphView, hosts: list[HostLayer], head: head_mod.Head, pre: Preprocessing, fpr: float,
                 layer_name: str | None = None) -> ShuffleSite:
    """The shuffle lock's site in this model, or :class:`UnsupportedModelError` saying why it has none (whether
    reordering the layer locks the model is measured on the calibration images when the lock runs). ``hosts``:
    the model's host layers (:func:`onnxstain._onnx.hosts.find_hosts`)."""
    if view.opset() < MIN_OPSET:
        raise UnsupportedModelError(f"the shuffle lock needs opset {MIN_OPSET} or later (GatherElements); this "
                                    f"model has opset {view.opset()}: use --kind gate, or upgrade the model")
    hosts = [h for h in hosts if h.op == "Conv"]
    first = pixel_conv(view, hosts, pre.height, pre.width, pre.channels)
    if first is None:
        raise UnsupportedModelError("the shuffle lock reads its patch where the model's first Conv reads the "
                                    "image, and this model reaches its first Conv through more than per-pixel "
                                    "preprocessing: use --kind gate")
    keys = pre.channels * SIDE * SIDE
    need = shuffle_math.blocks_for(fpr, keys)
    if need > keys:
        raise UnsupportedModelError(f"a {SIDE}x{SIDE} corner holds {keys} sort keys, too few for --fpr {fpr:g}")
    layer = choose_shuffle_layer(shuffle_layers(view, hosts, [head.output, head.scores], need, first), layer_name)
    if layer is None:
        raise UnsupportedModelError(
            f"--layer {layer_name} is not a layer the shuffle lock can reorder (an ungrouped Conv with at least "
            f"{need} channels that every path to the output passes through)" if layer_name else
            f"no layer to reorder: the shuffle lock needs an ungrouped Conv with at least {need} output channels "
            "that every path to the output passes through (no skip connection around it); use --kind gate")
    plan = shuffle_math.plan_blocks(layer.out_channels, keys, need)
    assert plan is not None  # the layer has at least ``need`` channels
    return ShuffleSite(first, layer, *plan)
