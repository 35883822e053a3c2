"""Evaluation: measure a stain on natural images and set the measurements beside the bounds.

``evaluate(original, modified, key)`` runs both models on a natural-image set (by default the
built-in *held-out* photos, disjoint from the calibration photos ``stain`` uses, with seeded views)
and reports:

* **detector on natural data** (white-box, needs the key's host input tensor in the modified
  model): the score ``S = v · (φ − c)`` at every position of every image, the number of firings
  ``S > τ``, the largest natural score and a histogram;
* **radius coverage**: how many (image, position) samples and whole images lie inside the
  calibration radius ``R`` that the key's ball bound assumes;
* **bounds** (each a :class:`~onnxstain.math.bounds.Bound` with its kind and statement): the key's
  worst-case ball bound, a data-driven bound from the held-out per-image cap sums, the mixed bound
  (exceedance of ``R`` + ball), and the measured per-image firing rate with its Clopper–Pearson
  95 % upper bound. Measurements are kept apart from bounds and labelled as such;
* **fidelity** of the modified model against the original on the same images;
* **trigger**: the detector's scores on the key's trigger through both models, and the verify
  decision (:func:`onnxstain.verify.verify`).

Everything streams in chunks: only the per-sample scores and radii (8 bytes each) are kept, never
the features φ of the whole set. The math is numpy and :mod:`onnxstain.math.bounds`; the ONNX
plumbing is :mod:`onnxstain.runtime`, :mod:`onnxstain.features` and :mod:`onnxstain._onnx.hosts`. The records
are :mod:`onnxstain._report.records`'s, the images :mod:`onnxstain._report.inputs`'.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from .._onnx.graph import GraphView
from .._onnx.hosts import HostLayer, find_hosts
from .._onnx.inputs import image_input
from .._onnx.io import LoadedModel, load_model
from ..errors import BadInputError, BadKeyError, KeyMismatchError
from ..features import neuron_inputs
from ..keys import Key, load_key
from ..math import bounds, detector
from ..math.detection_agreement import anchor_scores, per_image_anchor_map
from ..progress import Progress, Silent
from ..runtime import image_rows, run_batches, session, with_outputs
from ..sanity import refuse_nonfinite
from ..signature import map_agreement, top1_margins
from ..stopwatch import Stopwatch
from ..verify import verify
from .inputs import evaluation_images, scores_output
from .records import (
    CONFIDENCE,
    Coverage,
    DetectorStats,
    EvaluateResult,
    Fidelity,
    ImageSetInfo,
    MeasuredRate,
    PhotoLevel,
    TriggerCheck,
    clopper_statement,
)

__all__ = ["EvaluateResult", "evaluate"]

FRAGILE_MARGIN = 0.05  # an image is "fragile" when its original top-1 margin (logits) is below this
HISTOGRAM_BINS = 100
F32_MAX = float(np.finfo(np.float32).max)  # scores and radii are kept as float32
_PHI_BUDGET = 8_000_000  # floats of φ per chunk (32 MB as float32)
_MAX_CHUNK = 256


def evaluate(
    original: str | Path,
    modified: str | Path,
    key: Key | str | Path,
    images: str | Path | np.ndarray | None = None,
    views: int = 16,
    providers: list[str] | None = None,
    progress: Progress | None = None,
    batch: int = 32,
) -> EvaluateResult:
    """Measure the stain of ``key`` in ``modified`` on natural images; compare with ``original`` and the bounds.

    ``images``: a folder (``--images DIR``), a uint8 ``[N, H, W, 3]`` array, or ``None`` for the
    built-in held-out photos with ``views`` views each at the key's input size.
    """
    prog = progress or Silent()
    clock = Stopwatch()
    pair = _open(original, modified, key, views, providers)
    clock.lap("load")
    pixels, photo_of, names, info, _ = evaluation_images(images, pair.key.preprocessing, int(views), prog)
    if images is not None and views != 16:
        pair.notes.append("--views applies to the built-in photos only; the given images are used as they are")
    clock.lap("images")
    tally = _stream(pair, pixels, batch, prog)
    fidelity = tally.fidelity()
    clock.lap("pass")
    trigger = _trigger_check(pair, providers, prog)
    clock.lap("trigger")
    stats = _statistics(pair, tally, info, photo_of, names, trigger)
    clock.lap("bounds")
    return EvaluateResult(
        original=str(pair.orig.path), modified=str(pair.mod.path), original_sha256=pair.orig.sha256,
        modified_sha256=pair.mod.sha256, key_commitment=pair.key.commitment, host=pair.host.name, mode=pair.key.mode,
        variant=pair.key.variant, m=pair.host.m, threshold=pair.tau, images=info, detector=stats.detector,
        coverage=stats.coverage, ball_bound=pair.key.bound, data_driven_bound=stats.data_driven,
        mixed_bound=stats.mixed, measured=stats.measured, photo_level=stats.photo_level, fidelity=fidelity,
        trigger=trigger, white_box=pair.white_box, notes=pair.notes, timings=clock.total())


# -- the models and the key --------------------------------------------------------------------------------
@dataclasses.dataclass
class _Pair:
    """The original and modified models with their sessions, the key and the detector it describes."""

    key: Key
    orig: LoadedModel
    mod: LoadedModel
    host: HostLayer
    v: np.ndarray  # the detector's direction
    c: np.ndarray  # its centre
    tau: float
    o_scores: str  # the scores output of each model
    m_scores: str
    white_box: bool  # the modified model still has the detector's input tensor
    o_is_input: bool  # the detector's input is the model's input
    m_is_input: bool
    o_sess: Any
    m_sess: Any
    notes: list[str]

    @property
    def group(self) -> int:
        return self.key.host.group or 0


def _open(original: str | Path, modified: str | Path, key_in: Key | str | Path, views: int,
          providers: list[str] | None) -> _Pair:
    """Load and check both models against the key; open a session on each, tapping the detector's input."""
    if int(views) != views or views < 1:
        raise BadInputError(f"--views must be a positive integer, not {views}")
    key = key_in if isinstance(key_in, Key) else load_key(key_in)
    if key.kind != "stain":
        raise BadInputError(f"the key is a {key.kind!r} key; evaluate needs a stain key (use audit_lock for a lock)")
    orig, mod = load_model(original), load_model(modified)
    notes = _check_models(key, orig, mod, providers)
    host = _host_from_key(orig, key)
    det = key.feature_detector
    if det.direction is None or det.trigger_radii is None:
        raise BadKeyError("the key's detector.direction is missing (a stain key needs it)")
    tap = host.input
    oview, mview = GraphView(orig.model), GraphView(mod.model)
    white_box = _has_tensor(mview, tap)
    if not white_box:
        notes.append(f"the modified model has no tensor {tap!r} (the detector's input): the detector, radius "
                     "coverage and data-driven bounds are skipped; fidelity and the black-box check still run")
    o_is_input = any(i.name == tap for i in oview.graph_inputs)
    m_is_input = any(i.name == tap for i in mview.graph_inputs)
    o_sess = session(orig.model if o_is_input else with_outputs(orig.model, [tap]), providers)
    m_sess = session(mod.model if (m_is_input or not white_box) else with_outputs(mod.model, [tap]), providers)
    return _Pair(key=key, orig=orig, mod=mod, host=host, v=det.direction.array(), c=det.centre.array(),
                 tau=float(det.threshold), o_scores=scores_output(oview, key.model.scores, "original"),
                 m_scores=scores_output(mview, key.model.scores, "modified"), white_box=white_box,
                 o_is_input=o_is_input, m_is_input=m_is_input, o_sess=o_sess, m_sess=m_sess, notes=notes)


def _check_models(key: Key, orig: LoadedModel, mod: LoadedModel, providers: list[str] | None) -> list[str]:
    """Refuse a model of the wrong input size or with non-finite weights; note models the key does not name."""
    for loaded, which in ((orig, "original"), (mod, "modified")):
        info = image_input(loaded.model)
        key.check_input_size(info.height, info.width, f"the {which} model")
        refuse_nonfinite(loaded, key.preprocessing, providers, f"the {which} model")
    notes = []
    if orig.sha256 != key.model.source_sha256:
        notes.append("ORIGINAL is not the model the key was made from (its SHA-256 differs from the key's source)")
    if mod.sha256 != key.model.output_sha256:
        notes.append("MODIFIED is not the stained model the key records (its SHA-256 differs)")
    return notes


def _has_tensor(view: GraphView, name: str) -> bool:
    return name in view.producer or any(i.name == name for i in view.graph_inputs)


def _host_from_key(loaded: LoadedModel, key: Key) -> HostLayer:
    """The key's host layer, rebuilt from the ORIGINAL model and checked against the key."""
    kh = key.host
    # analysed at the key's input size: a model with a dynamic height and width has its positions there
    view = GraphView(loaded.model, key.preprocessing.input_shape())
    match = [h for h in find_hosts(loaded.model, view) if h.name == kh.name]
    if not match:
        raise KeyMismatchError(f"the original model has no layer {kh.name!r} the key was made for")
    host = match[0]
    if host.op == "MatMul" and host.tokens is None and kh.positions > 1:
        host = dataclasses.replace(host, tokens=kh.positions)  # token count read from a run at stain time
    if host.input != kh.input or host.m != kh.m or host.positions != kh.positions:
        raise KeyMismatchError(
            f"layer {host.name!r} of the original model does not match the key (input {host.input!r}, "
            f"m={host.m}, {host.positions} positions; the key has {kh.input!r}, m={kh.m}, "
            f"{kh.positions} positions)")
    if (kh.group or 0) >= max(1, host.groups):
        raise KeyMismatchError(f"the key's host.group is {kh.group}; layer {host.name!r} has {host.groups} group(s)")
    return host


# -- one streaming pass over both models -------------------------------------------------------------------
@dataclasses.dataclass
class _Tally:
    """What the pass keeps: per sample (float32, for the histogram and quantiles) and per image (exact,
    from float64) for the detector; per image for the fidelity. Never the features φ of the whole set."""

    n: int
    signature_type: str
    layout: tuple[int, int] | None  # a detector: fidelity is the detections' (anchor-level) mAP
    s_all: np.ndarray | None
    r_all: np.ndarray | None
    img_fires: np.ndarray
    img_inside: np.ndarray
    img_max_s: np.ndarray
    img_max_r: np.ndarray
    cap_sums: np.ndarray
    kl: np.ndarray
    margins: np.ndarray
    differ: np.ndarray
    corr: np.ndarray
    firings: int = 0
    inside_samples: int = 0
    max_delta: float = 0.0
    labels: tuple[int, bool] = (1, False)  # a detector's first label column, and whether they are probabilities
    anchors_last: bool = False  # a detector's raw scores laid out [labels, anchors]

    @classmethod
    def empty(cls, pair: _Pair, n: int) -> _Tally:
        positions = pair.host.positions
        signature_type = pair.key.signature.kind if pair.key.signature is not None else "class"
        return cls(n=n, signature_type=signature_type, layout=pair.key.detection_layout(),
                   s_all=np.empty((n, positions), np.float32) if pair.white_box else None,
                   r_all=np.empty((n, positions), np.float32) if pair.white_box else None,
                   img_fires=np.zeros(n, bool), img_inside=np.zeros(n, bool), img_max_s=np.zeros(n, np.float64),
                   img_max_r=np.zeros(n, np.float64), cap_sums=np.zeros(n, np.float64), kl=np.zeros(n, np.float64),
                   margins=np.zeros(n, np.float64), differ=np.zeros(n, bool), corr=np.ones(n, np.float64),
                   labels=pair.key.detection_labels(), anchors_last=pair.key.detection_anchors_last())

    @property
    def dense(self) -> bool:  # a map output: fidelity is the maps' correlation
        return self.signature_type == "pattern"

    def add_detector(self, pair: _Pair, rows: slice, phi: np.ndarray) -> None:
        assert self.s_all is not None and self.r_all is not None
        key, tau = pair.key, pair.tau
        radius = float(key.feature_calibration.radius)
        sc, rd = detector.scores(phi, pair.v, pair.c), detector.radii(phi, pair.c)
        if not (np.abs(sc) < F32_MAX).all() or not (rd < F32_MAX).all():  # the key's centre or direction
            raise KeyMismatchError("the key's detector gives scores beyond float32 on these images; the key does "
                                   "not fit this model")
        self.s_all[rows], self.r_all[rows] = sc, rd
        self.firings += int((sc > tau).sum())
        self.inside_samples += int((rd <= radius).sum())
        self.img_fires[rows] = (sc > tau).any(axis=1)
        self.img_inside[rows] = (rd <= radius).all(axis=1)
        self.img_max_s[rows], self.img_max_r[rows] = sc.max(axis=1), rd.max(axis=1)
        self.cap_sums[rows] = bounds.per_image_cap_sums(rd, float(key.feature_detector.tau0), pair.host.m,
                                                        draws=key.feature_detector.max_draws)

    def add_outputs(self, rows: slice, a: np.ndarray, b: np.ndarray) -> None:
        """``a``, ``b``: the original's and the modified model's scores of these images, flat, float64."""
        if a.shape != b.shape:
            raise KeyMismatchError(f"the models give {a.shape[1]} and {b.shape[1]} scores per image")
        if self.layout is not None and a.shape[1] != self.layout[0] * self.layout[1]:
            raise KeyMismatchError(f"the models give {a.shape[1]} scores per image; the key's model.layout "
                                   f"{list(self.layout)} needs {self.layout[0] * self.layout[1]}")
        if self.dense:
            self.corr[rows] = map_agreement(b, a)
        elif self.layout is not None:
            self.corr[rows] = per_image_anchor_map(anchor_scores(a, self.layout, self.anchors_last),
                                                   anchor_scores(b, self.layout, self.anchors_last), *self.labels)
        if self.layout is None:  # a softmax over a detector's anchors × labels would mean nothing
            la, lb = _log_softmax(a), _log_softmax(b)
            self.kl[rows] = np.maximum(0.0, (np.exp(la) * (la - lb)).sum(axis=1))
            self.margins[rows] = top1_margins(a)
            self.differ[rows] = a.argmax(1) != b.argmax(1)
        self.max_delta = max(self.max_delta, float(np.abs(a - b).max()))

    def fidelity(self) -> Fidelity:
        nan, n = float("nan"), self.n
        if self.layout is not None:
            found = self.corr[~np.isnan(self.corr)]
            return Fidelity(images=int(found.size), agreement=float(found.mean()) if found.size else nan,
                            differing=int((found < 1.0).sum()), differing_fragile=0, mean_kl=nan, max_kl=nan,
                            max_abs_delta=self.max_delta, fragile_fraction=nan, fragile_margin=nan,
                            metric="anchor mAP", min_correlation=float(found.min()) if found.size else nan)
        if self.dense:
            return Fidelity(images=n, agreement=float(self.corr.mean()), differing=int((self.corr < 0.999).sum()),
                            differing_fragile=0, mean_kl=nan, max_kl=nan, max_abs_delta=self.max_delta,
                            fragile_fraction=nan, fragile_margin=nan, metric="correlation",
                            min_correlation=float(self.corr.min()))
        fragile = self.margins < FRAGILE_MARGIN
        return Fidelity(images=n, agreement=float(1.0 - self.differ.mean()), differing=int(self.differ.sum()),
                        differing_fragile=int((self.differ & fragile).sum()), mean_kl=float(self.kl.mean()),
                        max_kl=float(self.kl.max()), max_abs_delta=self.max_delta,
                        fragile_fraction=float(fragile.mean()), fragile_margin=FRAGILE_MARGIN)


def _stream(pair: _Pair, pixels: np.ndarray, batch: int, prog: Progress) -> _Tally:
    """Both models over the images in chunks; the detector's scores and radii read from the modified model."""
    n, host, tap = len(pixels), pair.host, pair.host.input
    chunk = max(1, min(_MAX_CHUNK, _PHI_BUDGET // max(1, host.positions * host.m)))
    tally = _Tally.empty(pair, n)
    m_outputs = [pair.m_scores] + ([] if pair.m_is_input or not pair.white_box else [tap])
    with prog.task(f"evaluating on {n} images", total=n) as task:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            x = pair.key.preprocessing.to_input(pixels[start:stop])
            got = run_batches(pair.m_sess, x, m_outputs, batch=batch)
            ref = run_batches(pair.o_sess, x, [pair.o_scores], batch=batch)[pair.o_scores]
            if tally.s_all is not None:
                phi = neuron_inputs(host, x if pair.m_is_input else got[tap], pair.group)
                if phi.shape[1] != host.positions:
                    raise KeyMismatchError(f"the detector's input gives {phi.shape[1]} positions; the key has "
                                           f"{host.positions}")
                tally.add_detector(pair, slice(start, stop), phi)
            tally.add_outputs(slice(start, stop), image_rows(ref, pair.o_scores, stop - start).astype(np.float64),
                              image_rows(got[pair.m_scores], pair.m_scores, stop - start).astype(np.float64))
            task.advance(stop - start)
    return tally


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


# -- the trigger ---------------------------------------------------------------------------------------------
def _trigger_check(pair: _Pair, providers: list[str] | None, prog: Progress) -> TriggerCheck:
    """The key's trigger through both models (the detector's scores), and verify's decision on each."""
    key, tap, tau = pair.key, pair.host.input, pair.tau
    sel = np.asarray(key.host.selected_positions, dtype=int)
    with prog.task("trigger and signature", total=None):
        x_t = key.preprocessing.to_input(key.trigger_pixels())
        trig_scores: dict[str, np.ndarray | None] = {}
        for which, sess, is_input, has in (("modified", pair.m_sess, pair.m_is_input, pair.white_box),
                                           ("original", pair.o_sess, pair.o_is_input, True)):
            if not has:
                trig_scores[which] = None
                continue
            feat = x_t if is_input else run_batches(sess, x_t, [tap])[tap]
            trig_scores[which] = detector.scores(neuron_inputs(pair.host, feat, pair.group)[0], pair.v, pair.c)
        rep = verify(pair.mod.path, key, providers=providers)
        rep_orig = verify(pair.orig.path, key, providers=providers)
    key_trig = key.feature_detector.trigger_scores.array()
    s_mod, s_orig = trig_scores["modified"], trig_scores["original"]
    if s_mod is not None and np.abs(s_mod - key_trig).max() > 1e-3 * max(1.0, tau):
        pair.notes.append(f"the trigger's detector scores in MODIFIED differ from those recorded in the key by up "
                          f"to {np.abs(s_mod - key_trig).max():.3g} (the layers before the host have changed)")
    return TriggerCheck(
        selected_positions=[int(p) for p in sel], threshold=tau,
        modified_scores=None if s_mod is None else [float(s) for s in s_mod[sel]],
        original_scores=None if s_orig is None else [float(s) for s in s_orig[sel]],
        modified_fires=None if s_mod is None else bool((s_mod[sel] > tau).all()),
        original_fires=None if s_orig is None else bool((s_orig[sel] > tau).all()),
        key_scores=[float(s) for s in key_trig[sel]],
        stained=rep.stained, signature_type=key.signature.kind if key.signature is not None else "class",
        signature_score=rep.score, signature_threshold=rep.threshold,
        original_stained=rep_orig.stained, original_signature_score=rep_orig.score,
        cross_key_bound=rep.fpr_bound, checks=[dataclasses.asdict(ch) for ch in rep.checks])


# -- statistics and bounds -----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Statistics:
    detector: DetectorStats | None = None
    coverage: Coverage | None = None
    data_driven: bounds.Bound | None = None
    mixed: bounds.Bound | None = None
    measured: MeasuredRate | None = None
    photo_level: PhotoLevel | None = None


def _statistics(pair: _Pair, tally: _Tally, info: ImageSetInfo, photo_of: np.ndarray, names: list[str],
                trigger: TriggerCheck) -> _Statistics:
    """The detector's measured statistics, the radius coverage and the data-driven bounds (white box only)."""
    if tally.s_all is None or tally.r_all is None:
        return _Statistics()
    n, ball = tally.n, pair.key.bound
    det_stats = _detector_stats(pair, tally, photo_of, names, trigger, info.photos)
    coverage = _coverage(pair, tally, photo_of, info.photos)
    k_fire, k_out = int(tally.img_fires.sum()), coverage.images_outside
    up = bounds.radius_exceedance_bound(k_fire, n, CONFIDENCE)
    measured = MeasuredRate(unit="image", firing=k_fire, total=n, rate=k_fire / n, upper=up,
                            confidence=CONFIDENCE, statement=clopper_statement(k_fire, n, "image", up))
    photo_level = _photo_level(pair, tally, photo_of, info) if info.photos < n else None
    if k_fire:
        pair.notes.append(f"the detector fired on {k_fire} natural image(s) (max score {det_stats.max_score:.4g} "
                          f"> τ = {pair.tau:.4g})")
    if k_out:
        pair.notes.append(f"{k_out} image(s) have a feature outside the calibration radius R = {coverage.radius:.4g} "
                          f"(max {coverage.max_radius:.4g}); the ball bound does not cover them, the mixed bound "
                          "does")
    return _Statistics(detector=det_stats, coverage=coverage,
                       data_driven=bounds.data_driven_bound(tally.cap_sums, CONFIDENCE),
                       mixed=bounds.mixed_bound(ball, k_out, n, CONFIDENCE), measured=measured,
                       photo_level=photo_level)


def _detector_stats(pair: _Pair, tally: _Tally, photo_of: np.ndarray, names: list[str], trigger: TriggerCheck,
                    n_photos: int) -> DetectorStats:
    assert tally.s_all is not None
    s_all, tau = tally.s_all, pair.tau
    photo_fires = np.bincount(photo_of, weights=tally.img_fires, minlength=n_photos) > 0
    arg = int(np.argmax(tally.img_max_s))
    max_score = float(tally.img_max_s[arg])
    hi_marks = [max_score, tau, *(trigger.modified_scores or [])]
    lo, hi = float(s_all.min()), max(hi_marks)
    # a margin of 2 % of the span, and at least one that float64 can still add to scores near 1e38
    pad = max(0.02 * (hi - lo), 1e-6 * max(abs(lo), abs(hi)), 0.0 if hi > lo else 1.0)
    counts, edges = np.histogram(s_all.astype(np.float64), bins=HISTOGRAM_BINS, range=(lo - pad, hi + pad))
    return DetectorStats(
        threshold=tau, positions=pair.host.positions, samples=int(s_all.size), firings=tally.firings,
        images_firing=int(tally.img_fires.sum()), photos_firing=int(photo_fires.sum()), max_score=max_score,
        max_score_over_threshold=max_score / tau if tau > 0 else math.inf, max_score_image=arg,
        max_score_photo=names[arg], score_quantiles=_quantiles(s_all), histogram_edges=[float(e) for e in edges],
        histogram_counts=[int(k) for k in counts])


def _coverage(pair: _Pair, tally: _Tally, photo_of: np.ndarray, n_photos: int) -> Coverage:
    assert tally.s_all is not None and tally.r_all is not None
    radius = float(pair.key.feature_calibration.radius)
    photo_out = np.bincount(photo_of, weights=~tally.img_inside, minlength=n_photos) > 0
    r_max = float(tally.img_max_r.max())
    return Coverage(radius=radius, samples_inside=tally.inside_samples / tally.s_all.size,
                    images_inside=float(tally.img_inside.mean()), images_outside=int((~tally.img_inside).sum()),
                    photos_outside=int(photo_out.sum()), max_radius=r_max,
                    max_radius_over_r=r_max / radius if radius > 0 else math.inf,
                    radius_quantiles=_quantiles(tally.r_all))


def _photo_level(pair: _Pair, tally: _Tally, photo_of: np.ndarray, info: ImageSetInfo) -> PhotoLevel:
    """The same statements with photos as the independent unit (a photo counts when any of its views does)."""
    n_photos = info.photos
    photo_fires = np.bincount(photo_of, weights=tally.img_fires, minlength=n_photos) > 0
    photo_out = np.bincount(photo_of, weights=~tally.img_inside, minlength=n_photos) > 0
    per_photo_f = (np.bincount(photo_of, weights=tally.cap_sums, minlength=n_photos)
                   / np.bincount(photo_of, minlength=n_photos))
    kp = int(photo_fires.sum())
    upp = bounds.radius_exceedance_bound(kp, n_photos, CONFIDENCE)
    return PhotoLevel(
        photos=n_photos,
        data_driven=bounds.data_driven_bound(per_photo_f, CONFIDENCE),
        mixed=bounds.mixed_bound(pair.key.bound, int(photo_out.sum()), n_photos, CONFIDENCE),
        measured=MeasuredRate(unit="photo", firing=kp, total=n_photos, rate=kp / n_photos, upper=upp,
                              confidence=CONFIDENCE, statement=clopper_statement(kp, n_photos, "photo", upp)),
        statement=(f"Photos as the independent unit: the data-driven bound uses each photo's mean cap sum "
                   f"over its {info.views_per_photo} views, and the mixed bound and measured rate count "
                   f"a photo when any of its views leaves the ball or fires. They hold, at "
                   f"{CONFIDENCE:g} confidence, for a random view of a random photo when the photos are "
                   f"independent draws, whatever the correlation between views."))


def _quantiles(x: np.ndarray) -> dict[str, float]:
    q = np.quantile(x.astype(np.float64, copy=False), [0.5, 0.99, 0.999, 1.0])
    return {k: float(v) for k, v in zip(("50", "99", "99.9", "100"), q, strict=True)}
