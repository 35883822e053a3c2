"""The gate lock's pixel-window detector: a few raw pixels in the image corner (ONNX facts, no math).

A gate lock inserts its detector, so the detector need not be one of the model's neurons: it can
read the image itself, where the model's first Conv reads it. A ``side × side`` window of the
top-left corner, all channels, gives ``m = 3·side²`` inputs (``side²`` on a grey model) at one
position (the inserted Conv's stride is the image size: it runs at the corner and nowhere else, so
the patch moved or in another corner does not open the lock). Two things follow, in
:mod:`onnxstain.math.bounds` (``box_ball``, ``window_side``):

* every 8-bit image maps into a box of input values, so the radius around the box's centre is
  certified for every input: the bound is data-free (no calibrated radius);
* the trigger is the box corner that maximises ``v · x`` (closed form), and for a random ``v`` its
  margin ``max v · (x − c) / R`` concentrates near √(2/π) ≈ 0.80, so a 5×5 window (m = 75) meets a
  1e-6 bound. The patch covers 25 pixels instead of a Conv position's whole receptive field (38×38
  on MobileNetV2), which is what the original model pays for the patch.

Both need each window coordinate to be a monotone function of one pixel channel: the Conv's input
must come from the model input through per-element ops only (:func:`pixel_path`: casts, transposes,
arithmetic with constants, quantize/dequantize — a preprocessing inside the graph, as in the SSD).
The box and the patch are then read off the model itself with a few probe images
(:func:`probe_window`), whatever the layout, channel order or scaling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from .._onnx.graph import GraphView
from .._onnx.hosts import HostLayer, ReceptiveField, pad_amounts
from ..patch import Patch

WINDOW = "pixels"  # the host name of the pixel-window detector (``--layer pixels``)
# Per-element ops a pixel may pass through on its way to the first Conv: each output element is a
# monotone function of one input element (the other operands are constants).
_PER_ELEMENT = {"Cast", "Identity", "Transpose", "Mul", "Add", "Sub", "Div", "QuantizeLinear", "DequantizeLinear"}


def pixel_path(view: GraphView, tensor: str) -> bool:
    """Whether ``tensor`` is computed from the model input by per-element monotone ops only."""
    inputs = {i.name for i in view.graph_inputs}
    t = tensor
    for _ in range(64):
        if t in inputs:
            return True
        node = view.producer.get(t)
        if node is None or node.op_type not in _PER_ELEMENT:
            return False
        live = [x for x in node.input if x and not view.is_constant(x)]
        if len(live) != 1:
            return False
        if node.op_type in ("Div", "QuantizeLinear", "DequantizeLinear") and live[0] != node.input[0]:
            return False  # c / x is not monotone across 0; scales and zero points must be the constants
        t = live[0]
    return False


def pixel_conv(view: GraphView, hosts: list[HostLayer], height: int, width: int,
               channels: int = 3) -> HostLayer | None:
    """The Conv that reads the image (``channels`` channels at the model's input size: 3, or 1 for a grey
    model) through per-element ops, as a
    host reading the image itself: a zero ``Pad`` right before it (TensorFlow "same" padding as tf2onnx
    writes it) is skipped, the window reading the image's own corner pixels."""
    for h in hosts:
        if h.op != "Conv" or h.in_channels != channels or h.groups != 1 or h.in_hw is None:
            continue
        source, grown = _unpadded(view, h.input)
        if (h.in_hw[0] - grown[0], h.in_hw[1] - grown[1]) == (height, width) and pixel_path(view, source):
            return h if source == h.input else dataclasses.replace(h, input=source, in_hw=(height, width))
    return None


def _unpadded(view: GraphView, tensor: str) -> tuple[str, tuple[int, int]]:
    """``tensor``'s source before a constant-zero spatial ``Pad`` of an NCHW map, and how much the Pad
    grew its height and width; ``tensor`` itself and (0, 0) otherwise."""
    node = view.producer.get(tensor)
    if node is None or node.op_type != "Pad":
        return tensor, (0, 0)
    mode = view.attr(node, "mode", b"constant")
    pads = pad_amounts(view, node)
    value = view.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if (mode not in (b"constant", "constant") or pads is None or len(pads) != 8 or any(p < 0 for p in pads)
            or any(pads[i] for i in (0, 1, 4, 5)) or (value is not None and np.any(np.asarray(value) != 0))
            or view.attr(node, "value", 0.0) != 0.0):
        return tensor, (0, 0)
    return node.input[0], (pads[2] + pads[6], pads[3] + pads[7])


def window_host(conv: HostLayer, side: int) -> HostLayer:
    """A ``side × side`` detector on ``conv``'s input (the image), at the top-left corner only."""
    assert conv.in_hw is not None
    height, width = conv.in_hw
    return dataclasses.replace(
        conv, name=WINDOW, kernel=(side, side), strides=(height, width), pads=(0, 0, 0, 0), dilations=(1, 1),
        groups=1, out_hw=(1, 1), receptive_field=ReceptiveField((side, side), (height, width),
                                                                ((side - 1) / 2, (side - 1) / 2)),
        usable=True, reason="")


@dataclasses.dataclass(frozen=True)
class WindowProbe:
    """What 8-bit pixels can do to the window: per coordinate the lowest and highest value, and the
    change each patch pixel-channel makes (0 → 255) to each coordinate. A grey model's patch pixels are
    grey (R = G = B): each probe moves a pixel's three channels together."""

    lo: np.ndarray  # [m]
    hi: np.ndarray  # [m]
    effect: np.ndarray  # [side·side·c, m], rows in patch order (row, col, channel); c = 1 when grey
    side: int


def probe_window(phi_of: Callable[[np.ndarray], np.ndarray], side: int, height: int, width: int,
                 grey: bool = False) -> WindowProbe | None:
    """Probe the window with a black, a white and one image per patch pixel-channel (255 on black; per
    pixel, all three channels, when ``grey``).

    ``phi_of`` maps uint8 images ``[N, H, W, 3]`` to the window's input vectors ``[N, 1, m]``. None if
    some coordinate does not follow exactly one of the patch's pixel channels (then the window is not
    separable and neither the box nor the closed-form patch applies).
    """
    c = 1 if grey else 3
    n = side * side * c
    images = np.zeros((n + 2, height, width, 3), np.uint8)
    images[1] = 255
    for j in range(n):
        y, x, ch = np.unravel_index(j, (side, side, c))
        images[j + 2, y, x, slice(None) if grey else ch] = 255
    phi = phi_of(images).astype(np.float64)[:, 0]
    effect = phi[2:] - phi[0]
    moved = np.abs(effect) > 1e-6 * max(1.0, float(np.abs(phi).max()))
    if not (moved.sum(axis=0) == 1).all() or not np.allclose(effect.sum(axis=0), phi[1] - phi[0], atol=1e-4):
        return None
    return WindowProbe(lo=np.minimum(phi[0], phi[1]), hi=np.maximum(phi[0], phi[1]), effect=effect, side=side)


def corner_patch(v: np.ndarray, probe: WindowProbe) -> Patch:
    """The 8-bit patch maximising ``v · φ`` over the window: 255 where that pixel channel raises it."""
    gain = probe.effect @ v
    pixels = np.where(gain > 0, 255, 0).astype(np.uint8).reshape(probe.side, probe.side, -1)
    return Patch(np.broadcast_to(pixels, (probe.side, probe.side, 3)).copy(), 0, 0)
