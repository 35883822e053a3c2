"""Tensor data of models whose weights stay on disk (external data).

A model loaded by :func:`onnxstain._onnx.io.load_model` keeps its external tensors on disk: each
one's ``location`` is rewritten to the data file's path *relative to the filesystem root*, so the
model is self-describing wherever it travels in memory (copies, feature taps, edits). onnxruntime
is pointed at ``/`` as the external-data folder (:func:`external_folder`); arrays are read on
demand (:func:`tensor_array`); :func:`onnxstain._onnx.io.save_model` streams them into the output's
own data file. Edited tensors are replaced by in-memory ones, as usual.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(os.path.abspath(os.sep))

_NATIVE: dict[int, type[np.generic]] = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.BOOL: np.bool_,
}


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def external_info(tensor: onnx.TensorProto) -> tuple[Path, int, int | None]:
    """(data file, offset, length or None) of an external tensor with a root-relative location."""
    kv = {e.key: e.value for e in tensor.external_data}
    length = kv.get("length")
    return ROOT / kv["location"], int(kv.get("offset", 0) or 0), None if length is None else int(length)


def tensor_array(tensor: onnx.TensorProto, mapped: bool = False) -> np.ndarray:
    """The tensor's value; external data is read from disk (the tensor is not modified).

    ``mapped``: map external data copy-on-write instead of reading it (pages are loaded as they
    are used and shared with onnxruntime's own mapping of the file).
    """
    if not is_external(tensor):
        return stored_array(tensor)
    path, offset, _ = external_info(tensor)
    dtype = _NATIVE.get(tensor.data_type)
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    if dtype is not None and np.little_endian and mapped and count > 0:
        return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=tuple(tensor.dims) or (1,)).reshape(
            tuple(tensor.dims))
    if dtype is not None and np.little_endian:
        arr = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        if arr.size != count:
            raise ValueError(f"{path} ends before the data of tensor {tensor.name!r}")
        return arr.reshape(tuple(tensor.dims))
    return stored_array(tensor, base_dir=str(ROOT))


def stored_array(tensor: onnx.TensorProto, base_dir: str = "") -> np.ndarray:
    """``numpy_helper.to_array``, with a one-line :class:`BadModelError` naming the tensor when its element
    type is unknown or its data does not fit its type and dims."""
    try:
        return numpy_helper.to_array(tensor, base_dir=base_dir)
    except (KeyError, ValueError, TypeError) as exc:
        from ..errors import BadModelError

        problem = f"element type {tensor.data_type} is unknown" if isinstance(exc, KeyError) else \
            f"its data does not fit its type and dims {list(tensor.dims)}"
        raise BadModelError(f"tensor {tensor.name!r}: {problem}") from None


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in model.graph.initializer)


def external_folder(model: onnx.ModelProto) -> str | None:
    """The folder onnxruntime must resolve ``model``'s external data against (None: all in memory)."""
    return str(ROOT) if uses_external_data(model) else None


def make_root_relative(model: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """Rewrite the external tensors' locations (relative to ``base_dir``) relative to the root.

    Returns the data files used. Raises ValueError for a location outside ``base_dir``, a missing
    file, or a tensor whose bytes run past the end of its file.
    """
    base = Path(os.path.realpath(base_dir))
    files: dict[Path, int] = {}
    for t in model.graph.initializer:
        if not is_external(t):
            continue
        kv = {e.key: e for e in t.external_data}
        if "location" not in kv:
            raise ValueError(f"tensor {t.name!r} has external data without a location")
        loc = kv["location"].value
        if os.path.isabs(loc):
            raise ValueError(f"tensor {t.name!r}: absolute external data location {loc!r}")
        path = Path(os.path.realpath(base / loc))
        if base != path and base not in path.parents:
            raise ValueError(f"tensor {t.name!r}: external data {loc!r} is outside the model's folder")
        if path not in files:
            if not path.is_file():
                raise ValueError(f"external data file {loc!r} is missing")
            files[path] = path.stat().st_size
        offset = int(kv["offset"].value) if "offset" in kv else 0
        length = int(kv["length"].value) if "length" in kv else None
        if length is not None and offset + length > files[path]:
            raise ValueError(f"tensor {t.name!r} runs past the end of {loc!r}")
        kv["location"].value = str(path.relative_to(ROOT))
    return list(files)
