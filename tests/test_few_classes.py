"""Few classes: the multi-trigger class signature on tiny 2- and 5-class models (fast, seeded).

The two-class model is tf2onnx-style (NHWC input, MatMul+Add head, Softmax output): the pattern of
issue 13's finding 2, where `stain --mode insert` died in `signature_class` (every class in the trigger's
top 5).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tiny_any import nhwc_two_class
from tinymodels import smooth_images, tiny_classifier, write_images

import onnxstain
from onnxstain import Preprocessing, StainOptions, signature
from onnxstain.cli import main
from onnxstain.errors import UnsupportedModelError
from onnxstain.keys import load_key
from onnxstain.math import chance
from onnxstain.runtime import session

FPR = 0.05  # the tests' target (as test_stain_tiny): T = 5 for 2 classes, 2 for 5
PRE = Preprocessing(height=32, width=32, resize=None)


@pytest.fixture(scope="module")
def images():
    return smooth_images(64, seed=0)


@pytest.fixture(scope="module")
def two_class(tmp_path_factory, images):
    """The NHWC two-class model stained in insert mode through the CLI."""
    d = tmp_path_factory.mktemp("two")
    onnx.save(nhwc_two_class(classes=2), d / "model.onnx")
    (d / "images").mkdir()
    write_images(d / "images", images)
    args = ["stain", str(d / "model.onnx"), "-o", str(d / "stained.onnx"), "--key", str(d / "stained.key"),
            "--mode", "insert", "--fpr", str(FPR), "--seed", "3", "--images", str(d / "images"), "--quiet",
            "--layout", "NHWC", "--size", "32x32", "--json", str(d / "stain.json")]
    res = CliRunner().invoke(main, args)
    return d, res


def test_two_class_insert_stains_with_several_triggers(two_class):
    d, res = two_class
    assert res.exit_code == 0, res.output
    assert "black-box chance ≤ 2^-5" in res.output
    key = load_key(d / "stained.key")
    sig = key["signature"]
    assert sig["type"] == "multi-class"
    t = chance.triggers_needed(2, chance.chance_target(FPR))
    assert t is not None and t > 1 and len(sig["triggers"]) == t
    assert all(tr["allowed"] == 2 and tr["class"] in (0, 1) for tr in sig["triggers"])
    assert 10.0 ** sig["chance_log10"] <= FPR
    assert key["model"]["output_activation"] == "softmax"


def test_two_class_verify_cli(two_class):
    d, _ = two_class
    runner = CliRunner()
    good = runner.invoke(main, ["verify", str(d / "stained.onnx"), "--key", str(d / "stained.key"),
                                "--json", str(d / "verify.json")])
    assert good.exit_code == 0, good.output
    assert "black-box chance ≤ 2^-5 = 3.1e-02 (5 triggers, each its class)" in good.output
    report = json.loads((d / "verify.json").read_text())
    assert report["black_box_chance"] <= FPR and report["black_box_chance_log10"] < np.log10(FPR)
    assert report["fpr_bound"] <= 1.0 and report["natural_bound"]["value"] <= FPR * (1 + 1e-9)
    bad = runner.invoke(main, ["verify", str(d / "model.onnx"), "--key", str(d / "stained.key")])
    assert bad.exit_code == 1, bad.output


def _scores(path, x):
    sess = session(str(path))
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def five(tmp_path_factory, images):
    """A 5-class model stained twice in insert mode (non-additive, additive) with different keys."""
    d = tmp_path_factory.mktemp("five")
    onnx.save(tiny_classifier(classes=5, seed=1), d / "model.onnx")
    out = {}
    for seed, variant in ((1, "non-additive"), (2, "additive")):
        res = onnxstain.stain(d / "model.onnx", d / f"{variant}.onnx", d / f"{variant}.key", images=images,
                              preprocessing=PRE, options=StainOptions(mode="insert", variant=variant, seed=seed,
                                                                      fpr=FPR))
        out[variant] = (res, d / f"{variant}.onnx", d / f"{variant}.key")
    return d, out


@pytest.mark.parametrize("variant", ["non-additive", "additive"])
def test_five_class_insert(five, images, variant):
    d, out = five
    res, path, key = out[variant]
    assert res.triggers == chance.triggers_needed(5, FPR) == 2
    assert res.chance_log10 is not None and 10.0 ** res.chance_log10 <= FPR
    assert res.natural_firings == 0 and res.bound.value <= FPR * (1 + 1e-9)
    good = onnxstain.verify(path, key)
    assert good.stained and good.chance_log10 == pytest.approx(-2 * np.log10(5))
    assert all(c.passed for c in good.checks if c.available)
    assert not onnxstain.verify(d / "model.onnx", key).stained
    other = out["additive" if variant == "non-additive" else "non-additive"][1]
    assert not onnxstain.verify(other, key).stained  # stained with another key
    # the inserted branch adds exactly zero on natural images: outputs bit-identical
    x = PRE.to_input(images[:16])
    assert np.array_equal(_scores(d / "model.onnx", x), _scores(path, x))


def test_five_class_branch_has_one_channel_per_trigger(five):
    _, out = five
    res, path, _ = out["non-additive"]
    model = onnx.load(path)
    original = tiny_classifier(classes=5, seed=1)
    assert len(model.graph.node) - len(original.graph.node) == 7  # Conv, Clip, Clip, Pool, Flatten, MatMul, Add
    rows = [i for i in model.graph.initializer if i.name.startswith("onnx::MatMul_w")]
    assert len(rows) == 1 and list(rows[0].dims) == [res.triggers, 5]


def test_two_class_inplace_keeps_one_trigger_and_says_so(tmp_path, images):
    onnx.save(tiny_classifier(classes=2, seed=2), tmp_path / "model.onnx")
    res = onnxstain.stain(tmp_path / "model.onnx", tmp_path / "s.onnx", tmp_path / "s.key", images=images,
                          preprocessing=PRE, options=StainOptions(seed=4, fpr=FPR))
    assert res.triggers == 1
    assert any("black-box chance of the signature is 1/" in n and "--mode insert" in n for n in res.notes)
    assert onnxstain.verify(tmp_path / "s.onnx", tmp_path / "s.key").stained


def test_single_score_head_is_refused_in_one_line(tmp_path, images):
    onnx.save(tiny_classifier(classes=1), tmp_path / "model.onnx")
    with pytest.raises(UnsupportedModelError, match="single value"):
        onnxstain.stain(tmp_path / "model.onnx", tmp_path / "s.onnx", tmp_path / "s.key", images=images,
                        preprocessing=PRE, options=StainOptions(mode="insert", seed=0, fpr=FPR))


@pytest.mark.parametrize("classes", [1, 2, 3, 5, 6, 10])
def test_signature_choice_never_draws_from_an_empty_set(classes):
    """Finding 2: with five classes or fewer every class is in the trigger's top 5; the draw falls back."""
    from onnxstain._stain.edit import signature_choice

    rng = np.random.default_rng(classes)
    nat = rng.normal(size=(40, classes))
    for _ in range(20):
        cls, allowed = signature_choice(StainOptions(), rng, nat, rng.normal(size=classes))
        assert 0 <= cls < classes and 1 <= allowed <= classes
        if classes >= 2:
            assert allowed < classes  # the trigger's own top class is never prescribed in a single-trigger stain


def _with_sigmoid(model: onnx.ModelProto) -> onnx.ModelProto:
    """A multi-label head: the logits through a Sigmoid (several labels may be on at once)."""
    g = model.graph
    g.node[-1].output[0] = "logits_raw"
    g.node.append(onnx.helper.make_node("Sigmoid", ["logits_raw"], ["logits"], name="/Sigmoid"))
    onnx.checker.check_model(model)
    return model


def test_sigmoid_multilabel_head(tmp_path, images):
    """The class signature holds for a sigmoid head too (the bound needs only the uniform, independent draw);
    verify reads the logits back from the probabilities."""
    # the host layers of the 5-class fixture's model (same seed) and its first key's directions (same seed)
    onnx.save(_with_sigmoid(tiny_classifier(classes=6, seed=1)), tmp_path / "model.onnx")
    res = onnxstain.stain(tmp_path / "model.onnx", tmp_path / "s.onnx", tmp_path / "s.key", images=images,
                          preprocessing=PRE, options=StainOptions(mode="insert", seed=1, fpr=FPR))
    assert res.triggers == chance.triggers_needed(6, FPR) == 2
    assert load_key(tmp_path / "s.key")["model"]["output_activation"] == "sigmoid"
    good = onnxstain.verify(tmp_path / "s.onnx", tmp_path / "s.key")
    assert good.stained and 10.0 ** good.chance_log10 <= FPR
    assert not onnxstain.verify(tmp_path / "model.onnx", tmp_path / "s.key").stained


def test_lock_agreement_needs_the_outputs_not_just_top1():
    """Two classes: a scrambled output that keeps the original's top-1 is not 'still the original'."""
    want = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    scrambled = np.array([[0.6, 0.4], [0.55, 0.45], [0.45, 0.55]])  # same top-1, outputs moved by ≥ 0.15
    restored, still = signature.lock_agreement(want, want, scrambled, want)
    assert restored.all() and not still.any()
    restored, still = signature.lock_agreement(want, want, want, want)  # not locked: nothing moves
    assert restored.all() and still.all()
    drift = want + 0.01  # a quantised copy that is not locked: both sides drift alike
    restored, still = signature.lock_agreement(drift, want, drift + 0.005, want)
    assert restored.all() and still.all()


def test_two_class_gate_lock_verifies(tmp_path, images):
    """A Softmax two-class model: the key's references are the probabilities verify reads, and a locked
    model that keeps the top-1 of plain backgrounds by chance is still told from the original."""
    onnx.save(nhwc_two_class(classes=2), tmp_path / "model.onnx")
    (tmp_path / "images").mkdir()
    write_images(tmp_path / "images", images)
    key = tmp_path / "locked.key"
    res = CliRunner().invoke(main, ["lock", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "locked.onnx"),
                                    "--key", str(key), "--kind", "gate", "--seed", "1", "--layout", "NHWC",
                                    "--size", "32x32", "--images", str(tmp_path / "images"), "--quiet"])
    assert res.exit_code == 0, res.output
    refs = load_key(key).references
    assert refs is not None
    assert np.allclose(refs.patched_scores.array().sum(axis=1), 1.0)  # the Softmax output, not its logits
    assert np.allclose(refs.unpatched_scores.array().sum(axis=1), 1.0)
    locked = CliRunner().invoke(main, ["verify", str(tmp_path / "locked.onnx"), "--key", str(key)])
    assert locked.exit_code == 0, locked.output
    original = CliRunner().invoke(main, ["verify", str(tmp_path / "model.onnx"), "--key", str(key)])
    assert original.exit_code == 1, original.output
