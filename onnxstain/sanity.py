"""Refuse, before any work, a model whose weights or outputs are not finite.

A NaN or infinite weight poisons every statistic the tool computes (the natural radius, the
margins, the bounds): a stain made on it would carry a NaN threshold and never verify. Checked:
every float initializer and every float ``Constant`` (subgraphs included), then the model's float
outputs on one mid-grey image through onnxruntime. One exception: a single ±inf (never NaN) used only as
a fill value or a bound — a ``Pad``'s constant (TF's max-pool padding is −inf), a ``Clip``/``Max``/``Min``
bound, a ``Where``/``ConstantOfShape`` fill (attention masks) — is how exporters write "no limit"; it
takes part in no statistic, and the output check below still catches a model it would poison.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx

from ._onnx import tensors
from ._onnx.io import LoadedModel
from .errors import BadModelError
from .preprocess import Preprocessing

_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
# ops that may read a single ±inf as a fill value or a bound
_FILL_OPS = {"Pad", "Clip", "Max", "Min", "Where", "ConstantOfShape", "Less", "LessOrEqual", "Greater",
             "GreaterOrEqual", "Equal", "Expand"}


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto | None, list[float], bool]]:
    """(name, tensor, loose float values, whether every reader takes it as a fill value or bound)."""
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for t in node.input:
            readers.setdefault(t, set()).add(node.op_type)

    def fill_only(tensor: str) -> bool:
        return bool(readers.get(tensor)) and readers[tensor] <= _FILL_OPS

    for t in graph.initializer:
        yield t.name, t, [], fill_only(t.name)
    for node in graph.node:
        label = f"{node.name or node.output[0]} ({node.op_type})"
        fill = node.op_type == "ConstantOfShape" or (node.op_type == "Constant" and fill_only(node.output[0]))
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield label, a.t, [], fill
            elif a.type == onnx.AttributeProto.FLOAT and node.op_type == "Constant":
                yield label, None, [a.f], fill
            elif a.type == onnx.AttributeProto.FLOATS and node.op_type == "Constant":
                yield label, None, list(a.floats), False
            elif a.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graph_tensors(g)


def _acceptable(arr: np.ndarray, fill: bool) -> bool:
    """Finite, or a single ±inf read only as a fill value or bound."""
    if np.isfinite(arr).all():
        return True
    return fill and arr.size == 1 and not np.isnan(arr).any()


def nonfinite_tensor(model: onnx.ModelProto) -> str | None:
    """The name of the first float weight holding NaN or ±inf (None: all finite)."""
    for name, t, values, fill in _graph_tensors(model.graph):
        if t is None:
            if not _acceptable(np.asarray(values, np.float64), fill):
                return name
            continue
        if t.data_type not in _FLOATS:
            continue
        try:
            arr = tensors.tensor_array(t, mapped=True)
        except Exception as exc:
            raise BadModelError(f"cannot read the weight {name!r} ({type(exc).__name__})") from None
        if not _acceptable(np.asarray(arr), fill):
            return name
    return None


def refuse_nonfinite(loaded: LoadedModel, pre: Preprocessing, providers: Sequence[str] | None = None,
                     what: str = "the model", sess: Any = None) -> None:
    """Raise :class:`BadModelError` (one line, naming the tensor) when ``loaded`` is not finite: its weights,
    and every output of ``sess`` (a session of it the caller holds; else one is made) on a grey image."""
    name = nonfinite_tensor(loaded.model)
    if name is not None:
        raise BadModelError(f"{what} {loaded.path} has NaN or infinite values in the weight {name!r}; "
                            "onnxstain refuses non-finite weights")
    if sess is None:
        from .runtime import session

        sess = session(loaded.model, providers)
    grey = pre.to_input(np.full((1, pre.height, pre.width, 3), 128, np.uint8))
    outs = sess.run(None, {sess.get_inputs()[0].name: grey})
    for meta, out in zip(sess.get_outputs(), outs, strict=True):
        arr = np.asarray(out)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise BadModelError(f"{what} {loaded.path} gives NaN or infinite values in its output {meta.name!r} on "
                                "a grey image; onnxstain refuses a model whose outputs are not finite")
