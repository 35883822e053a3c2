"""lock_audit_result: the audit's record, its verdict, its JSON form and its HTML page (no models needed)."""

from __future__ import annotations

import json
import math

from onnxstain._report.evaluate import ImageSetInfo
from onnxstain._report.lock_audit import LockAuditResult
from onnxstain._report.lock_audit_result import (
    REPORT_FORMAT,
    REPORT_VERSION,
    Condition,
    LockAuditRecord,
    NaturalFirings,
)
from onnxstain._report.lock_html import render
from onnxstain.math import bounds


def _condition(name: str, agreement: float, passed: bool, delta: float | None = 0.0) -> Condition:
    return Condition(name=name, description=f"the {name} condition", images=32, agreement=agreement,
                     centre_agreement=None, unlocked=None, mean_gate=None, max_abs_delta=delta, expect="locked",
                     passed=passed)


def _record(cls=LockAuditResult, passed: bool = True) -> LockAuditRecord:
    key_bound = bounds.ball_bound(0.9, 1.0, 48, positions=1, draws=32, kind="data-free")
    return cls(
        original="a.onnx", locked="b.onnx", original_sha256="0" * 64, locked_sha256="1" * 64, key_commitment="c",
        lock_kind="gate", host="pixels", patch_box=(0, 0, 4, 4), classes=10, chance=0.1,
        images=ImageSetInfo(source="test", images=32, photos=2, views_per_photo=16, height=48, width=48,
                            correlation="views of one photo are correlated"),
        centre_crops=2,
        conditions=[_condition("no patch", 0.1, True), _condition("patch, same image", 1.0, passed, math.inf)],
        firings=NaturalFirings(detectors=1, positions=1, samples=32, firings=0, images_firing=0,
                               max_weakest_score=-1.5, threshold=0.9),
        key_bound=key_bound, data_driven_bound=None, measured_upper=float("nan"), measured_statement=None,
        notes=["a note"], timings={"total": 1.0},
    )


def test_verdict_is_every_condition():
    assert _record().passed
    failing = _record(passed=False)
    assert not failing.passed
    assert failing.condition("patch, same image").agreement == 1.0


def test_report_labels_measurements_and_bounds():
    rep = _record(LockAuditRecord).report()
    assert rep["format"] == REPORT_FORMAT and rep["version"] == REPORT_VERSION
    assert all(c["type"] == "measurement" for c in rep["conditions"])
    assert rep["natural_firings"]["type"] == "measurement" and rep["natural_firings"]["firings"] == 0
    assert rep["bounds"]["key"]["type"] == "bound" and rep["bounds"]["data_driven"] is None
    assert rep["key"]["patch_box"] == [0, 0, 4, 4] and rep["passed"] is True


def test_json_is_plain(tmp_path):
    res = _record()
    res.write_json(tmp_path / "a.json")
    back = json.loads((tmp_path / "a.json").read_text())
    assert back["bounds"]["measured_upper"] == "nan"  # non-finite floats become strings
    assert back["conditions"][1]["max_abs_delta"] == "inf"
    assert back == res.to_dict()


def test_html_page_lists_the_conditions(tmp_path):
    res = _record()
    res.write_html(tmp_path / "a.html")
    page = (tmp_path / "a.html").read_text()
    assert page == render(res)
    assert "no patch" in page and "patch, same image" in page and "<html" in page.lower()
