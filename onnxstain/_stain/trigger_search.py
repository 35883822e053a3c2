"""The trigger search every stain runs: draw a direction → ascend → quantise → accept.

For each draw ``v`` (from the job's seeded generator) the natural detector scores are checked
(a direction whose natural scores reach τ0/2 is rejected), then gradient ascent (torch, through the
model's prefix up to the host's input) starts from the calibration image the strategy ranks best
and drives the scores at the selected positions to ``SEARCH_FACTOR`` τ0 while the cross-key bound
holds. The trigger is quantised to 8 bits and re-scored by onnxruntime; it is accepted when its
weakest selected position keeps ``ACCEPT_FACTOR`` τ0.

What differs between stains is a :class:`Rescore` strategy: which calibration image to start from
and what the onnxruntime re-scoring reads (:class:`ClassifierRescore`: the host's input and the
original model's scores; :class:`DenseRescore`: the host's input only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from .._onnx.hosts import HostLayer
from ..calibration import ACCEPT_FACTOR, SEARCH_FACTOR
from ..errors import UnreachableBoundError
from ..features import neuron_inputs
from ..math import bounds, detector
from ..math.trigger import ascend, quantise
from ..preprocess import Preprocessing
from ..runtime import run_batches, session
from ..scoring import detector_scores
from ..signature import ScoreView
from .job import CalibrationPass, StainJob


@dataclasses.dataclass
class TriggerFind:
    """One trigger of a stain: its detector direction and what the original model shows on it."""

    direction: np.ndarray  # v, [m]
    pixels: np.ndarray  # uint8 [H, W, 3]
    phi: np.ndarray  # the trigger's neuron inputs [P, m]
    scores: np.ndarray  # its detector scores at every position [P]
    s_star: float  # the weakest selected position's score
    natural: np.ndarray  # natural detector scores [N, P]
    original_scores: np.ndarray | None  # the original model's signature scores on it [K] (None: dense)
    draws: int  # draws this trigger took


class Rescore(Protocol):
    """A stain's part of the search: where ascent starts, and the onnxruntime re-scoring of the trigger."""

    def start(self, selected_scores: np.ndarray) -> np.ndarray:
        """A rank per calibration image from its natural scores at the selected positions ``[N, S]``."""
        ...

    def rescore(self, trigger: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The 8-bit trigger's neuron inputs ``[P, m]`` and the original model's scores on it (or None)."""
        ...


class _SessionRescore:
    """Re-scoring through the calibration session (re-opened when a lean job released it)."""

    def __init__(self, cal: CalibrationPass, host: HostLayer, pre: Preprocessing, outputs: list[str],
                 providers: list[str] | None = None, lean: bool = False) -> None:
        self.cal, self.host, self.pre, self.outputs = cal, host, pre, outputs
        self.providers, self.lean = providers, lean

    def _run(self, trigger: np.ndarray) -> dict[str, np.ndarray]:
        if self.cal.session is None:
            self.cal.session = session(self.cal.tapped, self.providers)
        got = run_batches(self.cal.session, self.pre.to_input(trigger), self.outputs)
        if self.lean:
            self.cal.session = None
        return got


class ClassifierRescore(_SessionRescore):
    """Classifier and detector stains: start from the best soft-min image; read the host's input and the
    original scores (the signature's class is drawn away from them). ``lean``: large models hold the
    session only while re-scoring, never beside the torch prefix."""

    def __init__(self, cal: CalibrationPass, host: HostLayer, pre: Preprocessing, scores: str, view: ScoreView,
                 providers: list[str] | None = None, lean: bool = False) -> None:
        super().__init__(cal, host, pre, [host.input, scores], providers, lean)
        self.scores, self.view = scores, view

    @staticmethod
    def start(selected_scores: np.ndarray) -> np.ndarray:
        return -np.log(np.exp(-selected_scores).sum(axis=1))

    def rescore(self, trigger: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        got = self._run(trigger)
        return neuron_inputs(self.host, got[self.host.input])[0], self.view.flat(got[self.scores])[0]


class DenseRescore(_SessionRescore):
    """Dense-output stains: start from the image whose weakest selected position is strongest; read the
    host's input only (the signature is a pattern, not a class)."""

    def __init__(self, cal: CalibrationPass, host: HostLayer, pre: Preprocessing,
                 providers: list[str] | None = None) -> None:
        super().__init__(cal, host, pre, [host.input], providers)

    @staticmethod
    def start(selected_scores: np.ndarray) -> np.ndarray:
        return selected_scores.min(axis=1)

    def rescore(self, trigger: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return neuron_inputs(self.host, self._run(trigger)[self.host.input])[0], None


@dataclasses.dataclass
class TriggerSearch:
    """The search of one stain. ``detectors``: triggers the signature needs (each detector is held to
    ``fpr / detectors`` and the cross-key bound counts ``max_draws × detectors`` draws per key)."""

    job: StainJob
    cal: CalibrationPass
    host: HostLayer
    tau0: float
    selected: np.ndarray
    rescorer: Rescore
    detectors: int = 1
    lean: bool = False  # drop the torch prefix after each ascent (large models)
    hint: Callable[[], str] = lambda: "try another --seed, --layer or a larger --fpr"
    # the torch prefix, while held; a caller that stains many keys of one model passes the previous search's
    # and ``keep_prefix`` (it is the same model up to the same host)
    prefix: Any = dataclasses.field(default=None, repr=False)
    keep_prefix: bool = False
    steps: int = dataclasses.field(default=0, init=False)  # gradient steps taken, over every draw

    def find_all(self) -> list[TriggerFind]:
        """One accepted trigger per detector, else ``UnreachableBoundError`` with the search's figures."""
        import torch

        torch.manual_seed(self.job.seed % (2**31))
        finds = []
        opts, n = self.job.opts, self.detectors
        with self.job.progress.task("trigger search", total=None) as task:
            for t in range(n):
                found = self._search(f"trigger {t + 1}/{n}, " if n > 1 else "", task)
                if found is None:
                    which = f" for trigger {t + 1} of {n}" if n > 1 else ""
                    raise UnreachableBoundError(
                        f"no trigger{which} reached the margin needed for --fpr {opts.fpr:g} at layer "
                        f"{self.host.name} (τ0/R = {self.tau0 / self.cal.radius:.2f}) within {opts.max_draws} "
                        f"draws; {self.hint()}")
                finds.append(found)
        if not self.keep_prefix:
            self.prefix = None
        return finds

    def _cross_ok(self, _smin: float, radii: np.ndarray) -> bool:
        """The ascent may stop: another key's detectors fire on the trigger within this stain's share."""
        weights = np.full(self.host.positions, self.job.opts.max_draws * self.detectors)
        bound = bounds.cross_key_bound(radii, self.tau0, self.host.m, positions_weight=weights)
        return bound.value <= self.job.opts.fpr / self.detectors

    def _search(self, which: str, task: Any) -> TriggerFind | None:
        opts, stats, notes = self.job.opts, self.cal.stats, self.job.notes
        target = SEARCH_FACTOR * self.tau0
        for draw in range(1, opts.max_draws + 1):
            v = detector.sample_direction(self.job.rng, self.host.m)
            s_nat = detector.scores(self.cal.phi, v, stats.centre)  # [N, P]
            if float(s_nat.max()) >= 0.5 * self.tau0:
                notes.append(f"{which}draw {draw}: natural scores reach {s_nat.max():.3g} ≥ τ0/2; direction rejected")
                continue
            init = self.cal.pixels[int(np.argmax(self.rescorer.start(s_nat[:, self.selected])))].astype(np.float64)
            fn = detector_scores(self._torch_prefix(), self.host, self.job.pre, v[None], stats.centre, 0,
                                 self.selected)

            def report(step: int, smin: float, task: Any = task, draw: int = draw) -> None:
                task.update(f"trigger search ({which}draw {draw}): step {step}, score {smin:.2f} / {target:.2f}")

            res = ascend(fn, init, score_target=target, accept=self._cross_ok, max_steps=opts.max_steps,
                         progress=report)
            self.steps += res.steps
            trig = self.job.pre.canonical_pixels(quantise(res.pixels))
            if self.lean:
                self.prefix = fn = None
            phi_t, original = self.rescorer.rescore(trig)
            s_t = detector.scores(phi_t, v, stats.centre)
            s_star = float(s_t[self.selected].min())
            if s_star < ACCEPT_FACTOR * self.tau0:
                notes.append(f"{which}draw {draw}: the 8-bit trigger reached {s_star:.3g} < {ACCEPT_FACTOR} τ0 = "
                             f"{ACCEPT_FACTOR * self.tau0:.3g}; resampled")
                continue
            return TriggerFind(v, trig, phi_t, s_t, s_star, s_nat, original, draw)
        return None

    def _torch_prefix(self) -> Any:
        """The model up to the host's input in torch, built once (again after a lean release)."""
        if self.prefix is None:
            from ..torchprefix import prefix_for_input  # imports torch: only when a search runs

            # shape-only parts (a ViT's resized position embedding) are constants at this input size
            self.prefix = prefix_for_input(self.job.analysis_model(), [self.host.input], self.job.pre.input_shape(),
                                            self.job.opts.providers)
        return self.prefix
