"""A differentiable torch interpreter for the *prefix* of an ONNX graph.

The trigger search runs projected gradient ascent on the model input through the part of the graph
that ends at the host layer, so it needs that part as a torch module through which gradients flow.
:class:`TorchPrefix` builds it from a loaded ``onnx.ModelProto``:

* only the nodes needed for the requested tensors are interpreted (a backward slice from the outputs
  down to the varying input), in topological order;
* everything that does not depend on the input (weights, ``Constant`` nodes, ``DequantizeLinear`` of
  int8 weights, shape arithmetic on constants...) is folded once at construction and kept as
  non-trainable, non-persistent buffers, in the compute dtype (float32 by default, fp16/bf16
  initializers are widened);
* an inference ``BatchNormalization`` that is the only consumer of a ``Conv`` with constant weights
  is folded into that Conv (as onnxruntime does);
* each remaining node is pre-bound at construction into a small closure (attributes parsed, static
  shapes/axes converted to Python ints), so ``forward`` is a tight loop of torch calls with no
  attribute parsing; the batch dimension stays free (``Shape`` of input-dependent tensors is
  evaluated at run time);
* an op (or an op configuration) that is not supported raises
  :class:`~onnxstain.errors.UnsupportedModelError` at construction, never at the first forward.

Why not the PyPI package ``onnx2torch``: it imports torchvision, which does not import beside the
torch build this project pins, so we carry this small interpreter instead (it also gives us the
constant folding, the fake-quant straight-through estimator and the one-line errors we want).

Notes on semantics:

* ``QuantizeLinear`` on an input-dependent tensor returns a *float* tensor that holds the integer
  codes, with a straight-through estimator for the rounding (the gradient is 1/scale inside the
  representable range and 0 where the code saturates); the matching ``DequantizeLinear`` maps it
  back, so a Q→DQ pair is a fake-quant whose gradient is 1 inside the range.
* ``Cast`` to any floating type casts to the compute dtype.
* The compute dtype is chosen at construction (``dtype=``); ``.to(device)`` and ``.double()`` move
  the buffers and the input is cast to their dtype (``Cast`` nodes keep the construction dtype).

This module imports torch; nothing in ``onnxstain/__init__.py`` imports it, so ``import onnxstain``
stays torch-free.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, cast

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import AttributeProto, TensorProto, numpy_helper

from onnxstain._onnx.padding import same_pads
from onnxstain._onnx.tensors import tensor_array
from onnxstain.errors import BadInputError, UnsupportedModelError

__all__ = ["SUPPORTED_OPS", "TorchPrefix", "torch_prefix"]

Fn = Callable[..., Any]
_BUILDERS: dict[str, Callable[[_Ctx], Fn]] = {}
_BIG = 2**62  # clamp for INT64_MAX / INT64_MIN style slice bounds


def _op(*names: str) -> Callable[[Callable[[_Ctx], Fn]], Callable[[_Ctx], Fn]]:
    def deco(builder: Callable[[_Ctx], Fn]) -> Callable[[_Ctx], Fn]:
        for n in names:
            _BUILDERS[n] = builder
        return builder

    return deco


# --------------------------------------------------------------------------------------------------
# dtypes and constants
# --------------------------------------------------------------------------------------------------

_FLOAT_TYPES = {
    TensorProto.FLOAT,
    TensorProto.FLOAT16,
    TensorProto.DOUBLE,
    TensorProto.BFLOAT16,
}
_INT_TYPES: dict[int, torch.dtype] = {
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16,
    TensorProto.UINT16: torch.int32,  # torch's uint16/32/64 support few ops: widen
    TensorProto.INT32: torch.int32,
    TensorProto.UINT32: torch.int64,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}
# integer range of each quantized type (QuantizeLinear saturation)
_QRANGE: dict[int, tuple[int, int]] = {
    TensorProto.UINT8: (0, 255),
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT16: (0, 65535),
    TensorProto.INT16: (-32768, 32767),
    TensorProto.INT32: (-(2**31), 2**31 - 1),
}
_UINT4 = getattr(TensorProto, "UINT4", None)
_INT4 = getattr(TensorProto, "INT4", None)
if _UINT4 is not None:
    _QRANGE[_UINT4] = (0, 15)
if _INT4 is not None:
    _QRANGE[_INT4] = (-8, 7)
_TORCH_QRANGE: dict[torch.dtype, tuple[int, int]] = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.int16: (-32768, 32767),
    torch.int32: (-(2**31), 2**31 - 1),
}


def _torch_dtype(onnx_type: int, fdtype: torch.dtype) -> torch.dtype | None:
    """The torch dtype used for an ONNX element type (floats → the compute dtype), None if unknown."""
    if onnx_type in _FLOAT_TYPES:
        return fdtype
    return _INT_TYPES.get(onnx_type)


def _np_to_torch(arr: np.ndarray, fdtype: torch.dtype) -> torch.Tensor:
    """A numpy array (from an initializer or attribute) as a fresh torch tensor; floats → fdtype."""
    if arr.dtype.kind in "OSU":
        raise TypeError(f"string tensors are not supported (dtype {arr.dtype})")
    if arr.dtype.kind == "V":  # ml_dtypes: bfloat16, float8*, int4, uint4...
        arr = arr.astype(np.float32 if "float" in arr.dtype.name else np.int16)
    kind = arr.dtype.kind
    if kind == "f":
        # a fresh writable array (external data read from disk) is used as is: no transient copy
        fresh = arr.flags.writeable and arr.flags.c_contiguous
        return torch.from_numpy(arr if fresh else np.array(arr)).to(fdtype)
    if kind == "u" and arr.dtype.itemsize > 1:
        arr = arr.astype(np.int64)
    return torch.from_numpy(np.array(arr))


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _torch_pads(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads → F.pad's list (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        out += [int(b), int(e)]
    return out


# --------------------------------------------------------------------------------------------------
# build context: what a builder knows about one node
# --------------------------------------------------------------------------------------------------


class _Ctx:
    """One node at build time: attributes, constant inputs, which outputs are used."""

    def __init__(
        self,
        node: onnx.NodeProto,
        opset: int,
        dtype: torch.dtype,
        consts: list[torch.Tensor | None],
        present: list[bool],
        elem_types: list[int | None],
        used_outputs: list[bool],
    ) -> None:
        self.node = node
        self.op = node.op_type
        self.opset = opset
        self.dtype = dtype
        self._consts = consts
        self._present = present
        self._elem_types = elem_types
        self.used_outputs = used_outputs
        self.first_output_only = False
        self.attrs: dict[str, Any] = {}
        for a in node.attribute:
            if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                self.fail("subgraph attributes (control flow) are not supported")
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode()
            elif isinstance(v, list) and v and isinstance(v[0], bytes):
                v = [b.decode() for b in v]
            self.attrs[a.name] = v

    # -- errors
    def fail(self, msg: str) -> NoReturn:
        raise UnsupportedModelError(f"{self.op} node {self.node.name or '<unnamed>'!r}: {msg}")

    # -- attributes
    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    # -- inputs
    def has(self, i: int) -> bool:
        return i < len(self._present) and self._present[i]

    def const(self, i: int) -> torch.Tensor | None:
        """The value of input i if it is a constant, None if it is missing or input-dependent."""
        return self._consts[i] if self.has(i) else None

    def dynamic(self, i: int) -> bool:
        return self.has(i) and self._consts[i] is None

    def elem_type(self, i: int) -> int | None:
        return self._elem_types[i] if i < len(self._elem_types) else None

    def ints(self, i: int, what: str) -> list[int] | None:
        """Input i as a list of Python ints (None if missing); it must be constant."""
        if not self.has(i):
            return None
        c = self._consts[i]
        if c is None:
            self.fail(f"{what} (input {i}) must be a constant, it depends on the model input")
        return [int(v) for v in c.reshape(-1).tolist()]

    def scalar(self, i: int) -> float | int | None:
        c = self.const(i)
        if c is None or c.numel() != 1:
            return None
        v = c.reshape(()).item()
        return v

    # -- outputs
    def only_first_output(self) -> None:
        """Declare that fn returns output 0 only; fail if another output is needed."""
        for j, used in enumerate(self.used_outputs[1:], start=1):
            if used:
                self.fail(f"output {j} ({self.node.output[j]!r}) is not supported")
        self.first_output_only = True


# --------------------------------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------------------------------


def _identity(x: torch.Tensor, *_: Any) -> torch.Tensor:
    return x


_UNARY: dict[str, Fn] = {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Erf": torch.erf,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,
    "Sign": torch.sign,
    "Not": torch.logical_not,
    "Softsign": F.softsign,
    "Softplus": F.softplus,
    "Mish": F.mish,
    "HardSwish": F.hardswish,
    "IsNaN": torch.isnan,
}


@_op(*_UNARY)
def _b_unary(ctx: _Ctx) -> Fn:
    return _UNARY[ctx.op]


_BINARY: dict[str, Fn] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "MatMul": torch.matmul,
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}


@_op(*_BINARY)
def _b_binary(ctx: _Ctx) -> Fn:
    return _BINARY[ctx.op]


@_op("Div")
def _b_div(ctx: _Ctx) -> Fn:
    def div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.is_floating_point():
            return torch.div(a, b)
        return torch.div(a, b, rounding_mode="trunc")  # C-style integer division, as ORT

    return div


@_op("Mod")
def _b_mod(ctx: _Ctx) -> Fn:
    return torch.fmod if ctx.attr("fmod", 0) else torch.remainder


@_op("Pow")
def _b_pow(ctx: _Ctx) -> Fn:
    e = ctx.scalar(1)
    if e is not None:
        ev: float | int = int(e) if float(e).is_integer() else float(e)
        if ev == 1:
            return _identity
        if ev == 2:
            return lambda a, _: a * a
        return lambda a, _: torch.pow(a, ev)
    return lambda a, b: torch.pow(a, b).to(a.dtype)


def _variadic(f: Fn) -> Fn:
    def fn(*xs: torch.Tensor) -> torch.Tensor:
        r = xs[0]
        for t in xs[1:]:
            r = f(r, t)
        return r

    return fn


@_op("Max", "Min", "Sum", "Mean")
def _b_variadic(ctx: _Ctx) -> Fn:
    f = cast(Fn, {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[ctx.op])
    red = _variadic(f)
    if ctx.op == "Mean":
        n = len(ctx.node.input)
        return lambda *xs: red(*xs) / n
    return red


@_op("Where")
def _b_where(ctx: _Ctx) -> Fn:
    return lambda c, a, b: torch.where(c if c.dtype == torch.bool else c.bool(), a, b)


@_op("Identity")
def _b_identity(ctx: _Ctx) -> Fn:
    return _identity


@_op("Dropout")
def _b_dropout(ctx: _Ctx) -> Fn:
    if len(ctx.used_outputs) > 1 and ctx.used_outputs[1]:
        return lambda x, *_: (x, torch.ones_like(x, dtype=torch.bool))
    ctx.only_first_output()
    return _identity


@_op("LeakyRelu")
def _b_leaky(ctx: _Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 0.01))
    return lambda x: F.leaky_relu(x, alpha)


@_op("Elu")
def _b_elu(ctx: _Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 1.0))
    return lambda x: F.elu(x, alpha)


@_op("Celu")
def _b_celu(ctx: _Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 1.0))
    return lambda x: F.celu(x, alpha)


@_op("Selu")
def _b_selu(ctx: _Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 1.67326319217681884765625))
    gamma = float(ctx.attr("gamma", 1.05070102214813232421875))
    return lambda x: gamma * F.elu(x, alpha)


@_op("ThresholdedRelu")
def _b_thresholded(ctx: _Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 1.0))
    return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))


@_op("Gelu")
def _b_gelu(ctx: _Ctx) -> Fn:
    approx = ctx.attr("approximate", "none")
    if approx not in ("none", "tanh"):
        ctx.fail(f"approximate={approx!r} is not supported")
    return lambda x: F.gelu(x, approximate=approx)


@_op("HardSigmoid")
def _b_hardsigmoid(ctx: _Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 0.2))
    beta = float(ctx.attr("beta", 0.5))
    return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)


@_op("PRelu")
def _b_prelu(ctx: _Ctx) -> Fn:
    return lambda x, s: torch.where(x < 0, x * s, x)


@_op("Clip")
def _b_clip(ctx: _Ctx) -> Fn:
    if "min" in ctx.attrs or "max" in ctx.attrs or ctx.opset < 11:
        lo, hi = ctx.attr("min"), ctx.attr("max")
    else:
        if ctx.dynamic(1) or ctx.dynamic(2):

            def clip_dyn(x: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
                return torch.clamp(x, a, b)

            return clip_dyn
        lo, hi = ctx.scalar(1), ctx.scalar(2)
        for i in (1, 2):
            c = ctx.const(i)
            if c is not None and not c.is_floating_point():
                lo = None if lo is None else int(lo)
                hi = None if hi is None else int(hi)
    if lo is None and hi is None:
        return _identity
    return lambda x, *_: torch.clamp(x, lo, hi)


@_op("Cast")
def _b_cast(ctx: _Ctx) -> Fn:
    to = int(ctx.attr("to"))
    td = _torch_dtype(to, ctx.dtype)
    if td is None:
        ctx.fail(f"cast to ONNX type {TensorProto.DataType.Name(to)} is not supported")
    return lambda x: x if x.dtype == td else x.to(td)


@_op("CastLike")
def _b_castlike(ctx: _Ctx) -> Fn:
    return lambda x, y: x if x.dtype == y.dtype else x.to(y.dtype)


# --------------------------------------------------------------------------------------------------
# constants and shapes
# --------------------------------------------------------------------------------------------------


@_op("Constant")
def _b_constant(ctx: _Ctx) -> Fn:
    a = ctx.attrs
    if "value" in a:
        try:
            v = _np_to_torch(numpy_helper.to_array(a["value"]), ctx.dtype)
        except TypeError as e:
            ctx.fail(str(e))
    elif "value_float" in a:
        v = torch.tensor(float(a["value_float"]), dtype=ctx.dtype)
    elif "value_floats" in a:
        v = torch.tensor([float(f) for f in a["value_floats"]], dtype=ctx.dtype)
    elif "value_int" in a:
        v = torch.tensor(int(a["value_int"]), dtype=torch.int64)
    elif "value_ints" in a:
        v = torch.tensor([int(i) for i in a["value_ints"]], dtype=torch.int64)
    else:
        ctx.fail(f"attribute {next(iter(a), '<none>')!r} is not supported")
    return lambda: v


@_op("ConstantOfShape")
def _b_constant_of_shape(ctx: _Ctx) -> Fn:
    value: float | int | bool = 0.0
    td = ctx.dtype
    t = ctx.attr("value")
    if t is not None:
        arr = numpy_helper.to_array(t).reshape(-1)
        tdt = _torch_dtype(t.data_type, ctx.dtype)
        if tdt is None:
            ctx.fail(f"value type {TensorProto.DataType.Name(t.data_type)} is not supported")
        td = tdt
        value = arr[0].item() if arr.dtype.kind != "V" else float(arr.astype(np.float32)[0])

    def fn(shape: torch.Tensor) -> torch.Tensor:
        return torch.full(tuple(shape.tolist()), value, dtype=td, device=shape.device)

    return fn


@_op("Shape")
def _b_shape(ctx: _Ctx) -> Fn:
    start = int(ctx.attr("start", 0))
    end = ctx.attr("end")
    end = None if end is None else int(end)
    if start == 0 and end is None:
        return lambda x: torch.tensor(x.shape, dtype=torch.int64, device=x.device)
    return lambda x: torch.tensor(x.shape[start:end], dtype=torch.int64, device=x.device)


@_op("Size")
def _b_size(ctx: _Ctx) -> Fn:
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@_op("Range")
def _b_range(ctx: _Ctx) -> Fn:
    def fn(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)

    return fn


@_op("Flatten")
def _b_flatten(ctx: _Ctx) -> Fn:
    axis = int(ctx.attr("axis", 1))

    def fn(x: torch.Tensor) -> torch.Tensor:
        a = _norm(axis, x.dim())
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    return fn


@_op("Reshape")
def _b_reshape(ctx: _Ctx) -> Fn:
    allowzero = bool(ctx.attr("allowzero", 0))
    shape = ctx.ints(1, "shape") if not ctx.dynamic(1) else None
    if shape is not None:
        zeros = [] if allowzero else [i for i, v in enumerate(shape) if v == 0]
        if not zeros:
            tgt = tuple(shape)
            return lambda x, _: x.reshape(tgt)

        def reshape_zero(x: torch.Tensor, _: Any) -> torch.Tensor:
            t = list(shape)
            for i in zeros:
                t[i] = x.shape[i]
            return x.reshape(t)

        return reshape_zero

    def reshape_dyn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        t = s.tolist()
        if not allowzero:
            t = [x.shape[i] if v == 0 else v for i, v in enumerate(t)]
        return x.reshape(t)

    return reshape_dyn


@_op("Transpose")
def _b_transpose(ctx: _Ctx) -> Fn:
    perm = ctx.attr("perm")
    if perm is None:
        return lambda x: x.permute(*reversed(range(x.dim())))
    p = tuple(int(i) for i in perm)
    return lambda x: x.permute(p)


@_op("Concat")
def _b_concat(ctx: _Ctx) -> Fn:
    axis = int(ctx.attr("axis"))
    return lambda *xs: torch.cat(xs, dim=axis)


@_op("Split")
def _b_split(ctx: _Ctx) -> Fn:
    axis = int(ctx.attr("axis", 0))
    n = len(ctx.node.output)
    sizes = ctx.attr("split")
    if sizes is None and ctx.has(1):
        sizes = ctx.ints(1, "split")
    if sizes is not None:
        sz = [int(s) for s in sizes]

        def split(x: torch.Tensor, *_: Any) -> tuple[torch.Tensor, ...]:
            return torch.split(x, sz, dim=axis)

    elif "num_outputs" in ctx.attrs:
        k = int(ctx.attrs["num_outputs"])

        def split(x: torch.Tensor, *_: Any) -> tuple[torch.Tensor, ...]:
            return torch.split(x, -(-x.shape[axis] // k), dim=axis)

    else:

        def split(x: torch.Tensor, *_: Any) -> tuple[torch.Tensor, ...]:
            return torch.split(x, x.shape[axis] // n, dim=axis)

    if n == 1:
        return lambda x, *rest: split(x, *rest)[0]
    return split


def _slice_apply(
    x: torch.Tensor, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int], steps: Sequence[int]
) -> torch.Tensor:
    r = x.dim()
    idx: list[slice] = [slice(None)] * r
    flips: list[int] = []
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a = _norm(a, r)
        d = x.shape[a]
        s = s + d if s < 0 else s
        e = e + d if e < 0 else e
        if st > 0:
            idx[a] = slice(min(max(s, 0), d), min(max(e, 0), d), st)
        elif st < 0:
            s = min(max(s, 0), d - 1)
            e = min(max(e, -1), d - 1)
            flips.append(a)  # element i ↦ d-1-i after the flip
            idx[a] = slice(d - 1 - s, d - 1 - e, -st)
        else:
            raise ValueError("Slice step 0")
    if flips:
        x = torch.flip(x, flips)
    return x[tuple(idx)]


@_op("Slice")
def _b_slice(ctx: _Ctx) -> Fn:
    if "starts" in ctx.attrs:  # opset < 10
        starts = [int(v) for v in ctx.attrs["starts"]]
        ends = [int(v) for v in ctx.attrs["ends"]]
        axes_a = ctx.attr("axes")
        axes = list(range(len(starts))) if axes_a is None else [int(v) for v in axes_a]
        steps = [1] * len(starts)
    elif any(ctx.dynamic(i) for i in (1, 2, 3, 4)):

        def slice_dyn(
            x: torch.Tensor,
            s: torch.Tensor,
            e: torch.Tensor,
            a: torch.Tensor | None = None,
            st: torch.Tensor | None = None,
        ) -> torch.Tensor:
            sl, el = s.tolist(), e.tolist()
            al = list(range(len(sl))) if a is None else a.tolist()
            stl = [1] * len(sl) if st is None else st.tolist()
            return _slice_apply(x, sl, el, al, stl)

        return slice_dyn
    else:
        starts = ctx.ints(1, "starts") or []
        ends = ctx.ints(2, "ends") or []
        axes = ctx.ints(3, "axes") or list(range(len(starts)))
        steps = ctx.ints(4, "steps") or [1] * len(starts)
    if any(s == 0 for s in steps):
        ctx.fail("step 0")
    if all(a >= 0 for a in axes) and all(s > 0 for s in steps):
        idx = [slice(None)] * (max(axes, default=-1) + 1)
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            idx[a] = slice(max(min(s, _BIG), -_BIG), max(min(e, _BIG), -_BIG), st)
        t = tuple(idx)
        return lambda x, *_: x[t]
    return lambda x, *_: _slice_apply(x, starts, ends, axes, steps)


@_op("Gather")
def _b_gather(ctx: _Ctx) -> Fn:
    axis = int(ctx.attr("axis", 0))
    ic = ctx.const(1)
    if ic is not None and ic.dim() == 0:
        i = int(ic)
        return lambda x, _: x.select(axis, i)
    if ic is not None and ic.dim() == 1 and bool((ic >= 0).all()):
        return lambda x, idx: torch.index_select(x, axis, idx)

    def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        a = _norm(axis, x.dim())
        flat = idx.reshape(-1).long()
        flat = torch.where(flat < 0, flat + x.shape[a], flat)
        y = torch.index_select(x, a, flat)
        return y.reshape(x.shape[:a] + idx.shape + x.shape[a + 1 :])

    return gather


@_op("GatherElements")
def _b_gather_elements(ctx: _Ctx) -> Fn:
    axis = int(ctx.attr("axis", 0))

    def fn(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        a = _norm(axis, x.dim())
        idx = idx.long()
        return torch.gather(x, a, torch.where(idx < 0, idx + x.shape[a], idx))

    return fn


@_op("Unsqueeze")
def _b_unsqueeze(ctx: _Ctx) -> Fn:
    axes = ctx.attr("axes")
    if axes is None:
        axes = ctx.ints(1, "axes")
    if not axes:
        ctx.fail("no axes")
    ax = [int(a) for a in axes]
    if len(ax) == 1 and ax[0] >= 0:
        a0 = ax[0]
        return lambda x, *_: x.unsqueeze(a0)

    def fn(x: torch.Tensor, *_: Any) -> torch.Tensor:
        r = x.dim() + len(ax)
        for a in sorted(_norm(a, r) for a in ax):
            x = x.unsqueeze(a)
        return x

    return fn


@_op("Squeeze")
def _b_squeeze(ctx: _Ctx) -> Fn:
    axes = ctx.attr("axes")
    if axes is None and ctx.has(1):
        axes = ctx.ints(1, "axes")
    if not axes:
        return lambda x, *_: x.squeeze()
    ax = tuple(int(a) for a in axes)
    return lambda x, *_: x.squeeze(ax)


@_op("Expand")
def _b_expand(ctx: _Ctx) -> Fn:
    shape = None if ctx.dynamic(1) else tuple(ctx.ints(1, "shape") or ())
    if shape is not None:
        return lambda x, _: x.expand(torch.broadcast_shapes(x.shape, shape))
    return lambda x, s: x.expand(torch.broadcast_shapes(x.shape, tuple(s.tolist())))


@_op("Tile")
def _b_tile(ctx: _Ctx) -> Fn:
    return lambda x, r: x.repeat(*r.tolist())


@_op("Pad")
def _b_pad(ctx: _Ctx) -> Fn:
    mode = ctx.attr("mode", "constant")
    tmode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if tmode is None:
        ctx.fail(f"mode {mode!r} is not supported")
    if ctx.opset < 11 or "pads" in ctx.attrs:
        pads = [int(p) for p in ctx.attr("pads", ctx.attr("paddings", []))]
        value: float | None = float(ctx.attr("value", 0.0))
        axes = None
    else:
        pads = ctx.ints(1, "pads") or []
        value = None if ctx.dynamic(2) else ctx.scalar(2)
        if value is None and not ctx.dynamic(2):
            value = 0
        axes = ctx.ints(3, "axes")

    def torch_pads(rank: int) -> list[int]:
        ax = list(range(rank)) if axes is None else [_norm(a, rank) for a in axes]
        n = len(ax)
        begin, end = [0] * rank, [0] * rank
        for k, a in enumerate(ax):
            begin[a], end[a] = pads[k], pads[k + n]
        tp = _torch_pads(begin, end)
        if tmode != "constant":  # torch pads the trailing dims only: drop the unpadded leading ones
            while len(tp) > 2 and tp[-1] == 0 and tp[-2] == 0:
                tp = tp[:-2]
        return tp

    fixed = torch_pads(len(pads) // 2) if axes is None else None

    def pad(x: torch.Tensor, *rest: Any) -> torch.Tensor:
        tp = fixed if fixed is not None else torch_pads(x.dim())
        if tmode != "constant":
            return F.pad(x, tp, mode=tmode)
        v = value
        if v is None:
            v = rest[1].item()
        return F.pad(x, tp, mode="constant", value=v)

    return pad


@_op("DepthToSpace")
def _b_depth_to_space(ctx: _Ctx) -> Fn:
    bs = int(ctx.attr("blocksize"))
    if ctx.attr("mode", "DCR") == "CRD":
        return lambda x: F.pixel_shuffle(x, bs)

    def dcr(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = x.reshape(b, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(b, c // (bs * bs), h * bs, w * bs)

    return dcr


@_op("SpaceToDepth")
def _b_space_to_depth(ctx: _Ctx) -> Fn:
    bs = int(ctx.attr("blocksize"))

    def fn(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(b, c * bs * bs, h // bs, w // bs)

    return fn


# --------------------------------------------------------------------------------------------------
# linear algebra
# --------------------------------------------------------------------------------------------------


@_op("Gemm")
def _b_gemm(ctx: _Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 1.0))
    beta = float(ctx.attr("beta", 1.0))
    ta = bool(ctx.attr("transA", 0))
    tb = bool(ctx.attr("transB", 0))
    c = ctx.const(2)
    if not ta and alpha == 1.0 and (not ctx.has(2) or (beta == 1.0 and c is not None and c.dim() <= 1)):
        if tb:
            return lambda a, b, c=None: F.linear(a, b, c)
        return lambda a, b, c=None: F.linear(a, b.t(), c)

    def gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if ta:
            a = a.t()
        if tb:
            b = b.t()
        if c is None or beta == 0.0:
            y = a @ b
            return y * alpha if alpha != 1.0 else y
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)

    return gemm


@_op("LSTM")
def _b_lstm(ctx: _Ctx) -> Fn:
    """ONNX's LSTM (gates i, o, f, c) as torch's fused one (gates i, f, c, o): forward, reverse or bidirectional,
    time-major, with the default activations and no peepholes, clip, coupled gates or per-sequence lengths
    (``layout`` 1 is refused: onnxruntime does not run it either)."""
    acts = [str(a).lower() for a in ctx.attr("activations", [])]
    if acts and acts != ["sigmoid", "tanh", "tanh"] * (len(acts) // 3):
        ctx.fail(f"activations {ctx.attr('activations')} are not supported (only Sigmoid, Tanh, Tanh)")
    if ctx.attr("clip") is not None or ctx.attr("input_forget", 0):
        ctx.fail("clip and input_forget are not supported")
    if ctx.attr("layout", 0):
        ctx.fail("layout 1 (batch first) is not supported")
    if ctx.has(4) or ctx.has(7):
        ctx.fail("per-sequence lengths (input 4) and peepholes (input 7) are not supported")
    w, r, b = ctx.const(1), ctx.const(2), ctx.const(3)
    if w is None or r is None or (ctx.has(3) and b is None):
        ctx.fail("its weights (W, R, B) must be constants")
    direction = str(ctx.attr("direction", "forward"))
    hidden = int(ctx.attr("hidden_size", r.shape[-1]))
    dirs = w.shape[0]

    def gates(t: torch.Tensor) -> torch.Tensor:  # [4H, ...] in ONNX's order i, o, f, c → torch's i, f, c, o
        i, o, f, c = t.chunk(4, 0)
        return torch.cat([i, f, c, o], 0)

    params: list[torch.Tensor] = []
    for d in range(dirs):
        bias = b[d] if b is not None else torch.zeros(8 * hidden, dtype=w.dtype)
        params += [gates(w[d]), gates(r[d]), gates(bias[: 4 * hidden]), gates(bias[4 * hidden :])]
    reverse = direction == "reverse"

    def lstm(x: torch.Tensor, *rest: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h0, c0 = (rest[4] if len(rest) > 4 else None), (rest[5] if len(rest) > 5 else None)
        batch = x.shape[1]
        zeros = x.new_zeros(dirs, batch, hidden)
        h0 = zeros if h0 is None else h0
        c0 = zeros if c0 is None else c0
        if reverse:
            x = x.flip(0)
        y, h_n, c_n = torch.lstm(x, (h0.contiguous(), c0.contiguous()), params, True, 1, 0.0, False, dirs == 2,
                                 False)
        if reverse:
            y = y.flip(0)
        return y.reshape(y.shape[0], batch, dirs, hidden).permute(0, 2, 1, 3), h_n, c_n  # Y: [T, dirs, N, H]

    return lstm


@_op("Einsum")
def _b_einsum(ctx: _Ctx) -> Fn:
    eq = str(ctx.attr("equation")).replace(" ", "")
    return lambda *xs: torch.einsum(eq, *xs)


# --------------------------------------------------------------------------------------------------
# convolution and pooling
# --------------------------------------------------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _spatial_rank(ctx: _Ctx, wi: int | None) -> int:
    k = ctx.attr("kernel_shape")
    if k is not None:
        return len(k)
    if wi is not None:
        w = ctx.const(wi)
        if w is not None:
            return w.dim() - 2
    for name in ("strides", "dilations"):
        if ctx.attr(name) is not None:
            return len(ctx.attr(name))
    if ctx.attr("pads") is not None:
        return len(ctx.attr("pads")) // 2
    ctx.fail("cannot tell the number of spatial dimensions (no kernel_shape, weight not constant)")


def _ints_attr(ctx: _Ctx, name: str, n: int, default: int) -> list[int]:
    v = ctx.attr(name)
    return [default] * n if v is None else [int(i) for i in v]


@_op("Conv")
def _b_conv(ctx: _Ctx) -> Fn:
    nd = _spatial_rank(ctx, 1)
    if nd not in _CONV:
        ctx.fail(f"{nd}-D convolution is not supported")
    conv = _CONV[nd]
    s = _ints_attr(ctx, "strides", nd, 1)
    d = _ints_attr(ctx, "dilations", nd, 1)
    g = int(ctx.attr("group", 1))
    pads = _ints_attr(ctx, "pads", 2 * nd, 0)
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        pads = [0] * (2 * nd)
    if auto_pad in ("NOTSET", "VALID"):
        begin, end = pads[:nd], pads[nd:]
        if begin == end:
            return lambda x, w, b=None: conv(x, w, b, s, begin, d, g)
        tp = _torch_pads(begin, end)
        return lambda x, w, b=None: conv(F.pad(x, tp), w, b, s, 0, d, g)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        ctx.fail(f"auto_pad={auto_pad!r} is not supported")
    upper = auto_pad == "SAME_UPPER"
    kshape = ctx.attr("kernel_shape")
    cache: dict[tuple[int, ...], tuple[bool, list[int]]] = {}

    def conv_same(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        key = tuple(x.shape[2:])
        p = cache.get(key)
        if p is None:
            k = list(kshape) if kshape is not None else list(w.shape[2:])
            bg, en = same_pads(key, k, s, d, upper)
            p = cache[key] = (True, bg) if bg == en else (False, _torch_pads(bg, en))
        if p[0]:
            return conv(x, w, b, s, p[1], d, g)
        return conv(F.pad(x, p[1]), w, b, s, 0, d, g)

    return conv_same


@_op("ConvTranspose")
def _b_conv_transpose(ctx: _Ctx) -> Fn:
    nd = _spatial_rank(ctx, 1)
    if nd not in _CONVT:
        ctx.fail(f"{nd}-D transposed convolution is not supported")
    convt = _CONVT[nd]
    s = _ints_attr(ctx, "strides", nd, 1)
    d = _ints_attr(ctx, "dilations", nd, 1)
    g = int(ctx.attr("group", 1))
    pads = _ints_attr(ctx, "pads", 2 * nd, 0)
    op = _ints_attr(ctx, "output_padding", nd, 0)
    out_shape = ctx.attr("output_shape")
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        ctx.fail(f"auto_pad={auto_pad!r} is not supported")
    if auto_pad == "VALID":
        pads = [0] * (2 * nd)
    begin, end = pads[:nd], pads[nd:]
    if (
        auto_pad in ("NOTSET", "VALID")
        and out_shape is None
        and begin == end
        and all(o < max(ss, dd) for o, ss, dd in zip(op, s, d, strict=True))
    ):
        return lambda x, w, b=None: convt(x, w, b, s, begin, op, g, d)
    kshape = ctx.attr("kernel_shape")

    def convt_general(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        y = convt(x, w, None, s, 0, 0, g, d)  # full output, cropped / zero-extended below
        k = list(kshape) if kshape is not None else list(w.shape[2:])
        tp: list[int] = []
        for i in reversed(range(nd)):
            n = x.shape[2 + i]
            full = s[i] * (n - 1) + (k[i] - 1) * d[i] + 1
            if out_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out = int(out_shape[len(out_shape) - nd + i]) if out_shape is not None else n * s[i]
                total = max(0, full + op[i] - out)  # as onnxruntime: a larger output is zero-extended
                bi = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            else:
                bi = begin[i]
                out = full + op[i] - begin[i] - end[i]
            tp += [-bi, bi + out - full]
        y = F.pad(y, tp)
        if b is not None:
            y = y + b.reshape((1, -1) + (1,) * nd)
        return y

    return convt_general


def _pool_common(ctx: _Ctx) -> tuple[int, list[int], list[int], list[int], list[int], str, bool]:
    k = ctx.attr("kernel_shape")
    if k is None:
        ctx.fail("kernel_shape is required")
    nd = len(k)
    if nd not in _MAXPOOL:
        ctx.fail(f"{nd}-D pooling is not supported")
    s = _ints_attr(ctx, "strides", nd, 1)
    d = _ints_attr(ctx, "dilations", nd, 1)
    pads = _ints_attr(ctx, "pads", 2 * nd, 0)
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        ctx.fail(f"auto_pad={auto_pad!r} is not supported")
    if auto_pad == "VALID":
        pads = [0] * (2 * nd)
    return nd, [int(i) for i in k], s, d, pads, auto_pad, bool(ctx.attr("ceil_mode", 0))


@_op("MaxPool")
def _b_maxpool(ctx: _Ctx) -> Fn:
    ctx.only_first_output()
    nd, k, s, d, pads, auto_pad, ceil = _pool_common(ctx)
    pool = _MAXPOOL[nd]
    if auto_pad in ("NOTSET", "VALID"):
        begin, end = pads[:nd], pads[nd:]
        if begin == end and all(p <= kk // 2 for p, kk in zip(begin, k, strict=True)):
            return lambda x: pool(x, k, s, begin, d, ceil)
        tp = _torch_pads(begin, end)
        return lambda x: pool(F.pad(x, tp, value=-math.inf), k, s, 0, d, ceil)
    upper = auto_pad == "SAME_UPPER"

    def maxpool_same(x: torch.Tensor) -> torch.Tensor:
        bg, en = same_pads(x.shape[2:], k, s, d, upper)
        return pool(F.pad(x, _torch_pads(bg, en), value=-math.inf), k, s, 0, d, False)

    return maxpool_same


@_op("AveragePool")
def _b_avgpool(ctx: _Ctx) -> Fn:
    nd, k, s, d, pads, auto_pad, ceil = _pool_common(ctx)
    if any(v != 1 for v in d):
        ctx.fail("dilations are not supported for AveragePool")
    pool = _AVGPOOL[nd]
    include = bool(ctx.attr("count_include_pad", 0))
    if auto_pad in ("NOTSET", "VALID"):
        begin, end = pads[:nd], pads[nd:]
        if begin == end and all(p <= kk // 2 for p, kk in zip(begin, k, strict=True)):
            return lambda x: pool(x, k, s, begin, ceil, include)
        fixed: list[int] | None = _torch_pads(begin, end)
    else:
        fixed = None
    upper = auto_pad == "SAME_UPPER"
    cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def avgpool_explicit(x: torch.Tensor) -> torch.Tensor:
        tp = fixed if fixed is not None else _torch_pads(*same_pads(x.shape[2:], k, s, d, upper))
        c = ceil if fixed is not None else False
        y = pool(F.pad(x, tp), k, s, 0, c, True)
        if include:
            return y
        key = (tuple(x.shape[2:]), x.device, x.dtype)
        den = cache.get(key)
        if den is None:  # fraction of each window that lies in the input
            ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
            den = cache[key] = pool(F.pad(ones, tp), k, s, 0, c, True)
        return y / den

    return avgpool_explicit


@_op("GlobalAveragePool")
def _b_gap(ctx: _Ctx) -> Fn:
    def gap(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return x.mean((2, 3), keepdim=True)
        return x.mean(tuple(range(2, x.dim())), keepdim=True)

    return gap


@_op("GlobalMaxPool")
def _b_gmp(ctx: _Ctx) -> Fn:
    return lambda x: x.amax(tuple(range(2, x.dim())), keepdim=True)


@_op("LRN")
def _b_lrn(ctx: _Ctx) -> Fn:
    size = int(ctx.attr("size"))
    alpha = float(ctx.attr("alpha", 1e-4))
    beta = float(ctx.attr("beta", 0.75))
    bias = float(ctx.attr("bias", 1.0))
    if size % 2 == 0:
        ctx.fail("even size is not supported")
    return lambda x: F.local_response_norm(x, size, alpha, beta, bias)


# --------------------------------------------------------------------------------------------------
# normalisation, softmax, reductions
# --------------------------------------------------------------------------------------------------


@_op("BatchNormalization")
def _b_batchnorm(ctx: _Ctx) -> Fn:
    if ctx.attr("training_mode", 0):
        ctx.fail("training_mode=1 is not supported")
    ctx.only_first_output()
    eps = float(ctx.attr("epsilon", 1e-5))
    return lambda x, sc, b, m, v: F.batch_norm(x, m, v, sc, b, False, 0.0, eps)


@_op("InstanceNormalization")
def _b_instancenorm(ctx: _Ctx) -> Fn:
    eps = float(ctx.attr("epsilon", 1e-5))
    return lambda x, sc, b: F.instance_norm(x, weight=sc, bias=b, eps=eps)


@_op("LayerNormalization")
def _b_layernorm(ctx: _Ctx) -> Fn:
    ctx.only_first_output()
    axis = int(ctx.attr("axis", -1))
    eps = float(ctx.attr("epsilon", 1e-5))

    def ln(x: torch.Tensor, sc: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        ns = x.shape[_norm(axis, x.dim()) :]
        if sc.shape == ns and (b is None or b.shape == ns):
            return F.layer_norm(x, ns, sc, b, eps)
        y = F.layer_norm(x, ns, None, None, eps) * sc
        return y if b is None else y + b

    return ln


@_op("Softmax", "LogSoftmax")
def _b_softmax(ctx: _Ctx) -> Fn:
    f = F.softmax if ctx.op == "Softmax" else F.log_softmax
    if ctx.opset >= 13:
        axis = int(ctx.attr("axis", -1))
        return lambda x: f(x, axis)
    axis = int(ctx.attr("axis", 1))

    def softmax_2d(x: torch.Tensor) -> torch.Tensor:  # opset < 13: coerce to 2-D at axis
        a = _norm(axis, x.dim())
        if a == x.dim() - 1:
            return f(x, -1)
        shp = x.shape
        return f(x.reshape(math.prod(shp[:a]), -1), 1).reshape(shp)

    return softmax_2d


def _sum_square(x: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return (x * x).sum(dim, keepdim=keepdim)


def _l1(x: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return x.abs().sum(dim, keepdim=keepdim)


def _l2(x: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return torch.linalg.vector_norm(x, 2, dim, keepdim=keepdim)


def _prod(x: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    for a in sorted(dim, reverse=True):
        x = x.prod(a, keepdim=keepdim)
    return x


def _log_sum(x: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return torch.log(x.sum(dim, keepdim=keepdim))


_REDUCE: dict[str, Fn] = {
    "ReduceMean": torch.mean,
    "ReduceSum": torch.sum,
    "ReduceMax": torch.amax,
    "ReduceMin": torch.amin,
    "ReduceProd": _prod,
    "ReduceL1": _l1,
    "ReduceL2": _l2,
    "ReduceSumSquare": _sum_square,
    "ReduceLogSum": _log_sum,
    "ReduceLogSumExp": torch.logsumexp,
}


@_op(*_REDUCE)
def _b_reduce(ctx: _Ctx) -> Fn:
    f = _REDUCE[ctx.op]
    keep = bool(ctx.attr("keepdims", 1))
    axes = ctx.attr("axes")
    if axes is None and ctx.has(1):
        axes = ctx.ints(1, "axes")
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            return _identity
        return lambda x, *_: f(x, tuple(range(x.dim())), keepdim=keep)
    ax = tuple(int(a) for a in axes)
    return lambda x, *_: f(x, ax, keepdim=keep)


@_op("ArgMax", "ArgMin")
def _b_argmax(ctx: _Ctx) -> Fn:
    f = torch.argmax if ctx.op == "ArgMax" else torch.argmin
    axis = int(ctx.attr("axis", 0))
    keep = bool(ctx.attr("keepdims", 1))
    if not ctx.attr("select_last_index", 0):
        return lambda x: f(x, axis, keepdim=keep)

    def last(x: torch.Tensor) -> torch.Tensor:
        a = _norm(axis, x.dim())
        return x.shape[a] - 1 - f(torch.flip(x, (a,)), a, keepdim=keep)

    return last


# --------------------------------------------------------------------------------------------------
# resize
# --------------------------------------------------------------------------------------------------


def _source_coords(
    n_in: int, n_out: int, scale: float, mode: str
) -> np.ndarray:  # float32, as onnxruntime computes them
    xr = np.arange(n_out, dtype=np.float32)
    sc = np.float32(scale)
    if mode == "half_pixel":
        return (xr + np.float32(0.5)) / sc - np.float32(0.5)
    if mode == "pytorch_half_pixel":
        if n_out <= 1:
            return np.zeros(n_out, np.float32)
        return (xr + np.float32(0.5)) / sc - np.float32(0.5)
    if mode == "align_corners":
        if n_out <= 1:
            return np.zeros(n_out, np.float32)
        return xr * np.float32(n_in - 1) / np.float32(n_out - 1)
    if mode == "asymmetric":
        return xr / sc
    if mode == "tf_half_pixel_for_nn":
        return (xr + np.float32(0.5)) / sc
    if mode == "half_pixel_symmetric":
        adj = np.float32(n_out) / (sc * np.float32(n_in))
        center = np.float32(n_in) / np.float32(2)
        offset = center * (np.float32(1) - adj)
        return offset + (xr + np.float32(0.5)) / sc - np.float32(0.5)
    raise ValueError(mode)


def _nearest_index(xo: np.ndarray, mode: str, scale: float, n_in: int) -> np.ndarray:
    if mode == "round_prefer_floor":
        fl = np.floor(xo)
        i = np.where(xo - fl == 0.5, fl, np.round(xo))
    elif mode == "round_prefer_ceil":
        i = np.floor(xo + np.float32(0.5))
    elif mode == "floor":
        i = np.floor(xo)
    elif mode == "ceil":
        i = np.ceil(xo)
    else:  # "simple" (Upsample, Resize-10): ceil when downsampling, else truncation
        i = np.ceil(xo) if scale < 1 else np.trunc(xo)
    return np.clip(i, 0, n_in - 1).astype(np.int64)


_COORD_MODES = {
    "half_pixel",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_half_pixel_for_nn",
    "half_pixel_symmetric",
}
_NEAREST_MODES = {"round_prefer_floor", "round_prefer_ceil", "floor", "ceil"}


def _resize_plan(shape: tuple[int, ...], scales: tuple[float, ...] | None, sizes: tuple[int, ...] | None,
                 axes_attr: Any, mode: str, coord: str, nearest: str) -> list[Any]:
    """Per resized axis: (axis, source index, second source index and weight for linear, or None)."""
    r = len(shape)
    axes = list(range(r)) if axes_attr is None else [_norm(int(a), r) for a in axes_attr]
    full_s = [1.0] * r
    full_o = list(shape)
    if sizes:
        for a, o in zip(axes, sizes, strict=True):
            full_o[a] = int(o)
            full_s[a] = float(np.float32(o) / np.float32(shape[a])) if shape[a] else 1.0
    elif scales:
        for a, sc in zip(axes, scales, strict=True):
            full_s[a] = float(sc)
            full_o[a] = int(np.floor(np.float32(shape[a]) * np.float32(sc)))
    steps = []
    for a in range(r):
        n, o, sc = shape[a], full_o[a], full_s[a]
        if o == n and sc == 1.0:
            continue
        xo = _source_coords(n, o, sc, coord)
        if mode == "nearest":
            steps.append((a, _nearest_index(xo, nearest, sc, n), None, None))
        else:
            xo = np.clip(xo, 0, n - 1)
            i0 = np.floor(xo).astype(np.int64)
            i1 = np.minimum(i0 + 1, n - 1)
            steps.append((a, i0, i1, (xo - i0).astype(np.float64)))
    return steps


@_op("Resize", "Upsample")
def _b_resize(ctx: _Ctx) -> Fn:
    mode = str(ctx.attr("mode", "nearest")).lower()
    if mode == "bilinear":
        mode = "linear"
    if mode not in ("nearest", "linear"):
        ctx.fail(f"mode {mode!r} is not supported (nearest and linear only)")
    legacy = ctx.op == "Upsample" or ctx.opset < 11
    scales_attr = ctx.attr("scales")
    axes_attr = ctx.attr("axes")
    if legacy:
        coord, nearest = "asymmetric", "simple"
        scale_i, size_i = (None if scales_attr is not None else 1), None
    else:
        coord = ctx.attr("coordinate_transformation_mode", "half_pixel")
        nearest = ctx.attr("nearest_mode", "round_prefer_floor")
        if coord not in _COORD_MODES:
            ctx.fail(f"coordinate_transformation_mode={coord!r} is not supported")
        if nearest not in _NEAREST_MODES:
            ctx.fail(f"nearest_mode={nearest!r} is not supported")
        if ctx.attr("antialias", 0):
            ctx.fail("antialias=1 is not supported")
        if ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
            ctx.fail("keep_aspect_ratio_policy other than 'stretch' is not supported")
        scale_i, size_i = 2, 3
    cache: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def resize(x: torch.Tensor, *rest: Any) -> torch.Tensor:
        scales: list[float] | None = None
        sizes: list[int] | None = None
        if scales_attr is not None:
            scales = [float(v) for v in scales_attr]
        elif scale_i is not None and len(rest) >= scale_i and rest[scale_i - 1] is not None:
            scales = rest[scale_i - 1].reshape(-1).tolist() or None
        if size_i is not None and len(rest) >= size_i and rest[size_i - 1] is not None:
            sizes = [int(v) for v in rest[size_i - 1].reshape(-1).tolist()] or None
        key = (
            tuple(x.shape),
            None if scales is None else tuple(scales),
            None if sizes is None else tuple(sizes),
        )
        ckey = (*key, x.device, x.dtype)
        tens = cache.get(ckey)
        if tens is None:
            built: list[Any] = []
            for a, i0, i1, w in _resize_plan(*key, axes_attr, mode, coord, nearest):
                t0 = torch.from_numpy(i0).to(x.device)
                if i1 is None:
                    built.append((a, t0, None, None))
                else:
                    shape = [1] * x.dim()
                    shape[a] = -1
                    tw = torch.from_numpy(w).to(device=x.device, dtype=x.dtype).reshape(shape)
                    built.append((a, t0, torch.from_numpy(i1).to(x.device), tw))
            tens = cache[ckey] = tuple(built)
        for a, t0, t1, tw in tens:
            if t1 is None:
                x = x.index_select(a, t0)
            else:
                x0 = x.index_select(a, t0)
                x = x0 + (x.index_select(a, t1) - x0) * tw
        return x

    return resize


# --------------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------------


def _per_axis(p: torch.Tensor, x: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """Broadcast a quantization parameter (scalar, per-axis or blocked) against x."""
    if p.dim() == 0 or (p.numel() == 1 and block == 0):
        return p.reshape(())
    a = _norm(axis, x.dim())
    if block > 0:
        return p.repeat_interleave(block, dim=a).narrow(a, 0, x.shape[a])
    shape = [1] * x.dim()
    shape[a] = -1
    return p.reshape(shape)


@_op("DequantizeLinear")
def _b_dequantize(ctx: _Ctx) -> Fn:
    axis = int(ctx.attr("axis", 1))
    block = int(ctx.attr("block_size", 0))

    def dq(q: torch.Tensor, s: torch.Tensor, zp: torch.Tensor | None = None) -> torch.Tensor:
        qf = q.to(s.dtype)
        if zp is not None:
            qf = qf - _per_axis(zp.to(s.dtype), q, axis, block)
        return qf * _per_axis(s, q, axis, block)

    return dq


@_op("QuantizeLinear")
def _b_quantize(ctx: _Ctx) -> Fn:
    axis = int(ctx.attr("axis", 1))
    block = int(ctx.attr("block_size", 0))
    et = ctx.elem_type(2) if ctx.has(2) else ctx.attr("output_dtype") or TensorProto.UINT8
    if et is not None and et != 0:
        if et not in _QRANGE:
            ctx.fail(f"quantization to {TensorProto.DataType.Name(et)} is not supported")
        qmin, qmax = _QRANGE[et]
    else:  # zero point produced by another (folded) node: use its torch dtype
        zp = ctx.const(2)
        if zp is None or zp.dtype not in _TORCH_QRANGE:
            ctx.fail("cannot tell the quantized type")
        qmin, qmax = _TORCH_QRANGE[zp.dtype]

    def q(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor | None = None) -> torch.Tensor:
        v = x / _per_axis(s, x, axis, block)
        v = v + (torch.round(v) - v).detach()  # straight-through estimator for the rounding
        if zp is not None:
            v = v + _per_axis(zp.to(v.dtype), x, axis, block)
        return torch.clamp(v, qmin, qmax)

    return q


SUPPORTED_OPS: frozenset[str] = frozenset(_BUILDERS)


# --------------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------------


def _fold_node(fn: Fn, cvals: list[torch.Tensor | None], node: onnx.NodeProto, multi: bool,
               label: str) -> dict[str, torch.Tensor]:
    """The outputs of a node whose inputs are all constant, evaluated once at construction."""
    try:
        with torch.no_grad():
            res = fn(*cvals)
    except Exception as e:  # a model bug or an op configuration we do not handle
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnsupportedModelError(f"{label}: cannot evaluate on constants ({msg})") from None
    outs = list(res) if multi else [res]
    return {o: v for o, v in zip(node.output, outs, strict=False) if o}


class TorchPrefix(torch.nn.Module):
    """The part of an ONNX graph that computes ``outputs`` from ``input_name``, as a torch module.

    ``forward(x)`` returns the requested tensors, in the order given, as a list; gradients flow back
    to ``x``. ``input_name`` defaults to the only graph input that is not an initializer; it may also
    name an intermediate tensor (the graph is then cut there). Weights and every other tensor that
    does not depend on the input are folded at construction into non-trainable buffers.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        outputs: Sequence[str],
        input_name: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if isinstance(outputs, str):
            outputs = [outputs]
        if not outputs:
            raise BadInputError("no output tensor requested")
        if not dtype.is_floating_point:
            raise BadInputError(f"dtype must be a floating type, not {dtype}")
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        inits = {t.name: t for t in graph.initializer}
        graph_inputs = [i.name for i in graph.input if i.name not in inits]
        nodes = list(graph.node)
        producer: dict[str, int] = {}
        for idx, n in enumerate(nodes):
            for o in n.output:
                if o:
                    producer[o] = idx
        if input_name is None:
            if len(graph_inputs) != 1:
                raise UnsupportedModelError(
                    f"the model has {len(graph_inputs)} inputs ({', '.join(graph_inputs)}); name the one that varies"
                )
            input_name = graph_inputs[0]
        elif input_name not in graph_inputs and input_name not in producer:
            raise BadInputError(f"tensor {input_name!r} is neither a graph input nor a node output")
        for name in outputs:
            if name != input_name and name not in inits and name not in producer:
                raise BadInputError(f"tensor {name!r} is not in the model")
        self.input_name = input_name
        self.output_names = list(outputs)
        self._dtype = dtype

        order = self._slice(nodes, producer, outputs, input_name, set(inits))
        uses = Counter(i for idx in order for i in nodes[idx].input if i)
        uses.update(outputs)
        consumed = set(uses)

        plan, consts = self._evaluate(nodes, order, inits, graph_inputs, opset, uses)
        self._schedule(plan, consts, consumed)
        self.runtime_ops = [p[4] for p in plan]  # op types run in forward ("Conv+BatchNormalization" if fused)
        self._template: list[Any] = []
        self._refresh_template()

    def _evaluate(
        self,
        nodes: list[onnx.NodeProto],
        order: list[int],
        inits: dict[str, onnx.TensorProto],
        graph_inputs: list[str],
        opset: int,
        uses: Counter[str],
    ) -> tuple[list[tuple[Fn, list[str], list[str], bool, str]], dict[str, torch.Tensor]]:
        """Evaluate the slice: fold what is constant into tensors, pre-bind the rest as the run-time plan."""
        input_name, outputs, dtype = self.input_name, self.output_names, self._dtype
        consumed = set(uses)
        consts: dict[str, torch.Tensor] = {}
        elem_types: dict[str, int] = {n: t.data_type for n, t in inits.items()}
        dynamic: set[str] = {input_name}
        plan: list[tuple[Fn, list[str], list[str], bool, str]] = []
        conv_at: dict[str, int] = {}  # output of a Conv with constant weights → its index in plan
        other_inputs = set(graph_inputs) - {input_name}

        def const_of(name: str) -> torch.Tensor | None:
            if name in consts:
                return consts[name]
            if name in inits and name not in dynamic:
                try:
                    # external data is mapped from its file, not copied
                    consts[name] = _np_to_torch(tensor_array(inits[name], mapped=True), dtype)
                except TypeError as e:
                    raise UnsupportedModelError(f"initializer {name!r}: {e}") from None
                return consts[name]
            return None

        for idx in order:
            node = nodes[idx]
            label = f"{node.op_type} node {node.name or '<unnamed>'!r}"
            if node.domain not in ("", "ai.onnx"):
                raise UnsupportedModelError(f"{label}: custom domain {node.domain!r} is not supported")
            builder = _BUILDERS.get(node.op_type)
            if builder is None:
                raise UnsupportedModelError(f"{label}: op {node.op_type!r} is not supported")
            present = [bool(i) for i in node.input]
            cvals: list[torch.Tensor | None] = []
            for i in node.input:
                if not i:
                    cvals.append(None)
                    continue
                if i in other_inputs and i not in inits:
                    raise UnsupportedModelError(
                        f"{label}: needs graph input {i!r}, which is not the varying input {input_name!r}"
                    )
                cvals.append(None if i in dynamic else const_of(i))
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                elem_types[node.output[0]] = node.attribute[0].t.data_type
            ctx = _Ctx(node, opset, dtype, cvals, present, [elem_types.get(i) for i in node.input],
                       [o in consumed for o in node.output])
            fn = builder(ctx)
            multi = len(node.output) > 1 and not ctx.first_output_only
            is_dyn = any(i in dynamic for i in node.input if i)
            if is_dyn:
                dynamic.update(o for o in node.output if o)
                if node.op_type == "BatchNormalization" and self._fuse_bn(node, cvals, uses, conv_at, plan, consts):
                    continue
                if (
                    node.op_type == "Conv"
                    and cvals[1] is not None
                    and (len(cvals) < 3 or not present[2] or cvals[2] is not None)
                ):
                    conv_at[node.output[0]] = len(plan)
                plan.append((fn, list(node.input), list(node.output), multi, node.op_type))
                continue
            consts.update(_fold_node(fn, cvals, node, multi, label))

        for name in outputs:
            if name not in dynamic and const_of(name) is None:
                raise BadInputError(f"tensor {name!r} cannot be computed from {input_name!r}")
        return plan, consts

    def _schedule(
        self,
        plan: list[tuple[Fn, list[str], list[str], bool, str]],
        consts: dict[str, torch.Tensor],
        consumed: set[str],
    ) -> None:
        """Give every tensor of the plan a slot, the constants it reads buffers, and free each intermediate
        after its last use."""
        input_name, outputs = self.input_name, self.output_names
        # Slots: 0 holds None (missing optional inputs), 1 is a sink for unused outputs.
        slot: dict[str, int] = {}

        def slot_of(name: str) -> int:
            if not name:
                return 0
            if name not in slot:
                slot[name] = len(slot) + 2
            return slot[name]

        x_slot = slot_of(input_name)
        steps: list[tuple[Fn, tuple[int, ...], Any, bool, tuple[int, ...]]] = []
        for fn, ins, outs, multi, _ in plan:
            in_slots = tuple(slot_of(i) for i in ins)
            out_slots = tuple(slot_of(o) if o in consumed else 1 for o in outs)
            steps.append((fn, in_slots, out_slots if multi else out_slots[0], multi, ()))
        result_slots = [slot_of(o) for o in outputs]

        # Constants used at run time become buffers.
        self._const_slots: list[tuple[int, str]] = []
        for name, s in slot.items():
            if name in consts:
                bname = f"c{s}"
                self.register_buffer(bname, consts[name], persistent=False)
                self._const_slots.append((s, bname))
        # Free each intermediate after its last use (keeps no-grad memory low).
        last_use: dict[int, int] = {}
        for k, (_, in_slots, _, _, _) in enumerate(steps):
            for s in in_slots:
                last_use[s] = k
        keep = {x_slot, *result_slots, *(s for s, _ in self._const_slots), 0, 1}
        frees: dict[int, list[int]] = {}
        for s, k in last_use.items():
            if s not in keep:
                frees.setdefault(k, []).append(s)
        self._steps = [
            (fn, ins, out, multi, tuple(frees.get(k, ()))) for k, (fn, ins, out, multi, _) in enumerate(steps)
        ]
        self._n_slots = len(slot) + 2
        self._x_slot = x_slot
        self._out_slots = result_slots

    @staticmethod
    def _fuse_bn(
        node: onnx.NodeProto,
        cvals: list[torch.Tensor | None],
        uses: Counter[str],
        conv_at: dict[str, int],
        plan: list[tuple[Fn, list[str], list[str], bool, str]],
        consts: dict[str, torch.Tensor],
    ) -> bool:
        """Fold an inference BatchNormalization into the Conv that feeds only it (as ORT does)."""
        src = node.input[0]
        params = [c.double() for c in cvals[1:5] if c is not None]
        if src not in conv_at or uses[src] != 1 or len(params) != 4:
            return False
        k = conv_at.pop(src)
        fn, ins, _, _, _ = plan[k]
        sc, bb, mean, var = params
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        w = consts[ins[1]]
        b = consts[ins[2]].double() if len(ins) > 2 and ins[2] else torch.zeros_like(mean)
        factor = sc / torch.sqrt(var + eps)
        key = f"\0{node.output[0]}"
        consts[key + ":w"] = (w.double() * factor.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        consts[key + ":b"] = ((b - mean) * factor + bb).to(w.dtype)
        plan[k] = (fn, [ins[0], key + ":w", key + ":b"], [node.output[0]], False, "Conv+BatchNormalization")
        return True

    @staticmethod
    def _slice(
        nodes: list[onnx.NodeProto],
        producer: dict[str, int],
        outputs: Sequence[str],
        input_name: str,
        inits: set[str],
    ) -> list[int]:
        """Indices of the nodes needed for ``outputs``, in topological (post-DFS) order."""
        order: list[int] = []
        state: dict[int, int] = {}  # 1 = on the stack, 2 = done
        stack: list[tuple[int, bool]] = []

        def push(name: str) -> None:
            if name and name != input_name and name not in inits and name in producer:
                j = producer[name]
                if j not in state:
                    stack.append((j, False))
                elif state[j] == 1:
                    raise UnsupportedModelError(f"the graph has a cycle through {name!r}")

        for name in reversed(list(outputs)):
            push(name)
        while stack:
            i, expanded = stack.pop()
            if expanded:
                state[i] = 2
                order.append(i)
                continue
            if i in state:
                continue
            state[i] = 1
            stack.append((i, True))
            for name in reversed(nodes[i].input):
                push(name)
        return order

    def _refresh_template(self) -> None:
        t: list[Any] = [None] * self._n_slots
        for s, bname in self._const_slots:
            t[s] = getattr(self, bname)
        self._template = t

    def _apply(self, fn: Any, recurse: bool = True) -> TorchPrefix:
        super()._apply(fn, recurse)  # .to(device), .double()...: follow the buffers
        self._refresh_template()
        self._dtype = next((b.dtype for b in self.buffers() if b.is_floating_point()), self._dtype)
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dtype != self._dtype and x.is_floating_point():
            x = x.to(self._dtype)
        env = self._template.copy()
        env[self._x_slot] = x
        for fn, ins, out, multi, free in self._steps:
            r = fn(*[env[i] for i in ins])
            if multi:
                for s, v in zip(out, r, strict=False):
                    env[s] = v
            else:
                env[out] = r
            for s in free:
                env[s] = None
        return [env[s] for s in self._out_slots]

    def extra_repr(self) -> str:
        return f"input={self.input_name!r}, outputs={self.output_names!r}, ops={len(self._steps)}"


def prefix_for_input(model: onnx.ModelProto, outputs: Sequence[str], input_shape: tuple[int, ...],
                     providers: list[str] | None = None) -> TorchPrefix:
    """A :class:`TorchPrefix` for inputs of ``input_shape`` (any batch size): the subgraphs that depend on
    the input's height and width only (run-time "same" padding, token counts...) are evaluated first and
    enter as constants; what depends on the batch size stays computed."""
    from ._onnx.fold import fold_shape_only
    from ._onnx.shapes import example_input

    return TorchPrefix(fold_shape_only(model, example_input(model, input_shape), providers, any_batch=True), outputs)


def torch_prefix(
    model: onnx.ModelProto | str | os.PathLike[str],
    outputs: Sequence[str],
    input_name: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> TorchPrefix:
    """Build a :class:`TorchPrefix` (``model`` may also be the path of an ``.onnx`` file)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    return TorchPrefix(model, outputs, input_name=input_name, dtype=dtype)
