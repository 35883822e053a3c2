"""Which layer hosts a stain's detector: the classifier stain's choice (routable in place, or the
deepest usable layer; a detector head's smallest margin), the dense stain's (token layers and
convolutions with a known map), and the refusals that come before any work."""

from __future__ import annotations

from .._onnx import head as head_mod
from .._onnx.graph import GraphView
from .._onnx.hosts import MIN_DIMENSION, HostLayer, why_unusable
from ..calibration import margin_ratio
from ..errors import BadInputError, UnsupportedModelError
from ..math import bounds
from .result import Mode, StainOptions


def choose_host(hosts: list[HostLayer], view: GraphView, head: head_mod.Head, mode: Mode,
                layer: str | None) -> HostLayer:
    if mode == "inplace" and not head.linear:
        what = ("this is a detector (per-anchor class scores): its class head"
                if head.detection else f"the classifier {head.node} is a Conv followed by global pooling: it")
        raise UnsupportedModelError(
            f"{what} is not a Gemm or MatMul classifier of pooled features, so the stain cannot be routed through "
            "existing channels in place; use --mode insert")
    if layer is not None:
        return _named_host(hosts, view, head, mode, layer)
    usable = [h for h in hosts if h.usable and not h.token_layer]
    if not usable:
        raise UnsupportedModelError("the model has no usable host layer (a Conv, Gemm or MatMul+Add followed by "
                                    "ReLU, ReLU6, LeakyReLU, PReLU, HardSwish, SiLU, GELU or Mish, with at least "
                                    f"{MIN_DIMENSION} inputs per neuron): " + why_unusable(hosts))
    if mode == "inplace":
        usable = _routable_exact(usable, view, head)
    if head.detection:
        # A detector's deepest layers are narrow and 1×1 (a hard margin): take the layer that needs the
        # smallest margin for the bound, the deeper one on ties.
        return min(usable, key=lambda h: (round(margin_ratio(h), 2), -h.depth))
    return max(usable, key=lambda h: (h.depth, h.m))


def _named_host(hosts: list[HostLayer], view: GraphView, head: head_mod.Head, mode: Mode, layer: str) -> HostLayer:
    """``--layer NAME``: that layer, or the reason it cannot host this stain."""
    match = [h for h in hosts if h.name == layer]
    if not match:
        raise BadInputError(f"no layer named {layer!r} (see `onnxstain inspect`)")
    host = match[0]
    if not host.usable:
        raise UnsupportedModelError(f"layer {layer!r} cannot host a detector: {host.reason}")
    if host.token_layer:
        raise UnsupportedModelError(
            f"layer {layer!r} is a MatMul over tokens (its input is not [batch, features]): classifier stains "
            "need a Conv, Gemm or [batch, features] MatMul host (token hosts serve dense-output models in "
            "--mode insert)")
    if mode == "inplace" and host.inplace_reason:
        raise UnsupportedModelError(f"layer {layer!r} cannot host an in-place detector: {host.inplace_reason}")
    if mode == "inplace":
        route, why = head_mod.direct_route(view, host, head)
        if route is None:
            raise UnsupportedModelError(f"cannot route layer {layer!r} to the output in place: {why}; "
                                        "use --mode insert")
    return host


def _routable_exact(usable: list[HostLayer], view: GraphView, head: head_mod.Head) -> list[HostLayer]:
    """In place: the usable layers that reach the classifier through pooling only and edit exactly."""
    routes = {h.name: head_mod.direct_route(view, h, head) for h in usable}
    routable = [h for h in usable if routes[h.name][0] is not None]
    if not routable:
        deepest = max(usable, key=lambda h: h.depth)
        raise UnsupportedModelError("no host layer reaches the classifier through pooling only, so the stain "
                                    f"cannot be routed in place (the deepest, {deepest.name}: "
                                    f"{routes[deepest.name][1]}); use --mode insert")
    exact = [h for h in routable if not h.inplace_reason]
    if not exact:
        raise UnsupportedModelError(f"layer {routable[-1].name!r} reaches the classifier, but its "
                                    f"{routable[-1].inplace_reason}")
    return exact


def check_quantized_weights(view: GraphView, host: HostLayer, head: head_mod.Head, variant: str) -> None:
    """Refuse, before any work, an in-place edit of int8 weights quantized per tensor.

    A per-channel weight takes the edit with a new scale for the edited channel only; a per-tensor
    one would have to re-encode every channel (or saturate), so it is refused with the ways out.
    """
    edited = [("host layer", host.weight)]
    if variant == "non-additive":
        edited.append(("classifier", head.weight))
    for what, tensor in edited:
        if view.is_quantized(tensor) and not view.quantized(tensor).per_axis:
            raise UnsupportedModelError(
                f"the {what} weight {tensor!r} is int8 quantized per tensor: an in-place stain needs per-channel "
                "scales; quantize with per_channel=True, use --mode insert, or stain the float model and "
                "quantize afterwards")


def easier_layers(hosts: list[HostLayer], opts: StainOptions) -> str:
    """Which layers need the smallest margin ratio τ0/R for this target (higher m, fewer positions)."""
    needs = []
    for h in hosts:
        if h.usable:
            ratio = bounds.threshold_for_target(opts.fpr, 1.0, h.m, positions=h.positions, draws=opts.max_draws)
            needs.append((ratio, h.name, h.m))
    needs.sort()
    best = ", ".join(f"{name} (m={m}, needs τ0/R={ratio:.2f})" for ratio, name, m in needs[:3])
    return f"layers that need the smallest margin for this target: {best}; or ask for a larger --fpr"


# -- dense outputs -------------------------------------------------------------------------------------
def refuse_dense_mode(opts: StainOptions) -> None:
    if opts.mode != "insert":
        raise UnsupportedModelError(
            "this model has a dense output and no classifier head: the in-place stain writes its signature into "
            "a classifier's weights, and a dense output has none to carry it (the detector would have to be "
            "routed through the decoder, which has no exact route); use --mode insert, which adds a secret "
            "pattern to the output map on the trigger only")
    if opts.variant == "additive":
        raise UnsupportedModelError("dense-output models take the non-additive inserted stain only "
                                    "(--variant non-additive)")


def dense_hosts(hosts: list[HostLayer]) -> list[HostLayer]:
    """Hosts a dense-output model's inserted detector can read: token layers (``MatMul + Add`` on
    ``[B, T, m]``) and convolutions with a known output size."""
    return [h for h in hosts if h.usable and (h.op == "MatMul" or (h.op == "Conv" and h.out_hw is not None))]


def choose_dense_host(hosts: list[HostLayer], layer: str | None) -> HostLayer:
    usable = dense_hosts(hosts)
    if layer is not None:
        match = [h for h in hosts if h.name == layer]
        if not match:
            raise BadInputError(f"no layer named {layer!r} (see `onnxstain inspect`)")
        if match[0] not in usable:
            raise UnsupportedModelError(f"layer {layer!r} cannot host a detector: "
                                        f"{match[0].reason or 'not a token layer or a convolution'}")
        return match[0]
    if not usable:
        reasons = sorted({h.reason for h in hosts if h.reason})
        raise UnsupportedModelError(
            "the model has no usable host layer (a Conv, or a MatMul+Add token layer, followed by a ReLU-type "
            f"activation or GELU, with at least {MIN_DIMENSION} inputs per neuron)"
            + (f"; the candidates fail because: {'; '.join(reasons[:3])}" if reasons else ""))
    # The layer that needs the smallest margin τ0/R for the bound, the deeper one on ties (a ViT's token
    # layers all tie). The deepest layer of a CNN decoder is often narrow (CRAFT's last 3×3 Conv: m = 16,
    # τ0/R ≈ 1 over 49,152 positions): its trigger search ran past 10 minutes, each step backpropagating
    # through the whole network, while the backbone's wide layers need τ0/R ≈ 0.1.
    return min(usable, key=lambda h: (round(margin_ratio(h), 2), -h.depth))
