"""How pixels become the model's input tensor.

A :class:`Preprocessing` describes the whole path from an 8-bit RGB photo to the tensor the model
takes: resize and centre crop (for raw photos), then ``value = (pixel * scale - mean) / std`` per
channel, channel order, layout and dtype. Triggers and patches live in *pixel space* (uint8 RGB at
the model's input size); everything the tool optimises is mapped through :meth:`Preprocessing.to_input`.
A greyscale model (``channel_order="GRAY"``, one input channel) takes the ITU-R 601 luma of the pixels
(``0.299 R + 0.587 G + 0.114 B``, what PIL's ``convert("L")`` and OpenCV's ``COLOR_RGB2GRAY`` compute), with
the first ``mean``/``std`` value; triggers and patches for it are grey (R = G = B), so any of those
conversions gives the model the same values.

The JSON form (``--preprocessing FILE``) uses the field names of the dataclass.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import BadInputError
from .fields import FieldError, Int, Num, Str

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ITU-R BT.601 luma weights (R, G, B): PIL's ``convert("L")``, OpenCV's ``cvtColor(..., COLOR_RGB2GRAY)``.
LUMA = (0.299, 0.587, 0.114)
MAX_SIDE = 16384  # pixels: larger inputs are refused as a typo


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Pixel (uint8 RGB, HxWx3) → model input.

    ``height``/``width`` are the model's input size. ``resize`` is the length the shorter side of a
    raw photo is resized to before the centre crop (``None``: resize the photo straight to the input
    size). ``scale``, ``mean`` and ``std`` are applied per channel in the model's channel order; a grey
    model (``channel_order="GRAY"``) has one channel and one ``mean``/``std`` (stored three times; left at
    the ImageNet defaults, they become 0 and 1).
    """

    height: int = 224
    width: int = 224
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channel_order: Literal["RGB", "BGR", "GRAY"] = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: int | None = 256
    dtype: Literal["float32", "float16", "uint8"] = "float32"
    # Where each field came from ("graph", "user", "default"); reported, never used in the math.
    source: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # The mean and std defaults are ImageNet's, per colour channel: a grey input left at them takes 0..1.
        if self.channel_order == "GRAY":
            if self.mean == IMAGENET_MEAN:
                object.__setattr__(self, "mean", (0.0,) * 3)
            if self.std == IMAGENET_STD:
                object.__setattr__(self, "std", (1.0,) * 3)

    # -- conversions -------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        """The model input's channel count: 1 for a grey model, else 3."""
        return 1 if self.channel_order == "GRAY" else 3

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        """The model input's shape for ``batch`` images."""
        if self.layout == "NCHW":
            return (batch, self.channels, self.height, self.width)
        return (batch, self.height, self.width, self.channels)

    def to_input(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 or float pixels ``[N,H,W,3]`` (RGB, 0..255) → model input array."""
        px = np.asarray(pixels)
        if px.ndim == 3:
            px = px[None]
        if px.shape[1:] != (self.height, self.width, 3):
            raise BadInputError(
                f"pixels of shape {px.shape[1:]} do not match the model input {self.height}x{self.width}x3"
            )
        out = np.empty(self.input_shape(px.shape[0]), self.dtype)

        def channel(c: int) -> np.ndarray:
            return out[:, c] if self.layout == "NCHW" else out[..., c]

        if self.channel_order == "GRAY":
            planes = [grey_pixels(px)]
        else:
            order = (2, 1, 0) if self.channel_order == "BGR" else (0, 1, 2)
            planes = [px[..., src] for src in order]
        for c, values in enumerate(planes):
            if self.dtype == "uint8":
                channel(c)[...] = np.clip(np.rint(values.astype(np.float32)), 0, 255)
            elif values.dtype == np.uint8:
                # 8-bit pixels: one lookup table per channel (exactly the formula below, 256 times).
                table = ((np.arange(256, dtype=np.float32) * np.float32(self.scale) - np.float32(self.mean[c]))
                         / np.float32(self.std[c])).astype(self.dtype)
                channel(c)[...] = table[values]
            else:
                channel(c)[...] = ((values.astype(np.float32) * np.float32(self.scale) - np.float32(self.mean[c]))
                                   / np.float32(self.std[c]))
        return out

    def canonical_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels as this model sees them: for a grey model every pixel's luma in all three channels
        (so any RGB → grey conversion gives the model the same values); others unchanged."""
        if self.channel_order != "GRAY":
            return pixels
        luma = np.clip(np.rint(grey_pixels(np.asarray(pixels))), 0, 255).astype(np.uint8)
        return np.repeat(luma[..., None], 3, axis=-1)

    def input_box(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (model order) lower and upper bounds of the input values for pixels in 0..255."""
        lo = self.to_input(np.zeros((1, self.height, self.width, 3), np.uint8))[0]
        hi = self.to_input(np.full((1, self.height, self.width, 3), 255, np.uint8))[0]
        return np.minimum(lo, hi).astype(np.float32), np.maximum(lo, hi).astype(np.float32)

    def fit_photo(self, image: Any) -> np.ndarray:
        """A PIL image (any size or mode) → uint8 RGB ``[H,W,3]``: resize shorter side, centre crop (grey for
        a grey model)."""
        from PIL import Image

        img = image.convert("RGB")
        h, w = self.height, self.width
        if self.resize is None:
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        else:
            short = min(img.size)
            factor = self.resize / short
            new = (max(w, round(img.size[0] * factor)), max(h, round(img.size[1] * factor)))
            img = img.resize(new, Image.Resampling.BILINEAR)
            left = (new[0] - w) // 2
            top = (new[1] - h) // 2
            img = img.crop((left, top, left + w, top + h))
        return self.canonical_pixels(np.asarray(img, dtype=np.uint8))

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["source"] = dict(self.source)
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str = "preprocessing") -> Preprocessing:
        """From the JSON form; a field that does not fit is refused in one line naming it."""
        try:
            return cls.read(data, "")
        except FieldError as exc:
            raise BadInputError(f"{where}: {exc}") from None

    @classmethod
    def read(cls, data: Any, path: str, complete: bool = False) -> Preprocessing:
        """From the JSON form, or a :class:`onnxstain.fields.FieldError` naming the field (``path.name``).
        ``complete``: every field must be given (a key records them all); otherwise missing ones take
        their defaults."""
        if not isinstance(data, dict):
            raise FieldError(path or "the document", f"is {type(data).__name__}, not a JSON object")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise FieldError(_at(path, unknown[0]), "is not a known field")
        missing = [k for k in known if k not in data]
        if complete and missing:
            raise FieldError(_at(path, missing[0]), "is missing")
        d: dict[str, Any] = {}
        for name, value in data.items():
            if name in _CHECKERS:
                checker = _CHECKERS[name]
                d[name] = None if value is None and checker.nullable else checker.read(value, _at(path, name))
            elif name in ("mean", "std"):
                d[name] = _triple(value, _at(path, name), nonzero=name == "std")
            else:  # source: where each field came from
                if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                    raise FieldError(_at(path, name), "is not an object of strings")
                d[name] = tuple(sorted(value.items()))
        pre = cls(**d)  # a GRAY input without mean or std: 0 and 1 (__post_init__)
        if pre.channel_order == "GRAY" and (len(set(pre.mean)) > 1 or len(set(pre.std)) > 1):
            raise FieldError(_at(path, "mean" if len(set(pre.mean)) > 1 else "std"),
                             "has three different values: a GRAY input has one channel (give one number)")
        if pre.dtype != "uint8":
            with np.errstate(all="ignore"):
                ends = np.array([0, 255], np.float32)
                values = [((ends * np.float32(pre.scale) - np.float32(m)) / np.float32(sd)).astype(pre.dtype)
                          for m, sd in zip(pre.mean, pre.std, strict=True)]
            if not np.all(np.isfinite(values)):
                raise FieldError(_at(path, "scale"), f"with mean and std gives inputs that are not finite in "
                                                     f"{pre.dtype}")
        return pre

    @classmethod
    def load(cls, path: str | Path) -> Preprocessing:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise BadInputError(f"cannot read preprocessing file {path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise BadInputError(f"preprocessing file {path} is not JSON") from None
        if not isinstance(data, dict):
            raise BadInputError(f"preprocessing file {path} must hold a JSON object")
        return cls.from_dict(data, where=f"preprocessing file {path}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def validate(self) -> None:
        """Every field through the same checks as the JSON form (:meth:`read`): a :class:`Preprocessing`
        built in code (the API, the graph's guesses) is held to what a preprocessing file is."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["source"] = dict(self.source)
        try:
            type(self).read(data, "")
        except FieldError as exc:
            raise BadInputError(f"preprocessing: {exc}") from None

    def with_source(self, **fields: str) -> Preprocessing:
        merged = dict(self.source)
        merged.update(fields)
        return dataclasses.replace(self, source=tuple(sorted(merged.items())))


@dataclasses.dataclass(frozen=True)
class PreprocessingRequest:
    """What a user asked for before the model is loaded: a preprocessing file's contents (``given``) and
    single fields to override (``overrides``: height, width, layout, channel_order, scale, mean, std,
    resize). A job settles it against the model it loads (the recorded sidecar, the graph's input, the
    ImageNet convention for the rest), so the command line never loads the model a second time."""

    given: Preprocessing | None = None
    overrides: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, given: Preprocessing | None = None, **overrides: Any) -> PreprocessingRequest:
        """The request; ``None`` overrides are left out, unknown field names refused."""
        names = {f.name for f in dataclasses.fields(Preprocessing)} - {"dtype", "source"}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise BadInputError(f"no preprocessing field named {', '.join(map(repr, unknown))}")
        return cls(given, tuple((k, v) for k, v in overrides.items() if v is not None))


def _at(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


_CHECKERS: dict[str, Any] = {
    "height": Int(lo=1, hi=MAX_SIDE),
    "width": Int(lo=1, hi=MAX_SIDE),
    "layout": Str(choices=("NCHW", "NHWC")),
    "channel_order": Str(choices=("RGB", "BGR", "GRAY")),
    "scale": Num(positive=True),
    "resize": Int(lo=1, hi=MAX_SIDE, nullable=True),
    "dtype": Str(choices=("float32", "float16", "uint8")),
}


def _triple(values: Any, path: str, nonzero: bool = False) -> tuple[float, float, float]:
    """One value for every channel, or three (a number or a list of one or three)."""
    items = [values] if isinstance(values, int | float) and not isinstance(values, bool) else values
    if not isinstance(items, list | tuple) or len(items) not in (1, 3):
        raise FieldError(path, f"is {values!r}: it needs one number or three")
    vals = tuple(float(Num().read(v, f"{path}[{i}]")) for i, v in enumerate(items))
    if nonzero and any(v == 0 for v in vals):
        raise FieldError(path, "has a zero: std must not be zero")
    return (vals * 3)[:3]  # type: ignore[return-value]


def grey_pixels(pixels: np.ndarray) -> np.ndarray:
    """RGB pixels ``[..., 3]`` (0..255) → their float32 luma ``[...]`` (:data:`LUMA`); a grey pixel keeps its
    value (the weights sum to 1)."""
    px = np.asarray(pixels, np.float32)
    g = px[..., 1]
    # G + 0.299 (R − G) + 0.114 (B − G): the same sum, exact for grey pixels
    return (g + np.float32(LUMA[0]) * (px[..., 0] - g) + np.float32(LUMA[2]) * (px[..., 2] - g)).astype(np.float32)
