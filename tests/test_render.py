"""The summaries the CLI prints, rendered from real results of a tiny model (stain, lock, verify, evaluate, audit)."""

from __future__ import annotations

import dataclasses
import io

import onnx
import pytest
from rich.console import Console
from tinymodels import smooth_images, tiny_lockable

import onnxstain
from onnxstain import LockOptions, Preprocessing, StainOptions
from onnxstain._lock.render import lock_lines
from onnxstain._report.render import evaluate_lines, lock_audit_lines, verify_lines
from onnxstain._stain.render import inspect_renderables, stain_lines

SIZE = 48
PRE = Preprocessing(height=SIZE, width=SIZE, resize=None)


def _text(renderables) -> str:
    """What a terminal shows: markup resolved, tables drawn."""
    buf = io.StringIO()
    con = Console(file=buf, width=200, highlight=False, color_system=None, soft_wrap=True)
    for item in renderables:
        con.print(item)
    return buf.getvalue()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("render")
    onnx.save(tiny_lockable(), d / "model.onnx")
    PRE.save(d / "model.preprocessing.json")
    images = smooth_images(96, size=SIZE, seed=1)
    stain = onnxstain.stain(d / "model.onnx", d / "s.onnx", d / "s.key", images=images,
                            options=StainOptions(mode="insert", fpr=0.05, seed=3))
    lock = onnxstain.lock(d / "model.onnx", d / "l.onnx", d / "l.key", images=images,
                          options=LockOptions(kind="gate", seed=0, fpr=1e-3, occlusion_steps=0))
    return d, images, stain, lock


def test_stain_summary_names_the_host_the_bound_and_the_files(work):
    _, _, res, _ = work
    lines = stain_lines(res)
    text = _text(lines)
    assert text.startswith(f"stained {res.output}  (insert, non-additive)")
    assert f"host {res.host}" in text
    assert res.bound.statement in text
    assert f"key {res.key_path}" in text and "[bold" not in text
    assert sum(line.startswith("  note: ") for line in lines) == len(res.notes)


def test_lock_summary_gives_the_patch_box_and_the_locked_agreement(work):
    _, _, _, res = work
    text = _text(lock_lines(res))
    top, left, h, w = res.patch_box
    assert text.startswith(f"locked {res.output}  (gate)")
    assert f"patch {h}x{w} px at top-left corner (row {top}, col {left}) of the {SIZE}x{SIZE} input" in text
    assert f"{100 * res.locked_agreement:.2f}%" in text
    assert "conduit channels' cost" not in text  # the gate is exact with the patch: no cost line
    assert "int8: onnxruntime's dynamic and static (QDQ) quantisers keep this lock" in text
    inplace = _text(lock_lines(dataclasses.replace(res, kind="inplace")))
    assert "int8: an in-place lock does not survive int8 quantisation" in inplace
    packed = _text(lock_lines(dataclasses.replace(res, packed_detector=True)))
    assert "int8: quantise a packed detector with `onnxstain quantize`" in packed


@pytest.mark.parametrize("which", ["stain", "lock"])
def test_verify_summary_says_the_verdict_and_every_check(work, which):
    d, _, _, _ = work
    model, key = (d / "s.onnx", d / "s.key") if which == "stain" else (d / "l.onnx", d / "l.key")
    word = "STAINED" if which == "stain" else "LOCKED"
    on_modified, on_original = onnxstain.verify(model, key), onnxstain.verify(d / "model.onnx", key)
    text = _text(verify_lines(on_modified))
    assert text.startswith(f"{word}  ") and on_modified.stained
    assert all(f"  {c.name}: " in text for c in on_modified.checks)
    assert _text(verify_lines(on_original)).startswith(f"NOT {word}  ")


def test_evaluate_and_audit_summaries(work):
    d, images, _, _ = work
    ev = onnxstain.evaluate(d / "model.onnx", d / "s.onnx", d / "s.key", images=images[:16])
    text = _text(evaluate_lines(ev))
    assert text.startswith(f"evaluate {ev.modified}  (against {ev.original})")
    assert f"bound: ball (key) {ev.ball_bound}" in text
    assert "trigger: STAINED" in text
    audit = onnxstain.audit_lock(d / "model.onnx", d / "l.onnx", d / "l.key", images=images[:16])
    text = _text(lock_audit_lines(audit))
    assert text.startswith(f"lock audit {audit.locked}")
    assert text.count("  ok ") + text.count("  FAIL ") == len(audit.conditions)


def test_inspect_renders_a_row_per_host(work):
    d, *_ = work
    info = onnxstain.inspect_model(d / "model.onnx")
    text = _text(inspect_renderables(info))
    assert all(h["name"] in text for h in info["hosts"])
    assert "(default: " in text
