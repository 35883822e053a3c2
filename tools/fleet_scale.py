"""How identify scales with the registry: time the white box and the black box over registries of 1,000 to
10,000 keys.

The registries here are **synthetic for timing**: ``--real`` copies are issued for real (their keys, triggers and
copies are what ``onnxstain issue`` writes), and the other rows are those keys' blobs under new customer names,
each index given a fresh random direction (so each row is a distinct, innocent key for the white box; for the
black box they re-use a real key's trigger, so their queries cost what a real key's do). The suspect is one
of the real copies. It reports the time, whether the right customer (and no other) was named, and the bound.
Issuing 10,000 real keys takes ~16 h on this machine (5.9 s per MobileNetV2 copy); this measures identify's
side of the 10,000-key target without them.

``python tools/fleet_scale.py --sizes 1000,10000 --workdir /tmp/fscale --out out/fleet_scale.json``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxstain.fleet.identify import identify  # noqa: E402
from onnxstain.fleet.index import IndexEntry  # noqa: E402
from onnxstain.fleet.issue import issue  # noqa: E402
from onnxstain.fleet.registry import Registry  # noqa: E402


def grow(db: Path, size: int, rng: np.random.Generator, suspect: str) -> None:
    """Add synthetic rows until the registry holds ``size`` keys (see the module docstring). They copy the other
    real keys, never the suspect's: for the black box a copy of a key is that key (same trigger, same signature)."""
    with Registry.open(db) as reg:
        have = len(reg.copies())
        real = [(r, reg.key_bytes(r.id), blob) for r, (_, _, blob) in zip(reg.copies(), reg.index_rows(), strict=True)
                if r.customer != suspect and not r.customer.startswith("s")]
        with reg.writer() as w:
            dist = Path(real[0][0].model_path).parent / "synthetic"
            dist.mkdir(exist_ok=True)
            for i in range(have, size):
                rec, key_bytes, blob = real[i % len(real)]
                entry = IndexEntry.from_bytes(blob)
                v = rng.standard_normal(entry.m)
                fresh = IndexEntry(**{**entry.__dict__, "direction": v / np.linalg.norm(v)})
                # a registry row needs a model file: a tiny placeholder (identify reads the suspect, not these)
                w.place(customer=f"s{i:06d}", kind="stain", source_sha256=rec.source_sha256,
                        model_path=dist / f"s{i:06d}.onnx", data=f"synthetic {i}".encode(), key_bytes=key_bytes,
                        key_commitment=f"{rec.key_commitment[:-8]}{i:08x}", bound_log10=rec.bound_log10,
                        index_blob=fresh.to_bytes())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--real", type=int, default=4)
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--black-box-sizes", default="1000", help="sizes at which to time the black box too")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    from models import corpus

    original = corpus.BY_NAME[args.model].path()
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    dist = args.workdir / "dist"
    dist.mkdir(parents=True)
    db = args.workdir / "fleet.db"
    with Registry.open(db, create=True) as reg:
        res = issue(original, [f"c{i}" for i in range(args.real)], dist, reg, seeds=iter(range(args.seed, 10**6)))
    suspect = res.issued[-1]
    rng = np.random.default_rng(args.seed)
    rows = []
    black_sizes = {int(s) for s in args.black_box_sizes.split(",") if s}
    for size in sorted(int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        grow(db, size, rng, suspect.customer)
        built = time.perf_counter() - t0
        with Registry.open(db, readonly=True) as reg:
            for black in (False, True) if size in black_sizes else (False,):
                got = identify(suspect.path, reg, original=original, black_box=black)
                row = {"keys": got.keys, "basis": got.basis, "seconds": round(got.seconds, 2), "queries": got.queries,
                       "named": [m.customer for m in got.named], "right": [m.customer for m in got.named] ==
                       [suspect.customer], "bound_log10": got.bound_log10, "grow_seconds": round(built, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["right"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
