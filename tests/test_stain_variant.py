"""The default stain variant ("auto"): additive in place where it hides and its shift signature is specific,
the non-additive one elsewhere, with the reason in the notes."""

from __future__ import annotations

import types

import onnx
import pytest
from tinymodels import smooth_images, tiny_classifier

import onnxstain
from onnxstain import Preprocessing, StainOptions
from onnxstain._stain.job import resolve_variant
from onnxstain.errors import BadInputError

PRE = Preprocessing(height=32, width=32, resize=None)


def _head(classes: int, detection: bool = False) -> types.SimpleNamespace:
    return types.SimpleNamespace(classes=classes, detection=detection, linear=not detection, weight="wf")


def _route(affine=(), siblings=()) -> types.SimpleNamespace:
    return types.SimpleNamespace(affine=affine, siblings=siblings)


class _View:
    def is_quantized(self, name: str) -> bool:
        return False


HOST = types.SimpleNamespace(activation="relu")


@pytest.mark.parametrize(("opts", "head", "route", "host", "want", "why"), [
    (StainOptions(), _head(1000), _route(), HOST, "additive", None),
    (StainOptions(), _head(10), _route(), HOST, "non-additive", "10 classes are too few"),
    (StainOptions(chance=0.05), _head(100), _route(), HOST, "additive", None),  # 100 ≥ 2 / 0.05
    (StainOptions(), _head(1000), _route(affine=(("/bn/Mul", 1, 0.0),)), HOST, "non-additive", "per-channel scale"),
    (StainOptions(), _head(1000), _route(siblings=(types.SimpleNamespace(node="/aux/Gemm"),)), HOST,
     "non-additive", "/aux/Gemm"),
    (StainOptions(), _head(1000), _route(), types.SimpleNamespace(activation="prelu"), "non-additive", "PReLU"),
    (StainOptions(mode="insert"), _head(1000), None, HOST, "non-additive", None),
    (StainOptions(), _head(1000, detection=True), None, HOST, "non-additive", None),
    (StainOptions(variant="non-additive"), _head(1000), _route(), HOST, "non-additive", None),
    (StainOptions(variant="additive"), _head(2), _route(), HOST, "additive", None),  # asked for: kept
])
def test_resolve_variant(opts, head, route, host, want, why):
    asked = opts.variant
    got, reason = resolve_variant(opts, host, head, route, _View())
    assert got.variant == want
    assert (reason is None) if why is None else (why in reason)
    assert opts.variant == asked  # the caller's options are not changed


def test_unknown_variant_is_refused():
    with pytest.raises(BadInputError, match="unknown variant"):
        StainOptions(variant="hidden").check()  # type: ignore[arg-type]


@pytest.mark.parametrize(("classes", "variant", "signature"),
                         [(1000, "additive", "shift"), (10, "non-additive", "class")])
def test_default_stain_variant_end_to_end(tmp_path, classes, variant, signature):
    onnx.save(tiny_classifier(classes=classes), tmp_path / "m.onnx")
    PRE.save(tmp_path / "m.preprocessing.json")
    res = onnxstain.stain(tmp_path / "m.onnx", tmp_path / "s.onnx", tmp_path / "s.key",
                          images=smooth_images(96, seed=0), options=StainOptions(seed=2, fpr=0.05))
    assert (res.variant, res.signature_type) == (variant, signature)
    assert onnxstain.load_key(tmp_path / "s.key").variant == variant
    assert any("too few for the additive" in n for n in res.notes) == (variant == "non-additive")
    assert onnxstain.verify(tmp_path / "s.onnx", tmp_path / "s.key").stained


def test_auto_falls_back_to_the_non_additive_stain_when_the_additive_edit_fails(tmp_path, monkeypatch):
    """A route the up-front checks let through but the additive edit refuses: the default stain overwrites a
    channel with the same trigger instead, and says why."""
    from onnxstain._stain import edit
    from onnxstain.errors import UnsupportedModelError

    def refuse(req):
        raise UnsupportedModelError("no working channel takes the detector")

    monkeypatch.setattr(edit, "_additive_host_channel", refuse)
    onnx.save(tiny_classifier(classes=1000), tmp_path / "m.onnx")
    PRE.save(tmp_path / "m.preprocessing.json")
    res = onnxstain.stain(tmp_path / "m.onnx", tmp_path / "s.onnx", tmp_path / "s.key",
                          images=smooth_images(96, seed=0), options=StainOptions(seed=2, fpr=0.05))
    assert (res.variant, res.signature_type) == ("non-additive", "class")
    assert any("failed here (no working channel takes the detector)" in n for n in res.notes)
    assert onnxstain.verify(tmp_path / "s.onnx", tmp_path / "s.key").stained
    with pytest.raises(UnsupportedModelError):  # asked for by name, the additive variant is not replaced
        onnxstain.stain(tmp_path / "m.onnx", tmp_path / "t.onnx", tmp_path / "t.key", images=smooth_images(96, seed=0),
                        options=StainOptions(seed=2, fpr=0.05, variant="additive"))
