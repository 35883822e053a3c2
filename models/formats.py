"""Recipe: the deployment formats of a cached model (fp16, int8 QDQ, Constant-node weights, external data).

Built from a model already in the cache (``python -m models`` first), next to it, with a
``*.preprocessing.json`` each:

* ``fp16`` — weights and I/O in float16 (``onnxconverter_common.float16``, ``keep_io_types=False``);
  the preprocessing records ``dtype: float16``.
* ``qdq`` — int8 QDQ with per-channel int8 weights and uint8 activations
  (``onnxruntime.quantization.quantize_static``, calibrated on 64 natural calibration images after
  ``quant_pre_process``).
* ``constants`` — every initializer moved into a ``Constant`` node (as some exporters write them).
* ``external`` — the same model saved with its weights in an external data file.

    python -m models.formats [--model PATH] [--formats fp16,qdq,constants,external] [--force]

fp16 needs ``onnxconverter-common`` (the ``dev`` extra); QDQ needs only onnxruntime.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx

from onnxstain.cache import cache_dir
from onnxstain.preprocess import Preprocessing

FORMATS = ("fp16", "qdq", "constants", "external")
CALIBRATION_IMAGES = 64


def sidecar(model: Path) -> Path:
    return model.with_name(model.name.removesuffix(".onnx") + ".preprocessing.json")


def variant_path(source: Path, fmt: str) -> Path:
    """``<dir>/<name>.<fmt>.onnx`` beside ``<dir>/<name>.onnx``."""
    return source.with_name(f"{source.name.removesuffix('.onnx')}.{fmt}.onnx")


def _preprocessing(source: Path) -> Preprocessing:
    side = sidecar(source)
    return Preprocessing.load(side) if side.is_file() else Preprocessing()


def _fp16(source: Path, out: Path) -> Preprocessing:
    from onnxconverter_common import float16

    onnx.save(float16.convert_float_to_float16(onnx.load(source), keep_io_types=False), out)
    return Preprocessing.from_dict({**_preprocessing(source).to_dict(), "dtype": "float16"})


def _qdq(source: Path, out: Path) -> Preprocessing:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from onnxstain.naturalset import natural_images

    pre = _preprocessing(source)
    x = pre.to_input(natural_images("calibration", views=1).pixels[:CALIBRATION_IMAGES])
    name = onnx.load(source, load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: x[i : i + 16]} for i in range(0, len(x), 16)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return pre


def to_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every initializer held by a ``Constant`` node placed first."""
    g = model.graph
    consts = [onnx.helper.make_node("Constant", [], [t.name], value=t, name=f"/Constant_{i}")
              for i, t in enumerate(g.initializer)]
    del g.initializer[:]
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return model


def _constants(source: Path, out: Path) -> Preprocessing:
    onnx.save(to_constant_nodes(onnx.load(source)), out)
    return _preprocessing(source)


def _external(source: Path, out: Path) -> Preprocessing:
    onnx.save(onnx.load(source), out, save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{out.name}.data", size_threshold=0)
    return _preprocessing(source)


_BUILDERS: dict[str, Callable[[Path, Path], Preprocessing]] = {
    "fp16": _fp16, "qdq": _qdq, "constants": _constants, "external": _external}


def build(source: Path | None = None, fmt: str = "fp16", force: bool = False) -> Path:
    """Build one format of ``source`` (default: the cached MobileNetV2) and return its path."""
    if fmt not in _BUILDERS:
        raise KeyError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    source = source or cache_dir() / "models" / "mobilenet_v2" / "mobilenet_v2.onnx"
    if not source.is_file():
        raise FileNotFoundError(f"{source} is not built: run `python -m models` first")
    out = variant_path(source, fmt)
    if out.is_file() and not force and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    # build in a private folder, then move the files into place (an external data file goes with it)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp_out = Path(tmp) / out.name
        pre = _BUILDERS[fmt](source, tmp_out)
        onnx.checker.check_model(str(tmp_out))
        pre.save(Path(tmp) / sidecar(out).name)
        for f in sorted(Path(tmp).iterdir(), key=lambda p: p.name == out.name):  # the model last
            os.replace(f, out.parent / f.name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.formats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="source model (default: cached MobileNetV2)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    for fmt in args.formats.split(","):
        print(build(args.model, fmt, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
