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


def _type_name(elem_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"{elem_type} (unknown)"


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
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if len(dims) != 4:
        raise UnsupportedModelError(f"input {inp.name!r} has rank {len(dims)}; an image batch has rank 4")
    layout = None
    h = w = None
    if dims[1] == 3 and dims[3] != 3:
        layout, h, w = "NCHW", dims[2], dims[3]
    elif dims[3] == 3 and dims[1] != 3:
        layout, h, w = "NHWC", dims[1], dims[2]
    elif dims[1] == 3:
        layout, h, w = "NCHW", dims[2], dims[3]
    return ImageInput(inp.name, layout, h, w, dtype)


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
        if info.height and info.width:
            fields["height"], fields["width"] = info.height, info.width
        fields["dtype"] = info.dtype
        if info.dtype == "uint8":
            fields.update(scale=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        pre = Preprocessing(**fields).with_source(size="graph", layout="graph", dtype="graph")
    else:
        pre = given
    changed = {k: v for k, v in overrides.items() if v is not None}
    if changed:
        pre = Preprocessing.from_dict({**pre.to_dict(), **changed}).with_source(**{k: "user" for k in changed})
    if given is None:
        notes += _assumption_notes(info, pre, set(changed))
    pre.validate()
    fixed = (info.height, info.width)
    if info.layout == pre.layout and all(fixed) and fixed != (pre.height, pre.width):
        raise BadInputError(f"the model's input is fixed at {info.height}x{info.width}; the preprocessing asks for "
                            f"{pre.height}x{pre.width} (drop --size, or fix the preprocessing file)")
    if info.layout and info.layout != pre.layout:
        notes.append(f"the graph input looks {info.layout} but the preprocessing says {pre.layout}")
    return pre, notes


_IMAGENET_FIELDS = {"channel_order": "RGB", "scale": "/255", "mean": "mean 0.485,0.456,0.406",
                    "std": "std 0.229,0.224,0.225"}


def _assumption_notes(info: ImageInput, pre: Preprocessing, given: set[str]) -> list[str]:
    """What was assumed rather than read from the graph or given by the user (nothing when all was given)."""
    notes = []
    assumed = [text for name, text in _IMAGENET_FIELDS.items() if name not in given]
    if info.dtype != "uint8" and assumed:
        notes.append(f"assumed ImageNet preprocessing ({', '.join(assumed)}); pass --preprocessing FILE or "
                     "flags if the model differs")
    if not (info.height and info.width) and not {"height", "width"} & given:
        notes.append(f"the graph has no fixed input size; assumed {pre.height}x{pre.width} (use --size)")
    return notes
