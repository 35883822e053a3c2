"""A Conv whose bias sits in the Add after it (no bias input; ``+ b`` with ``b`` ``[C, 1, 1]``), as CNTK exported
the ONNX model zoo's MNIST and FER+ models: the layer is a host, its bias read and written in that Add."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from tinymodels import smooth_images, tiny_bias_add_cnn

import onnxstain
from onnxstain import LockOptions, Preprocessing, StainOptions
from onnxstain._onnx.diff import changed_initializers, structural_diff
from onnxstain._onnx.graph import GraphView
from onnxstain._onnx.hosts import find_hosts, layer_affine

PRE = Preprocessing(height=28, width=28, channel_order="GRAY", mean=(0.5,) * 3, std=(0.25,) * 3, resize=None)


def test_the_conv_and_its_bias_add_are_one_host():
    model = tiny_bias_add_cnn()
    hosts = {h.name: h for h in find_hosts(model)}
    h = hosts["Convolution1"]
    assert h.usable and h.activation == "relu", h.reason
    assert (h.bias, h.bias_add, h.output, h.act_output) == ("b1", "Plus1", "p1", "r1")
    _, b = layer_affine(GraphView(model), h)
    np.testing.assert_array_equal(b, onnx.numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == "b1")).reshape(-1))


def test_an_add_that_is_not_a_channel_bias_is_left_alone():
    model = tiny_bias_add_cnn()
    b = next(i for i in model.graph.initializer if i.name == "b1")
    b.CopyFrom(onnx.numpy_helper.from_array(np.zeros((1, 1, 14), np.float32), "b1"))  # per column, not channel
    h = {h.name: h for h in find_hosts(model)}["Convolution1"]
    assert h.bias is None and h.bias_add is None and not h.usable


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("biasadd")
    onnx.save(tiny_bias_add_cnn(), d / "model.onnx")
    PRE.save(d / "model.preprocessing.json")
    return d


def test_write_neuron_edits_the_bias_in_the_add():
    from onnxstain._onnx.hosts import write_neuron

    model, edited = tiny_bias_add_cnn(), tiny_bias_add_cnn()
    h = {h.name: h for h in find_hosts(model)}["Convolution1"]
    row = np.arange(200, dtype=np.float64) / 200
    write_neuron(GraphView(edited), h, 3, row, 0.75)
    rows, b = layer_affine(GraphView(edited), h)
    _, before = layer_affine(GraphView(model), h)
    np.testing.assert_allclose(rows[3], row, rtol=1e-6)
    assert b[3] == np.float32(0.75) and np.array_equal(np.delete(b, 3), np.delete(before, 3))
    assert structural_diff(model, edited) == []
    assert set(changed_initializers(model, edited)) == {"w1", "b1"}


def test_insert_stain(workdir):
    """The head reads the flattened map (no global pooling): no in-place route, the stain is inserted."""
    out, key = workdir / "stained.onnx", workdir / "stained.key"
    res = onnxstain.stain(workdir / "model.onnx", out, key, images=smooth_images(96, size=28, seed=0),
                          options=StainOptions(mode="insert", seed=2, fpr=0.05))
    assert res.host == "Convolution1" and res.agreement == 1.0 and res.max_abs_delta == 0.0
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(workdir / "model.onnx", key).stained


def test_gate_lock(workdir):
    """The graph fixes the batch at 1 (its Reshape to [1, 784]): the occlusion-aware refinement feeds the
    torch translation one image at a time (a batch of 8 failed in torch with a shape error)."""
    images = smooth_images(128, size=28, seed=1)
    res = onnxstain.lock(workdir / "model.onnx", workdir / "locked.onnx", workdir / "locked.key", images=images,
                         options=LockOptions(kind="gate", seed=3, fpr=1e-3, occlusion_steps=5))
    assert res.host == "pixels" and res.occlusion is not None
    assert onnxstain.verify(workdir / "locked.onnx", workdir / "locked.key").stained
    assert not onnxstain.verify(workdir / "model.onnx", workdir / "locked.key").stained
