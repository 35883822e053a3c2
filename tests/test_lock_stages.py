"""The lock's stages one by one on tiny models built here: prepare and its refusals, the site, the search
loop, the gate's weights and the gate pass, and the stages run in order (lock_job, lock_site, lock_search,
lock_edit, passes/lock)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tinymodels import smooth_images, tiny_lockable

from onnxstain import LockOptions, Preprocessing
from onnxstain._lock.classifier import ClassifierLock
from onnxstain._lock.edit import gate_weights
from onnxstain._lock.geometry import lock_hosts
from onnxstain._lock.job import check_options, prepare, refuse_half_precision, run_stages
from onnxstain._lock.search import run_search
from onnxstain._lock.site import LockSite, classifier_host
from onnxstain._lock.types import LockResult
from onnxstain._lock.window import WINDOW
from onnxstain._onnx.graph import GraphView
from onnxstain.errors import BadInputError, UnsupportedModelError
from onnxstain.passes.lock import insert_gate
from onnxstain.patch import Patch
from onnxstain.progress import Silent
from onnxstain.runtime import session

SIZE = 48
PRE = Preprocessing(height=SIZE, width=SIZE, resize=None)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("stages")
    onnx.save(tiny_lockable(), d / "model.onnx")
    return d / "model.onnx"


def _job(model_path, tmp_path, **opts):
    return prepare(model_path, tmp_path / "l.onnx", tmp_path / "l.key", LockOptions(**{"kind": "gate", **opts}), PRE,
                   smooth_images(64, size=SIZE, seed=1), Silent(), None, None)


@pytest.mark.parametrize(("opts", "message"), [
    (dict(kind="both"), "--kind"), (dict(kind="inplace", detectors=2), "--detectors 1"), (dict(fpr=1.0), "--fpr"),
    (dict(seed=-1), "--seed"), (dict(detectors=9), "between 1 and 8"), (dict(max_draws=0), "one draw")])
def test_check_options_refuses(opts, message):
    with pytest.raises(BadInputError, match=message):
        check_options(LockOptions(**opts))


def test_prepare_finds_the_head_and_seeds(model_path, tmp_path):
    job = _job(model_path, tmp_path, seed=5)
    assert job.head is not None and job.head.classes == 10 and job.dense is None
    assert job.seed == 5 and job.rng.integers(1 << 30) == np.random.default_rng(5).integers(1 << 30)
    assert job.record.name == "l.key.public.json" and not (tmp_path / "l.onnx").exists()


def test_half_precision_weights_are_refused():
    model = tiny_lockable()
    refuse_half_precision(GraphView(model))  # float32: accepted
    w = model.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).astype(np.float16), w.name))
    with pytest.raises(UnsupportedModelError, match="fp16"):
        refuse_half_precision(GraphView(model))


def test_site_gate_reads_a_pixel_window_and_inplace_a_conv(model_path, tmp_path):
    job = _job(model_path, tmp_path, fpr=1e-3)
    hosts = lock_hosts(job.loaded.model, job.view)
    site = LockSite.at(classifier_host(hosts, job.view, job.opts, PRE), PRE)
    assert site.window and site.box == (0, 0, 4, 4) and site.pos_index == 0
    assert site.mask(SIZE, SIZE).sum() == 16 and site.mask(SIZE, SIZE)[:4, :4].all()
    conv = LockSite.at(classifier_host(hosts, job.view, LockOptions(kind="inplace", fpr=1e-3), PRE), PRE)
    assert not conv.window and conv.host.op == "Conv"
    with pytest.raises(BadInputError, match="in-place lock needs"):
        classifier_host(hosts, job.view, LockOptions(kind="inplace", layer=WINDOW), PRE)


class _Linear:
    """A search strategy over a fixed feature set: the patch's score is ``v · target`` (numpy only)."""

    detectors, m = 1, 6

    def __init__(self, natural: np.ndarray, target: np.ndarray, tau0: float) -> None:
        self.nat, self.target, self.tau0 = natural, target, tau0

    def natural(self, dirs):
        return self.nat @ dirs.T

    def fires(self, natural, draw):
        return f"draw {draw} fires" if float(natural.max()) > self.tau0 else None

    def make(self, dirs, draw, task):
        return Patch(np.zeros((1, 1, 3), np.uint8), 0, 0), np.zeros((2, 2, 3)), 3

    def score(self, dirs, patch):
        return dirs @ self.target

    def short(self, draw, scores):
        return f"draw {draw} short"


def test_search_takes_the_first_draw_that_reaches_the_acceptance():
    rng = np.random.default_rng(0)
    natural = rng.normal(0, 0.05, (20, 6))
    target = np.array([3.0, 0, 0, 0, 0, 0])  # a direction with v_0 > 1/3 scores above 1.0
    notes: list[str] = []
    out = run_search(_Linear(natural, target, tau0=1.0), np.random.default_rng(1), 1.0, 64, notes, Silent())
    assert out.accepted and out.best is not None and out.best.scores[0] >= 1.0
    assert out.steps == 3 * out.draws and len(notes) == out.draws - 1
    assert all(n.endswith("short") for n in notes)
    again = run_search(_Linear(natural, target, tau0=1.0), np.random.default_rng(1), 1.0, 64, [], Silent())
    assert np.array_equal(again.best.dirs, out.best.dirs)  # seeded: the same draws


def test_search_rejects_directions_that_fire_on_natural_images_and_keeps_the_best():
    natural = np.eye(6) * 10.0  # every direction has a coordinate of size ≥ 1/√6 in absolute value ...
    strategy = _Linear(np.concatenate([natural, -natural]), np.ones(6), tau0=1.0)  # ... so every draw fires
    notes: list[str] = []
    out = run_search(strategy, np.random.default_rng(0), 1.0, 5, notes, Silent())
    assert not out.accepted and out.best is None and out.reached == -np.inf and out.draws == 5
    assert notes == [f"draw {i} fires" for i in range(1, 6)]
    unreachable = run_search(_Linear(np.zeros((3, 6)), np.full(6, 0.1), tau0=1.0), np.random.default_rng(0), 1.0,
                             4, [], Silent())
    assert not unreachable.accepted and unreachable.best is not None
    assert unreachable.reached == pytest.approx(float(unreachable.best.scores.min()))


def test_gate_weights_give_four_on_the_patch_and_zero_at_the_margin(model_path, tmp_path):
    job = _job(model_path, tmp_path, fpr=1e-3, detectors=2)
    host = classifier_host(lock_hosts(job.loaded.model, job.view), job.view, job.opts, PRE)
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(2, host.m))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    centre, tau0 = rng.normal(size=host.m), 2.0
    scores = np.array([3.0, 5.0])
    filters, biases = gate_weights(host, dirs, scores, tau0, centre)
    assert filters.shape == (2, host.in_channels, *host.kernel)
    rows = filters.reshape(2, -1)
    for i, s in enumerate((scores, np.full(2, tau0))):  # φ with v_i · (φ − c) = s_i for both detectors at once
        phi = centre + np.linalg.lstsq(dirs, s, rcond=None)[0]
        assert rows @ phi + biases == pytest.approx([4.0, 4.0] if i == 0 else [0.0, 0.0])


def _run(model, x):
    sess = session(model)
    return sess.run(None, {"input": x})[0]


def test_gate_pass_is_exact_when_open_and_scrambles_when_closed(model_path, tmp_path):
    job = _job(model_path, tmp_path, fpr=1e-3)
    host = classifier_host(lock_hosts(job.loaded.model, job.view), job.view, job.opts, PRE)
    x = PRE.to_input(smooth_images(4, size=SIZE, seed=3))
    filters = np.zeros((1, host.in_channels, *host.kernel))
    disruption = np.where(np.arange(32) % 2 == 0, -2.0, 0.0)
    gate = insert_gate(job.loaded.model, host, job.head, filters, np.array([10.0]), disruption, 4.0)
    opened, fired = gate.model, gate.signal
    closed = insert_gate(job.loaded.model, host, job.head, filters, np.array([-10.0]), disruption, 4.0).model
    onnx.checker.check_model(opened)
    # Slice, 2 Conv, 2 Clip, pool, Flatten, Sub, the factor's product, the gate's Mul
    assert len(opened.graph.node) == len(job.loaded.model.graph.node) + 10
    assert len(gate.added) == 10 and set(gate.added) <= {n.name for n in opened.graph.node}
    assert not {n.name for n in job.loaded.model.graph.node} & set(gate.added)
    assert gate.changed and all(name.startswith("onnx::") for name in gate.changed)  # only new constants
    assert fired in {o for n in opened.graph.node for o in n.output}
    original = _run(job.loaded.model, x)
    assert np.array_equal(_run(opened, x), original)  # γ = 1: bit-identical
    assert not np.allclose(_run(closed, x), original)  # γ = 0: half the features change sign


def test_stages_run_in_order_and_write_the_outputs(model_path, tmp_path):
    job = _job(model_path, tmp_path, seed=0, fpr=1e-3, occlusion_steps=0)
    stages = ClassifierLock(job)
    res = run_stages(job, stages)
    assert isinstance(res, LockResult) and res.host == WINDOW and res.patch_box == (0, 0, 4, 4)
    assert list(job.timings) == ["load", "calibration", "patch_search", "edit", "checks", "save", "total"]
    assert stages.cal.bound_kind == "data-free" and min(stages.found.scores) >= 1.03 * stages.cal.tau0
    assert (tmp_path / "l.onnx").exists() and (tmp_path / "l.key").exists()
    assert res.model_sha256 == stages.digest and res.natural_firings == 0
