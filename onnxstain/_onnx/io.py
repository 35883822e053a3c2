"""Reading and writing ONNX files safely.

* ``load_model`` gives one clear :class:`BadModelError` for anything that is not a valid ONNX model
  (missing, not protobuf, truncated, fails the checker). External data above
  ``LAZY_EXTERNAL_BYTES`` stays on disk: the tensors point at it (see :mod:`.tensors`) and are read
  when needed, so a model of several GB costs no more memory than the tensors actually used
  (onnxruntime maps the file while it runs). Smaller external data is read into memory.
* ``save_model`` restores the source's ``ir_version``, ``opset_import``, producer fields, domain,
  ``model_version``, ``doc_string`` and ``metadata_props``; runs the path-based ``onnx.checker`` on a
  temporary file; and only then renames it into place, so a failure never leaves a half-written file.
  With external data it streams each tensor to ``<name>.data`` (unchanged tensors are copied from
  the source's data file chunk by chunk), so the weights are never all in memory at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from ..errors import BadInputError, BadModelError
from . import tensors

# Protobuf cannot serialise a message of 2 GiB or more; above this size weights go to a side file.
_PROTO_LIMIT = 2**31 - 2**24
# External data up to this size is read into memory at load time; larger stays on disk.
LAZY_EXTERNAL_BYTES = 256 * 2**20


@dataclasses.dataclass
class LoadedModel:
    """A model read from disk, with what is needed to write a faithful copy of it."""

    model: onnx.ModelProto
    path: Path
    sha256: str
    external_data: bool

    @property
    def name(self) -> str:
        return self.path.name


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return tensors.uses_external_data(model)


def load_model(path: str | Path, check: bool = True) -> LoadedModel:
    """Load an ONNX model and its external data; raise BadModelError with one line if it is bad."""
    p = Path(path)
    if not p.exists():
        raise BadModelError(f"{p}: no such file")
    if p.is_dir():
        raise BadModelError(f"{p} is a directory, not an ONNX file")
    try:
        head = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise BadModelError(f"{p} is not an ONNX model ({_one_line(exc)})") from None
    except Exception as exc:  # protobuf raises assorted errors on garbage
        raise BadModelError(f"{p} is not an ONNX model ({type(exc).__name__})") from None
    if not head.graph.node or not head.graph.input:
        raise BadModelError(f"{p} is not an ONNX model (no graph: empty, truncated or another format)")
    bad = _non_utf8_name(head.graph)
    if bad is not None:
        raise BadModelError(f"{p} is not a valid ONNX model: a {bad} is not valid UTF-8 text")
    external = _uses_external_data(head)
    if check:
        try:
            onnx.checker.check_model(str(p))
        except Exception as exc:
            raise BadModelError(f"{p} fails the ONNX checker: {_one_line(exc)}") from None
    if external:
        try:
            files = tensors.make_root_relative(head, p.parent)
            if sum(f.stat().st_size for f in files) <= LAZY_EXTERNAL_BYTES:
                _load_into_memory(head)
        except Exception as exc:
            raise BadModelError(f"{p}: cannot read its external data ({_one_line(exc)})") from None
    return LoadedModel(model=head, path=p, sha256=sha256_file(p), external_data=external)


def _non_utf8_name(graph: onnx.GraphProto) -> str | None:
    """What kind of name is not text (protobuf hands invalid UTF-8 strings over as bytes), or None."""
    for what, values in (("graph input name", [v.name for v in graph.input]),
                         ("graph output name", [v.name for v in graph.output]),
                         ("tensor name", [t.name for t in graph.initializer]),
                         ("value name", [v.name for v in graph.value_info])):
        if any(not isinstance(v, str) for v in values):
            return what
    for node in graph.node:
        texts = [node.name, node.op_type, node.domain, *node.input, *node.output, *(a.name for a in node.attribute)]
        if any(not isinstance(v, str) for v in texts):
            return "node name, operator or tensor name"
        for a in node.attribute:
            subgraphs = [a.g] if a.HasField("g") else list(a.graphs)
            for g in subgraphs:
                if (bad := _non_utf8_name(g)) is not None:
                    return bad
    return None


def _load_into_memory(model: onnx.ModelProto) -> None:
    for t in model.graph.initializer:
        if tensors.is_external(t):
            t.CopyFrom(numpy_helper.from_array(tensors.tensor_array(t), t.name))


def restore_model_fields(model: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """Give ``model`` the version, opset, producer and metadata fields of ``source``."""
    if model is source:
        return
    model.ir_version = source.ir_version
    model.producer_name = source.producer_name
    model.producer_version = source.producer_version
    model.domain = source.domain
    model.model_version = source.model_version
    model.doc_string = source.doc_string
    del model.opset_import[:]
    model.opset_import.extend(source.opset_import)
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)


def check_output_path(output: str | Path, source: str | Path) -> Path:
    """Refuse an output path that is (or aliases) the input file."""
    out = Path(output)
    src = Path(source)
    if out.exists() and src.exists() and os.path.samefile(out, src):
        raise BadInputError(f"output {out} is the input model: onnxstain never modifies its input")
    if out.resolve() == src.resolve():
        raise BadInputError(f"output {out} is the input model: onnxstain never modifies its input")
    if out.exists() and out.is_dir():
        raise BadInputError(f"output {out} is a directory")
    if not out.parent.exists():
        raise BadInputError(f"output folder {out.parent} does not exist")
    return out


def save_model(
    model: onnx.ModelProto,
    path: str | Path,
    source: LoadedModel | None = None,
    external_data: bool | None = None,
) -> str:
    """Write ``model`` to ``path`` atomically and return the SHA-256 of the written file.

    The model is checked with the path-based ``onnx.checker`` before it is moved into place.
    Weights go to ``<name>.data`` beside the model when the source used external data, when
    ``external_data`` is True, or when the model is too large for a single protobuf. A run that
    writes a model with its key uses :class:`onnxstain.outputs.Artefacts` instead (one unit).
    """
    out = Path(path)
    if source is not None:
        check_output_path(out, source.path)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        digest, files = write_model_files(model, tmpdir, out.name, source, external_data)
        for tmp in files:  # the data file first: the model that names it comes last
            os.replace(tmp, out.parent / tmp.name)
        return digest
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_model_files(
    model: onnx.ModelProto,
    folder: Path,
    name: str,
    source: LoadedModel | None = None,
    external_data: bool | None = None,
) -> tuple[str, list[Path]]:
    """Write ``model`` as ``folder/name`` (and ``folder/name.data``), checked; nothing is renamed.

    Returns the SHA-256 of the model file and the files written, the data file first. The source's
    version, opset, producer and metadata fields are restored first.
    """
    if source is not None:
        restore_model_fields(model, source.model)
    if external_data is None:
        external_data = ((source is not None and source.external_data) or _uses_external_data(model)
                         or model.ByteSize() > _PROTO_LIMIT)
    tmp_model = folder / name
    data_name = f"{name}.data"
    if external_data:
        _save_streaming(model, tmp_model, data_name)
    else:
        onnx.save_model(model, str(tmp_model))
    try:
        onnx.checker.check_model(str(tmp_model))
    except Exception as exc:
        raise BadModelError(f"refusing to write {name}: the result fails the ONNX checker "
                            f"({_one_line(exc)})") from None
    files = [folder / data_name] if external_data and (folder / data_name).exists() else []
    return sha256_file(tmp_model), [*files, tmp_model]


_ALIGN = 4096  # page-aligned offsets let onnxruntime map the data file instead of copying it
_CHUNK = 1 << 24
_INLINE_BELOW = 0  # bytes: smaller tensors stay in the protobuf (0: every tensor goes to the data file)
# Small int64 tensors are shapes, axes and indices (Slice starts, Reshape shapes): onnxruntime's shape
# inference must read them when it loads the model, and it cannot read them from external data.
_INLINE_INT64_BELOW = 4096


def _save_streaming(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    """Write ``model`` with every tensor of ``_INLINE_BELOW`` bytes or more in ``data_name`` beside it.

    ``model`` is not modified. Tensors held on disk are copied from their file in chunks;
    in-memory ones are written from their bytes.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)  # cheap: external tensors carry no data
    with open(path.parent / data_name, "wb") as fh:
        for t in out.graph.initializer:
            if tensors.is_external(t):
                src, offset, length = tensors.external_info(t)
                if length is None:
                    length = src.stat().st_size - offset
                start = _pad(fh)
                with open(src, "rb") as sf:
                    sf.seek(offset)
                    left = length
                    while left > 0:
                        chunk = sf.read(min(_CHUNK, left))
                        if not chunk:
                            raise BadModelError(f"{src} ends before the data of tensor {t.name!r}")
                        fh.write(chunk)
                        left -= len(chunk)
            else:
                raw = t.raw_data if t.HasField("raw_data") else None
                if raw is None:
                    if t.data_type == onnx.TensorProto.STRING:
                        continue
                    raw = numpy_helper.from_array(tensors.tensor_array(t)).raw_data
                length = len(raw)
                if length < _INLINE_BELOW or (t.data_type == onnx.TensorProto.INT64 and length < _INLINE_INT64_BELOW):
                    continue
                start = _pad(fh)
                fh.write(raw)
                del raw
            _set_external(t, data_name, start, length)
    onnx.save_model(out, str(path))


def _pad(fh) -> int:
    pos = fh.tell()
    if pos % _ALIGN:
        fh.write(b"\0" * (_ALIGN - pos % _ALIGN))
    return fh.tell()


def _set_external(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                  "string_data"):
        t.ClearField(field)
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL


def default_file_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` would give: 0o666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_bytes_atomic(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write a small file atomically with the given permission bits (default: 0o666 less the umask)."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        os.fchmod(fd, default_file_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
