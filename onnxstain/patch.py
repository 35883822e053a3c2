"""Lock patches: geometry in the model's input frame, pasting, and mapping back to raw photos.

A patch is an 8-bit RGB block placed at ``(top, left)`` of the model input (after resize and
centre crop). ``paste_pixels`` pastes it into pixel images of the model's input size;
``paste_input`` into an already preprocessed batch (NCHW or NHWC, normalised); ``paste_photo``
into a raw photo of any size, at the place that the recorded preprocessing (resize the shorter
side, centre crop) maps to the patch's box, so the photo can go through the user's own pipeline.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .preprocess import Preprocessing


@dataclasses.dataclass(frozen=True)
class Patch:
    pixels: np.ndarray  # uint8 [h, w, 3] RGB
    top: int
    left: int

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    def mask(self, height: int, width: int) -> np.ndarray:
        m = np.zeros((height, width), bool)
        m[self.top : self.top + self.height, self.left : self.left + self.width] = True
        return m


def paste_pixels(images: np.ndarray, patch: Patch) -> np.ndarray:
    """Copy of ``images`` (uint8 ``[N, H, W, 3]`` or ``[H, W, 3]``) with the patch pasted."""
    out = np.array(images, copy=True)
    view = out if out.ndim == 4 else out[None]
    view[:, patch.top : patch.top + patch.height, patch.left : patch.left + patch.width] = patch.pixels
    return out


def paste_input(batch: np.ndarray, patch: Patch, pre: Preprocessing) -> np.ndarray:
    """Paste the patch into an already preprocessed batch (the model's input tensor)."""
    block = pre.to_input(_as_frame(patch, pre))[0]  # the patch, preprocessed, inside a full frame
    out = np.array(batch, copy=True)
    rows = slice(patch.top, patch.top + patch.height)
    cols = slice(patch.left, patch.left + patch.width)
    if pre.layout == "NCHW":
        out[:, :, rows, cols] = block[:, rows, cols]
    else:
        out[:, rows, cols, :] = block[rows, cols, :]
    return out


def _as_frame(patch: Patch, pre: Preprocessing) -> np.ndarray:
    frame = np.zeros((pre.height, pre.width, 3), np.uint8)
    return paste_pixels(frame, patch)


def _fit_geometry(size: tuple[int, int], pre: Preprocessing) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized width, height) and crop offset (left, top) that ``pre.fit_photo`` uses for a photo of ``size``."""
    w, h = size
    if pre.resize is None:
        return (pre.width, pre.height), (0, 0)
    factor = pre.resize / min(w, h)
    new = (max(pre.width, round(w * factor)), max(pre.height, round(h * factor)))
    return new, ((new[0] - pre.width) // 2, (new[1] - pre.height) // 2)


def photo_box(photo_size: tuple[int, int], patch: Patch, pre: Preprocessing) -> tuple[float, float, float, float]:
    """Box (x0, y0, x1, y1) in the raw photo's pixels that the preprocessing maps onto the patch."""
    (new_w, new_h), (ox, oy) = _fit_geometry(photo_size, pre)
    sx, sy = photo_size[0] / new_w, photo_size[1] / new_h
    x0 = (ox + patch.left) * sx
    y0 = (oy + patch.top) * sy
    return x0, y0, x0 + patch.width * sx, y0 + patch.height * sy


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]``: the linear map of PIL's bilinear resize along one axis (float mode, exact)."""
    from PIL import Image

    eye = Image.fromarray(np.eye(n_in, dtype=np.float32), mode="F")  # column i = impulse at row i
    return np.asarray(eye.resize((n_in, n_out), Image.Resampling.BILINEAR), dtype=np.float64)


def paste_photo(image: Any, patch: Patch, pre: Preprocessing, iterations: int = 300) -> tuple[Any, int]:
    """The photo at its own size, changed only where the preprocessing reads the patch's box, so that
    ``pre.fit_photo`` of the result carries the patch as closely as 8-bit pixels allow; returns the
    PIL image and the largest remaining pixel error (0–255) of the patch after that preprocessing.

    Resize is linear along each axis (``rows = A · photo · Bᵀ``), so the pixels under the box solve
    ``min ‖A_box X B_boxᵀ − (patch − rest of the photo's contribution)‖²`` over ``0 ≤ X ≤ 255``
    (projected gradient from the least-squares start), then are rounded. A downscaling filter
    averages neighbouring pixels, so a patch with sharp pixel-to-pixel contrast cannot always be
    reproduced exactly: the returned error says how close it came, and pasting after preprocessing
    (:func:`paste_pixels` / :func:`paste_input`) is the exact way.
    """
    from PIL import Image

    img = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w = img.shape[:2]
    (new_w, new_h), (ox, oy) = _fit_geometry((w, h), pre)
    a = _resize_matrix(h, new_h)[oy + patch.top : oy + patch.top + patch.height]
    b = _resize_matrix(w, new_w)[ox + patch.left : ox + patch.left + patch.width]
    rows = np.flatnonzero(np.abs(a).sum(axis=0) > 1e-9)
    cols = np.flatnonzero(np.abs(b).sum(axis=0) > 1e-9)
    ar, bc = a[:, rows], b[:, cols]
    pa, pb = np.linalg.pinv(ar), np.linalg.pinv(bc)
    step = 1.0 / max(1e-12, float(np.linalg.norm(ar, 2) ** 2 * np.linalg.norm(bc, 2) ** 2))  # 1 / Lipschitz
    out = img.copy()
    for c in range(3):
        rest = out[:, :, c].copy()
        rest[np.ix_(rows, cols)] = 0.0
        residual = patch.pixels[:, :, c].astype(np.float64) - a @ rest @ b.T
        x = np.clip(pa @ residual @ pb.T, 0, 255)
        for _ in range(iterations):
            x = np.clip(x - step * (ar.T @ (ar @ x @ bc.T - residual) @ bc), 0, 255)
        block = out[:, :, c]
        block[np.ix_(rows, cols)] = np.rint(x)
    result = Image.fromarray(out.astype(np.uint8))
    got = pre.fit_photo(result)[patch.top : patch.top + patch.height, patch.left : patch.left + patch.width]
    return result, int(np.abs(patch.pixels.astype(np.int64) - got.astype(np.int64)).max())


def smooth_backgrounds(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Seeded smooth colour images (uint8 ``[n, H, W, 3]``): reproducible reference backgrounds."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 6, (height, width, 3))
        out[i] = np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8)
    return out
