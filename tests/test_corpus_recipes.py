"""Sanity of every compatibility-corpus recipe (models/corpus.py): the built model loads in
onnxruntime and gives a plausible output on a real photo (or a rendered text line for the OCR models).

The corpus table itself is checked without models (fast); each recipe test is slow-marked and
builds its model into the cache on first use (light recipes), or skips with a message when a heavy
model is not built (``./dev corpus``) or its package is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from corpus_models import corpus_model

from models.corpus import BY_NAME, CORPUS, TASKS

ROUTES = ("TorchScript", "dynamo", "tf2onnx", "paddle2onnx")


# -- the corpus as data (fast) -----------------------------------------------------------------------


def test_corpus_covers_the_issue_13_targets() -> None:
    assert len(CORPUS) >= 12 and len(BY_NAME) == len(CORPUS)
    assert all(e.task in TASKS for e in CORPUS)
    tasks = {e.task for e in CORPUS}
    assert {"classifier", "few-class", "detector", "dense", "transformer"} <= tasks
    for route in ROUTES:
        assert any(route in e.route for e in CORPUS), route
    assert any("fp16" in e.route for e in CORPUS) and any("int8" in e.route for e in CORPUS)
    families = " ".join(e.family for e in CORPUS).lower()
    for fam in ("inverted-residual", "efficientnet", "vgg", "residual"):
        assert fam in families, fam
    assert all(e.licence and e.source for e in CORPUS)
    light = [e for e in CORPUS if not e.heavy]
    assert len(light) >= 12


def test_entry_paths_live_in_the_given_cache(tmp_path: Path) -> None:
    for e in CORPUS:
        p = e.path(tmp_path)
        assert p.suffix == ".onnx" and tmp_path in p.parents
        assert not e.built(tmp_path)


# -- helpers -----------------------------------------------------------------------------------------


def _run(name: str, pixels: np.ndarray) -> list[np.ndarray]:
    """Outputs of the model on uint8 RGB pixels at its input size, through the recorded preprocessing."""
    import onnxruntime as ort

    from onnxstain.preprocess import Preprocessing

    path = corpus_model(name)
    pre = Preprocessing.load(path.with_name(path.name.removesuffix(".onnx") + ".preprocessing.json"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(o, dtype=np.float32)
            for o in session.run(None, {session.get_inputs()[0].name: pre.to_input(pixels)})]


def _pre(name: str):
    from onnxstain.preprocess import Preprocessing

    path = corpus_model(name)
    return Preprocessing.load(path.with_name(path.name.removesuffix(".onnx") + ".preprocessing.json"))


def _photo(name: str):
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def _fit(name: str, image) -> np.ndarray:
    return _pre(name).fit_photo(image)[None]


def _foolbox(prefix: str) -> tuple[list[Path], np.ndarray]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("foolbox (bundled labelled photos) not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = sorted(folder.glob(f"{prefix}_*"))
    return files, np.array([int(f.stem.split("_")[-1]) for f in files])


def _text_line(text: str, size: tuple[int, int], font_px: int, at: tuple[int, int] = (6, 6)) -> np.ndarray:
    """Black text on white, rendered with PIL's bundled font (a stand-in for a scanned text line)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    try:
        font = ImageFont.load_default(size=font_px)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        pytest.skip("Pillow too old for a scalable default font")
    ImageDraw.Draw(img).text(at, text, fill="black", font=font)
    return np.asarray(img)[None]


def _face_crop(size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(_photo("astronaut").crop((170, 50, 270, 170)).resize((size, size), Image.BILINEAR))[None]


def _brick(size: int) -> np.ndarray:
    return np.asarray(_photo("brick").resize((size, size)))[None]


# -- classifiers -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite0_dynamo", "mobilenet_v2_fp16",
                                  "mobilenet_v2_int8"])
def test_imagenet_classifier_top1_on_labelled_photos(name: str) -> None:
    from PIL import Image

    files, labels = _foolbox("imagenet")
    pre = _pre(name)
    px = np.stack([pre.fit_photo(Image.open(f)) for f in files])
    (logits,) = _run(name, px)
    assert logits.shape == (len(files), 1000)
    assert np.mean(logits.argmax(1) == labels) >= 0.75  # EfficientNet-Lite0 17/20, MobileNetV2 fp32 16/20


@pytest.mark.slow
def test_cifar10_cnn_top1_on_labelled_thumbnails() -> None:
    from PIL import Image

    files, labels = _foolbox("cifar10")
    px = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    (scores,) = _run("cifar10_cnn", px)
    assert scores.shape == (len(files), 10)
    assert np.mean(scores.argmax(1) == labels) >= 0.8  # 20/20 measured


# -- few-class ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mtcnn_onet_and_rnet_tell_a_face_from_bricks() -> None:
    onet_face, onet_brick = _run("mtcnn_onet", _face_crop(48))[0], _run("mtcnn_onet", _brick(48))[0]
    assert onet_face.shape == (1, 2) and np.allclose(onet_face.sum(1), 1, atol=1e-5)
    assert onet_face[0, 1] > 0.9 > onet_brick[0, 1]  # 0.995 vs 0.43
    rnet_face, rnet_brick = _run("mtcnn_rnet", _face_crop(24))[0], _run("mtcnn_rnet", _brick(24))[0]
    assert rnet_face[0, 1] > 0.8 and rnet_face[0, 1] > rnet_brick[0, 1]  # 0.875 vs 0.67


@pytest.mark.slow
def test_rapidocr_cls_tells_upright_from_upside_down_text() -> None:
    line = _text_line("Hello 2026", (192, 48), 24)
    upright = _run("rapidocr_cls", line)[0]
    flipped = _run("rapidocr_cls", line[:, ::-1, ::-1].copy())[0]
    assert upright.shape == (1, 2)
    assert upright[0, 0] > 0.9 and flipped[0, 1] > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("name", ["antispoof", "liveness"])
def test_face_binary_classifiers_give_probabilities(name: str) -> None:
    pre = _pre(name)
    out = _run(name, np.concatenate([_face_crop(pre.height), _brick(pre.height)]))[0]
    assert out.shape[0] == 2 and np.all((out >= 0) & (out <= 1))
    assert not np.allclose(out[0], out[1], atol=1e-3)  # the input matters


# -- dense outputs -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_mtcnn_pnet_finds_the_face() -> None:
    prob, box = _run("mtcnn_pnet", _fit("mtcnn_pnet", _photo("astronaut")))
    assert prob.shape[:2] == (1, 2) and box.shape[1] == 4
    face = prob[0, 1]
    assert face.max() > 0.95 and face.mean() < 0.2  # 0.995 peak, 0.027 mean


@pytest.mark.slow
@pytest.mark.parametrize("name", ["craft", "rapidocr_det"])
def test_text_detectors_light_up_on_text_not_on_a_cat(name: str) -> None:
    text = _run(name, _fit(name, _photo("text")))[0]
    cat = _run(name, _fit(name, _photo("chelsea")))[0]
    region = (lambda o: o[..., 0]) if name == "craft" else (lambda o: o[:, 0])
    assert region(text).max() > 0.5 > 0.1 > region(cat).max()  # CRAFT 0.88 vs 0.05, DBNet 0.69 vs 2e-6


@pytest.mark.slow
def test_selfie_segments_the_astronaut() -> None:
    (mask,) = _run("selfie", _fit("selfie", _photo("astronaut")))
    assert mask.shape == (1, 256, 256, 1)
    assert 0.2 < mask.mean() < 0.9 and mask[0, 96:160, 96:160].mean() > 0.5  # 0.54 mean


# -- detectors ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddddocr_det_finds_characters() -> None:
    from PIL import Image

    line = Image.fromarray(_text_line("A7 xK", (416, 416), 90, at=(40, 150))[0])
    (out,) = _run("ddddocr_det", np.asarray(line)[None])
    assert out.shape == (1, 3549, 6)
    score = out[0, :, 4] * out[0, :, 5]
    assert score.max() > 0.5  # 0.86 measured
    (blank,) = _run("ddddocr_det", np.full((1, 416, 416, 3), 255, np.uint8))
    assert (blank[0, :, 4] * blank[0, :, 5]).max() < score.max()


@pytest.mark.slow
def test_nanodet_sees_a_person_in_the_astronaut_photo() -> None:
    outs = _run("nanodet", _fit("nanodet", _photo("astronaut")))
    scores = np.concatenate([o.reshape(-1, 80) for o in outs if o.shape[-1] == 80])
    assert scores.shape[1] == 80
    assert scores[:, 0].max() > 0.5  # COCO class 0, person


# -- transformers ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rapidocr_rec_reads_a_rendered_line() -> None:
    import onnx

    path = corpus_model("rapidocr_rec")
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    chars = ["<blank>", *meta["character"].splitlines(), " "]
    (probs,) = _run("rapidocr_rec", _text_line("Hello 2026", (320, 48), 32))
    assert probs.shape[0] == 1 and probs.shape[2] == len(chars)
    ids = probs[0].argmax(-1)
    text = "".join(chars[i] for j, i in enumerate(ids) if i and (j == 0 or i != ids[j - 1]))
    assert "2026" in text or "hello" in text.lower(), text


@pytest.mark.slow
def test_easyocr_rec_reads_a_rendered_line() -> None:
    """EasyOCR's English recogniser (greyscale input): its 97 classes are the CTC blank, then its character list."""
    chars = "0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ €ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    path = corpus_model("easyocr_rec")
    assert path.is_file()
    (scores,) = _run("easyocr_rec", _text_line("Hello 2026", (256, 64), 40))
    assert scores.shape == (1, 63, len(chars) + 1)
    ids = scores[0].argmax(-1)
    text = "".join(chars[i - 1] for j, i in enumerate(ids) if i and (j == 0 or i != ids[j - 1]))
    assert text == "Hello 2026", text


@pytest.mark.slow
def test_fer_emotion_reads_a_smile() -> None:
    """FER's mini-Xception (Keras weights read with h5py, grey NHWC input): the astronaut's smiling face is happy."""
    from models.fer_emotion import EMOTIONS

    face = _photo("astronaut").crop((170, 40, 330, 200))  # the face, as fer's detector would cut it
    (probs,) = _run("fer_emotion", _fit("fer_emotion", face))
    assert probs.shape == (1, 7) and abs(float(probs.sum()) - 1) < 1e-4
    assert EMOTIONS[int(probs[0].argmax())] == "happy" and probs[0].max() > 0.9


@pytest.mark.slow
def test_img_focus_saliency_map_is_not_flat() -> None:
    (sal,) = _run("img_focus", _fit("img_focus", _photo("astronaut")))
    assert sal.shape == (1, 1, 224, 224)
    assert sal.std() > 0.01
