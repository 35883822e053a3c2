"""verify on a model whose outputs drift from the stained model's (int8, weight noise): the shift signature of the
hidden stain is not read there (innocent keys' shifts drift past the threshold too), and the verdict rests on the
weight check, which names the key's model and no other."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tinymodels import smooth_images, tiny_classifier

import onnxstain
from onnxstain import Preprocessing, StainOptions
from onnxstain.keys import load_key
from onnxstain.signature import SHIFT_DRIFT_GATE, drift_gate

PRE = Preprocessing(height=32, width=32, resize=None)


def _two_stains(folder, variant):
    """The tiny classifier and two stains of it, seeds 1 and 2 (``s1``, ``s2``), in ``folder``."""
    onnx.save(tiny_classifier(), folder / "model.onnx")
    PRE.save(folder / "model.preprocessing.json")
    images = smooth_images(96, seed=0)
    for seed in (1, 2):
        onnxstain.stain(folder / "model.onnx", folder / f"s{seed}.onnx", folder / f"s{seed}.key", images=images,
                        options=StainOptions(variant=variant, fpr=0.05, seed=seed))
    return folder


@pytest.fixture(scope="module")
def hidden(tmp_path_factory):
    return _two_stains(tmp_path_factory.mktemp("drift"), "additive")


def _drifted(src, out, scale):
    """The classifier's weights and biases shaken: every score moves, along the signature's direction too;
    the host layer is as it was."""
    m = onnx.load(src)
    rng = np.random.default_rng(0)
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    for t in m.graph.initializer:
        if t.name in gemm.input[1:]:
            w = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((w + rng.normal(0, scale * w.std(), w.shape)).astype(w.dtype), t.name))
    onnx.save(m, out)
    return out


def test_new_keys_carry_what_the_gate_and_the_weight_check_read(hidden):
    key = load_key(hidden / "s1.key")
    assert key.signature.kind == "shift" and key.signature.controls.array().shape == (3, 10)
    assert key.white_box.original_row.array().shape == (key.host.m,) and key.white_box.channels == 48


def test_a_faithful_copy_is_read_from_its_outputs(hidden):
    res = onnxstain.verify(hidden / "s1.onnx", hidden / "s1.key")
    assert res.stained and res.basis == "black-box and white-box"
    assert res.checks[0].drift is not None and res.checks[0].drift < 1e-4  # float32 round-off only
    assert not onnxstain.verify(hidden / "s1.onnx", hidden / "s2.key").stained


def test_a_drifted_copy_is_read_from_its_weights(hidden):
    drifted = _drifted(hidden / "s1.onnx", hidden / "drifted.onnx", 0.5)
    own = onnxstain.verify(drifted, hidden / "s1.key")
    assert own.checks[0].drift > SHIFT_DRIFT_GATE  # the outputs drifted: the shift is not evidence
    assert own.stained and own.basis == "weights"
    weights = next(c for c in own.checks if c.name == "weights")
    assert weights.available and weights.passed and weights.score > 0.9
    other = onnxstain.verify(drifted, hidden / "s2.key")
    assert not other.stained
    other_weights = [c for c in other.checks if c.name == "weights"]
    assert not other_weights or not other_weights[0].passed
    # the original, drifted alike, carries no key
    plain = _drifted(hidden / "model.onnx", hidden / "plain.onnx", 0.5)
    assert not onnxstain.verify(plain, hidden / "s1.key").stained


def test_a_key_without_the_weight_check_is_not_read_from_a_drifted_model(hidden, tmp_path):
    import json

    body = json.loads((hidden / "s1.key").read_text())
    for field in ("original_row", "channels"):
        del body["white_box"][field]
    (tmp_path / "old.key").write_text(json.dumps(body))
    drifted = _drifted(hidden / "s1.onnx", hidden / "drifted-old.onnx", 0.5)
    res = onnxstain.verify(drifted, tmp_path / "old.key")
    assert not res.stained and any("predates" in n for n in res.notes)


def test_drift_gate_reads_along_the_signature_only():
    original, expected = np.zeros(4), np.array([1.0, 0.0, 0.0, 0.0])
    reference = np.zeros((3, 4))
    assert drift_gate(reference, reference, original, expected) == 0.0
    # a move orthogonal to the signature's direction (after centring) is no drift
    assert drift_gate(reference + np.array([0.0, 1.0, -1.0, 0.0]), reference, original, expected) < 1e-12
    # half the shift along it on one control reads 0.5
    moved = reference.copy()
    moved[1] = 0.5 * (expected - expected.mean())
    assert drift_gate(moved, reference, original, expected) == pytest.approx(0.5)


@pytest.mark.slow
def test_mobilenet_v2_int8_copies(mobilenet_v2, tmp_path):
    """onnxruntime's dynamic int8 of a MobileNetV2 copy: innocent keys' shifts drift past the threshold (measured
    up to 1.6) — the gate refuses them — and the weight check names the copy's key (cosine ≈ 0.996)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxstain._stain.many import Stainer

    with Stainer(mobilenet_v2) as st:
        for seed in (7, 8):
            st.stain(tmp_path / f"s{seed}.onnx", tmp_path / f"s{seed}.key", seed=seed)
    quantize_dynamic(str(tmp_path / "s7.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    own = onnxstain.verify(tmp_path / "q.onnx", tmp_path / "s7.key")
    assert own.stained and own.basis == "weights"
    assert not onnxstain.verify(tmp_path / "q.onnx", tmp_path / "s8.key").stained


@pytest.fixture(scope="module")
def overwritten(tmp_path_factory):
    return _two_stains(tmp_path_factory.mktemp("overwritten"), "non-additive")


def _edited(src, out, channel, *, column: bool = False, row: bool = False):
    """The classifier's column for ``channel`` zeroed (the stain's path to the scores cut, as a thief does with
    the column that stands out), and/or the host layer's row for it zeroed (the detector scrubbed)."""
    m = onnx.load(src)
    for t in m.graph.initializer:
        w = numpy_helper.to_array(t).copy()
        if column and t.name == "wf":
            w[:, channel] = 0.0
        elif row and t.name == "w3":
            w[channel] = 0.0
        else:
            continue
        t.CopyFrom(numpy_helper.from_array(w, t.name))
    onnx.save(m, out)
    return out


def test_an_overwritten_neuron_cut_from_the_scores_is_read_from_its_weights(overwritten):
    """A non-additive stain whose classifier column is zeroed: the outputs no longer show the signature (its
    checks fail, the model's outputs do not drift), yet the detector's row is in the host layer, and the weight
    check reads it — for its own key only; a model whose row is scrubbed too, or the original, reads nothing."""
    d = overwritten
    key = load_key(d / "s1.key")
    assert key.variant == "non-additive"
    cut = _edited(d / "s1.onnx", d / "cut.onnx", key.host.host_channel, column=True)
    res = onnxstain.verify(cut, key)
    by_name = {c.name: c for c in res.checks}
    assert not by_name["black-box"].passed
    assert res.stained and res.basis == "weights" and by_name["weights"].score > 0.99
    assert any("does not show in the outputs" in n for n in res.notes)
    assert not onnxstain.verify(cut, d / "s2.key").stained  # another key: its own row is not there
    scrubbed = _edited(cut, d / "scrubbed.onnx", key.host.host_channel, row=True)
    gone = onnxstain.verify(scrubbed, key)
    assert not gone.stained and gone.basis != "weights"
    original = onnxstain.verify(d / "model.onnx", key)
    assert not original.stained and original.basis == "black-box and white-box"
    # a faithful copy is still read from its outputs, the weight check not consulted
    faithful = onnxstain.verify(d / "s1.onnx", key)
    assert faithful.stained and all(c.name != "weights" for c in faithful.checks)
