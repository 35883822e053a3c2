"""The attack suite (tools/attack_suite.py) measures what it says, on a tiny model built here: the removal
attacks open the gate lock and strip the in-place stain, the detection statistics find the in-place edit, and
a toolchain transform that changes nothing keeps both marks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from tinymodels import smooth_images, tiny_lockable

import onnxstain
from onnxstain import LockOptions, Preprocessing, StainOptions
from onnxstain.keys import load_key
from onnxstain.verify import key_patch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import attack_suite

SIZE = 48
PRE = Preprocessing(height=SIZE, width=SIZE, resize=None)


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    d = tmp_path_factory.mktemp("attacks")
    onnx.save(tiny_lockable(), d / "model.onnx")
    PRE.save(d / "model.preprocessing.json")
    images = smooth_images(96, size=SIZE, seed=1)
    onnxstain.stain(d / "model.onnx", d / "stain.onnx", d / "stain.key", images=images,
                    options=StainOptions(mode="inplace", fpr=0.05, seed=3))
    onnxstain.lock(d / "model.onnx", d / "lock.onnx", d / "lock.key", images=images,
                   options=LockOptions(kind="gate", seed=0, fpr=1e-3, occlusion_steps=0))
    ev = attack_suite.Evaluator("tiny", d / "model.onnx", views=1, seed=0, work=d)
    ev.setup(load_key(d / "lock.key"))
    return d, ev


def test_detection_finds_the_in_place_edit_and_the_gate_nodes(marked):
    d, _ = marked
    stain = attack_suite.detection("tiny", "stain-inplace", d / "model.onnx", d / "stain.onnx")
    assert stain.survives is False and "rank 1 of" in stain.detail and "0 nodes added" in stain.detail
    lock = attack_suite.detection("tiny", "lock-gate", d / "model.onnx", d / "lock.onnx")
    assert lock.survives is False and "image input consumers 1 → 2" in lock.detail


def test_detection_ranks_the_keys_own_slices(marked):
    """The key names where an in-place stain lives (host row and bias, the classifier column it feeds): the
    non-additive stain is found there (its bias, its column); the additive one, which leaves its column
    alone and spreads a compensation over the others, is hidden (its slices outside the top 1 %), and no
    slice is ranked merely because a compensation touched every slice of its tensor."""
    d, _ = marked
    overwrite = attack_suite.detection("tiny", "stain-inplace", d / "model.onnx", d / "stain.onnx",
                                       load_key(d / "stain.key"))
    assert overwrite.survives is False and "top 1 %" in overwrite.detail
    onnxstain.stain(d / "model.onnx", d / "additive.onnx", d / "additive.key",
                    images=smooth_images(96, size=SIZE, seed=1),
                    options=StainOptions(mode="inplace", variant="additive", fpr=0.05, seed=3))
    hidden = attack_suite.detection("tiny", "stain-additive", d / "model.onnx", d / "additive.onnx",
                                    load_key(d / "additive.key"))
    assert hidden.survives is True and "top 1 %" not in hidden.detail, hidden.detail


def test_patch_from_weights_reads_the_plain_gate_patch_exactly(marked):
    d, ev = marked
    key = load_key(d / "lock.key")
    ev.ctx.key = key
    patch = attack_suite.patch_from_weights(d / "lock.onnx", ev.ctx)
    assert patch is not None and (patch.top, patch.left) == (key_patch(key).top, key_patch(key).left)
    assert np.array_equal(patch.pixels, key_patch(key).pixels)  # no occlusion refinement: the closed form
    row = ev.patch_from_weights("lock-gate", d / "lock.onnx", key)
    assert row.survives is False and row.agreement == 1.0


def test_bypass_opens_the_gate_and_a_neutral_transform_keeps_it(marked):
    d, ev = marked
    key = load_key(d / "lock.key")
    assert ev.bypass("lock-gate", d / "lock.onnx", key).agreement == 1.0
    kept = ev.run("lock-gate", d / "lock.onnx", key, attack_suite.ATTACKS["ort-basic"])
    assert kept.survives is True and kept.agreement == 1.0 and kept.reference == 1.0


def test_prune_top_column_cuts_the_in_place_stain_from_the_outputs_not_from_the_weights(marked):
    """Zeroing the column that stands out costs the model nothing and the outputs lose the signature, but the
    overwritten row is still in the host layer: verify reads it there."""
    d, ev = marked
    key = load_key(d / "stain.key")
    row = ev.run("stain-inplace", d / "stain.onnx", key, attack_suite.ATTACKS["prune-top-column"])
    assert row.agreement is not None and row.agreement >= 0.95
    assert "black-box fail" in row.detail and "weights pass" in row.detail, row.detail
    assert row.survives is True
    kept = ev.run("stain-inplace", d / "stain.onnx", key, attack_suite.ATTACKS["onnxslim"])
    assert kept.survives is True


def test_detection_row_names_the_model(marked):
    d, _ = marked
    assert attack_suite.detection("tiny", "stain-inplace", d / "model.onnx", d / "stain.onnx").model == "tiny"


def test_the_shuffle_lock_has_no_gate_to_bypass_and_its_pinned_order_is_what_opens_it(marked):
    """The bypass search now tries every gather too: skipping the shuffle lock's reordering leaves the stored
    (shuffled) layer, still locked. The order search pins the sort's indices: with the key's own order pinned
    the model opens (the attack's plumbing is right); its row reports what its budget found."""
    d, ev = marked
    onnxstain.lock(d / "model.onnx", d / "shuffle.onnx", d / "shuffle.key", images=smooth_images(96, size=SIZE, seed=1),
                   options=LockOptions(kind="shuffle", seed=0))
    key = load_key(d / "shuffle.key")
    ev.ctx.key = key
    bypass = ev.bypass("lock-shuffle", d / "shuffle.onnx", key)
    assert bypass.survives is True and bypass.agreement is not None and bypass.agreement < 0.5
    assert "GatherND" in bypass.cost, bypass.cost
    pinned = attack_suite.pin_order(onnx.load(d / "shuffle.onnx"), np.asarray(key.shuffle.order))
    assert np.mean(attack_suite.top1(pinned, ev.x) == ev.want) == 1.0
    found = attack_suite.order_search(d / "shuffle.onnx", ev.ctx, 1.0, np.random.default_rng(0))
    assert found is not None and "orders tried" in found[1]
    assert ev.patch_from_weights("lock-shuffle", d / "shuffle.onnx", key).detail.startswith("n/a")
