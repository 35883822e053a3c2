"""The lock as a job: ``prepare`` (paths, one load, options, preprocessing, what kind of output, seed)
and ``run_stages`` (calibrate → search → edit → check → write, timed), shared by the classifier and
dense-output locks (:mod:`onnxstain.lock_classifier`, :mod:`onnxstain._lock.dense`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx

from .._onnx import head as head_mod
from .._onnx.dense import DenseOutput, find_dense_output
from .._onnx.graph import GraphView
from .._onnx.inputs import settle_preprocessing
from .._onnx.io import LoadedModel, load_model
from ..errors import BadInputError, UnsupportedModelError
from ..keys import Key
from ..outputs import Artefacts, checked_job_outputs, write_unit
from ..preprocess import Preprocessing, PreprocessingRequest
from ..progress import Progress
from ..sanity import refuse_nonfinite
from ..seeds import check_seed, draw_seed
from .types import LockOptions, LockResult


@dataclasses.dataclass
class LockJob:
    """What every stage reads: the loaded model and its preprocessing, the options, where the outputs go,
    the seeded generator, and the notes and timings the stages add to."""

    loaded: LoadedModel
    view: GraphView
    pre: Preprocessing
    opts: LockOptions
    output: Path
    key_path: Path
    record: Path
    images: str | Path | np.ndarray | None
    prog: Progress
    artefacts: Artefacts | None
    head: head_mod.Head | None  # a classifier or detector head, or None for a dense output
    dense: DenseOutput | None
    seed: int
    rng: np.random.Generator
    t0: float
    notes: list[str] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def for_key(self, output: Path, key_path: Path, record: Path, seed: int | None,
                artefacts: Artefacts | None = None, t0: float | None = None) -> LockJob:
        """This model's job for one key: its outputs, its seed (``None``: fresh entropy) and generator, its own
        notes (the model's so far, calibration's included) and timings. The loaded model and its graph view are
        shared: no stage edits them (the edit passes work on a copy)."""
        seed = draw_seed(seed)
        return dataclasses.replace(self, output=output, key_path=key_path, record=record, artefacts=artefacts,
                                   seed=seed, rng=np.random.default_rng(seed), notes=list(self.notes), timings={},
                                   t0=time.perf_counter() if t0 is None else t0)


class LockStages(Protocol):
    """One kind of lock: its stages, run in order by :func:`run_stages`, and the result they add up to."""

    def calibrate(self) -> None: ...
    def search(self) -> None: ...
    def edit(self) -> None: ...
    def check(self) -> None: ...
    def write(self) -> None: ...
    def result(self) -> LockResult: ...


def prepare(model: str | Path, output: str | Path, key_path: str | Path, opts: LockOptions,
            preprocessing: Preprocessing | PreprocessingRequest | None, images: str | Path | np.ndarray | None,
            prog: Progress, record_path: str | Path | None, artefacts: Artefacts | None) -> LockJob:
    """Check the outputs and the options, load the model once, settle its preprocessing and find what the
    lock protects (a classifier or detector head, else a dense output map); refuses before any work."""
    t0 = time.perf_counter()
    out_path, key, record = checked_job_outputs(model, output, key_path, record_path)
    job = load_job(model, opts, preprocessing, images, prog)
    return job.for_key(out_path, key, record, opts.seed, artefacts, t0)


def load_job(model: str | Path, opts: LockOptions, preprocessing: Preprocessing | PreprocessingRequest | None,
             images: str | Path | np.ndarray | None, prog: Progress) -> LockJob:
    """The model's part of :func:`prepare`, for any number of keys (:meth:`LockJob.for_key` gives each its
    outputs and seed)."""
    t0 = time.perf_counter()
    loaded = load_model(model)
    check_options(opts)
    pre, pre_notes = settle_preprocessing(loaded.model, loaded.path, preprocessing)
    refuse_nonfinite(loaded, pre, opts.providers)
    view = GraphView(loaded.model, pre.input_shape())
    refuse_half_precision(view)
    head = head_mod.find_scores_head(view)
    dense = find_dense_output(view) if head is None else None
    if head is None and dense is None:
        raise UnsupportedModelError(head_mod.no_head_message(view, "whose scores the lock disrupts"))
    unset = Path()  # a model's job has no outputs until for_key gives it a key's
    return LockJob(loaded=loaded, view=view, pre=pre, opts=opts, output=unset, key_path=unset, record=unset,
                   images=images, prog=prog, artefacts=None, head=head, dense=dense, seed=0,
                   rng=np.random.default_rng(0), t0=t0, notes=list(pre_notes))


def check_options(opts: LockOptions) -> None:
    if opts.kind not in ("auto", "gate", "inplace", "shuffle"):
        raise BadInputError(f"--kind must be auto, gate, inplace or shuffle, not {opts.kind!r}")
    if opts.kind == "inplace" and opts.detectors != 1:
        raise BadInputError("the in-place lock carries one detector through its conduits: use --detectors 1, or "
                            "the gate lock (--kind gate) for several")
    if not 0 < opts.fpr < 1:
        raise BadInputError("--fpr must be between 0 and 1")
    check_seed(opts.seed)
    if not 1 <= opts.detectors <= 8:
        raise BadInputError("--detectors must be between 1 and 8")
    if not 0 < opts.occlusion_lr < 256:
        raise BadInputError(f"the occlusion refinement's step size must be in (0, 256) pixel levels, not "
                            f"{opts.occlusion_lr}")
    if opts.occlusion_steps < 0 or opts.max_steps < 1 or opts.max_draws < 1:
        raise BadInputError("--occlusion-steps must be ≥ 0, and the search needs at least one step and one draw")


def refuse_half_precision(view: GraphView) -> None:
    """fp16 weights are refused before any work: the lock must be exact with the patch, and fp16
    rounding of the inserted detector and gate (or of the conduits, in place) breaks that (measured on
    MobileNetV2: the gate's float32 branch does not type-check, the in-place references miss by 0.03)."""
    tensors = list(view.initializers.values()) + [
        next(a for a in n.attribute if a.name == "value").t for n in view.constant_nodes.values()]
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in tensors):
        raise UnsupportedModelError(
            "fp16 models cannot be locked yet (the lock must be exact with the patch, which fp16 rounding of "
            "the lock's weights breaks); lock the float32 model")


def run_stages(job: LockJob, stages: LockStages, calibrated: bool = False) -> LockResult:
    """Run the stages in order, timing each (``load`` is everything before: preparing and choosing the site).
    ``calibrated``: the stages hold a calibration already (:class:`onnxstain._lock.many.Locker`'s, one per model)."""
    job.timings["load"] = time.perf_counter() - job.t0
    todo = [("calibration", stages.calibrate)] if not calibrated else []
    for name, stage in [*todo, ("patch_search", stages.search), ("edit", stages.edit), ("checks", stages.check),
                        ("save", stages.write)]:
        t = time.perf_counter()
        stage()
        job.timings[name] = time.perf_counter() - t
    job.timings["total"] = time.perf_counter() - job.t0
    return stages.result()


def write_outputs(job: LockJob, locked: onnx.ModelProto, build_key: Callable[[str], Key]) -> str:
    """Stage the locked model, then the key ``build_key(model digest)`` and its public record, as one unit
    (synced; key and record renamed before the model, :mod:`onnxstain.outputs`); the model's SHA-256."""
    with write_unit(job.artefacts) as writer:
        digest = writer.stage_model(locked, job.output, source=job.loaded)
        writer.stage_key(build_key(digest), job.key_path, job.record)
    return digest
