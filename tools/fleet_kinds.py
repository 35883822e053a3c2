"""Locked and stained-then-locked copies (``issue --lock``, ``--both``) on real models: per copy, its time, whether
it opens with its own customer's patch and not with another's, and (``--both``) whether its stain verifies
through the lock (from the weights; with ``--unlock``) and identify names its customer.

    python tools/fleet_kinds.py --models mobilenet_v2,efficientnet_lite0_dynamo,rapidocr_cls --copies 2 \\
        --workdir /tmp/fkinds --out out/fleet_kinds.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxstain  # noqa: E402
from onnxstain import LockOptions, StainOptions  # noqa: E402
from onnxstain.cache import cache_dir  # noqa: E402
from onnxstain.fleet.identify import identify  # noqa: E402
from onnxstain.fleet.issue import customer_key_path, issue  # noqa: E402
from onnxstain.fleet.registry import Registry  # noqa: E402


def model_path(name: str) -> Path:
    p = Path(name)
    return p if p.suffix == ".onnx" else cache_dir() / "models" / name / f"{name}.onnx"


def run(name: str, kind: str, copies: int, work: Path) -> list[dict]:
    folder = work / f"{name}-{kind}"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "dist").mkdir(parents=True)
    customers = [f"{kind}{i}" for i in range(copies)]
    options, then_lock = (LockOptions(), None) if kind == "lock" else (StainOptions(), LockOptions())
    rows = []
    with Registry.open(folder / "fleet.db", create=True) as reg:
        res = issue(model_path(name), customers, folder / "dist", reg, options=options, then_lock=then_lock)
        records = {r.customer: r for r in reg.copies()}
        keys = {c.customer: customer_key_path(c.path) for c in res.issued}
        for n, c in enumerate(res.issued):
            other = keys[customers[(n + 1) % len(customers)]]
            row = {"model": name, "kind": kind, "customer": c.customer, "seconds": round(c.seconds, 2),
                   "setup_seconds": round(res.setup_seconds, 2),
                   "own_patch_opens": onnxstain.verify(c.path, keys[c.customer]).stained,
                   "other_patch_opens": onnxstain.verify(c.path, other).stained}
            if kind == "both":
                stain_key = folder / f"{c.customer}.stain.key"
                stain_key.write_bytes(reg.key_bytes(records[c.customer].id))
                locked = onnxstain.verify(c.path, stain_key)
                unlocked = onnxstain.verify(c.path, stain_key, unlock=keys[c.customer])
                row.update(stain_through_lock=locked.stained, stain_through_lock_basis=locked.checks[-1].name,
                           stain_unlocked=unlocked.stained, stain_unlocked_score=round(unlocked.score, 3),
                           stain_unlocked_threshold=round(unlocked.threshold, 3),
                           identify_white=[m.customer for m in identify(c.path, reg).named],
                           identify_black=[m.customer for m in identify(c.path, reg, black_box=True).named])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenet_v2,efficientnet_lite0_dynamo,rapidocr_cls")
    ap.add_argument("--kinds", default="lock,both")
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fleet_kinds"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = [r for name in args.models.split(",") for kind in args.kinds.split(",")
            for r in run(name, kind, args.copies, args.workdir)]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    ok = all(r["own_patch_opens"] and not r["other_patch_opens"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
