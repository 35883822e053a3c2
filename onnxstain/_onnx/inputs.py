"""What the graph itself says about the model input: name, layout, size and dtype."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx

from ..errors import BadInputError, UnsupportedModelError
from ..preprocess import Preprocessing, PreprocessingRequest
from .graph import GraphView

_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
           onnx.TensorProto.UINT8: "uint8"}


@dataclasses.dataclass(frozen=True)
class ImageInput:
    name: str
    layout: str | None  # "NCHW", "NHWC" or None when the graph does not say
    height: int | None
    width: int | None
    dtype: str
    channels: int = 3  # 1: a grey image
    batch: int | None = None  # the batch size when the graph fixes it


def _type_name(elem_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"{elem_type} (unknown)"


def _shape_text(dims: list[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def image_input(model: onnx.ModelProto) -> ImageInput:
    view = GraphView(model)
    if len(view.graph_inputs) != 1:
        raise UnsupportedModelError(
            f"the model has {len(view.graph_inputs)} inputs; onnxstain needs a single image input")
    inp = view.graph_inputs[0]
    t = inp.type.tensor_type
    dtype = _DTYPES.get(t.elem_type)
    if dtype is None:
        raise UnsupportedModelError(
            f"input {inp.name!r} has element type {_type_name(t.elem_type)}; "
            "onnxstain handles float32, float16 and uint8 images")
    # a dim_value of -1 or 0 is no size (paddle2onnx writes -1 for a dynamic batch)
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
    if len(dims) != 4:
        raise UnsupportedModelError(f"input {inp.name!r} has rank {len(dims)}; an image batch has rank 4")
    layout = None
    h = w = None
    channels = 3
    for c in (3, 1):  # colour first: a [N, 3, H, 1] input is NCHW colour, not NHWC grey
        if dims[1] == c and dims[3] != c:
            layout, h, w, channels = "NCHW", dims[2], dims[3], c
        elif dims[3] == c and dims[1] != c:
            layout, h, w, channels = "NHWC", dims[1], dims[2], c
        elif dims[1] == c:
            layout, h, w, channels = "NCHW", dims[2], dims[3], c
        if layout:
            break
    if layout is None and all(isinstance(d, int) and d not in (1, 3) for d in (dims[1], dims[3])):
        raise UnsupportedModelError(
            f"input {inp.name!r} has shape {_shape_text(dims)}: neither axis 1 nor axis 3 holds 3 (RGB/BGR) or 1 "
            "(grey) channels")
    return ImageInput(inp.name, layout, h, w, dtype, channels, dims[0] or None)


def sidecar_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_name(p.name.removesuffix(".onnx") + ".preprocessing.json")


def settle_preprocessing(model: onnx.ModelProto, model_path: str | Path | None,
                         preprocessing: Preprocessing | PreprocessingRequest | None
                         ) -> tuple[Preprocessing, list[str]]:
    """A job's preprocessing once its model is loaded: a complete :class:`Preprocessing` as given, or a
    request (a file's contents and single-field overrides) settled by :func:`infer_preprocessing`."""
    if isinstance(preprocessing, PreprocessingRequest):
        return infer_preprocessing(model, model_path, preprocessing.given, **dict(preprocessing.overrides))
    return infer_preprocessing(model, model_path, preprocessing)


def infer_preprocessing(model: onnx.ModelProto, model_path: str | Path | None = None,
                        given: Preprocessing | None = None, **overrides) -> tuple[Preprocessing, list[str]]:
    """The preprocessing to use and notes on what was assumed.

    Order: a user file (``given``) or the recorded ``<model>.preprocessing.json`` beside the model;
    else the graph's input shape, layout and dtype with the ImageNet convention for the rest.
    ``overrides`` (non-None values) replace single fields.
    """
    info = image_input(model)
    notes: list[str] = []
    if given is None and model_path is not None and sidecar_path(model_path).exists():
        given = Preprocessing.load(sidecar_path(model_path)).with_source(all="recorded")
    if given is None:
        fields: dict = {}
        if info.layout:
            fields["layout"] = info.layout
        if info.height or info.width:  # one side fixed (a text line's height): a square of it
            fields["height"] = info.height or info.width
            fields["width"] = info.width or info.height
        fields["dtype"] = info.dtype
        if info.channels == 1:  # a grey model: 0..1, no normalisation, unless told otherwise
            fields.update(channel_order="GRAY", scale=1.0 / 255.0, mean=(0.0,) * 3, std=(1.0,) * 3)
        if info.dtype == "uint8":
            fields.update(scale=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        pre = Preprocessing(**fields).with_source(size="graph", layout="graph", dtype="graph")
        if info.channels == 1:
            pre = pre.with_source(channel_order="graph")
    else:
        pre = given
    changed = {k: v for k, v in overrides.items() if v is not None}
    if changed:
        pre = Preprocessing.from_dict({**pre.to_dict(), **changed}).with_source(**{k: "user" for k in changed})
    if given is None:
        notes += _assumption_notes(info, pre, set(changed))
    pre.validate()
    fixed = (info.height, info.width)
    if info.layout == pre.layout and any(f is not None and f != p for f, p in zip(fixed, (pre.height, pre.width),
                                                                                    strict=True)):
        raise BadInputError(f"the model's input is fixed at {_side(info.height)}x{_side(info.width)}; the "
                            f"preprocessing asks for {pre.height}x{pre.width} (drop --size, or fix the preprocessing "
                            "file)")
    if info.layout and info.layout != pre.layout:
        notes.append(f"the graph input looks {info.layout} but the preprocessing says {pre.layout}")
    if info.layout and (info.channels == 1) != (pre.channel_order == "GRAY"):
        raise BadInputError(f"the model's input has {info.channels} channel(s); the preprocessing says "
                            f"{pre.channel_order} (use --channel-order {'GRAY' if info.channels == 1 else 'RGB'})")
    return pre, notes


def _side(n: int | None) -> str:
    return "?" if n is None else str(n)


_IMAGENET_FIELDS = {"channel_order": "RGB", "scale": "/255", "mean": "mean 0.485,0.456,0.406",
                    "std": "std 0.229,0.224,0.225"}
_GREY_FIELDS = {"scale": "/255", "mean": "mean 0", "std": "std 1"}


def _assumption_notes(info: ImageInput, pre: Preprocessing, given: set[str]) -> list[str]:
    """What was assumed rather than read from the graph or given by the user (nothing when all was given)."""
    notes = []
    grey = info.channels == 1
    assumed = [text for name, text in (_GREY_FIELDS if grey else _IMAGENET_FIELDS).items() if name not in given]
    if info.dtype != "uint8" and assumed:
        what = "grey 0..1 input (luma of the pixels" if grey else "ImageNet preprocessing ("
        notes.append(f"assumed {what}{', ' if grey else ''}{', '.join(assumed)}); pass --preprocessing FILE or "
                     "flags if the model differs")
    if not (info.height and info.width) and not {"height", "width"} & given:
        which = ("no fixed input size" if not (info.height or info.width)
                 else f"a fixed {'height' if info.height else 'width'} only")
        notes.append(f"the graph has {which}; assumed {pre.height}x{pre.width} (use --size)")
    return notes
