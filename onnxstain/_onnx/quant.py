"""Linear quantization arithmetic for QDQ weights (numpy only, no graph plumbing).

A QDQ model stores a weight as integer codes ``q`` with a ``scale`` and a ``zero_point`` (per tensor,
or per slice along ``axis``: per-channel) and a ``DequantizeLinear`` giving ``(q − zp) · scale``.
Editing such a weight means choosing new codes, and for per-channel weights a new scale for each
edited channel; slices whose values do not change keep their codes bit for bit.

Codes are rounded half to even and saturated, as ``QuantizeLinear`` does. int32 tensors (biases,
whose scale must stay ``input_scale · weight_scale``) always keep their scale.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import UnsupportedModelError


@dataclasses.dataclass
class Quantized:
    """Integer codes with their scale and zero point (``scale``/``zero_point``: scalar or per slice)."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int  # the slice axis of a per-channel tensor (normalised to 0..ndim-1)

    @property
    def per_axis(self) -> bool:
        return self.scale.size > 1

    def _broadcast(self, arr: np.ndarray) -> np.ndarray:
        if not self.per_axis:
            return arr.reshape(())
        shape = [1] * self.q.ndim
        shape[self.axis] = -1
        return arr.reshape(shape)

    def dequantize(self) -> np.ndarray:
        """``(q − zp) · scale`` in the scale's dtype (as ``DequantizeLinear`` computes it)."""
        diff = self.q.astype(np.int64) - self._broadcast(self.zero_point).astype(np.int64)
        return (diff.astype(self.scale.dtype) * self._broadcast(self.scale)).astype(self.scale.dtype)


def qrange(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def requantize(old: Quantized, new: np.ndarray, name: str) -> Quantized:
    """Codes (and, per channel, scales and zero points) that represent ``new``.

    Only slices (per-channel) or elements (per-tensor) whose value differs from the current
    dequantized value are re-encoded. A per-channel slice gets the scale its new values need, with
    the same code range the tensor already uses (127 for symmetric int8, say). A per-tensor weight
    keeps its scale, and values that would saturate are refused.
    """
    current = old.dequantize()
    target = np.asarray(new, np.float64)
    if target.shape != current.shape:
        raise ValueError(f"new value for {name} has shape {target.shape}, expected {current.shape}")
    qmin, qmax = qrange(old.q.dtype)
    q = old.q.copy()
    scale = old.scale.copy()
    zp = old.zero_point.copy()
    changed = target.astype(current.dtype) != current
    if not changed.any():
        return Quantized(q, scale, zp, old.axis)
    fixed = old.q.dtype == np.int32 or not old.per_axis
    if fixed:
        scales = old._broadcast(scale).astype(np.float64)
        zeros = old._broadcast(zp).astype(np.float64)
        codes = np.rint(target / scales) + zeros
        over = changed & ((codes < qmin) | (codes > qmax))
        if over.any():
            raise UnsupportedModelError(
                f"weight {name!r} is quantized per tensor: the edited values exceed its "
                f"{old.q.dtype} range; quantize with per-channel weights (per_channel=True) or stain the "
                "float model and quantize afterwards")
        q[changed] = np.clip(codes, qmin, qmax)[changed].astype(q.dtype)
        return Quantized(q, scale, zp, old.axis)
    # per channel: re-encode each changed slice with a scale of its own
    q_ax = np.moveaxis(q, old.axis, 0)
    t_ax = np.moveaxis(target, old.axis, 0)
    ch_ax = np.moveaxis(changed, old.axis, 0)
    symmetric_limit = int(np.max(np.abs(old.q.astype(np.int64) - old._broadcast(zp).astype(np.int64))))
    symmetric_limit = max(symmetric_limit, 1)
    for i in range(q_ax.shape[0]):
        if not ch_ax[i].any():
            continue
        vals = t_ax[i]
        if int(zp[i]) == 0 and qmin < 0:
            big = float(np.max(np.abs(vals)))
            s = big / symmetric_limit if big > 0 else float(scale[i])
            z = 0
        else:
            lo, hi = min(float(vals.min()), 0.0), max(float(vals.max()), 0.0)
            s = (hi - lo) / (qmax - qmin) if hi > lo else float(scale[i])
            z = int(np.clip(np.rint(qmin - lo / s), qmin, qmax))
        scale[i] = s  # cast to the scale dtype first: codes are computed with the stored scale
        zp[i] = z
        q_ax[i] = np.clip(np.rint(vals / np.float64(scale[i])) + z, qmin, qmax).astype(q.dtype)
    return Quantized(np.moveaxis(q_ax, 0, old.axis).copy(), scale, zp, old.axis)


def rescale(old: Quantized, new_scale: np.ndarray, name: str) -> Quantized:
    """The same values (as nearly as the codes allow) under per-slice scales ``new_scale`` (int32 biases)."""
    values = old.dequantize().astype(np.float64)
    scale = np.asarray(new_scale, old.scale.dtype).reshape(old.scale.shape)
    qmin, qmax = qrange(old.q.dtype)
    tmp = Quantized(old.q, scale, old.zero_point, old.axis)
    codes = np.rint(values / tmp._broadcast(scale).astype(np.float64)) + tmp._broadcast(old.zero_point)
    if (codes < qmin).any() or (codes > qmax).any():
        raise UnsupportedModelError(f"bias {name!r} does not fit its {old.q.dtype} range after re-scaling")
    return Quantized(codes.astype(old.q.dtype), scale, old.zero_point.copy(), old.axis)
