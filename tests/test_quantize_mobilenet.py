"""Integration: quantising a gate-locked MobileNetV2. Static int8 calibrated on clean photos alone (what a
user's own pipeline does) keeps the lock: the gate's maps hold their open level and the locked scores' range
holds the unlocked ones, so the patch opens the quantised model as it opens the quantised original; `onnxstain
quantize` (the patch on half of the calibration images) does too."""

from __future__ import annotations

import onnx
import pytest

import onnxstain
from onnxstain import LockOptions
from onnxstain._onnx.graph import GraphView
from onnxstain.keys import load_key
from onnxstain.naturalset import natural_images
from onnxstain.quantize import CALIBRATION_VIEWS, _agreement, _judge, _run_quantiser
from onnxstain.verify import key_patch

pytestmark = pytest.mark.slow


def test_a_quantiser_calibrated_on_clean_photos_keeps_the_lock(mobilenet_v2, tmp_path):
    onnxstain.lock(mobilenet_v2, tmp_path / "l.onnx", tmp_path / "l.key",
                   options=LockOptions(kind="gate", seed=0, occlusion_steps=0))
    key = load_key(tmp_path / "l.key")
    pre = key.preprocessing
    calib = pre.to_input(natural_images("calibration", size=(pre.height, pre.width), views=CALIBRATION_VIEWS).pixels)
    _run_quantiser(tmp_path / "l.onnx", tmp_path / "clean.onnx", "static", True, calib)
    _run_quantiser(mobilenet_v2, tmp_path / "original.onnx", "static", True, calib)
    judge, _ = _judge(GraphView(onnx.load(tmp_path / "l.onnx"), pre.input_shape()), key)
    opened, closed, _ = _agreement(tmp_path / "l.onnx", onnx.load(tmp_path / "clean.onnx"), pre,
                                   key_patch(key), judge, None)
    # the quantised original on the same patched photos, against the float original (= the float locked model)
    reference, _, _ = _agreement(tmp_path / "l.onnx", onnx.load(tmp_path / "original.onnx"), pre,
                                 key_patch(key), judge, None)
    assert opened >= 0.95 * reference  # the patch opens the quantised model as it opens the quantised original
    assert closed is not None and closed <= 1 / 1000 + 0.02  # without it: at chance
    res = onnxstain.quantize(tmp_path / "l.onnx", tmp_path / "q.onnx", key)
    assert res.closed is not None and res.closed <= 0.05  # still locked without the patch
    assert res.agreement >= 0.75  # with the patch, against the float model (MobileNetV2's own int8 cost ~20 %)
