"""Locking, end to end: a model that is useless unless a secret patch sits in the image corner.

:func:`lock` prepares the job (:func:`onnxstain._lock.job.prepare`: paths, one load, options,
preprocessing, seed) and runs the stages of its kind (:func:`onnxstain._lock.job.run_stages`): by default
(``auto``, :class:`onnxstain._lock.auto.AutoLock`) the shuffle lock's (:class:`onnxstain._lock.shuffle.ShuffleLock`)
where it locks the model, else the gate lock's; a gate or in-place lock of a classifier's or detector's head
(:class:`onnxstain._lock.classifier.ClassifierLock`) or of a dense-output model
(:class:`onnxstain._lock.dense.DenseLock`). The stages below are the gate and in-place kinds'.

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

from pathlib import Path

import numpy as np

from ..errors import UnsupportedModelError
from ..outputs import Artefacts
from ..preprocess import Preprocessing, PreprocessingRequest
from ..progress import Progress, Silent
from .auto import AutoLock
from .classifier import ClassifierLock
from .dense import DenseLock
from .job import LockJob, prepare, run_stages
from .shuffle import ShuffleLock
from .types import LockOptions, LockResult

__all__ = ["ClassifierLock", "LockOptions", "LockResult", "lock"]



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
