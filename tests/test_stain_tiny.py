"""Stain and verify end to end on a tiny classifier built in the test (fast)."""

from __future__ import annotations

import base64
import json
import stat

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tinymodels import no_host_model, smooth_images, tiny_classifier, tiny_mlp, write_images

import onnxstain
from onnxstain import Preprocessing, StainOptions, seeds
from onnxstain._onnx.diff import changed_initializers, structural_diff
from onnxstain.cli import main
from onnxstain.keys import load_key, public_record_path
from onnxstain.math import outliers
from onnxstain.runtime import session

PRE = Preprocessing(height=32, width=32, resize=None)
COMBOS = [(m, v) for m in ("inplace", "insert") for v in ("non-additive", "additive")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    onnx.save(tiny_classifier(), d / "model.onnx")
    PRE.save(d / "model.preprocessing.json")
    return d


@pytest.fixture(scope="module")
def images():
    return smooth_images(96, seed=0)


def _stain(workdir, images, mode, variant, seed=0, name=None):
    name = name or f"{mode}-{variant}-{seed}"
    out, key = workdir / f"{name}.onnx", workdir / f"{name}.key"
    res = onnxstain.stain(workdir / "model.onnx", out, key, images=images,
                          options=StainOptions(mode=mode, variant=variant, seed=seed, fpr=0.05))
    return res, out, key


@pytest.fixture(scope="module")
def stained(workdir, images):
    # a different seed per combination: each is stained with its own key
    return {(m, v): _stain(workdir, images, m, v, seed=i) for i, (m, v) in enumerate(COMBOS)}


def _scores(path, x):
    sess = session(str(path))
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("combo", COMBOS)
def test_verify_decides(stained, workdir, images, combo):
    res, out, key = stained[combo]
    good = onnxstain.verify(out, key)
    assert good.stained and good.score >= good.threshold
    assert all(c.passed for c in good.checks if c.available)
    assert not onnxstain.verify(workdir / "model.onnx", key).stained
    # a model stained with another key (another seed) does not carry this stain
    other = stained[COMBOS[(COMBOS.index(combo) + 1) % len(COMBOS)]][1]
    assert not onnxstain.verify(other, key).stained
    assert res.natural_firings == 0
    assert 0 <= good.fpr_bound.value <= 1 and res.bound.value <= 0.05 * (1 + 1e-9)


@pytest.mark.parametrize("variant", ["non-additive", "additive"])
def test_inplace_is_structurally_identical(stained, workdir, variant):
    _, out, _ = stained[("inplace", variant)]
    a, b = onnx.load(workdir / "model.onnx"), onnx.load(out)
    assert structural_diff(a, b) == []
    changed = set(changed_initializers(a, b))
    assert changed and changed <= {"w3", "b3", "wf", "bf"}


def _with_head(model: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the classifier (``wf``, ``bf``) of ``source``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = {t.name: t for t in source.graph.initializer}
    for t in out.graph.initializer:
        if t.name in ("wf", "bf"):
            t.CopyFrom(keep[t.name])
    return out


def test_additive_inplace_compensates_the_leak(stained, workdir):
    """The additive in-place stain takes the regression of the hidden channel's natural leak back through
    the classifier: column k unchanged, the others move by −w_k β (rank one), the bias by −w_k β0, and on
    unseen images the scores move much less than with the classifier left as it was."""
    _, out, key_path = stained[("inplace", "additive")]
    k = int(load_key(key_path)["host"]["host_channel"])
    a, b = onnx.load(workdir / "model.onnx"), onnx.load(out)
    init = lambda m: {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}  # noqa: E731
    ia, ib = init(a), init(b)
    dw, db = ib["wf"] - ia["wf"], ib["bf"] - ia["bf"]  # [classes, 48] (transB=1)
    col = ia["wf"][:, k]
    assert np.array_equal(dw[:, k], np.zeros_like(col))
    beta = -(col @ dw) / (col @ col)  # the row of the rank-one change −w_k β
    assert np.abs(beta).max() > 0
    np.testing.assert_allclose(dw, -np.outer(col, beta), atol=1e-6)
    np.testing.assert_allclose(db, col * (db @ col) / (col @ col), atol=1e-6)  # −w_k β0
    x = PRE.to_input(smooth_images(200, seed=11))  # not the calibration images
    orig = _scores(workdir / "model.onnx", x).astype(np.float64)
    comp = _scores(out, x).astype(np.float64)
    plain = session(_with_head(b, a).SerializeToString())
    plain = plain.run(None, {plain.get_inputs()[0].name: x})[0].astype(np.float64)
    err_comp, err_plain = np.mean((comp - orig) ** 2), np.mean((plain - orig) ** 2)
    assert err_plain > 0 and err_comp < 0.5 * err_plain
    assert np.mean(comp.argmax(1) == orig.argmax(1)) >= np.mean(plain.argmax(1) == orig.argmax(1))


def test_additive_inplace_hides_in_a_channel_no_statistic_exposes(stained, workdir):
    """The hidden channel's classifier column, and its host row and bias after the edit, rank outside the top
    2 % of their layers on every outlier statistic a thief would rank (norm, max |w|, max/median; bias value
    both ways): pruning the classifier's most extreme column or row does not hit the stain."""
    _, out, key_path = stained[("inplace", "additive")]
    k = int(load_key(key_path).host.host_channel)
    b = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in onnx.load(out).graph.initializer}
    limit = outliers.exposed_count(48, 0.02)
    for name, slices in (("wf", b["wf"].T), ("w3", b["w3"].reshape(len(b["w3"]), -1)), ("b3", b["b3"])):
        for statistic, rank in outliers.ranks(slices).items():
            assert rank[k] > limit, (name, statistic, rank[k])


@pytest.mark.parametrize("variant", ["non-additive", "additive"])
def test_insert_is_bit_identical_on_natural_inputs(stained, workdir, images, variant):
    _, out, _ = stained[("insert", variant)]
    x = PRE.to_input(smooth_images(64, seed=7))
    assert np.array_equal(_scores(workdir / "model.onnx", x), _scores(out, x))
    a, b = onnx.load(workdir / "model.onnx"), onnx.load(out)
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    assert len(b.graph.node) > len(a.graph.node)


@pytest.mark.parametrize("combo", COMBOS)
def test_trigger_png_round_trip_shows_signature(stained, workdir, combo):
    _, out, key_path = stained[combo]
    key = load_key(key_path)
    trig = key.trigger_pixels()
    assert trig.dtype == np.uint8 and trig.shape == (32, 32, 3)
    got = _scores(out, PRE.to_input(trig))[0]
    orig = _scores(workdir / "model.onnx", PRE.to_input(trig))[0]
    sig = key["signature"]
    if sig["type"] == "class":
        c = sig["class"]
        assert got[c] - np.delete(got, c).max() >= sig["threshold"]
        assert orig[c] - np.delete(orig, c).max() < sig["threshold"]
    else:
        assert not np.allclose(got, orig)


def test_nothing_secret_in_the_model(stained, workdir):
    for (_, out, _key) in stained.values():
        model = onnx.load(out)
        text = " ".join([model.doc_string, model.producer_name]
                        + [p.key + p.value for p in model.metadata_props]
                        + [n.name + n.doc_string for n in model.graph.node]
                        + [t.name for t in model.graph.initializer]).lower()
        for word in ("stain", "detector", "trigger", "onnxstain", "key", "signature"):
            assert word not in text
        assert model.producer_name == "tiny-test"
        assert [(p.key, p.value) for p in model.metadata_props] == [("author", "tests")]


def test_key_permissions_and_public_record(stained):
    _, _, key_path = stained[("inplace", "non-additive")]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = load_key(key_path)
    record = json.loads(public_record_path(key_path).read_text())
    assert record["commitment"] == key.commitment
    assert record["model_sha256"] == key["model"]["output_sha256"]
    flat = json.dumps(record)
    secrets = (key["nonce"], key["trigger"]["png"][:64], key["detector"]["direction"]["f8"][:64],
               key["detector"]["centre"]["f8"][:64], key["host"]["name"])
    for secret in secrets:
        assert secret not in flat


def test_same_seed_same_key_material(workdir, images):
    a = load_key(_stain(workdir, images, "insert", "non-additive", seed=5, name="r1")[2])
    b = load_key(_stain(workdir, images, "insert", "non-additive", seed=5, name="r2")[2])
    assert np.array_equal(a.detector.direction.array(), b.detector.direction.array())
    assert a["trigger"]["png"] == b["trigger"]["png"]
    assert a.commitment != b.commitment  # fresh nonce every time


def test_a_stain_without_a_seed_draws_one_its_key_can_hold(workdir, images, monkeypatch):
    # the largest seed the draw can give (it was 63 bits, which the key schema refuses: every unseeded stain
    # ended in an internal error after its whole search)
    monkeypatch.setattr(seeds.secrets, "randbelow", lambda n: n - 1)
    out, key = workdir / "unseeded.onnx", workdir / "unseeded.key"
    res = onnxstain.stain(workdir / "model.onnx", out, key, images=images,
                          options=StainOptions(mode="insert", variant="non-additive", fpr=0.05))
    assert load_key(key).seed == seeds.SEED_LIMIT - 1 and res.output == out
    assert onnxstain.verify(out, key).stained


def test_unreachable_target_is_refused(workdir, images):
    with pytest.raises(onnxstain.UnreachableBoundError, match="--fpr"):
        onnxstain.stain(workdir / "model.onnx", workdir / "x.onnx", workdir / "x.key", images=images,
                        options=StainOptions(fpr=1e-300, seed=0, max_draws=2, max_steps=30))
    assert not (workdir / "x.onnx").exists()


# -- the CLI: exit codes and one-line errors ------------------------------------------------------------
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    write_images(d, smooth_images(48, seed=3))
    return d


def test_cli_stain_and_verify(workdir, image_dir, tmp_path):
    runner = CliRunner()
    out, key, rep = tmp_path / "s.onnx", tmp_path / "k.key", tmp_path / "r.json"
    r = runner.invoke(main, ["stain", str(workdir / "model.onnx"), "-o", str(out), "--key", str(key),
                             "--images", str(image_dir), "--fpr", "0.05", "--seed", "1", "--quiet",
                             "--mode", "insert"])
    assert r.exit_code == 0, r.output
    assert "stained" in r.output and "bound" in r.output
    r = runner.invoke(main, ["verify", str(out), "--key", str(key), "--json", str(rep)])
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["stained"] is True and report["version"] == 2
    assert report["basis"] == "black-box and white-box"
    assert all(c["margin"] == c["score"] - c["threshold"] for c in report["checks"])
    for field in ("score", "threshold", "fpr_bound"):
        assert isinstance(report[field], float)
    r = runner.invoke(main, ["verify", str(workdir / "model.onnx"), "--key", str(key)])
    assert r.exit_code == 1, r.output
    assert "NOT STAINED" in r.output


def _assert_clean_failure(result, out_path):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("onnxstain: error:"), result.output
    assert "Traceback" not in result.output
    assert not out_path.exists()


@pytest.mark.parametrize("kind", ["garbage", "truncated", "nohost", "same-path", "missing"])
def test_cli_bad_inputs(kind, workdir, image_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out.onnx"
    src = tmp_path / "in.onnx"
    if kind == "garbage":
        src.write_bytes(b"\x00\x01 definitely not onnx " * 50)
    elif kind == "truncated":
        data = (workdir / "model.onnx").read_bytes()
        src.write_bytes(data[: len(data) // 3])
    elif kind == "nohost":
        onnx.save(no_host_model(), src)
        PRE.save(tmp_path / "in.preprocessing.json")
    elif kind == "same-path":
        src.write_bytes((workdir / "model.onnx").read_bytes())
        out = src
    target = src if kind != "missing" else tmp_path / "nope.onnx"
    before = src.read_bytes() if src.exists() else None
    r = runner.invoke(main, ["stain", str(target), "-o", str(out), "--key", str(tmp_path / "k.key"),
                             "--images", str(image_dir), "--quiet"])
    if kind == "same-path":
        assert r.exit_code == 2 and "never modifies its input" in r.output
        assert src.read_bytes() == before
        return
    _assert_clean_failure(r, out)


def test_cli_key_for_another_model(stained, tmp_path):
    _, _, key = stained[("inplace", "non-additive")]
    other = tmp_path / "big.onnx"
    onnx.save(tiny_classifier(size=64), other)
    r = CliRunner().invoke(main, ["verify", str(other), "--key", str(key)])
    assert r.exit_code == 2 and "key" in r.output.lower(), r.output
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("{}")
    r = CliRunner().invoke(main, ["verify", str(other), "--key", str(bad_key)])
    assert r.exit_code == 2 and "not an onnxstain key" in r.output


def test_inspect_lists_hosts(workdir):
    r = CliRunner().invoke(main, ["inspect", str(workdir / "model.onnx")])
    assert r.exit_code == 0, r.output
    assert "/conv3/Conv" in r.output and "default" in r.output


@pytest.mark.parametrize("layer", [{"trans_b": 1}, {"trans_b": 0}, {"matmul": True}],
                         ids=["gemm-transB1", "gemm-transB0", "matmul-add"])
@pytest.mark.parametrize("combo", COMBOS)
def test_linear_hosts(tmp_path, layer, combo):
    """Gemm (either transB) and MatMul+Add hidden layers host the detector in every mode."""
    mode, variant = combo
    onnx.save(tiny_mlp(**layer), tmp_path / "m.onnx")
    pre = Preprocessing(height=8, width=8, resize=None)
    res = onnxstain.stain(tmp_path / "m.onnx", tmp_path / "s.onnx", tmp_path / "k.key",
                          images=smooth_images(200, size=8), preprocessing=pre,
                          options=StainOptions(mode=mode, variant=variant, seed=1, fpr=0.01))
    assert res.host in ("/fc1/Gemm", "/fc1/MatMul")
    assert onnxstain.verify(tmp_path / "s.onnx", tmp_path / "k.key").stained
    assert not onnxstain.verify(tmp_path / "m.onnx", tmp_path / "k.key").stained
    if mode == "insert":
        assert res.agreement == 1.0 and res.max_abs_delta == 0.0
    else:
        assert structural_diff(onnx.load(tmp_path / "m.onnx"), onnx.load(tmp_path / "s.onnx")) == []


def test_weak_cross_key_bound_is_a_note(stained, tmp_path):
    """A key whose triggers lie far outside the calibration ball has a vacuous cross-key bound: verify still
    decides on the signature, and says the bound proves little (a key with a strong bound says nothing)."""
    reports = {combo: onnxstain.verify(stained[combo][1], stained[combo][2]) for combo in COMBOS}
    for rep in reports.values():  # made with --fpr 0.05: weak above 10 × 0.05, i.e. above 0.5
        assert (rep.fpr_bound.value > 0.5) == any("cross-key bound" in n for n in rep.notes)
    combo = min(reports, key=lambda c: reports[c].fpr_bound.log10)
    _, out, key = stained[combo]
    assert reports[combo].fpr_bound.value < 0.5
    body = json.loads(key.read_text())

    def far(node):  # every trigger radius of the key (the detector's, or each trigger's of a multi-class one)
        if isinstance(node, dict):
            for name, value in node.items():
                if name == "trigger_radii" and isinstance(value, dict):
                    value["f8"] = base64.b64encode(np.full(value["shape"], 1e6).astype("<f8").tobytes()).decode()
                else:
                    far(value)
        elif isinstance(node, list):
            for value in node:
                far(value)

    far(body)
    weak_key = tmp_path / "far.key"
    weak_key.write_text(json.dumps(body))
    weak = onnxstain.verify(out, weak_key)
    assert weak.stained and weak.fpr_bound.value > 0.5
    assert any(n.startswith("the cross-key bound ≤ ") and "is weak" in n for n in weak.notes)
