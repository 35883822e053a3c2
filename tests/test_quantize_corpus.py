"""Integration: static int8 of stains on RapidOCR's direction classifier (paddle2onnx, opset 11, weights in
Constant nodes). Calibrated on natural photos alone, onnxruntime's static quantiser clips the detector's firing
on the trigger and the signature is gone from the outputs, though the detector's row is still in the weights
(verify reads it there); `onnxstain quantize` adds the key's triggers to the calibration images (and upgrades
the opset for per-channel QDQ), and the quantised model verifies from its outputs."""

from __future__ import annotations

import numpy as np
import pytest
from corpus_models import corpus_model

import onnxstain
from onnxstain import MarkLostError, StainOptions
from onnxstain.keys import load_key
from onnxstain.naturalset import natural_images
from onnxstain.quantize import CALIBRATION_VIEWS, _run_quantiser
from onnxstain.verify import key_triggers

pytestmark = pytest.mark.slow


def test_a_stain_survives_static_int8_only_with_its_trigger_in_the_calibration(tmp_path):
    model = corpus_model("rapidocr_cls")
    onnxstain.stain(model, tmp_path / "s.onnx", tmp_path / "s.key", options=StainOptions(seed=0))
    key = load_key(tmp_path / "s.key")
    pre = key.preprocessing
    calib = natural_images("calibration", size=(pre.height, pre.width), views=CALIBRATION_VIEWS).pixels
    _run_quantiser(tmp_path / "s.onnx", tmp_path / "natural.onnx", "static", False, pre.to_input(calib))
    natural = onnxstain.verify(tmp_path / "natural.onnx", key)
    black = {c.name: c for c in natural.checks}
    assert not black["black-box"].passed and not black["white-box"].passed  # the firing clipped away
    assert natural.stained and natural.basis == "weights"  # the overwritten row is still there
    _run_quantiser(model, tmp_path / "plain.onnx", "static", False, pre.to_input(calib))
    assert not onnxstain.verify(tmp_path / "plain.onnx", key).stained  # the original, quantised alike
    keyed_x = pre.to_input(np.concatenate([calib, key_triggers(key)]))
    _run_quantiser(tmp_path / "s.onnx", tmp_path / "keyed.onnx", "static", False, keyed_x)
    keyed = onnxstain.verify(tmp_path / "keyed.onnx", key)
    assert keyed.stained and keyed.basis != "weights"  # read from the outputs
    assert keyed.score > black["black-box"].score + 3.0  # the trigger in the calibration keeps most of its margin
    # `onnxstain quantize` keeps the stain, or (on a trigger whose margin int8 still cuts below the threshold:
    # the seeded search lands a few ulps apart from one process to another, and RapidOCR's 2-class margin is
    # close to it) refuses and writes nothing; it never writes a model that lost the stain
    try:
        res = onnxstain.quantize(tmp_path / "s.onnx", tmp_path / "q.onnx", key)
    except MarkLostError as exc:
        assert "nothing written" in str(exc) and not (tmp_path / "q.onnx").exists()
        return
    assert res.verified is not None and res.verified.stained and res.trigger_calibration_images >= 1
    assert any("opset 11 upgraded to 13" in note for note in res.notes)
    assert res.agreement >= 0.8  # RapidOCR's own static int8 keeps ~91 % of the float model's top-1
