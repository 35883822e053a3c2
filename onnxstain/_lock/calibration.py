"""The lock's calibration stage: one onnxruntime pass over the calibration images gives the centre ``c``
and radius ``R`` of the host's natural features (certified by the pixel box for a pixel window), the
margin τ0 the bound target needs, and the natural scores the edit and the checks compare against.

In place, the conduit plan comes first (:mod:`onnxstain.passes.conduit`, its channels chosen by their
natural activity), and the features are those of the model with the conduit edits: what the detector
reads and the lock restores.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx

from .._onnx.hosts import HostLayer
from ..calibration import RADIUS_MARGIN, calibration_pixels
from ..errors import UnsupportedModelError
from ..features import neuron_inputs, phi_at, phi_radii, phi_sum
from ..math import bounds, detector
from ..math.agreement import top1_agreement
from ..passes.conduit import ConduitPlan, conduit_taps, plan_conduit, prepare_conduit
from ..preprocess import Preprocessing
from ..runtime import run_batches, session, with_outputs
from .job import LockJob
from .site import LockSite, reads_pixels
from .window import WindowProbe, probe_window


class HostPhi:
    """The detectors' input vectors ``[N, P, m]`` on 8-bit images ``[N, H, W, 3]``, read from the host's
    input (through ``tap``, a session with the host input as an output; None: the host reads the input)."""

    def __init__(self, host: HostLayer, pre: Preprocessing, tap: Any | None) -> None:
        self.host, self.pre, self.tap = host, pre, tap

    def __call__(self, px: np.ndarray) -> np.ndarray:
        x = self.pre.to_input(px)
        return neuron_inputs(self.host, x if self.tap is None else run_batches(self.tap, x, [self.host.input])[
            self.host.input])


@dataclasses.dataclass
class ClassifierCalibration:
    pixels: np.ndarray  # the calibration images, 8-bit
    x_cal: np.ndarray  # ... as the model's input
    base: onnx.ModelProto  # what the detector reads and the lock restores (in place: with the conduit edits)
    plan: ConduitPlan | None  # in place: the conduits
    sess: Any  # a session of ``base`` with the host input, the scores and the features as outputs
    host_phi: HostPhi
    phi_all: np.ndarray  # the host's natural features [N, P, m]
    probe: WindowProbe | None  # a pixel window's probe (the box and the closed-form patch)
    stats: detector.FeatureStats
    bound_kind: str
    radius: float
    tau0: float
    raw_scores: np.ndarray  # the base model's scores as onnxruntime gave them
    nat_scores: np.ndarray  # ... as float64 [N, K]
    pooled: np.ndarray | None  # the classifier's input features [N, F] (None for a detector)
    orig_scores: np.ndarray  # the original model's scores [N, K]
    unlocked_agree: float  # top-1 of the base against the original on clean images (in place: the conduits' cost)


def calibrate_classifier(job: LockJob, site: LockSite, features: str | None) -> ClassifierCalibration:
    """Calibration of a classifier's or a detector's lock (``features``: the classifier's input, if any)."""
    opts, pre, host = job.opts, job.pre, site.host
    assert job.head is not None
    head = job.head
    pixels = calibration_pixels(job.images, pre, job.prog)
    x_cal = pre.to_input(pixels)
    base, plan, orig_scores = job.loaded.model, None, None
    if opts.kind == "inplace":
        plan_conduit(job.loaded.model, host, site.position, head)  # refuses unsupported graphs before any pass
        plan, orig_scores = plan_inplace(job, site, x_cal)
        base = prepare_conduit(job.loaded.model, plan).model
        job.notes += plan.notes
    graph_inputs = {i.name for i in job.view.graph_inputs}
    taps = [t for t in (host.input, head.scores, features) if t and t not in graph_inputs]
    sess = session(with_outputs(base, taps), opts.providers)
    with job.prog.task("calibration pass", total=len(x_cal)) as task:
        cal = run_batches(sess, x_cal, taps, batch=opts.batch, progress=task.advance)
    if host.input in graph_inputs:
        cal[host.input] = x_cal
    tap = None if host.input in graph_inputs else session(with_outputs(base, [host.input]), opts.providers)
    host_phi = HostPhi(host, pre, tap)
    phi_all = neuron_inputs(host, cal[host.input])
    probe, stats, bound_kind, radius = natural_ball(site, phi_all, host_phi, pre)
    tau0 = bounds.threshold_for_target(opts.fpr, radius, host.m, positions=host.positions, draws=opts.max_draws,
                                       detectors=opts.detectors)
    nat_scores = cal[head.scores].astype(np.float64).reshape(len(x_cal), -1)
    pooled = None if features is None else cal[features].astype(np.float64)
    if pooled is not None and not head.linear:  # a convolutional classifier's input map: its channels' means
        pooled = pooled.mean(axis=(2, 3))
    pooled = None if pooled is None else pooled.reshape(len(x_cal), -1)
    if orig_scores is None:
        orig_scores = nat_scores
    # What the unlocked model loses against the original (in place: the conduit channels), on clean images.
    unlocked_agree = float(np.mean(top1_agreement(nat_scores, orig_scores, head.classes)))
    return ClassifierCalibration(pixels=pixels, x_cal=x_cal, base=base, plan=plan, sess=sess, host_phi=host_phi,
                                 phi_all=phi_all, probe=probe, stats=stats, bound_kind=bound_kind, radius=radius,
                                 tau0=tau0, raw_scores=cal[head.scores], nat_scores=nat_scores, pooled=pooled,
                                 orig_scores=orig_scores, unlocked_agree=unlocked_agree)


def natural_ball(site: LockSite, phi_all: np.ndarray, host_phi: HostPhi, pre: Preprocessing
                 ) -> tuple[WindowProbe | None, detector.FeatureStats, str, float]:
    """``(probe, stats, bound kind, R)``: a pixel window's ball is the pixel box's (certified for every 8-bit
    image, about the box centre); a Conv host's is RADIUS_MARGIN × the largest calibration radius."""
    if not site.window:
        stats = detector.FeatureStats.from_features(phi_all)
        return None, stats, "calibrated-radius", RADIUS_MARGIN * stats.max_radius
    probe = probe_window(host_phi, site.host.kernel[0], pre.height, pre.width,
                         grey=pre.channel_order == "GRAY")
    if probe is None:
        raise UnsupportedModelError(
            "the pixel window is not separable here (a window value depends on several pixels or on none); "
            "lock with --layer NAME (an early Conv)")
    centre, radius = bounds.box_ball(probe.lo, probe.hi)
    return probe, detector.FeatureStats.from_features(phi_all, centre), "data-free", radius


def plan_inplace(job: LockJob, site: LockSite, x_cal: np.ndarray) -> tuple[ConduitPlan, np.ndarray]:
    """The conduit plan, its channels chosen by their natural activity (one streaming onnxruntime pass
    over the calibration images, which also gives the original model's scores)."""
    model, head, opts = job.loaded.model, job.head, job.opts
    assert head is not None
    taps = [t for t in conduit_taps(model, site.host, head, site.position) if t != head.scores]
    sess = session(with_outputs(model, [*taps, head.scores]), opts.providers)
    sums: dict[str, np.ndarray] = {}
    scores = []
    with job.prog.task("channel activity (in-place lock)", total=len(x_cal)) as task:
        for start in range(0, len(x_cal), opts.batch):
            got = run_batches(sess, x_cal[start : start + opts.batch], [*taps, head.scores], batch=opts.batch)
            scores.append(got[head.scores].astype(np.float64).reshape(len(got[head.scores]), -1))
            for t in taps:
                a = np.abs(got[t].astype(np.float64))
                per = a.reshape(a.shape[0], a.shape[1], -1).mean(axis=2).sum(axis=0)
                sums[t] = sums.get(t, 0) + per
            task.advance(min(opts.batch, len(x_cal) - start))
    activity = {t: v / len(x_cal) for t, v in sums.items()}
    plan = plan_conduit(model, site.host, site.position, head, activity=activity)
    return plan, np.concatenate(scores)


@dataclasses.dataclass
class DenseCalibration:
    pixels: np.ndarray
    x_cal: np.ndarray
    at_lock: np.ndarray  # φ at the lock position on each calibration image, ``[N, m]`` (what the search scores)
    pixel_host: bool  # the host reads the normalised image (NCHW float): the patch has a closed form
    stats: detector.FeatureStats
    radius: float
    tau0: float


CHUNK = 32  # calibration images per host-feature chunk
RADII_IMAGES = 4  # images per float64 radii step (CRAFT's host map: ~50 MB for four)


def _features_held() -> int:
    """Bytes of host features kept between the calibration's two passes (beyond, the host is tapped again): a
    quarter of the machine's memory, 2 to 16 GiB."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        memory = 8 << 30
    return int(min(max(memory // 4, 2 << 30), 16 << 30))


FEATURES_HELD = _features_held()


def calibrate_dense(job: LockJob, site: LockSite) -> DenseCalibration:
    """Calibration of a dense-output model's lock: the inserted detector reads the lock position's window
    only (a Slice), so the bound counts one position. The host's features stream through in chunks: a large
    input's features over the whole calibration set (CRAFT at 384x512: tens of GB) are never held at once."""
    opts, pre, host = job.opts, job.pre, site.host
    pixels = calibration_pixels(job.images, pre, job.prog)
    x_cal = pre.to_input(pixels)
    pixel_host = reads_pixels(job.view, host) and pre.layout == "NCHW" and pre.dtype != "uint8"
    tap = None if pixel_host else session(with_outputs(job.loaded.model, [host.input]), opts.providers)

    def features(task: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
        for s in range(0, len(x_cal), CHUNK):
            x = x_cal[s : s + CHUNK]
            yield x if tap is None else run_batches(tap, x, [host.input], batch=opts.batch)[host.input]
            if task is not None:
                task(len(x))

    held: list[np.ndarray] | None = []  # the features for the second pass, while they fit FEATURES_HELD
    total, count, at_lock = np.zeros(host.m), 0, []
    with job.prog.task("calibration pass", total=len(x_cal)) as task:
        for chunk in features(task.advance):
            at_lock.append(phi_at(host, chunk, site.pos_index))
            part, samples = phi_sum(host, chunk)
            total, count = total + part, count + samples
            if held is not None and not held and chunk.nbytes * -(-len(x_cal) // len(chunk)) > FEATURES_HELD:
                held = None
            if held is not None:
                held.append(chunk)
    centre = total / count
    radii = np.concatenate([phi_radii(host, chunk[s : s + RADII_IMAGES], centre).reshape(-1)
                            for chunk in (held if held is not None else features())
                            for s in range(0, len(chunk), RADII_IMAGES)])
    q = {f"{p:g}": float(np.quantile(radii, p / 100)) for p in (50, 99, 99.9, 100)}
    stats = detector.FeatureStats(centre=centre, max_radius=float(radii.max()), radius_quantiles=q, samples=count)
    radius = RADIUS_MARGIN * stats.max_radius
    tau0 = bounds.threshold_for_target(opts.fpr, radius, host.m, positions=1, draws=opts.max_draws)
    return DenseCalibration(pixels=pixels, x_cal=x_cal, at_lock=np.concatenate(at_lock), pixel_host=pixel_host,
                            stats=stats, radius=radius, tau0=tau0)


