"""The default kind of lock (``--kind auto``): the shuffle lock where it locks the model, else the gate lock with a
note of why — refused at the site (a dense output), or at the edit (the reordered layer leaves the model open) —
the same through the command line, for one key and for a fleet's many (:class:`onnxstain._lock.many.Locker`)."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tiny_vit import tiny_vit
from tinymodels import smooth_images, tiny_lockable, write_images

import onnxstain
from onnxstain import LockOptions, Preprocessing
from onnxstain._lock import shuffle as shuffle_mod
from onnxstain._lock.auto import AutoLock, resolved
from onnxstain._lock.job import prepare
from onnxstain._lock.many import Locker
from onnxstain._lock.pipeline import lock_stages
from onnxstain.cli import main
from onnxstain.errors import BadInputError
from onnxstain.keys import load_key
from onnxstain.progress import Silent

SIZE = 48
PRE = Preprocessing(height=SIZE, width=SIZE, resize=None)


@pytest.fixture(scope="module")
def images():
    return smooth_images(96, size=SIZE, seed=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("auto")
    onnx.save(tiny_lockable(), d / "model.onnx")
    PRE.save(d / "model.preprocessing.json")
    return d / "model.onnx"


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_default_is_the_shuffle_lock_where_it_locks_the_model(model, images, tmp_path):
    res = onnxstain.lock(model, tmp_path / "l.onnx", tmp_path / "l.key", images=images, options=LockOptions(seed=5))
    assert LockOptions().kind == "auto" and res.kind == "shuffle" and res.blocks
    assert load_key(tmp_path / "l.key").mode == "shuffle"
    assert not any("gate lock" in n for n in res.notes)
    # the same lock as --kind shuffle with the same seed, byte for byte
    onnxstain.lock(model, tmp_path / "s.onnx", tmp_path / "s.key", images=images,
                   options=LockOptions(kind="shuffle", seed=5))
    assert _digest(tmp_path / "l.onnx") == _digest(tmp_path / "s.onnx")
    assert onnxstain.verify(tmp_path / "l.onnx", tmp_path / "l.key").stained


def test_a_layer_that_leaves_the_model_open_falls_back_to_the_gate_and_says_why(model, images, tmp_path,
                                                                                monkeypatch):
    """The shuffle refuses at its edit (the locked model must fall to chance on the calibration images; here the
    margin is set below any agreement so that every order "leaves it open"): the gate lock is made instead, the
    one --kind gate makes with the same seed, and its note says why."""
    monkeypatch.setattr(shuffle_mod, "OPEN_MARGIN", -1.0)
    with pytest.raises(onnxstain.errors.UnsupportedModelError, match="does not lock this model"):
        onnxstain.lock(model, tmp_path / "s.onnx", tmp_path / "s.key", images=images,
                       options=LockOptions(kind="shuffle", seed=3, occlusion_steps=0, fpr=1e-3))
    assert not (tmp_path / "s.onnx").exists()
    res = onnxstain.lock(model, tmp_path / "l.onnx", tmp_path / "l.key", images=images,
                         options=LockOptions(seed=3, occlusion_steps=0, fpr=1e-3))
    assert res.kind == "gate" and load_key(tmp_path / "l.key").mode == "gate"
    note = next(n for n in res.notes if n.startswith("a gate lock"))
    assert "does not lock this model" in note and "opens a gate lock" in note and "use --kind gate" not in note
    onnxstain.lock(model, tmp_path / "g.onnx", tmp_path / "g.key", images=images,
                   options=LockOptions(kind="gate", seed=3, occlusion_steps=0, fpr=1e-3))
    assert _digest(tmp_path / "l.onnx") == _digest(tmp_path / "g.onnx")
    assert onnxstain.verify(tmp_path / "l.onnx", tmp_path / "l.key").stained


def test_a_dense_output_gets_the_gate_lock_and_says_why(tmp_path):
    onnx.save(tiny_vit(dim=64), tmp_path / "vit.onnx")
    Preprocessing(height=32, width=32, resize=None).save(tmp_path / "vit.preprocessing.json")
    res = onnxstain.lock(tmp_path / "vit.onnx", tmp_path / "l.onnx", tmp_path / "l.key",
                         images=smooth_images(128, size=32, seed=1), options=LockOptions(seed=0, fpr=1e-3))
    assert res.kind == "gate" and res.metric == "correlation"
    assert any(n.startswith("a gate lock") and "dense map" in n for n in res.notes), res.notes
    assert onnxstain.verify(tmp_path / "l.onnx", tmp_path / "l.key").stained


def test_a_dense_calibration_too_large_to_keep_taps_the_host_again_to_the_same_lock(tmp_path, monkeypatch):
    """The dense calibration keeps the host's features for its second pass (the radii) only up to a memory budget;
    beyond it, it runs the host again: the same centre, radius and lock, byte for byte."""
    from tiny_any import dense_cnn

    from onnxstain._lock import calibration

    onnx.save(dense_cnn(seed=0), tmp_path / "cnn.onnx")
    Preprocessing(height=48, width=64, resize=None).save(tmp_path / "cnn.preprocessing.json")
    images = smooth_images(96, size=64, seed=1)[:, :48]
    opts = LockOptions(kind="gate", seed=0, fpr=1e-3, layer="/2/Conv")  # reads a ReLU map: the host is tapped
    runs: list[int] = []
    real = calibration.run_batches
    monkeypatch.setattr(calibration, "run_batches", lambda *a, **k: runs.append(1) or real(*a, **k))
    kept = onnxstain.lock(tmp_path / "cnn.onnx", tmp_path / "a.onnx", tmp_path / "a.key", images=images, options=opts)
    once, runs[:] = len(runs), []
    monkeypatch.setattr(calibration, "FEATURES_HELD", 0)
    again = onnxstain.lock(tmp_path / "cnn.onnx", tmp_path / "b.onnx", tmp_path / "b.key", images=images, options=opts)
    assert len(runs) - once == -(-len(images) // calibration.CHUNK)  # every chunk tapped once more
    assert again.threshold == kept.threshold and _digest(tmp_path / "a.onnx") == _digest(tmp_path / "b.onnx")


def test_a_site_option_needs_a_kind(model, images, tmp_path):
    for opts in (LockOptions(layer="pixels"), LockOptions(detectors=2)):
        with pytest.raises(BadInputError, match="--kind"):
            onnxstain.lock(model, tmp_path / "l.onnx", tmp_path / "l.key", images=images, options=opts)
    assert not list(tmp_path.iterdir())


def test_the_command_line_default_is_auto(model, images, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_images(folder, images[:32])
    run = CliRunner().invoke
    got = run(main, ["lock", str(model), "-o", str(tmp_path / "l.onnx"), "--key", str(tmp_path / "l.key"),
                     "--images", str(folder), "--seed", "5", "--quiet"])
    assert got.exit_code == 0, got.output
    assert "(shuffle)" in got.output
    got = run(main, ["lock", str(model), "-o", str(tmp_path / "x.onnx"), "--key", str(tmp_path / "x.key"),
                     "--images", str(folder), "--layer", "pixels", "--quiet"])
    assert got.exit_code == 2 and "--kind" in got.output and len(got.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_a_fleets_keys_are_each_the_lock_of_its_seed_shuffle_or_gate(model, images, tmp_path, monkeypatch):
    """Locker (one calibration, many keys) under auto: each key's lock is the one ``onnxstain.lock`` writes with
    its seed — a shuffle lock, or, where its order leaves the model open, a gate lock whose site and
    calibration are built on the first such key."""
    locker = Locker(model, LockOptions(occlusion_steps=0), images=images)
    res = locker.lock(tmp_path / "a.onnx", tmp_path / "a.key", seed=11)
    assert res.kind == "shuffle"
    monkeypatch.setattr(shuffle_mod, "OPEN_MARGIN", -1.0)  # every order now leaves the model open
    kinds = [locker.lock(tmp_path / f"{s}.onnx", tmp_path / f"{s}.key", seed=s).kind for s in (12, 13)]
    assert kinds == ["gate", "gate"]
    for s in (12, 13):
        one = onnxstain.lock(model, tmp_path / f"one{s}.onnx", tmp_path / f"one{s}.key", images=images,
                             options=LockOptions(occlusion_steps=0, seed=s))
        assert one.kind == "gate" and _digest(tmp_path / f"{s}.onnx") == _digest(tmp_path / f"one{s}.onnx")
        assert onnxstain.verify(tmp_path / f"{s}.onnx", tmp_path / f"{s}.key").stained
    monkeypatch.undo()
    again = locker.lock(tmp_path / "b.onnx", tmp_path / "b.key", seed=11)
    assert again.kind == "shuffle" and _digest(tmp_path / "b.onnx") == _digest(tmp_path / "a.onnx")
    assert onnxstain.verify(tmp_path / "b.onnx", tmp_path / "b.key").stained


def test_each_kind_draws_from_its_own_generator_and_shares_the_jobs_notes(model, images, tmp_path):
    """A gate lock after the shuffle refused draws as ``--kind gate`` would: its generator starts from the seed,
    untouched by the shuffle's draws; notes and timings are the job's."""
    job = prepare(model, tmp_path / "l.onnx", tmp_path / "l.key", LockOptions(seed=9), None, images, Silent(), None,
                  None)
    stages = lock_stages(job)
    assert isinstance(stages, AutoLock) and stages.shuffle is not None and stages.gate is None
    shuffle, gate = resolved(job, "shuffle"), resolved(job, "gate")
    assert (shuffle.opts.kind, gate.opts.kind, job.opts.kind) == ("shuffle", "gate", "auto")
    first = shuffle.rng.random(4)
    np.testing.assert_array_equal(gate.rng.random(4), first)
    np.testing.assert_array_equal(np.random.default_rng(9).random(4), first)
    gate.notes.append("seen")
    assert job.notes[-1] == "seen" and gate.timings is job.timings


def test_inspect_says_which_lock_the_default_makes(model, images, tmp_path):
    """``inspect`` reads the default kind off the graph: a shuffle lock and its layer where the model has a site for
    it (the layer and blocks the lock then uses), else the gate lock and why (no torch, no calibration)."""
    info = onnxstain.inspect_model(model)
    res = onnxstain.lock(model, tmp_path / "l.onnx", tmp_path / "l.key", images=images, options=LockOptions(seed=5))
    assert info["lock"] == {"kind": "shuffle", "layer": res.host, "blocks": res.blocks, "reason": None}
    assert any(n.startswith("lock: the default kind makes a shuffle lock here") for n in info["notes"])
    onnx.save(tiny_vit(dim=64), tmp_path / "vit.onnx")
    Preprocessing(height=32, width=32, resize=None).save(tmp_path / "vit.preprocessing.json")
    dense = onnxstain.inspect_model(tmp_path / "vit.onnx")
    assert dense["lock"]["kind"] == "gate" and "dense output" in dense["lock"]["reason"]
    assert any(n.startswith("lock: the default kind makes a gate lock here") for n in dense["notes"])
