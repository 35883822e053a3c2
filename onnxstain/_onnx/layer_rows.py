"""A host layer's rows as a model stores them, found by name or — renamed, fused or quantised by a
toolchain — by their likeness to the original layer's; and what an edit added to one row.

The rows are a layer's effective weights ``[C, m]`` over its neuron inputs (BatchNorm folded in,
:func:`onnxstain._onnx.hosts.layer_affine`). ``onnxstain identify`` and ``verify``'s weight check read a
stain's detector row from them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..math.identify import cosines
from .graph import GraphView
from .hosts import HostLayer, find_hosts, layer_affine, stored_layer

# a renamed, fused or quantised host layer is the stored tensor whose rows line up with the original layer's: the
# median row's cosine with the original's above this (int8 rounding or a fine-tune leave it above 0.99; two
# unrelated layers' rows are near-orthogonal)
ROW_MATCH = 0.9


def row_change(row: np.ndarray, original: np.ndarray) -> np.ndarray:
    """What an edit added to a row: the row less its projection on the original row. A rescaled copy (int8
    scales, a folded BatchNorm) leaves nothing; the hidden stain's ``g v`` leaves all of ``v`` but its small
    component along the original row. A function of the two rows only: the cap bound holds for any key."""
    o2 = float(original @ original)
    return row - (float(row @ original) / o2) * original if o2 > 0 else row


class LayerRows:
    """A model's host layers: by name (their effective rows, BatchNorm folded in), and for a layer an optimiser
    renamed, fused (ORT's FusedConv, a folded BatchNorm) or quantised (int8 weights, with or without
    DequantizeLinear), the stored weight tensor whose rows line up with the original's."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.view = GraphView(model)
        self.hosts: dict[str, HostLayer] = {h.name: h for h in find_hosts(model, self.view)}
        self._rows: dict[str, np.ndarray] = {}
        self._located: dict[str, np.ndarray | None] = {}
        self._candidates_of: dict[tuple[int, ...], list[np.ndarray]] | None = None

    def _of(self, name: str) -> np.ndarray:
        if name not in self._rows:
            self._rows[name] = layer_affine(self.view, self.hosts[name])[0]
        return self._rows[name]

    def rows(self, name: str, original: LayerRows | None) -> np.ndarray | None:
        """The effective rows of host ``name``; renamed, fused or quantised, those located from ``original``."""
        if name in self.hosts:
            return self._of(name)
        if original is None or name not in original.hosts:
            return None
        if name not in self._located:
            effective = original._of(name)
            stored, _, row_scale, _ = stored_layer(original.view, original.hosts[name])
            self._located[name] = self._locate(effective, stored, row_scale)
        return self._located[name]

    def _locate(self, effective: np.ndarray, stored: np.ndarray, row_scale: np.ndarray) -> np.ndarray | None:
        """The stored tensor whose rows are the original layer's, in the original's effective map: rows matched
        against the effective rows (a BatchNorm folded in) are taken as they are; rows matched against the
        stored ones (a BatchNorm still apart) are scaled by it. Row by row a cosine: a per-channel int8 scale
        or a positive rescaling changes nothing."""
        best, best_match = None, ROW_MATCH
        for rows in self._candidates(effective.shape):
            for target, scale in ((effective, None), (stored, row_scale)):
                match = float(np.median(np.abs(cosines(rows, target / _norms(target)))))
                if match > best_match:
                    best, best_match = (rows if scale is None else rows * scale[:, None]), match
        return best

    def _candidates(self, shape: tuple[int, ...]) -> list[np.ndarray]:
        """Every stored tensor of ``shape[0] × shape[1]`` values as ``[C, m]`` rows (Conv and transposed Gemm
        weights), and transposed (MatMul weights)."""
        if self._candidates_of is None:
            self._candidates_of = {}
        if shape not in self._candidates_of:
            self._candidates_of[shape] = candidate_rows(self.model, (shape[0], shape[1]))
        return self._candidates_of[shape]


def _norms(rows: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.where(n > 0, n, 1.0)


def _stored_tensors(model: Any) -> list[np.ndarray]:
    """Every initializer and Constant tensor of two or more dimensions, as float64 (int8 codes as they are)."""
    from onnx import numpy_helper

    protos = list(model.graph.initializer)
    protos += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    out = []
    for p in protos:
        if len(p.dims) < 2:
            continue
        arr = numpy_helper.to_array(p)
        if arr.dtype.kind in "fiu":
            out.append(arr.astype(np.float64))
    return out



def candidate_rows(model: Any, shape: tuple[int, int]) -> list[np.ndarray]:
    """Every stored tensor of ``C × m`` values as rows ``[C, m]`` (Conv and transposed Gemm weights) and
    transposed (MatMul weights): where a layer may be when its name is gone."""
    c, m = shape
    out = []
    for t in _stored_tensors(model):
        if t.size != c * m or t.ndim < 2:
            continue
        if t.shape[0] == c:
            out.append(t.reshape(c, m))
        if t.ndim == 2 and t.shape == (m, c):
            out.append(t.T)
    return out
