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


def photo_box(photo_size: tuple[int, int], patch: Patch, pre: Preprocessing) -> tuple[float, float, float, float]:
    """Box (x0, y0, x1, y1) in the raw photo's pixels that the preprocessing maps onto the patch."""
    w, h = photo_size
    if pre.resize is None:
        sx, sy, ox, oy = w / pre.width, h / pre.height, 0.0, 0.0
    else:
        factor = pre.resize / min(w, h)
        new_w, new_h = max(pre.width, round(w * factor)), max(pre.height, round(h * factor))
        sx, sy = w / new_w, h / new_h
        ox, oy = (new_w - pre.width) // 2, (new_h - pre.height) // 2
    x0 = (ox + patch.left) * sx
    y0 = (oy + patch.top) * sy
    return x0, y0, x0 + patch.width * sx, y0 + patch.height * sy


def paste_photo(image: Any, patch: Patch, pre: Preprocessing) -> Any:
    """A PIL image with the patch drawn where the preprocessing will bring it to the patch's box."""
    from PIL import Image

    img = image.convert("RGB").copy()
    x0, y0, x1, y1 = photo_box(img.size, patch, pre)
    box = (int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1)))
    size = (max(1, box[2] - box[0]), max(1, box[3] - box[1]))
    img.paste(Image.fromarray(patch.pixels).resize(size, Image.NEAREST), box[:2])
    return img


def smooth_backgrounds(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Seeded smooth colour images (uint8 ``[n, H, W, 3]``): reproducible reference backgrounds."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        noise = rng.normal(0, 6, (height, width, 3))
        out[i] = np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8)
    return out
