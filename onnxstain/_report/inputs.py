"""What an evaluation runs on: the natural images (a folder, an array, or the built-in held-out photos
with their seeded views, and what they allow statistically), and the scores output a key names."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import naturalset
from .._onnx.graph import GraphView
from ..errors import BadInputError, KeyMismatchError
from ..preprocess import Preprocessing
from ..progress import Progress
from .records import ImageSetInfo


def scores_output(view: GraphView, wanted: str, which: str) -> str:
    """The output the key's scores name, or the model's only output (a renamed one), else a one-line refusal."""
    if wanted in view.output_names:
        return wanted
    if len(view.output_names) == 1:
        return view.output_names[0]
    raise KeyMismatchError(f"the {which} model has no output {wanted!r} the key expects")


def evaluation_images(images: str | Path | np.ndarray | None, pre: Preprocessing, views: int,
            prog: Progress) -> tuple[np.ndarray, np.ndarray, list[str], ImageSetInfo, np.ndarray]:
    """Pixels, the photo index of every image, a name for every image, the description of the set, and
    the view index of every image (0: the centre crop of a built-in photo, or an image given as is)."""
    if isinstance(images, np.ndarray):
        pixels = images
        if pixels.ndim != 4 or pixels.shape[1:] != (pre.height, pre.width, 3):
            raise BadInputError(f"images must be uint8 [N, {pre.height}, {pre.width}, 3], not {pixels.shape}")
        source, v = "array given by the caller", 1
        photo_of = np.arange(len(pixels))
        names = [f"image {i}" for i in range(len(pixels))]
        view_of = np.zeros(len(pixels), np.int64)
    elif images is not None:
        pixels = naturalset.load_image_dir(images, pre)
        source, v = f"folder {images}", 1
        photo_of = np.arange(len(pixels))
        names = [f"image {i} of the folder" for i in range(len(pixels))]
        view_of = np.zeros(len(pixels), np.int64)
    else:
        with prog.task(f"natural images (held-out photos × {views} views)", total=None):
            nat = naturalset.natural_images("heldout", size=(pre.height, pre.width), views=views)
        if len(nat) == 0:
            raise BadInputError("no held-out natural photos are available on this machine: pass --images DIR")
        pixels = nat.pixels
        _, photo_of = np.unique(np.asarray(nat.photo_ids, dtype=str), return_inverse=True)
        names = [f"{pid} (view {int(k)})" for pid, k in zip(nat.photo_ids, nat.views, strict=True)]
        view_of = np.asarray(nat.views, dtype=np.int64)
        source = "built-in natural photos, held-out split (disjoint from the calibration photos of `stain`)"
        v = views
    n = len(pixels)
    if n == 0:
        raise BadInputError("no images to evaluate on")
    photos = len(np.unique(photo_of))
    if photos < n:
        corr = (f"The {n} images are {v} views of each of {photos} distinct photos. Views of one photo are "
                f"strongly correlated, so statements that treat the images as independent samples are "
                f"optimistic: the number of independent photos ({photos}) is what limits statistical "
                f"statements, and the photo-level bounds are the ones that respect it.")
    else:
        corr = (f"The {n} images are treated as {photos} independent photos; near-duplicates among them would "
                f"make the data-driven statements optimistic.")
    info = ImageSetInfo(source=source, images=n, photos=photos, views_per_photo=v, height=pre.height,
                        width=pre.width, correlation=corr)
    return pixels, np.asarray(photo_of, dtype=np.int64), names, info, view_of
