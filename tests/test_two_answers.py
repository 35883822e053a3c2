"""Heads with two answers — two classes, or one logit read as its sign: top-1, chance and the lock judged by
Cohen's kappa, since a model that answers the opposite of the original is the original relabelled."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from corpus_models import corpus_model
from tinymodels import smooth_images, tiny_lockable

import onnxstain
from onnxstain import LockOptions, Preprocessing, StainOptions
from onnxstain._onnx.graph import GraphView
from onnxstain._onnx.head import decision_threshold
from onnxstain._onnx.inputs import image_input
from onnxstain._report.matching import OutputMatch
from onnxstain.cli import main
from onnxstain.errors import UnsupportedModelError
from onnxstain.keys import load_key
from onnxstain.math.agreement import chance_agreement, cohen_kappa, top1, top1_agreement
from onnxstain.runtime import session

SIZE = 48


def _with_sigmoid(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its one logit squashed into a probability (a Keras ``Dense(1, activation="sigmoid")``)."""
    logits = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Sigmoid", [logits], ["prob"], name="/Sigmoid"))
    model.graph.output[0].name = "prob"
    onnx.checker.check_model(model)
    return model


def test_a_sigmoid_output_decides_at_one_half():
    plain = tiny_lockable(seed=1, classes=1)
    assert decision_threshold(GraphView(plain), "logits") == 0.0
    squashed = _with_sigmoid(tiny_lockable(seed=1, classes=1))
    assert decision_threshold(GraphView(squashed), "prob") == 0.5
    probs = np.array([[0.9], [0.2], [0.5]])
    assert top1(probs, 1, 0.5).ravel().tolist() == [1, 0, 0]


def test_a_one_logit_head_answers_with_its_sign():
    logits = np.array([[2.0], [-0.5], [0.0], [1e-6]])
    assert top1(logits).ravel().tolist() == [1, 0, 0, 1]
    assert top1_agreement(logits, -logits).tolist() == [0.0, 0.0, 1.0, 0.0]  # 0 is negative either way
    assert chance_agreement(1) == chance_agreement(2) == 0.5 and chance_agreement(10) == 0.1


def test_cohen_kappa():
    a = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    assert cohen_kappa(a, a) == 1.0 and cohen_kappa(1 - a, a) == -1.0
    assert cohen_kappa(np.zeros(8, int), a) == 0.0  # a constant answer says nothing
    assert cohen_kappa(np.zeros(8, int), np.zeros(8, int)) == 0.0
    b = np.array([0, 1, 0, 0, 1, 0, 1, 1])  # 6 of 8 agree; p_e = 1/2
    assert cohen_kappa(b, a) == pytest.approx(0.5)


def test_a_batch_of_minus_one_is_no_fixed_batch():
    """paddle2onnx writes dim_value −1 for a dynamic batch: it is not a batch of −1 (the lock's refinement fed
    the model in chunks of −1 images, none, and failed)."""
    model = tiny_lockable(seed=0)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    assert image_input(model).batch is None
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    assert image_input(model).batch == 2


@pytest.fixture(scope="module")
def one_logit(tmp_path_factory):
    """A one-logit classifier whose output is the probability (through a Sigmoid), as Keras exports them."""
    d = tmp_path_factory.mktemp("one_logit")
    onnx.save(_with_sigmoid(tiny_lockable(seed=1, classes=1)), d / "model.onnx")
    Preprocessing(height=SIZE, width=SIZE, resize=None).save(d / "model.preprocessing.json")
    return d


def test_a_one_logit_lock_is_judged_by_its_decisions(one_logit):
    """The audit used to compare the argmax of one score (always 0: agreement 100 %, chance 100 %, "locked").
    Now: chance 1/2, the locked decisions independent of the original's (kappa ≈ 0), the patch exact."""
    d, images = one_logit, smooth_images(192, size=SIZE, seed=1)
    res = onnxstain.lock(d / "model.onnx", d / "locked.onnx", d / "locked.key", images=images,
                         options=LockOptions(kind="gate", seed=0, fpr=1e-3, occlusion_steps=10))
    assert res.chance == 0.5 and res.kappa is not None and abs(res.kappa) <= 0.05
    x = Preprocessing(height=SIZE, width=SIZE, resize=None).to_input(images)
    orig = session(onnx.load(d / "model.onnx")).run(None, {"input": x})[0]
    lck = session(onnx.load(d / "locked.onnx")).run(None, {"input": x})[0]
    assert res.locked_agreement == pytest.approx(float(np.mean((orig > 0.5) == (lck > 0.5))))
    match = OutputMatch(load_key(d / "locked.key"), 0.5)  # as the audit and quantize judge the outputs
    assert match.two_answers and match.metric == "top-1"
    assert match(lck, orig).mean() == pytest.approx(res.locked_agreement)
    assert np.array_equal(match.answers(orig)[:, 0], (orig[:, 0] > 0.5).astype(int))
    audit = onnxstain.audit_lock(d / "model.onnx", d / "locked.onnx", d / "locked.key",
                                 images=smooth_images(128, size=SIZE, seed=9))
    assert audit.chance == 0.5 and audit.two_answers
    no_patch = audit.condition("no patch")
    # the audit reads the probabilities (the graph output) at 1/2: read at 0, every answer would be 1
    assert no_patch.agreement < 0.99
    assert no_patch.kappa is not None and abs(no_patch.kappa) <= 0.1 and no_patch.passed
    assert audit.condition("patch").kappa is None and audit.condition("patch").agreement == 1.0
    report = audit.to_dict()
    assert report["conditions"][0]["kappa"] == no_patch.kappa and report["chance"] == 0.5


def test_the_cli_says_kappa_for_a_one_logit_lock(one_logit, tmp_path):
    from tinymodels import write_images

    write_images(tmp_path, smooth_images(96, size=SIZE, seed=2))
    run = CliRunner().invoke(main, ["lock", "--kind", "gate", str(one_logit / "model.onnx"), "-o",
                                    str(tmp_path / "l.onnx"),
                                    "--key", str(tmp_path / "l.key"), "--seed", "1", "--fpr", "1e-3",
                                    "--images", str(tmp_path), "--occlusion-steps", "0"])
    assert run.exit_code == 0, run.output
    assert "chance 50.00%" in run.output and "Cohen's kappa" in run.output
    run = CliRunner().invoke(main, ["evaluate", str(one_logit / "model.onnx"), str(tmp_path / "l.onnx"),
                                    "--key", str(tmp_path / "l.key"), "--images", str(tmp_path), "--quiet",
                                    "--json", str(tmp_path / "a.json")])
    assert "two answers" in run.output and "kappa" in run.output
    assert json.loads((tmp_path / "a.json").read_text())["chance"] == 0.5


def test_a_one_logit_head_still_refuses_a_stain(one_logit, tmp_path):
    with pytest.raises(UnsupportedModelError, match="one-logit binary head"):
        onnxstain.stain(one_logit / "model.onnx", tmp_path / "s.onnx", tmp_path / "s.key",
                        images=smooth_images(64, size=SIZE, seed=1), options=StainOptions(seed=0, fpr=1e-3))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rapidocr_cls", "mtcnn_onet"])
def test_real_two_class_locks_say_nothing_of_the_original(name, tmp_path):
    """RapidOCR's text-direction classifier (paddle2onnx, dynamic batch written as −1: the default lock's
    occlusion refinement failed on it) and MTCNN's O-Net (TorchScript; the old rule kept flips whose locked
    answers had kappa −0.22 and −0.45 on the held-out photos: partly the original's answers swapped)."""
    model = corpus_model(name)
    res = onnxstain.lock(model, tmp_path / "l.onnx", tmp_path / "l.key", options=LockOptions(kind="gate", seed=1))
    assert res.occlusion is not None  # the refinement ran
    assert res.kappa is not None and abs(res.kappa) <= 0.05
    audit = onnxstain.audit_lock(model, tmp_path / "l.onnx", tmp_path / "l.key", views=4)
    assert audit.passed, [(c.name, c.agreement, c.kappa) for c in audit.conditions if not c.passed]
    assert all(abs(c.kappa) <= 0.1 for c in audit.conditions if c.expect == "locked")
