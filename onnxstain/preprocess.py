"""How pixels become the model's input tensor.

A :class:`Preprocessing` describes the whole path from an 8-bit RGB photo to the tensor the model
takes: resize and centre crop (for raw photos), then ``value = (pixel * scale - mean) / std`` per
channel, channel order, layout and dtype. Triggers and patches live in *pixel space* (uint8 RGB at
the model's input size); everything the tool optimises is mapped through :meth:`Preprocessing.to_input`.

The JSON form (``--preprocessing FILE``) uses the field names of the dataclass.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import BadInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Pixel (uint8 RGB, HxWx3) → model input.

    ``height``/``width`` are the model's input size. ``resize`` is the length the shorter side of a
    raw photo is resized to before the centre crop (``None``: resize the photo straight to the input
    size). ``scale``, ``mean`` and ``std`` are applied per channel in the model's channel order.
    """

    height: int = 224
    width: int = 224
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channel_order: Literal["RGB", "BGR"] = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: int | None = 256
    dtype: Literal["float32", "float16", "uint8"] = "float32"
    # Where each field came from ("graph", "user", "default"); reported, never used in the math.
    source: tuple[tuple[str, str], ...] = ()

    # -- conversions -------------------------------------------------------------------------------
    def _ordered(self, pixels: np.ndarray) -> np.ndarray:
        return pixels[..., ::-1] if self.channel_order == "BGR" else pixels

    def to_input(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 or float pixels ``[N,H,W,3]`` (RGB, 0..255) → model input array."""
        px = np.asarray(pixels)
        if px.ndim == 3:
            px = px[None]
        if px.shape[1:] != (self.height, self.width, 3):
            raise BadInputError(
                f"pixels of shape {px.shape[1:]} do not match the model input {self.height}x{self.width}x3"
            )
        order = (2, 1, 0) if self.channel_order == "BGR" else (0, 1, 2)
        if self.layout == "NCHW":
            out = np.empty((px.shape[0], 3, self.height, self.width), self.dtype)
            channel = lambda c: out[:, c]  # noqa: E731
        else:
            out = np.empty((px.shape[0], self.height, self.width, 3), self.dtype)
            channel = lambda c: out[..., c]  # noqa: E731
        for c, src in enumerate(order):
            values = px[..., src]
            if self.dtype == "uint8":
                channel(c)[...] = np.clip(np.rint(values.astype(np.float32)), 0, 255)
            elif px.dtype == np.uint8:
                # 8-bit pixels: one lookup table per channel (exactly the formula below, 256 times).
                table = ((np.arange(256, dtype=np.float32) * np.float32(self.scale) - np.float32(self.mean[c]))
                         / np.float32(self.std[c])).astype(self.dtype)
                channel(c)[...] = table[values]
            else:
                channel(c)[...] = ((values.astype(np.float32) * np.float32(self.scale) - np.float32(self.mean[c]))
                                   / np.float32(self.std[c]))
        return out

    def _ordered_tuple(self, values: Sequence[float]) -> tuple[float, ...]:
        # mean/std are given in the model's channel order already: nothing to reorder.
        return tuple(values)

    def input_box(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (model order) lower and upper bounds of the input values for pixels in 0..255."""
        lo = self.to_input(np.zeros((1, self.height, self.width, 3), np.uint8))[0]
        hi = self.to_input(np.full((1, self.height, self.width, 3), 255, np.uint8))[0]
        return np.minimum(lo, hi).astype(np.float32), np.maximum(lo, hi).astype(np.float32)

    def fit_photo(self, image: Any) -> np.ndarray:
        """A PIL image (any size or mode) → uint8 RGB ``[H,W,3]``: resize shorter side, centre crop."""
        from PIL import Image

        img = image.convert("RGB")
        h, w = self.height, self.width
        if self.resize is None:
            img = img.resize((w, h), Image.BILINEAR)
        else:
            short = min(img.size)
            factor = self.resize / short
            new = (max(w, round(img.size[0] * factor)), max(h, round(img.size[1] * factor)))
            img = img.resize(new, Image.BILINEAR)
            left = (new[0] - w) // 2
            top = (new[1] - h) // 2
            img = img.crop((left, top, left + w, top + h))
        return np.asarray(img, dtype=np.uint8)

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["source"] = dict(self.source)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise BadInputError(f"unknown preprocessing field(s): {', '.join(sorted(unknown))}")
        d = dict(data)
        try:
            if "mean" in d:
                d["mean"] = _triple(d["mean"], "mean")
            if "std" in d:
                d["std"] = _triple(d["std"], "std")
            if "source" in d:
                d["source"] = tuple(sorted(dict(d["source"]).items()))
            pre = cls(**d)
        except (TypeError, ValueError) as exc:
            raise BadInputError(f"bad preprocessing: {exc}") from None
        pre.validate()
        return pre

    @classmethod
    def load(cls, path: str | Path) -> Preprocessing:
        try:
            data = json.loads(Path(path).read_bytes())
        except OSError as exc:
            raise BadInputError(f"cannot read preprocessing file {path}: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise BadInputError(f"preprocessing file {path} is not JSON") from None
        if not isinstance(data, dict):
            raise BadInputError(f"preprocessing file {path} must hold a JSON object")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def validate(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise BadInputError(f"preprocessing: {name} must be an integer, not {value!r}")
        if self.resize is not None and (not isinstance(self.resize, int) or isinstance(self.resize, bool)
                                        or self.resize <= 0):
            raise BadInputError(f"preprocessing: resize must be a positive integer (or null), not {self.resize!r}")
        for name in ("layout", "channel_order", "dtype"):
            if not isinstance(getattr(self, name), str):
                raise BadInputError(f"preprocessing: {name} must be a string, not {getattr(self, name)!r}")
        numbers = [("scale", self.scale)] + [("mean", v) for v in self.mean] + [("std", v) for v in self.std]
        for name, value in numbers:
            if not isinstance(value, int | float) or isinstance(value, bool) or not np.isfinite(value):
                raise BadInputError(f"preprocessing: {name} must be a finite number, not {value!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise BadInputError("preprocessing: mean and std need 1 or 3 values")
        if self.scale == 0:
            raise BadInputError("preprocessing: scale must not be zero")
        if self.height <= 0 or self.width <= 0:
            raise BadInputError("preprocessing: input size must be positive")
        if self.layout not in ("NCHW", "NHWC"):
            raise BadInputError(f"preprocessing: layout must be NCHW or NHWC, not {self.layout!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise BadInputError(f"preprocessing: channel order must be RGB or BGR, not {self.channel_order!r}")
        if any(s == 0 for s in self.std):
            raise BadInputError("preprocessing: std must not be zero")
        if self.dtype not in ("float32", "float16", "uint8"):
            raise BadInputError(f"preprocessing: unsupported dtype {self.dtype!r}")

    def with_source(self, **fields: str) -> Preprocessing:
        merged = dict(self.source)
        merged.update(fields)
        return dataclasses.replace(self, source=tuple(sorted(merged.items())))


def _triple(values: Any, name: str) -> tuple[float, float, float]:
    if isinstance(values, bool) or not isinstance(values, int | float | list | tuple):
        raise ValueError(f"{name} must be a number or a list of 1 or 3 numbers, not {values!r}")
    if isinstance(values, int | float):
        return (float(values),) * 3
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        raise ValueError(f"{name} must hold numbers, not {list(values)!r}")
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        return vals * 3  # type: ignore[return-value]
    if len(vals) != 3:
        raise ValueError(f"{name} needs 1 or 3 values, got {len(vals)}")
    return vals  # type: ignore[return-value]
