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
plumbing is :mod:`onnxstain.runtime`, :mod:`onnxstain.features` and :mod:`onnxstain._onnx.hosts`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import naturalset
from ._onnx.graph import GraphView
from ._onnx.hosts import HostLayer, find_hosts
from ._onnx.inputs import image_input
from ._onnx.io import LoadedModel, load_model, write_bytes_atomic
from .errors import BadInputError, BadKeyError, KeyMismatchError
from .features import neuron_inputs
from .keys import Key, load_key
from .math import bounds, detector
from .math.detection_agreement import per_image_anchor_map
from .preprocess import Preprocessing
from .progress import Progress, Silent
from .runtime import run_batches, session, with_outputs
from .sanity import refuse_nonfinite
from .signature import pearson, top1_margins

REPORT_FORMAT = "onnxstain-evaluate-report"
REPORT_VERSION = 1

CONFIDENCE = 0.95
FRAGILE_MARGIN = 0.05  # an image is "fragile" when its original top-1 margin (logits) is below this
HISTOGRAM_BINS = 100
F32_MAX = float(np.finfo(np.float32).max)  # scores and radii are kept as float32
_PHI_BUDGET = 8_000_000  # floats of φ per chunk (32 MB as float32)
_MAX_CHUNK = 256


# -- result records ------------------------------------------------------------------------------------
@dataclasses.dataclass
class ImageSetInfo:
    """The natural images used, and what they allow statistically."""

    source: str
    images: int
    photos: int
    views_per_photo: int
    height: int
    width: int
    correlation: str


@dataclasses.dataclass
class DetectorStats:
    """Measured on the natural images: the detector's scores at every (image, position) sample."""

    threshold: float
    positions: int
    samples: int  # images × positions
    firings: int  # samples with S > τ
    images_firing: int  # images with S > τ at some position
    photos_firing: int
    max_score: float
    max_score_over_threshold: float
    max_score_image: int
    max_score_photo: str
    score_quantiles: dict[str, float]
    histogram_edges: list[float]
    histogram_counts: list[int]


@dataclasses.dataclass
class Coverage:
    """Measured: how much of the natural data lies inside the ball of radius R the ball bound assumes."""

    radius: float
    samples_inside: float  # fraction of (image, position) samples with ‖φ − c‖ ≤ R
    images_inside: float  # fraction of images with ‖φ − c‖ ≤ R at every position
    images_outside: int
    photos_outside: int
    max_radius: float
    max_radius_over_r: float
    radius_quantiles: dict[str, float]


@dataclasses.dataclass
class MeasuredRate:
    """A measurement (``rate``) and a one-sided Clopper–Pearson upper confidence bound on the true rate."""

    unit: str  # "image" or "photo"
    firing: int
    total: int
    rate: float
    upper: float
    confidence: float
    statement: str


@dataclasses.dataclass
class PhotoLevel:
    """The same statements with photos as the independent unit (views of one photo are correlated)."""

    photos: int
    data_driven: bounds.Bound
    mixed: bounds.Bound
    measured: MeasuredRate
    statement: str


@dataclasses.dataclass
class Fidelity:
    """Measured: the modified model against the original on the same images."""

    images: int
    agreement: float
    differing: int
    differing_fragile: int
    mean_kl: float
    max_kl: float
    max_abs_delta: float
    fragile_fraction: float
    fragile_margin: float
    metric: str = "top-1"  # "correlation" for dense outputs: agreement is then the mean Pearson correlation of
    # the output maps, "differing" counts maps correlating below 0.999, and KL/fragility do not apply (nan)
    min_correlation: float | None = None


@dataclasses.dataclass
class TriggerCheck:
    """The key's trigger through both models, and the verify decision."""

    selected_positions: list[int]
    threshold: float
    modified_scores: list[float] | None  # S at the selected positions (None: no host tensor)
    original_scores: list[float] | None
    modified_fires: bool | None  # S > τ at every selected position
    original_fires: bool | None
    key_scores: list[float]  # recorded in the key at stain time
    stained: bool
    signature_type: str
    signature_score: float
    signature_threshold: float
    original_stained: bool
    original_signature_score: float
    cross_key_bound: bounds.Bound
    checks: list[dict[str, Any]]


@dataclasses.dataclass
class EvaluateResult:
    original: str
    modified: str
    original_sha256: str
    modified_sha256: str
    key_commitment: str
    host: str
    mode: str
    variant: str
    m: int
    threshold: float
    images: ImageSetInfo
    detector: DetectorStats | None
    coverage: Coverage | None
    ball_bound: bounds.Bound
    data_driven_bound: bounds.Bound | None
    mixed_bound: bounds.Bound | None
    measured: MeasuredRate | None
    photo_level: PhotoLevel | None
    fidelity: Fidelity
    trigger: TriggerCheck
    white_box: bool
    notes: list[str]
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        def opt(b: bounds.Bound | None) -> dict[str, Any] | None:
            return None if b is None else {"type": "bound", **b.to_dict()}

        photo = None
        if self.photo_level is not None:
            pl = self.photo_level
            photo = {"photos": pl.photos, "data_driven": opt(pl.data_driven), "mixed": opt(pl.mixed),
                     "measured": {"type": "measurement", **dataclasses.asdict(pl.measured)},
                     "statement": pl.statement}
        trig = dataclasses.asdict(self.trigger)
        trig["cross_key_bound"] = opt(self.trigger.cross_key_bound)
        return _json_safe({
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "original": {"path": self.original, "sha256": self.original_sha256},
            "modified": {"path": self.modified, "sha256": self.modified_sha256},
            "key": {"commitment": self.key_commitment, "host": self.host, "mode": self.mode,
                    "variant": self.variant, "m": self.m, "threshold": self.threshold},
            "images": dataclasses.asdict(self.images),
            "white_box": self.white_box,
            "detector": None if self.detector is None else {"type": "measurement",
                                                            **dataclasses.asdict(self.detector)},
            "coverage": None if self.coverage is None else {"type": "measurement",
                                                            **dataclasses.asdict(self.coverage)},
            "bounds": {
                "ball": opt(self.ball_bound),
                "data_driven": opt(self.data_driven_bound),
                "mixed": opt(self.mixed_bound),
                "measured": None if self.measured is None else {"type": "measurement",
                                                                **dataclasses.asdict(self.measured)},
                "photo_level": photo,
            },
            "fidelity": {"type": "measurement", **dataclasses.asdict(self.fidelity)},
            "trigger": trig,
            "notes": list(self.notes),
            "timings": dict(self.timings),
        })

    def write_json(self, path: str | Path) -> None:
        write_bytes_atomic(path, json.dumps(self.to_dict(), indent=2).encode() + b"\n")

    def write_html(self, path: str | Path) -> None:
        from .report_html import render

        write_bytes_atomic(path, render(self).encode("utf-8"))


def _json_safe(obj: Any) -> Any:
    """Plain JSON: numpy scalars to Python, non-finite floats to "inf"/"-inf"/"nan"."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


# -- helpers -------------------------------------------------------------------------------------------
def _scores_output(view: GraphView, wanted: str, which: str) -> str:
    if wanted in view.output_names:
        return wanted
    if len(view.output_names) == 1:
        return view.output_names[0]
    raise KeyMismatchError(f"the {which} model has no output {wanted!r} the key expects")


def _has_tensor(view: GraphView, name: str) -> bool:
    return name in view.producer or any(i.name == name for i in view.graph_inputs)


def _host_from_key(loaded: LoadedModel, key: Key) -> HostLayer:
    """The key's host layer, rebuilt from the ORIGINAL model and checked against the key."""
    kh = key.host
    match = [h for h in find_hosts(loaded.model) if h.name == kh.name]
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


def _images(images: str | Path | np.ndarray | None, pre: Preprocessing, views: int,
            prog: Progress) -> tuple[np.ndarray, np.ndarray, list[str], ImageSetInfo, np.ndarray]:
    """Pixels, the photo index of every image, a name for every image, the description of the set, and
    the view index of every image (0: the centre crop of a built-in photo, or an image given as is)."""
    if isinstance(images, np.ndarray):
        pixels = images
        if pixels.ndim != 4 or pixels.shape[1:] != (pre.height, pre.width, 3):
            raise BadInputError(f"images must be uint8 [N, {pre.height}, {pre.width}, 3], not {pixels.shape}")
        source, v = "array given by the caller", 1
        photo_of = np.arange(len(pixels))
        names = [f"image {i}" for i in range(len(pixels))]
        view_of = np.zeros(len(pixels), np.int64)
    elif images is not None:
        pixels = naturalset.load_image_dir(images, pre)
        source, v = f"folder {images}", 1
        photo_of = np.arange(len(pixels))
        names = [f"image {i} of the folder" for i in range(len(pixels))]
        view_of = np.zeros(len(pixels), np.int64)
    else:
        with prog.task(f"natural images (held-out photos × {views} views)", total=None):
            nat = naturalset.natural_images("heldout", size=(pre.height, pre.width), views=views)
        if len(nat) == 0:
            raise BadInputError("no held-out natural photos are available on this machine: pass --images DIR")
        pixels = nat.pixels
        _, photo_of = np.unique(np.asarray(nat.photo_ids, dtype=str), return_inverse=True)
        names = [f"{pid} (view {int(k)})" for pid, k in zip(nat.photo_ids, nat.views, strict=True)]
        view_of = np.asarray(nat.views, dtype=np.int64)
        source = "built-in natural photos, held-out split (disjoint from the calibration photos of `stain`)"
        v = views
    n = len(pixels)
    if n == 0:
        raise BadInputError("no images to evaluate on")
    photos = len(np.unique(photo_of))
    if photos < n:
        corr = (f"The {n} images are {v} views of each of {photos} distinct photos. Views of one photo are "
                f"strongly correlated, so statements that treat the images as independent samples are "
                f"optimistic: the number of independent photos ({photos}) is what limits statistical "
                f"statements, and the photo-level bounds are the ones that respect it.")
    else:
        corr = (f"The {n} images are treated as {photos} independent photos; near-duplicates among them would "
                f"make the data-driven statements optimistic.")
    info = ImageSetInfo(source=source, images=n, photos=photos, views_per_photo=v, height=pre.height,
                        width=pre.width, correlation=corr)
    return pixels, np.asarray(photo_of, dtype=np.int64), names, info, view_of


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _quantiles(x: np.ndarray) -> dict[str, float]:
    q = np.quantile(x.astype(np.float64, copy=False), [0.5, 0.99, 0.999, 1.0])
    return {k: float(v) for k, v in zip(("50", "99", "99.9", "100"), q, strict=True)}


def _clopper_statement(k: int, n: int, unit: str, upper: float) -> str:
    lg = math.log10(upper) if upper > 0 else -math.inf
    return (f"Measured: {k} of {n} {unit}s fired (rate {k / n:.3g}). With probability ≥ {CONFIDENCE:g} over the "
            f"sample (if the {unit}s are independent draws from the same distribution), the true per-{unit} "
            f"firing rate of this key is ≤ {bounds.format_probability(lg)} (one-sided Clopper–Pearson).")


# -- the whole job -------------------------------------------------------------------------------------
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
    from .verify import verify

    prog = progress or Silent()
    timings: dict[str, float] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    if int(views) != views or views < 1:
        raise BadInputError(f"--views must be a positive integer, not {views}")
    key = key if isinstance(key, Key) else load_key(key)
    if key.kind != "stain":
        raise BadInputError(f"the key is a {key.kind!r} key; evaluate needs a stain key (use audit_lock for a lock)")
    orig = load_model(original)
    mod = load_model(modified)
    pre = key.preprocessing
    for loaded, which in ((orig, "original"), (mod, "modified")):
        info = image_input(loaded.model)
        key.check_input_size(info.height, info.width, f"the {which} model")
        refuse_nonfinite(loaded, pre, providers, f"the {which} model")
    if orig.sha256 != key.model.source_sha256:
        notes.append("ORIGINAL is not the model the key was made from (its SHA-256 differs from the key's source)")
    if mod.sha256 != key.model.output_sha256:
        notes.append("MODIFIED is not the stained model the key records (its SHA-256 differs)")
    host = _host_from_key(orig, key)
    group = key.host.group or 0
    tap = host.input
    det = key.detector
    if det.direction is None or det.trigger_radii is None:
        raise BadKeyError("the key's detector.direction is missing (a stain key needs it)")
    v = det.direction.array()
    c = det.centre.array()
    tau = float(det.threshold)
    tau0 = float(det.tau0)
    max_draws = det.max_draws
    radius = float(key.calibration.radius)
    sel = np.asarray(key.host.selected_positions, dtype=int)
    ball = key.bound
    oview, mview = GraphView(orig.model), GraphView(mod.model)
    o_scores = _scores_output(oview, key.model.scores, "original")
    m_scores = _scores_output(mview, key.model.scores, "modified")
    white_box = _has_tensor(mview, tap)
    if not white_box:
        notes.append(f"the modified model has no tensor {tap!r} (the detector's input): the detector, radius "
                     "coverage and data-driven bounds are skipped; fidelity and the black-box check still run")
    o_is_input = any(i.name == tap for i in oview.graph_inputs)
    m_is_input = any(i.name == tap for i in mview.graph_inputs)
    o_sess = session(orig.model if o_is_input else with_outputs(orig.model, [tap]), providers)
    m_sess = session(mod.model if (m_is_input or not white_box) else with_outputs(mod.model, [tap]), providers)
    timings["load"] = time.perf_counter() - t0

    # -- images --------------------------------------------------------------------------------------------
    t1 = time.perf_counter()
    pixels, photo_of, names, info, _ = _images(images, pre, int(views), prog)
    if images is not None and views != 16:
        notes.append("--views applies to the built-in photos only; the given images are used as they are")
    timings["images"] = time.perf_counter() - t1

    # -- one streaming pass over both models ---------------------------------------------------------------
    t2 = time.perf_counter()
    n = len(pixels)
    positions = host.positions
    chunk = max(1, min(_MAX_CHUNK, _PHI_BUDGET // max(1, positions * host.m)))
    # Kept per sample (float32, for the histogram and quantiles) and per image (exact, from float64).
    s_all = np.empty((n, positions), np.float32) if white_box else None
    r_all = np.empty((n, positions), np.float32) if white_box else None
    img_fires = np.zeros(n, bool)
    img_inside = np.zeros(n, bool)
    img_max_s = np.zeros(n, np.float64)
    img_max_r = np.zeros(n, np.float64)
    cap_sums = np.zeros(n, np.float64)
    firings = inside_samples = 0
    kl = np.zeros(n, np.float64)
    margins = np.zeros(n, np.float64)
    differ = np.zeros(n, bool)
    max_delta = 0.0
    signature_type = key.signature.kind if key.signature is not None else "class"
    dense = signature_type == "pattern"  # a map output: fidelity is the maps' correlation
    layout = key.detection_layout()  # a detector: fidelity is the detections' (anchor-level) mAP
    corr = np.ones(n, np.float64)
    m_outputs = [m_scores] + ([] if m_is_input or not white_box else [tap])
    with prog.task(f"evaluating on {n} images", total=n) as task:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            x = pre.to_input(pixels[start:stop])
            got = run_batches(m_sess, x, m_outputs, batch=batch)
            ref = run_batches(o_sess, x, [o_scores], batch=batch)[o_scores]
            if s_all is not None and r_all is not None:
                feat = x if m_is_input else got[tap]
                phi = neuron_inputs(host, feat, group)
                if phi.shape[1] != positions:
                    raise KeyMismatchError(f"the detector's input gives {phi.shape[1]} positions; the key has "
                                           f"{positions}")
                sc, rd = detector.scores(phi, v, c), detector.radii(phi, c)
                if not (np.abs(sc) < F32_MAX).all() or not (rd < F32_MAX).all():  # the key's centre or direction
                    raise KeyMismatchError("the key's detector gives scores beyond float32 on these images; the "
                                           "key does not fit this model")
                s_all[start:stop], r_all[start:stop] = sc, rd
                firings += int((sc > tau).sum())
                inside_samples += int((rd <= radius).sum())
                img_fires[start:stop] = (sc > tau).any(axis=1)
                img_inside[start:stop] = (rd <= radius).all(axis=1)
                img_max_s[start:stop], img_max_r[start:stop] = sc.max(axis=1), rd.max(axis=1)
                cap_sums[start:stop] = bounds.per_image_cap_sums(rd, tau0, host.m, draws=max_draws)
            a = ref.reshape(stop - start, -1).astype(np.float64)
            b = got[m_scores].reshape(stop - start, -1).astype(np.float64)
            if a.shape != b.shape:
                raise KeyMismatchError(f"the models give {a.shape[1]} and {b.shape[1]} scores per image")
            if dense:
                corr[start:stop] = pearson(b, a)
            elif layout is not None:
                corr[start:stop] = per_image_anchor_map(a.reshape(-1, *layout), b.reshape(-1, *layout))
            if layout is None:  # a softmax over a detector's anchors × labels would mean nothing
                la, lb = _log_softmax(a), _log_softmax(b)
                kl[start:stop] = np.maximum(0.0, (np.exp(la) * (la - lb)).sum(axis=1))
                margins[start:stop] = top1_margins(a)
                differ[start:stop] = a.argmax(1) != b.argmax(1)
            max_delta = max(max_delta, float(np.abs(a - b).max()))
            task.advance(stop - start)
    fragile = margins < FRAGILE_MARGIN
    if layout is not None:
        nan = float("nan")
        found = corr[~np.isnan(corr)]
        fidelity = Fidelity(images=int(found.size), agreement=float(found.mean()) if found.size else nan,
                            differing=int((found < 1.0).sum()), differing_fragile=0, mean_kl=nan, max_kl=nan,
                            max_abs_delta=max_delta, fragile_fraction=nan, fragile_margin=nan, metric="anchor mAP",
                            min_correlation=float(found.min()) if found.size else nan)
    elif dense:
        nan = float("nan")
        fidelity = Fidelity(images=n, agreement=float(corr.mean()), differing=int((corr < 0.999).sum()),
                            differing_fragile=0, mean_kl=nan, max_kl=nan, max_abs_delta=max_delta,
                            fragile_fraction=nan, fragile_margin=nan, metric="correlation",
                            min_correlation=float(corr.min()))
    else:
        fidelity = Fidelity(images=n, agreement=float(1.0 - differ.mean()), differing=int(differ.sum()),
                            differing_fragile=int((differ & fragile).sum()), mean_kl=float(kl.mean()),
                            max_kl=float(kl.max()), max_abs_delta=max_delta,
                            fragile_fraction=float(fragile.mean()), fragile_margin=FRAGILE_MARGIN)
    timings["pass"] = time.perf_counter() - t2

    # -- trigger ---------------------------------------------------------------------------------------------
    t3 = time.perf_counter()
    with prog.task("trigger and signature", total=None):
        x_t = pre.to_input(key.trigger_pixels())
        trig_scores: dict[str, np.ndarray | None] = {}
        for which, sess, is_input, has in (("modified", m_sess, m_is_input, white_box),
                                           ("original", o_sess, o_is_input, True)):
            if not has:
                trig_scores[which] = None
                continue
            feat = x_t if is_input else run_batches(sess, x_t, [tap])[tap]
            trig_scores[which] = detector.scores(neuron_inputs(host, feat, group)[0], v, c)
        rep = verify(mod.path, key, providers=providers)
        rep_orig = verify(orig.path, key, providers=providers)
    key_trig = det.trigger_scores.array()
    s_mod, s_orig = trig_scores["modified"], trig_scores["original"]
    if s_mod is not None and np.abs(s_mod - key_trig).max() > 1e-3 * max(1.0, tau):
        notes.append(f"the trigger's detector scores in MODIFIED differ from those recorded in the key by up to "
                     f"{np.abs(s_mod - key_trig).max():.3g} (the layers before the host have changed)")
    trigger = TriggerCheck(
        selected_positions=[int(p) for p in sel], threshold=tau,
        modified_scores=None if s_mod is None else [float(s) for s in s_mod[sel]],
        original_scores=None if s_orig is None else [float(s) for s in s_orig[sel]],
        modified_fires=None if s_mod is None else bool((s_mod[sel] > tau).all()),
        original_fires=None if s_orig is None else bool((s_orig[sel] > tau).all()),
        key_scores=[float(s) for s in key_trig[sel]],
        stained=rep.stained, signature_type=signature_type,
        signature_score=rep.score, signature_threshold=rep.threshold,
        original_stained=rep_orig.stained, original_signature_score=rep_orig.score,
        cross_key_bound=rep.fpr_bound, checks=[dataclasses.asdict(ch) for ch in rep.checks])
    timings["trigger"] = time.perf_counter() - t3

    # -- statistics and bounds ------------------------------------------------------------------------------
    t4 = time.perf_counter()
    det_stats = coverage = None
    data_driven = mixed = None
    measured = None
    photo_level = None
    if s_all is not None and r_all is not None:
        n_photos = info.photos
        photo_fires = np.bincount(photo_of, weights=img_fires, minlength=n_photos) > 0
        arg = int(np.argmax(img_max_s))
        max_score = float(img_max_s[arg])
        hi_marks = [max_score, tau, *(trigger.modified_scores or [])]
        lo, hi = float(s_all.min()), max(hi_marks)
        pad = 0.02 * (hi - lo) if hi > lo else 1.0
        counts, edges = np.histogram(s_all.astype(np.float64), bins=HISTOGRAM_BINS, range=(lo - pad, hi + pad))
        det_stats = DetectorStats(
            threshold=tau, positions=positions, samples=int(s_all.size), firings=firings,
            images_firing=int(img_fires.sum()), photos_firing=int(photo_fires.sum()), max_score=max_score,
            max_score_over_threshold=max_score / tau if tau > 0 else math.inf, max_score_image=arg,
            max_score_photo=names[arg],
            score_quantiles=_quantiles(s_all), histogram_edges=[float(e) for e in edges],
            histogram_counts=[int(k) for k in counts])
        k_out = int((~img_inside).sum())
        photo_out = np.bincount(photo_of, weights=~img_inside, minlength=n_photos) > 0
        r_max = float(img_max_r.max())
        coverage = Coverage(radius=radius, samples_inside=inside_samples / s_all.size,
                            images_inside=float(img_inside.mean()), images_outside=k_out,
                            photos_outside=int(photo_out.sum()), max_radius=r_max,
                            max_radius_over_r=r_max / radius if radius > 0 else math.inf,
                            radius_quantiles=_quantiles(r_all))
        f = cap_sums
        data_driven = bounds.data_driven_bound(f, CONFIDENCE)
        mixed = bounds.mixed_bound(ball, k_out, n, CONFIDENCE)
        k_fire = int(img_fires.sum())
        up = bounds.radius_exceedance_bound(k_fire, n, CONFIDENCE)
        measured = MeasuredRate(unit="image", firing=k_fire, total=n, rate=k_fire / n, upper=up,
                                confidence=CONFIDENCE, statement=_clopper_statement(k_fire, n, "image", up))
        if n_photos < n:
            per_photo_f = np.bincount(photo_of, weights=f, minlength=n_photos) / np.bincount(photo_of,
                                                                                             minlength=n_photos)
            kp = int(photo_fires.sum())
            upp = bounds.radius_exceedance_bound(kp, n_photos, CONFIDENCE)
            photo_level = PhotoLevel(
                photos=n_photos,
                data_driven=bounds.data_driven_bound(per_photo_f, CONFIDENCE),
                mixed=bounds.mixed_bound(ball, int(photo_out.sum()), n_photos, CONFIDENCE),
                measured=MeasuredRate(unit="photo", firing=kp, total=n_photos, rate=kp / n_photos, upper=upp,
                                      confidence=CONFIDENCE,
                                      statement=_clopper_statement(kp, n_photos, "photo", upp)),
                statement=(f"Photos as the independent unit: the data-driven bound uses each photo's mean cap sum "
                           f"over its {info.views_per_photo} views, and the mixed bound and measured rate count "
                           f"a photo when any of its views leaves the ball or fires. They hold, at "
                           f"{CONFIDENCE:g} confidence, for a random view of a random photo when the photos are "
                           f"independent draws, whatever the correlation between views."))
        if k_fire:
            notes.append(f"the detector fired on {k_fire} natural image(s) (max score {max_score:.4g} > τ = {tau:.4g})")
        if k_out:
            notes.append(f"{k_out} image(s) have a feature outside the calibration radius R = {radius:.4g} (max "
                         f"{r_max:.4g}); the ball bound does not cover them, the mixed bound does")
    timings["bounds"] = time.perf_counter() - t4
    timings["total"] = time.perf_counter() - t0
    return EvaluateResult(
        original=str(orig.path), modified=str(mod.path), original_sha256=orig.sha256, modified_sha256=mod.sha256,
        key_commitment=key.commitment, host=host.name, mode=key.mode, variant=key.variant,
        m=host.m, threshold=tau, images=info, detector=det_stats, coverage=coverage, ball_bound=ball,
        data_driven_bound=data_driven, mixed_bound=mixed, measured=measured, photo_level=photo_level,
        fidelity=fidelity, trigger=trigger, white_box=white_box, notes=notes, timings=timings)

