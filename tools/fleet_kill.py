"""Crash and concurrency trials of ``onnxstain issue``: the registry and ``dist/`` stay consistent.

Each trial, on a fresh registry and output folder:

* **kill**: ``onnxstain issue`` on ``--customers`` customers is SIGKILLed after a random delay (seeded), while it
  loads, calibrates or issues; then the registry is opened (which recovers dead writers) and checked;
* **concurrent**: two ``onnxstain issue`` runs at once on overlapping customer lists, to the end.

Consistent means: every issued row's model file exists with its hash; every ``<customer>.onnx`` in ``dist/``
has an issued row; no pending rows, no temp files in ``dist/``, no staged keys beside the registry (after
recovery); each customer at most one live copy. The kill trials then re-run ``issue`` to the end and check
that it completes the list (resumable). Example: ``python tools/fleet_kill.py --trials 20``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from onnxstain.fleet.registry import Registry  # noqa: E402

CLI = [sys.executable, "-c", "from onnxstain.cli import main; main()"]


def tiny_model(work: Path) -> tuple[Path, Path]:
    """The tests' tiny classifier and 48 smooth images (fast trials; the protocol is the model's size apart)."""
    import onnx
    from tinymodels import smooth_images, tiny_classifier, write_images

    from onnxstain import Preprocessing

    model = work / "model.onnx"
    onnx.save(tiny_classifier(), model)
    Preprocessing(height=32, width=32, resize=None).save(work / "model.preprocessing.json")
    images = work / "images"
    images.mkdir()
    write_images(images, smooth_images(48, seed=0))
    return model, images


def consistent(db: Path, dist: Path) -> list[str]:
    """Every problem found (empty: consistent). Opening the registry for writing recovers dead writers first."""
    problems: list[str] = []
    with Registry.open(db, create=True) as reg:
        rows = reg.copies()
    live: dict[str, int] = {}
    for r in rows:
        if r.state == "pending":
            problems.append(f"pending row {r.id}")
        if r.state == "issued":
            live[r.customer] = live.get(r.customer, 0) + 1
            p = Path(r.model_path)
            if not p.is_file():
                problems.append(f"issued copy {r.id} has no file")
            elif hashlib.sha256(p.read_bytes()).hexdigest() != r.model_sha256:
                problems.append(f"issued copy {r.id}'s file differs from its hash")
    problems += [f"{c} has {n} live copies" for c, n in live.items() if n > 1]
    issued_files = {Path(r.model_path).name for r in rows if r.state == "issued"}
    for f in dist.iterdir():
        if f.name.startswith(".onnxstain-tmp-"):
            problems.append(f"temp file {f.name} in dist/")
        elif f.suffix == ".onnx" and f.name not in issued_files:
            problems.append(f"unregistered copy {f.name}")
    problems += [f"staged keys left: {p.name}" for p in db.parent.glob(".onnxstain-tmp-w*-stage-*")]
    return problems


def _issue(model: Path, images: Path, customers: Path, dist: Path, db: Path) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "issue", str(model), "--customers", str(customers), "-o", str(dist), "--registry",
                             str(db), "--images", str(images), "--fpr", "0.05", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_trial(i: int, model: Path, images: Path, work: Path, rng: np.random.Generator, n: int,
               delay: tuple[float, float]) -> dict:
    t = work / f"kill{i}"
    dist = t / "dist"
    dist.mkdir(parents=True)
    db = t / "fleet.db"
    customers = t / "c.csv"
    customers.write_text("\n".join(f"k{i}c{j}" for j in range(n)) + "\n")
    wait = float(rng.uniform(*delay))
    proc = _issue(model, images, customers, dist, db)
    time.sleep(wait)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Registry.open(db, create=True) as reg:
        before = len([r for r in reg.copies() if r.state == "issued"])
    problems = consistent(db, dist)
    rerun = _issue(model, images, customers, dist, db)
    _, err = rerun.communicate()
    problems += consistent(db, dist)
    with Registry.open(db, readonly=True) as reg:
        after = len([r for r in reg.copies() if r.state == "issued"])
    if rerun.returncode != 0 or after != n:
        problems.append(f"the re-run issued {after} of {n} (exit {rerun.returncode}: {err.strip()[-200:]})")
    return {"trial": i, "kind": "kill", "after_s": round(wait, 2), "issued_at_kill": before, "problems": problems}


def concurrent_trial(i: int, model: Path, images: Path, work: Path, n: int) -> dict:
    t = work / f"conc{i}"
    dist = t / "dist"
    dist.mkdir(parents=True)
    db = t / "fleet.db"
    a, b = t / "a.csv", t / "b.csv"
    names = [f"x{i}c{j}" for j in range(n)]
    a.write_text("\n".join(names[: 2 * n // 3]) + "\n")
    b.write_text("\n".join(names[n // 3:]) + "\n")  # the middle third is in both lists
    procs = [_issue(model, images, a, dist, db), _issue(model, images, b, dist, db)]
    codes = [p.wait() for p in procs]
    problems = consistent(db, dist)
    with Registry.open(db, readonly=True) as reg:
        issued = sorted(r.customer for r in reg.copies() if r.state == "issued")
    if codes != [0, 0] or issued != sorted(names):
        problems.append(f"exit codes {codes}; issued {len(issued)} of {n}")
    return {"trial": i, "kind": "concurrent", "problems": problems}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--customers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, required=True, help="an empty folder for the trials")
    ap.add_argument("--out", type=Path, help="write the trials as JSON here")
    ap.add_argument("--min-delay", type=float, default=3.0, help="earliest kill, seconds after the start")
    ap.add_argument("--max-delay", type=float, default=14.0)
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if any(args.workdir.iterdir()):
        raise SystemExit(f"{args.workdir} is not empty")
    model, images = tiny_model(args.workdir)
    rng = np.random.default_rng(args.seed)
    rows = []
    for i in range(args.trials):
        rows.append(kill_trial(i, model, images, args.workdir, rng, args.customers, (args.min_delay, args.max_delay)))
        rows.append(concurrent_trial(i, model, images, args.workdir, args.customers))
        for r in rows[-2:]:
            print(json.dumps(r), flush=True)
    bad = [r for r in rows if r["problems"]]
    kills = [r for r in rows if r["kind"] == "kill"]
    print(f"kill: {sum(not r['problems'] for r in kills)}/{len(kills)} consistent (killed after "
          f"{min(r['issued_at_kill'] for r in kills)}-{max(r['issued_at_kill'] for r in kills)} copies); "
          f"concurrent: {sum(not r['problems'] for r in rows if r['kind'] == 'concurrent')}/{args.trials} consistent")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
