"""Where onnxstain keeps what it builds (natural-image sets, recipe models): never in git."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$ONNXSTAIN_CACHE`` if set, else ``~/.cache/onnxstain``; created on first use."""
    root = os.environ.get("ONNXSTAIN_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "onnxstain"
    path.mkdir(parents=True, exist_ok=True)
    return path
