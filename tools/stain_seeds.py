"""Acceptance run: stain MobileNetV2 with many seeds in every variant × mode and check every stain.

For each combination of ``--variant non-additive|additive`` × ``--mode inplace|insert`` and seeds
``0..N-1`` the script, through the public API only (``onnxstain.stain`` / ``onnxstain.verify``):

1. stains the model with that seed (model and key in a temporary directory);
2. verifies: the stained model is ``stained``; the original is not; the model stained with the
   *next* seed's key of the same combo (the last seed wraps around to seed 0) is not stained for
   this key;
3. runs the key's trigger PNG through the key's recorded preprocessing on the stained model and
   records the raw signature score (class margin, or shift score for the additive in-place stain),
   the detector scores ``v·(φ−c)`` at the selected positions and the white-box tap;
4. counts natural firings over the full natural set (``natural_images("all")``) × all positions:
   the detector score ``v·(φ−c) > τ`` computed from the stained model's host input tensor (the
   definition of firing, all combos), and the tap ``white_box.tensor[channel] > 0`` where the tap
   is the detector itself (every combo but additive in-place, whose tap is a working neuron);
5. fidelity on the same images: top-1 agreement and max |Δscore| stained vs original (agreement also
   per split: the calibration photos are the stain's own data, the held-out photos are not);
6. in-place: ``structural_diff(original, stained)`` must be empty; insert: max |Δscore| must be 0.

Writes ``results.json`` (every row, rewritten after each run) and ``summary.md`` to ``--out``.

Usage::

    python tools/stain_seeds.py                       # 20 seeds × 4 combos
    python tools/stain_seeds.py --seeds 2 --combos additive:insert,non-additive:inplace
    python tools/stain_seeds.py --seeds 15 --first-seed 5 --combos additive:inplace   # seeds 5..19
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import onnxstain
from onnxstain import runtime
from onnxstain._onnx.diff import structural_diff
from onnxstain.cache import cache_dir
from onnxstain.features import neuron_inputs
from onnxstain.naturalset import natural_images, photo_split

VARIANTS = ("non-additive", "additive")
MODES = ("inplace", "insert")
ALL_COMBOS = [(v, m) for v in VARIANTS for m in MODES]


# -- helpers ------------------------------------------------------------------------------------------
def parse_combos(text: str | None) -> list[tuple[str, str]]:
    if not text:
        return list(ALL_COMBOS)
    combos: list[tuple[str, str]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            variant, mode = (s.strip() for s in part.replace("/", ":").split(":"))
        except ValueError:
            raise SystemExit(f"--combos: {part!r} is not VARIANT:MODE") from None
        if variant not in VARIANTS or mode not in MODES:
            raise SystemExit(f"--combos: {part!r}: variant must be one of {VARIANTS}, mode one of {MODES}")
        if (variant, mode) not in combos:
            combos.append((variant, mode))
    return combos


def combo_name(variant: str, mode: str) -> str:
    return f"{variant}/{mode}"


def class_margin(scores: np.ndarray, cls: int) -> float:
    s = np.asarray(scores, np.float64)
    return float(s[cls] - np.delete(s, cls).max())


def shift_score(scores: np.ndarray, original: np.ndarray, expected: np.ndarray) -> float:
    d = np.asarray(expected, np.float64) - np.asarray(original, np.float64)
    return float((np.asarray(scores, np.float64) - original) @ d / float(d @ d))


def verify_summary(res: onnxstain.VerifyResult) -> dict[str, Any]:
    return {
        "stained": bool(res.stained),
        "score": float(res.score),
        "threshold": float(res.threshold),
        "fpr_bound_log10": float(res.fpr_bound.log10),
        "checks": [{"name": c.name, "available": c.available, "passed": c.passed, "score": c.score,
                    "threshold": c.threshold, "detail": c.detail} for c in res.checks],
    }


def host_from_key(key: onnxstain.Key, in_channels: int) -> types.SimpleNamespace:
    """The fields of the host layer ``neuron_inputs`` needs, from the key alone."""
    h = key["host"]
    return types.SimpleNamespace(
        op=h["op"], in_channels=in_channels, groups=int(h["groups"]), pads=tuple(h["pads"]),
        kernel=tuple(h["kernel"]), strides=tuple(h["strides"]), dilations=tuple(h["dilations"]),
        out_hw=tuple(h["out_hw"]) if h.get("out_hw") else None,
    )


def tap_is_detector(key: onnxstain.Key) -> bool:
    """Whether ``white_box.tensor[channel] > 0`` is the detector firing (not for additive in-place,
    whose tap is the working neuron the detector hides in: it is active on natural images)."""
    return not (key["mode"] == "inplace" and key["variant"] == "additive")


def session(model: onnx.ModelProto, outputs: list[str], threads: int | None) -> ort.InferenceSession:
    """A CPU session that also outputs ``outputs`` (feature taps)."""
    return runtime.session(runtime.with_outputs(model, outputs), providers=["cpu"], threads=threads)


# -- evaluation ---------------------------------------------------------------------------------------
class Evaluator:
    """Natural inputs, the original model's scores and one session per model (batch ``batch``)."""

    def __init__(self, original: Path, batch: int, threads: int | None) -> None:
        self.original_path = original
        self.original = onnx.load(str(original))
        self.batch = batch
        self.threads = threads
        self.nat = natural_images("all")
        self._inputs: dict[str, np.ndarray] = {}
        self._orig_scores: dict[str, np.ndarray] = {}

    def inputs(self, pre: onnxstain.Preprocessing) -> np.ndarray:
        tag = json.dumps(pre.to_dict(), sort_keys=True)
        if tag not in self._inputs:
            if (self.nat.pixels.shape[1], self.nat.pixels.shape[2]) != (pre.height, pre.width):
                self.nat = natural_images("all", size=(pre.height, pre.width))
            self._inputs[tag] = pre.to_input(self.nat.pixels)
        return self._inputs[tag]

    def original_scores(self, pre: onnxstain.Preprocessing, scores_name: str) -> np.ndarray:
        tag = json.dumps(pre.to_dict(), sort_keys=True) + scores_name
        if tag not in self._orig_scores:
            sess = session(self.original, [scores_name], self.threads)
            x = self.inputs(pre)
            name = sess.get_inputs()[0].name
            parts = [sess.run([scores_name], {name: x[i : i + self.batch]})[0]
                     for i in range(0, len(x), self.batch)]
            self._orig_scores[tag] = np.concatenate(parts).astype(np.float64)
        return self._orig_scores[tag]

    def evaluate(self, stained_path: Path, key: onnxstain.Key) -> dict[str, Any]:
        pre = onnxstain.Preprocessing.from_dict(key["preprocessing"])
        scores_name = key["model"]["scores"]
        host_in = key["host"]["input"]
        wb_tensor, wb_ch = key["white_box"]["tensor"], int(key["white_box"]["channel"])
        sel = np.asarray(key["white_box"]["positions"], dtype=int)
        det = key["detector"]
        v, c, tau = key.array("detector", "direction"), key.array("detector", "centre"), float(det["threshold"])
        group = int(key["host"].get("group", 0))
        vc = float(v @ c)
        stained = onnx.load(str(stained_path))
        outputs = [scores_name, host_in, wb_tensor]
        sess = session(stained, outputs, self.threads)
        name = sess.get_inputs()[0].name

        def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            s, hx, tap = sess.run(outputs, {name: x})
            host = host_from_key(key, hx.shape[1])
            phi = neuron_inputs(host, hx, group)  # [n, P, m]
            det_scores = phi.astype(np.float64) @ v - vc  # [n, P]
            return s.astype(np.float64), det_scores, tap[:, wb_ch].reshape(len(x), -1).astype(np.float64)

        # -- the trigger, through the key's recorded preprocessing
        trig = key.trigger_pixels()
        t_scores, t_det, t_tap = run(pre.to_input(trig[None]))
        sig = key["signature"]
        cls = int(sig["class"])
        if sig.get("type", "class") == "shift":
            sig_score = shift_score(t_scores[0], key.array("signature", "original"),
                                    key.array("signature", "expected"))
        else:
            sig_score = class_margin(t_scores[0], cls)
        key_trig = key.array("detector", "trigger_scores")
        trigger = {
            "signature_type": sig.get("type", "class"),
            "signature_score": sig_score,
            "signature_threshold": float(sig["threshold"]),
            "signature_expected": float(sig["expected_margin"]),
            "class_margin": class_margin(t_scores[0], cls),
            "top1": int(t_scores[0].argmax()),
            "signature_class": cls,
            "detector_min_selected": float(t_det[0, sel].min()),
            "detector_over_tau": float(t_det[0, sel].min() / tau),
            "detector_vs_key_max_abs": float(np.abs(t_det[0] - key_trig.reshape(-1)).max()),
            "tap_min_selected": float(t_tap[0, sel].min()),
            "tap_threshold": float(key["white_box"]["threshold"]),
            "tap_expected": float(key["white_box"]["expected"]),
        }

        # -- natural images: firings and fidelity
        x = self.inputs(pre)
        orig = self.original_scores(pre, scores_name)
        fire_score = fire_tap = samples = 0
        max_det = -np.inf
        max_tap = -np.inf
        agree = 0
        same = np.zeros(len(x), dtype=bool)
        max_delta = 0.0
        for i in range(0, len(x), self.batch):
            s, d, tap = run(x[i : i + self.batch])
            o = orig[i : i + self.batch]
            fire_score += int((d > tau).sum())
            fire_tap += int((tap > 0).sum())
            samples += d.size
            max_det = max(max_det, float(d.max()))
            max_tap = max(max_tap, float(tap.max()))
            agree += int((s.argmax(1) == o.argmax(1)).sum())
            same[i : i + self.batch] = s.argmax(1) == o.argmax(1)
            max_delta = max(max_delta, float(np.abs(s - o).max()))
        use_tap = tap_is_detector(key)
        natural = {
            "images": len(x),
            "photos": self.nat.n_photos,
            "positions": samples // max(len(x), 1),
            "samples": samples,
            "score_firings": fire_score,
            "max_score": max_det,
            "max_score_over_tau": max_det / tau,
            "tap_firings": fire_tap if use_tap else None,
            "tap_max": max_tap,
        }
        # the calibration photos are the stain's own data (its fits see them); the held-out photos are not
        heldout = np.array([photo_split(p) == "heldout" for p in self.nat.photo_ids])
        fidelity = {"agreement": agree / len(x), "max_abs_delta": max_delta,
                    "agreement_calibration": float(same[~heldout].mean()) if (~heldout).any() else None,
                    "agreement_heldout": float(same[heldout].mean()) if heldout.any() else None,
                    "flips_calibration": int((~same[~heldout]).sum()), "flips_heldout": int((~same[heldout]).sum())}
        # insert adds a branch: the graph differs by design
        diffs = structural_diff(self.original, stained) if key["mode"] == "inplace" else None
        return {"trigger": trigger, "natural": natural, "fidelity": fidelity, "structural_diff": diffs}


# -- the run ------------------------------------------------------------------------------------------
def row_failures(row: dict[str, Any]) -> list[str]:
    """Every acceptance criterion the row fails (empty = pass)."""
    if row.get("error"):
        return [f"error: {row['error']}"]
    f: list[str] = []
    if not row["verify_stained"]["stained"]:
        f.append("stained model not verified")
    if row["verify_original"]["stained"]:
        f.append("original verified as stained")
    other = row.get("verify_other")
    if other is None:
        f.append("other-key check missing")
    elif other.get("error"):
        f.append(f"other-key check error: {other['error']}")
    elif other["stained"]:
        f.append(f"model of seed {other['other_seed']} verified as stained for this key")
    t = row["trigger"]
    if t["signature_score"] < t["signature_threshold"]:
        f.append(f"trigger signature {t['signature_score']:.4g} < threshold {t['signature_threshold']:.4g}")
    if t["detector_over_tau"] <= 1.0:
        f.append(f"trigger detector score {t['detector_min_selected']:.4g} ≤ τ")
    n = row["natural"]
    if n["score_firings"]:
        f.append(f"{n['score_firings']} natural detector firings (v·(φ−c) > τ)")
    if n["tap_firings"]:
        f.append(f"{n['tap_firings']} natural tap firings (white-box tensor > 0)")
    if row["mode"] == "inplace" and row["structural_diff"]:
        f.append(f"structural diff: {row['structural_diff'][:3]}")
    if row["mode"] == "insert" and row["fidelity"]["max_abs_delta"] != 0.0:
        f.append(f"insert: max |Δscore| = {row['fidelity']['max_abs_delta']:.3g} ≠ 0")
    return f


def progress_line(row: dict[str, Any], index: int, total: int) -> str:
    head = f"[{index:>3}/{total}] {combo_name(row['variant'], row['mode']):<22} seed {row['seed']:>3}"
    if row.get("error"):
        return f"{head}  ERROR {row['error']}"
    ok = lambda b: "ok" if b else "FAIL"  # noqa: E731
    other = row.get("verify_other") or {}
    t, n, fd = row["trigger"], row["natural"], row["fidelity"]
    diff = "n/a" if row["mode"] == "insert" else ok(not row["structural_diff"])
    fails = row_failures(row)
    return (f"{head}  stained {ok(row['verify_stained']['stained'])}"
            f"  original {ok(not row['verify_original']['stained'])}"
            f"  other-key {ok(other.get('stained') is False)}  trigger {t['signature_score']:.3g}/"
            f"{t['signature_threshold']:.3g}  s/τ {t['detector_over_tau']:.3f}  firings {n['score_firings']}/"
            f"{n['samples']}  agree {fd['agreement']:.4f} (flips cal {fd.get('flips_calibration')} / held-out "
            f"{fd.get('flips_heldout')})  |Δ| {fd['max_abs_delta']:.3g}  diff {diff}"
            f"  {row['stain_seconds']:.1f}s  {'PASS' if not fails else 'FAIL: ' + '; '.join(fails)}")


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "–" if x is None else format(x, spec)


def summarise(rows: list[dict[str, Any]], combos: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], str]:
    summary = []
    lines = [
        "| variant / mode | seeds | pass | stain errors | verify stained | original not stained | other key not "
        "stained | min trigger signature (score / thr) | min trigger s*/τ | natural firings / samples (tap) | "
        "max natural score / τ | agreement min / median | held-out agreement min / median | "
        "max abs Δscore | structural diff ok | mean stain time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, mode in combos:
        rs = [r for r in rows if r["variant"] == variant and r["mode"] == mode]
        good = [r for r in rs if not r.get("error")]
        n = len(rs)
        fails = {r["seed"]: row_failures(r) for r in rs if row_failures(r)}
        ratio_rows = [r for r in good if r["trigger"]["signature_threshold"]]
        worst = min(ratio_rows, key=lambda r: r["trigger"]["signature_score"] / r["trigger"]["signature_threshold"],
                    default=None)
        tap = [r["natural"]["tap_firings"] for r in good if r["natural"]["tap_firings"] is not None]
        agreements = [r["fidelity"]["agreement"] for r in good]
        held = [r["fidelity"]["agreement_heldout"] for r in good if r["fidelity"].get("agreement_heldout") is not None]
        s = {
            "variant": variant, "mode": mode, "seeds": n, "pass": n - len(fails),
            "stain_errors": sum(1 for r in rs if r.get("error")),
            "verify_stained": sum(1 for r in good if r["verify_stained"]["stained"]),
            "original_not_stained": sum(1 for r in good if not r["verify_original"]["stained"]),
            "other_not_stained": sum(1 for r in good if (r.get("verify_other") or {}).get("stained") is False),
            "min_trigger_signature": worst["trigger"]["signature_score"] if worst else None,
            "min_trigger_signature_threshold": worst["trigger"]["signature_threshold"] if worst else None,
            "min_trigger_signature_seed": worst["seed"] if worst else None,
            "signature_type": good[0]["trigger"]["signature_type"] if good else None,
            "min_trigger_detector_over_tau": min((r["trigger"]["detector_over_tau"] for r in good), default=None),
            "natural_firings": sum(r["natural"]["score_firings"] for r in good),
            "natural_tap_firings": sum(tap) if tap else None,
            "natural_samples": sum(r["natural"]["samples"] for r in good),
            "max_natural_score_over_tau": max((r["natural"]["max_score_over_tau"] for r in good), default=None),
            "agreement_min": min(agreements, default=None),
            "agreement_median": statistics.median(agreements) if agreements else None,
            "agreement_heldout_min": min(held, default=None),
            "agreement_heldout_median": statistics.median(held) if held else None,
            "max_abs_delta": max((r["fidelity"]["max_abs_delta"] for r in good), default=None),
            "structural_diff_ok": (sum(1 for r in good if not r["structural_diff"]) if mode == "inplace" else None),
            "mean_stain_seconds": statistics.mean(r["stain_seconds"] for r in good) if good else None,
            "failures": fails,
        }
        summary.append(s)
        sig = (f"{fmt(s['min_trigger_signature'])} / {fmt(s['min_trigger_signature_threshold'])} "
               f"({s['signature_type']}, seed {s['min_trigger_signature_seed']})" if worst else "–")
        tapf = "" if s["natural_tap_firings"] is None else f" ({s['natural_tap_firings']})"
        diff = f"{s['structural_diff_ok']}/{len(good)}" if mode == "inplace" else "n/a (insert)"
        lines.append(
            f"| {variant} / {mode} | {n} | {s['pass']}/{n} | {s['stain_errors']} | {s['verify_stained']}/{n} | "
            f"{s['original_not_stained']}/{n} | {s['other_not_stained']}/{n} | {sig} | "
            f"{fmt(s['min_trigger_detector_over_tau'], '.3f')} | "
            f"{s['natural_firings']} / {s['natural_samples']}{tapf} | "
            f"{fmt(s['max_natural_score_over_tau'], '.3f')} | {fmt(s['agreement_min'], '.4f')} / "
            f"{fmt(s['agreement_median'], '.4f')} | {fmt(s['agreement_heldout_min'], '.4f')} / "
            f"{fmt(s['agreement_heldout_median'], '.4f')} | {fmt(s['max_abs_delta'])} | {diff} | "
            f"{fmt(s['mean_stain_seconds'], '.1f')} s |")
    notes = []
    for s in summary:
        for seed, f in sorted(s["failures"].items()):
            notes.append(f"- {s['variant']} / {s['mode']} seed {seed}: {'; '.join(f)}")
    md = "\n".join(lines) + "\n"
    md += "\n" + ("\n".join(notes) if notes else "All runs passed every check.") + "\n"
    return summary, md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None,
                    help="ONNX model (default: $ONNXSTAIN_CACHE/models/mobilenet_v2/mobilenet_v2.onnx)")
    ap.add_argument("--seeds", type=int, default=20, help="seeds 0..N-1 per combo (default 20)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="start at this seed: seeds F..F+N-1 (default 0; e.g. --seeds 15 --first-seed 5)")
    ap.add_argument("--combos", default=None,
                    help="comma-separated VARIANT:MODE, e.g. additive:insert,non-additive:inplace (default: all 4)")
    ap.add_argument("--out", type=Path, default=Path("out/stain_seeds"), help="output folder")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where models and keys go (default: a temporary folder, removed at the end; "
                         "keys are kept when given)")
    ap.add_argument("--batch", type=int, default=32, help="evaluation batch size")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads for evaluation")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    combos = parse_combos(args.combos)
    model = args.model or cache_dir() / "models" / "mobilenet_v2" / "mobilenet_v2.onnx"
    if not model.is_file():
        ap.error(f"{model} not found (build it with `python -m models`)")
    args.out.mkdir(parents=True, exist_ok=True)
    own_workdir = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="stain_seeds_")) if own_workdir else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None
                                                                              else sys.argv[1:])])
    started = dt.datetime.now(dt.UTC)
    print(f"stain_seeds: {len(combos)} combos × {args.seeds} seeds on {model}; work dir {work}", flush=True)
    t_load = time.perf_counter()
    ev = Evaluator(model, args.batch, args.threads)
    print(f"natural set: {len(ev.nat)} images from {ev.nat.n_photos} photos ({time.perf_counter() - t_load:.1f}s)",
          flush=True)
    meta = {
        "command": command, "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "model": str(model),
        "onnxstain": onnxstain.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "natural_images": len(ev.nat), "natural_photos": ev.nat.n_photos, "seeds": args.seeds,
        "first_seed": args.first_seed,
        "combos": [combo_name(*c) for c in combos],
    }
    rows: list[dict[str, Any]] = []
    total = len(combos) * args.seeds
    done = 0

    def save() -> None:
        summary, _ = summarise(rows, combos)
        data = {"meta": meta, "summary": summary, "rows": rows}
        tmp = args.out / "results.json.tmp"
        tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
        os.replace(tmp, args.out / "results.json")

    def other_check(row: dict[str, Any], other_seed: int, other_model: Path | None) -> None:
        nonlocal done
        if other_model is None or not other_model.is_file():
            row["verify_other"] = {"other_seed": other_seed, "error": "no model stained with another key"}
        else:
            try:
                res = onnxstain.verify(other_model, work / row["key"])
                row["verify_other"] = {"other_seed": other_seed, **verify_summary(res)}
            except Exception as exc:
                row["verify_other"] = {"other_seed": other_seed, "error": f"{type(exc).__name__}: {exc}"}
        done += 1
        print(progress_line(row, done, total), flush=True)
        save()

    try:
        for variant, mode in combos:
            tag = f"{variant}_{mode}"
            models: dict[int, Path] = {}
            pending: dict[int, dict[str, Any]] = {}
            seeds = list(range(args.first_seed, args.first_seed + args.seeds))
            for seed in seeds:
                out_model = work / f"{tag}_s{seed}.onnx"
                key_path = work / f"{tag}_s{seed}.key"
                row: dict[str, Any] = {"variant": variant, "mode": mode, "seed": seed, "key": key_path.name}
                rows.append(row)
                t0 = time.perf_counter()
                try:
                    res = onnxstain.stain(model, out_model, key_path, options=onnxstain.StainOptions(
                        mode=mode, variant=variant, seed=seed))
                    row["stain_seconds"] = time.perf_counter() - t0
                    row["stain"] = {
                        "host": res.host, "channel": res.channel, "signature_class": res.signature_class,
                        "signature_margin": res.signature_margin, "threshold": res.threshold,
                        "trigger_score": res.trigger_score, "natural_max_score": res.natural_max_score,
                        "natural_firings": res.natural_firings, "natural_samples": res.natural_samples,
                        "calibration_images": res.calibration_images, "agreement": res.agreement,
                        "max_abs_delta": res.max_abs_delta, "draws": res.draws, "search_steps": res.search_steps,
                        "bound_log10": res.bound.log10, "timings": res.timings, "notes": res.notes,
                    }
                    models[seed] = out_model
                    print(f"      stained {combo_name(variant, mode)} seed {seed} in {row['stain_seconds']:.1f}s "
                          f"(host {res.host} ch {res.channel}, {res.draws} draw(s), {res.search_steps} steps)",
                          flush=True)
                    key = onnxstain.load_key(key_path)
                    row["verify_stained"] = verify_summary(onnxstain.verify(out_model, key))
                    row["verify_original"] = verify_summary(onnxstain.verify(model, key))
                    row.update(ev.evaluate(out_model, key))
                except Exception as exc:
                    row["stain_seconds"] = time.perf_counter() - t0
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    row["traceback"] = traceback.format_exc()
                    done += 1
                    print(progress_line(row, done, total), flush=True)
                    save()
                    continue
                pending[seed] = row
                # the previous seed's key against this seed's model
                prev = seed - 1
                if prev in pending:
                    other_check(pending.pop(prev), seed, out_model)
                    if prev != seeds[0] and prev in models:
                        models.pop(prev).unlink(missing_ok=True)
                save()
            # the remaining rows: the last seed's key against seed 0's model (wrap around)
            for s in sorted(pending):
                i = seeds.index(s)
                nxt = next((o for o in [*seeds[i + 1 :], *seeds[:i]] if o in models), None)
                other_check(pending[s], nxt if nxt is not None else -1, models.get(nxt) if nxt is not None else None)
            for p in models.values():
                p.unlink(missing_ok=True)
    finally:
        save()
        if own_workdir:
            shutil.rmtree(work, ignore_errors=True)

    finished = dt.datetime.now(dt.UTC)
    meta["finished"] = finished.strftime("%Y-%m-%dT%H:%M:%SZ")
    meta["wall_seconds"] = (finished - started).total_seconds()
    save()
    _, md = summarise(rows, combos)
    header = (f"# stain_seeds — {meta['started'][:10]}\n\n`{command}`\n\n{len(ev.nat)} natural images "
              f"({ev.nat.n_photos} photos), onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, "
              f"wall time {meta['wall_seconds'] / 60:.1f} min.\n\n")
    (args.out / "summary.md").write_text(header + md)
    print("\n" + md, flush=True)
    failed = sum(1 for r in rows if row_failures(r))
    print(f"{len(rows) - failed}/{len(rows)} runs passed; results in {args.out}/results.json and summary.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
