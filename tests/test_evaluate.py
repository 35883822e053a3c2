"""evaluate: measurements on natural images beside the bounds (tiny model: fast; MobileNetV2: slow)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tinymodels import smooth_images, tiny_classifier, write_images

import onnxstain
from onnxstain import Preprocessing, StainOptions
from onnxstain._report import html as report_html
from onnxstain.cli import main
from onnxstain.keys import load_key
from onnxstain.runtime import run_batches, session, with_outputs

PRE = Preprocessing(height=32, width=32, resize=None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny classifier, an insert stain and an in-place stain of it (fpr 0.05, seeds fixed)."""
    d = tmp_path_factory.mktemp("evaluate")
    onnx.save(tiny_classifier(), d / "model.onnx")
    PRE.save(d / "model.preprocessing.json")
    images = smooth_images(96, seed=0)
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny search: one thread is faster, and much faster on a busy machine
    try:
        for mode, seed in (("insert", 3), ("inplace", 3)):  # seed 3: the trigger search converges in 180 steps
            onnxstain.stain(d / "model.onnx", d / f"{mode}.onnx", d / f"{mode}.key", images=images,
                            options=StainOptions(mode=mode, fpr=0.05, seed=seed))
    finally:
        torch.set_num_threads(threads)
    return d


@pytest.fixture(scope="module")
def probe_images(tiny):
    """A few natural-looking images plus two copies of the insert key's trigger (so that firings happen)."""
    trig = load_key(tiny / "insert.key").trigger_pixels()
    return np.concatenate([smooth_images(6, seed=21), trig[None], trig[None, :, ::-1], trig[None]])


@pytest.fixture(scope="module")
def insert_result(tiny, probe_images):
    return onnxstain.evaluate(tiny / "model.onnx", tiny / "insert.onnx", tiny / "insert.key", images=probe_images)


@pytest.fixture(scope="module")
def heldout_result(tiny):
    """The default image set: the built-in held-out photos, 2 views each, at the key's 32x32 input size."""
    return onnxstain.evaluate(tiny / "model.onnx", tiny / "insert.onnx", tiny / "insert.key", views=2)


def test_json_fields_and_version(heldout_result, tmp_path):
    res = heldout_result
    assert isinstance(res, onnxstain.EvaluateResult)
    path = tmp_path / "report.json"
    res.write_json(path)
    rep = json.loads(path.read_text())
    assert rep["format"] == "onnxstain-evaluate-report" and rep["version"] == 1
    for field in ("original", "modified", "key", "images", "detector", "coverage", "bounds", "fidelity", "trigger",
                  "notes", "timings"):
        assert field in rep
    img = rep["images"]
    assert img["views_per_photo"] == 2 and img["images"] == 2 * img["photos"] and img["photos"] > 0
    assert "correlated" in img["correlation"]
    det = rep["detector"]
    assert det["type"] == "measurement" and det["samples"] == img["images"] * 64
    assert sum(det["histogram_counts"]) == det["samples"]
    assert len(det["histogram_edges"]) == len(det["histogram_counts"]) + 1
    b = rep["bounds"]
    assert b["ball"]["type"] == "bound" and b["ball"]["kind"] == "calibrated-radius"
    assert b["data_driven"]["kind"] == "data-driven" and b["mixed"]["kind"] == "data-driven"
    assert b["measured"]["type"] == "measurement" and 0 < b["measured"]["upper"] <= 1
    assert b["photo_level"]["photos"] == img["photos"]
    # the mixed bound is at least the ball bound; fewer independent units give weaker statements
    assert b["mixed"]["value"] >= b["ball"]["value"]
    assert b["photo_level"]["mixed"]["value"] >= b["mixed"]["value"]
    assert 0 <= rep["coverage"]["samples_inside"] <= 1 and rep["coverage"]["images_inside"] <= 1
    assert rep["trigger"]["stained"] is True and rep["trigger"]["original_stained"] is False
    assert rep["trigger"]["modified_fires"] is True
    assert rep["trigger"]["cross_key_bound"]["kind"] == "cross-key"


def test_firings_match_numpy(tiny, probe_images, insert_result):
    key = load_key(tiny / "insert.key")
    v, c = key.detector.direction.array(), key.detector.centre.array()
    tau = key["detector"]["threshold"]
    tap = key["host"]["input"]
    model = onnx.load(tiny / "insert.onnx")
    feat = run_batches(session(with_outputs(model, [tap])), PRE.to_input(probe_images), [tap])[tap]
    # the host is a 1x1 conv: φ at a position is the channel vector there
    phi = feat.astype(np.float64).transpose(0, 2, 3, 1).reshape(len(probe_images), -1, feat.shape[1])
    s = phi @ v - v @ c
    r = np.linalg.norm(phi - c, axis=-1)
    d, cov = insert_result.detector, insert_result.coverage
    assert d is not None and cov is not None
    assert d.samples == s.size
    assert d.firings == int((s > tau).sum()) > 0
    assert d.images_firing == int((s > tau).any(axis=1).sum()) >= 2
    assert d.max_score == pytest.approx(s.max(), rel=1e-6)
    radius = key["calibration"]["radius"]
    assert cov.samples_inside == pytest.approx(float((r <= radius).mean()))
    assert cov.images_outside == int((r > radius).any(axis=1).sum())
    assert cov.max_radius == pytest.approx(r.max(), rel=1e-6)
    m = insert_result.measured
    assert m is not None and m.firing == d.images_firing and m.upper > m.rate


def test_insert_stain_is_lossless(heldout_result, insert_result):
    f = heldout_result.fidelity
    assert f.images == heldout_result.images.images
    assert f.agreement == 1.0 and f.differing == 0
    assert f.max_abs_delta == 0.0 and f.mean_kl == 0.0
    # on the probe set only the trigger copies (which fire) may change the output
    assert insert_result.fidelity.differing <= insert_result.detector.images_firing


def test_inplace_stain(tiny):
    res = onnxstain.evaluate(tiny / "model.onnx", tiny / "inplace.onnx", tiny / "inplace.key",
                             images=smooth_images(40, seed=5))
    assert res.trigger.stained and res.trigger.modified_fires
    assert res.detector is not None and res.detector.firings == 0
    assert 0.0 <= res.fidelity.agreement <= 1.0 and res.fidelity.mean_kl >= 0.0
    assert res.photo_level is None  # independent images: no separate photo-level statements


def test_html_report(insert_result, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "report.html"
    report_html.write_html(insert_result, path)
    text = path.read_text()
    assert path.is_file() and text.startswith("<!DOCTYPE html>")
    assert text.count("<img") == 2
    assert "http://" not in text and "https://" not in text  # self-contained
    assert "Fidelity" in text and "bound" in text


def test_missing_host_tensor_is_reported(tiny, tmp_path):
    """A model whose tensors were renamed: no white-box measurement, the rest still runs."""
    model = onnx.load(tiny / "model.onnx")
    tap = load_key(tiny / "insert.key")["host"]["input"]
    for node in model.graph.node:
        node.input[:] = [f"{n}_renamed" if n == tap else n for n in node.input]
        node.output[:] = [f"{n}_renamed" if n == tap else n for n in node.output]
    renamed = tmp_path / "renamed.onnx"
    onnx.save(model, renamed)
    res = onnxstain.evaluate(tiny / "model.onnx", renamed, tiny / "insert.key", images=smooth_images(8, seed=1))
    assert res.detector is None and res.coverage is None and res.data_driven_bound is None
    assert not res.white_box and any(tap in n for n in res.notes)
    assert res.fidelity.agreement == 1.0 and res.fidelity.max_abs_delta == 0.0
    assert not res.trigger.stained
    assert res.to_dict()["detector"] is None


# -- the CLI ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-imgs")
    write_images(d, smooth_images(12, seed=4))
    return d


def test_cli_evaluate(tiny, image_dir, tmp_path):
    pytest.importorskip("matplotlib")
    rep, page = tmp_path / "r.json", tmp_path / "r.html"
    r = CliRunner().invoke(main, ["evaluate", str(tiny / "model.onnx"), str(tiny / "insert.onnx"), "--key",
                                  str(tiny / "insert.key"), "--images", str(image_dir), "--json", str(rep),
                                  "--html", str(page), "--quiet"])
    assert r.exit_code == 0, r.output
    for text in ("firings", "ball", "data-driven", "mixed", "agreement", "STAINED"):
        assert text in r.output
    assert json.loads(rep.read_text())["images"]["images"] == 12
    assert page.read_text().count("<img") == 2


@pytest.mark.parametrize("kind", ["missing-key", "bad-key", "missing-images", "bad-views", "garbage-model"])
def test_cli_evaluate_errors(kind, tiny, image_dir, tmp_path):
    model, modified, key = tiny / "model.onnx", tiny / "insert.onnx", tiny / "insert.key"
    extra = ["--images", str(image_dir)]
    if kind == "missing-key":
        key = tmp_path / "nope.key"
    elif kind == "bad-key":
        key = tmp_path / "bad.key"
        key.write_text("{}")
    elif kind == "missing-images":
        extra = ["--images", str(tmp_path / "nothing")]
    elif kind == "bad-views":
        extra = ["--views", "0"]
    else:
        modified = tmp_path / "garbage.onnx"
        modified.write_bytes(b"not an onnx model" * 20)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["evaluate", str(model), str(modified), "--key", str(key), "--json", str(out),
                                  "--quiet", *extra])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("onnxstain: error:"), r.output
    assert not out.exists()


# -- MobileNetV2 (slow) ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_mobilenet_default_stain(mobilenet_v2, tmp_path):
    out, key = tmp_path / "stained.onnx", tmp_path / "owner.key"
    onnxstain.stain(mobilenet_v2, out, key, options=StainOptions(seed=3))
    res = onnxstain.evaluate(mobilenet_v2, out, key, views=2)
    d, cov = res.detector, res.coverage
    assert d is not None and cov is not None
    assert d.firings == 0 and d.max_score < d.threshold
    assert d.samples == res.images.images * 49 and res.images.views_per_photo == 2
    assert 0.99 <= cov.samples_inside <= 1.0 and cov.max_radius > 0.0
    assert cov.images_outside == round((1 - cov.images_inside) * res.images.images)
    assert res.ball_bound.value <= 1e-9 * (1 + 1e-9)
    assert res.trigger.stained and not res.trigger.original_stained
    assert res.fidelity.agreement >= 0.95
