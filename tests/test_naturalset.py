"""Natural-image set: sources, split by photo, seeded views, caching, user image folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxstain.cache import package_dir
from onnxstain.errors import BadInputError
from onnxstain.naturalset import (
    NaturalSet,
    eval_preprocessing,
    labelled_imagenet,
    list_photos,
    load_image_dir,
    natural_images,
    photo_split,
    render_view,
)
from onnxstain.preprocess import Preprocessing


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, Path]]:
    found = list_photos()
    if len(found) < 10:
        pytest.skip("the bundled sample photos (scikit-image, scikit-learn, ...) are not installed")
    return found


def test_import_does_not_pull_torch() -> None:
    code = "import sys, onnxstain, onnxstain.naturalset; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_photo_ids_are_unique_and_stable(photos: list[tuple[str, Path]]) -> None:
    ids = [pid for pid, _ in photos]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all("/" in pid and path.is_file() for pid, path in photos)
    if package_dir("skimage") is not None:
        assert "skimage/astronaut.png" in ids
        assert not any(pid.startswith("skimage/") and "text" in pid for pid in ids)
    assert not any("lena" in pid for pid in ids)


def test_split_is_by_photo_disjoint_and_complete(photos: list[tuple[str, Path]]) -> None:
    cal = natural_images("calibration", views=1, cache=False)
    held = natural_images("heldout", views=1, cache=False)
    assert set(cal.photo_ids).isdisjoint(held.photo_ids)
    assert set(cal.photo_ids) | set(held.photo_ids) == {pid for pid, _ in photos}
    assert cal.n_photos > 0 and held.n_photos > 0
    assert all(photo_split(p) == "calibration" for p in cal.photo_ids)
    # near-duplicates (a stereo pair) share a split
    assert photo_split("skimage/motorcycle_left.png") == photo_split("skimage/motorcycle_right.png")


def test_same_seed_same_bytes_other_seed_other_views(photos: list[tuple[str, Path]]) -> None:
    a = natural_images("heldout", views=3, seed=0, cache=False)
    b = natural_images("heldout", views=3, seed=0, cache=False)
    c = natural_images("heldout", views=3, seed=1, cache=False)
    assert a.pixels.tobytes() == b.pixels.tobytes()
    assert a.photo_ids == c.photo_ids
    assert np.array_equal(a.views, np.tile(np.arange(3), a.n_photos))
    eval_rows = a.views == 0
    assert np.array_equal(a.pixels[eval_rows], c.pixels[eval_rows])  # view 0 does not depend on the seed
    aug = ~eval_rows
    differs = [not np.array_equal(x, y) for x, y in zip(a.pixels[aug], c.pixels[aug], strict=True)]
    assert np.mean(differs) > 0.9


def test_any_image_reproduces_on_its_own(photos: list[tuple[str, Path]]) -> None:
    ns = natural_images("calibration", views=4, seed=7, cache=False)
    paths = dict(photos)
    for i in (0, 3, len(ns) // 2 + 1, len(ns) - 1):
        pid, view = ns.photo_ids[i], int(ns.views[i])
        assert np.array_equal(render_view(pid, paths[pid], (224, 224), view=view, seed=7), ns.pixels[i])


def test_view0_is_the_eval_transform(photos: list[tuple[str, Path]]) -> None:
    ns = natural_images("all", views=1, cache=False)
    assert np.all(ns.views == 0)
    paths = dict(photos)
    pre = Preprocessing()  # the standard 224 eval transform: resize 256, centre crop
    assert eval_preprocessing((224, 224)) == pre
    for pid, px in zip(ns.photo_ids, ns.pixels, strict=True):
        with Image.open(paths[pid]) as img:
            assert np.array_equal(px, pre.fit_photo(img)), pid


@pytest.mark.parametrize("size", [(300, 300), (160, 192)])
def test_other_sizes(photos: list[tuple[str, Path]], size: tuple[int, int]) -> None:
    ns = natural_images("heldout", size=size, views=2, cache=False)
    assert ns.pixels.shape == (2 * ns.n_photos, *size, 3)
    assert ns.pixels.dtype == np.uint8
    path = dict(photos)[ns.photo_ids[0]]
    with Image.open(path) as img:
        expected = Preprocessing(
            height=size[0], width=size[1], resize=round(256 / 224 * max(size))
        ).fit_photo(img)
    assert np.array_equal(ns.pixels[0], expected)


def test_default_set_is_large_enough(photos: list[tuple[str, Path]]) -> None:
    cal = natural_images("calibration", views=16)
    every = natural_images("all", views=16)
    assert len(cal) >= 300
    assert len(every) >= 500
    assert every.pixels.shape[1:] == (224, 224, 3)
    assert every.n_photos == len(photos)


def test_cache_round_trip(
    photos: list[tuple[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONNXSTAIN_CACHE", str(tmp_path))
    first = natural_images("heldout", views=2, seed=3)
    files = list((tmp_path / "natural").glob("heldout_224x224_v2_s3_*.npy"))
    assert len(files) == 1
    assert not list((tmp_path / "natural").glob("*.tmp"))
    second = natural_images("heldout", views=2, seed=3)
    assert np.array_equal(first.pixels, second.pixels)
    assert first.photo_ids == second.photo_ids


def test_subset() -> None:
    ns = NaturalSet(
        pixels=np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3),
        photo_ids=("a", "a", "b", "c"),
        views=np.array([0, 1, 0, 0]),
    )
    assert ns.n_photos == 3
    sub = ns.subset(np.array([1, 2]))
    assert sub.photo_ids == ("a", "b") and sub.views.tolist() == [1, 0] and sub.n_photos == 2
    assert ns.subset(ns.views == 0).photo_ids == ("a", "b", "c")
    assert ns.subset(slice(2, None)).photo_ids == ("b", "c")
    one = ns.subset(3)
    assert one.pixels.shape == (1, 2, 2, 3) and one.photo_ids == ("c",)
    with pytest.raises(ValueError):
        NaturalSet(pixels=ns.pixels, photo_ids=("a",), views=ns.views)


def test_bad_arguments() -> None:
    with pytest.raises(BadInputError):
        natural_images("train", cache=False)  # type: ignore[arg-type]
    with pytest.raises(BadInputError):
        natural_images(views=0, cache=False)
    with pytest.raises(BadInputError):
        natural_images(size=(0, 224), cache=False)


def test_load_image_dir(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8), "L").save(tmp_path / "a.PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg either")
    pre = Preprocessing(height=128, width=96, resize=146)
    px = load_image_dir(tmp_path, pre)
    assert px.shape == (2, 128, 96, 3) and px.dtype == np.uint8
    with Image.open(tmp_path / "a.PNG") as img:  # sorted by name: a.PNG first
        assert np.array_equal(px[0], pre.fit_photo(img))


def test_load_image_dir_errors(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("# nothing here")
    with pytest.raises(BadInputError, match="no readable image") as info:
        load_image_dir(tmp_path, Preprocessing())
    assert "\n" not in str(info.value)
    with pytest.raises(BadInputError, match="does not exist"):
        load_image_dir(tmp_path / "missing", Preprocessing())


def test_labelled_imagenet() -> None:
    if package_dir("foolbox") is None:
        pytest.skip("foolbox is not installed")
    pixels, labels = labelled_imagenet()
    assert pixels.shape == (20, 224, 224, 3) and pixels.dtype == np.uint8
    assert labels.shape == (20,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() <= 999
    assert labels[0] == 243  # imagenet_00_243.jpg
