"""quantize: int8 that keeps the mark, on a tiny lockable CNN built here (real onnxruntime quantisers)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tinymodels import smooth_images, tiny_lockable

import onnxstain
from onnxstain import LockOptions, MarkLostError, Preprocessing, StainOptions
from onnxstain.cli import main
from onnxstain.keys import load_key
from onnxstain.verify import key_triggers

SIZE = 48
PRE = Preprocessing(height=SIZE, width=SIZE, resize=None)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("quantize")
    model = tiny_lockable()
    model.producer_name, model.producer_version = "tiny-exporter", "9.9"
    onnx.helper.set_model_props(model, {"owner": "tests"})
    onnx.save(model, d / "model.onnx")
    PRE.save(d / "model.preprocessing.json")
    images = smooth_images(96, size=SIZE, seed=1)
    for seed in (0, 1):
        onnxstain.lock(d / "model.onnx", d / f"lock{seed}.onnx", d / f"lock{seed}.key", images=images,
                       options=LockOptions(kind="gate", seed=seed, fpr=1e-3, occlusion_steps=0))
    onnxstain.stain(d / "model.onnx", d / "stain.onnx", d / "stain.key", images=images,
                    options=StainOptions(mode="insert", fpr=0.05, seed=3))
    return d


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_quantised_lock_still_locks_and_keeps_the_source_fields(work):
    before = _sha(work / "lock0.onnx")
    res = onnxstain.quantize(work / "lock0.onnx", work / "q.onnx", work / "lock0.key")
    assert _sha(work / "lock0.onnx") == before  # the input is never modified
    assert res.verified is not None and res.verified.kind == "lock"
    assert res.closed is not None and res.agreement - res.closed >= 0.5
    assert res.patched_calibration_images == (res.calibration_images + 1) // 2 > 0
    q = onnx.load(work / "q.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    assert (q.producer_name, q.producer_version) == ("tiny-exporter", "9.9")
    assert {p.key: p.value for p in q.metadata_props} == {"owner": "tests"}
    assert not onnxstain.verify(work / "q.onnx", work / "lock1.key").stained
    assert res.patched and 0.5 <= res.agreement <= 1.0


def test_a_model_that_loses_the_mark_is_never_written(work):
    with pytest.raises(MarkLostError, match="nothing written"):
        onnxstain.quantize(work / "lock0.onnx", work / "lost.onnx", work / "lock1.key")  # another lock's key
    assert not (work / "lost.onnx").exists()
    assert not list(work.glob(".onnxstain-tmp-*"))


def test_dynamic_and_stain(work):
    res = onnxstain.quantize(work / "stain.onnx", work / "sd.onnx", work / "stain.key", mode="dynamic")
    assert res.calibration_images == 0 and res.verified is not None and res.verified.stained
    assert not np.isnan(res.agreement)


def test_static_stain_calibrates_with_its_trigger(work):
    # the detector's firing on the trigger lies far outside natural images' ranges: the quantiser must see it
    res = onnxstain.quantize(work / "stain.onnx", work / "ss.onnx", work / "stain.key")
    triggers = len(key_triggers(load_key(work / "stain.key")))
    assert res.trigger_calibration_images == triggers >= 1 and res.patched_calibration_images == 0
    assert res.calibration_images > res.trigger_calibration_images
    assert res.verified is not None and res.verified.stained
    assert res.to_dict()["trigger_calibration_images"] == triggers


def test_cli_quantize(work, tmp_path):
    r = CliRunner().invoke(main, ["quantize", str(work / "lock0.onnx"), "-o", str(tmp_path / "q.onnx"), "--key",
                                  str(work / "lock0.key"), "--json", str(tmp_path / "q.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "quantised" in r.output and "verify: LOCKED" in r.output and "with the lock's patch" in r.output
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["format"] == "onnxstain-quantize-report" and report["verified"]["stained"] is True
    r = CliRunner().invoke(main, ["quantize", str(work / "model.onnx"), "-o", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0 and "no key given" in r.output
    r = CliRunner().invoke(main, ["quantize", str(work / "model.onnx"), "-o", str(work / "model.onnx")])
    assert r.exit_code == 2 and r.output.startswith("onnxstain: error:")


def test_an_opset_11_model_is_upgraded_for_per_channel_int8(tmp_path):
    # onnxruntime's per-channel QDQ writes DequantizeLinear with an axis (opset 13) into an opset-11 model as
    # it is: the result does not load. quantize upgrades the opset first and says so.
    model = tiny_lockable()
    model.opset_import[0].version, model.ir_version = 11, 6
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "m.onnx")
    PRE.save(tmp_path / "m.preprocessing.json")
    res = onnxstain.quantize(tmp_path / "m.onnx", tmp_path / "q.onnx")
    assert any("opset 11 upgraded to 13" in note for note in res.notes)
    q = onnx.load(tmp_path / "q.onnx")
    assert q.opset_import[0].version >= 13
    assert onnx.load(tmp_path / "m.onnx").opset_import[0].version == 11  # the input is never modified
    assert res.agreement >= 0.8
    static = onnxstain.quantize(tmp_path / "m.onnx", tmp_path / "t.onnx", per_channel=False)
    assert not static.notes  # per tensor needs no axis: the model is quantised as it is


def _patch_opens(locked, quantised, key_path, images):
    """(with the patch, without it): top-1 agreement of ``quantised`` with the float locked model with the patch."""
    from onnxstain.patch import paste_pixels
    from onnxstain.runtime import session
    from onnxstain.verify import key_patch

    key = load_key(key_path)
    patched = PRE.to_input(paste_pixels(images, key_patch(key)))

    def top1(model, x):
        sess = session(str(model))
        return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)

    want = top1(locked, patched)
    clean = PRE.to_input(images)
    return float(np.mean(top1(quantised, patched) == want)), float(np.mean(top1(quantised, clean) == want))


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_users_static_quantiser_on_clean_images_keeps_the_gate_lock(work, tmp_path, per_channel):
    """onnxruntime's own static int8, calibrated on clean images only (no patch: a user's pipeline): the gate's
    maps keep their open level and the locked scores' range holds the unlocked ones, so the patch still opens the
    quantised model; without it, it stays locked."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    x = PRE.to_input(smooth_images(48, size=SIZE, seed=5))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(x[i:i + 1] for i in range(len(x)))

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {"input": row}

    q = tmp_path / "q.onnx"
    quantize_static(str(work / "lock0.onnx"), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    opened, closed = _patch_opens(work / "lock0.onnx", q, work / "lock0.key", smooth_images(64, size=SIZE, seed=6))
    assert opened >= 0.9 and closed <= 0.3


def _paddle_style(model: onnx.ModelProto) -> onnx.ModelProto:
    """paddle2onnx's form: Convs without a bias, each followed by a BatchNormalization (here one that adds the
    bias), every weight in a Constant node."""
    from models.formats import to_constant_nodes

    nodes, eps = [], 1e-5
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) == 3:
            bias = next(t for t in model.graph.initializer if t.name == node.input[2])
            c = int(bias.dims[0])
            stats = {f"{bias.name}.{k}": v for k, v in (("scale", np.ones(c)), ("mean", np.zeros(c)),
                                                          ("var", np.full(c, 1.0 - eps)))}
            model.graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.float32), k)
                                           for k, v in stats.items())
            out, node.output[0] = node.output[0], node.output[0] + "_nobias"
            names = list(stats)
            nodes += [node, onnx.helper.make_node("BatchNormalization", [node.output[0], names[0], bias.name, names[1],
                                                                         names[2]], [out], epsilon=eps)]
            del node.input[2]
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return to_constant_nodes(model)


def test_a_users_dynamic_quantiser_takes_a_model_with_constant_node_weights(tmp_path):
    """paddle2onnx keeps every weight in a Constant node and the passes store theirs the same way, but
    onnxruntime's dynamic quantiser refuses a Conv with a bias whose weight is not an initializer (its own Convs
    have none): the inserted Convs keep theirs as initializers, so the user's dynamic int8 runs, and the lock and
    the stain survive it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(_paddle_style(tiny_lockable()), tmp_path / "model.onnx")
    quantize_dynamic(str(tmp_path / "model.onnx"), str(tmp_path / "model.q.onnx"), weight_type=QuantType.QInt8)
    PRE.save(tmp_path / "model.preprocessing.json")
    images = smooth_images(96, size=SIZE, seed=1)
    onnxstain.lock(tmp_path / "model.onnx", tmp_path / "lock.onnx", tmp_path / "lock.key", images=images,
                   options=LockOptions(kind="gate", seed=0, fpr=1e-3, occlusion_steps=0))
    onnxstain.stain(tmp_path / "model.onnx", tmp_path / "stain.onnx", tmp_path / "stain.key", images=images,
                    options=StainOptions(mode="insert", fpr=0.05, seed=3))
    for name in ("lock", "stain"):
        marked = onnx.load(tmp_path / f"{name}.onnx")
        assert any(n.op_type == "Constant" for n in marked.graph.node)
        quantize_dynamic(str(tmp_path / f"{name}.onnx"), str(tmp_path / f"{name}.q.onnx"), weight_type=QuantType.QInt8)
    opened, closed = _patch_opens(tmp_path / "lock.onnx", tmp_path / "lock.q.onnx", tmp_path / "lock.key",
                                  smooth_images(64, size=SIZE, seed=6))
    assert opened >= 0.9 and closed <= 0.3
    assert onnxstain.verify(tmp_path / "stain.q.onnx", tmp_path / "stain.key").stained


def test_the_summary_says_when_verify_does_not_read_the_mark(work, tmp_path):
    """A quantised lock that verify's synthetic references read as NOT LOCKED (int8 flips their small margins)
    is written when the held-out photos show the lock kept; the summary must say NOT LOCKED, not LOCKED."""
    import dataclasses

    from onnxstain._report.render import quantize_lines

    res = onnxstain.quantize(work / "lock0.onnx", tmp_path / "q.onnx", work / "lock0.key")
    assert res.verified is not None
    kept = "\n".join(quantize_lines(res))
    assert "verify: LOCKED (" in kept
    missed = dataclasses.replace(res, verified=dataclasses.replace(res.verified, stained=False))
    assert "verify: NOT LOCKED (" in "\n".join(quantize_lines(missed))
