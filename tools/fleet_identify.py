"""Identify many copies of a real registry: is each named as its own customer, and is anyone else ever named?

Takes a registry and the ``dist/`` folder an ``onnxstain issue`` run wrote (e.g. the 1,000-copy run of
tools/README.md), identifies ``--copies`` of its copies drawn at random (white box; ``--black-box`` of them
through the black box too) and the original model, and reports per copy: the time, whether its own customer
was named, and every other customer named (an innocent). Nothing here is synthetic: real keys, real copies.

    python tools/fleet_identify.py --registry /tmp/k1000/many/fleet.db --copies 100 --black-box 5 \\
        --original .cache/models/mobilenet_v2/mobilenet_v2.onnx --out out/fleet_identify.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxstain.fleet.identify import identify  # noqa: E402
from onnxstain.fleet.registry import Registry  # noqa: E402


def run(reg: Registry, path: Path, black: bool, original: Path | None) -> dict:
    start = time.perf_counter()
    got = identify(path, reg, black_box=black, original=original)
    return {"model": str(path), "basis": got.basis, "seconds": round(time.perf_counter() - start, 3),
            "keys": got.keys, "named": [m.customer for m in got.named], "bound_log10": got.bound_log10,
            "best": got.best.customer if got.best else None,
            "runner_up_score": got.runner_up.score if got.runner_up else None, "queries": got.queries}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", type=Path, required=True)
    ap.add_argument("--copies", type=int, default=100, help="copies identified through the white box")
    ap.add_argument("--black-box", type=int, default=0, help="of those, how many through the black box too")
    ap.add_argument("--original", type=Path, help="the source model (identified too: no one may be named)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = []
    with Registry.open(args.registry, readonly=True) as reg:
        copies = [c for c in reg.copies(state="issued") if c.kind == "stain"]
        pick = [copies[i] for i in sorted(rng.choice(len(copies), min(args.copies, len(copies)), replace=False))]
        for n, copy in enumerate(pick):
            for black in (False, True) if n < args.black_box else (False,):
                row = run(reg, Path(copy.model_path), black, args.original)
                row.update(customer=copy.customer, right=row["named"] == [copy.customer],
                           innocents=[c for c in row["named"] if c != copy.customer])
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.original is not None:
            for black in (False, True) if args.black_box else (False,):
                row = run(reg, args.original, black, args.original)
                row.update(customer=None, right=row["named"] == [], innocents=row["named"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for basis in ("white-box", "black-box"):
        mine = [r for r in rows if r["basis"] == basis and r["customer"] is not None]
        if mine:
            summary[basis] = {"copies": len(mine), "named_right": sum(r["right"] for r in mine),
                              "innocents_named": sum(len(r["innocents"]) for r in mine),
                              "seconds_median": statistics.median(r["seconds"] for r in mine),
                              "seconds_max": max(r["seconds"] for r in mine),
                              "keys": mine[0]["keys"],
                              "worst_bound_log10": max(r["bound_log10"] for r in mine if r["bound_log10"] is not None)
                              if any(r["bound_log10"] is not None for r in mine) else None}
    originals = [r for r in rows if r["customer"] is None]
    summary["original"] = {"runs": len(originals), "named": sum(len(r["named"]) for r in originals)}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"identifications": rows, "summary": summary}, indent=2) + "\n")
    failed = summary["original"]["named"] or any(not r["right"] for r in rows if r["customer"] is not None
                                                 and r["basis"] == "white-box")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
