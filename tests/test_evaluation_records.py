"""evaluation, eval_inputs, html_parts, stopwatch: the evaluate report's records and their parts, on
synthetic values and a tiny classifier built here (no stain, no search: fast)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from tinymodels import smooth_images, tiny_classifier

from onnxstain import Preprocessing
from onnxstain._onnx.graph import GraphView
from onnxstain._report import html as report_html
from onnxstain._report.html_parts import CSS, escape, tag
from onnxstain._report.inputs import evaluation_images, scores_output
from onnxstain._report.records import (
    CONFIDENCE,
    REPORT_FORMAT,
    EvaluateResult,
    Fidelity,
    ImageSetInfo,
    MeasuredRate,
    TriggerCheck,
    clopper_statement,
    json_safe,
)
from onnxstain.errors import BadInputError, KeyMismatchError
from onnxstain.math import bounds
from onnxstain.progress import Silent
from onnxstain.stopwatch import Stopwatch

PRE = Preprocessing(height=32, width=32, resize=None)


def test_json_safe_makes_plain_json():
    got = json_safe({1: np.float32(0.5), "t": (np.int64(3), [math.inf, -math.inf, math.nan]), "s": "x"})
    assert got == {"1": 0.5, "t": [3, ["inf", "-inf", "nan"]], "s": "x"}
    assert type(got["1"]) is float and type(got["t"][0]) is int
    json.dumps(got, allow_nan=False)  # no bare Infinity/NaN left


def test_clopper_statement_names_the_measurement_and_the_bound():
    up = bounds.radius_exceedance_bound(0, 200, CONFIDENCE)
    text = clopper_statement(0, 200, "photo", up)
    assert "0 of 200 photos fired" in text and "per-photo" in text
    assert bounds.format_probability(math.log10(up)) in text
    assert "is ≤ 0 (one-sided" in clopper_statement(3, 3, "image", 0.0)  # an upper bound of 0 reads as 0


def _result() -> EvaluateResult:
    ball = bounds.ball_bound(2.0, 1.0, 32, positions=4, draws=8)
    info = ImageSetInfo(source="array", images=4, photos=4, views_per_photo=1, height=32, width=32, correlation="")
    fid = Fidelity(images=4, agreement=1.0, differing=0, differing_fragile=0, mean_kl=0.0, max_kl=0.0,
                   max_abs_delta=0.0, fragile_fraction=0.0, fragile_margin=0.05)
    trig = TriggerCheck(selected_positions=[0], threshold=2.0, modified_scores=[3.0], original_scores=[0.1],
                        modified_fires=True, original_fires=False, key_scores=[3.0], stained=True,
                        signature_type="class", signature_score=12.0, signature_threshold=6.0, original_stained=False,
                        original_signature_score=-1.0, cross_key_bound=ball, checks=[])
    measured = MeasuredRate(unit="image", firing=0, total=4, rate=0.0, upper=0.5, confidence=CONFIDENCE,
                            statement=clopper_statement(0, 4, "image", 0.5))
    return EvaluateResult(original="a.onnx", modified="b.onnx", original_sha256="0" * 64, modified_sha256="1" * 64,
                          key_commitment="c", host="conv", mode="insert", variant="non-additive", m=32, threshold=2.0,
                          images=info, detector=None, coverage=None, ball_bound=ball, data_driven_bound=None,
                          mixed_bound=None, measured=measured, photo_level=None, fidelity=fid, trigger=trig,
                          white_box=False, notes=["n"], timings={"total": 0.1})


def test_report_labels_bounds_and_measurements(tmp_path):
    res = _result()
    d = res.to_dict()
    assert d["format"] == REPORT_FORMAT and d["version"] == 1
    assert d["bounds"]["ball"]["type"] == "bound" and d["bounds"]["measured"]["type"] == "measurement"
    assert d["fidelity"]["type"] == "measurement" and d["detector"] is None
    assert d["trigger"]["cross_key_bound"]["type"] == "bound"
    res.write_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(d))


def test_report_html_is_one_page(tmp_path):
    pytest.importorskip("matplotlib")
    report_html.write_html(_result(), tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") or page.lstrip().lower().startswith("<!doctype html>")
    assert CSS.strip().splitlines()[0] in page and "STAINED" in page


def test_html_parts_escape_and_tag():
    assert escape("<a&b>") == "&lt;a&amp;b&gt;"
    assert 'class="tag bound"' in tag("bound") and 'class="tag measured"' in tag("measured")


def test_evaluation_images_from_an_array():
    px = smooth_images(5, seed=2)
    pixels, photo_of, names, info, view_of = evaluation_images(px, PRE, 16, Silent())
    assert pixels is px and list(photo_of) == list(range(5)) and len(names) == 5
    assert info.images == info.photos == 5 and info.views_per_photo == 1 and not view_of.any()
    with pytest.raises(BadInputError, match="uint8"):
        evaluation_images(px[:, :16], PRE, 16, Silent())


def test_scores_output_by_name_or_the_only_output():
    view = GraphView(tiny_classifier(), PRE.input_shape())
    only = view.output_names[0]
    assert scores_output(view, only, "original") == only
    assert scores_output(view, "renamed", "original") == only  # one output: it is the scores
    two = tiny_classifier()
    two.graph.output.append(onnx.helper.make_tensor_value_info(two.graph.node[0].output[0], onnx.TensorProto.FLOAT,
                                                               None))
    with pytest.raises(KeyMismatchError, match="no output 'renamed'"):
        scores_output(GraphView(two, PRE.input_shape()), "renamed", "modified")


def test_stopwatch_laps_in_order():
    clock = Stopwatch()
    clock.lap("a")
    clock.lap("b")
    t = clock.total()
    assert list(t) == ["a", "b", "total"] and t["total"] >= t["a"] + t["b"] >= 0.0
