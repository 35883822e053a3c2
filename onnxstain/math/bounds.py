"""False-positive bounds for random-direction detectors (pure numpy/scipy; see docs/bounds.md).

Setting.  A detector has a unit direction ``v`` drawn uniformly on the sphere S^{n-1}.  On an input whose
centred feature is ``f = phi(x) - c`` it *fires* iff ``v . f > tau``, where the margin ``tau > 0`` is
committed *before* ``v`` is drawn.  A conv detector is evaluated at ``P`` spatial positions and fires on
an image if it fires at any of them.  Detectors with independent directions may be ANDed (a lock: all
must fire at the same position) or ORed (several keys/stains: any one fires).

Every probability below is over the random key ``v`` (and, for the data-driven bounds, over a random
input), never over a fixed key.  The basic quantity is the spherical cap

    cap(eps, n) = Pr_v[v . e >= eps] = 1/2 I_{1-eps^2}((n-1)/2, 1/2)      (0 <= eps < 1, any unit e),

so for a fixed input with ``||f|| <= R`` the detector fires with probability ``<= cap(tau / R, n)``.

Bounds are returned as :class:`Bound` objects that carry the value in linear and log10 form (the log10
form stays finite far below the float64 range, e.g. 1e-460), the kind of guarantee, the parameters
needed to recompute it, and one sentence saying what exactly is bounded under which condition.

Kinds:

* ``"data-free"``: worst case over every input in a ball whose radius is *certified* for the whole
  input domain (e.g. by box geometry or interval bound propagation).
* ``"calibrated-radius"``: the same worst-case formula, but the radius was *estimated* from
  calibration data; the statement holds for inputs inside that radius only.
* ``"data-driven"``: an upper confidence bound on the firing rate averaged over the data distribution,
  valid with a stated probability over a held-out sample.
* ``"cross-key"``: probability that another key's independent detector fires on this key's trigger.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special

__all__ = [
    "KINDS",
    "Bound",
    "ball_bound",
    "box_ball",
    "cap_bound_gaussian",
    "cap_bound_power",
    "cap_probability",
    "cross_key_bound",
    "data_driven_bound",
    "format_probability",
    "log10_cap_bound_power",
    "log10_cap_probability",
    "mixed_bound",
    "per_image_cap_sums",
    "radius_exceedance_bound",
    "threshold_for_target",
    "window_side",
]

KINDS: tuple[str, ...] = ("data-free", "calibrated-radius", "data-driven", "cross-key")

_LN10 = math.log(10.0)
# Below this the direct float64 value of the cap is not trusted for log10 (it is still > 0, but we
# switch to the log-space continued fraction well before denormals).
_DIRECT_MIN = 1e-250
# Smallest log10 we print as an ordinary float; below, "10^-x" notation is used.
_PRINT_FLOAT_MIN_LOG10 = -300.0


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _out(x: np.ndarray) -> Any:
    """Return a Python float for 0-d results, the array otherwise."""
    x = np.asarray(x, dtype=float)
    return float(x) if x.ndim == 0 else x


def _broadcast_eps_n(eps: npt.ArrayLike, n: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    e, nn = np.broadcast_arrays(np.asarray(eps, dtype=float), np.asarray(n, dtype=float))
    if np.any(~(nn >= 2)):
        raise ValueError(f"dimension n must be >= 2, got {n!r}")
    return e, nn


def _check_count(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _one_minus_sq(e: np.ndarray) -> np.ndarray:
    """1 - e^2 computed as (1-e)(1+e), clipped to [0, 1] (so e >= 1 -> 0, NaN stays NaN)."""
    with np.errstate(invalid="ignore"):
        return np.clip((1.0 - e) * (1.0 + e), 0.0, 1.0)


def _betacf(x: np.ndarray, a: np.ndarray, b: float, tol: float = 1e-15, maxiter: int = 20000) -> np.ndarray:
    """Continued fraction of the incomplete beta function (modified Lentz, vectorised).

    ``I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * _betacf(x, a, b)``; converges quickly for
    ``x < (a + 1) / (a + b + 2)``, which is where it is used (see :func:`_ln_cap_cf`).
    """
    tiny = 1e-300
    x = np.asarray(x, dtype=float)
    a = np.asarray(a, dtype=float)
    qab, qap, qam = a + b, a + 1.0, a - 1.0

    def fix(z: np.ndarray) -> np.ndarray:
        return np.where(np.abs(z) < tiny, tiny, z)

    c = np.ones_like(x)
    d = 1.0 / fix(1.0 - qab * x / qap)
    h = d.copy()
    active = np.ones(x.shape, dtype=bool)
    for m in range(1, maxiter + 1):
        m2 = 2.0 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 / fix(1.0 + aa * d)
        c = fix(1.0 + aa / c)
        h = np.where(active, h * d * c, h)
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 / fix(1.0 + aa * d)
        c = fix(1.0 + aa / c)
        delta = d * c
        h = np.where(active, h * delta, h)
        active &= np.abs(delta - 1.0) >= tol
        if not active.any():
            return h
    raise RuntimeError("incomplete-beta continued fraction did not converge")  # pragma: no cover


def _ln_cap_cf(e: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Natural log of cap(e, n) for 0 < e < 1 in log space (no underflow).

    ``cap = 1/2 I_x(a, 1/2)`` with ``x = 1 - e^2`` and ``a = (n-1)/2``;
    ``ln I_x(a, b) = a ln x + b ln(1-x) - ln a - ln B(a, b) + ln CF``.
    Accurate (and fast) when ``x < (a+1)/(a+b+2)``, i.e. ``e^2 > 3/(n+4)``.
    """
    e = np.asarray(e, dtype=float)
    a = (np.asarray(n, dtype=float) - 1.0) / 2.0
    ln_x = np.log1p(-e) + np.log1p(e)
    ln_1mx = 2.0 * np.log(e)
    ln_pref = a * ln_x + 0.5 * ln_1mx - np.log(a) - special.betaln(a, 0.5) - math.log(2.0)
    cf = _betacf(np.exp(ln_x), a, 0.5)
    return ln_pref + np.log(cf)


# --------------------------------------------------------------------------------------------------
# 1-3. the spherical cap and its closed-form bounds
# --------------------------------------------------------------------------------------------------


def cap_probability(eps: npt.ArrayLike, n: npt.ArrayLike) -> Any:
    """Exact ``Pr_v[v . e >= eps]`` for ``v`` uniform on S^{n-1} and any fixed unit ``e``.

    ``= 1/2 I_{1-eps^2}((n-1)/2, 1/2)`` for ``0 <= eps < 1``, ``0`` for ``eps >= 1`` and
    ``1 - cap(-eps)`` for ``eps < 0``.  Vectorised (broadcasts ``eps`` against ``n``); ``n >= 2``
    (real ``n`` allowed).  Underflows to 0 below ~1e-308: use :func:`log10_cap_probability` there.
    """
    e, nn = _broadcast_eps_n(eps, n)
    a = (nn - 1.0) / 2.0
    half = 0.5 * special.betainc(a, 0.5, _one_minus_sq(np.abs(e)))
    return _out(np.where(e >= 0, half, 1.0 - half))


def log10_cap_probability(eps: npt.ArrayLike, n: npt.ArrayLike) -> Any:
    """``log10`` of :func:`cap_probability`, accurate far below the float64 range.

    Uses the direct value where it is >= 1e-250 and the incomplete-beta continued fraction evaluated
    in log space otherwise (e.g. ``n=1280, eps=0.9`` gives about -460).  ``-inf`` for ``eps >= 1``.
    """
    e, nn = _broadcast_eps_n(eps, n)
    ae = np.abs(e)
    a = (nn - 1.0) / 2.0
    direct = 0.5 * special.betainc(a, 0.5, _one_minus_sq(ae))
    with np.errstate(divide="ignore", invalid="ignore"):
        res = np.log10(direct)
        neg = np.log1p(-direct) / _LN10
    use_cf = (e > 0) & (ae < 1.0) & ~(direct >= _DIRECT_MIN)
    if np.any(use_cf):
        res = np.array(res, dtype=float, copy=True)
        res[use_cf] = _ln_cap_cf(ae[use_cf], nn[use_cf]) / _LN10
    res = np.where(e >= 1.0, -np.inf, res)
    return _out(np.where(e >= 0, res, neg))


def cap_bound_power(eps: npt.ArrayLike, n: npt.ArrayLike) -> Any:
    """Closed-form bound ``1/2 (1-eps^2)^((n-1)/2) >= cap(eps, n)`` for ``0 <= eps < 1``.

    Returns 0 for ``eps >= 1`` and the trivial bound 1 for ``eps < 0``.  Ordering (0 <= eps < 1):
    ``cap <= cap_bound_power <= cap_bound_gaussian``.
    """
    e, nn = _broadcast_eps_n(eps, n)
    val = 0.5 * _one_minus_sq(e) ** ((nn - 1.0) / 2.0)
    return _out(np.where(e < 0, 1.0, val))


def log10_cap_bound_power(eps: npt.ArrayLike, n: npt.ArrayLike) -> Any:
    """``log10`` of :func:`cap_bound_power` (no underflow): ``(n-1)/2 log10(1-eps^2) - log10 2``."""
    e, nn = _broadcast_eps_n(eps, n)
    ae = np.abs(e)
    with np.errstate(divide="ignore", invalid="ignore"):
        val = (nn - 1.0) / 2.0 * (np.log1p(-ae) + np.log1p(ae)) / _LN10 - math.log10(2.0)
    val = np.where(ae >= 1.0, -np.inf, val)
    return _out(np.where(e < 0, 0.0, val))


def cap_bound_gaussian(eps: npt.ArrayLike, n: npt.ArrayLike) -> Any:
    """Closed-form bound ``exp(-n eps^2 / 2) >= cap_bound_power(eps, n)`` for ``0 <= eps < 1``.

    (``1/2 (1-eps^2)^((n-1)/2) <= 1/2 e^{eps^2/2} e^{-n eps^2/2}`` and ``1/2 e^{1/2} < 1``.)
    Returns the trivial bound 1 for ``eps < 0``; for ``eps >= 1`` the value is still an upper bound.
    """
    e, nn = _broadcast_eps_n(eps, n)
    return _out(np.where(e < 0, 1.0, np.exp(-nn * e * e / 2.0)))


# --------------------------------------------------------------------------------------------------
# 4. the Bound record
# --------------------------------------------------------------------------------------------------


def format_probability(log10: float) -> str:
    """Format a probability given by its log10, rounding *up* to two significant digits.

    ``-30.5 -> "3.2e-31"``, ``-1.7 -> "0.02"``, ``-459.74 -> "10^-459.7"``, ``-460 -> "10^-460"``
    (below the float range the exponent is rounded up to one decimal), ``-inf -> "0"``, ``0 -> "1"``.
    """
    if math.isnan(log10):
        return "nan"
    if log10 == -math.inf:
        return "0"
    if log10 >= 0.0:
        return "1"
    if log10 < _PRINT_FLOAT_MIN_LOG10:
        if math.isinf(log10 * 10.0):  # an exponent beyond float range itself (a key's log10 of -1e308)
            return f"10^{log10:.4g}"
        return f"10^{math.ceil(log10 * 10.0 - 1e-9) / 10.0:.1f}".removesuffix(".0")
    exp10 = math.floor(log10)
    mant = math.ceil(10.0 ** (log10 - exp10 + 1.0) - 1e-9) / 10.0  # in [1.0, 10.0], rounded up
    if mant >= 10.0:
        mant, exp10 = 1.0, exp10 + 1
    if exp10 >= 0:
        return "1"
    if exp10 >= -3:
        return f"{mant * 10.0**exp10:.{max(0, 1 - exp10)}f}".rstrip("0").rstrip(".")
    return f"{mant:.1f}e{exp10:d}"


def _normalise(obj: Any) -> Any:
    """Convert numpy containers/scalars to plain Python (floats may stay non-finite)."""
    if isinstance(obj, Mapping):
        return {str(k): _normalise(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return [_normalise(v) for v in obj.tolist()]
    if isinstance(obj, list | tuple):
        return [_normalise(v) for v in obj]
    if isinstance(obj, np.generic):
        return _normalise(obj.item())
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if isinstance(obj, float):
        return float(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in Bound.params")


def _encode(obj: Any) -> Any:
    """JSON-safe: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if isinstance(obj, str) and obj in ("inf", "-inf", "nan"):
        return float(obj)
    return obj


@dataclass(frozen=True)
class Bound:
    """An upper bound on a false-positive probability, with what it means.

    ``value`` is the probability (0.0 if it underflows float64), ``log10`` its base-10 logarithm (finite
    or ``-inf``; always usable), ``kind`` one of :data:`KINDS`, ``params`` everything needed to
    recompute it (JSON-native), ``statement`` one sentence saying what is bounded and under which
    condition.  Not hashable (``params`` is a dict).
    """

    value: float
    log10: float
    kind: str
    params: dict[str, Any]
    statement: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        value, log10 = float(self.value), float(self.log10)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"value must be a probability in [0, 1], got {value!r}")
        if math.isnan(log10) or log10 > 1e-12 or log10 == math.inf:
            raise ValueError(f"log10 must be <= 0 or -inf, got {log10!r}")
        expected = 10.0**log10 if log10 > -math.inf else 0.0
        if expected > 1e-300 and abs(value - expected) > 1e-6 * expected:
            raise ValueError(f"value {value!r} inconsistent with log10 {log10!r}")
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "log10", min(log10, 0.0))
        object.__setattr__(self, "params", _normalise(self.params))

    @classmethod
    def from_log10(cls, log10: float, kind: str, params: Mapping[str, Any], statement: str) -> Bound:
        """Build from the log10 value (clipped to 0), computing ``value`` (0.0 on underflow)."""
        log10 = min(float(log10), 0.0)
        value = 10.0**log10 if log10 > -math.inf else 0.0
        return cls(value=value, log10=log10, kind=kind, params=dict(params), statement=statement)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite floats encoded as "inf"/"-inf"/"nan")."""
        return _encode(
            {
                "value": self.value,
                "log10": self.log10,
                "kind": self.kind,
                "params": self.params,
                "statement": self.statement,
            }
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Bound:
        """Inverse of :meth:`to_dict`."""
        d = _decode(dict(d))
        return cls(
            value=float(d["value"]),
            log10=float(d["log10"]),
            kind=str(d["kind"]),
            params=dict(d["params"]),
            statement=str(d["statement"]),
        )

    def __str__(self) -> str:
        return f"≤ {format_probability(self.log10)} ({self.kind})"


# --------------------------------------------------------------------------------------------------
# 5-6, 8. worst case over a ball (with union over positions / draws, AND over detectors)
# --------------------------------------------------------------------------------------------------


def _log10_sum(log10_terms: np.ndarray, weights: np.ndarray | None = None) -> float:
    """log10 of sum_i w_i 10**t_i, robust to -inf terms and underflow."""
    t = np.asarray(log10_terms, dtype=float).ravel()
    w = np.ones_like(t) if weights is None else np.asarray(weights, dtype=float).ravel()
    keep = (w > 0) & (t > -np.inf)
    if not keep.any():
        return -math.inf
    return float(special.logsumexp(t[keep] * _LN10, b=w[keep]) / _LN10)


def _ball_log10(
    tau: float, radius: np.ndarray, n: float, positions: int, draws: int, detectors: int
) -> float:
    with np.errstate(divide="ignore"):
        eps = np.where(radius > 0, tau / np.where(radius > 0, radius, 1.0), np.inf)
    per_pos = detectors * np.asarray(log10_cap_probability(eps, n), dtype=float)
    mult = positions if radius.size == 1 else 1
    total = _log10_sum(per_pos) + math.log10(mult) + math.log10(draws)
    return min(total, 0.0)


def _check_ball_args(
    tau: float, radius: npt.ArrayLike, n: float, positions: int, draws: int, detectors: int
) -> tuple[np.ndarray, int]:
    if not tau >= 0 or not math.isfinite(tau):
        raise ValueError(f"tau must be finite and >= 0, got {tau!r}")
    if not n >= 2:
        raise ValueError(f"dimension n must be >= 2, got {n!r}")
    r = np.asarray(radius, dtype=float).ravel()
    if r.size == 0 or np.any(~(r >= 0)) or np.any(~np.isfinite(r)):
        raise ValueError("radius must be finite and >= 0 (scalar or non-empty array)")
    positions = _check_count("positions", positions)
    _check_count("draws", draws)
    _check_count("detectors", detectors)
    if np.ndim(radius) > 0 and r.size > 1:
        if positions not in (1, r.size):
            raise ValueError(f"positions={positions} conflicts with {r.size} per-position radii")
        positions = r.size
    return r, positions


def ball_bound(
    tau: float,
    radius: float | npt.ArrayLike,
    n: float,
    positions: int = 1,
    draws: int = 1,
    detectors: int = 1,
    kind: str = "calibrated-radius",
) -> Bound:
    """Worst-case probability over the key that a detector fires on an input inside the ball.

    For every input whose centred feature lies within ``radius`` of the centre at every position,
    ``Pr_key[fires at some position] <= draws * sum_p cap(tau / R_p, n) ** detectors`` (clipped to 1):

    * per position, ``detectors`` independent directions must all fire (AND of a lock): given ``x``
      the events are independent, so the probability is the product ``cap ** detectors``;
    * union bound over the ``positions`` (a scalar ``radius`` is used at every position; an array gives
      the per-position radii ``R_p``, and then ``positions`` must be 1 or ``len(radius)``);
    * ``draws`` is the number of directions the stain may draw (resampling).  The stain draws
      ``v_1, v_2, ...`` from a seeded generator and keeps the first one whose trigger search succeeds,
      with at most ``draws`` (= max_draws, committed in advance).  With ``J`` the number of draws,
      ``{accepted v fires on x}`` is contained in ``U_{j<=J} {v_j fires on x}``, and ``{J >= j}``
      depends only on ``v_1..v_{j-1}`` (independent of ``v_j``), so the probability is at most
      ``sum_j Pr[J >= j] cap = E[J] cap <= max_draws cap``.  This needs ``x`` fixed independently of
      the key and ``tau`` not depending on ``v``: the stain must accept ``v`` only if its realised
      margin is ``>= tau`` (the pre-committed value), never set ``tau`` from the realised margin.

    ``kind`` is ``"data-free"`` when ``radius`` is certified for every valid input (then this is a
    guarantee for all inputs) or ``"calibrated-radius"`` when it was estimated from data (then the
    statement covers only inputs inside that radius; combine with :func:`mixed_bound`).
    Computed in log space: ``log10`` stays finite for results like 1e-400.
    """
    if kind not in ("data-free", "calibrated-radius"):
        raise ValueError(f"ball_bound kind must be 'data-free' or 'calibrated-radius', got {kind!r}")
    r, positions = _check_ball_args(tau, radius, n, positions, draws, detectors)
    log10 = _ball_log10(float(tau), r, float(n), positions, int(draws), int(detectors))
    radius_param: float | list[float] = float(r[0]) if r.size == 1 and np.ndim(radius) == 0 else r.tolist()
    params = {
        "method": "ball_bound",
        "tau": float(tau),
        "radius": radius_param,
        "n": float(n),
        "positions": positions,
        "draws": int(draws),
        "detectors": int(detectors),
    }
    rtxt = f"R={r[0]:.4g}" if r.size == 1 else f"per-position radii R_p (max {r.max():.4g})"
    origin = (
        "R a certified bound over the valid input domain"
        if kind == "data-free"
        else "R estimated from calibration data, so inputs outside it are not covered"
    )
    lock = f"all {detectors} independent detectors (AND) fire" if detectors > 1 else "the detector fires"
    statement = (
        f"For every input whose centred feature lies within {rtxt} of the centre at each of the "
        f"{positions} position(s) ({origin}), the probability over the random key (n={float(n):g}, "
        f"margin tau={float(tau):.4g} fixed before the key, at most {int(draws)} key draw(s)) that "
        f"{lock} at some position is ≤ {format_probability(log10)}."
    )
    return Bound.from_log10(log10, kind, params, statement)


def threshold_for_target(
    target: float | None,
    radius: float | npt.ArrayLike,
    n: float,
    positions: int = 1,
    draws: int = 1,
    detectors: int = 1,
    *,
    log10_target: float | None = None,
) -> float:
    """Smallest margin ``tau`` (``<= max radius``) with ``ball_bound(tau, ...) <= target``.

    Bisection on the (continuous, decreasing) log10 bound down to float resolution; the returned
    ``tau`` always satisfies the target and the bound there equals ``target`` to ~1e-12 relative
    (unless already ``tau = 0`` meets it, in which case 0.0 is returned).  Targets below the float64
    range (e.g. 1e-400) can be given as ``target=None, log10_target=-400``.
    """
    if log10_target is not None:
        if target is not None:
            raise ValueError("give either target or log10_target, not both")
        if not -math.inf < log10_target < 0.0:
            raise ValueError(f"log10_target must be finite and < 0, got {log10_target!r}")
        log_target = float(log10_target)
    else:
        if target is None or not 0.0 < target < 1.0:
            raise ValueError(f"target must be in (0, 1), got {target!r}")
        log_target = math.log10(target)
    r, positions = _check_ball_args(0.0, radius, n, positions, draws, detectors)
    if not np.any(r > 0):
        return 0.0

    def excess(t: float) -> float:
        return _ball_log10(t, r, float(n), positions, int(draws), int(detectors)) - log_target

    lo, hi = 0.0, float(r.max())
    if excess(lo) <= 0.0:
        return 0.0
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if excess(mid) <= 0.0:
            hi = mid
        else:
            lo = mid
    return hi


def box_ball(lo: npt.ArrayLike, hi: npt.ArrayLike) -> tuple[np.ndarray, float]:
    """The smallest ball holding the box ``lo ≤ x ≤ hi``: its centre and its (certified) radius.

    Features that are an affine image of bounded inputs (raw pixels) lie in such a box for every
    input, so a :func:`ball_bound` with this radius is ``"data-free"``.
    """
    lo_a, hi_a = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    if lo_a.shape != hi_a.shape or np.any(~(hi_a >= lo_a)):
        raise ValueError("the box needs lo <= hi element-wise, with equal shapes")
    return 0.5 * (lo_a + hi_a), float(np.linalg.norm(0.5 * (hi_a - lo_a)))


def window_side(
    target: float, channels: int, reach: float, draws: int = 1, detectors: int = 1, max_side: int = 16
) -> int | None:
    """Smallest side ``s`` of a square window (``m = channels·s²`` inputs, one position) whose margin for
    ``target`` is at most ``reach`` of the radius (``tau/R <= reach``); None if none up to ``max_side``.

    For a box-shaped feature domain (raw pixels) and a random direction ``v``, the best trigger's margin
    ``max v·(x − c) / R`` concentrates near ``sqrt(2/pi)`` (the box corner ``c + h·sign(v)`` gives
    ``h·sum|v_i| / (h·sqrt(m))``); ``reach`` is the caller's safety below that.
    """
    for side in range(1, max_side + 1):
        m = channels * side * side
        if m < 2:
            continue
        if threshold_for_target(target, 1.0, m, positions=1, draws=draws, detectors=detectors) <= reach:
            return side
    return None


# --------------------------------------------------------------------------------------------------
# 7. data-driven bound (Hoeffding / empirical Bernstein)
# --------------------------------------------------------------------------------------------------


def per_image_cap_sums(
    radii: npt.ArrayLike, tau: float, n: float, detectors: int = 1, draws: int = 1
) -> np.ndarray:
    """Per-image bounds ``f_i = min(1, draws * sum_p cap(tau / r_ip, n) ** detectors)``.

    ``radii`` is an ``(N, P)`` array of centred feature norms ``||phi_p(x_i) - c||`` (or ``(N,)`` for
    ``P = 1``).  ``f_i`` bounds ``Pr_key[fires on x_i]``; feed it to :func:`data_driven_bound`.
    """
    r = np.asarray(radii, dtype=float)
    if r.ndim == 1:
        r = r[:, None]
    if r.ndim != 2:
        raise ValueError(f"radii must have shape (N, P) or (N,), got {r.shape}")
    if np.any(~(r >= 0)) or not tau >= 0:
        raise ValueError("radii and tau must be >= 0")
    _check_count("detectors", detectors)
    _check_count("draws", draws)
    with np.errstate(divide="ignore"):
        eps = np.where(r > 0, tau / np.where(r > 0, r, 1.0), np.inf)
    caps = np.asarray(cap_probability(eps, n), dtype=float) ** detectors
    return np.minimum(1.0, draws * caps.sum(axis=1))


def data_driven_bound(per_image_values: npt.ArrayLike, confidence: float = 0.95) -> Bound:
    """Upper confidence bound on ``E[f]`` from i.i.d. samples ``f_i`` in [0, 1].

    With probability ``>= confidence`` over the sample, ``E[f] <= min(H, B)`` where, with
    ``eta = 1 - confidence`` split equally between the two bounds (union bound),

    * Hoeffding:  ``H = mean + sqrt(ln(2/eta) / (2N))``,
    * empirical Bernstein (Maurer & Pontil 2009, Thm 4, delta = eta/2):
      ``B = mean + sqrt(2 V ln(4/eta) / N) + 7 ln(4/eta) / (3 (N-1))``, ``V`` the sample variance.

    With ``f_i = per_image_cap_sums(...)`` this bounds the false-positive rate averaged over the key and
    a random input from the data distribution.  The sample must be independent of everything that
    fixed ``f`` (centre ``c``, margin ``tau``, PCA dimension): use a held-out split, not the calibration
    data.  It cannot go below about ``ln(4/eta) / N``.
    """
    f = np.asarray(per_image_values, dtype=float).ravel()
    if f.size == 0:
        raise ValueError("need at least one sample")
    if np.any(~np.isfinite(f)) or f.min() < -1e-12 or f.max() > 1.0 + 1e-12:
        raise ValueError("per-image values must lie in [0, 1]")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    f = np.clip(f, 0.0, 1.0)
    n_s = f.size
    eta = 1.0 - confidence
    mean = float(f.mean())
    hoeffding = mean + math.sqrt(math.log(2.0 / eta) / (2.0 * n_s))
    if n_s >= 2:
        var = float(f.var(ddof=1))
        lg = math.log(4.0 / eta)
        bernstein = mean + math.sqrt(2.0 * var * lg / n_s) + 7.0 * lg / (3.0 * (n_s - 1))
    else:
        var, bernstein = math.nan, math.inf
    value = min(1.0, hoeffding, bernstein)
    params = {
        "method": "data_driven_bound",
        "n_samples": n_s,
        "confidence": float(confidence),
        "mean": mean,
        "variance": var,
        "hoeffding": hoeffding,
        "bernstein": bernstein,
    }
    statement = (
        f"With probability ≥ {confidence:g} over the {n_s} i.i.d. held-out samples, the firing "
        f"probability averaged over the random key and a random input from the same distribution is "
        f"≤ {format_probability(math.log10(value))} (sample mean {mean:.3g}; min of Hoeffding and "
        f"empirical-Bernstein bounds at eta/2 each)."
    )
    return Bound.from_log10(math.log10(value), "data-driven", params, statement)


# --------------------------------------------------------------------------------------------------
# 9. radius exceedance (Clopper-Pearson) and the mixed bound
# --------------------------------------------------------------------------------------------------


def radius_exceedance_bound(k: int, n_samples: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on ``Pr[||f|| > R]``.

    ``k`` of ``n_samples`` held-out i.i.d. samples exceeded ``R``; the result ``p_hi`` satisfies
    ``Pr_sample[p <= p_hi] >= confidence`` for every true ``p``.  ``k = 0`` gives
    ``1 - (1 - confidence)^(1/n_samples)`` (about ``3/n`` at 95 %).
    """
    if int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if int(k) != k or not 0 <= k <= n_samples:
        raise ValueError(f"k must be an integer in [0, n_samples], got {k!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if k == n_samples:
        return 1.0
    return float(special.betaincinv(k + 1, n_samples - k, confidence))  # the Beta(k+1, n-k) quantile


def mixed_bound(ball: Bound, k_outside: int, n_samples: int, confidence: float = 0.95) -> Bound:
    """Firing rate on the data distribution = Pr[outside the ball] + worst case inside the ball.

    ``Pr_{x,key}[fires] <= Pr_x[||f(x)|| > R at some position] + sup_{||f|| <= R} Pr_key[fires]``; the
    first term is bounded by :func:`radius_exceedance_bound` (``k_outside`` of ``n_samples`` held-out
    inputs fell outside), so the sum holds with probability ``>= confidence`` over that sample.  The
    held-out sample must be independent of the data that fixed ``R``, ``c`` and ``tau``.
    """
    exceed = radius_exceedance_bound(k_outside, n_samples, confidence)
    log10 = _log10_sum(np.array([math.log10(exceed) if exceed > 0 else -math.inf, ball.log10]))
    params = {
        "method": "mixed_bound",
        "ball": ball.to_dict(),
        "k_outside": int(k_outside),
        "n_samples": int(n_samples),
        "confidence": float(confidence),
        "exceedance": exceed,
    }
    statement = (
        f"With probability ≥ {confidence:g} over the {int(n_samples)} held-out samples ({int(k_outside)} "
        f"outside the ball), the firing probability over the random key and a random input from the "
        f"same distribution is ≤ {format_probability(log10)} (= Clopper-Pearson bound "
        f"{format_probability(math.log10(exceed) if exceed > 0 else -math.inf)} on leaving the ball + "
        f"the worst case {format_probability(ball.log10)} inside it)."
    )
    return Bound.from_log10(log10, "data-driven", params, statement)


# --------------------------------------------------------------------------------------------------
# 10. cross-key bound
# --------------------------------------------------------------------------------------------------


def cross_key_bound(
    trigger_radii: npt.ArrayLike,
    tau: float,
    n: float,
    positions_weight: npt.ArrayLike | None = None,
    detectors: int = 1,
) -> Bound:
    """Probability that another key's independent detector fires on THIS key's trigger.

    ``trigger_radii`` are the per-position centred norms ``||phi_p(x*) - c||`` of this trigger at the
    other detector's layer.  The other key's directions are drawn independently of ``x*`` with margin
    ``tau`` fixed in advance, so ``Pr <= sum_p w_p cap(tau / r_p, n) ** detectors`` (clipped to 1).
    ``positions_weight`` (default all 1) is a non-negative multiplicity per position: 0 for positions
    the other detector is not evaluated at, ``K`` to cover ``K`` other keys at once.
    """
    r = np.asarray(trigger_radii, dtype=float).ravel()
    if r.size == 0 or np.any(~(r >= 0)) or np.any(~np.isfinite(r)):
        raise ValueError("trigger_radii must be finite and >= 0")
    if not tau >= 0 or not n >= 2:
        raise ValueError("need tau >= 0 and n >= 2")
    _check_count("detectors", detectors)
    if positions_weight is None:
        w = np.ones_like(r)
    else:
        w = np.broadcast_to(np.asarray(positions_weight, dtype=float).ravel(), r.shape)
        if np.any(~(w >= 0)) or np.any(~np.isfinite(w)):
            raise ValueError("positions_weight must be finite and >= 0")
    with np.errstate(divide="ignore"):
        eps = np.where(r > 0, tau / np.where(r > 0, r, 1.0), np.inf)
    terms = detectors * np.asarray(log10_cap_probability(eps, n), dtype=float)
    log10 = min(0.0, _log10_sum(terms, w))
    params = {
        "method": "cross_key_bound",
        "trigger_radii": r.tolist(),
        "tau": float(tau),
        "n": float(n),
        "positions_weight": None if positions_weight is None else w.tolist(),
        "detectors": int(detectors),
    }
    statement = (
        f"The probability over another key's independently drawn detector (same layer and centre, "
        f"n={float(n):g}, margin tau={float(tau):.4g} fixed before drawing) that it fires at some of the "
        f"{r.size} position(s) on this key's trigger (max centred radius {r.max():.4g}) is "
        f"≤ {format_probability(log10)}."
    )
    return Bound.from_log10(log10, "cross-key", params, statement)
