"""The MobileNetV2 recipe builds a valid, accurate ONNX model with its preprocessing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxstain.naturalset import labelled_imagenet
from onnxstain.preprocess import Preprocessing

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def session(mobilenet_v2: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(mobilenet_v2), providers=["CPUExecutionProvider"])


def test_graph(mobilenet_v2: Path) -> None:
    onnx.checker.check_model(str(mobilenet_v2))
    model = onnx.load(str(mobilenet_v2))
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["Conv"] == 52
    assert ops["Gemm"] == 1
    assert ops["Clip"] == 35
    assert "BatchNormalization" not in ops
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (inp,) = model.graph.input
    assert inp.name == "input"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 224, 224]
    assert model.graph.output[0].name == "logits"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("batch", [1, 5])
def test_runs_with_any_batch(session: ort.InferenceSession, batch: int) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    (logits,) = session.run(["logits"], {"input": x})
    assert logits.shape == (batch, 1000) and np.isfinite(logits).all()


def test_top1_on_labelled_imagenet(
    session: ort.InferenceSession, mobilenet_v2_preprocessing: Preprocessing
) -> None:
    try:
        pixels, labels = labelled_imagenet(
            (mobilenet_v2_preprocessing.height, mobilenet_v2_preprocessing.width)
        )
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    (logits,) = session.run(["logits"], {"input": mobilenet_v2_preprocessing.to_input(pixels)})
    correct = int((logits.argmax(1) == labels).sum())
    assert correct >= 17, f"top-1 {correct}/20"
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert int((top5 == labels[:, None]).any(1).sum()) >= 19


def test_preprocessing_json(
    mobilenet_v2: Path, mobilenet_v2_preprocessing: Preprocessing, tmp_path: Path
) -> None:
    assert mobilenet_v2_preprocessing == Preprocessing()
    copy = tmp_path / "pre.json"
    mobilenet_v2_preprocessing.save(copy)
    assert Preprocessing.load(copy) == mobilenet_v2_preprocessing


def test_build_is_cached(mobilenet_v2: Path) -> None:
    from models import mobilenet_v2 as recipe

    before = mobilenet_v2.stat().st_mtime_ns
    assert recipe.build() == mobilenet_v2
    assert mobilenet_v2.stat().st_mtime_ns == before


def test_state_dict_keys_match_the_checkpoint() -> None:
    torch = pytest.importorskip("torch")
    from models import mobilenet_v2 as recipe

    path = recipe.weights_path()
    if path is None:
        pytest.skip("weights not installed")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert list(recipe.MobileNetV2().state_dict()) == list(checkpoint)


def test_rebuilds_when_the_weights_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import shutil

    from models import mobilenet_v2 as recipe

    source = recipe.weights_path()
    if source is None:
        pytest.skip("weights not installed")
    weights = tmp_path / "weights.pth"
    shutil.copyfile(source, weights)
    monkeypatch.setattr(recipe, "weights_path", lambda: weights)
    out = recipe.build(tmp_path / "cache")
    assert out == tmp_path / "cache" / "models" / "mobilenet_v2" / "mobilenet_v2.onnx"
    assert recipe.preprocessing_path(out).is_file()
    first = out.stat().st_mtime_ns
    assert recipe.build(tmp_path / "cache").stat().st_mtime_ns == first  # up to date: no work
    later = first + 10**9
    os.utime(weights, ns=(later, later))  # newer weights → rebuild
    assert recipe.build(tmp_path / "cache").stat().st_mtime_ns != first
    assert not list(out.parent.glob("*.tmp"))
