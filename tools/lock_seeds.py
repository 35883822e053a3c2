"""Lock study on MobileNetV2: N seeds per lock kind, each locked, verified and audited; plus timing ratios.

For every seed and kind (``--kinds gate,inplace``):

1. ``onnxstain.lock`` with the default settings (the seed varies), timed; right before it, the bare
   ``onnx.load`` + ``onnx.save`` time of the model (the ratio lock ÷ load+save is reported);
2. ``onnxstain.verify`` on the locked model (must say LOCKED) and on the original (must not);
3. ``onnxstain.audit_lock`` on the held-out natural photos (``--views`` views each): agreement with
   the original without the patch, with it (same patched images), patch vs clean (all images and
   centre crops), the original with the patch, and every wrong-patch variant.

Then, once per kind, inference latency locked ÷ original (onnxruntime CPU, 1 thread, interleaved
pairs, batch 1 and 32; :func:`bench_stain.latency_pairs`).

Writes ``lock_seeds.json`` and ``lock_seeds.md`` to ``--out``.

    python tools/lock_seeds.py                          # 10 seeds, gate (and in-place when available)
    python tools/lock_seeds.py --seeds 2 --views 4      # a smoke run
    python tools/lock_seeds.py --seeds 5,7 --kinds gate # chosen seeds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_stain

import onnxstain
from onnxstain.errors import OnnxStainError

WRONG = ("random patch", "patch at top-right", "patch at bottom-left", "patch at bottom-right", "shifted 1 px",
         "shifted 2 px", "JPEG q90")


def one(model: Path, kind: str, seed: int, work: Path, views: int) -> dict[str, Any]:
    ls = bench_stain.load_save(model, work)
    out, key = work / f"{kind}-{seed}.onnx", work / f"{kind}-{seed}.key"
    t0 = time.perf_counter()
    try:
        res = onnxstain.lock(model, out, key, options=onnxstain.LockOptions(kind=kind, seed=seed))
    except OnnxStainError as e:
        return {"kind": kind, "seed": seed, "refused": str(e)}
    wall = time.perf_counter() - t0
    v_locked = onnxstain.verify(out, key)
    v_orig = onnxstain.verify(model, key)
    audit = onnxstain.audit_lock(model, out, key, views=views)
    c = {x.name: x for x in audit.conditions}
    return {
        "kind": kind, "seed": seed, "wall_s": wall, "load_save_s": ls["total"], "ratio_load_save": wall / ls["total"],
        "timings": res.timings, "bound": str(res.bound), "bound_log10": res.bound.log10,
        "patch": list(res.patch_box), "occlusion": res.occlusion, "draws": res.draws, "search_steps": res.search_steps,
        "unlocked_agreement_calibration": res.unlocked_agreement,
        "verify_locked": v_locked.stained, "verify_original": v_orig.stained,
        "images": audit.images.images, "centre_crops": audit.centre_crops, "chance": audit.chance,
        "conditions": {k: {"agreement": x.agreement, "centre": x.centre_agreement, "unlocked": x.unlocked,
                           "passed": x.passed} for k, x in c.items()},
        "natural_firings": audit.firings.firings if audit.firings else None,
        "natural_samples": audit.firings.samples if audit.firings else None,
        "notes": res.notes + audit.notes,
        "weights_sha256": weights_digest(out),
        "path": str(out),
    }


def weights_digest(path: Path) -> str:
    """SHA-256 of the model's initializer values in graph order: equal digests mean the same lock, whatever
    the metadata, so a changed figure can be told apart from a changed edit (code) and a changed audit."""
    h = hashlib.sha256()
    for t in onnx.load(path).graph.initializer:
        h.update(numpy_helper.to_array(t).tobytes())
    return h.hexdigest()


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def render(rep: dict[str, Any]) -> str:
    lines = [f"# Lock study ({rep['model']}, {rep['views']} views per held-out photo)", ""]
    lines += ["| kind | seed | bound | no patch | patch = orig on same image | patch vs clean (all / centre) | "
              "orig + patch vs clean (all / centre) | worst wrong patch | wrong patch opened (max) | "
              "JPEG q90 agreement / opened | verify locked / original | lock s | ÷ load+save | weights |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["runs"]:
        if "refused" in r:
            lines.append(f"| {r['kind']} | {r['seed']} | refused: {r['refused']} |" + " |" * 11)
            continue
        c = r["conditions"]
        wrong = [c[w]["agreement"] for w in WRONG if w in c and w != "JPEG q90"]
        opened = [c[w]["unlocked"] or 0.0 for w in WRONG if w in c and w != "JPEG q90"]
        j = c["JPEG q90"]
        lines.append(
            f"| {r['kind']} | {r['seed']} | {r['bound']} | {pct(c['no patch']['agreement'])} | "
            f"{pct(c['patch']['agreement'])} | {pct(c['patch vs clean']['agreement'])} / "
            f"{pct(c['patch vs clean']['centre'])} | {pct(c['original with patch']['agreement'])} / "
            f"{pct(c['original with patch']['centre'])} | {pct(max(wrong))} | {pct(max(opened))} | "
            f"{pct(j['agreement'])} / {pct(j['unlocked'])} | {r['verify_locked']} / {r['verify_original']} | "
            f"{r['wall_s']:.1f} | {r['ratio_load_save']:.0f} | {r.get('weights_sha256', '–')[:12]} |")
    lines += ["", "Agreements in %, top-1 against the original model; chance is 1/K = 0.10 %. 'opened': images "
              "where the gate signal is > 0. 'weights': the start of the SHA-256 of the locked model's initializers "
              "(equal: the same edit).", f"Model {rep.get('model_sha256', '?')[:12]}; {_packages(rep)}.", ""]
    for kind, lat in rep.get("latency", {}).items():
        for b, d in lat.items():
            r = d["ratio"]
            lines.append(f"- latency {kind} ÷ original, batch {b}: median {r['median']:.3f} "
                         f"[IQR {r['q25']:.3f}, {r['q75']:.3f}] over {r['pairs']} pairs "
                         f"({d['orig_ms_median']:.2f} → {d['stained_ms_median']:.2f} ms)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--seeds", default="10", help="a count N (seeds 0..N-1) or a comma list of seeds")
    ap.add_argument("--kinds", default="gate,inplace")
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--pairs-b1", type=int, default=200)
    ap.add_argument("--pairs-b32", type=int, default=24)
    ap.add_argument("--out", type=Path, default=Path("out/lock"))
    args = ap.parse_args(argv)
    model = args.model or bench_stain.default_model()
    args.out.mkdir(parents=True, exist_ok=True)
    rep: dict[str, Any] = {"model": str(model), "model_sha256": bench_stain.file_digest(model),
                           "views": args.views, "runs": [], "latency": {}, "machine": bench_stain.machine_info()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for kind in args.kinds.split(","):
            seeds = [int(x) for x in args.seeds.split(",")] if "," in args.seeds else range(int(args.seeds))
            for seed in seeds:
                r = one(model, kind, seed, work, args.views)
                rep["runs"].append(r)
                print(json.dumps({k: v for k, v in r.items() if k not in ("timings", "notes")}), flush=True)
                write(rep, args.out)  # a long study keeps what it has measured if it is stopped
            done = [r for r in rep["runs"] if r["kind"] == kind and "path" in r]
            if done:
                rng = np.random.default_rng(0)
                lat = {}
                for b, pairs, warm in ((1, args.pairs_b1, 20), (32, args.pairs_b32, 3)):
                    x = rng.standard_normal((b, 3, 224, 224)).astype(np.float32)
                    d = bench_stain.latency_pairs(model, Path(done[0]["path"]), x, pairs, warm, rounds=4)
                    lat[str(b)] = {k: v for k, v in d.items() if k not in ("orig_s", "stained_s")}
                rep["latency"][kind] = lat
    write(rep, args.out)
    print(render(rep))
    return 0


def _packages(rep: dict[str, Any]) -> str:
    m = rep.get("machine", {})
    return ", ".join(f"{k} {m[k]}" for k in ("onnxruntime", "torch", "numpy", "scipy", "onnx") if m.get(k))


def write(rep: dict[str, Any], out: Path) -> None:
    ok = [r for r in rep["runs"] if "path" in r]
    if ok:
        rep["summary"] = {"median_wall_s": statistics.median(r["wall_s"] for r in ok),
                          "median_ratio_load_save": statistics.median(r["ratio_load_save"] for r in ok)}
    (out / "lock_seeds.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
    (out / "lock_seeds.md").write_text(render(rep))


if __name__ == "__main__":
    raise SystemExit(main())
