"""Locking a model with a dense output (e.g. a ViT saliency model): corner-patch detector, feature gate.

:class:`DenseLock` holds the stages :func:`onnxstain._lock.pipeline.lock` runs when the model has no classifier
head but one map output.

* **detector** — on the input of an early Conv whose corner position sees a small patch of pixels
  (a ViT's patch embedding: one 14×14 token, ``m = 3·14·14 = 588``). When that input is the
  (normalised) image itself, ``S = v · (φ − c)`` is linear in the patch's pixels and its maximum over
  8-bit pixels has a closed form: 255 where ``v`` (times the positive normalisation scale) is
  positive, 0 elsewhere (:func:`onnxstain._lock.search.closed_form_patch`); otherwise the patch is found
  by gradient ascent as for classifiers. The inserted detector reads that position's window only
  (a ``Slice`` of the host's input): with a stride = kernel patch embedding the same patch would
  otherwise fire at every token-aligned place (the audit showed it opening the lock in all four
  corners), and the bound counts one position.
* **gate** — the feature map where the token stream becomes a map (the first Conv/ConvTranspose
  after the last MatMul: a ViT decoder's input; :func:`onnxstain._lock.site.gate_features`) is
  multiplied by ``1 + (1 − γ) m`` with ``m = −2`` on a random half of the channels: locked, half the
  channels change sign; with the patch ``γ`` is exactly 1 and the model is bit-identical to the
  original on the same patched image.
* **fidelity** — Pearson correlation of output maps (per image) instead of top-1 agreement.

The in-place lock needs a classifier bias to disrupt and conduit channels to it: refused here.
"""

from __future__ import annotations

import numpy as np

from .._report.lock_audit_result import LOCKED_CORRELATION  # "locked" for a dense output, as the audit reads it
from ..calibration import refuse_underflowing_target
from ..errors import BadInputError, InternalError, UnsupportedModelError
from ..math import bounds
from ..math.maps import pool_maps
from ..patch import paste_pixels, smooth_backgrounds
from ..runtime import run_batches, session
from ..signature import map_agreement
from .calibration import DenseCalibration, calibrate_dense
from .edit import dense_gate_lock
from .geometry import lock_hosts
from .job import LockJob, write_outputs
from .keys import dense_key
from .search import search_dense
from .site import LockSite, dense_host, gate_features
from .types import LockEdit, LockOptions, LockResult, PatchFound

GATE_DRAWS = 4  # draws of the flipped half of the gated channels before the lock is refused
REFERENCES = 8
CHECK_IMAGES = 64


def refuse_kind(opts: LockOptions) -> None:
    if opts.kind != "gate":
        raise UnsupportedModelError(
            "this model has a dense output and no classifier head: the in-place lock needs a classifier bias to "
            "disrupt and conduit channels to reach it; use --kind gate")


class DenseLock:
    """The gate lock of a model whose output is a map (no classifier head)."""

    cal: DenseCalibration
    found: PatchFound
    locked: LockEdit
    bound: bounds.Bound
    want: np.ndarray  # the original's reference maps: patched, then unpatched
    locked_corr: np.ndarray  # per calibration image, without the patch
    unlocked_corr: np.ndarray  # per calibration image, patched (locked) against clean (original)
    natural_firings: int
    digest: str

    def __init__(self, job: LockJob) -> None:
        """Choose the site and the gated map (refuses what this lock cannot do before any work)."""
        opts, pre = job.opts, job.pre
        assert job.dense is not None
        refuse_kind(opts)
        if opts.detectors != 1:
            raise BadInputError("the dense-output gate lock uses one detector: --detectors 1")
        self.job, self.output = job, job.dense.output
        host = dense_host(lock_hosts(job.loaded.model, job.view), opts.layer, pre.height, pre.width)
        refuse_underflowing_target(opts.fpr, host, opts.max_draws, positions=1)
        self.features = gate_features(job.view, job.dense.output)
        self.site = LockSite.at(host, pre)

    def calibrate(self) -> None:
        self.cal = calibrate_dense(self.job, self.site)

    def search(self) -> None:
        self.found = search_dense(self.job, self.site, self.cal)

    def edit(self) -> None:
        self.locked = dense_gate_lock(self.job, self.site, self.cal, self.found, self.features)
        self.bound = bounds.ball_bound(self.cal.tau0, self.cal.radius, self.site.host.m, positions=1,
                                       draws=self.job.opts.max_draws)

    def check(self) -> None:
        """Locked, the maps must be far from the original's; with the patch, bit-identical to it."""
        job, out, n_check = self.job, self.output, min(CHECK_IMAGES, len(self.cal.x_cal))
        orig_sess, locked_sess = session(job.loaded.model, job.opts.providers), session(self.locked.model,
                                                                                       job.opts.providers)
        o_clean = run_batches(orig_sess, self.cal.x_cal[:n_check], [out])[out]
        l_clean = run_batches(locked_sess, self.cal.x_cal[:n_check], [out])[out]
        self.locked_corr = map_agreement(l_clean, o_clean)
        for _ in range(GATE_DRAWS - 1):  # another half of the channels while the maps stay too close (seeded)
            if float(self.locked_corr.mean()) < LOCKED_CORRELATION:
                break
            self.locked = dense_gate_lock(job, self.site, self.cal, self.found, self.features)
            locked_sess = session(self.locked.model, job.opts.providers)
            l_clean = run_batches(locked_sess, self.cal.x_cal[:n_check], [out])[out]
            self.locked_corr = map_agreement(l_clean, o_clean)
        if float(self.locked_corr.mean()) >= LOCKED_CORRELATION:
            raise UnsupportedModelError(
                f"the gate on {self.features!r} leaves the outputs too close to the original's after {GATE_DRAWS} "
                f"draws of the flipped channels (mean correlation {self.locked_corr.mean():.3g} ≥ "
                f"{LOCKED_CORRELATION}); try another --seed")
        x_patch = job.pre.to_input(paste_pixels(self.cal.pixels[:n_check], self.found.patch))
        l_patch = run_batches(locked_sess, x_patch, [out])[out]
        if not np.array_equal(l_patch, run_batches(orig_sess, x_patch, [out])[out]):
            raise InternalError("internal check failed: with the patch the locked model is not bit-identical "
                                "to the original on the same images")
        self.unlocked_corr = map_agreement(l_patch, o_clean)  # the patch's own cost, against clean originals
        self.locked.locked_agreement = float(self.locked_corr.mean())
        refs = smooth_backgrounds(REFERENCES, job.pre.height, job.pre.width, seed=job.seed % (2**31))
        self.want = run_batches(orig_sess, job.pre.to_input(np.concatenate([paste_pixels(refs, self.found.patch),
                                                                            refs])), [out])[out]
        self.natural_firings = int((self.found.natural > self.cal.tau0).sum())

    def write(self) -> None:
        cal, want = self.cal, self.want
        self.digest = write_outputs(self.job, self.locked.model, lambda digest: dense_key(
            self.job, self.site, self.found, self.locked, digest=digest, stats=cal.stats, tau0=cal.tau0,
            radius=cal.radius, bound=self.bound, images=len(cal.x_cal), pooled=pool_maps(want.astype(np.float64)),
            dense_shape=tuple(int(d) for d in want.shape[1:]), natural_firings=self.natural_firings,
            unlocked_agree=float(self.unlocked_corr.mean())))
        lc, uc = self.locked_corr, self.unlocked_corr
        self.job.notes.append(
            f"fidelity is the Pearson correlation of output maps, on {len(lc)} calibration images: locked "
            f"mean {lc.mean():.3f} (max {lc.max():.3f}); with the patch bit-identical to the original on the same "
            f"images, {uc.mean():.4f} (min {uc.min():.4f}) against the original on clean images")

    def result(self) -> LockResult:
        job, cal, found = self.job, self.cal, self.found
        return LockResult(
            output=job.output, kind="gate", key_path=job.key_path, record_path=job.record, host=self.site.host.name,
            detectors=1, patch_box=self.site.box, input_hw=(job.pre.height, job.pre.width), bound=self.bound,
            threshold=cal.tau0,
            trigger_scores=[float(s) for s in found.scores], natural_max_score=float(found.natural.max()),
            natural_firings=self.natural_firings, natural_samples=int(found.natural.size),
            locked_agreement=float(self.locked_corr.mean()), unlocked_agreement=float(self.unlocked_corr.mean()),
            chance=0.0, flipped_features=self.locked.flipped, calibration_images=len(cal.x_cal), draws=found.draws,
            search_steps=found.steps, timings=job.timings, notes=job.notes, model_sha256=self.digest,
            metric="correlation",
        )
