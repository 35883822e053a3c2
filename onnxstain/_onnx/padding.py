"""ONNX's ``auto_pad`` SAME arithmetic, shared by the receptive fields, the conduit lock and the torch prefix."""

from __future__ import annotations

from collections.abc import Sequence


def same_pads(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
              upper: bool) -> tuple[list[int], list[int]]:
    """``(begins, ends)`` per spatial axis for ``auto_pad = SAME_UPPER`` (``upper``) or ``SAME_LOWER``: the output
    has ``ceil(n / stride)`` positions and the odd pixel of the total padding goes to the end (UPPER) or the
    beginning (LOWER)."""
    begins, ends = [], []
    for n, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        out = -(-int(n) // int(s))
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        begin = total // 2 if upper else total - total // 2
        begins.append(begin)
        ends.append(total - begin)
    return begins, ends


def same_onnx_pads(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                   dilations: Sequence[int], upper: bool) -> list[int]:
    """:func:`same_pads` as an ONNX ``pads`` attribute: every axis's begin, then every axis's end."""
    begins, ends = same_pads(spatial, kernel, strides, dilations, upper)
    return [*begins, *ends]
