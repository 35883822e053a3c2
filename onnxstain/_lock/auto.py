"""The default kind of lock: the shuffle lock where the model takes it, else the gate lock, saying why.

A gate lock opens to anyone who edits the graph (bypass its gate, pin its detector, read the patch off its
weights: ``tools/attack_suite.py``); the shuffle lock (:mod:`onnxstain._lock.shuffle`) has no gate to bypass and no
detector to read. So ``--kind auto`` (the default) runs the shuffle lock's stages and, where they refuse the model
— at the site (a dense output, a Focus stem, no layer that every path passes through), at calibration, or at the
edit (reordering the layer does not lock the model on the calibration images) — runs the gate lock's instead, and
its output says why. Both kinds' keys and results are their own: nothing downstream sees "auto".
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any, Literal

import numpy as np

from .._onnx import head as head_mod
from .._onnx.graph import GraphView
from .._onnx.hosts import HostLayer
from ..errors import BadInputError, UnsupportedModelError
from ..preprocess import Preprocessing
from .classifier import ClassifierLock
from .dense import DenseLock
from .job import LockJob
from .shuffle import ShuffleLock
from .shuffle_site import shuffle_site
from .types import LockOptions, LockResult


def resolved(job: LockJob, kind: Literal["gate", "shuffle"]) -> LockJob:
    """The job as one of a given kind: its notes, timings and outputs shared with ``job``, a generator of its own
    from the job's seed (a gate lock after the shuffle refused is the one ``--kind gate`` makes with that seed)."""
    return dataclasses.replace(job, opts=dataclasses.replace(job.opts, kind=kind), rng=np.random.default_rng(job.seed))


def refusal_reason(refusal: UnsupportedModelError) -> str:
    """A shuffle lock's refusal without its pointer to the gate lock (which the default kind then makes)."""
    return re.split(r"[:;] use --kind gate", str(refusal))[0]


def default_kind(view: GraphView, hosts: list[HostLayer], head: head_mod.Head | None,
                 pre: Preprocessing) -> dict[str, Any]:
    """What the default kind makes of this model, read off its graph (``inspect``): the shuffle lock and its
    layer and blocks, or the gate lock and why. Whether the reordered layer locks the model is measured on the
    calibration images only when the lock runs (a miss there makes the gate lock too)."""
    if head is None:
        return {"kind": "gate", "layer": None, "blocks": None, "reason": "a dense output, no classifier head"}
    try:
        site = shuffle_site(view, hosts, head, pre, LockOptions.fpr)
    except UnsupportedModelError as refusal:
        return {"kind": "gate", "layer": None, "blocks": None, "reason": refusal_reason(refusal)}
    return {"kind": "shuffle", "layer": site.layer.name, "blocks": site.blocks, "reason": None}


class AutoLock:
    """The shuffle lock's stages, with the gate lock's as the fallback (built, and caught up, when needed)."""

    STAGES = ("calibrate", "search", "edit")

    def __init__(self, job: LockJob) -> None:
        if job.opts.layer is not None or job.opts.detectors != 1:
            raise BadInputError("--layer and --detectors name a site of one kind of lock: say which with --kind "
                                "gate or --kind shuffle (the default kind picks its own)")
        self.job = job
        self.shuffle: ShuffleLock | None = None
        self.gate: ClassifierLock | DenseLock | None = None
        self.gate_done: set[str] = set()  # the gate's stages run so far (its calibration is the model's)
        try:
            self.shuffle = ShuffleLock(resolved(job, "shuffle"))
        except UnsupportedModelError as refusal:
            self.fall_back(refusal)

    def fall_back(self, refusal: UnsupportedModelError) -> None:
        """Give up the shuffle lock for this key: the gate lock's stages from here on, with a note of why."""
        self.job.notes.append(f"a gate lock: the default kind where the shuffle lock cannot be used "
                              f"({refusal_reason(refusal)}); "
                              "anyone who edits the graph opens a gate lock in seconds (README, \"Threat model\")")
        self.shuffle = None
        if self.gate is None:
            gate_job = resolved(self.job, "gate")
            self.gate = ClassifierLock(gate_job) if gate_job.head is not None else DenseLock(gate_job)

    def for_key(self, job: LockJob) -> AutoLock:
        """These stages for another key's job of the same model: each kind's site and calibration shared (a dense
        output's gate calibrates per key)."""
        stages = copy.copy(self)
        stages.job, stages.gate_done = job, set()
        if self.shuffle is not None:
            stages.shuffle = self.shuffle.for_key(resolved(job, "shuffle"))
        if isinstance(self.gate, DenseLock):
            stages.gate = DenseLock(resolved(job, "gate"))
        elif self.gate is not None:
            stages.gate, stages.gate_done = self.gate.for_key(resolved(job, "gate")), self.gate_done & {"calibrate"}
        return stages

    def run(self, stage: str) -> None:
        """One stage of the shuffle lock; once it has refused, of the gate lock, its earlier stages caught up."""
        if self.shuffle is not None:
            try:
                getattr(self.shuffle, stage)()
                return
            except UnsupportedModelError as refusal:
                self.fall_back(refusal)
        assert self.gate is not None
        for name in self.STAGES[: self.STAGES.index(stage) + 1]:
            if name not in self.gate_done:
                getattr(self.gate, name)()
                self.gate_done.add(name)

    def calibrate(self) -> None:
        self.run("calibrate")

    def search(self) -> None:
        self.run("search")

    def edit(self) -> None:
        self.run("edit")

    @property
    def active(self) -> ShuffleLock | ClassifierLock | DenseLock:
        """The stages that made the lock: the shuffle's, or the gate's after a refusal."""
        stages = self.shuffle if self.shuffle is not None else self.gate
        assert stages is not None
        return stages

    def check(self) -> None:
        self.active.check()

    def write(self) -> None:
        self.active.write()

    def result(self) -> LockResult:
        return self.active.result()
