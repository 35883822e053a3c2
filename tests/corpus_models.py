"""The compatibility corpus's real models (``models/corpus.py``) for integration tests: built into the cache
on first use (light recipes), or the test skips with a message (a heavy model not built, a package missing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from models.corpus import BY_NAME


def corpus_model(name: str) -> Path:
    entry = BY_NAME[name]
    if not all(importlib.util.find_spec(m) is not None for m in entry.needs):
        pytest.skip(f"{name}: recipe requirements not installed ({', '.join(entry.needs)}; see ./dev setup)")
    if entry.heavy:
        if not entry.built():
            pytest.skip(f"{name}: heavy corpus model not built (run ./dev corpus)")
        return entry.path()
    return entry.build()
