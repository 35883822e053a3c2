"""The lock's patch search: one draw → patch → 8-bit score → accept loop (:func:`run_search`) with a
strategy per kind of host.

* :class:`ClassifierPatches` — ``d`` random directions (the gate's AND: all must fire at the lock
  position); a pixel window's patch is the box corner (closed form), a Conv host's comes from gradient
  ascent over the patch's pixels; then the occlusion-aware refinement (:meth:`ClassifierPatches.refine`).
* :class:`DensePatches` — one direction; a host reading the normalised image has a closed-form patch
  (:func:`onnxstain.math.trigger.box_maximiser`), else gradient ascent.

The margin τ0 is fixed before any direction is drawn. The 8-bit patch is re-scored on the host's input as
the model computes it: since the patch alone decides the detectors' input at the lock position, that score
is what every patched image gives, so a small safety factor is enough (a stain's trigger is a whole image
that must survive its own PNG round trip, hence the stainer's larger factors), and the gate's 4× gain keeps
it saturated for a patch slightly off (a resampled raw photo).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np

from .._onnx.hosts import HostLayer
from .._onnx.inputs import image_input
from ..errors import UnreachableBoundError, UnsupportedModelError
from ..math import detector
from ..math.trigger import ascend, box_maximiser, quantise, refine_occlusion
from ..patch import Patch, paste_pixels
from ..preprocess import Preprocessing
from ..progress import Task
from ..runtime import session, with_outputs
from ..scoring import detector_scores, model_logits
from .calibration import ClassifierCalibration, DenseCalibration, HostPhi
from .job import LockJob
from .site import LockSite
from .types import PatchFound
from .window import corner_patch

ACCEPT_FACTOR = 1.03
SEARCH_FACTOR = 1.06
# When no draw reaches ACCEPT_FACTOR, the best patch is kept if it clears this: it opens the lock
# exactly as given (pasted after the preprocessing), with less slack for resampled raw photos. (In a
# 10-seed run, 2 seeds ended at 1.017–1.021 τ0 after 32 draws and were refused before this.)
FALLBACK_FACTOR = 1.005
# How far a small patch can drive a random direction varies a lot: on MobileNetV2 about one direction
# in five reaches the 1e-6 margin, and a hopeless one shows early (at step 100 the ones that make it
# are past 90 % of the target, hopeless ones near 55 %): give those up and draw again.
ABANDON_STEP = 100
ABANDON_FRACTION = 0.75
OCCLUSION_IMAGES = 256  # calibration images the occlusion-aware refinement weighs


@dataclasses.dataclass
class Candidate:
    """One draw's patch: directions ``[d, m]``, the frame it was cut from, its scores ``[d]`` and the
    directions' natural scores."""

    dirs: np.ndarray
    frame: np.ndarray
    patch: Patch
    scores: np.ndarray
    natural: np.ndarray


@dataclasses.dataclass
class SearchOutcome:
    best: Candidate | None  # the strongest patch of all draws (by its weakest detector)
    reached: float  # its weakest detector's score (-inf when no draw got that far)
    accepted: bool  # whether ``best`` reached the acceptance score
    draws: int
    steps: int


class PatchStrategy(Protocol):
    """How one kind of lock draws, makes and scores its patch."""

    detectors: int
    m: int

    def natural(self, dirs: np.ndarray) -> np.ndarray: ...
    def fires(self, natural: np.ndarray, draw: int) -> str | None: ...
    def make(self, dirs: np.ndarray, draw: int, task: Task) -> tuple[Patch, np.ndarray, int]: ...
    def score(self, dirs: np.ndarray, patch: Patch) -> np.ndarray: ...
    def short(self, draw: int, scores: np.ndarray) -> str: ...


def run_search(strategy: PatchStrategy, rng: np.random.Generator, accept: float, max_draws: int,
               notes: list[str], task: Task) -> SearchOutcome:
    """Draw directions until a patch's weakest 8-bit score reaches ``accept``: a draw whose directions fire
    together on a calibration image is rejected, and a patch that falls short is noted and drawn again."""
    best, reached, steps, draws = None, -np.inf, 0, 0
    for draw in range(1, max_draws + 1):
        draws = draw
        dirs = np.stack([detector.sample_direction(rng, strategy.m) for _ in range(strategy.detectors)])
        natural = strategy.natural(dirs)
        if (why := strategy.fires(natural, draw)) is not None:
            notes.append(why)
            continue
        patch, frame, n = strategy.make(dirs, draw, task)
        steps += n
        scores = strategy.score(dirs, patch)
        if float(scores.min()) > reached:
            reached, best = float(scores.min()), Candidate(dirs, frame, patch, scores, natural)
        if float(scores.min()) < accept:
            notes.append(strategy.short(draw, scores))
            continue
        return SearchOutcome(best, reached, True, draws, steps)
    return SearchOutcome(best, reached, False, draws, steps)


class ClassifierPatches:
    """Patches for a classifier's or a detector's lock on a pixel window or a Conv host."""

    def __init__(self, job: LockJob, site: LockSite, cal: ClassifierCalibration, prefix: Any) -> None:
        self.job, self.site, self.cal, self.prefix = job, site, cal, prefix
        self.detectors, self.m = job.opts.detectors, site.host.m
        self.mask = site.mask(job.pre.height, job.pre.width)
        self.grey = np.full((job.pre.height, job.pre.width, 3), 127.0)

    def natural(self, dirs: np.ndarray) -> np.ndarray:
        """``[N, d, P]``."""
        return (np.einsum("npm,dm->ndp", self.cal.phi_all.astype(np.float64), dirs)
                - (dirs @ self.cal.stats.centre)[None, :, None])

    def fires(self, natural: np.ndarray, draw: int) -> str | None:
        if bool((natural > self.cal.tau0).all(axis=1).any()):
            return f"draw {draw}: all {self.detectors} detectors fire together on a calibration image; rejected"
        return None

    def make(self, dirs: np.ndarray, draw: int, task: Task) -> tuple[Patch, np.ndarray, int]:
        if self.cal.probe is not None:
            # Closed form: the box corner of the directions' sum (exact for one detector).
            patch = corner_patch(dirs.sum(axis=0), self.cal.probe)
            return patch, paste_pixels(self.grey.astype(np.uint8), patch), 0
        target = SEARCH_FACTOR * self.cal.tau0
        init = self.grey + self.job.rng.normal(0, 8, self.grey.shape) * self.mask[..., None]
        fn = detector_scores(self.prefix, self.site.host, self.job.pre, dirs, self.cal.stats.centre, 0,
                             np.array([self.site.pos_index]))

        def report(step: int, smin: float) -> None:
            task.update(f"patch search (draw {draw}): step {step}, weakest detector {smin:.2f} / {target:.2f}")

        res = ascend(fn, np.clip(init, 0, 255), score_target=target, accept=lambda *_: True,
                     max_steps=self.job.opts.max_steps, free_mask=self.mask, radius_weight=0.0, progress=report,
                     abandon=(ABANDON_STEP, ABANDON_FRACTION * target))
        frame = self.job.pre.canonical_pixels(quantise(res.pixels))
        top, left, ph, pw = self.site.box
        return Patch(frame[top : top + ph, left : left + pw].copy(), top, left), frame, res.steps

    def score(self, dirs: np.ndarray, patch: Patch) -> np.ndarray:
        """``[d]`` at the lock position, on the host's input as the model computes it."""
        phi_t = self.cal.host_phi(paste_pixels(self.grey.astype(np.uint8), patch)[None])[0]
        return phi_t[self.site.pos_index].astype(np.float64) @ dirs.T - dirs @ self.cal.stats.centre

    def short(self, draw: int, scores: np.ndarray) -> str:
        return (f"draw {draw}: the 8-bit patch reached {scores.min():.3g} < {ACCEPT_FACTOR} τ0 = "
                f"{ACCEPT_FACTOR * self.cal.tau0:.3g}; resampled")

    def unreachable(self, reached: float) -> UnreachableBoundError:
        tau0, opts = self.cal.tau0, self.job.opts
        return UnreachableBoundError(
            f"no patch reached the margin needed for --fpr {opts.fpr:g} with {self.detectors} detector(s) at layer "
            f"{self.site.host.name} within {opts.max_draws} draws: it needs a score of {FALLBACK_FACTOR * tau0:.3g} "
            f"(τ0/R = {tau0 / self.cal.radius:.2f}), "
            f"the best patch reached {reached:.3g}; use more --detectors, a deeper --layer "
            "(larger patch) or a larger --fpr")

    def refine(self, best: Candidate, floor: float) -> tuple[Patch, np.ndarray, dict[str, float]] | None:
        """Occlusion-aware refinement of an accepted patch; ``(patch, scores, summary)``, or None if its 8-bit
        version scores below ``floor`` (what the plain patch was accepted at, up to ACCEPT_FACTOR τ0)."""
        from ..torchprefix import prefix_for_input  # torch, imported lazily

        job, cal, site = self.job, self.cal, self.site
        assert job.head is not None
        full = prefix_for_input(cal.base, [job.head.scores], job.pre.input_shape(), job.opts.providers)
        fn = detector_scores(self.prefix, site.host, job.pre, best.dirs, cal.stats.centre, 0,
                             np.array([site.pos_index]))
        pick = job.rng.permutation(len(cal.pixels))[: min(len(cal.pixels), OCCLUSION_IMAGES)]
        with job.prog.task("occlusion-aware patch", total=job.opts.occlusion_steps) as task:
            def report(step: int, smin: float, kl: float) -> None:
                task.update(f"occlusion-aware patch: step {step}, KL {kl:.3g}, weakest detector {smin:.2f}")
                task.advance(1)

            # KL per step of a sequence head (its rows are (steps, classes)), over the classes otherwise
            logits = model_logits(full, job.pre, image_input(cal.base).batch)
            row = cal.nat_scores.shape[1]
            k = job.head.classes if row % job.head.classes == 0 else row
            res = refine_occlusion(fn, lambda px: logits(px).reshape(len(px), -1, k), best.frame.astype(np.float64),
                                   cal.pixels[pick], cal.nat_scores[pick].reshape(len(pick), -1, k), self.mask,
                                   SEARCH_FACTOR * cal.tau0,
                                   steps=job.opts.occlusion_steps, lr=job.opts.occlusion_lr,
                                   seed=int(job.rng.integers(2**31)), progress=report)
        refined = job.pre.canonical_pixels(quantise(res.pixels))
        top, left, ph, pw = site.box
        patch = Patch(refined[top : top + ph, left : left + pw].copy(), top, left)
        scores = self.score(best.dirs, patch)
        if float(scores.min()) < floor:
            return None
        return patch, scores, {"steps": res.steps, "kl_start": res.kl_start, "kl_end": res.kl_end}


def search_classifier(job: LockJob, site: LockSite, cal: ClassifierCalibration) -> PatchFound:
    """The classifier's (or detector's) patch: the search, the fallback to the strongest patch, then the
    occlusion-aware refinement."""
    import torch

    from ..torchprefix import prefix_for_input

    torch.manual_seed(job.seed % (2**31))
    prefix = prefix_for_input(cal.base, [site.host.input], job.pre.input_shape(), job.opts.providers)
    patches = ClassifierPatches(job, site, cal, prefix)
    tau0, notes = cal.tau0, job.notes
    with job.prog.task("patch search", total=None) as task:
        out = run_search(patches, job.rng, ACCEPT_FACTOR * tau0, job.opts.max_draws, notes, task)
        if not out.accepted and out.best is not None and out.reached >= FALLBACK_FACTOR * tau0:
            notes.append(f"no draw reached {ACCEPT_FACTOR} τ0; kept the strongest patch "
                         f"({out.reached / tau0:.3f} τ0): it opens the lock exactly when pasted as given, with less "
                         "slack for resampled raw photos")
        elif not out.accepted or out.best is None:
            raise patches.unreachable(out.reached)
    best = out.best
    found = PatchFound(best.dirs, best.patch, best.scores, best.natural, out.draws, out.steps)
    floor = min(ACCEPT_FACTOR, out.reached / tau0) * tau0
    assert job.head is not None
    if job.opts.occlusion_steps > 0 and job.head.detection:
        notes.append("occlusion-aware refinement skipped: it weighs classifier scores, not a detector's")
    elif job.opts.occlusion_steps > 0:
        try:
            refined = patches.refine(best, floor)
        except UnsupportedModelError as exc:  # the torch translation of the model up to its scores
            notes.append(f"occlusion-aware refinement skipped ({exc}); kept the plain patch")
        else:
            if refined is not None:
                found.patch, found.scores, found.occlusion = refined
            else:
                notes.append("the occlusion-aware patch fell below the margin after 8-bit rounding; "
                             "kept the plain patch")
    return found


class DensePatches:
    """Patches for a dense-output model's lock: one direction, at the lock position only."""

    detectors = 1

    def __init__(self, job: LockJob, site: LockSite, cal: DenseCalibration) -> None:
        self.job, self.site, self.cal, self.m = job, site, cal, site.host.m
        self.grey = np.full((job.pre.height, job.pre.width, 3), 127, np.uint8)
        tap = session(with_outputs(job.loaded.model, [site.host.input]), job.opts.providers)
        self.host_phi = HostPhi(site.host, job.pre, tap)

    def natural(self, dirs: np.ndarray) -> np.ndarray:
        """``[N, 1]``: the detector's one position."""
        return detector.scores(self.cal.at_lock, dirs[0], self.cal.stats.centre)[:, None]

    def fires(self, natural: np.ndarray, draw: int) -> str | None:
        if float(natural.max()) > self.cal.tau0:
            return f"draw {draw}: the detector fires on a calibration image; rejected"
        return None

    def make(self, dirs: np.ndarray, draw: int, task: Task) -> tuple[Patch, np.ndarray, int]:
        if self.cal.pixel_host:
            patch = closed_form_patch(dirs[0], self.site.host, self.job.pre, self.site.box)
            return patch, paste_pixels(self.grey, patch), 0
        return self._ascend(dirs[0])

    def _ascend(self, v: np.ndarray) -> tuple[Patch, np.ndarray, int]:
        """Gradient ascent over the patch's pixels (host input not the image itself); (patch, frame, steps)."""
        import torch

        from ..torchprefix import prefix_for_input

        job, site = self.job, self.site
        torch.manual_seed(int(job.opts.seed or 0) % (2**31))
        prefix = prefix_for_input(job.loaded.model, [site.host.input], job.pre.input_shape(), job.opts.providers)
        fn = detector_scores(prefix, site.host, job.pre, v[None], self.cal.stats.centre, 0, np.array([site.pos_index]))
        res = ascend(fn, self.grey.astype(np.float64), score_target=SEARCH_FACTOR * self.cal.tau0,
                     accept=lambda *_: True, max_steps=job.opts.max_steps, free_mask=site.mask(*self.grey.shape[:2]),
                     radius_weight=0.0)
        frame = job.pre.canonical_pixels(quantise(res.pixels))
        top, left, ph, pw = site.box
        return Patch(frame[top : top + ph, left : left + pw].copy(), top, left), frame, res.steps

    def score(self, dirs: np.ndarray, patch: Patch) -> np.ndarray:
        phi_t = self.host_phi(paste_pixels(self.grey, patch))[0]
        return np.array([float(detector.scores(phi_t[self.site.pos_index], dirs[0], self.cal.stats.centre))])

    def short(self, draw: int, scores: np.ndarray) -> str:
        return f"draw {draw}: the patch reaches {float(scores[0]):.3g} < {ACCEPT_FACTOR} τ0; resampled"


def search_dense(job: LockJob, site: LockSite, cal: DenseCalibration) -> PatchFound:
    """The dense-output lock's patch (no fallback, no refinement)."""
    with job.prog.task("patch search", total=None) as task:
        out = run_search(DensePatches(job, site, cal), job.rng, ACCEPT_FACTOR * cal.tau0, job.opts.max_draws,
                         job.notes, task)
    if not out.accepted or out.best is None:
        raise UnreachableBoundError(
            f"no patch reached the margin needed for --fpr {job.opts.fpr:g} at layer {site.host.name}: it needs "
            f"{ACCEPT_FACTOR * cal.tau0:.3g} (τ0/R = {cal.tau0 / cal.radius:.2f}), the best reached "
            f"{out.reached:.3g}; use a larger --fpr")
    best = out.best
    return PatchFound(best.dirs, best.patch, best.scores, best.natural, out.draws, out.steps)


def closed_form_patch(v: np.ndarray, host: HostLayer, pre: Preprocessing, box: tuple[int, int, int, int]) -> Patch:
    """8-bit patch maximising ``v · φ`` at the lock position, for a host reading normalised pixels (NCHW)."""
    top, left, ph, pw = box
    kh, kw = host.kernel
    w = v.reshape(host.in_channels, kh, kw)[:, :ph, :pw]  # model channel order; the scale per channel is > 0
    if pre.channel_order == "BGR":
        w = w[::-1]
    lo, hi = np.zeros_like(w), np.full_like(w, 255.0)
    pixels = box_maximiser(w, lo, hi).transpose(1, 2, 0).astype(np.uint8)  # [ph, pw, channels]
    return Patch(np.broadcast_to(pixels, (ph, pw, 3)).copy(), top, left)  # a grey model's: grey pixels
