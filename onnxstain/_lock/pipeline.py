"""Locking, end to end: a model that is useless unless a secret patch sits in the image corner.

:func:`lock` prepares the job (:func:`onnxstain._lock.job.prepare`: paths, one load, options,
preprocessing, seed) and runs the stages of its kind (:func:`onnxstain._lock.job.run_stages`): a
classifier's or detector's lock (:class:`ClassifierLock`, here) or a dense-output model's
(:class:`onnxstain._lock.dense.DenseLock`).

1. **site** — the host (:mod:`onnxstain._lock.site`). Gate lock: by default a window of raw corner pixels
   where the model reads the image (:mod:`onnxstain._lock.window`; the patch is the window, the radius
   certified by the pixel box). In place, or with ``--layer NAME``: an early Conv whose first
   padding-free corner position sees a small patch (:mod:`onnxstain._lock.geometry`).
2. **calibrate** — :mod:`onnxstain._lock.calibration`: the centre ``c`` and radius ``R`` of the host's
   natural features, the classifier's natural input features and scores; in place, first the conduit plan.
3. **search** — :mod:`onnxstain._lock.search`: ``d`` random directions (gate: all must fire at one
   position), margin τ0 from the bound target (``Σ_p Π_i cap_i`` ≤ ``--fpr``) fixed before they are
   drawn; then the occlusion-aware refinement.
4. **edit** — :mod:`onnxstain._lock.edit`: gate, :func:`onnxstain.passes.lock.insert_gate` with a
   sign-flip disruption; in place, :func:`onnxstain.passes.conduit.apply_conduit` with a random head bias.
5. **check** — onnxruntime on the locked model: patched reference images give exactly the scores the
   lock restores; unpatched ones do not; in place, the graph structure is unchanged.
6. **write** — model, key (0600; the patch is in it, :mod:`onnxstain._lock.keys`), public record.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from .._onnx import head as head_mod
from ..calibration import refuse_underflowing_target
from ..errors import BadModelError, InternalError, UnsupportedModelError
from ..math import bounds
from ..outputs import Artefacts
from ..patch import paste_pixels, smooth_backgrounds
from ..preprocess import Preprocessing, PreprocessingRequest
from ..progress import Progress, Silent
from ..runtime import run_batches, session, with_outputs
from ..signature import lock_agreement
from .auto import AutoLock
from .calibration import ClassifierCalibration, calibrate_classifier
from .dense import DenseLock
from .edit import gate_lock, inplace_lock
from .geometry import lock_hosts
from .job import LockJob, prepare, run_stages, write_outputs
from .keys import classifier_key
from .search import search_classifier
from .shuffle import ShuffleLock
from .site import LockSite, classifier_host
from .types import LockEdit, LockOptions, LockResult, PatchFound

__all__ = ["ClassifierLock", "LockOptions", "LockResult", "lock"]

REFERENCES = 8  # synthetic reference images stored (as a seed) for black-box verification


def lock(
    model: str | Path,
    output: str | Path,
    key_path: str | Path,
    options: LockOptions | None = None,
    preprocessing: Preprocessing | PreprocessingRequest | None = None,
    images: str | Path | np.ndarray | None = None,
    progress: Progress | None = None,
    record_path: str | Path | None = None,
    artefacts: Artefacts | None = None,
) -> LockResult:
    """Lock ``model``: write ``output`` (locked), the key (holding the patch) and its public record.

    With ``artefacts`` they are only staged there (the caller commits, :mod:`onnxstain.outputs`)."""
    job = prepare(model, output, key_path, options or LockOptions(), preprocessing, images, progress or Silent(),
                  record_path, artefacts)
    return run_stages(job, lock_stages(job))


def lock_stages(job: LockJob) -> ClassifierLock | DenseLock | ShuffleLock | AutoLock:
    """The stages of the job's kind of lock (they refuse what they cannot do before any work)."""
    if job.opts.kind == "auto":
        return AutoLock(job)
    if job.opts.kind == "shuffle":
        return ShuffleLock(job)
    if job.opts.kind == "gate" and job.head is not None:
        point_to_shuffle(job)
    return ClassifierLock(job) if job.head is not None else DenseLock(job)


def point_to_shuffle(job: LockJob) -> None:
    """A gate lock's note: a graph edit opens it, and whether this model takes the shuffle lock, which resists
    that (its site only: whether one reordered layer locks the model is measured when it runs)."""
    try:
        layer = ShuffleLock(job).layer.name
    except UnsupportedModelError:
        return
    job.notes.append(f"anyone who edits the graph opens a gate lock in seconds (bypass its gate, pin its detector, "
                     f"or read the patch off its weights); --kind shuffle resists those and can reorder {layer} "
                     "in this model (README, \"Threat model\")")


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
