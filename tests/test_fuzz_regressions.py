"""Regression cases of the defects ``tools/fuzz.py`` found: each one a mutated model or key that once gave a
traceback (exit 3) and now gets one line ``onnxstain: error: …`` and exit 2 (or a clean run).

The keys are the key-format fixtures (tests/fixtures/keys) and a two-trigger key of the tiny MLP, the models
tiny ones from ``tinymodels``; every CLI case runs in-process and checks exit code, the single stderr line,
that nothing reached the process's stderr (onnxruntime's logging) and that no file was left behind.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from tinymodels import smooth_images, tiny_classifier, tiny_cnn, tiny_lockable, tiny_mlp, write_images

import onnxstain
from onnxstain import LockOptions, Preprocessing, StainOptions
from onnxstain.cli import main
from onnxstain.errors import BadKeyError
from onnxstain.keys import Key

FIXTURES = Path(__file__).parent / "fixtures" / "keys"


def _fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.key").read_text())


def _refused(body: Any, phrase: str) -> None:
    with pytest.raises(BadKeyError, match=phrase):
        Key.loaded(body)


def _f8(values: np.ndarray) -> str:
    return base64.b64encode(np.asarray(values, "<f8").tobytes()).decode()


def _png(h: int, w: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# -- keys: refused on load, one line ---------------------------------------------------------------------------
def test_key_integer_beyond_float64_in_a_number_field():
    body = _fixture("stain_insert")
    body["bound"]["log10"] = -(10**400)  # was OverflowError: int too large to convert to float
    _refused(body, r"bound\.log10 is .* too large")


def test_key_deep_nesting_inside_bound_params():
    body = _fixture("lock_inplace")
    nested: list = []
    for _ in range(5000):  # json.loads accepts it; the bound's decoder recursed past the limit
        nested = [nested]
    body["bound"]["params"]["positions"] = nested
    _refused(body, "nested too deeply")


def test_key_array_value_beyond_float32():
    body = _fixture("stain_insert")
    centre = np.frombuffer(base64.b64decode(body["detector"]["centre"]["f8"]), "<f8").copy()
    centre[3] = 1e150  # a flipped exponent bit: evaluate's float32 scores overflowed into its histogram
    body["detector"]["centre"]["f8"] = _f8(centre)
    _refused(body, r"detector\.centre holds a value beyond float32")


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> dict[str, Any]:
    """A key whose class signature has several triggers (the 10-class MLP at --fpr 0.05)."""
    d = tmp_path_factory.mktemp("multi")
    onnx.save(tiny_mlp(), d / "m.onnx")
    Preprocessing(height=8, width=8, resize=None).save(d / "m.preprocessing.json")
    onnxstain.stain(d / "m.onnx", d / "s.onnx", d / "s.key", images=smooth_images(48, size=8, seed=3),
                    options=StainOptions(mode="insert", seed=1, fpr=0.05))
    body = json.loads((d / "s.key").read_text())
    assert body["signature"].get("type") == "multi-class" and len(body["signature"]["triggers"]) >= 2
    return body


@pytest.mark.parametrize("field, value, phrase", [
    ("png", lambda t: _png(4, 8), r"triggers\[1\]\.png is a 4x8 image"),  # was np.stack: shapes differ
    ("class", lambda t: 10, r"triggers\[1\]\.class is 10; the model has 10 scores"),
    ("direction", lambda t: {"shape": [3], "f8": _f8(np.ones(3) / np.sqrt(3))}, r"triggers\[1\]\.direction has 3"),
    ("trigger_radii", lambda t: {"shape": [2], "f8": _f8(np.ones(2))}, r"triggers\[1\]\.trigger_radii has 2"),
    ("trigger_scores", lambda t: {"shape": [5], "f8": _f8(np.ones(5))}, r"triggers\[1\]\.trigger_scores has 5"),
    ("threshold", lambda t: 0, r"triggers\[1\]\.threshold is 0, not positive"),  # was ZeroDivisionError
])
def test_key_multi_trigger_fields_checked_like_the_first(multi, field, value, phrase):
    body = copy.deepcopy(multi)
    trig = body["signature"]["triggers"][1]
    trig[field] = value(trig)
    _refused(body, phrase)


def test_key_multi_trigger_untouched_loads(multi):
    assert Key.loaded(copy.deepcopy(multi)).signature.triggers


# -- models through the command line ---------------------------------------------------------------------------
def _cli(argv: list[str], folder: Path, capfd) -> tuple[int, str]:
    before = sorted(os.listdir(folder))
    capfd.readouterr()
    res = CliRunner().invoke(main, argv, catch_exceptions=False)
    leaked = capfd.readouterr().err
    assert leaked == "", f"stderr outside the one line: {leaked!r}"
    assert sorted(os.listdir(folder)) == before, "files left behind"
    return res.exit_code, res.stderr


def _refused_by(argv: list[str], folder: Path, capfd, phrase: str) -> None:
    code, err = _cli(argv, folder, capfd)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("onnxstain: error: "), err
    assert phrase in lines[0], lines[0]


def _save(model: onnx.ModelProto, folder: Path, name: str, size: int) -> Path:
    p = folder / name
    p.write_bytes(model.SerializeToString())  # no checker: the mutations are invalid on purpose
    Preprocessing(height=size, width=size, resize=None).save(folder / name.replace(".onnx", ".preprocessing.json"))
    return p


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def test_model_non_scalar_clip_bound(tmp_path, capfd):
    m = tiny_cnn()
    _init(m, "six").CopyFrom(numpy_helper.from_array(np.array([6.0, 6.0], np.float32), "six"))
    p = _save(m, tmp_path, "x.onnx", 16)
    _refused_by(["inspect", str(p)], tmp_path, capfd, "its bound 'six' has shape [2], not a scalar")


def test_model_unknown_initializer_element_type(tmp_path, capfd):
    m = tiny_cnn()
    _init(m, "zero").data_type = 99  # was KeyError: 99 in numpy_helper
    p = _save(m, tmp_path, "x.onnx", 16)
    _refused_by(["inspect", str(p)], tmp_path, capfd, "tensor 'zero': element type 99 is unknown")


def test_model_weight_data_that_does_not_fit_its_dims(tmp_path, capfd):
    m = tiny_cnn()
    t = _init(m, "six")
    t.raw_data += bytes(4)  # 2 floats for a scalar: the checker lets it pass, numpy_helper cannot reshape
    p = _save(m, tmp_path, "x.onnx", 16)
    _refused_by(["inspect", str(p)], tmp_path, capfd, "tensor 'six': its data does not fit")


def test_model_unknown_input_element_type(tmp_path, capfd):
    m = tiny_cnn()
    m.graph.input[0].type.tensor_type.elem_type = 2**31 - 1  # was ValueError from DataType.Name
    p = _save(m, tmp_path, "x.onnx", 16)
    _refused_by(["inspect", str(p)], tmp_path, capfd, "element type 2147483647 (unknown)")


def test_model_conv_kernel_attribute_beyond_its_weight(tmp_path, capfd):
    m = tiny_cnn()
    conv = next(n for n in m.graph.node if n.name == "conv2")
    next(a for a in conv.attribute if a.name == "kernel_shape").ints[0] = 2**40  # negative output size
    p = _save(m, tmp_path, "x.onnx", 16)
    code, err = _cli(["inspect", str(p)], tmp_path, capfd)
    assert code == 0, err


@pytest.fixture(scope="module")
def stained(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("stained")
    onnx.save(tiny_mlp(), d / "m.onnx")
    Preprocessing(height=8, width=8, resize=None).save(d / "m.preprocessing.json")
    (d / "imgs").mkdir()
    write_images(d / "imgs", smooth_images(6, size=8, seed=5))
    onnxstain.stain(d / "m.onnx", d / "s.onnx", d / "s.key", images=smooth_images(48, size=8, seed=3),
                    options=StainOptions(mode="insert", seed=1, fpr=0.05, chance=0.2))
    return d


def test_evaluate_scores_near_float32_max(stained, tmp_path, capfd):
    """A bias of 3.4e38 on the head: evaluate's score histogram had no finite bins."""
    m = onnx.load(stained / "s.onnx")
    t = _init(m, "b2")
    raw = bytearray(t.raw_data)
    raw[0:4] = struct.pack("<f", 3.4e38)
    t.raw_data = bytes(raw)
    p = _save(m, tmp_path, "x.onnx", 8)
    code, err = _cli(["evaluate", str(stained / "m.onnx"), str(p), "--key", str(stained / "s.key"), "--images",
                      str(stained / "imgs"), "--views", "1", "--quiet"], tmp_path, capfd)
    assert code == 0, err


def test_evaluate_detector_scores_near_1e38(tmp_path, capfd):
    """One host bias of an in-place stain set to 1e38: every detector score is the same huge number, and the
    histogram's padding of 1 vanished in float64 (range max not above min; fuzz --seed 11 model:2256)."""
    sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "keys"))
    from recipes import run_job

    src, out, key = run_job("stain_inplace", tmp_path)
    (tmp_path / "imgs").mkdir()
    write_images(tmp_path / "imgs", smooth_images(6, size=32, seed=5))
    m = onnx.load(out)
    t = _init(m, "b2")
    bias = numpy_helper.to_array(t).copy()
    bias[18] = 1e38  # one of the four elements that reproduced the crash
    t.CopyFrom(numpy_helper.from_array(bias, "b2"))
    p = _save(m, tmp_path, "x.onnx", 32)
    code, err = _cli(["evaluate", str(src), str(p), "--key", str(key), "--images", str(tmp_path / "imgs"),
                      "--views", "1", "--quiet"], tmp_path, capfd)
    assert code == 0, err


def test_evaluate_refuses_scores_without_one_row_per_image(stained, tmp_path, capfd):
    """The head reads a weight instead of the features: 10 rows of scores whatever the batch (was a ValueError
    in evaluate's reshape; fuzz --seed 8 model:4827)."""
    m = onnx.load(stained / "m.onnx")
    head = next(n for n in m.graph.node if n.op_type == "Gemm" and n.input[1] == "w2")
    head.input[0] = "w2"
    p = _save(m, tmp_path, "x.onnx", 8)
    _refused_by(["evaluate", str(stained / "m.onnx"), str(p), "--key", str(stained / "s.key"), "--images",
                 str(stained / "imgs"), "--views", "1", "--quiet"], tmp_path, capfd, "one row per image")


def test_lock_refuses_infinite_reference_scores(tmp_path, capfd):
    """Head weights of 3.4e38: finite on a grey image, infinite on the lock's reference images (the key's own
    check failed: an internal error)."""
    m = tiny_lockable()
    t = _init(m, "wf")
    arr = numpy_helper.to_array(t).copy()
    arr[:] = 3.4e38
    t.CopyFrom(numpy_helper.from_array(arr, "wf"))
    p = _save(m, tmp_path, "x.onnx", 48)
    (tmp_path / "imgs").mkdir()
    write_images(tmp_path / "imgs", smooth_images(8, size=48, seed=1))
    _refused_by(["lock", "--kind", "gate", str(p), "-o", str(tmp_path / "o.onnx"), "--key", str(tmp_path / "o.key"),
                 "--images",
                 str(tmp_path / "imgs"), "--fpr", "1e-3", "--seed", "1", "--occlusion-steps", "0", "--quiet"],
                tmp_path, capfd, "infinite")


def test_model_run_error_is_one_line_without_onnxruntime_log(stained, tmp_path, capfd):
    """A head bias of the wrong length fails inside onnxruntime's run: its error log reached fd 2 beside
    the one line."""
    m = onnx.load(stained / "s.onnx")
    _init(m, "b2").CopyFrom(numpy_helper.from_array(np.zeros(5, np.float32), "b2"))
    p = _save(m, tmp_path, "x.onnx", 8)
    _refused_by(["verify", str(p), "--key", str(stained / "s.key")], tmp_path, capfd, "onnxruntime")


def test_model_conv_group_zero(tmp_path, capfd):
    m = tiny_cnn()
    conv = next(n for n in m.graph.node if n.name == "conv2")
    conv.attribute.extend([onnx.helper.make_attribute("group", 0)])  # was ZeroDivisionError in HostLayer.m
    p = _save(m, tmp_path, "x.onnx", 16)
    code, err = _cli(["inspect", str(p)], tmp_path, capfd)
    assert code == 0, err


def test_stain_skips_a_host_whose_clip_tops_at_zero(tmp_path, capfd):
    """ReLU6's upper bound replaced by its lower one (Clip(x, 0, 0)): the layer's output is always 0, so it
    hosts no detector (the in-place edit asked for a detector output Δ = 1.25 × 0: ValueError in
    detector.non_additive; fuzz --seed 12 model:624)."""
    m = tiny_classifier()
    _init(m, "six").CopyFrom(numpy_helper.from_array(np.array(0.0, np.float32), "six"))
    p = _save(m, tmp_path, "x.onnx", 32)
    code, err = _cli(["inspect", str(p)], tmp_path, capfd)
    assert code == 0 and "internal error" not in err, err
    (tmp_path / "imgs").mkdir()
    write_images(tmp_path / "imgs", smooth_images(8, size=32, seed=5))
    _refused_by(["stain", str(p), "-o", str(tmp_path / "o.onnx"), "--key", str(tmp_path / "o.key"), "--images",
                 str(tmp_path / "imgs"), "--mode", "inplace", "--seed", "0", "--quiet"], tmp_path, capfd,
                "in place")


def test_stain_refuses_host_inputs_that_overflow(tmp_path, capfd):
    """Eight 0x7f bytes in conv2's weights: finite outputs on a grey image (the Clip), infinite host inputs on
    the calibration images (the bound's radius was inf: a ValueError from the bound)."""
    data = bytearray(tiny_classifier().SerializeToString())
    data[14486:14494] = b"\x7f" * 8
    p = tmp_path / "x.onnx"
    p.write_bytes(bytes(data))
    Preprocessing(height=32, width=32, resize=None).save(tmp_path / "x.preprocessing.json")
    (tmp_path / "imgs").mkdir()
    write_images(tmp_path / "imgs", smooth_images(6, size=32, seed=5))
    _refused_by(["stain", str(p), "-o", str(tmp_path / "o.onnx"), "--key", str(tmp_path / "o.key"), "--images",
                 str(tmp_path / "imgs"), "--fpr", "0.05", "--chance", "0.2", "--seed", "1", "--mode", "insert",
                 "--quiet"], tmp_path, capfd, "inputs are not finite on the calibration images")


def test_dense_stain_refuses_a_host_whose_inputs_never_vary(tmp_path, capfd):
    """Two bytes of the tiny ViT's weights set to 0xe8 (-4.7e24 floats): the host's inputs saturate to the same
    values on every calibration image, radius 0 (was ZeroDivisionError in the dense stain)."""
    from tiny_vit import tiny_vit

    data = bytearray(tiny_vit(dim=64).SerializeToString())
    data[296985:296987] = b"\xe8" * 2
    p = tmp_path / "x.onnx"
    p.write_bytes(bytes(data))
    Preprocessing(height=32, width=32, resize=None).save(tmp_path / "x.preprocessing.json")
    (tmp_path / "imgs").mkdir()
    write_images(tmp_path / "imgs", smooth_images(6, size=32, seed=5))
    _refused_by(["stain", str(p), "-o", str(tmp_path / "o.onnx"), "--key", str(tmp_path / "o.key"), "--images",
                 str(tmp_path / "imgs"), "--fpr", "0.05", "--chance", "0.2", "--seed", "1", "--mode", "insert",
                 "--quiet"], tmp_path, capfd, "are the same on every calibration image (radius 0)")


def test_model_conv_pads_of_the_wrong_length(tmp_path, capfd):
    m = tiny_cnn()
    conv = next(n for n in m.graph.node if n.name == "conv1")
    next(a for a in conv.attribute if a.name == "pads").ints[:] = [1, 1]  # was IndexError in the host scan
    p = _save(m, tmp_path, "x.onnx", 16)
    code, err = _cli(["inspect", str(p)], tmp_path, capfd)
    assert code in (0, 2), err


def test_model_conv_strides_of_the_wrong_length(tmp_path, capfd):
    m = tiny_cnn()
    conv = next(n for n in m.graph.node if n.name == "conv1")
    strides = next((a for a in conv.attribute if a.name == "strides"), None)
    if strides is None:
        conv.attribute.extend([onnx.helper.make_attribute("strides", [2])])
    else:
        strides.ints[:] = [2]  # was IndexError in the receptive fields (fuzz --seed 7 model:9691)
    p = _save(m, tmp_path, "x.onnx", 16)
    code, err = _cli(["inspect", str(p)], tmp_path, capfd)
    assert code in (0, 2), err


def test_key_pattern_signature_needs_a_three_axis_map():
    body = _fixture("dense_stain")
    body["model"]["dense_shape"] = body["model"]["dense_shape"][1:]  # was ValueError unpacking in dense_pattern
    _refused(body, r"model\.dense_shape has 2 values")



def _key_variant(src: Path, folder: Path, edit) -> Path:
    body = json.loads(src.read_text())
    edit(body)
    p = folder / "edited.key"
    p.write_text(json.dumps(body))
    return p


def test_evaluate_refuses_a_layout_that_does_not_fit_the_scores(stained, tmp_path, capfd):
    """A key whose model.layout names 3 × 7 anchor scores for a 10-score model: was a ValueError in the
    detection agreement's reshape (fuzz --seed 8 key:8427)."""
    key = _key_variant(stained / "s.key", tmp_path, lambda b: b["model"].__setitem__("layout", [3, 7]))
    _refused_by(["evaluate", str(stained / "m.onnx"), str(stained / "s.onnx"), "--key", str(key), "--images",
                 str(stained / "imgs"), "--views", "1", "--quiet"], tmp_path, capfd, "model.layout")


@pytest.fixture(scope="module")
def locked(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("locked")
    onnx.save(tiny_lockable(), d / "m.onnx")
    Preprocessing(height=48, width=48, resize=None).save(d / "m.preprocessing.json")
    (d / "imgs").mkdir()
    write_images(d / "imgs", smooth_images(6, size=48, seed=3))
    onnxstain.lock(d / "m.onnx", d / "l.onnx", d / "l.key", images=smooth_images(64, size=48, seed=1),
                   options=LockOptions(kind="gate", seed=2, fpr=1e-3, occlusion_steps=0))
    return d


def _audit(locked: Path, model: Path, key: Path) -> list[str]:
    return ["evaluate", str(locked / "m.onnx"), str(model), "--key", str(key), "--images", str(locked / "imgs"),
            "--views", "1", "--quiet"]


def test_lock_audit_refuses_a_white_box_channel_beyond_the_tensor(locked, tmp_path, capfd):
    """A lock key whose white_box.channel is past the tapped tensor's channels: was an IndexError
    (fuzz --seed 8 key:6222)."""
    key = _key_variant(locked / "l.key", tmp_path, lambda b: b["white_box"].__setitem__("channel", 4096))
    _refused_by(_audit(locked, locked / "l.onnx", key), tmp_path, capfd, "white_box.channel 4096")


def test_lock_audit_refuses_scores_without_one_row_per_image(locked, tmp_path, capfd):
    """An original whose ReLU reads a weight instead of its conv: 32 rows of scores whatever the batch (was a
    ValueError in the lock audit's reshape; fuzz --seed 9 model:6546)."""
    m = onnx.load(locked / "m.onnx")
    next(n for n in m.graph.node if n.name == "/conv3/Relu").input[0] = "conv4.w"
    p = _save(m, tmp_path, "x.onnx", 48)
    argv = _audit(locked, locked / "l.onnx", locked / "l.key")
    argv[1] = str(p)
    _refused_by(argv, tmp_path, capfd, "one row per image")


def test_lock_audit_refuses_a_locked_model_with_other_scores(locked, tmp_path, capfd):
    """A locked model with 5 classes audited against a 10-class original: was a ValueError comparing them
    (fuzz --seed 9 model:2919, where a stride change halved a detector's anchors)."""
    m = onnx.load(locked / "l.onnx")
    for name, shape in (("wf", (5, 32)), ("bf", (5,))):
        _init(m, name).CopyFrom(numpy_helper.from_array(np.zeros(shape, np.float32), name))
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5
    p = _save(m, tmp_path, "x.onnx", 48)
    _refused_by(_audit(locked, p, locked / "l.key"), tmp_path, capfd, "gives 5 scores per image")


def test_key_negative_trigger_radius():
    body = _fixture("stain_insert")
    radii = np.frombuffer(base64.b64decode(body["detector"]["trigger_radii"]["f8"]), "<f8").copy()
    radii[0] = -radii[0]  # a flipped sign bit: the cross-key bound raised ValueError (fuzz --seed 10 key:5401)
    body["detector"]["trigger_radii"]["f8"] = _f8(radii)
    _refused(body, r"detector\.trigger_radii holds a negative value")


def test_lock_verify_refuses_scores_without_one_row_per_image(locked, tmp_path, capfd):
    """An original whose head flattens a weight instead of the pooled features: was a ValueError in the lock's
    verify (fuzz --seed 10 model:3763)."""
    m = onnx.load(locked / "m.onnx")
    next(n for n in m.graph.node if n.name == "/Flatten").input[0] = "wf"
    p = _save(m, tmp_path, "x.onnx", 48)
    _refused_by(["verify", str(p), "--key", str(locked / "l.key")], tmp_path, capfd, "one row per image")
