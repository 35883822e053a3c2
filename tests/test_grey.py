"""Greyscale (one-channel) models: the preprocessing, what the graph says, and stain / lock / verify end to end
on tiny grey models built in the test and on a real one (EasyOCR's text recogniser, a CRNN with a CTC
sequence head; slow)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from corpus_models import corpus_model
from tinymodels import smooth_images, tiny_classifier, tiny_lockable

import onnxstain
from onnxstain import LockOptions, Preprocessing, StainOptions
from onnxstain._onnx.inputs import infer_preprocessing
from onnxstain.errors import BadInputError
from onnxstain.keys import load_key
from onnxstain.patch import paste_pixels
from onnxstain.runtime import session

GREY = Preprocessing(height=32, width=32, channel_order="GRAY", mean=(0.5,) * 3, std=(0.25,) * 3, resize=None)


def _photo(n: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# -- preprocessing -----------------------------------------------------------------------------------
def test_grey_input_is_the_luma_pil_computes():
    from PIL import Image

    px = _photo(1)[0]
    got = GREY.to_input(px)
    assert got.shape == (1, 1, 32, 32) == GREY.input_shape()
    pil = np.asarray(Image.fromarray(px).convert("L"), np.float32)  # integer-rounded luma
    expected = (pil / 255 - 0.5) / 0.25
    assert np.abs(got[0, 0] - expected).max() <= 0.5 / 255 / 0.25 + 1e-6


def test_grey_pixels_keep_their_value_exactly():
    v = np.arange(256, dtype=np.uint8)
    px = np.repeat(np.tile(v, (1, 1))[..., None], 3, axis=-1).reshape(1, 16, 16, 3)
    pre = Preprocessing(height=16, width=16, channel_order="GRAY", mean=(0.5,) * 3, std=(0.5,) * 3, resize=None)
    rgb = Preprocessing(height=16, width=16, mean=(0.5,) * 3, std=(0.5,) * 3, resize=None)
    np.testing.assert_array_equal(pre.to_input(px)[:, 0], rgb.to_input(px)[:, 0])  # bit for bit
    nhwc = Preprocessing(height=16, width=16, channel_order="GRAY", layout="NHWC", dtype="uint8", scale=1.0,
                         mean=(0.0,) * 3, std=(1.0,) * 3, resize=None)
    out = nhwc.to_input(px)
    assert out.shape == (1, 16, 16, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], px[..., 0])


def test_canonical_pixels_are_grey_and_keep_the_input():
    px = _photo(2)
    grey = GREY.canonical_pixels(px)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert np.abs(GREY.to_input(grey) - GREY.to_input(px)).max() <= 0.5 / 255 / 0.25 + 1e-6
    rgb = Preprocessing(height=32, width=32)
    assert rgb.canonical_pixels(px) is px


def test_torch_preprocessing_matches_numpy():
    torch = pytest.importorskip("torch")
    from onnxstain.scoring import _model_input

    px = _photo(3).astype(np.float32)
    for pre in (GREY, Preprocessing(height=32, width=32, channel_order="BGR")):
        got = _model_input(pre)(torch.tensor(px)).numpy()
        np.testing.assert_allclose(got, pre.to_input(px), rtol=1e-5, atol=1e-5)


def test_grey_json_round_trip_and_refusals():
    assert Preprocessing.from_dict(GREY.to_dict()) == GREY
    grey = Preprocessing.from_dict({"channel_order": "GRAY", "mean": 0.5})
    assert (grey.mean, grey.std) == ((0.5,) * 3, (1.0,) * 3)  # not the ImageNet (colour) std
    with pytest.raises(BadInputError, match="mean has three different values: a GRAY input has one channel"):
        Preprocessing.from_dict({"channel_order": "GRAY", "mean": [0.1, 0.2, 0.3]})


# -- what the graph says -------------------------------------------------------------------------------
def _grey_model(height, width):
    m = tiny_classifier(channels=1)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims[2:], (height, width), strict=True):
        d.Clear()
        if isinstance(v, int):
            d.dim_value = v
        else:
            d.dim_param = v
    return m


def test_a_one_channel_input_is_read_as_grey():
    pre, notes = infer_preprocessing(_grey_model(32, 32))
    assert pre.channel_order == "GRAY" and pre.input_shape() == (1, 1, 32, 32)
    assert (pre.scale, pre.mean[0], pre.std[0]) == (1 / 255, 0.0, 1.0)
    assert any("grey 0..1 input" in n for n in notes)


def test_inspect_says_grey(tmp_path):
    onnx.save(_grey_model(32, "width"), tmp_path / "m.onnx")
    report = onnxstain.inspect_model(tmp_path / "m.onnx")
    assert report["input"] == "NCHW 32x? (dynamic; analysed at 32x32) float32 grey (1 channel: the pixels' luma)"
    colour = tmp_path / "c.onnx"
    onnx.save(tiny_classifier(), colour)
    assert "grey" not in onnxstain.inspect_model(colour)["input"]


def test_one_fixed_side_is_kept():
    pre, notes = infer_preprocessing(_grey_model(32, "width"))
    assert (pre.height, pre.width) == (32, 32)
    assert any("a fixed height only; assumed 32x32" in n for n in notes)
    with pytest.raises(BadInputError, match=r"fixed at 32x\?; the preprocessing asks for 24x64"):
        infer_preprocessing(_grey_model(32, "width"), None, None, height=24, width=64)
    pre, _ = infer_preprocessing(_grey_model(32, "width"), None, None, height=32, width=64)
    assert (pre.height, pre.width) == (32, 64)


def test_a_colour_preprocessing_for_a_grey_model_is_refused():
    with pytest.raises(BadInputError, match=r"1 channel\(s\); the preprocessing says RGB .*--channel-order GRAY"):
        infer_preprocessing(_grey_model(32, 32), None, Preprocessing(height=32, width=32))


def test_an_input_with_four_channels_is_refused_in_one_line():
    from onnxstain._onnx.inputs import image_input
    from onnxstain.errors import UnsupportedModelError

    m = tiny_classifier()
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4
    with pytest.raises(UnsupportedModelError, match=r"neither axis 1 nor axis 3 holds 3 .* or 1"):
        image_input(m)


# -- end to end ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grey_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("grey")
    onnx.save(tiny_classifier(channels=1), d / "model.onnx")
    GREY.save(d / "model.preprocessing.json")
    onnx.save(tiny_lockable(channels=1), d / "lockable.onnx")
    Preprocessing(height=48, width=48, channel_order="GRAY", mean=(0.5,) * 3, std=(0.25,) * 3,
                  resize=None).save(d / "lockable.preprocessing.json")
    return d


def _is_grey(px: np.ndarray) -> bool:
    return bool((px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all())


@pytest.fixture(scope="module")
def grey_stain(grey_dir):
    out, key = grey_dir / "stained.onnx", grey_dir / "stained.key"
    onnxstain.stain(grey_dir / "model.onnx", out, key, images=smooth_images(96, seed=0),
                    options=StainOptions(seed=3, fpr=0.05))
    return out, key


def test_stain_a_grey_model(grey_dir, grey_stain):
    out, key = grey_stain
    k = load_key(key)
    assert k.preprocessing.channel_order == "GRAY" and _is_grey(k.trigger.pixels())
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(grey_dir / "model.onnx", key).stained
    k.save(grey_dir / "again.key")  # the key format carries GRAY both ways
    again = load_key(grey_dir / "again.key")
    assert again == k and again.commitment == k.commitment


def test_a_grey_key_with_three_means_is_refused(grey_dir, grey_stain):
    import json

    from onnxstain.errors import BadKeyError

    body = json.loads(grey_stain[1].read_text())
    body["preprocessing"]["mean"] = [0.1, 0.2, 0.3]
    (grey_dir / "bad.key").write_text(json.dumps(body))
    with pytest.raises(BadKeyError, match=r"preprocessing\.mean has three different values"):
        load_key(grey_dir / "bad.key")


def test_gate_lock_a_grey_model(grey_dir):
    out, key = grey_dir / "locked.onnx", grey_dir / "locked.key"
    images = smooth_images(256, size=48, seed=1)
    res = onnxstain.lock(grey_dir / "lockable.onnx", out, key, images=images,
                         options=LockOptions(kind="gate", seed=2, fpr=1e-3, occlusion_steps=5))
    k = load_key(key)
    patch = k.trigger.pixels()
    assert _is_grey(patch) and res.host == "pixels"
    assert onnxstain.verify(out, key).stained
    pre = k.preprocessing
    from onnxstain.patch import Patch

    patched = paste_pixels(images[:32], Patch(patch, k.trigger.top, k.trigger.left))
    orig, locked = session(str(grey_dir / "lockable.onnx")), session(str(out))
    name = orig.get_inputs()[0].name
    x = pre.to_input(patched)
    np.testing.assert_array_equal(locked.run(None, {name: x})[0].argmax(1), orig.run(None, {name: x})[0].argmax(1))
    clean = pre.to_input(images[:32])
    assert (locked.run(None, {name: clean})[0].argmax(1) == orig.run(None, {name: clean})[0].argmax(1)).mean() < 0.5


# -- a real grey model: EasyOCR's recogniser -------------------------------------------------------------
@pytest.fixture(scope="module")
def easyocr(tmp_path_factory):
    return corpus_model("easyocr_rec"), tmp_path_factory.mktemp("easyocr")


@pytest.mark.slow
def test_easyocr_stain_insert_on_its_sequence_head(easyocr):
    """Two triggers (97 classes per step), each row added at every step of the [N, T, K] scores: the branch
    once added [N, K] rows, which broadcast against the batch axis and failed on every batch but 1."""
    model, d = easyocr
    out, key = d / "stained.onnx", d / "stained.key"
    res = onnxstain.stain(model, out, key, options=StainOptions(mode="insert", seed=5))
    assert res.agreement == 1.0 and res.max_abs_delta == 0.0
    k = load_key(key)
    assert k.preprocessing.channel_order == "GRAY" and _is_grey(k.trigger.pixels())
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(model, key).stained


@pytest.mark.slow
def test_easyocr_gate_lock(easyocr):
    """The gate's pixel window reads one channel (a 7x7 grey patch); the occlusion-aware refinement runs through
    the model's bidirectional LSTMs (it was skipped, with a note, before they had a torch translation)."""
    model, d = easyocr
    out, key = d / "locked.onnx", d / "locked.key"
    res = onnxstain.lock(model, out, key, options=LockOptions(kind="gate", seed=4))
    assert res.host == "pixels" and not any("refinement skipped" in n for n in res.notes)
    assert res.occlusion is not None and res.occlusion["steps"] > 0
    assert _is_grey(load_key(key).trigger.pixels())
    assert onnxstain.verify(out, key).stained
    assert res.locked_agreement <= res.chance + 0.02


def _time_major_recogniser() -> onnx.ModelProto:
    """A grey CTC recogniser exported time-major (ddddocr's): columns → [T, N, D] → Gemm on [T·N, D] → [T, N, K]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], kernel_shape=[8, 1]),  # [1, 8, 1, 32]
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Squeeze", ["r", "axis2"], ["s"]),  # [1, 8, 32]
        helper.make_node("Transpose", ["s"], ["t"], perm=[2, 0, 1]),  # [32, 1, 8]
        helper.make_node("Reshape", ["t", "flat"], ["f"]),  # [32, 8]
        helper.make_node("Gemm", ["f", "wg", "bg"], ["g"], transB=1),  # [32, 5]
        helper.make_node("Reshape", ["g", "steps"], ["logits"]),  # [32, 1, 5]
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w", rng.normal(0, 0.3, (8, 1, 8, 1)).astype(np.float32)), ("axis2", np.array([2], np.int64)),
        ("flat", np.array([-1, 8], np.int64)), ("wg", rng.normal(0, 0.3, (5, 8)).astype(np.float32)),
        ("bg", np.zeros(5, np.float32)), ("steps", np.array([32, 1, 5], np.int64))]]
    graph = helper.make_graph(nodes, "time_major", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                  [1, 1, 8, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["steps", "batch", 5])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_time_major_sequence_output_is_named_as_such(tmp_path):
    """It was called a YOLO-style packed box output."""
    from onnxstain.errors import UnsupportedModelError

    onnx.save(_time_major_recogniser(), tmp_path / "ocr.onnx")
    with pytest.raises(UnsupportedModelError, match=r"laid out time-major \(\[T, N, K\].*export them as \[N, T, K\]"):
        onnxstain.stain(tmp_path / "ocr.onnx", tmp_path / "x.onnx", tmp_path / "x.key",
                        images=smooth_images(8, size=32, seed=0), options=StainOptions(mode="insert"))
