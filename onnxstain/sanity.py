"""Refuse, before any work, a model whose weights or outputs are not finite.

A NaN or infinite weight poisons every statistic the tool computes (the natural radius, the
margins, the bounds): a stain made on it would carry a NaN threshold and never verify. Checked:
every float initializer and every float ``Constant`` (subgraphs included), then the model's float
outputs on one mid-grey image through onnxruntime.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import onnx

from ._onnx import tensors
from ._onnx.io import LoadedModel
from .errors import BadModelError
from .preprocess import Preprocessing

_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto | None, list[float]]]:
    for t in graph.initializer:
        yield t.name, t, []
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield f"{node.name or node.output[0]} ({node.op_type})", a.t, []
            elif a.type == onnx.AttributeProto.FLOAT and node.op_type == "Constant":
                yield f"{node.name or node.output[0]} (Constant)", None, [a.f]
            elif a.type == onnx.AttributeProto.FLOATS and node.op_type == "Constant":
                yield f"{node.name or node.output[0]} (Constant)", None, list(a.floats)
            elif a.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graph_tensors(g)


def nonfinite_tensor(model: onnx.ModelProto) -> str | None:
    """The name of the first float weight holding NaN or ±inf (None: all finite)."""
    for name, t, values in _graph_tensors(model.graph):
        if t is None:
            if not np.isfinite(np.asarray(values, np.float64)).all():
                return name
            continue
        if t.data_type not in _FLOATS:
            continue
        try:
            arr = tensors.tensor_array(t, mapped=True)
        except Exception as exc:
            raise BadModelError(f"cannot read the weight {name!r} ({type(exc).__name__})") from None
        if not np.isfinite(arr).all():
            return name
    return None


def refuse_nonfinite(loaded: LoadedModel, pre: Preprocessing, providers: Sequence[str] | None = None,
                     what: str = "the model") -> None:
    """Raise :class:`BadModelError` (one line, naming the tensor) when ``loaded`` is not finite."""
    name = nonfinite_tensor(loaded.model)
    if name is not None:
        raise BadModelError(f"{what} {loaded.path} has NaN or infinite values in the weight {name!r}; "
                            "onnxstain refuses non-finite weights")
    from .runtime import session

    sess = session(loaded.model, providers)
    grey = pre.to_input(np.full((1, pre.height, pre.width, 3), 128, np.uint8))
    outs = sess.run(None, {sess.get_inputs()[0].name: grey})
    for meta, out in zip(sess.get_outputs(), outs, strict=True):
        arr = np.asarray(out)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise BadModelError(f"{what} {loaded.path} gives NaN or infinite values in its output {meta.name!r} on "
                                "a grey image; onnxstain refuses a model whose outputs are not finite")
