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
