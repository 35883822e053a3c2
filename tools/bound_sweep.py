"""Theory vs practice: measured false-positive rates of random-direction detectors next to their bounds.

For each *setting* (features, margin ε = τ/R) the sweep draws K keys ``v`` uniformly on the sphere
(``detector.sample_direction`` with a seeded ``numpy.random.default_rng``) and counts, on held-out
samples, how often ``v·(φ−c) > τ``. The bounds of ``onnxstain.math.bounds`` are probabilities over the
key for a fixed input, so the quantity they bound is the rate averaged over keys:

* **per sample** (image × position): mean over keys of the fraction of held-out samples *inside R*
  that fire, vs the worst case ``cap_probability(τ/R, n)``. Samples outside R are not covered by
  that bound: they are counted and reported separately (and the rate over all samples is shown too).
  Also per input: the largest fraction of keys firing on one covered sample (the bound holds for
  *every* input in the ball; checked with a Bonferroni-corrected binomial test over the samples).
* **per image** (fires at any of its P evaluated positions): mean over keys of the fraction of
  covered images that fire, vs ``ball_bound(τ, R, n, positions=P)`` = min(1, P·cap); and the rate
  over all held-out images vs the data-driven bound ``data_driven_bound(per_image_cap_sums(radii))``
  (95 % confidence over the sample).
* **cross-key**: key A's trigger firing an independent key B's detector, vs ``cross_key_bound``.
  Synthetic features: the trigger is the point ``c + r_T·v_A`` (the maximiser of v_A·(f−c) on the
  sphere of radius r_T). MobileNetV2 (features.2, features.4): *stand-in* trigger = the held-out
  sample with the largest score for v_A (no gradient search), as one position and as its whole image.

The worst single key's rate over the samples is shown for information: it is a rate over inputs for
one fixed key, which the bounds do not cover.

Feature sources:

* ``synthetic`` (fully controlled), dimension n ∈ ``--dims``:
  ``sphere`` — points uniform on the sphere of radius R = 1 around the known centre c = 0: the exact
  cap is the truth, the per-sample bound is tight (the measured mean equals it in expectation);
  ``gauss`` — isotropic Gaussian, ``aniso`` — Gaussian with standard deviations 1/k: c and R = max
  ‖φ−c‖ estimated from a calibration draw, as for real features. ``--positions`` i.i.d. points form
  one "image".
* ``mobilenet``: inputs of the 1×1 expansion convs of features.2/4/8/12 and of the last conv
  features.18 of MobileNetV2, tapped with onnxruntime; c and R from ``natural_images("calibration")``
  (every position), measured on ``natural_images("heldout")`` at ``--real-positions`` random
  positions per image (counts recorded).

``ok`` = every check of the row passes allowing Monte-Carlo error: the measured count over
keys × samples is within the one-sided ``--confidence`` (99 %) binomial acceptance limit at p = bound
(p-value ≥ 1 %). Where a bound is exactly tight (synthetic ``sphere``, synthetic cross-key, the
MobileNetV2 stand-in position), each such check fails by chance 1 % of the time, so ``ok_fw`` repeats
the test with a Bonferroni correction over all the checks of the sweep (99 % family-wise); the
verdict and the exit code use ``ok_fw``. The binomial model is exact for the synthetic sphere (trials
are pairwise uncorrelated) and for cross-key rows (fresh keys B per trigger); for real features,
samples of one image are correlated, the true spread is wider, and the test errs towards flagging.
``raw_ok`` is the plain comparison measured mean ≤ bound; a raw exceedance is flagged loudly
(``flag`` column, stdout) with its p-value.
Settings whose bound predicts fewer than ``--min-expected`` firings over all trials are skipped as
not measurable. ``--bound-scale`` multiplies every bound (a self-test of the flagging: 0.25 must be
flagged).

Writes ``bound_sweep.{md,csv,json}``, ``cross_key.csv`` and ``bound_sweep.png`` to ``--out``.

    python tools/bound_sweep.py                 # full sweep (synthetic + MobileNetV2, a few minutes)
    python tools/bound_sweep.py --quick         # synthetic only, a few seconds
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from onnxstain.math import bounds, detector

DEFAULT_EPS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
QUICK_EPS = (0.05, 0.2, 0.4, 0.6)
DEFAULT_LAYERS = ("features.2", "features.4", "features.8", "features.12", "features.18")
CROSS_LAYERS = ("features.2", "features.4")
DISTS = ("sphere", "gauss", "aniso")
KEY_CHUNK = 64
DD_CONFIDENCE = 0.95

ROW_COLUMNS = (
    "source", "layer", "n", "dist", "eps", "tau", "R", "keys", "images", "positions", "samples",
    "samples_outside_R", "frac_outside_R", "images_outside_R",
    "meas_sample", "meas_sample_max_key", "meas_sample_all", "pred_sample", "bound_sample", "ratio_sample",
    "p_sample", "ok_sample", "raw_ok_sample",
    "max_input_rate", "p_input", "ok_input",
    "meas_image", "meas_image_all", "bound_image", "ratio_image", "p_image", "ok_image", "raw_ok_image",
    "dd_bound", "ratio_dd", "p_dd", "ok_dd", "raw_ok_dd",
    "p_min", "ok", "ok_fw", "raw_ok", "flag",
)
CROSS_COLUMNS = (
    "source", "layer", "n", "trigger", "eps", "tau", "R", "r_T", "keys_A", "keys_B", "positions",
    "measured", "bound", "ratio", "p_value", "ok", "ok_fw", "raw_ok", "flag",
)


# -- statistics ----------------------------------------------------------------------------------------
def binom_check(count: int, trials: int, bound: float, confidence: float) -> tuple[float, bool, bool]:
    """(p-value, ok, raw_ok) of "the true rate is ≤ ``bound``" given ``count`` firings in ``trials``.

    ``ok``: ``count`` is within the one-sided ``confidence`` binomial acceptance limit at p = bound
    (i.e. the measured rate is not significantly above the bound). ``raw_ok``: count/trials ≤ bound.
    """
    if trials <= 0:
        return 1.0, True, True
    raw_ok = count <= bound * trials
    if bound >= 1.0:
        return 1.0, True, True
    if count == 0:
        return 1.0, True, True
    p_value = float(stats.binom.sf(count - 1, trials, bound))
    return p_value, p_value >= 1.0 - confidence, raw_ok


def ratio(bound: float, measured: float) -> float:
    return bound / measured if measured > 0 else math.nan


def flag_text(raw_ok: bool, ok: bool, p_value: float) -> str:
    if not ok:
        return f"above the bound at the per-row level (p={p_value:.2g})"
    if not raw_ok:
        return f"RAW>BOUND within MC error (p={p_value:.2g})"
    return ""


# -- measurement ---------------------------------------------------------------------------------------
def measure_setting(
    feats: np.ndarray,
    keys: np.ndarray,
    eps_list: Sequence[float],
    radius: float,
    *,
    confidence: float,
    min_expected: float,
    bound_scale: float = 1.0,
    info: dict[str, Any],
) -> tuple[list[dict[str, Any]], int]:
    """Rows for one feature set and key set over the margins ``eps_list`` (τ = ε·R).

    ``feats``: centred held-out features ``[N_img, P, n]``; ``keys``: ``[K, n]`` unit directions.
    Returns the rows and the number of margins skipped as not measurable.
    """
    n_img, n_pos, n = feats.shape
    k_keys = keys.shape[0]
    flat = np.ascontiguousarray(feats.reshape(-1, n), dtype=np.float64)
    radii = np.linalg.norm(flat, axis=1)
    cov = radii <= radius * (1 + 1e-9)  # points exactly on the sphere of radius R are inside
    cov_img = cov.reshape(n_img, n_pos).all(axis=1)
    n_cov, n_cov_img = int(cov.sum()), int(cov_img.sum())
    taus = np.asarray(eps_list, dtype=np.float64) * radius
    n_eps = len(taus)

    fire_cov = np.zeros((n_eps, k_keys), np.int64)  # per key: firing covered samples
    fire_all = np.zeros((n_eps, k_keys), np.int64)
    img_cov = np.zeros((n_eps, k_keys), np.int64)  # per key: firing covered images
    img_all = np.zeros((n_eps, k_keys), np.int64)
    per_input = np.zeros((n_eps, flat.shape[0]), np.int64)  # per sample: firing keys
    for start in range(0, k_keys, KEY_CHUNK):
        v = keys[start : start + KEY_CHUNK]
        s = flat @ v.T  # [N, kb]
        sl = slice(start, start + len(v))
        for j, tau in enumerate(taus):
            fire = s > tau
            fire_all[j, sl] = fire.sum(axis=0)
            fire_cov[j, sl] = fire[cov].sum(axis=0)
            per_input[j] += fire.sum(axis=1)
            any_img = fire.reshape(n_img, n_pos, -1).any(axis=1)
            img_all[j, sl] = any_img.sum(axis=0)
            img_cov[j, sl] = any_img[cov_img].sum(axis=0)

    rows: list[dict[str, Any]] = []
    skipped = 0
    r_img = radii.reshape(n_img, n_pos)
    for j, (eps, tau) in enumerate(zip(eps_list, taus, strict=True)):
        cap = float(bounds.cap_probability(float(eps), n))
        if cap * k_keys * max(n_cov, 1) < min_expected:
            skipped += 1
            continue
        bound_s = bound_scale * float(bounds.ball_bound(float(tau), radius, n).value)
        bound_i = bound_scale * float(bounds.ball_bound(float(tau), radius, n, positions=n_pos).value)
        f_i = bounds.per_image_cap_sums(r_img, float(tau), n)
        dd = bound_scale * float(bounds.data_driven_bound(f_i, DD_CONFIDENCE).value)
        with np.errstate(divide="ignore"):
            pred = float(np.mean(bounds.cap_probability(tau / np.maximum(radii[cov], 1e-300), n))) if n_cov else 0.0

        trials_s = k_keys * n_cov
        cnt_s = int(fire_cov[j].sum())
        meas_s = cnt_s / trials_s if trials_s else math.nan
        p_s, ok_s, raw_s = binom_check(cnt_s, trials_s, bound_s, confidence)

        # every input in the ball: the most-fired covered sample, Bonferroni over the covered samples
        k_max = int(per_input[j][cov].max()) if n_cov else 0
        p_in = float(stats.binom.sf(k_max - 1, k_keys, bound_s)) if k_max > 0 and bound_s < 1 else 1.0
        p_in = min(1.0, p_in * max(n_cov, 1))  # Bonferroni over the covered samples
        ok_in = p_in >= 1.0 - confidence

        trials_i = k_keys * n_cov_img
        cnt_i = int(img_cov[j].sum())
        meas_i = cnt_i / trials_i if trials_i else math.nan
        p_i, ok_i, raw_i = binom_check(cnt_i, trials_i, bound_i, confidence)

        trials_a = k_keys * n_img
        cnt_a = int(img_all[j].sum())
        meas_a = cnt_a / trials_a
        p_d, ok_d, raw_d = binom_check(cnt_a, trials_a, dd, confidence)

        ok = ok_s and ok_in and ok_i and ok_d
        raw_ok = raw_s and raw_i and raw_d
        flags = [f"{name}: {flag_text(r, o, p)}" for name, r, o, p in
                 (("sample", raw_s, ok_s, p_s), ("image", raw_i, ok_i, p_i), ("data-driven", raw_d, ok_d, p_d))
                 if not (r and o)]
        if not ok_in:
            flags.append(f"input: {flag_text(True, False, p_in)} (max {k_max}/{k_keys} keys)")
        row = {
            **info,
            "eps": float(eps), "tau": float(tau), "R": float(radius), "keys": k_keys, "images": n_img,
            "positions": n_pos, "samples": int(flat.shape[0]), "samples_outside_R": int((~cov).sum()),
            "frac_outside_R": float((~cov).mean()), "images_outside_R": int((~cov_img).sum()),
            "meas_sample": meas_s,
            "meas_sample_max_key": float(fire_cov[j].max() / n_cov) if n_cov else math.nan,
            "meas_sample_all": float(fire_all[j].sum() / (k_keys * flat.shape[0])),
            "pred_sample": pred, "bound_sample": bound_s, "ratio_sample": ratio(bound_s, meas_s),
            "p_sample": p_s, "ok_sample": ok_s, "raw_ok_sample": raw_s,
            "max_input_rate": k_max / k_keys, "p_input": p_in, "ok_input": ok_in,
            "meas_image": meas_i, "meas_image_all": meas_a, "bound_image": bound_i,
            "ratio_image": ratio(bound_i, meas_i), "p_image": p_i, "ok_image": ok_i, "raw_ok_image": raw_i,
            "dd_bound": dd, "ratio_dd": ratio(dd, meas_a), "p_dd": p_d, "ok_dd": ok_d, "raw_ok_dd": raw_d,
            "ok": ok, "raw_ok": raw_ok, "flag": "; ".join(flags),
        }
        rows.append(row)
    return rows, skipped


def cross_key_rows(
    triggers: np.ndarray,
    draws_b: np.ndarray,
    eps_list: Sequence[float],
    radius: float,
    *,
    confidence: float,
    min_expected: float,
    bound_scale: float = 1.0,
    info: dict[str, Any],
) -> list[dict[str, Any]]:
    """Rows for key A's triggers (centred, ``[K_A, P, n]``) fired by independent keys B.

    ``draws_b``: ``[K_A, K_B, n]``, fresh keys B for every trigger, so that given the triggers all
    K_A·K_B trials are independent (reusing one set of keys B for triggers that coincide or lie
    close together would make the count over-dispersed relative to the binomial test).
    """
    k_a, n_pos, n = triggers.shape
    k_b = draws_b.shape[1]
    trig = triggers.astype(np.float64)
    s = np.concatenate([np.einsum("apn,abn->apb", trig[a : a + 16], draws_b[a : a + 16]).max(axis=1)
                        for a in range(0, k_a, 16)])  # [K_A, K_B]: the best position per (A, B)
    r_trig = np.linalg.norm(trig, axis=2)  # [K_A, P]
    rows = []
    for eps in eps_list:
        tau = float(eps) * radius
        per_a = np.array([bounds.cross_key_bound(r, tau, n).value for r in r_trig])
        trials = k_a * k_b
        if float(np.mean(per_a)) * trials < min_expected:
            continue
        bound = bound_scale * float(np.mean(per_a))
        count = int((s > tau).sum())
        meas = count / trials
        p, ok, raw_ok = binom_check(count, trials, bound, confidence)
        rows.append({
            **info, "eps": float(eps), "tau": tau, "R": float(radius), "r_T": float(r_trig.max(axis=1).mean()),
            "keys_A": k_a, "keys_B": k_b, "positions": n_pos, "measured": meas, "bound": bound,
            "ratio": ratio(bound, meas), "p_value": p, "ok": ok, "raw_ok": raw_ok,
            "flag": flag_text(raw_ok, ok, p),
        })
    return rows


def draw_keys(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    return np.stack([detector.sample_direction(rng, n) for _ in range(k)])


# -- synthetic features --------------------------------------------------------------------------------
def synthetic_points(rng: np.random.Generator, dist: str, count: int, n: int) -> np.ndarray:
    if dist == "sphere":
        g = rng.standard_normal((count, n))
        return g / np.linalg.norm(g, axis=1, keepdims=True)
    offset = np.zeros(n)
    offset[0] = 3.0  # a non-zero mean, so the estimated centre matters
    if dist == "gauss":
        return offset + rng.standard_normal((count, n))
    if dist == "aniso":
        return offset + rng.standard_normal((count, n)) / np.arange(1, n + 1)
    raise ValueError(f"unknown synthetic distribution {dist!r}")


def synthetic_sweep(args: argparse.Namespace, seed_seq: np.random.SeedSequence) -> tuple[list, list, dict]:
    rows: list[dict[str, Any]] = []
    cross: list[dict[str, Any]] = []
    skipped = 0
    combos = [(n, d) for n in args.dims for d in args.dists]
    for (n, dist), child in zip(combos, seed_seq.spawn(len(combos)), strict=True):
        rng = np.random.default_rng(child)
        count = args.images * args.positions
        held = synthetic_points(rng, dist, count, n)
        if dist == "sphere":
            centre, radius = np.zeros(n), 1.0  # known exactly: the cap is the truth
        else:
            cal = synthetic_points(rng, dist, count, n)
            centre = cal.mean(axis=0)
            radius = float(np.linalg.norm(cal - centre, axis=1).max()) * args.radius_margin
        feats = (held - centre).reshape(args.images, args.positions, n)
        keys = draw_keys(rng, args.keys, n)
        info = {"source": "synthetic", "layer": f"n={n}", "n": n, "dist": dist}
        got, sk = measure_setting(feats, keys, args.eps, radius, confidence=args.confidence,
                                  min_expected=args.min_expected, bound_scale=args.bound_scale, info=info)
        rows += got
        skipped += sk
    for n, child in zip(args.dims, seed_seq.spawn(len(args.dims)), strict=True):
        rng = np.random.default_rng(child)
        keys_a = draw_keys(rng, args.cross_keys, n)
        keys_b = draw_keys(rng, args.cross_keys * args.cross_draws, n).reshape(args.cross_keys, args.cross_draws, n)
        for mult in args.trigger_radii:
            trig = (mult * keys_a)[:, None, :]  # c + r_T v_A, centred; R = 1
            info = {"source": "synthetic", "layer": f"n={n}", "n": n, "trigger": f"c + r_T·v_A, r_T={mult:g}R"}
            cross += cross_key_rows(trig, keys_b, args.eps, 1.0, confidence=args.confidence,
                                    min_expected=args.min_expected, bound_scale=args.bound_scale, info=info)
    return rows, cross, {"skipped_not_measurable": skipped, "samples_per_setting": args.images * args.positions}


# -- MobileNetV2 features ------------------------------------------------------------------------------
def _pick_hosts(model, layers: Sequence[str]):
    from onnxstain._onnx.hosts import find_hosts

    hosts = find_hosts(model)
    chosen = []
    for layer in layers:
        prefix = f"/features/{layer}/"
        match = [h for h in hosts if h.name.startswith(prefix) and h.usable]
        if not match:
            raise SystemExit(f"no usable host layer under {prefix}")
        chosen.append(match[0])  # the first conv of the block: the 1×1 expansion (features.18: its only conv)
    return chosen


def tap_mobilenet(args: argparse.Namespace, seed_seq: np.random.SeedSequence, log) -> dict[str, Any]:
    """Centres, radii and subsampled centred held-out features of each host layer."""
    import onnx

    from onnxstain.cache import cache_dir
    from onnxstain.features import neuron_inputs
    from onnxstain.naturalset import natural_images
    from onnxstain.preprocess import Preprocessing
    from onnxstain.runtime import session, with_outputs

    model_path = Path(args.model) if args.model else cache_dir() / "models" / "mobilenet_v2" / "mobilenet_v2.onnx"
    pre_path = model_path.with_name(model_path.stem + ".preprocessing.json")
    model = onnx.load(str(model_path))
    pre = Preprocessing.load(pre_path)
    hosts = _pick_hosts(model, args.layers)
    taps = list(dict.fromkeys(h.input for h in hosts))
    sess = session(with_outputs(model, taps), providers=["cpu"], threads=args.threads)
    rng_img, rng_pos = (np.random.default_rng(s) for s in seed_seq.spawn(2))

    def images(split: str) -> np.ndarray:
        pix = natural_images(split, size=(pre.height, pre.width)).pixels
        if args.max_images and len(pix) > args.max_images:
            pix = pix[np.sort(rng_img.choice(len(pix), args.max_images, replace=False))]
        return pix

    def passes(pix: np.ndarray):
        for start in range(0, len(pix), args.batch):
            out = sess.run(taps, {sess.get_inputs()[0].name: pre.to_input(pix[start : start + args.batch])})
            got = dict(zip(taps, out, strict=True))
            yield [neuron_inputs(h, got[h.input]) for h in hosts]

    t0 = time.perf_counter()
    cal = images("calibration")
    held = images("heldout")
    log(f"MobileNetV2: {len(cal)} calibration + {len(held)} held-out images, layers {', '.join(args.layers)}")
    sums = [np.zeros(h.m) for h in hosts]
    counts = [0] * len(hosts)
    for phis in passes(cal):  # pass 1: centres
        for i, phi in enumerate(phis):
            sums[i] += phi.reshape(-1, phi.shape[-1]).sum(axis=0, dtype=np.float64)
            counts[i] += phi.shape[0] * phi.shape[1]
    centres = [s / c for s, c in zip(sums, counts, strict=True)]
    rmax = [0.0] * len(hosts)
    for phis in passes(cal):  # pass 2: calibration radii (every position)
        for i, phi in enumerate(phis):
            rmax[i] = max(rmax[i], float(np.linalg.norm(phi.astype(np.float64) - centres[i], axis=-1).max()))
    radii = [r * args.radius_margin for r in rmax]
    t_cal = time.perf_counter() - t0
    kept: list[list[np.ndarray]] = [[] for _ in hosts]
    out_pos = [0] * len(hosts)
    out_img = [0] * len(hosts)
    for phis in passes(held):  # pass 3: held-out, subsampled positions; outside-R counts at every position
        for i, phi in enumerate(phis):
            centred = phi.astype(np.float64) - centres[i]
            r = np.linalg.norm(centred, axis=-1)
            out_pos[i] += int((r > radii[i]).sum())
            out_img[i] += int((r > radii[i]).any(axis=1).sum())
            p_all = phi.shape[1]
            p_sub = min(p_all, args.real_positions)
            idx = np.stack([np.sort(rng_pos.choice(p_all, p_sub, replace=False)) for _ in range(len(phi))])
            kept[i].append(np.take_along_axis(centred, idx[:, :, None], axis=1).astype(np.float32))
    log(f"MobileNetV2 taps: {time.perf_counter() - t0:.1f} s (calibration {t_cal:.1f} s)")
    layers = []
    for i, h in enumerate(hosts):
        p_all = h.positions
        layers.append({
            "layer": args.layers[i], "host": h.name, "m": h.m, "positions_total": p_all,
            "positions_used": min(p_all, args.real_positions), "centre_samples": counts[i],
            "R": radii[i], "max_calibration_radius": rmax[i], "calibration_images": len(cal),
            "heldout_images": len(held),
            "heldout_outside_R_all_positions": out_pos[i] / (len(held) * p_all),
            "heldout_images_outside_R_all_positions": out_img[i] / len(held),
            "feats": np.concatenate(kept[i]),
        })
    return {"layers": layers, "model": str(model_path), "tap_seconds": time.perf_counter() - t0}


def mobilenet_sweep(args: argparse.Namespace, seed_seq: np.random.SeedSequence, log) -> tuple[list, list, dict]:
    tapped = tap_mobilenet(args, seed_seq.spawn(1)[0], log)
    rows: list[dict[str, Any]] = []
    cross: list[dict[str, Any]] = []
    skipped = 0
    layer_meta = []
    for lay, child in zip(tapped["layers"], seed_seq.spawn(len(tapped["layers"])), strict=True):
        rng = np.random.default_rng(child)
        feats = lay.pop("feats")
        m, radius = lay["m"], lay["R"]
        keys = draw_keys(rng, args.real_keys, m)
        info = {"source": "mobilenet_v2", "layer": lay["layer"], "n": m, "dist": "natural"}
        t0 = time.perf_counter()
        got, sk = measure_setting(feats, keys, args.eps, radius, confidence=args.confidence,
                                  min_expected=args.min_expected, bound_scale=args.bound_scale, info=info)
        rows += got
        skipped += sk
        log(f"  {lay['layer']} (m={m}): {len(got)} settings, {feats.shape[0]}×{feats.shape[1]} samples, "
            f"{time.perf_counter() - t0:.1f} s")
        if lay["layer"] in args.cross_layers:
            keys_a = keys[: args.cross_keys]
            keys_b = draw_keys(rng, len(keys_a) * args.cross_draws, m).reshape(len(keys_a), args.cross_draws, m)
            flat = feats.reshape(-1, m).astype(np.float64)
            best = np.argmax(flat @ keys_a.T, axis=0)  # stand-in trigger: the top-scoring held-out sample
            img = best // feats.shape[1]
            base = {"source": "mobilenet_v2", "layer": lay["layer"], "n": m}
            cross += cross_key_rows(flat[best][:, None, :], keys_b, args.eps, radius, confidence=args.confidence,
                                    min_expected=args.min_expected, bound_scale=args.bound_scale,
                                    info={**base, "trigger": "stand-in: top-scoring held-out position"})
            cross += cross_key_rows(feats[img], keys_b, args.eps, radius, confidence=args.confidence,
                                    min_expected=args.min_expected, bound_scale=args.bound_scale,
                                    info={**base, "trigger": f"stand-in: its image ({feats.shape[1]} positions)"})
        layer_meta.append(lay)
    return rows, cross, {"skipped_not_measurable": skipped, "layers": layer_meta, "model": tapped["model"],
                         "tap_seconds": tapped["tap_seconds"]}


# -- output ----------------------------------------------------------------------------------------------
def fmt(x: Any) -> str:
    if isinstance(x, bool):
        return "yes" if x else "**NO**"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        if x == 0:
            return "0"
        return f"{x:.3g}"
    return str(x)


MD_MAIN = (
    ("source", "source"), ("layer", "layer/n"), ("dist", "dist"), ("eps", "ε"), ("tau", "τ"), ("R", "R"),
    ("keys", "keys"), ("samples", "samples"), ("frac_outside_R", "out of R"), ("meas_sample", "meas/sample"),
    ("meas_sample_max_key", "max key"), ("pred_sample", "E cap(τ/r)"), ("bound_sample", "bound/sample"),
    ("ratio_sample", "bound÷meas"), ("max_input_rate", "max input"), ("meas_image", "meas/image"),
    ("bound_image", "bound/image"), ("meas_image_all", "meas/image all"), ("dd_bound", "data-driven"),
    ("ratio_dd", "dd÷meas"), ("p_min", "p min"), ("ok", "ok 99%"), ("ok_fw", "ok fw"), ("raw_ok", "raw ok"),
    ("flag", "flag"),
)
MD_CROSS = (
    ("source", "source"), ("layer", "layer/n"), ("trigger", "trigger"), ("eps", "ε"), ("tau", "τ"),
    ("r_T", "r_T"), ("keys_A", "keys A"), ("keys_B", "keys B"), ("measured", "measured"), ("bound", "bound"),
    ("ratio", "bound÷meas"), ("p_value", "p"), ("ok", "ok 99%"), ("ok_fw", "ok fw"), ("raw_ok", "raw ok"),
    ("flag", "flag"),
)


LEGEND = """\
Columns: τ = ε·R; *samples* = held-out images × positions; *out of R* = fraction of samples with
‖φ−c‖ > R (not covered by the worst-case bound; left out of *meas/sample* and *meas/image*).
*meas/sample* = mean over keys of the fraction of covered samples with v·(φ−c) > τ; *max key* = the worst
single key's rate (a rate over inputs for one fixed key: **not** covered by the bounds, shown for
information); *E cap(τ/r)* = mean over covered samples of cap(τ/‖φ−c‖, n), the exact expectation of
*meas/sample*; *bound/sample* = cap(τ/R, n); *max input* = the largest fraction of keys firing on one covered
sample (tested against *bound/sample* with a Bonferroni correction over the samples); *meas/image* = covered
images firing at any of their positions, vs *bound/image* = min(1, P·cap); *meas/image all* = all held-out
images, vs *data-driven* = `data_driven_bound(per_image_cap_sums(radii))` (95 %); *p min* = the smallest
p-value of the row's binomial checks; *ok 99%* = every check p ≥ 0.01; *ok fw* = the same with a Bonferroni
correction over every check of the sweep; *raw ok* = every measured mean ≤ its bound (max input excluded)."""
LEGEND_CROSS = """\
Key A's trigger (synthetic: c + r_T·v_A; MobileNetV2: a **stand-in**, the held-out sample with the largest
score for v_A, no gradient search) fired by independently drawn keys B (fresh keys B for every trigger);
*r_T* = mean trigger radius; *bound* = mean over triggers of `cross_key_bound(radii, τ, n)`."""


def md_table(rows: Sequence[dict[str, Any]], cols) -> str:
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k, "")) for k, _ in cols) + " |")
    return "\n".join(lines)


P_COLUMNS = ("p_sample", "p_input", "p_image", "p_dd")


def family_wise(rows: list[dict[str, Any]], cross: list[dict[str, Any]], confidence: float) -> int:
    """Add ``p_min`` and ``ok_fw`` (Bonferroni over every check of the sweep) to each row; return the count.

    Where a bound is exactly tight (synthetic sphere, synthetic cross-key), each per-row check at
    ``confidence`` fails by chance with probability ``1 - confidence``; the family-wise column keeps
    the chance of any false alarm in the whole sweep at ``1 - confidence``.
    """
    checks = len(P_COLUMNS) * len(rows) + len(cross)
    level = (1.0 - confidence) / max(checks, 1)
    for r in rows:
        r["p_min"] = min(r[k] for k in P_COLUMNS)
    for r in cross:
        r["p_min"] = r["p_value"]
    for r in rows + cross:
        r["ok_fw"] = r["p_min"] >= level
        if not r["ok_fw"]:
            r["flag"] = f"VIOLATION (family-wise, p={r['p_min']:.2g} < {level:.2g}); " + r["flag"]
    return checks


def summarise(rows: Sequence[dict[str, Any]], cross: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def ratios(key_meas: str, key_bound: str, subset) -> list[float]:
        return [r[key_bound] / r[key_meas] for r in subset if r[key_meas] > 0]

    out: dict[str, Any] = {"settings": len(rows), "cross_key_settings": len(cross)}
    for src in ("synthetic", "mobilenet_v2"):
        sub = [r for r in rows if r["source"] == src]
        csub = [r for r in cross if r["source"] == src]
        if not sub and not csub:
            continue
        d: dict[str, Any] = {"settings": len(sub), "cross_key_settings": len(csub)}
        for name, km, kb, s in (("sample", "meas_sample", "bound_sample", sub),
                                ("image", "meas_image", "bound_image", sub),
                                ("data_driven", "meas_image_all", "dd_bound", sub),
                                ("cross_key", "measured", "bound", csub)):
            rr = ratios(km, kb, s)
            d[f"ratio_{name}_min"] = min(rr) if rr else math.nan
            d[f"ratio_{name}_max"] = max(rr) if rr else math.nan
            d[f"zero_measured_{name}"] = sum(1 for r in s if r[km] == 0)
        d["not_ok"] = sum(1 for r in sub + csub if not r["ok"])
        d["not_ok_fw"] = sum(1 for r in sub + csub if not r["ok_fw"])
        d["raw_exceed"] = sum(1 for r in sub + csub if not r["raw_ok"])
        out[src] = d
    every = list(rows) + list(cross)
    out["checks"] = len(P_COLUMNS) * len(rows) + len(cross)
    out["all_ok"] = all(r["ok_fw"] for r in every)  # family-wise 99 %
    out["all_ok_per_row"] = all(r["ok"] for r in every)
    out["per_row_failures"] = [
        {k: r.get(k) for k in ("source", "layer", "dist", "trigger", "eps", "p_min", "flag")}
        for r in every if not r["ok"]
    ]
    out["raw_exceedances"] = [
        {k: r.get(k) for k in ("source", "layer", "dist", "trigger", "eps", "flag")}
        for r in list(rows) + list(cross) if not r["raw_ok"]
    ]
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_csv(path: Path, rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(cols), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})


def plot(path: Path, rows: Sequence[dict[str, Any]], cross: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 7))
    series = [
        ("synthetic sphere, per sample (tight)", [r for r in rows if r.get("dist") == "sphere"],
         "meas_sample", "bound_sample", lambda r: r["keys"] * (r["samples"] - r["samples_outside_R"]), "C0", "o"),
        ("synthetic gauss/aniso, per sample", [r for r in rows if r["source"] == "synthetic" and r["dist"] != "sphere"],
         "meas_sample", "bound_sample", lambda r: r["keys"] * (r["samples"] - r["samples_outside_R"]), "C1", "o"),
        ("MobileNetV2, per sample", [r for r in rows if r["source"] == "mobilenet_v2"],
         "meas_sample", "bound_sample", lambda r: r["keys"] * (r["samples"] - r["samples_outside_R"]), "C3", "s"),
        ("per image vs min(1, P·cap)", [r for r in rows if r["bound_image"] < 1],
         "meas_image", "bound_image", lambda r: r["keys"] * (r["images"] - r["images_outside_R"]), "C2", "^"),
        ("per image vs data-driven", list(rows), "meas_image_all", "dd_bound",
         lambda r: r["keys"] * r["images"], "C4", "v"),
        ("cross-key", list(cross), "measured", "bound", lambda r: r["keys_A"] * r["keys_B"], "C5", "D"),
    ]
    lo = 1.0
    for label, sub, km, kb, trials, colour, marker in series:
        pos = [r for r in sub if r[km] > 0]
        zero = [r for r in sub if r[km] == 0]
        if pos:
            ax.scatter([r[kb] for r in pos], [r[km] for r in pos], s=18, c=colour, marker=marker,
                       label=f"{label} ({len(pos)})", alpha=0.8)
            lo = min(lo, *(r[km] for r in pos), *(r[kb] for r in pos))
        if zero:
            floor = [1.0 / trials(r) for r in zero]
            ax.scatter([r[kb] for r in zero], floor, s=22, c=colour, marker="_",
                       label=f"{label}: measured 0, drawn at 1/trials ({len(zero)})")
            lo = min(lo, *floor, *(r[kb] for r in zero))
    lo = max(lo, 1e-12) / 2
    ax.plot([lo, 1], [lo, 1], "k--", lw=1, label="measured = bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1.5)
    ax.set_ylim(lo, 1.5)
    ax.set_xlabel("bound")
    ax.set_ylabel("measured rate (mean over keys)")
    ax.set_title("Random-direction detectors: measured false-positive rate vs bound")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# -- driver ----------------------------------------------------------------------------------------------
def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bound_sweep", help="output directory (default out/bound_sweep)")
    ap.add_argument("--quick", action="store_true", help="synthetic only, small sizes (a few seconds)")
    ap.add_argument("--sources", type=_names, default=None,
                    help="synthetic,mobilenet (default: both; quick: synthetic)")
    ap.add_argument("--eps", type=_floats, default=None, help="margins ε = τ/R (comma-separated)")
    ap.add_argument("--dims", type=_ints, default=(3, 5, 10, 20), help="synthetic dimensions")
    ap.add_argument("--dists", type=_names, default=None, help=f"synthetic distributions out of {','.join(DISTS)}")
    ap.add_argument("--keys", type=int, default=None, help="keys per synthetic setting (default 2000; quick 300)")
    ap.add_argument("--images", type=int, default=None, help="synthetic held-out images (default 1000; quick 200)")
    ap.add_argument("--positions", type=int, default=4, help="synthetic points per image (default 4)")
    ap.add_argument("--layers", type=_names, default=DEFAULT_LAYERS, help="MobileNetV2 blocks")
    ap.add_argument("--real-keys", type=int, default=1000, help="keys per MobileNetV2 layer (default 1000)")
    ap.add_argument("--real-positions", type=int, default=64, help="held-out positions per image (default 64)")
    ap.add_argument("--max-images", type=int, default=0, help="cap on images per split (0 = all)")
    ap.add_argument("--cross-layers", type=_names, default=CROSS_LAYERS, help="MobileNetV2 cross-key layers")
    ap.add_argument("--cross-keys", type=int, default=None, help="keys A (triggers) per cross-key setting")
    ap.add_argument("--cross-draws", type=int, default=None,
                    help="independent keys B per trigger (default 1000; quick 200)")
    ap.add_argument("--trigger-radii", type=_floats, default=(1.0, 2.0), help="synthetic r_T as multiples of R")
    ap.add_argument("--radius-margin", type=float, default=1.0, help="R = margin × max calibration radius")
    ap.add_argument("--confidence", type=float, default=0.99, help="one-sided binomial confidence of `ok`")
    ap.add_argument("--min-expected", type=float, default=10.0,
                    help="skip settings whose bound predicts fewer firings over all trials")
    ap.add_argument("--bound-scale", type=float, default=1.0, help="multiply every bound (flagging self-test)")
    ap.add_argument("--model", default=None, help="MobileNetV2 ONNX (default: the cache's)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    q = args.quick
    args.sources = args.sources or (("synthetic",) if q else ("synthetic", "mobilenet"))
    bad = set(args.sources) - {"synthetic", "mobilenet"}
    if bad:
        ap.error(f"unknown sources {sorted(bad)}")
    args.eps = args.eps or (QUICK_EPS if q else DEFAULT_EPS)
    if any(not 0 < e < 1 for e in args.eps):
        ap.error("every ε must be in (0, 1)")
    args.dists = args.dists or (("sphere", "gauss") if q else DISTS)
    if set(args.dists) - set(DISTS):
        ap.error(f"--dists must be out of {DISTS}")
    args.keys = args.keys or (300 if q else 2000)
    args.images = args.images or (200 if q else 1000)
    args.cross_keys = args.cross_keys or (50 if q else 200)
    args.cross_draws = args.cross_draws or (200 if q else 1000)
    return args


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    t0 = time.perf_counter()
    root = np.random.SeedSequence(args.seed)
    seq_syn, seq_real = root.spawn(2)
    rows: list[dict[str, Any]] = []
    cross: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    if "synthetic" in args.sources:
        t = time.perf_counter()
        r, c, m = synthetic_sweep(args, seq_syn)
        rows += r
        cross += c
        meta["synthetic"] = {**m, "seconds": time.perf_counter() - t}
        log(f"synthetic: {len(r)} settings + {len(c)} cross-key settings in {time.perf_counter() - t:.1f} s")
    if "mobilenet" in args.sources:
        t = time.perf_counter()
        r, c, m = mobilenet_sweep(args, seq_real, log)
        rows += r
        cross += c
        meta["mobilenet_v2"] = {**m, "seconds": time.perf_counter() - t}
    family_wise(rows, cross, args.confidence)
    summary = summarise(rows, cross)
    for r in rows + cross:
        if not r["raw_ok"] or not r["ok"]:
            loud = "!!! VIOLATION" if not r["ok_fw"] else "!!! measured > bound"
            log(f"{loud}: {r['source']} {r['layer']} {r.get('dist') or r.get('trigger')} ε={r['eps']:g}: {r['flag']}")
    result = {
        "command": ("python tools/bound_sweep.py " + shlex.join(_cli_args(args))).strip(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "numpy": np.__version__},
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "seconds": time.perf_counter() - t0,
        "summary": summary,
        "meta": meta,
        "rows": rows,
        "cross_key": cross,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bound_sweep.json").write_text(json.dumps(_jsonable(result), indent=1))
    write_csv(out / "bound_sweep.csv", rows, ROW_COLUMNS)
    write_csv(out / "cross_key.csv", cross, CROSS_COLUMNS)
    (out / "bound_sweep.md").write_text(markdown(result))
    if not args.no_plot:
        plot(out / "bound_sweep.png", rows, cross)
    log(f"wrote {out}/bound_sweep.{{md,csv,json}}, cross_key.csv" + ("" if args.no_plot else ", bound_sweep.png"))
    return result


def _cli_args(args: argparse.Namespace) -> list[str]:
    argv = getattr(args, "_argv", None)
    return list(sys.argv[1:] if argv is None else argv)


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        "# Bound sweep: measured false-positive rate vs bound",
        "",
        f"`{result['command']}` — {result['date']}, {result['seconds']:.0f} s",
        "",
        f"{s['settings']} settings, {s['cross_key_settings']} cross-key settings ({s['checks']} binomial checks); "
        f"all ok (family-wise 99 %): **{'yes' if s['all_ok'] else 'NO'}**; rows failing a per-row 99 % check: "
        f"{len(s['per_row_failures'])}; raw exceedances (measured mean > bound): {len(s['raw_exceedances'])}.",
        "",
    ]
    for src in ("synthetic", "mobilenet_v2"):
        if src in s:
            d = s[src]
            lines.append(f"* {src}: {d['settings']} settings, {d['cross_key_settings']} cross-key; "
                         f"bound÷measured per sample {fmt(d['ratio_sample_min'])}…{fmt(d['ratio_sample_max'])}, "
                         f"per image {fmt(d['ratio_image_min'])}…{fmt(d['ratio_image_max'])}, data-driven "
                         f"{fmt(d['ratio_data_driven_min'])}…{fmt(d['ratio_data_driven_max'])}, cross-key "
                         f"{fmt(d['ratio_cross_key_min'])}…{fmt(d['ratio_cross_key_max'])}; per-row 99 % failures "
                         f"{d['not_ok']}, family-wise failures {d['not_ok_fw']}, raw exceedances {d['raw_exceed']}")
    if "mobilenet_v2" in result["meta"]:
        lines += ["", "MobileNetV2 layers:", "",
                  "| layer | host | m | R | positions used / total | held-out outside R (all positions) |",
                  "|---|---|---|---|---|---|"]
        for lay in result["meta"]["mobilenet_v2"]["layers"]:
            lines.append(f"| {lay['layer']} | `{lay['host']}` | {lay['m']} | {lay['R']:.4g} | "
                         f"{lay['positions_used']} / {lay['positions_total']} | "
                         f"{lay['heldout_outside_R_all_positions']:.2e} of samples, "
                         f"{lay['heldout_images_outside_R_all_positions']:.3g} of images |")
    lines += ["", "## Settings", "", LEGEND, "", md_table(result["rows"], MD_MAIN), "", "## Cross-key", "",
              LEGEND_CROSS, "", md_table(result["cross_key"], MD_CROSS), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args._argv = None if argv is None else list(argv)
    result = run(args)
    s = result["summary"]
    print(f"{s['settings']} settings + {s['cross_key_settings']} cross-key: all ok (family-wise 99 %) = "
          f"{s['all_ok']}, per-row 99 % failures = {len(s['per_row_failures'])}, "
          f"raw exceedances = {len(s['raw_exceedances'])}")
    return 0 if s["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
