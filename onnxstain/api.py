"""The stable public API. Everything else in the package is internal."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ._onnx import head as head_mod
from ._onnx.graph import GraphView
from ._onnx.hosts import find_hosts
from ._onnx.inputs import image_input
from ._onnx.io import load_model
from .evaluate import EvaluateResult, evaluate
from .keys import Key, load_key
from .math import bounds
from .stainer import StainOptions, StainResult, choose_host, stain
from .verify import VerifyResult, verify

__all__ = ["EvaluateResult", "Key", "StainOptions", "StainResult", "VerifyResult", "evaluate", "inspect_model",
           "load_key", "stain", "stain_summary", "verify"]


def inspect_model(model: str | Path) -> dict[str, Any]:
    """Candidate host layers of ``model`` with their dimensions, routes and the default choice."""
    loaded = load_model(model)
    view = GraphView(loaded.model)
    info = image_input(loaded.model)
    head = head_mod.find_head(view)
    hosts = find_hosts(loaded.model, view)
    notes: list[str] = []
    default = {}
    for mode in ("inplace", "insert"):
        try:
            default[mode] = choose_host(hosts, view, head, mode, None).name if head else None
        except Exception as exc:  # report why, do not fail inspect
            default[mode] = None
            notes.append(f"{mode}: {exc}")
    if head is None:
        notes.append("no classifier head found: stains need a Gemm/MatMul+Add producing the scores")
    rows = []
    for h in hosts:
        routable = bool(head) and head_mod.direct_route(view, h, head)[0] is not None
        rf = h.receptive_field
        rows.append({
            "name": h.name, "op": h.op, "m": h.m, "positions": h.positions, "activation": h.activation,
            "receptive_field": f"{rf.size[0]}x{rf.size[1]}" if rf else None,
            "routable": routable, "usable": h.usable, "reason": h.reason, "depth": h.depth,
            "default": h.name in (default.get("inplace"), default.get("insert")),
            "out_channels": h.out_channels,
            # margin the trigger must reach, as a fraction of the natural radius, for a 1e-9 bound
            "margin_ratio_1e-9": (bounds.threshold_for_target(1e-9, 1.0, h.m, positions=h.positions, draws=8)
                                  if h.usable else None),
        })
    shape = f"{info.layout or '?'} {info.height or '?'}x{info.width or '?'} {info.dtype}"
    return {"model": str(loaded.path), "sha256": loaded.sha256, "input": shape,
            "nodes": len(view.graph.node), "head": head.node if head else None, "hosts": rows,
            "default": default, "notes": notes}


def stain_summary(res: StainResult) -> dict[str, Any]:
    d = dataclasses.asdict(res)
    d["bound"] = res.bound.to_dict()
    for k in ("output", "key_path", "record_path"):
        d[k] = str(d[k])
    return d
