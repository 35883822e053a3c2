"""tests/README.md maps every module of the package to the tests that cover it (tools/test_map.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import test_map


def test_every_module_has_a_test_and_the_map_is_current(capsys):
    assert test_map.main(["--check"]) == 0, capsys.readouterr().err


def test_a_module_without_tests_is_reported(monkeypatch):
    monkeypatch.setattr(test_map, "modules", lambda: ["verify", "no_such_module"])
    _, missing = test_map.table()
    assert missing == ["no_such_module: no test imports it and INTEGRATION does not list it"]
