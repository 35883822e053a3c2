"""Detector scores as a differentiable function of the input pixels (torch), for trigger search.

Pixels ``[1, H, W, 3]`` (0..255) go through the model's preprocessing and the ONNX prefix up to the
host layer's input (:class:`onnxstain.torchprefix.TorchPrefix`); the detector scores
``v_i · (φ_p − c)`` and the centred radii ``‖φ_p − c‖`` are computed with convolutions (no im2col).
"""

from __future__ import annotations

import numpy as np

from ._onnx.hosts import HostLayer
from .preprocess import LUMA, Preprocessing


def detector_scores(prefix, host: HostLayer, pre: Preprocessing, directions: np.ndarray, c: np.ndarray,
                    group: int, positions: np.ndarray):
    """Return ``fn(pixels) -> (scores [1, d·len(positions)], radii [1, P])`` for ``directions`` ``[d, m]``.

    Scores are ordered detector-major (all positions of detector 0, then detector 1, ...).
    """
    import torch
    import torch.nn.functional as F

    d = directions.shape[0]
    vc = torch.tensor(directions @ c, dtype=torch.float32).view(1, d, 1)
    cc = float(c @ c)
    pos = torch.as_tensor(positions, dtype=torch.long)
    rows = np.concatenate([directions, c[None]])
    if host.op == "Conv":
        cg = host.in_channels // host.groups
        filt = torch.tensor(rows.reshape(d + 1, cg, *host.kernel), dtype=torch.float32)
        ones = torch.ones(1, cg, *host.kernel)
    else:
        vt = torch.tensor(rows.T, dtype=torch.float32)

    to_input = _model_input(pre)

    def fn(px):
        feat = prefix(to_input(px))[0]
        if host.op == "Conv":
            f = feat[:, group * cg : (group + 1) * cg]
            t, left, b, r = host.pads
            f = F.pad(f, (left, r, t, b))
            proj = F.conv2d(f, filt, stride=host.strides, dilation=host.dilations)
            sq = F.conv2d(f * f, ones, stride=host.strides, dilation=host.dilations)
            if host.out_hw is not None:
                proj = proj[:, :, : host.out_hw[0], : host.out_hw[1]]
                sq = sq[:, :, : host.out_hw[0], : host.out_hw[1]]
            proj, sq = proj.flatten(2), sq.flatten(1)
        else:
            f = feat.reshape(feat.shape[0], -1, feat.shape[-1])
            proj = (f @ vt).transpose(1, 2)
            sq = (f * f).sum(-1)
        # ‖φ − c‖² = ‖φ‖² − 2 φ·c + ‖c‖²
        radii = (sq - 2 * proj[:, d] + cc).clamp(min=1e-12).sqrt()
        scores = proj[:, :d][:, :, pos] - vc
        return scores.flatten(1), radii

    return fn


def _model_input(pre: Preprocessing):
    """Torch version of the recorded preprocessing: float pixels ``[B, H, W, 3]`` → the model's input."""
    import torch

    scale = float(pre.scale)
    c = pre.channels
    mean = torch.tensor(pre.mean[:c], dtype=torch.float32).view(1, 1, 1, c)
    std = torch.tensor(pre.std[:c], dtype=torch.float32).view(1, 1, 1, c)

    def to_input(px):
        if pre.channel_order == "GRAY":  # the luma, as Preprocessing.to_input computes it
            g = px[..., 1:2]
            x = g + LUMA[0] * (px[..., 0:1] - g) + LUMA[2] * (px[..., 2:3] - g)
        else:
            x = px[..., [2, 1, 0]] if pre.channel_order == "BGR" else px
        if pre.dtype != "uint8":
            x = (x * scale - mean) / std
        if pre.layout == "NCHW":
            x = x.permute(0, 3, 1, 2)
        return x

    return to_input


def model_logits(prefix, pre: Preprocessing, fixed_batch: int | None = None):
    """``fn(pixels [B, H, W, 3]) -> scores [B, K]`` through the whole model (``prefix`` ends at the scores).
    ``fixed_batch``: the model's input batch is fixed at that size (its reshapes say so, as the ONNX model zoo's
    MNIST ``[1, 256]``): the pixels go through in chunks of it, the last one padded with its last image."""
    import torch

    to_input = _model_input(pre)

    def run(px):
        out = prefix(to_input(px))[0]
        return out.reshape(out.shape[0], -1)

    if fixed_batch is None:
        return run

    def chunked(px):
        parts = []
        for start in range(0, px.shape[0], fixed_batch):
            chunk = px[start : start + fixed_batch]
            n = chunk.shape[0]
            if n < fixed_batch:
                chunk = torch.cat([chunk, chunk[-1:].expand(fixed_batch - n, *chunk.shape[1:])])
            parts.append(run(chunk)[:n])
        return torch.cat(parts)

    return chunked
