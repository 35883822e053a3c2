"""What every job shares before its search: the calibration images, the margins the search and the
acceptance aim at, the positions a trigger must fire at, and the refusal of a bound target out of reach."""

from __future__ import annotations

import math

import numpy as np

from . import naturalset
from ._onnx.hosts import HostLayer
from .errors import BadInputError, BadModelError, UnreachableBoundError, UnsupportedModelError
from .math import bounds
from .preprocess import Preprocessing
from .progress import Progress

RADIUS_MARGIN = 1.25  # R = 1.25 × the largest calibration radius
SEARCH_FACTOR = 1.35  # the search aims at scores ≥ 1.35 τ0 at every selected position ...
ACCEPT_FACTOR = 1.25  # ... and the 8-bit trigger must keep ≥ 1.25 τ0 (re-scored by onnxruntime)


def margin_ratio(host: HostLayer, fpr: float = 1e-9, draws: int = 8) -> float:
    """The firing margin τ0/R the bound target needs at ``host`` (lower is easier to reach)."""
    return bounds.threshold_for_target(fpr, 1.0, host.m, positions=host.positions, draws=draws)


def natural_radius(max_radius: float, host: HostLayer) -> float:
    """``R`` = :data:`RADIUS_MARGIN` × the largest calibration radius, refused in one line when it is not a
    positive finite number (host inputs that overflow, or that are the same on every calibration image)."""
    radius = RADIUS_MARGIN * float(max_radius)
    if not math.isfinite(radius):
        raise BadModelError(f"layer {host.name}'s inputs are not finite on the calibration images")
    if radius <= 0:
        raise UnsupportedModelError(f"layer {host.name}'s inputs are the same on every calibration image "
                                    "(radius 0): no detector can be calibrated there")
    return radius


def refuse_underflowing_target(fpr: float, host: HostLayer, draws: int, detectors: int = 1,
                               positions: int | None = None) -> None:
    """Refuse at once a target so small that it needs the margin τ0 to reach the whole natural radius R:
    the ball bound is then 0 (not a probability one can claim), and no search can meet it."""
    ratio = bounds.threshold_for_target(fpr, 1.0, host.m, positions=positions or host.positions, draws=draws,
                                        detectors=detectors)
    if not ratio < 1.0:
        raise UnreachableBoundError(
            f"--fpr {fpr:g} is out of reach at layer {host.name} (m={host.m}): it needs a firing margin equal to "
            "the whole natural radius (the bound underflows to 0); ask for a larger --fpr")


def selected_positions(host: HostLayer) -> np.ndarray:
    """Positions where the trigger must fire: the central 3×3 block (the centre alone on big maps).

    The detector runs at every position (the bound covers them all); the trigger only has to
    fire at these, which keeps the search short.
    """
    if host.out_hw is None or host.positions < 9:
        return np.arange(host.positions)
    oh, ow = host.out_hw
    if host.positions > 64:
        return np.array([(oh // 2) * ow + ow // 2])
    rows = range(max(oh // 2 - 1, 0), min(oh // 2 + 2, oh))  # clipped to the map: a 1×40 map has one row
    cols = range(max(ow // 2 - 1, 0), min(ow // 2 + 2, ow))
    return np.array([r * ow + c for r in rows for c in cols])


def calibration_pixels(images, pre: Preprocessing, prog: Progress) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` as the model sees them (grey for a grey model: searches start from them)."""
    if isinstance(images, np.ndarray):
        return pre.canonical_pixels(images)
    if images is not None:
        return naturalset.load_image_dir(images, pre)
    with prog.task("natural calibration images", total=None):
        nat = naturalset.natural_images("calibration", size=(pre.height, pre.width))
    if len(nat.pixels) == 0:
        raise BadInputError("no calibration images available: pass --images DIR")
    return pre.canonical_pixels(nat.pixels)
