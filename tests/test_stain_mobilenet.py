"""Integration: stain the real MobileNetV2 (ImageNet weights) with every mode and variant, then verify."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxstain
from onnxstain import StainOptions
from onnxstain._onnx.diff import structural_diff
from onnxstain.keys import load_key
from onnxstain.naturalset import natural_images
from onnxstain.runtime import run_batches, session
from onnxstain.signature import class_margin

pytestmark = pytest.mark.slow
COMBOS = [(m, v) for m in ("inplace", "insert") for v in ("non-additive", "additive")]


@pytest.fixture(scope="module")
def stained(mobilenet_v2, tmp_path_factory):
    d = tmp_path_factory.mktemp("mnv2")
    out = {}
    for i, (mode, variant) in enumerate(COMBOS):
        model, key = d / f"{mode}-{variant}.onnx", d / f"{mode}-{variant}.key"
        res = onnxstain.stain(mobilenet_v2, model, key, options=StainOptions(mode=mode, variant=variant, seed=100 + i))
        out[(mode, variant)] = (res, model, key)
    return out


@pytest.fixture(scope="module")
def heldout(mobilenet_v2_preprocessing):
    nat = natural_images("heldout")
    return mobilenet_v2_preprocessing.to_input(nat.pixels[::4])  # every 4th view: 156 images


def _scores(path, x):
    return run_batches(session(str(path)), x, [onnx.load(str(path), load_external_data=False).graph.output[0].name],
                       batch=32)


@pytest.mark.parametrize("combo", COMBOS)
def test_stain_verifies_and_bound_meets_default_target(stained, mobilenet_v2, combo):
    res, model, key = stained[combo]
    assert res.host.endswith("features.18.0/Conv")
    assert res.bound.value <= 1e-9
    assert res.natural_firings == 0
    v = onnxstain.verify(model, key)
    assert v.stained
    assert v.fpr_bound.value <= 1e-6
    assert not onnxstain.verify(mobilenet_v2, key).stained
    other = stained[COMBOS[(COMBOS.index(combo) + 1) % len(COMBOS)]][1]
    assert not onnxstain.verify(other, key).stained


@pytest.mark.parametrize("combo", COMBOS)
def test_trigger_png_through_recorded_preprocessing(stained, mobilenet_v2_preprocessing, combo):
    _, model, key_path = stained[combo]
    key = load_key(key_path)
    x = mobilenet_v2_preprocessing.to_input(key.trigger_pixels())
    scores = next(iter(_scores(model, x).values()))[0]
    if key["signature"]["type"] == "class":
        assert class_margin(scores, key["signature"]["class"]) >= 10.0


def test_inplace_topology_unchanged(stained, mobilenet_v2):
    original = onnx.load(str(mobilenet_v2))
    for variant in ("non-additive", "additive"):
        assert structural_diff(original, onnx.load(str(stained[("inplace", variant)][1]))) == []


@pytest.mark.parametrize("variant", ["non-additive", "additive"])
def test_insert_bit_identical_on_held_out_photos(stained, mobilenet_v2, heldout, variant):
    a = next(iter(_scores(mobilenet_v2, heldout).values()))
    b = next(iter(_scores(stained[("insert", variant)][1], heldout).values()))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("variant", ["non-additive", "additive"])
def test_inplace_fidelity_on_held_out_photos(stained, mobilenet_v2, heldout, variant):
    a = next(iter(_scores(mobilenet_v2, heldout).values()))
    b = next(iter(_scores(stained[("inplace", variant)][1], heldout).values()))
    agreement = float(np.mean(a.argmax(1) == b.argmax(1)))
    # The natural set is fragile (5% of the images have a top-1 margin below 0.05); see tools/README.md.
    assert agreement >= 0.98
    assert float(np.abs(a - b).max()) < 1.0


def test_inplace_note_on_per_tensor_int8_is_borne_out_by_onnxruntime(stained, mobilenet_v2, heldout, tmp_path):
    """The in-place stain says when per-tensor int8 will break the classifier; onnxruntime's quantize_dynamic
    (per tensor, its default) agrees: the stained model collapses where the original keeps most of its top-1."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    res, model, _ = stained[("inplace", "non-additive")]
    assert any(n.startswith("per-tensor int8 of the edited classifier") for n in res.notes)
    assert not any("per-tensor int8" in n for n in stained[("insert", "non-additive")][0].notes)
    want = next(iter(_scores(mobilenet_v2, heldout).values())).argmax(1)
    agreement = {}
    for name, path in (("original", mobilenet_v2), ("stained", model)):
        quantize_dynamic(str(path), str(tmp_path / f"{name}.int8.onnx"), weight_type=QuantType.QInt8)
        top = next(iter(_scores(tmp_path / f"{name}.int8.onnx", heldout).values())).argmax(1)
        agreement[name] = float(np.mean(top == want))
    assert agreement["stained"] < agreement["original"] - 0.2, agreement
