"""The lock of a model with a classifier head or a detector's per-anchor class head (the gate or in-place kind):
the stages :func:`onnxstain._lock.pipeline.lock` runs for it (site, calibration, search, edit, check, write)."""

from __future__ import annotations

import copy

import numpy as np

from .._onnx import head as head_mod
from ..calibration import refuse_underflowing_target
from ..errors import BadModelError, InternalError, UnsupportedModelError
from ..math import bounds
from ..patch import paste_pixels, smooth_backgrounds
from ..runtime import run_batches, session, with_outputs
from ..signature import lock_agreement
from .calibration import ClassifierCalibration, calibrate_classifier
from .edit import gate_lock, inplace_lock
from .geometry import lock_hosts
from .job import LockJob, write_outputs
from .keys import classifier_key
from .search import search_classifier
from .site import LockSite, classifier_host
from .types import LockEdit, LockResult, PatchFound

REFERENCES = 8  # synthetic reference images stored (as a seed) for black-box verification


class ClassifierLock:
    """The lock of a model with a classifier head or a detector's per-anchor class head."""

    cal: ClassifierCalibration
    found: PatchFound
    locked: LockEdit
    bound: bounds.Bound
    want: np.ndarray  # the reference scores the key stores: patched, then unpatched
    natural_firings: int
    digest: str

    def __init__(self, job: LockJob) -> None:
        """Choose the site (refuses what this kind of lock cannot do before any work)."""
        head, opts = job.head, job.opts
        assert head is not None
        if not head.linear and opts.kind == "inplace":
            what = ("this is a detector" if head.detection else
                    f"the classifier {head.node} is a Conv followed by global pooling")
            raise UnsupportedModelError(
                f"{what}: the in-place lock restores a Gemm or MatMul classifier's bias through pooled conduits, "
                "and this head has none; use --kind gate")
        self.job, self.head = job, head
        self.features = None if head.detection else head_mod.head_input(job.view, head)
        self.hosts = lock_hosts(job.loaded.model, job.view)
        host = classifier_host(self.hosts, job.view, opts, job.pre)
        refuse_underflowing_target(opts.fpr, host, opts.max_draws, opts.detectors)
        self.site = LockSite.at(host, job.pre)

    def calibrate(self) -> None:
        self.cal = calibrate_classifier(self.job, self.site, self.features)

    def for_key(self, job: LockJob) -> ClassifierLock:
        """These stages for another key's job of the same model: the site and the calibration shared (the later
        stages read them and never change them), everything after them the key's own."""
        stages = copy.copy(self)
        stages.job = job
        return stages

    def search(self) -> None:
        self.found = search_classifier(self.job, self.site, self.cal)

    def edit(self) -> None:
        job, cal, host = self.job, self.cal, self.site.host
        self.locked = (inplace_lock(job, self.site, cal, self.found) if cal.plan is not None
                       else gate_lock(job, self.site, self.hosts, cal, self.found))
        self.bound = bounds.ball_bound(cal.tau0, cal.radius, host.m, positions=host.positions,
                                       draws=job.opts.max_draws, detectors=job.opts.detectors, kind=cal.bound_kind)

    def check(self) -> None:
        """With the patch the locked model gives the base model's scores; without, it differs from the original.

        The key's references are the graph output a verifier reads (the probabilities when a Softmax
        follows the scores): the locked model's with the patch, the original's without."""
        job, cal, scores, out = self.job, self.cal, self.head.scores, self.head.output
        providers = job.opts.providers
        refs = smooth_backgrounds(REFERENCES, job.pre.height, job.pre.width, seed=job.seed % (2**31))
        x_ref = job.pre.to_input(np.concatenate([paste_pixels(refs, self.found.patch), refs]))
        n = len(refs)
        taps = list(dict.fromkeys([scores, out]))  # one name when the scores are the graph output
        original = run_batches(session(with_outputs(job.loaded.model, taps), providers), x_ref, taps)
        want = run_batches(cal.sess, x_ref[:n], [scores])[scores] if cal.plan is not None else original[scores][:n]
        if not np.isfinite(original[out]).all() or not np.isfinite(want).all():
            raise BadModelError("the model gives NaN or infinite scores on the reference images")
        got = run_batches(session(with_outputs(self.locked.model, taps), providers), x_ref, taps)
        unlock_error = float(np.abs(want - got[scores][:n]).max())
        if unlock_error > 1e-4 * max(1.0, float(np.abs(want).max())):
            raise InternalError(
                f"internal check failed: the patched references do not unlock (max |Δ| {unlock_error:.3g})")
        self.want = np.concatenate([got[out][:n], original[out][n:]])
        per_step = self.head.classes if self.head.steps else None
        _, still = lock_agreement(got[out][:n], self.want[:n], got[out][n:], self.want[n:], per_step,
                                  head_mod.decision_threshold(job.view, out))
        if still.mean() > 0.5:
            job.notes.append("the locked model still gives the original's outputs on most unpatched reference images")
        self.natural_firings = int((self.found.natural > cal.tau0).all(axis=1).sum())

    def write(self) -> None:
        cal = self.cal
        self.digest = write_outputs(self.job, self.locked.model, lambda digest: classifier_key(
            self.job, self.site, self.found, self.locked, digest=digest, stats=cal.stats, tau0=cal.tau0,
            radius=cal.radius, bound=self.bound, images=len(cal.x_cal), want=self.want,
            natural_firings=self.natural_firings, unlocked_agree=cal.unlocked_agree))

    def result(self) -> LockResult:
        job, cal, found, locked = self.job, self.cal, self.found, self.locked
        return LockResult(
            output=job.output, kind=job.opts.kind, key_path=job.key_path, record_path=job.record,
            host=self.site.host.name, detectors=job.opts.detectors, patch_box=self.site.box,
            input_hw=(job.pre.height, job.pre.width), bound=self.bound,
            threshold=cal.tau0, trigger_scores=[float(s) for s in found.scores],
            natural_max_score=float(found.natural.max()), natural_firings=self.natural_firings,
            natural_samples=int(found.natural[:, 0].size), locked_agreement=locked.locked_agreement,
            unlocked_agreement=cal.unlocked_agree, chance=locked.chance, flipped_features=locked.flipped,
            calibration_images=len(cal.x_cal), draws=found.draws, search_steps=found.steps, timings=job.timings,
            notes=job.notes, model_sha256=self.digest, occlusion=found.occlusion,
            metric="anchor mAP" if self.head.detection else "top-1", kappa=locked.kappa,
            packed_detector=self.head.first_label == head_mod.PACKED_BOX,
        )
