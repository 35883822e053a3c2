"""Host activations: their values in float64, and the *zero point* below which float32 gives exactly 0.

A detector that overwrites a neuron in place computes ``act(g (S − τ) + z)``. Where the host's
activation is exactly 0 for every pre-activation ≤ ``z`` (its zero point), "not firing" (``S ≤ τ``)
means an exact 0 downstream, as with a ReLU. Activations with a negative lobe that never reaches an
exact zero (LeakyReLU, PReLU, ELU) have no zero point (``None``). docs/bounds.md, "Activations other
than ReLU", gives the measurements behind each value.

Kinds (``params`` in brackets): ``relu``, ``relu6``, ``clip`` (upper clip passed as ``high``),
``leaky_relu`` [α], ``prelu`` [per-channel slopes, or one], ``elu`` [α], ``hardswish``,
``hardsigmoid`` [α, β], ``silu``, ``gelu`` (erf form), ``gelu_tanh``, ``mish``.
"""

from __future__ import annotations

import numpy as np
from scipy import special

#: Pre-activations at or below these give exactly 0 in float32 and float16 (onnxruntime CPU measured, and
#: any IEEE implementation of the usual formulas), with a margin: see docs/bounds.md.
ZERO_POINTS: dict[str, float] = {
    "relu": 0.0,
    "relu6": 0.0,
    "clip": 0.0,
    "hardswish": -4.0,  # x · clip(x + 3, 0, 6) / 6 is exactly (−)0 for x ≤ −3
    "gelu": -6.0,  # Erf(x/√2) rounds to −1 below x ≈ −5.54
    "gelu_tanh": -6.0,  # Tanh rounds to −1 below x ≈ −5.15
    "silu": -110.0,  # x · σ(x): 0 below −18 (onnxruntime CPU), below −104 wherever exp(x) underflows
    "mish": -110.0,  # x · tanh(softplus(x)): 0 below −98.7 (onnxruntime), −104 where exp(x) underflows
}

#: Kinds a detector can be hosted under (an inserted detector carries its own Clip, so any of them).
HOST_KINDS = frozenset(ZERO_POINTS) | {"leaky_relu", "prelu", "elu", "hardsigmoid"}

#: One-line descriptions of the negative side, for messages.
NEGATIVE_SIDE: dict[str, str] = {
    "leaky_relu": "α·x",
    "prelu": "a per-channel slope times x",
    "elu": "α(eˣ − 1), which tends to −α",
}


def zero_point(kind: str, params: tuple[float, ...] = ()) -> float | None:
    """The zero point of ``kind``: pre-activations ≤ it give exactly 0; None where there is none."""
    if kind == "hardsigmoid":
        alpha, beta = params
        return -beta / alpha - 1.0 if alpha > 0 else None  # α x + β ≤ 0 for x ≤ −β/α
    return ZERO_POINTS.get(kind)


def apply(kind: str, x: np.ndarray, params: tuple[float, ...] = (), high: float | None = None) -> np.ndarray:
    """``kind`` applied element-wise to ``x`` in float64 (PReLU: one slope, or slopes along the last axis).

    Below the zero point the result is exactly 0, as float32 gives it.
    """
    x = np.asarray(x, np.float64)
    if kind in ("relu", "relu6", "clip"):
        return np.clip(x, 0.0, high) if high is not None else np.maximum(x, 0.0)
    if kind in ("leaky_relu", "prelu"):
        slope = np.asarray(params, np.float64)
        out = np.where(x >= 0, x, x * (slope if slope.size > 1 else float(slope.reshape(-1)[0])))
    elif kind == "elu":
        out = np.where(x > 0, x, params[0] * np.expm1(np.minimum(x, 0.0)))
    elif kind == "hardswish":
        out = x * np.clip(x + 3.0, 0.0, 6.0) / 6.0
    elif kind == "hardsigmoid":
        out = np.clip(params[0] * x + params[1], 0.0, 1.0)
    elif kind == "silu":
        out = x * special.expit(x)
    elif kind == "gelu":
        out = 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))
    elif kind == "gelu_tanh":
        out = 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    elif kind == "mish":
        out = x * np.tanh(np.logaddexp(0.0, x))
    else:
        raise ValueError(f"unknown activation {kind!r}")
    z = zero_point(kind, params)
    if z is not None:
        out = np.where(x <= z, 0.0, out)
    if high is not None:
        out = np.minimum(out, high)
    return out


def identify(xs: np.ndarray, ys: np.ndarray, rtol: float = 1e-4, atol: float = 1e-5) -> tuple[str, tuple[float, ...],
                                                                                           float | None] | None:
    """Which known activation maps probe points ``xs`` to ``ys`` (a decomposed subgraph evaluated on
    them): ``(kind, params, high)``, or None. LeakyReLU's α and a Clip's upper end are read off the
    values; the others are matched as they are."""
    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if not np.all(np.isfinite(ys)):
        return None

    def close(kind: str, params: tuple[float, ...] = (), high: float | None = None) -> bool:
        return bool(np.allclose(ys, apply(kind, xs, params, high), rtol=rtol, atol=atol))

    for kind in ("silu", "gelu", "gelu_tanh", "mish", "hardswish"):
        if close(kind):
            return kind, (), None
    top = float(ys.max())
    if top < float(xs.max()) and close("clip", high=top):
        return ("relu6" if abs(top - 6.0) < 1e-6 else "clip"), (), top
    if close("relu"):
        return "relu", (), None
    neg = xs < 0
    if neg.any():
        alpha = float(np.median(ys[neg] / xs[neg]))
        if 0 < alpha < 1 and close("leaky_relu", (alpha,)):
            return "leaky_relu", (alpha,), None
    return None


def _unary(f):
    return lambda xs, attrs: f(xs[0])


def _clip(xs, attrs):
    lo = xs[1] if len(xs) > 1 and xs[1] is not None else attrs.get("min")
    hi = xs[2] if len(xs) > 2 and xs[2] is not None else attrs.get("max")
    return np.clip(xs[0], lo, hi)


def _fold(f):
    def fn(xs, attrs):
        out = xs[0]
        for x in xs[1:]:
            out = f(out, x)
        return out

    return fn


#: Element-wise ONNX ops by name, evaluated in float64 on probe points (``inputs``, ``attributes``), to
#: recognise an activation exported as a decomposition (Erf or Tanh GELU, x·Sigmoid(x), x·Tanh(Softplus(x)),
#: x·Clip(x + 3, 0, 6)/6, Max/Min pairs ...).
ELEMENTWISE = {
    "Add": _fold(np.add), "Sub": _fold(np.subtract), "Mul": _fold(np.multiply), "Div": _fold(np.divide),
    "Max": _fold(np.maximum), "Min": _fold(np.minimum), "Sum": _fold(np.add),
    "Pow": lambda xs, attrs: np.power(xs[0], xs[1]),
    "Neg": _unary(np.negative), "Abs": _unary(np.abs), "Erf": _unary(special.erf), "Tanh": _unary(np.tanh),
    "Sigmoid": _unary(special.expit), "Softplus": _unary(lambda x: np.logaddexp(0.0, x)),
    "Exp": _unary(np.exp), "Log": _unary(np.log), "Sqrt": _unary(np.sqrt), "Reciprocal": _unary(np.reciprocal),
    "Relu": _unary(lambda x: np.maximum(x, 0.0)), "Identity": _unary(lambda x: x), "Clip": _clip,
    "HardSigmoid": lambda xs, attrs: np.clip(attrs.get("alpha", 0.2) * xs[0] + attrs.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": _unary(lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0),
    "LeakyRelu": lambda xs, attrs: np.where(xs[0] >= 0, xs[0], attrs.get("alpha", 0.01) * xs[0]),
    "Mish": _unary(lambda x: x * np.tanh(np.logaddexp(0.0, x))),
    "Gelu": lambda xs, attrs: apply("gelu_tanh" if attrs.get("approximate") == "tanh" else "gelu", xs[0]),
}

#: Probe points for :func:`identify`: both sides of zero, the kinks of ReLU6/HardSwish, and a far negative tail.
PROBES = np.concatenate([np.linspace(-8.0, 8.0, 129), [-3.0, 3.0, 6.0, 7.5, -12.0, -20.0, -40.0]])
