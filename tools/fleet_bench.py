"""Fleet benchmark: issue copies of real models into a registry, then name the customer of each copy, of
colluders' mixtures and of transformed copies, and check that no innocent customer is ever named.

Per model (default: MobileNetV2 from torch, EfficientNet-Lite0 from torch dynamo, RapidOCR's direction
classifier from paddle2onnx):

* **issue** ``--copies`` stained copies (default settings, seeded for reproducibility: ``--seed``) — the
  shared set-up (load, calibration) once, each copy's own time, and its stages;
* **identify** every copy, white box and black box: right customer, innocent customers named (the other
  copies' keys are the innocents), time, queries, the registry-wide bound; the original: no one named;
* **collusion**: 2, 3 and 4 copies averaged weight by weight, and mixed (each weight tensor from one colluder
  at random): colluders named, innocents named;
* **transforms** of one copy (the attack suite's toolchain and weight attacks): still named, innocents named;
* a **projection** of 100,000 copies on a 64-core cluster from the measured per-copy time (stated as such).

Writes ``fleet.json`` and ``fleet.md`` into ``--out``. Example:
``python tools/fleet_bench.py --copies 12 --out out/fleet``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import attack_suite  # noqa: E402

from onnxstain.fleet.identify import identify  # noqa: E402
from onnxstain.fleet.issue import issue  # noqa: E402
from onnxstain.fleet.registry import Registry  # noqa: E402
from onnxstain.keys import Key  # noqa: E402

DEFAULT_MODELS = ("mobilenet_v2", "efficientnet_lite0_dynamo", "rapidocr_cls")
DEFAULT_TRANSFORMS = ("ort-extended", "onnxsim", "fp16", "int8-dynamic", "int8-qdq-channel", "noise-1%",
                      "finetune-head-1e-3")
COLLUDERS = (2, 3, 4)
CLUSTER_CORES, CORES_PER_WORKER, PROJECTED_COPIES = 64, 2, 100_000


@dataclasses.dataclass
class Case:
    """One identification: what was asked, what was named."""

    model: str
    case: str
    basis: str
    expected: list[str]
    named: list[str]
    innocents_named: int
    seconds: float
    queries: int
    bound_log10: float | None
    best_score: float | None
    runner_up_score: float | None

    @property
    def right(self) -> bool:
        return set(self.named) == set(self.expected) if len(self.expected) <= 1 else bool(
            set(self.named) & set(self.expected))


def _case(model: str, case: str, expected: list[str], suspect: Path, reg: Registry, original: Path,
          black_box: bool) -> Case:
    t0 = time.perf_counter()
    res = identify(suspect, reg, original=original, black_box=black_box)
    named = [m.customer for m in res.named]
    return Case(model, case, res.basis, expected, named, len(set(named) - set(expected)),
                time.perf_counter() - t0, res.queries, res.bound_log10,
                res.best.score if res.best else None, res.runner_up.score if res.runner_up else None)


def _mixture(paths: list[Path], out: Path, how: str, rng: np.random.Generator) -> Path:
    """Colluders' copy: every float weight averaged over their copies, or each taken from one of them."""
    models = [onnx.load(p) for p in paths]
    protos = [attack_suite.tensor_protos(m) for m in models]
    for name, proto in protos[0].items():
        arrays = [numpy_helper.to_array(p[name]) for p in protos]
        if arrays[0].dtype.kind != "f" or all(np.array_equal(arrays[0], a) for a in arrays[1:]):
            continue
        value = np.mean(arrays, axis=0) if how == "average" else arrays[int(rng.integers(len(arrays)))]
        attack_suite._set(proto, value)
    onnx.save(models[0], out)
    return out


def run_model(name: str, copies: int, transforms: list[str], seed: int, work: Path, log: Any) -> dict[str, Any]:
    from models import corpus

    entry = corpus.BY_NAME[name]
    if not entry.built():
        raise SystemExit(f"{name}: not built (./dev setup)")
    original = entry.path()
    mwork = work / name
    mwork.mkdir(parents=True, exist_ok=True)
    dist, db = mwork / "dist", mwork / "fleet.db"
    dist.mkdir(exist_ok=True)
    customers = [f"c{i:04d}" for i in range(copies)]
    with Registry.open(db, create=True) as reg:
        t0 = time.perf_counter()
        res = issue(original, customers, dist, reg, seeds=iter(range(seed, seed + copies)))
        wall = time.perf_counter() - t0
    per = [c.seconds for c in res.issued]
    log(f"{name}: issued {len(res.issued)} in {wall:.0f} s (set-up {res.setup_seconds:.1f} s, per copy median "
        f"{np.median(per) if per else float('nan'):.1f} s)")
    cases: list[Case] = []
    paths = {c.customer: c.path for c in res.issued}
    with Registry.open(db, readonly=True) as reg:
        for c in res.issued:
            for bb in (False, True):
                cases.append(_case(name, "copy", [c.customer], c.path, reg, original, bb))
        for bb in (False, True):
            cases.append(_case(name, "original", [], original, reg, original, bb))
        rng = np.random.default_rng(seed)
        for k in COLLUDERS:
            if k > len(customers):
                continue
            group = [str(x) for x in rng.choice(customers, size=k, replace=False)]
            for how in ("average", "mix"):
                mixed = _mixture([paths[g] for g in group], mwork / f"{how}{k}.onnx", how, rng)
                for bb in (False, True):
                    cases.append(_case(name, f"{how} of {k}", group, mixed, reg, original, bb))
        first = res.issued[0]
        key = Key.loaded(json.loads(reg.key_bytes(first.copy_id)))
        ctx = _context(key, seed)
        for t in transforms:
            out = mwork / f"t-{t}.onnx"
            try:
                attack_suite.ATTACKS[t].apply(first.path, out, ctx)
            except Exception as exc:  # a transform that does not apply to this model is reported, not fatal
                log(f"  {t}: not applied ({type(exc).__name__}: {exc})")
                continue
            for bb in (False, True):
                cases.append(_case(name, t, [first.customer], out, reg, original, bb))
    for c in cases:
        log(f"  {c.case:22s} {c.basis:9s} right={c.right!s:5s} named={c.named} innocents={c.innocents_named} "
            f"{c.seconds:.2f}s best={c.best_score} runner-up={c.runner_up_score}")
    timings = [c.timings for c in res.issued]
    stages = {k: float(np.median([t.get(k, 0.0) for t in timings])) for k in timings[0]} if timings else {}
    return {"model": name, "copies": len(res.issued), "setup_seconds": res.setup_seconds, "issue_wall": wall,
            "per_copy": res.per_copy(), "stages_median": stages, "notes": res.notes,
            "cases": [dict(dataclasses.asdict(c), right=c.right) for c in cases]}


def _context(key: Key, seed: int) -> attack_suite.Context:
    from onnxstain.naturalset import natural_images

    pre = key.preprocessing
    cal = natural_images("calibration", size=(pre.height, pre.width), views=2, seed=seed).pixels[:64]
    probe = natural_images("heldout", size=(pre.height, pre.width), views=1, seed=seed).pixels
    return attack_suite.Context(key=key, calibration=cal, probe=probe, seed=seed)


def projection(per_copy_seconds: float) -> dict[str, Any]:
    workers = CLUSTER_CORES // CORES_PER_WORKER
    hours = PROJECTED_COPIES * per_copy_seconds / workers / 3600
    return {"copies": PROJECTED_COPIES, "cluster_cores": CLUSTER_CORES, "cores_per_worker": CORES_PER_WORKER,
            "workers": workers, "hours": hours,
            "statement": f"projection, not a measurement: {PROJECTED_COPIES:,} copies × {per_copy_seconds:.2f} s "
                         f"per copy (measured on this 2-core machine, one worker) ÷ {workers} workers of "
                         f"{CORES_PER_WORKER} cores = {hours:.1f} h, plus one set-up per worker"}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | case | basis | right | innocents named | time (s) | queries | bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for c in r["cases"]:
            groups.setdefault((c["case"], c["basis"]), []).append(c)
        for (case, basis), cs in groups.items():
            right = sum(c["right"] for c in cs)
            bounds = [c["bound_log10"] for c in cs if c["named"] and c["bound_log10"] is not None]
            worst = f"≤ 1e{max(bounds):.0f}" if bounds else "-"
            lines.append(f"| {r['model']} | {case} | {basis} | {right}/{len(cs)} | "
                         f"{sum(c['innocents_named'] for c in cs)} | {np.median([c['seconds'] for c in cs]):.2f} | "
                         f"{max(c['queries'] for c in cs)} | {worst} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--copies", type=int, default=12)
    ap.add_argument("--transforms", default=",".join(DEFAULT_TRANSFORMS))
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "fleet")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="Where the copies and the registry go (default: OUT/work); must be empty")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.workdir or args.out / "work"
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} is not empty: give a fresh --workdir")
    work.mkdir(parents=True, exist_ok=True)

    def log(text: str) -> None:
        print(text, flush=True)

    import onnxruntime
    import torch

    results = [run_model(m, args.copies, [t for t in args.transforms.split(",") if t], args.seed, work, log)
               for m in args.models.split(",") if m]
    report = {"machine": {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                          "torch": torch.__version__, "numpy": np.__version__, "cpus": __import__("os").cpu_count()},
              "models": results,
              "projection": projection(float(results[0]["per_copy"]["median"])) if results else None}
    (args.out / "fleet.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "fleet.md").write_text(markdown(results) + "\n" + (report["projection"] or {}).get("statement", "")
                                       + "\n")
    print(markdown(results))
    if report["projection"]:
        print(report["projection"]["statement"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
