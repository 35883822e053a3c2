"""The package keeps its shape (tools/architecture.py): no import circle, no private name across folders,
no function over 80 lines; and the checker finds each kind of violation in a package built here."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import architecture


def test_the_package_is_clean():
    report = architecture.check()
    assert report.cycles == []
    assert report.private_imports == []
    assert report.long_functions == []


def _package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / "onnxstain" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_checker_finds_each_violation(tmp_path):
    long_body = "\n".join(f"    x{i} = {i}" for i in range(85))
    _package(tmp_path, {
        "__init__.py": "from . import a\n",
        "a.py": "from .sub.b import helper\n",
        # a circle closed by a function-local import: it runs, so it counts
        "sub/__init__.py": "",
        "sub/b.py": "def helper():\n    from ..a import helper as h\n    return h\n",
        # under TYPE_CHECKING: never runs, no circle
        "c.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import D\n"
                 "from .sub.e import _hidden\n"),
        "d.py": "from .c import _hidden\nclass D: ...\n",
        "sub/e.py": "from .b import helper as _helper\n_hidden = 1\n",
        "long.py": f"def f():\n{long_body}\n",
    })
    report = architecture.check(tmp_path)
    assert report.cycles == [["onnxstain.a", "onnxstain.sub.b"]]
    assert report.private_imports == ["onnxstain.c imports _hidden from onnxstain.sub.e"]  # d ← c: same folder
    assert report.long_functions == ["onnxstain.long:1 f (86 lines)"]
    assert not report.clean
