"""Many locks of one model: load and calibrate once, then each key's own search, edit, checks and write.

A fleet (:mod:`onnxstain.fleet.issue` with ``--lock``) locks one copy per customer, each with its own patch. What
depends on the model only — the load and checks, the preprocessing, the site, the calibration pass — is done
once by :class:`Locker`; :meth:`Locker.lock` then runs the stages that depend on the key (its secret seed): the
directions and the patch search, the edit, the checks on the locked model and the write. Each key's lock is the
one ``onnxstain.lock`` writes with the same seed and options (the tests compare them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model_keys import ModelForKeys
from ..outputs import Artefacts, checked_job_outputs
from ..preprocess import Preprocessing, PreprocessingRequest
from ..progress import Progress, Silent
from .auto import AutoLock
from .classifier import ClassifierLock
from .dense import DenseLock
from .job import LockJob, load_job, run_stages
from .pipeline import lock_stages
from .shuffle import ShuffleLock
from .types import LockOptions, LockResult


class Locker(ModelForKeys):
    """Lock one model with many keys. ``options.seed`` is ignored: each :meth:`lock` call takes its own
    (``None``: fresh entropy, as a fleet's copies need)."""

    def __init__(self, model: str | Path, options: LockOptions | None = None,
                 preprocessing: Preprocessing | PreprocessingRequest | None = None,
                 images: str | Path | np.ndarray | None = None, progress: Progress | None = None) -> None:
        self.model = Path(model)
        self._job: LockJob = load_job(model, options or LockOptions(), preprocessing, images, progress or Silent())
        self._stages: ClassifierLock | ShuffleLock | AutoLock | None = None
        if self._job.head is not None:  # a dense output's lock calibrates per key (its search trims the features)
            stages = lock_stages(self._job)
            assert not isinstance(stages, DenseLock)  # a head's lock
            stages.calibrate()
            self._stages = stages

    def lock(self, output: str | Path, key_path: str | Path, record_path: str | Path | None = None, *,
             seed: int | None = None, artefacts: Artefacts | None = None) -> LockResult:
        """One key's lock, written as ``onnxstain.lock`` writes it (or staged in ``artefacts``)."""
        out, key, record = checked_job_outputs(self.model, output, key_path, record_path)
        job = self._job.for_key(out, key, record, seed, artefacts)
        if self._stages is None:
            return run_stages(job, lock_stages(job))
        return run_stages(job, self._stages.for_key(job), calibrated=True)
