"""Stain, lock and verify a tiny SSD-style detector built in the test (fast)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tiny_detector import LABELS, SIZE, TOTAL_ANCHORS, tiny_detector
from tinymodels import smooth_images, write_images

import onnxstain
from onnxstain import LockOptions, Preprocessing, StainOptions
from onnxstain._onnx.graph import GraphView
from onnxstain._onnx.head import find_detection_head, find_head
from onnxstain.cli import main
from onnxstain.errors import UnsupportedModelError
from onnxstain.keys import load_key
from onnxstain.math.boxes import sigmoid
from onnxstain.math.detection_agreement import anchor_detections, anchor_map
from onnxstain.patch import Patch, paste_pixels
from onnxstain.runtime import session

PRE = Preprocessing(height=SIZE, width=SIZE, resize=None)
FPR = 1e-3  # a loose target keeps the tiny model's searches short


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("detector")
    onnx.save(tiny_detector(), d / "model.onnx")
    PRE.save(d / "model.preprocessing.json")
    return d


@pytest.fixture(scope="module")
def images():
    return smooth_images(96, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def heldout():
    return smooth_images(48, size=SIZE, seed=7)


def _logits(path, pixels):
    sess = session(str(path))
    return sess.run(["class_logits"], {"input": PRE.to_input(pixels)})[0]


@pytest.fixture(scope="module", params=["non-additive", "additive"])
def stained(request, workdir, images):
    variant = request.param
    out, key = workdir / f"stained-{variant}.onnx", workdir / f"{variant}.key"
    res = onnxstain.stain(workdir / "model.onnx", out, key, images=images,
                          options=StainOptions(mode="insert", variant=variant, seed=3, fpr=FPR))
    return res, out, key


def test_detection_head_found():
    view = GraphView(tiny_detector())
    assert find_head(view) is None
    head = find_detection_head(view)
    assert head is not None and head.detection
    assert head.layout == (TOTAL_ANCHORS, LABELS) and head.scores == "class_logits"


def test_stain_is_a_prescribed_detection(stained, workdir):
    res, out, key_path = stained
    key = load_key(key_path)
    view = key["model"]["score_view"]
    label, anchor = view["label"], key["signature"]["class"]
    assert 1 <= label < LABELS and 0 <= anchor < TOTAL_ANCHORS  # never the background label
    trig = load_key(key_path).trigger_pixels()[None]
    logits = _logits(out, trig)[0]
    # the trigger makes `label` at `anchor` the most confident detection of that label, by the margin
    assert logits[anchor, label] - np.delete(logits[:, label], anchor).max() >= 0.99 * res.signature_margin
    assert sigmoid(logits[anchor, label]) > 0.99
    before = _logits(workdir / "model.onnx", trig)[0]
    assert sigmoid(before[anchor, label]) < 0.5
    assert np.array_equal(np.delete(logits, anchor, axis=0), np.delete(before, anchor, axis=0))


def test_insert_is_bit_identical_on_natural_images(stained, workdir, heldout):
    _, out, _ = stained
    a, b = _logits(workdir / "model.onnx", heldout), _logits(out, heldout)
    assert np.array_equal(a, b)
    assert anchor_map(a, b) == 1.0


def test_verify_detector_stain(stained, workdir):
    _, out, key = stained
    yes = onnxstain.verify(out, key)
    assert yes.stained and all(c.passed for c in yes.checks)
    assert "at anchor" in yes.checks[0].detail
    no = onnxstain.verify(workdir / "model.onnx", key)
    assert not no.stained


def test_inplace_refused_with_the_way_out(workdir, images, tmp_path):
    with pytest.raises(UnsupportedModelError, match="--mode insert"):
        onnxstain.stain(workdir / "model.onnx", tmp_path / "x.onnx", tmp_path / "x.key", images=images,
                        options=StainOptions(mode="inplace", seed=0, fpr=FPR))
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(UnsupportedModelError, match="--kind gate"):
        onnxstain.lock(workdir / "model.onnx", tmp_path / "y.onnx", tmp_path / "y.key", images=images,
                       options=LockOptions(kind="inplace", seed=0, fpr=FPR))


@pytest.fixture(scope="module")
def locked(workdir, images):
    out, key = workdir / "locked.onnx", workdir / "lock.key"
    res = onnxstain.lock(workdir / "model.onnx", out, key, images=images,
                         options=LockOptions(kind="gate", seed=0, fpr=FPR))
    return res, out, key


def test_gate_lock_scrambles_detections_unless_patched(locked, workdir, heldout):
    res, out, key_path = locked
    assert res.bound.value <= FPR
    assert res.locked_agreement < 0.1  # anchor mAP on calibration images, measured by the lock
    key = load_key(key_path)
    t = key["trigger"]
    patch = Patch(key.trigger_pixels(), int(t["top"]), int(t["left"]))
    orig = _logits(workdir / "model.onnx", heldout)
    assert anchor_map(orig, _logits(out, heldout)) < 0.1
    patched = paste_pixels(heldout, patch)
    assert np.array_equal(_logits(out, patched), _logits(workdir / "model.onnx", patched))  # exact


def test_verify_detector_lock(locked, workdir):
    _, out, key = locked
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(workdir / "model.onnx", key).stained
    r = CliRunner().invoke(main, ["verify", str(out), "--key", str(key)])
    assert r.exit_code == 0 and "LOCKED" in r.output
    assert "false-unlock bound of this lock" in r.output and "bound of this stain" not in r.output


def test_cli_stain_and_verify_detector(workdir, images, tmp_path):
    runner = CliRunner()
    model = str(workdir / "model.onnx")
    (tmp_path / "photos").mkdir()
    write_images(tmp_path / "photos", images[:48])
    r = runner.invoke(main, ["stain", model, "-o", str(tmp_path / "s.onnx"), "--key", str(tmp_path / "k.key"),
                             "--mode", "insert", "--seed", "3", "--fpr", "1e-3",
                             "--images", str(tmp_path / "photos")])
    assert r.exit_code == 0, r.output
    assert "a detection of label" in r.output
    assert runner.invoke(main, ["verify", str(tmp_path / "s.onnx"), "--key", str(tmp_path / "k.key")]).exit_code == 0
    assert runner.invoke(main, ["verify", model, "--key", str(tmp_path / "k.key")]).exit_code == 1
    r = runner.invoke(main, ["stain", model, "-o", str(tmp_path / "t.onnx"), "--key", str(tmp_path / "t.key"),
                             "--seed", "1", "--fpr", "1e-3", "--images", str(tmp_path / "photos")])
    assert r.exit_code == 2 and "--mode insert" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "t.onnx").exists()


def test_anchor_detections_and_map():
    logits = np.full((4, 3), -9.0)
    logits[:, 0] = 5.0  # background, ignored
    logits[2, 1], logits[0, 2] = 3.0, 0.5
    det = anchor_detections(logits)
    assert det.classes.tolist() == [1, 2] and det.boxes[:, 0].tolist() == [2.0, 0.0]
    ref = logits[None]
    assert anchor_map(ref, ref) == 1.0
    moved = ref.copy()
    moved[0, 2, 1], moved[0, 3, 1] = -9.0, 3.0  # the same label, found at another anchor: a miss
    assert anchor_map(ref, moved) == 0.5  # label 1 missed (AP 0), label 2 kept (AP 1)
    assert np.isnan(anchor_map(np.full((1, 4, 3), -9.0), ref))


def test_lock_audit_measures_detections(locked, workdir, heldout):
    from onnxstain._report.lock_audit import audit_lock

    _, out, key = locked
    res = audit_lock(workdir / "model.onnx", out, load_key(key), images=heldout)
    assert res.metric == "anchor mAP" and res.chance == 0.0
    by = {c.name: c for c in res.conditions}
    assert by["patch"].passed and by["patch"].agreement == 1.0 and by["patch"].max_abs_delta == 0.0
    assert by["no patch"].agreement < 0.1 and by["random patch"].agreement < 0.1
    assert by["no patch"].unlocked == 0.0 and by["patch"].unlocked == 1.0


def test_stain_audit_measures_detections(stained, workdir, heldout):
    from onnxstain._report.evaluate import evaluate

    _, out, key = stained
    res = evaluate(workdir / "model.onnx", out, load_key(key), images=heldout)
    assert res.fidelity.metric == "anchor mAP"
    assert res.fidelity.agreement == 1.0 and res.fidelity.max_abs_delta == 0.0
