"""stain_job: prepare (paths, load, preprocessing, dispatch, host, seed), the calibration pass, the key's
shared sections and the one-unit write, on tiny models built here (no trigger search: fast)."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from tinymodels import smooth_images, tiny_classifier

from onnxstain import Preprocessing, StainOptions
from onnxstain._stain.hosts import choose_host
from onnxstain._stain.job import calibration_pass, detector_section, host_fields, prepare, write
from onnxstain.calibration import RADIUS_MARGIN, selected_positions
from onnxstain.errors import BadInputError, UnsupportedModelError
from onnxstain.keys import HostSection, load_key
from onnxstain.math import detector
from onnxstain.seeds import SEED_LIMIT, draw_seed

PRE = Preprocessing(height=32, width=32, resize=None)
FIXTURE_KEY = Path(__file__).parent / "fixtures" / "keys" / "stain_insert.key"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("job") / "model.onnx"
    onnx.save(tiny_classifier(), path)
    return path


def _prepare(model: Path, **options):
    d = model.parent
    return prepare(model, d / "out.onnx", d / "out.key", StainOptions(**options), PRE)


def test_prepare_finds_head_host_and_route(model):
    job = _prepare(model, mode="inplace", seed=7)
    assert job.head is not None and job.dense is None
    assert job.host == choose_host(job.hosts, job.view, job.head, "inplace", None)
    assert job.route is not None  # in place: the route from the host to the head
    assert _prepare(model, mode="insert", seed=7).route is None
    assert job.seed == 7 and job.record == model.parent / "out.key.public.json"
    assert job.pre.height == 32
    # the default variant resolved up front: a 10-class head keeps the non-additive stain, and says why
    assert job.opts.variant == "non-additive" and job.auto_variant
    assert len(job.notes) == 1 and "10 classes are too few" in job.notes[0]
    assert _prepare(model, mode="inplace", seed=7, variant="non-additive").notes == []


def test_prepare_seeds_the_generator(model):
    a, b = _prepare(model, mode="insert", seed=11), _prepare(model, mode="insert", seed=11)
    assert np.array_equal(a.rng.random(4), b.rng.random(4))
    drawn = _prepare(model, mode="insert")
    assert 0 <= drawn.seed < SEED_LIMIT  # a key stores it as a JSON number: the schema refuses more than 2^53
    assert draw_seed(5) == 5 and draw_seed(None) != draw_seed(None)


def test_prepare_dispatches_dense_outputs(tmp_path):
    pytest.importorskip("torch")
    from tiny_vit import tiny_vit

    onnx.save(tiny_vit(dim=64), tmp_path / "vit.onnx")
    job = prepare(tmp_path / "vit.onnx", tmp_path / "o.onnx", tmp_path / "o.key", StainOptions(mode="insert", seed=0),
                  PRE)
    assert job.head is None and job.dense is not None and job.host.op == "MatMul"
    with pytest.raises(UnsupportedModelError, match="dense output and no classifier head"):
        prepare(tmp_path / "vit.onnx", tmp_path / "o.onnx", tmp_path / "o.key", StainOptions(mode="inplace"), PRE)


@pytest.mark.parametrize(("options", "message"), [
    (dict(fpr=2.0), "--fpr must be between 0 and 1"),
    (dict(mode="sideways"), "unknown mode"),
    (dict(seed=-1), "--seed must be a non-negative integer"),
    (dict(chance=0.0), "--chance must be between 0 and 1"),
])
def test_prepare_refuses_bad_options(model, options, message):
    with pytest.raises(BadInputError, match=message):
        _prepare(model, **options)


def test_prepare_refuses_an_output_over_its_input(model):
    with pytest.raises(BadInputError):
        prepare(model, model, model.parent / "k.key", StainOptions(), PRE)
    assert not (model.parent / "k.key").exists()


def test_calibration_pass_measures_the_host(model):
    job = _prepare(model, mode="insert", seed=1)
    images = smooth_images(12, seed=3)
    cal = calibration_pass(job, images, [job.host.input, job.head.scores])
    assert cal.pixels is images and cal.inputs.shape[0] == 12
    assert job.host.input not in cal.outputs and cal.outputs[job.head.scores].shape == (12, 10)
    assert cal.phi.shape == (12, job.host.positions, job.host.m)
    assert cal.radius == pytest.approx(RADIUS_MARGIN * cal.stats.max_radius)
    assert cal.session is not None


def test_key_sections(model):
    job = _prepare(model, mode="insert", seed=1)
    sel = selected_positions(job.host)
    section = HostSection(**host_fields(job.host, sel), output="t", channel=0, host_channel=None, group=0)
    assert section.name == job.host.name and section.selected_positions == tuple(int(p) for p in sel)
    rng = np.random.default_rng(0)
    v, c = detector.sample_direction(rng, job.host.m), rng.normal(size=job.host.m)
    phi = rng.normal(size=(job.host.positions, job.host.m))
    det = detector_section(v, c, phi, detector.scores(phi[None], v, c)[0], threshold=2.0, tau0=1.5, s_star=3.0,
                           gain=1.0, delta=1.0, draws=2, max_draws=8)
    assert np.allclose(det.trigger_radii.array(), np.linalg.norm(phi - c, axis=1))
    assert det.offset is None and det.draws == 2


def test_write_is_one_unit(model):
    job = _prepare(model, mode="insert", seed=1)
    key = load_key(FIXTURE_KEY)
    seen = []

    def key_of(digest: str):
        seen.append(digest)
        return key

    digest = write(job, job.loaded.model, key_of)
    assert seen == [digest] == [hashlib.sha256(job.output.read_bytes()).hexdigest()]
    assert stat.S_IMODE(job.key_path.stat().st_mode) == 0o600 and job.record.exists()
    assert list(job.clock.timings)[-2:] == ["save", "total"]
    for p in (job.output, job.key_path, job.record):
        p.unlink()

    def refuse(_digest: str):
        raise UnsupportedModelError("no key")

    with pytest.raises(UnsupportedModelError):
        write(_prepare(model, mode="insert", seed=1), job.loaded.model, refuse)
    assert not job.output.exists() and not job.key_path.exists() and not job.record.exists()


def test_calibration_pass_keeps_a_host_input_another_tap_names(model):
    """A host reading the classifier's own input (a last Dense layer, as in the Keras CIFAR-10 CNN): the tap
    is asked for twice and stays in the outputs (was a KeyError once it had been taken as phi)."""
    job = _prepare(model, mode="insert", seed=1)
    images = smooth_images(6, seed=3)
    cal = calibration_pass(job, images, [job.host.input, job.head.scores, job.host.input])
    assert job.host.input in cal.outputs
    assert cal.phi.shape[0] == 6 and cal.outputs[job.host.input].shape[0] == 6
