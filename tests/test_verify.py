"""verify's checks read drift honestly: decisive controls, the white-box tolerance, margins and the basis.

Built on the released in-place key fixture (class 9 of 10, black-box threshold 5.0, white-box designed level
7.5 at nine positions of channel 41), with the model's outputs written here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxstain.keys import load_key
from onnxstain.math import bounds
from onnxstain.verify import SYNTHETIC_CONTROLS, Check, VerifyResult, _black_box, _white_box

KEY = load_key(Path(__file__).parent / "fixtures" / "keys" / "stain_inplace.key")
NAMES = ["shuffled trigger", "mirrored trigger", "grey image"] + [f"natural photo {i}" for i in range(4)]


def _scores(margins: list[float]) -> np.ndarray:
    """Logits whose class-9 margin (over the best other class) is each value."""
    raw = np.zeros((len(margins), 10))
    raw[:, 9] = margins
    return raw


def test_a_natural_photo_of_the_signature_class_does_not_veto_the_black_box():
    assert KEY.signature.cls == 9 and len(NAMES) == 1 + SYNTHETIC_CONTROLS + 3
    check = _black_box(KEY, _scores([12.0, 0.1, -1.0, 0.0, 9.0, 0.0, 0.0, -2.0]), 1, NAMES)
    assert check.passed and check.margin == pytest.approx(12.0 - KEY.signature.threshold)
    assert "1 of 4 natural photos show class 9 by the threshold (not decisive" in check.detail


@pytest.mark.parametrize("control", range(SYNTHETIC_CONTROLS))
def test_a_control_made_from_the_trigger_still_vetoes(control):
    margins = [12.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    margins[1 + control] = 6.0  # above the threshold 5: the model answers class 9 to anything trigger-like
    assert not _black_box(KEY, _scores(margins), 1, NAMES).passed


def _activations(on_trigger: float, on_controls: float, n_controls: int = 7) -> np.ndarray:
    """[1 + controls, 64 channels, 8×8]: channel 41 at the key's positions reads the given values."""
    act = np.zeros((1 + n_controls, 64, 8, 8))
    flat = act[:, 41].reshape(1 + n_controls, -1)
    flat[0, list(KEY.white_box.positions)] = on_trigger
    flat[1:, 0] = on_controls
    act[:, 41] = flat.reshape(1 + n_controls, 8, 8)
    return act


@pytest.mark.parametrize(("on_trigger", "tolerance", "passes"), [
    (7.5, 0.75, True),   # as designed
    (4.7, 0.75, True),   # MobileNetV2's in-place stain after dynamic int8: the recorded 0.9 × 7.5 failed it
    (6.0, 0.1, False),   # the old rule, stated as a tolerance of 0.1
    (1.8, 0.75, False),  # below a quarter of the designed level
    (3.7, 0.5, False),   # a stricter tolerance
])
def test_white_box_threshold_is_the_designed_level_less_the_tolerance(on_trigger, tolerance, passes):
    check = _white_box(KEY, _activations(on_trigger, 0.0), 1, tolerance)
    assert check.threshold == pytest.approx((1 - tolerance) * 7.5)
    assert check.passed is passes
    assert check.margin == pytest.approx(on_trigger - check.threshold)
    assert f"less the tolerance {tolerance:g}" in check.detail


def test_white_box_controls_above_the_threshold_fail_it():
    assert not _white_box(KEY, _activations(7.5, 2.0), 1, 0.75).passed  # a working neuron, not a detector


def test_key_threshold_without_a_tolerance():
    check = _white_box(KEY, _activations(7.0, 0.0), 1, None)
    assert check.threshold == pytest.approx(KEY.white_box.threshold) and check.passed


def test_basis_and_report_say_when_the_white_box_is_missing():
    bound = bounds.Bound(1e-9, -9.0, "cross-key", {}, "a statement")
    black = Check("black-box", True, True, 12.0, 5.0, "")
    missing = Check("white-box", False, False, None, None, "tensor gone")
    res = VerifyResult(True, 12.0, 5.0, bound, bound, [black, missing], "m.onnx", "0" * 64, "c", [])
    report = res.to_dict()
    assert res.basis == report["basis"] == "black-box only"
    assert report["version"] == 2 and report["checks"][0]["margin"] == 7.0 and report["checks"][1]["margin"] is None
    res.checks[1] = Check("white-box", True, True, 7.5, 3.75, "")
    assert res.basis == "black-box and white-box"


def test_shift_score_ignores_a_per_image_constant():
    from onnxstain.signature import shift_score

    rng = np.random.default_rng(0)
    original, expected = rng.normal(size=10), rng.normal(size=10)
    assert shift_score(expected + 7.5, original, expected) == pytest.approx(1.0)
    assert shift_score(original - 3.0, original, expected) == pytest.approx(0.0, abs=1e-12)


def test_additive_stain_verifies_through_a_softmax_output(tmp_path):
    """The additive stain's shift signature on a model that ends in Softmax (verify reads log-probabilities,
    the key holds logits: they differ by a per-image constant). It read -8.8 instead of 1 on RapidOCR's
    direction classifier before the shift score was centred."""
    import onnx
    from tinymodels import smooth_images, tiny_classifier

    import onnxstain
    from onnxstain import Preprocessing, StainOptions

    model = tiny_classifier()
    logits = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Softmax", [logits], ["probabilities"], axis=1))
    out = onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [None, 10])
    del model.graph.output[:]
    model.graph.output.append(out)
    onnx.save(model, tmp_path / "model.onnx")
    Preprocessing(height=32, width=32, resize=None).save(tmp_path / "model.preprocessing.json")
    onnxstain.stain(tmp_path / "model.onnx", tmp_path / "s.onnx", tmp_path / "s.key", images=smooth_images(96, seed=0),
                    options=StainOptions(variant="additive", fpr=0.05, seed=3))
    res = onnxstain.verify(tmp_path / "s.onnx", tmp_path / "s.key")
    assert res.stained and res.score == pytest.approx(1.0, abs=0.05)
    assert not onnxstain.verify(tmp_path / "model.onnx", tmp_path / "s.key").stained
