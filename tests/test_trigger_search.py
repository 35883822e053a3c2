"""trigger_search: the one draw → ascend → quantise → accept loop and its strategies, on tiny models
built here. The searches are short: a refused direction costs no ascent, a capped one a few steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from tinymodels import smooth_images, tiny_classifier

from onnxstain import Preprocessing, StainOptions
from onnxstain._stain.job import calibration_pass, prepare
from onnxstain._stain.trigger_search import ClassifierRescore, DenseRescore, TriggerSearch
from onnxstain.calibration import ACCEPT_FACTOR, selected_positions
from onnxstain.errors import UnreachableBoundError
from onnxstain.math import bounds, detector
from onnxstain.signature import ScoreView

torch = pytest.importorskip("torch")
PRE = Preprocessing(height=32, width=32, resize=None)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny searches: one thread is faster, and much faster on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("search") / "model.onnx"
    onnx.save(tiny_classifier(), path)
    return path


def _search(model: Path, tau0: float | None = None, **options) -> TriggerSearch:
    job = prepare(model, model.parent / "o.onnx", model.parent / "o.key",
                  StainOptions(mode="insert", fpr=0.05, **options), PRE)
    cal = calibration_pass(job, smooth_images(96, seed=0), [job.host.input, job.head.scores])
    if tau0 is None:
        tau0 = bounds.threshold_for_target(0.05, cal.radius, job.host.m, positions=job.host.positions, draws=8)
    rescore = ClassifierRescore(cal, job.host, job.pre, job.head.scores, ScoreView((10,)))
    return TriggerSearch(job, cal, job.host, tau0, selected_positions(job.host), rescore)


def test_start_strategies_rank_calibration_images():
    s = np.array([[1.0, 5.0], [2.0, 2.0], [0.0, 9.0]])
    assert np.argmax(DenseRescore.start(s)) == 1  # the strongest weakest position
    soft = ClassifierRescore.start(s)  # a soft minimum: below the minimum, ordered like it here
    assert np.all(soft <= s.min(axis=1)) and np.argmax(soft) == 1


def test_directions_that_fire_on_natural_data_are_refused(model):
    search = _search(model, tau0=1e-9, seed=0, max_draws=3)  # every natural score reaches τ0/2
    with pytest.raises(UnreachableBoundError, match="within 3 draws; try another --seed"):
        search.find_all()
    assert search.steps == 0  # no ascent was started
    assert [n.split(":")[0] for n in search.job.notes] == ["draw 1", "draw 2", "draw 3"]
    assert all(n.endswith("direction rejected") for n in search.job.notes)


def test_an_ascent_short_of_the_margin_is_resampled(model):
    search = _search(model, seed=0, max_draws=2, max_steps=3)
    search.hint = lambda: "the hint"
    with pytest.raises(UnreachableBoundError, match="the hint"):
        search.find_all()
    assert 0 < search.steps <= 6
    assert any("the 8-bit trigger reached" in n and "resampled" in n for n in search.job.notes)


def test_a_found_trigger_is_rescored_and_reproducible(model):
    # seed 3: the first direction converges in under 200 steps (see test_evaluate.py)
    found = [_search(model, seed=3, max_draws=1).find_all()[0] for _ in range(2)]
    a, b = found
    search = _search(model, seed=3, max_draws=1)
    assert a.pixels.dtype == np.uint8 and a.pixels.shape == (32, 32, 3)
    assert a.s_star >= ACCEPT_FACTOR * search.tau0 and a.draws == 1
    assert a.s_star == pytest.approx(float(a.scores[search.selected].min()))
    assert np.allclose(a.scores, detector.scores(a.phi[None], a.direction, search.cal.stats.centre)[0])
    assert a.original_scores is not None and a.original_scores.shape == (10,)
    assert a.natural.shape == (96, search.host.positions)
    assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.direction, b.direction)
