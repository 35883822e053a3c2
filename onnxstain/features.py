"""The input vector φ of a host neuron, built from the host layer's input tensor (numpy only).

For a Conv host, φ at output position p is the receptive-field patch of the input tensor (im2col,
zero padding included), flattened in the same (channel, row, col) order as ``W[k].reshape(-1)``,
restricted to the channels of the neuron's group. For Gemm/MatMul hosts, φ is the input vector
(one position; for rank-3 token inputs, one position per token).
"""

from __future__ import annotations

import numpy as np

from ._onnx.hosts import HostLayer


def neuron_inputs(host: HostLayer, x: np.ndarray, group: int = 0) -> np.ndarray:
    """Host input tensor → φ of shape ``[N, P, m]`` for the neurons of ``group``."""
    if host.op != "Conv":
        if x.ndim == 2:
            return x[:, None, :].astype(np.float32, copy=False)
        if x.ndim == 3:
            return x.astype(np.float32, copy=False)
        return x.reshape(x.shape[0], -1, x.shape[-1]).astype(np.float32, copy=False)
    cg = host.in_channels // host.groups
    xs = x[:, group * cg : (group + 1) * cg].astype(np.float32, copy=False)
    t, left, b, r = host.pads
    xs = np.pad(xs, ((0, 0), (0, 0), (t, b), (left, r)))
    kh, kw = host.kernel
    dh, dw = host.dilations
    sh, sw = host.strides
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    win = np.lib.stride_tricks.sliding_window_view(xs, (eh, ew), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, oh, ow, kh, kw]
    if host.out_hw is not None:
        win = win[:, :, : host.out_hw[0], : host.out_hw[1]]
    n, c, oh, ow = win.shape[:4]
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(n, oh * ow, c * kh * kw)


def _taps(host: HostLayer, x: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, np.ndarray]]]:
    """A Conv host's input, padded, and per kernel tap ``(i, j)`` the values it reads at every output position,
    ``[N, C, oh, ow]`` (views, no copy): φ without unfolding it."""
    cg = host.in_channels // host.groups
    t, left, b, r = host.pads
    xs = np.pad(x[:, :cg].astype(np.float32, copy=False), ((0, 0), (0, 0), (t, b), (left, r)))
    kh, kw = host.kernel
    dh, dw = host.dilations
    sh, sw = host.strides
    oh, ow = (xs.shape[2] - (kh - 1) * dh - 1) // sh + 1, (xs.shape[3] - (kw - 1) * dw - 1) // sw + 1
    if host.out_hw is not None:
        oh, ow = min(oh, host.out_hw[0]), min(ow, host.out_hw[1])
    taps = [(i, j, xs[:, :, i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw])
            for i in range(kh) for j in range(kw)]
    return xs, taps


def phi_sum(host: HostLayer, x: np.ndarray) -> tuple[np.ndarray, int]:
    """``Σ φ`` over every image and position of the host input ``x``, ``[m]`` float64, and the number of
    samples summed (as ``neuron_inputs(host, x)``, without unfolding φ: an early layer's φ of a large input is
    gigabytes per image batch)."""
    if host.op != "Conv":
        phi = neuron_inputs(host, x).astype(np.float64)
        return phi.reshape(-1, phi.shape[-1]).sum(axis=0), phi.shape[0] * phi.shape[1]
    _, taps = _taps(host, x)
    out = np.zeros((taps[0][2].shape[1], *host.kernel))
    for i, j, v in taps:
        out[:, i, j] = v.sum(axis=(0, 2, 3), dtype=np.float64)
    n, _, oh, ow = taps[0][2].shape
    return out.reshape(-1), n * oh * ow


def phi_radii(host: HostLayer, x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``‖φ − c‖`` at every image and position, ``[N, P]`` float64 (as ``neuron_inputs``, not unfolded)."""
    if host.op != "Conv":
        return np.linalg.norm(neuron_inputs(host, x).astype(np.float64) - centre, axis=-1)
    _, taps = _taps(host, x)
    c = centre.reshape(taps[0][2].shape[1], *host.kernel)
    total = np.zeros((len(x), *taps[0][2].shape[2:]))
    for i, j, v in taps:
        total += np.square(v.astype(np.float64) - c[None, :, i, j, None, None]).sum(axis=1)
    return np.sqrt(total).reshape(len(x), -1)


def phi_at(host: HostLayer, x: np.ndarray, position: int) -> np.ndarray:
    """φ at one output position of every image, ``[N, m]`` (as ``neuron_inputs(host, x)[:, position]``)."""
    if host.op != "Conv":
        return neuron_inputs(host, x)[:, position]
    _, taps = _taps(host, x)
    ow = taps[0][2].shape[3]
    y, z = divmod(position, ow)
    out = np.stack([v[:, :, y, z] for _, _, v in taps], axis=-1)  # [N, C, kh*kw]
    return out.reshape(len(x), -1)
