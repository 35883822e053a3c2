"""tools/bound_sweep.py: measured false-positive rates never exceed the bounds; wrong bounds get flagged."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bound_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("bound_sweep", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bound_sweep"] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(sweep, out: Path, *extra: str) -> dict:
    args = sweep.parse_args(["--quick", "--out", str(out), *extra])
    return sweep.run(args, log=lambda *_: None)


def _tight(row: dict) -> bool:
    """Rows whose bound is exact in expectation (the raw mean exceeds it half the time by chance)."""
    return row.get("dist") == "sphere" or (row["source"] == "synthetic" and "trigger" in row)


def test_binom_check(sweep):
    assert sweep.binom_check(0, 1000, 0.01, 0.99) == (1.0, True, True)
    p, ok, raw = sweep.binom_check(11, 1000, 0.01, 0.99)  # 1.1 % measured vs 1 %: noise
    assert ok and not raw and 0.01 < p < 1
    p, ok, raw = sweep.binom_check(40, 1000, 0.01, 0.99)  # 4 % vs 1 %: a violation
    assert not ok and not raw and p < 1e-6
    assert sweep.binom_check(5, 10, 1.0, 0.99)[1]
    assert not sweep.binom_check(1, 10**6, 0.0, 0.99)[1]  # any firing above a zero bound


def test_quick_synthetic_all_ok(sweep, tmp_path):
    res = _run(sweep, tmp_path)
    rows, cross = res["rows"], res["cross_key"]
    s = res["summary"]
    assert res["seconds"] < 30
    dims = {r["n"] for r in rows}
    assert dims == {3, 5, 10, 20} and {r["dist"] for r in rows} == {"sphere", "gauss"}
    assert len(rows) >= 24 and len(cross) >= 16
    assert s["all_ok"], s["per_row_failures"]
    assert all(r["ok_fw"] for r in rows + cross)
    # where the bound has slack, the plain comparison holds too
    assert all(r["raw_ok"] for r in rows + cross if not _tight(r))
    for r in rows:
        # the measured mean estimates E cap(τ/r) exactly; the bound is its worst case
        assert r["pred_sample"] <= r["bound_sample"] * (1 + 1e-9)
        assert r["meas_sample_all"] >= 0 and r["bound_image"] >= r["bound_sample"]
        if r["dist"] == "sphere":
            assert r["samples_outside_R"] == 0
            assert abs(r["meas_sample"] / r["bound_sample"] - 1) < 0.15
            assert math.isclose(r["pred_sample"], r["bound_sample"], rel_tol=1e-6)
    for r in cross:
        assert abs(r["measured"] / r["bound"] - 1) < 0.3
    # outputs
    for name in ("bound_sweep.md", "bound_sweep.csv", "bound_sweep.json", "cross_key.csv", "bound_sweep.png"):
        assert (tmp_path / name).stat().st_size > 0
    with (tmp_path / "bound_sweep.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) and set(sweep.ROW_COLUMNS) <= set(table[0])
    data = json.loads((tmp_path / "bound_sweep.json").read_text())
    assert data["summary"]["all_ok"] is True and len(data["rows"]) == len(rows)
    assert "| ok fw |" in (tmp_path / "bound_sweep.md").read_text()


def test_wrong_bound_is_flagged(sweep, tmp_path):
    res = _run(sweep, tmp_path, "--bound-scale", "0.25", "--no-plot")
    assert not res["summary"]["all_ok"]
    low = [r for r in res["rows"] if r["dist"] == "sphere" and r["n"] <= 5]
    assert low
    for r in low:
        assert not r["ok"] and not r["ok_fw"] and not r["raw_ok_sample"]
        assert "VIOLATION" in r["flag"]
    bad_cross = [r for r in res["cross_key"] if r["n"] <= 5]
    assert bad_cross and not any(r["ok_fw"] for r in bad_cross)
    assert sweep.main(["--quick", "--out", str(tmp_path / "cli"), "--bound-scale", "0.25", "--no-plot",
                       "--dims", "3"]) == 1
    assert sweep.main(["--quick", "--out", str(tmp_path / "cli_ok"), "--no-plot", "--dims", "3"]) == 0


def test_measure_setting_counts_outside_radius(sweep):
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((50, 3, 5))
    radius = float(np.quantile(np.linalg.norm(feats, axis=2), 0.9))
    keys = sweep.draw_keys(rng, 200, 5)
    rows, skipped = sweep.measure_setting(feats, keys, [0.1, 0.3], radius, confidence=0.99, min_expected=10,
                                          info={"source": "test", "layer": "x", "n": 5, "dist": "gauss"})
    assert skipped == 0 and len(rows) == 2
    r = rows[0]
    outside = int((np.linalg.norm(feats, axis=2) > radius).sum())
    assert r["samples_outside_R"] == outside and r["samples"] == 150
    assert r["images_outside_R"] == int((np.linalg.norm(feats, axis=2) > radius).any(axis=1).sum())
    assert r["ok"] and r["raw_ok_sample"]


@pytest.mark.slow
def test_mobilenet_layers(sweep, mobilenet_v2, tmp_path):
    args = sweep.parse_args(["--sources", "mobilenet", "--model", str(mobilenet_v2), "--layers",
                             "features.4,features.18", "--cross-layers", "features.4", "--max-images", "16",
                             "--real-keys", "200", "--cross-keys", "20", "--cross-draws", "100", "--out",
                             str(tmp_path), "--no-plot"])
    res = sweep.run(args, log=lambda *_: None)
    assert res["summary"]["all_ok"]
    assert {r["layer"] for r in res["rows"]} == {"features.4", "features.18"}
    for r in res["rows"]:
        assert r["meas_sample"] <= r["bound_sample"] and r["meas_image_all"] <= r["dd_bound"]
    layers = {lay["layer"]: lay for lay in res["meta"]["mobilenet_v2"]["layers"]}
    assert layers["features.4"]["m"] == 24 and layers["features.18"]["m"] == 320
    assert layers["features.4"]["positions_used"] == 64 and layers["features.18"]["positions_used"] == 49
    assert res["cross_key"] and all(r["layer"] == "features.4" for r in res["cross_key"])
