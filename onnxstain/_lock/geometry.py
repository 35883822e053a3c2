"""Where a lock's detector sits and which pixels its patch covers (ONNX host facts, no math)."""

from __future__ import annotations

import onnx

from .._onnx.graph import GraphView
from .._onnx.hosts import HostLayer, find_hosts, why_unusable
from ..errors import BadInputError, UnsupportedModelError

MAX_PATCH_FRACTION = 0.22  # the corner patch may cover at most this fraction of each image side


def lock_position(host: HostLayer) -> tuple[int, int]:
    """The first diagonal output position ``(a, a)`` whose host window lies inside the host's input map.

    At the very corner of a ``k×k`` host most of the window is zero padding: those feature
    coordinates cannot be moved by any patch, so the detector's reach shrinks. One step in (for a
    ``1×1`` host, none) every coordinate is live, and the position still depends only on the pixels
    of its receptive field, which the patch covers entirely.
    """
    out = []
    for pad, stride in ((host.pads[0], host.strides[0]), (host.pads[1], host.strides[1])):
        out.append(-(-pad // stride))  # ceil(pad / stride): first a with a·stride − pad ≥ 0
    return out[0], out[1]


def patch_box(host: HostLayer, position: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the in-image receptive field of the host's output ``position``."""
    assert host.receptive_field is not None
    top, left, bottom, right = host.receptive_field.box(*position, height, width)
    return top, left, bottom - top + 1, right - left + 1


def lock_hosts(model: onnx.ModelProto, view: GraphView | None = None) -> list[HostLayer]:
    """Candidate detector hosts for a lock: the model's Conv layers with a known receptive field.

    (A 1×1 detector on a Conv's activated output — 384 inputs instead of 64 on MobileNetV2's
    ``features.8`` — was tried for the gate lock: random directions reach only 0.5–0.8 of the
    margin there, because the ReLU6 output is a cone, against about one direction in ten for the
    Conv's input.)
    """
    return [h for h in find_hosts(model, view) if h.op == "Conv" and h.receptive_field is not None and h.out_hw]


def choose_lock_host(hosts: list[HostLayer], layer: str | None, height: int, width: int) -> HostLayer:
    convs = [h for h in hosts if h.op == "Conv" and h.receptive_field is not None and h.out_hw]
    if layer is not None:
        match = [h for h in convs if h.name == layer]
        if not match:
            raise BadInputError(f"no Conv layer named {layer!r} with a known receptive field (see `onnxstain inspect`)")
        if not match[0].usable:
            raise UnsupportedModelError(f"layer {layer!r} cannot host a detector: {match[0].reason}")
        return match[0]
    fitting = []
    for h in convs:
        if not h.usable:
            continue
        if h.out_hw is None or any(a >= n for a, n in zip(lock_position(h), h.out_hw, strict=True)):
            continue
        _, _, ph, pw = patch_box(h, lock_position(h), height, width)
        if ph <= MAX_PATCH_FRACTION * height and pw <= MAX_PATCH_FRACTION * width:
            fitting.append(h)
    if not fitting:
        usable = [h for h in convs if h.usable]
        why = (f"{len(usable)} Conv layer(s) could host one, but none has a corner receptive field small enough "
               f"for a patch (≤ {MAX_PATCH_FRACTION:.0%} of the image side)") if usable else (
            "no Conv layer can host a detector: " + why_unusable(convs or hosts))
        raise UnsupportedModelError(why)
    return max(fitting, key=lambda h: (h.m, h.depth))
