"""Integration: quantising a gate-locked MobileNetV2. Calibrated on clean images only, static int8 clips the
open gate and the patch no longer unlocks the model; `onnxstain quantize` pastes the patch into half of the
calibration images, and the quantised model stays locked and opens with the patch."""

from __future__ import annotations

import onnx
import pytest

import onnxstain
from onnxstain import LockOptions
from onnxstain.keys import load_key
from onnxstain.naturalset import natural_images
from onnxstain.quantize import CALIBRATION_VIEWS, _agreement, _run_quantiser
from onnxstain.verify import key_patch

pytestmark = pytest.mark.slow


def test_patched_calibration_is_what_keeps_a_quantised_lock(mobilenet_v2, tmp_path):
    onnxstain.lock(mobilenet_v2, tmp_path / "l.onnx", tmp_path / "l.key",
                   options=LockOptions(seed=0, occlusion_steps=0))
    key = load_key(tmp_path / "l.key")
    pre = key.preprocessing
    calib = natural_images("calibration", size=(pre.height, pre.width), views=CALIBRATION_VIEWS).pixels
    _run_quantiser(tmp_path / "l.onnx", tmp_path / "clean.onnx", "static", True, pre.to_input(calib))
    opened, closed, _ = _agreement(tmp_path / "l.onnx", onnx.load(tmp_path / "clean.onnx"), pre,
                                   key_patch(key), key.model.classes, None)
    assert closed is not None and opened < 0.2  # the open gate clipped: the patch no longer unlocks
    res = onnxstain.quantize(tmp_path / "l.onnx", tmp_path / "q.onnx", key)
    assert res.closed is not None and res.closed <= 0.05  # still locked without the patch
    assert res.agreement >= 0.75  # with the patch, against the float model (MobileNetV2's own int8 cost ~20 %)
