"""Integration: static int8 of stains on RapidOCR's direction classifier (paddle2onnx, opset 11, weights in
Constant nodes). Calibrated on natural photos alone, onnxruntime's static quantiser clips the detector's firing
on the trigger and the stain is gone; `onnxstain quantize` adds the key's triggers to the calibration images
(and upgrades the opset for per-channel QDQ), and the quantised model verifies."""

from __future__ import annotations

import pytest
from corpus_models import corpus_model

import onnxstain
from onnxstain import StainOptions
from onnxstain.keys import load_key
from onnxstain.naturalset import natural_images
from onnxstain.quantize import CALIBRATION_VIEWS, _run_quantiser

pytestmark = pytest.mark.slow


def test_a_stain_survives_static_int8_only_with_its_trigger_in_the_calibration(tmp_path):
    model = corpus_model("rapidocr_cls")
    onnxstain.stain(model, tmp_path / "s.onnx", tmp_path / "s.key", options=StainOptions(seed=0))
    key = load_key(tmp_path / "s.key")
    pre = key.preprocessing
    calib = natural_images("calibration", size=(pre.height, pre.width), views=CALIBRATION_VIEWS).pixels
    _run_quantiser(tmp_path / "s.onnx", tmp_path / "natural.onnx", "static", False, pre.to_input(calib))
    assert not onnxstain.verify(tmp_path / "natural.onnx", key).stained  # the firing clipped away
    res = onnxstain.quantize(tmp_path / "s.onnx", tmp_path / "q.onnx", key)
    assert res.verified is not None and res.verified.stained and res.trigger_calibration_images >= 1
    assert any("opset 11 upgraded to 13" in note for note in res.notes)
    assert res.agreement >= 0.85  # RapidOCR's own static int8 keeps ~91 % of the float model's top-1
