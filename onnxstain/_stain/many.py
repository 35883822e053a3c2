"""Many stains of one model: load and calibrate once, then each key's own draw, search, edit, check, write.

A fleet (:mod:`onnxstain.fleet.issue`) stains one copy per customer. What depends on the model only — the
load and checks, the preprocessing, the head and host, the calibration pass over the photos, the torch
prefix of the trigger search — is done once by :class:`Stainer`; :meth:`Stainer.stain` then runs the stages
that depend on the key (its secret seed): the direction draws, the trigger search, the edit, the checks on
the stained model and the write. Each key's stain is the one ``onnxstain.stain`` would write with the same
seed and options (same calibration, same stages; the tests compare them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model_keys import ModelForKeys
from ..outputs import Artefacts, checked_job_outputs
from ..preprocess import Preprocessing, PreprocessingRequest
from ..progress import Progress
from .dense import stain_dense
from .job import StainJob, load_job
from .pipeline import SharedWork, shared_work, stain_prepared
from .result import StainOptions, StainResult


class Stainer(ModelForKeys):
    """Stain one model with many keys. ``options.seed`` is ignored: each :meth:`stain` call takes its own
    (``None``: fresh entropy, as a fleet's copies need)."""

    def __init__(self, model: str | Path, options: StainOptions | None = None,
                 preprocessing: Preprocessing | PreprocessingRequest | None = None,
                 images: str | Path | np.ndarray | None = None, progress: Progress | None = None) -> None:
        self.model = Path(model)
        self._images = images
        self._job: StainJob = load_job(model, options, preprocessing, progress)
        self._job.clock.lap("load")
        # a dense-output model's calibration is part of its own stage (onnxstain._stain.dense): done per key
        self._shared: SharedWork | None = None if self._job.dense is not None else shared_work(self._job, images)
        self._job.clock.lap("calibration")

    def stain(self, output: str | Path, key_path: str | Path, record_path: str | Path | None = None, *,
              seed: int | None = None, artefacts: Artefacts | None = None) -> StainResult:
        """One key's stain, written as ``onnxstain.stain`` writes it (or staged in ``artefacts``)."""
        out, key, record = checked_job_outputs(self.model, output, key_path, record_path)
        job = self._job.for_key(out, key, record, seed, artefacts)
        if job.dense is not None:
            return stain_dense(job, self._images)
        return stain_prepared(job, shared=self._shared)

    def release(self) -> None:
        """Drop the calibration session and the torch prefix (the calibration arrays stay)."""
        if self._shared is not None:
            self._shared.cal.session = None
            self._shared.prefix = None
