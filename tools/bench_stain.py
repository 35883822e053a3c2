"""Stain benchmark: stage timings, the ratios to plain onnxruntime work, and inference overhead.

Everything is measured in one process, one run, through the public API (``onnxstain.stain``):

1. **Stain wall time per stage** (``StainResult.timings``), median over seeds, for each
   configuration (``--configs``; default: in-place non-additive on ``--seeds`` seeds, insert on 2).
2. **Baselines**, interleaved with the stains (one of each right before every stain):
   the time a plain onnxruntime session (default threads, batch 32) takes to run the *original* model
   once over the calibration set the stain uses, and the bare ``onnx.load`` + ``onnx.save`` time of
   the model. Reported as stain total ÷ baseline pass, stain total ÷ load+save, and
   total − calibration − trigger_search in seconds.
3. **Inference latency stained ÷ original**: onnxruntime CPU, ``intra_op_num_threads=1``, batch 1 and
   batch 32 (random normal inputs, fixed seed), warm-up, then interleaved pairs with alternating order
   (orig, stained | stained, orig | …) spread over several freshly built session couples; the per-pair
   ratio's median, IQR and a 95 % CI of the median, next to an A/A control (original ÷ original).

Writes ``bench.json`` (all raw numbers and machine info) and ``bench.md`` to ``--out``.

    python tools/bench_stain.py                   # full settings
    python tools/bench_stain.py --quick           # a smoke run (about a minute)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import onnxstain
from onnxstain.cache import cache_dir
from onnxstain.naturalset import natural_images
from onnxstain.runtime import session as plain_session

CONTROL = "original (A/A)"  # the original against a second session of itself: the noise floor
STAGES = ("load", "calibration", "trigger_search", "edit", "checks", "save", "total")
TARGET_OTHER_S = 1.0  # total − calibration − trigger_search
TARGET_STAIN_OVER_PASS = 5.0  # stain total ÷ one onnxruntime pass over the calibration set
TARGET_INSERT_LATENCY = 1.02


# -- configuration -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    mode: str
    variant: str
    seeds: int

    @property
    def name(self) -> str:
        return self.mode if self.variant == "non-additive" else f"{self.mode}+additive"


def parse_configs(text: str, default_seeds: int) -> list[Config]:
    """``inplace,insert:2,inplace+additive`` → configurations (``:N`` overrides ``--seeds``)."""
    out: list[Config] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        spec, _, n = item.partition(":")
        mode, _, variant = spec.partition("+")
        variant = variant or "non-additive"
        if mode not in ("inplace", "insert") or variant not in ("non-additive", "additive"):
            raise SystemExit(f"bad configuration {item!r}: use MODE[+additive][:SEEDS], MODE inplace|insert")
        seeds = int(n) if n else default_seeds
        if seeds < 1:
            raise SystemExit(f"bad configuration {item!r}: seeds must be ≥ 1")
        cfg = Config(mode, variant, seeds)
        if any(c.name == cfg.name for c in out):
            raise SystemExit(f"configuration {cfg.name} given twice")
        out.append(cfg)
    if not out:
        raise SystemExit("no configuration given")
    return out


def default_model() -> Path:
    return cache_dir() / "models" / "mobilenet_v2" / "mobilenet_v2.onnx"


def load_preprocessing(model: Path) -> tuple[onnxstain.Preprocessing, str]:
    side = model.with_name(model.name.removesuffix(".onnx") + ".preprocessing.json")
    if side.is_file():
        return onnxstain.Preprocessing.load(side), str(side)
    return onnxstain.Preprocessing(), "default (no sidecar file)"


# -- statistics ----------------------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def ratio_stats(ratios: list[float]) -> dict[str, float]:
    r = np.sort(np.asarray(ratios, dtype=np.float64))
    n = len(r)
    q25, q50, q75 = (float(x) for x in np.quantile(r, [0.25, 0.5, 0.75]))
    # distribution-free 95 % CI of the median (normal approximation of the binomial ranks)
    half = 1.96 * np.sqrt(n) / 2
    lo = int(max(0, np.floor(n / 2 - half) - 1))
    hi = int(min(n - 1, np.ceil(n / 2 + half)))
    return {"median": q50, "q25": q25, "q75": q75, "iqr": q75 - q25, "ci95_low": float(r[lo]),
            "ci95_high": float(r[hi]), "pairs": n, "mean": float(r.mean())}


# -- measurements --------------------------------------------------------------------------------------
def baseline_pass(model: Path, x: np.ndarray, batch: int) -> dict[str, float]:
    """A fresh plain session (default threads) and one pass over ``x`` in batches of ``batch``."""
    t0 = time.perf_counter()
    sess = plain_session(str(model), ["cpu"])
    t1 = time.perf_counter()
    name = sess.get_inputs()[0].name
    out = sess.get_outputs()[0].name
    for start in range(0, len(x), batch):
        sess.run([out], {name: x[start : start + batch]})
    t2 = time.perf_counter()
    return {"session": t1 - t0, "pass": t2 - t1}


def load_save(model: Path, tmpdir: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    m = onnx.load(str(model))
    t1 = time.perf_counter()
    dst = tmpdir / "load_save.onnx"
    onnx.save(m, str(dst))
    t2 = time.perf_counter()
    dst.unlink()
    return {"load": t1 - t0, "save": t2 - t1, "total": t2 - t0}


def one_thread_session(model: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])


def latency_pairs(orig_model: Path, stained_model: Path, x: np.ndarray, pairs: int, warmup: int,
                  rounds: int) -> dict[str, Any]:
    """Interleaved timings, order alternating per pair; per-pair ratio stained ÷ original.

    The pairs are spread over ``rounds`` rounds, each with freshly built sessions (built in alternating
    order): two sessions of the *same* model differ by a few per cent at batch 32 depending on where
    their buffers land, which the pairs of one session couple cannot average out.
    """
    t_orig: list[float] = []
    t_st: list[float] = []
    round_medians: list[float] = []
    rounds = max(1, min(rounds, pairs))
    diff = 0.0
    for r in range(rounds):
        n = pairs // rounds + (1 if r < pairs % rounds else 0)
        if r % 2 == 0:
            orig = one_thread_session(orig_model)
            stained = one_thread_session(stained_model)
        else:
            stained = one_thread_session(stained_model)
            orig = one_thread_session(orig_model)
        feeds = [(s, s.get_inputs()[0].name, s.get_outputs()[0].name) for s in (orig, stained)]
        for _ in range(warmup):
            for s, i, o in feeds:
                s.run([o], {i: x})
        ratios: list[float] = []
        for p in range(n):
            order = (0, 1) if p % 2 == 0 else (1, 0)
            got = [0.0, 0.0]
            for k in order:
                s, i, o = feeds[k]
                t0 = time.perf_counter()
                s.run([o], {i: x})
                got[k] = time.perf_counter() - t0
            t_orig.append(got[0])
            t_st.append(got[1])
            ratios.append(got[1] / got[0])
        round_medians.append(median(ratios))
        y0 = orig.run([feeds[0][2]], {feeds[0][1]: x})[0]
        y1 = stained.run([feeds[1][2]], {feeds[1][1]: x})[0]
        diff = max(diff, float(np.abs(y0.astype(np.float64) - y1).max()))
        del orig, stained, feeds
    ratios = [b / a for a, b in zip(t_orig, t_st, strict=True)]
    return {"ratio": ratio_stats(ratios), "orig_ms_median": 1e3 * median(t_orig),
            "stained_ms_median": 1e3 * median(t_st), "warmup": warmup, "rounds": rounds,
            "round_medians": round_medians, "max_abs_output_diff": diff, "orig_s": t_orig, "stained_s": t_st}


def machine_info() -> dict[str, Any]:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model, "platform": platform.platform(), "python": platform.python_version(),
        "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
        "torch": version("torch"), "onnx": onnx.__version__, "numpy": np.__version__, "scipy": version("scipy"),
        "onnxstain": onnxstain.__version__,
    }


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (a study records the model it ran on: `./dev setup` rebuilds it)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class OthersCpu:
    """CPU time used by *other* processes (in cores) between two samples: /proc/stat minus this process.

    A contamination gauge: timings taken while others use a sizeable share of this 2-core machine
    (tests, other benchmarks) are not comparable. ``None`` where /proc is not available.
    """

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def sample() -> tuple[float, float, float] | None:
        try:
            cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6]  # user nice system irq softirq
        return time.monotonic(), float(busy), float(int(own[11]) + int(own[12]))  # utime + stime

    @classmethod
    def between(cls, a, b) -> float | None:
        if a is None or b is None or b[0] <= a[0]:
            return None
        return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / cls.TICK / (b[0] - a[0]))

    @classmethod
    def wait_quiet(cls, threshold: float, max_wait: float, window: float = 2.0) -> dict[str, Any]:
        """Wait (up to ``max_wait`` s) until others use < ``threshold`` cores over a ``window`` s window."""
        t0 = time.monotonic()
        told = 0.0
        while True:
            a = cls.sample()
            time.sleep(window)
            used = cls.between(a, cls.sample())
            waited = time.monotonic() - t0
            if used is None or used < threshold or waited >= max_wait:
                return {"others_cores": used, "waited_s": round(waited, 1),
                        "quiet": used is None or used < threshold}
            if waited - told >= 30 or told == 0:
                told = waited
                print(f"    waiting for a quiet machine: others use {used:.2f} cores …", flush=True)


def max_or_none(xs: list[float | None]) -> float | None:
    got = [x for x in xs if x is not None]
    return max(got) if got else None


def fmt_num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def fmt_cores(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} cores"


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- the run -------------------------------------------------------------------------------------------
def run_stain(model: Path, cfg: Config, seed: int, workdir: Path, tag: str) -> tuple[onnxstain.StainResult, Path]:
    out = workdir / f"{tag}.onnx"
    res = onnxstain.stain(model, out, workdir / f"{tag}.key",
                          options=onnxstain.StainOptions(mode=cfg.mode, variant=cfg.variant, seed=seed))
    return res, out


def summarise_run(res: onnxstain.StainResult) -> dict[str, Any]:
    return {"timings": dict(res.timings), "calibration_images": res.calibration_images, "host": res.host,
            "channel": res.channel, "draws": res.draws, "search_steps": res.search_steps,
            "agreement": res.agreement, "max_abs_delta": res.max_abs_delta, "notes": list(res.notes)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="ONNX model (default: the MobileNetV2 recipe "
                    "model in $ONNXSTAIN_CACHE)")
    ap.add_argument("--seeds", type=int, default=3, help="stain seeds per configuration (default 3)")
    ap.add_argument("--configs", default="inplace,insert:2",
                    help="configurations MODE[+additive][:SEEDS], comma separated (default inplace,insert:2)")
    ap.add_argument("--out", type=Path, default=Path("out/bench"), help="output directory (default out/bench)")
    ap.add_argument("--pairs-b1", type=int, default=400, help="latency pairs at batch 1 (default 400)")
    ap.add_argument("--pairs-b32", type=int, default=48, help="latency pairs at batch 32 (default 48)")
    ap.add_argument("--rounds", type=int, default=8,
                    help="latency pairs are spread over this many fresh session couples (default 8)")
    ap.add_argument("--no-control", action="store_true",
                    help="skip the A/A latency control (the original against a second session of itself)")
    ap.add_argument("--warmup-b1", type=int, default=30)
    ap.add_argument("--warmup-b32", type=int, default=3)
    ap.add_argument("--baseline-batch", type=int, default=32)
    ap.add_argument("--no-cold-run", action="store_true",
                    help="skip the uncounted first stain (it pays one-time imports and is reported apart)")
    ap.add_argument("--keep-models", action="store_true", help="keep the stained models and keys in --out")
    ap.add_argument("--quiet-below", type=float, default=0.3, metavar="CORES",
                    help="before each measurement wait until other processes use < CORES (default 0.3)")
    ap.add_argument("--quiet-max-wait", type=float, default=300.0, metavar="S",
                    help="give up waiting for a quiet machine after S seconds (default 300; 0: never wait)")
    ap.add_argument("--retries", type=int, default=2,
                    help="redo a measurement during which others used ≥ --quiet-below cores, up to this many "
                    "times (default 2); the discarded attempts stay in bench.json")
    ap.add_argument("--quick", action="store_true",
                    help="smoke defaults: 1 seed per configuration, 40/6 latency pairs in 2 rounds "
                    "(explicit options override them)")
    if ap.parse_known_args(argv)[0].quick:  # smoke defaults; explicit options still win
        ap.set_defaults(seeds=1, configs="inplace,insert", pairs_b1=40, pairs_b32=6, warmup_b1=5, warmup_b32=1,
                        rounds=2)
    args = ap.parse_args(argv)
    configs = parse_configs(args.configs, args.seeds)
    model = (args.model or default_model()).resolve()
    if not model.is_file():
        raise SystemExit(f"{model}: no such model (build it with `python -m models`)")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_stain_"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below on `kill`

    def contaminated(others: float | None) -> bool:
        return others is not None and others >= args.quiet_below

    def quiet() -> dict[str, Any]:
        if args.quiet_max_wait <= 0:
            return {"others_cores": None, "waited_s": 0.0, "quiet": None}
        return OthersCpu.wait_quiet(args.quiet_below, args.quiet_max_wait)

    started = dt.datetime.now(dt.UTC)
    report: dict[str, Any] = {
        "date_utc": started.isoformat(timespec="seconds"), "command": " ".join([sys.executable, *sys.argv]),
        "argv": sys.argv[1:], "model": str(model), "model_bytes": model.stat().st_size,
        "machine": machine_info(), "loadavg_start": loadavg(),
        "settings": {"configs": [dataclasses.asdict(c) | {"name": c.name} for c in configs],
                     "pairs_b1": args.pairs_b1, "pairs_b32": args.pairs_b32, "warmup_b1": args.warmup_b1,
                     "warmup_b32": args.warmup_b32, "rounds": args.rounds, "baseline_batch": args.baseline_batch,
                     "latency_threads": 1},
    }
    try:
        # 1. the cold stain: first in the process, before anything here touches onnxruntime or torch
        if not args.no_cold_run:
            print(f"cold stain ({configs[0].name}, seed 1000) …", flush=True)
            wq = quiet()
            a = OthersCpu.sample()
            res, _ = run_stain(model, configs[0], 1000, workdir, "cold")
            report["cold_run"] = ({"config": configs[0].name, "seed": 1000, "wait": wq,
                                   "others_cores": OthersCpu.between(a, OthersCpu.sample())} | summarise_run(res))

        # 2. calibration input for the baseline: the pixels the stain uses, through the model's preprocessing
        pre, pre_src = load_preprocessing(model)
        t0 = time.perf_counter()
        pixels = natural_images("calibration", size=(pre.height, pre.width)).pixels
        t1 = time.perf_counter()
        x_cal = pre.to_input(pixels)
        t2 = time.perf_counter()
        report["calibration_set"] = {"images": len(pixels), "preprocessing": pre_src,
                                     "load_pixels_s": t1 - t0, "to_input_s": t2 - t1}
        del pixels

        # 3. stains, each right after a baseline pass and a load+save, seed-major across configurations
        runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
        discarded: list[dict[str, Any]] = []  # contaminated measurements that were redone
        stained_models: dict[str, Path] = {}
        for seed in range(max(c.seeds for c in configs)):
            for cfg in configs:
                if seed >= cfg.seeds:
                    continue
                for attempt in range(args.retries + 1):
                    wq = quiet()
                    a = OthersCpu.sample()
                    base = baseline_pass(model, x_cal, args.baseline_batch)
                    ls = load_save(model, workdir)
                    res, out = run_stain(model, cfg, seed, workdir, f"{cfg.name}_s{seed}_a{attempt}")
                    others = OthersCpu.between(a, OthersCpu.sample())
                    if res.calibration_images != len(x_cal):
                        raise SystemExit(f"the stain used {res.calibration_images} calibration images, the "
                                         f"baseline {len(x_cal)}: not comparable")
                    row = ({"seed": seed, "attempt": attempt, "baseline": base, "load_save": ls, "wait": wq,
                            "others_cores": others} | summarise_run(res))
                    tm = res.timings
                    bad = contaminated(others) and attempt < args.retries
                    print(f"  {cfg.name:<18} seed {seed}: stain {tm['total']:6.2f} s (cal {tm['calibration']:.2f}, "
                          f"search {tm['trigger_search']:.2f}) | ort pass {base['pass']:.2f} s | "
                          f"load+save {ls['total']:.2f} s | others {fmt_cores(others)}"
                          + (" — contaminated, redone" if bad else ""), flush=True)
                    if not bad:
                        break
                    discarded.append({"config": cfg.name} | row)
                stained_models.setdefault(cfg.name, out)
                runs[cfg.name].append(row)
        del x_cal
        report["runs"] = runs
        report["discarded"] = discarded
        report["loadavg_after_stains"] = loadavg()

        summary: dict[str, Any] = {}
        for cfg in configs:
            rs = runs[cfg.name]
            stages = {s: median([r["timings"][s] for r in rs]) for s in STAGES}
            other = [r["timings"]["total"] - r["timings"]["calibration"] - r["timings"]["trigger_search"]
                     for r in rs]
            over_pass = [r["timings"]["total"] / r["baseline"]["pass"] for r in rs]
            over_ls = [r["timings"]["total"] / r["load_save"]["total"] for r in rs]
            summary[cfg.name] = {
                "seeds": len(rs), "stages_median_s": stages,
                "other_s_median": median(other), "other_s_max": max(other),
                "baseline_pass_s_median": median([r["baseline"]["pass"] for r in rs]),
                "load_save_s_median": median([r["load_save"]["total"] for r in rs]),
                "stain_over_pass_median": median(over_pass), "stain_over_pass_max": max(over_pass),
                "stain_over_load_save_median": median(over_ls),
                "others_cores_max": max_or_none([r["others_cores"] for r in rs]),
            }
        all_pass = [r["baseline"]["pass"] for rs in runs.values() for r in rs]
        all_ls = [r["load_save"]["total"] for rs in runs.values() for r in rs]
        report["baseline"] = {"pass_s_median": median(all_pass), "pass_s_all": all_pass,
                              "load_save_s_median": median(all_ls), "load_save_s_all": all_ls}
        report["stain_summary"] = summary

        # 4. inference latency, one intra-op thread
        print("latency (intra_op_num_threads=1) …", flush=True)
        probe = one_thread_session(model)
        shape = [d if isinstance(d, int) else 1 for d in probe.get_inputs()[0].shape]
        del probe
        subjects = [] if args.no_control else [(CONTROL, model)]
        subjects += [(cfg.name, stained_models[cfg.name]) for cfg in configs]
        latency: dict[str, Any] = {name: {} for name, _ in subjects}
        for batch, pairs, warm in ((1, args.pairs_b1, args.warmup_b1), (32, args.pairs_b32, args.warmup_b32)):
            if pairs < 1:
                continue
            x = np.random.default_rng(0).standard_normal([batch, *shape[1:]]).astype(np.float32)
            for name, path in subjects:
                for attempt in range(args.retries + 1):
                    wq = quiet()
                    a = OthersCpu.sample()
                    la = latency_pairs(model, path, x, pairs, warm, args.rounds)
                    la["others_cores"] = OthersCpu.between(a, OthersCpu.sample())
                    la["wait"] = wq
                    la["attempt"] = attempt
                    r = la["ratio"]
                    bad = contaminated(la["others_cores"]) and attempt < args.retries
                    print(f"  {name:<18} b{batch:<3} ratio {r['median']:.4f} IQR [{r['q25']:.4f}, {r['q75']:.4f}] "
                          f"n={r['pairs']}, rounds {min(la['round_medians']):.3f}..{max(la['round_medians']):.3f} "
                          f"(orig {la['orig_ms_median']:.2f} ms) | others {fmt_cores(la['others_cores'])}"
                          + (" — contaminated, redone" if bad else ""), flush=True)
                    if not bad:
                        break
                    discarded.append({"config": name, "batch": batch} | la)
                latency[name][f"b{batch}"] = la
        report["latency"] = latency
        report["loadavg_end"] = loadavg()
        report["elapsed_s"] = (dt.datetime.now(dt.UTC) - started).total_seconds()
        if args.keep_models:
            keep = args.out / "models"
            keep.mkdir(exist_ok=True)
            for f in workdir.iterdir():
                shutil.copy2(f, keep / f.name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    (args.out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    md = render_markdown(report)
    (args.out / "bench.md").write_text(md)
    print()
    print(md)
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}")
    return 0


# -- output --------------------------------------------------------------------------------------------
def render_markdown(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    lines = [
        f"# Stain benchmark — {Path(rep['model']).name}, {rep['date_utc']}",
        "",
        f"`{rep['command']}`",
        "",
        f"{m['cpu_model']} ({m['cpu_count']} CPUs), Python {m['python']}, onnxruntime {m['onnxruntime']}, "
        f"torch {m['torch']}, onnx {m['onnx']}; load average {rep['loadavg_start']} → {rep.get('loadavg_end')}. "
        f"Calibration set: {rep['calibration_set']['images']} images.",
        "",
        "## Stain wall time (median over seeds, seconds)",
        "",
        "| config | seeds | " + " | ".join(STAGES) + " | total − cal − search | others (cores, max) |",
        "|---|---:|" + "---:|" * (len(STAGES) + 2),
    ]
    for name, s in rep["stain_summary"].items():
        st = s["stages_median_s"]
        lines.append(f"| {name} | {s['seeds']} | " + " | ".join(f"{st[k]:.3f}" for k in STAGES)
                     + f" | {s['other_s_median']:.3f} | {fmt_num(s['others_cores_max'])} |")
    if "cold_run" in rep:
        c = rep["cold_run"]
        t = c["timings"]
        lines.append(f"| {c['config']} (cold, not counted) | 1 | " + " | ".join(f"{t[k]:.3f}" for k in STAGES)
                     + f" | {t['total'] - t['calibration'] - t['trigger_search']:.3f} | {fmt_num(c['others_cores'])} |")
    b = rep["baseline"]
    lines += [
        "",
        f"## Ratios (baseline ort pass: median {b['pass_s_median']:.3f} s over "
        f"{rep['calibration_set']['images']} images, batch {rep['settings']['baseline_batch']}, default threads; "
        f"onnx.load+save: median {b['load_save_s_median']:.3f} s)",
        "",
        "| config | stain ÷ ort pass (median, max) | total − cal − search (median, max) | stain ÷ load+save |",
        "|---|---:|---:|---:|",
    ]
    for name, s in rep["stain_summary"].items():
        lines.append(f"| {name} | {s['stain_over_pass_median']:.2f}× ({s['stain_over_pass_max']:.2f}×) "
                     f"| {s['other_s_median']:.3f} s ({s['other_s_max']:.3f} s) "
                     f"| {s['stain_over_load_save_median']:.1f}× |")
    lines += [
        "",
        f"Targets: total − calibration − trigger search < {TARGET_OTHER_S:g} s; "
        f"stain ≤ {TARGET_STAIN_OVER_PASS:g}× one ort pass over the calibration set.",
        "",
        "## Inference latency stained ÷ original (onnxruntime CPU, intra_op_num_threads=1)",
        "",
        "| config | batch | pairs | median ratio | IQR | 95 % CI of median | round medians | orig ms | stained ms "
        "| others (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, per in rep["latency"].items():
        for key, la in per.items():
            r = la["ratio"]
            lines.append(f"| {name} | {key[1:]} | {r['pairs']} | {r['median']:.4f} | [{r['q25']:.4f}, "
                         f"{r['q75']:.4f}] | [{r['ci95_low']:.4f}, {r['ci95_high']:.4f}] "
                         f"| {min(la['round_medians']):.3f}..{max(la['round_medians']):.3f} ({la['rounds']}) "
                         f"| {la['orig_ms_median']:.2f} | {la['stained_ms_median']:.2f} "
                         f"| {fmt_num(la['others_cores'])} |")
    lines += ["", f"Targets: in-place 1.00 within noise; insert ≤ {TARGET_INSERT_LATENCY:g}. "
              f"*{CONTROL}* times the original against a second session of itself: the noise floor. "
              "Each round builds a fresh session couple; *round medians* shows how much the ratio moves "
              "from one couple of sessions to the next.",
              "", "*others*: CPU used by other processes during the measurement (this machine has "
              f"{m['cpu_count']} cores); a measurement during which others used ≥ the --quiet-below threshold "
              f"is redone (--retries); {len(rep.get('discarded', []))} measurement(s) were discarded and redone "
              "in this run (kept in bench.json).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
