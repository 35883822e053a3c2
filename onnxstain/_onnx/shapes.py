"""Static shapes of every tensor for one input size — never from ``onnx.shape_inference`` alone.

Exporters compute parts of a graph from the input's *shape*: TensorFlow-style "same" padding
(``Pad`` whose pads come from ``Shape``/``ConstantOfShape``/``Concat``/``Reshape``/``Slice``/
``Transpose``/``Cast``), token counts, resized position embeddings. ONNX shape inference stops at
such a subgraph, and with it every shape downstream: host layers lose their spatial size and
receptive field. :func:`resolve` gets every shape for one concrete input shape in three steps, each
taken only when the previous one left a tensor unknown:

1. ONNX shape inference with the input's dimensions fixed (a dynamic batch becomes 1, dynamic
   height and width become the preprocessing's size);
2. the shape-only subgraphs are evaluated with onnxruntime (:func:`.fold.shape_only_values`) and
   stored as constants, then shape inference runs again. onnxruntime, not onnx's reference
   evaluator or an optimizer: it is the runtime the model is deployed on (the same kernels, every
   op and opset it can run), it is already a dependency, and it evaluates only the small subgraph;
3. one onnxruntime run on a grey image that exposes every tensor still unknown, whose shapes are
   read off the results.

The values of the shape-only tensors are kept (:attr:`Shapes.values`): the padding of a ``Pad``
computed at run time is one of them. The model itself is never changed: dynamic axes stay dynamic in
every model onnxstain writes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from ..errors import OnnxStainError
from .fold import fold_values, shape_only_values

Dims = list[int | str | None]


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Shapes of the graph's tensors for one input shape, and the values of its shape-only tensors."""

    dims: dict[str, Dims]
    values: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    how: str = "inference"  # "inference", "folded" or "onnxruntime": the last step that was needed

    def get(self, name: str) -> Dims | None:
        return self.dims.get(name)


def inferred_dims(model: onnx.ModelProto) -> dict[str, Dims]:
    """Shapes onnx shape inference resolves (dims: int, symbol or None); initializers included."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    dims: dict[str, Dims] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        row: Dims = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                row.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                row.append(d.dim_param)
            else:
                row.append(None)
        dims[vi.name] = row
    for init in g.initializer:
        dims[init.name] = list(init.dims)
    return dims


def declared_input_shape(model: onnx.ModelProto) -> tuple[int, ...] | None:
    """The single image input's declared shape with a symbolic batch taken as 1, or None when another
    dimension is symbolic or the model has several inputs."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    shape: list[int] = []
    for k, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(int(d.dim_value))
        elif k == 0:
            shape.append(1)
        else:
            return None
    return tuple(shape) if shape else None


def resolve(model: onnx.ModelProto, input_shape: tuple[int, ...] | None = None,
            providers: list[str] | None = None) -> Shapes:
    """Every tensor's shape for ``input_shape`` (default: the declared input shape, batch 1).

    Without a concrete input shape (dynamic height and width and none given) this is plain shape
    inference, and tensors downstream of the dynamic axes stay symbolic.
    """
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else declared_input_shape(model)
    if shape is None:
        return Shapes(inferred_dims(model))
    fixed = _with_input_shape(model, shape)
    if fixed is None:
        return Shapes(inferred_dims(model))
    dims = inferred_dims(fixed)
    missing = _unknown(fixed, dims)
    if not missing:
        return Shapes(dims, {}, shape, "inference")

    example = example_input(fixed, shape)
    try:
        values = shape_only_values(fixed, example, providers)
    except OnnxStainError:
        values = {}
    how = "inference"
    if values:
        folded = fold_values(fixed, values)
        dims = inferred_dims(folded)
        for name, value in values.items():
            dims[name] = list(value.shape)
        missing = _unknown(folded, dims)
        how = "folded"
    else:
        folded = fixed
    if missing:
        try:
            dims.update(_run_shapes(folded, example, missing, providers))
            how = "onnxruntime"
        except OnnxStainError:
            pass
    kept = {k: v for k, v in values.items() if np.issubdtype(v.dtype, np.integer)}  # pads, shapes: not weights
    return Shapes(dims, kept, shape, how)


# -- helpers ---------------------------------------------------------------------------------------------
def _with_input_shape(model: onnx.ModelProto, shape: tuple[int, ...]) -> onnx.ModelProto | None:
    """A copy of ``model`` whose single input has ``shape`` (None when the ranks differ)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != len(shape):
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]  # the exporter's shapes may name the symbolic sizes: infer afresh
    for inp in copy.graph.input:
        if inp.name == inputs[0].name:
            for d, n in zip(inp.type.tensor_type.shape.dim, shape, strict=True):
                d.Clear()
                d.dim_value = n
    return copy


def _unknown(model: onnx.ModelProto, dims: dict[str, Dims]) -> list[str]:
    """Main-graph node outputs without a fully static shape."""
    out: list[str] = []
    for node in model.graph.node:
        for t in node.output:
            if not t:
                continue
            d = dims.get(t)
            if d is None or not all(isinstance(x, int) for x in d):
                out.append(t)
    return out


def example_input(model: onnx.ModelProto, shape: tuple[int, ...]) -> np.ndarray:
    """A mid-grey input of ``shape`` in the single input's dtype."""
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    value = 128 if np.issubdtype(dtype, np.integer) else 0.5
    return np.full(shape, value, dtype=dtype)


def _run_shapes(model: onnx.ModelProto, example: np.ndarray, names: list[str],
                providers: list[str] | None) -> dict[str, Dims]:
    """Shapes of ``names`` read from one onnxruntime run on ``example``."""
    from ..runtime import input_name, session, with_outputs

    sess = session(with_outputs(model, names), providers)
    available = {o.name for o in sess.get_outputs()}
    wanted = [n for n in names if n in available]
    got = sess.run(wanted, {input_name(sess): example})
    return {n: [int(d) for d in np.shape(v)] for n, v in zip(wanted, got, strict=True)}
