"""Lock audit: does the locked model stay useless without its patch, and exact with it?

``audit_lock(original, locked, key)`` runs both models on a natural-image set (by default the
built-in *held-out* photos, disjoint from the calibration photos ``lock`` uses) under every
condition a user cares about and reports top-1 agreement with the original model:

* **no patch** — the locked model on clean images, against chance (1/K); a head of two answers (two classes,
  or one logit read as its sign) by Cohen's kappa with the original's answers, since there a low agreement
  is the original relabelled, not a lock;
* **patch, same image** — locked and original on the *same* patched images (is the lock exact?);
* **patch vs clean** — the locked model on patched images against the original on clean ones (what
  a user of the unlocked model sees, the patch's occlusion included), over all images and over the
  centre crops (view 0 of each photo, the standard evaluation transform);
* **wrong patches** — a random patch of the same size, the patch in each other corner, shifted by
  1 and 2 pixels, and the patched image re-encoded as JPEG quality 90: each must stay locked;
* **natural firings** (white-box, from the host's input in the original model): the detectors'
  AND at every (image, position) sample, the key's bound, a data-driven bound from the held-out
  radii and the measured rate with its Clopper–Pearson upper bound.

Everything is measured with onnxruntime on the real models. The math is numpy and
:mod:`onnxstain.math.bounds`; the ONNX plumbing is :mod:`onnxstain.runtime` and
:mod:`onnxstain.features`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .._lock.geometry import lock_hosts
from .._lock.window import WINDOW, pixel_conv, window_host
from .._onnx.graph import GraphView
from .._onnx.head import decision_threshold
from .._onnx.inputs import image_input
from .._onnx.io import load_model, write_bytes_atomic
from ..errors import BadInputError, BadModelError, KeyMismatchError
from ..features import neuron_inputs
from ..keys import Key
from ..math import bounds
from ..math.agreement import chance_agreement, cohen_kappa
from ..math.shuffle import placed_blocks
from ..patch import Patch, paste_pixels
from ..preprocess import Preprocessing
from ..progress import Progress, Silent
from ..runtime import image_rows, run_batches, session, with_outputs
from ..sanity import refuse_nonfinite
from ..verify import key_patch, white_box_signal
from .inputs import evaluation_images, scores_output
from .lock_audit_result import (
    EXACT,
    KAPPA_LOCKED,
    LOCKED_CORRELATION,
    LOCKED_MAP,
    PATCH_COST,
    SLACK,
    Condition,
    LockAuditRecord,
    NaturalFirings,
)
from .lock_html import render
from .matching import OutputMatch
from .records import CONFIDENCE, ImageSetInfo, clopper_statement, json_safe


@dataclasses.dataclass
class LockAuditResult(LockAuditRecord):
    """The lock audit's result, with its JSON and HTML writers."""

    def to_dict(self) -> dict[str, Any]:
        return json_safe(self.report())

    def write_json(self, path: str | Path) -> None:
        write_bytes_atomic(path, json.dumps(self.to_dict(), indent=2).encode() + b"\n")

    def write_html(self, path: str | Path) -> None:
        write_bytes_atomic(path, render(self).encode("utf-8"))


# -- wrong patches ---------------------------------------------------------------------------------------
def _moved(patch: Patch, top: int, left: int) -> Patch:
    return Patch(patch.pixels, top, left)


def _jpeg(images: np.ndarray, quality: int = 90) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as dec:
            out[i] = np.asarray(dec.convert("RGB"))
    return out


def variants(patch: Patch, height: int, width: int, seed: int) -> dict[str, tuple[str, Any]]:
    """The wrong-patch conditions: name → (description, function uint8 images → uint8 images)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, patch.pixels.shape, dtype=np.uint8)
    h, w = patch.height, patch.width
    out: dict[str, tuple[str, Any]] = {
        "random patch": ("a uniform-noise patch of the same size at the same place",
                         lambda x: paste_pixels(x, Patch(noise, patch.top, patch.left)))}
    corners = {"top-right": (patch.top, width - w - patch.left), "bottom-left": (height - h - patch.top, patch.left),
               "bottom-right": (height - h - patch.top, width - w - patch.left)}
    for name, (t, lft) in corners.items():
        moved = _moved(patch, t, lft)
        out[f"patch at {name}"] = (f"the patch in the {name} corner", lambda x, p=moved: paste_pixels(x, p))
    for s in (1, 2):
        if patch.top + s + h <= height and patch.left + s + w <= width:
            moved = _moved(patch, patch.top + s, patch.left + s)
            out[f"shifted {s} px"] = (f"the patch shifted {s} pixel(s) down and right",
                                      lambda x, p=moved: paste_pixels(x, p))
    out["JPEG q90"] = ("the patched image re-encoded as JPEG quality 90", lambda x: _jpeg(paste_pixels(x, patch)))
    return out


def _lock_host_from_key(loaded, key: Key, pre: Preprocessing):
    """The key's detector host, rebuilt from the ORIGINAL model (a Conv, or a window of its pixels)."""
    kh = key.host
    view = GraphView(loaded.model, pre.input_shape())  # at the key's input size (dynamic height and width)
    hosts = lock_hosts(loaded.model, view)
    if kh.name == WINDOW:
        conv = pixel_conv(view, hosts, pre.height, pre.width, pre.channels)
        hosts = [] if conv is None else [window_host(conv, kh.kernel[0])]
    match = [h for h in hosts if h.name == kh.name]
    if not match or match[0].input != kh.input or match[0].m != kh.m:
        raise KeyMismatchError(f"the original model has no detector host {kh.name!r} as the key describes it")
    if kh.detector_positions is not None and max(kh.detector_positions) >= match[0].positions:
        raise KeyMismatchError(f"the key's host.detector_positions has position {max(kh.detector_positions)}; "
                               f"layer {kh.name!r} of the original model has {match[0].positions}")
    return match[0]


# -- the audit -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Setup:
    """Both models loaded and checked against the key, their sessions, the patch and the detector."""

    orig: Any  # LoadedModel
    lck: Any
    pre: Preprocessing
    patch: Patch
    host: Any  # the detector's HostLayer in the original model (None: a shuffle lock, which has no detector)
    o_sess: Any
    l_sess: Any
    o_scores: str
    l_scores: str
    l_outputs: list[str]
    has_fired: bool
    dirs: np.ndarray
    centre: np.ndarray
    tau0: float
    notes: list[str]


def _setup(original: str | Path, locked: str | Path, key: Key, providers: list[str] | None) -> _Setup:
    if key.kind != "lock":
        raise BadInputError(f"the key is a {key.kind!r} key; the lock audit needs a lock key")
    notes: list[str] = []
    orig, lck = load_model(original), load_model(locked)
    for loaded, which in ((orig, "original"), (lck, "locked")):
        size = image_input(loaded.model)
        key.check_input_size(size.height, size.width, f"the {which} model")
    if orig.sha256 != key.model.source_sha256:
        notes.append("ORIGINAL is not the model the key was made from (its SHA-256 differs from the key's source)")
    if lck.sha256 != key.model.output_sha256:
        notes.append("LOCKED is not the locked model the key records (its SHA-256 differs)")
    pre = key.preprocessing
    for loaded, which in ((orig, "original"), (lck, "locked")):
        refuse_nonfinite(loaded, pre, providers, f"the {which} model")
    patch = key_patch(key)
    host = None if key.shuffle is not None else _lock_host_from_key(orig, key, pre)
    o_scores = scores_output(GraphView(orig.model), key.model.scores, "original")
    lview = GraphView(lck.model)
    l_scores = scores_output(lview, key.model.scores, "locked")
    fired = key.white_box.tensor
    has_fired = fired in lview.producer
    o_sess = session(with_outputs(orig.model, [host.input]) if host is not None else orig.model, providers)
    l_sess = session(with_outputs(lck.model, [fired]) if has_fired else lck.model, providers)
    if key.shuffle is not None:  # no detector: the "score" is the blocks an image's corner puts in place
        dirs, centre, tau0 = np.zeros((0, 1)), np.zeros(1), float(key.bound.params["placed"])
    else:
        det = key.feature_detector
        if det.directions is None:
            raise BadInputError("the key's detector.directions is missing (a lock key needs it)")
        dirs, centre, tau0 = det.directions.array(), det.centre.array(), float(det.tau0)
    return _Setup(orig=orig, lck=lck, pre=pre, patch=patch, host=host, o_sess=o_sess, l_sess=l_sess,
                  o_scores=o_scores, l_scores=l_scores, l_outputs=[l_scores] + ([fired] if has_fired else []),
                  has_fired=has_fired, dirs=dirs, centre=centre, tau0=tau0, notes=notes)


@dataclasses.dataclass
class _Tally:
    """Per image and condition: agreement with the original, the gate's signal, the detectors' weakest
    natural score and radius at every position."""

    vs_clean: dict[str, np.ndarray]  # the locked model on each condition vs the original on the clean image
    gate: dict[str, np.ndarray]
    same_patched: np.ndarray  # locked vs original, both on the patched image
    orig_patch: np.ndarray  # original on the patched image vs on the clean one
    s_weak: np.ndarray  # [N, positions]
    radii: np.ndarray
    max_delta: float = 0.0
    # two-answer heads: the original's answers on the clean images, and the locked model's under each condition
    reference: list[np.ndarray] = dataclasses.field(default_factory=list)
    answers: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(cls, n: int, positions: int, conditions: list[str]) -> _Tally:
        return cls(vs_clean={k: np.empty(n) for k in conditions}, gate={k: np.zeros(n) for k in conditions},
                   same_patched=np.empty(n), orig_patch=np.empty(n), s_weak=np.empty((n, positions)),
                   radii=np.empty((n, positions)), answers={k: [] for k in conditions})

    def kappa(self, name: str) -> float | None:
        """Cohen's kappa of condition ``name``'s answers with the original's (two-answer heads), else None."""
        if not self.reference or not self.reference[0].size:
            return None
        return cohen_kappa(np.concatenate(self.answers[name]), np.concatenate(self.reference))


def _run(st: _Setup, key: Key, pixels: np.ndarray, wrong: dict[str, tuple[str, Any]], match: OutputMatch,
         positions: int, prog: Progress, batch: int) -> _Tally:
    """Both models on every condition, in chunks of 64 images."""
    n, pre = len(pixels), st.pre
    tally = _Tally.empty(n, positions, ["no patch", "patch", *wrong])
    det_pos = key.host.detector_positions
    chunk = 64
    with prog.task(f"lock audit on {n} images × {2 + len(wrong)} conditions", total=n) as task:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            rows = slice(start, stop)
            clean = pixels[rows]
            patched = paste_pixels(clean, st.patch)
            o_clean = run_batches(st.o_sess, pre.to_input(clean),
                                  [st.o_scores] + ([st.host.input] if st.host is not None else []), batch=batch)
            o_patch = run_batches(st.o_sess, pre.to_input(patched), [st.o_scores], batch=batch)[st.o_scores]
            o_patch = image_rows(o_patch, st.o_scores, stop - start)
            ref = image_rows(o_clean[st.o_scores], st.o_scores, stop - start)
            tally.orig_patch[rows] = match(o_patch, ref)
            tally.reference.append(match.answers(ref))
            if st.host is not None:
                phi = neuron_inputs(st.host, o_clean[st.host.input]).astype(np.float64)
                if det_pos is not None:  # a detector reading one position's window only (dense-output gate locks)
                    phi = phi[:, np.asarray(det_pos, dtype=int)]
                proj = np.einsum("npm,dm->ndp", phi, st.dirs) - (st.dirs @ st.centre)[None, :, None]
                tally.s_weak[rows] = proj.min(axis=1)
                tally.radii[rows] = np.linalg.norm(phi - st.centre, axis=-1)
            inputs = {"no patch": clean, "patch": patched} | {k: fn(clean) for k, (_, fn) in wrong.items()}
            for name, x in inputs.items():
                got = run_batches(st.l_sess, pre.to_input(x), st.l_outputs, batch=batch)
                scores = image_rows(got[st.l_scores], st.l_scores, stop - start)
                if scores.shape[1] != ref.shape[1]:
                    raise BadModelError(f"the locked model gives {scores.shape[1]} scores per image; the original "
                                        f"gives {ref.shape[1]}")
                tally.vs_clean[name][rows] = match(scores, ref)
                tally.answers[name].append(match.answers(scores))
                if st.has_fired and key.shuffle is not None:
                    placed = placed_blocks(got[st.l_outputs[1]], np.asarray(key.shuffle.order))
                    tally.gate[name][rows] = placed == key.shuffle.blocks  # open: every block in place
                    if name == "no patch":
                        tally.s_weak[rows, 0] = placed
                elif st.has_fired:
                    tally.gate[name][rows] = white_box_signal(got[st.l_outputs[1]], key.white_box)
                if name == "patch":
                    tally.same_patched[rows] = match(scores, o_patch)
                    delta = float(np.abs(scores.astype(np.float64) - o_patch).max())
                    tally.max_delta = max(tally.max_delta, delta)
            task.advance(stop - start)
    return tally


def _conditions(tally: _Tally, wrong: dict[str, tuple[str, Any]], match: OutputMatch, chance: float,
                centre_mask: np.ndarray | None, has_fired: bool) -> list[Condition]:
    """Every condition's agreement (over all images and the centre crops) and whether it passes."""

    def cond(name: str, desc: str, per_image: np.ndarray, expect: str, delta: float | None = None) -> Condition:
        agree = _mean(per_image)
        c_agree = _mean(per_image[centre_mask]) if centre_mask is not None else None
        kappa = tally.kappa(name) if expect == "locked" else None
        if kappa is not None:
            ok = abs(kappa) <= KAPPA_LOCKED
        elif expect == "locked":
            ok = (agree < LOCKED_CORRELATION if match.dense else
                  agree <= (LOCKED_MAP if match.layout else chance + SLACK))
        elif expect == "exact":
            ok = agree >= EXACT
        else:
            ok = (c_agree if c_agree is not None else agree) >= PATCH_COST
        g = tally.gate.get(name)
        return Condition(name=name, description=desc, images=len(per_image), agreement=agree,
                         centre_agreement=c_agree,
                         unlocked=float((g > 0).mean()) if has_fired and g is not None else None,
                         mean_gate=float(g.mean()) if has_fired and g is not None else None,
                         max_abs_delta=delta, expect=expect, passed=ok, kappa=kappa)

    conditions = [
        cond("no patch", "locked model, clean image, vs the original on the clean image", tally.vs_clean["no patch"],
             "locked"),
        cond("patch", "locked model, patched image, vs the original on the same patched image", tally.same_patched,
             "exact", tally.max_delta),
        dataclasses.replace(cond("patch", "", tally.vs_clean["patch"], "close"), name="patch vs clean",
                            description="locked model, patched image, vs the original on the clean image "
                                        "(the patch's own cost)"),
        dataclasses.replace(cond("patch", "", tally.orig_patch, "close"), name="original with patch",
                            description="original model, patched image, vs the original on the clean image",
                            unlocked=None, mean_gate=None),
    ]
    for name, (desc, _) in wrong.items():
        conditions.append(cond(name, f"locked model, {desc}, vs the original on the clean image",
                               tally.vs_clean[name], "locked"))
    return conditions


def audit_lock(
    original: str | Path,
    locked: str | Path,
    key: Key,
    images: str | Path | np.ndarray | None = None,
    views: int = 16,
    providers: list[str] | None = None,
    progress: Progress | None = None,
    batch: int = 32,
) -> LockAuditResult:
    """Measure the lock of ``key`` in ``locked`` against ``original`` on natural images (see the module doc)."""
    prog = progress or Silent()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    st = _setup(original, locked, key, providers)
    notes = st.notes
    d = int(st.dirs.shape[0])
    timings["load"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    info: ImageSetInfo
    pixels, _, _, info, view_of = evaluation_images(images, st.pre, int(views), prog)
    n = len(pixels)
    centre_mask = view_of == 0
    has_centre = bool(centre_mask.any()) and not bool(centre_mask.all())
    wrong = variants(st.patch, st.pre.height, st.pre.width, seed=key.seed % (2**31))
    timings["images"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    match = OutputMatch(key, decision_threshold(GraphView(st.orig.model), st.o_scores))
    det_pos = key.host.detector_positions
    positions = 1 if st.host is None else len(det_pos) if det_pos is not None else st.host.positions
    tally = _run(st, key, pixels, wrong, match, positions, prog, batch)
    timings["pass"] = time.perf_counter() - t2

    k = key.model.classes
    chance = 0.0 if match.dense or match.layout is not None else chance_agreement(k)
    conditions = _conditions(tally, wrong, match, chance, centre_mask if has_centre else None, st.has_fired)
    jpeg = next(c for c in conditions if c.name == "JPEG q90")
    if jpeg.unlocked:
        notes.append(f"the JPEG-re-encoded patch opens the lock, at least partly, on {100 * jpeg.unlocked:.1f}% "
                     f"of images (mean gate {jpeg.mean_gate:.2f} of 1): JPEG keeps enough of the patch for its "
                     "detectors to pass their margin; give images to the locked model losslessly")
    # a shuffle lock's natural "firing": an image whose corner puts the bound's count of blocks in place
    fires = tally.s_weak >= st.tau0 if st.host is None else tally.s_weak > st.tau0
    firings = NaturalFirings(detectors=d, positions=positions, samples=int(fires.size), firings=int(fires.sum()),
                             images_firing=int(fires.any(axis=1).sum()), max_weakest_score=float(tally.s_weak.max()),
                             threshold=st.tau0)
    data_bound: bounds.Bound | None = None  # a shuffle lock's key bound holds for every input (data-free)
    if st.host is not None:
        det = key.feature_detector
        cap_sums = bounds.per_image_cap_sums(tally.radii, st.tau0, st.host.m, detectors=d, draws=det.max_draws)
        data_bound = bounds.data_driven_bound(cap_sums, CONFIDENCE)
    k_fire = firings.images_firing
    upper = bounds.radius_exceedance_bound(k_fire, n, CONFIDENCE)
    timings["total"] = time.perf_counter() - t0
    orig, lck, patch = st.orig, st.lck, st.patch
    return LockAuditResult(
        original=str(orig.path), locked=str(lck.path), original_sha256=orig.sha256, locked_sha256=lck.sha256,
        key_commitment=key.commitment, lock_kind=key.mode, host=key.host.name if st.host is None else st.host.name,
        patch_box=(patch.top, patch.left, patch.height, patch.width), classes=k, chance=chance, images=info,
        centre_crops=int(centre_mask.sum()) if has_centre else 0, conditions=conditions, firings=firings,
        key_bound=key.bound, data_driven_bound=data_bound, measured_upper=upper,
        measured_statement=clopper_statement(k_fire, n, "image", upper), notes=notes, timings=timings,
        metric=match.metric)


def _mean(values: np.ndarray) -> float:
    """The mean of the per-image values that exist (a detector's images with no reference detection are NaN)."""
    found = values[~np.isnan(values)]
    return float(found.mean()) if found.size else float("nan")
