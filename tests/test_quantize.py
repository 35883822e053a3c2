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
                       options=LockOptions(seed=seed, fpr=1e-3, occlusion_steps=0))
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
