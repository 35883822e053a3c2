"""The gate lock's pixel-window detector: a few raw pixels in the image corner (ONNX facts, no math).

A gate lock inserts its detector, so the detector need not be one of the model's neurons: it can
read the image itself, where the model's first Conv reads it (a normalised NCHW image). A
``side × side`` window of the top-left corner, all channels, gives ``m = 3·side²`` inputs at one
position (the inserted Conv's stride is the image size: it runs at the corner and nowhere else, so
the patch moved or in another corner does not open the lock). Two things follow, in
:mod:`onnxstain.math.bounds` (``box_ball``, ``window_side``):

* every 8-bit image maps into a box of normalised pixel values, so the radius around the box's
  centre is certified for every input: the bound is data-free (no calibrated radius);
* the trigger is the box corner that maximises ``v · x`` (closed form), and for a random ``v`` its
  margin ``max v · (x − c) / R`` concentrates near √(2/π) ≈ 0.80, so a 5×5 window (m = 75) meets a
  1e-6 bound. The patch covers 25 pixels instead of a Conv position's whole receptive field (38×38
  on MobileNetV2), which is what the original model pays for the patch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ._onnx.graph import GraphView
from ._onnx.hosts import HostLayer, ReceptiveField
from .math.trigger import box_maximiser
from .patch import Patch
from .preprocess import Preprocessing

WINDOW = "pixels"  # the host name of the pixel-window detector (``--layer pixels``)


def reads_pixels(view: GraphView, host: HostLayer) -> bool:
    """Whether the host's input is the model input itself (possibly through a float Cast)."""
    t = host.input
    node = view.producer.get(t)
    if node is not None and node.op_type == "Cast":
        t = node.input[0]
    return t in {i.name for i in view.graph_inputs}


def pixel_conv(view: GraphView, hosts: list[HostLayer], pre: Preprocessing) -> HostLayer | None:
    """The Conv that reads the normalised image (NCHW float input), if the model has one."""
    if pre.layout != "NCHW" or pre.dtype == "uint8":
        return None
    for h in hosts:
        if h.op == "Conv" and h.in_hw == (pre.height, pre.width) and h.groups == 1 and reads_pixels(view, h):
            return h
    return None


def window_host(conv: HostLayer, side: int) -> HostLayer:
    """A ``side × side`` detector on ``conv``'s input (the image), at the top-left corner only."""
    assert conv.in_hw is not None
    height, width = conv.in_hw
    return dataclasses.replace(
        conv, name=WINDOW, kernel=(side, side), strides=(height, width), pads=(0, 0, 0, 0), dilations=(1, 1),
        groups=1, out_hw=(1, 1), receptive_field=ReceptiveField((side, side), (height, width),
                                                                ((side - 1) / 2, (side - 1) / 2)),
        usable=True, reason="")


def pixel_box(host: HostLayer, pre: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Per input coordinate of the window, the lowest and highest value an 8-bit image can give."""
    from .features import neuron_inputs

    ends = np.stack([np.zeros((pre.height, pre.width, 3), np.uint8), np.full((pre.height, pre.width, 3), 255,
                                                                              np.uint8)])
    phi = neuron_inputs(host, pre.to_input(ends)).astype(np.float64)[:, 0]  # [2, m]
    return phi.min(axis=0), phi.max(axis=0)


def closed_form_patch(v: np.ndarray, host: HostLayer, pre: Preprocessing, box: tuple[int, int, int, int]) -> Patch:
    """8-bit patch maximising ``v · φ`` at the lock position, for a host reading normalised pixels (NCHW)."""
    top, left, ph, pw = box
    kh, kw = host.kernel
    w = v.reshape(host.in_channels, kh, kw)[:, :ph, :pw]  # model channel order; the scale per channel is > 0
    if pre.channel_order == "BGR":
        w = w[::-1]
    lo, hi = np.zeros_like(w), np.full_like(w, 255.0)
    return Patch(box_maximiser(w, lo, hi).transpose(1, 2, 0).astype(np.uint8), top, left)
