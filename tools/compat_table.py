"""Compatibility table: every built corpus model × every onnxstain command, run as a new user would.

For each model of ``models/corpus.py`` that is built in the cache (``python -m models.corpus
[--heavy]`` first), the CLI runs in a subprocess, each with a time limit (``--timeout``):

* ``inspect`` — hosts usable / layers listed;
* ``stain-inplace``, ``stain-insert`` (``stain --mode ...``), ``lock-gate``, ``lock-inplace``
  (``lock --kind ...``), seed 0, default settings, the recorded ``.preprocessing.json``; then
  ``verify`` on the modified model (must exit 0) and on the original (must exit 1), and
  ``evaluate`` (fidelity; for a lock key, the lock audit) with its ``measured:`` line quoted.

Each cell records the exit codes, the time, and the one line that matters: the tool's refusal
(``onnxstain: error: ...``), or a traceback's last line, or the fidelity figure. Cell verdicts:

* **pass** — the command exited 0, ``verify`` said 0 on the modified model and 1 on the original,
  ``evaluate`` ran (its figures are quoted; the criteria are those of ``format_table.py``);
* **refused** — exit 2 with a one-line ``onnxstain: error:`` message;
* **FAIL** — the command ran but a verify exit code was wrong or ``evaluate`` failed;
* **ERROR** — a traceback or any other exit code; **TIMEOUT** — over the limit.

Writes ``compat_table.json`` and ``compat_table.md`` to ``--out`` (one JSON per model as it goes,
so a long run can be stopped and resumed with ``--resume``) and, with ``--readme``, puts the table
into ``tools/README.md`` between the ``compat-table`` markers.

    python tools/compat_table.py                          # every built corpus model, every op
    python tools/compat_table.py --models craft,mtcnn_rnet --ops inspect,stain-insert --quick
    python tools/compat_table.py --quick --readme         # 1 view per photo in evaluate, fewer images
    python tools/compat_table.py --table-only --readme    # the table again from out/compat/*.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPS = ("inspect", "stain-inplace", "stain-insert", "lock-gate", "lock-inplace")
MARK_START = "<!-- compat-table:start -->"
MARK_END = "<!-- compat-table:end -->"
CLI = "from onnxstain.cli import main; main()"


def run_cli(args: list[str], timeout: float) -> dict[str, Any]:
    """One CLI call: exit code, seconds, the last meaningful line, and stdout."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "200", "NO_COLOR": "1"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=timeout,
                           env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"rc": None, "seconds": round(time.perf_counter() - t0, 1), "line": f"timeout after {timeout:.0f} s",
                "stdout": ""}
    res = {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1), "line": last_line(p.stdout, p.stderr),
           "stdout": p.stdout, "traceback": "Traceback (most recent call last)" in p.stderr}
    if res["traceback"]:
        res["where"] = traceback_frame(p.stderr)
    return res


def traceback_frame(stderr: str) -> str:
    """The innermost traceback frame inside onnxstain: ``module.py:line in function``."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', stderr)
    ours = [f for f in frames if "/onnxstain/" in f[0]] or frames
    if not ours:
        return ""
    path, line, func = ours[-1]
    return f"{path.split('/onnxstain/')[-1] if '/onnxstain/' in path else path}:{line} in {func}"


def last_line(stdout: str, stderr: str) -> str:
    """The refusal (``onnxstain: error: ...``), else a traceback's last line, else the last output line."""
    for text in (stderr, stdout):
        for ln in text.splitlines():
            if ln.startswith("onnxstain: error:"):
                return ln.strip()
    for text in (stderr, stdout):
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(("warn", "W1"))]
        if lines:
            return lines[-1]
    return ""


def measured_lines(stdout: str) -> list[str]:
    """The figures ``evaluate`` prints (fidelity, agreement) without the rich markup."""
    keep = []
    for ln in stdout.splitlines():
        s = re.sub(r"\s+", " ", ln.strip())
        if re.search(r"top-1 agreement|correlation with the original|anchor-level mAP|agreement|STAINED|UNLOCK|unlock",
                     s, re.IGNORECASE):
            keep.append(s)
    return keep[:4]


def classify(op: dict[str, Any]) -> str:
    if op["rc"] is None:
        return "TIMEOUT"
    if op["rc"] == 2 and op["line"].startswith("onnxstain: error:") and not op.get("traceback"):
        return "refused"
    if op["rc"] != 0:
        return "ERROR"
    return "ok"


def run_op(model: Path, op: str, work: Path, timeout: float, images: Path | None, views: int) -> dict[str, Any]:
    cell: dict[str, Any] = {"op": op}
    if op == "inspect":
        js = work / "inspect.json"
        js.unlink(missing_ok=True)
        r = run_cli(["inspect", str(model), "--json", str(js)], timeout)
        cell.update(command=r, verdict=classify(r))
        if cell["verdict"] == "ok" and js.is_file():
            info = json.loads(js.read_text())
            hosts = info.get("hosts", [])
            usable = [h for h in hosts if h.get("usable")]
            reasons: dict[str, int] = {}
            for h in hosts:
                if not h.get("usable"):
                    reasons[str(h.get("reason"))] = reasons.get(str(h.get("reason")), 0) + 1
            top = max(reasons, key=lambda k: reasons[k]) if reasons else ""
            cell["figures"] = {"layers": len(hosts), "usable": len(usable), "head": info.get("head"),
                               "input": info.get("input"), "top_reason": top}
            cell["verdict"] = "pass"
            cell["summary"] = (f"{len(usable)}/{len(hosts)} usable; head {info.get('head') or 'none'}"
                               + (f"; most: {top} ({reasons[top]})" if top else ""))
        else:
            cell["summary"] = r["line"]
        return cell
    kind, sub = op.split("-", 1)
    out, key = work / f"{op}.onnx", work / f"{op}.key"
    for f in (out, key):
        f.unlink(missing_ok=True)
    args = [kind, str(model), "-o", str(out), "--key", str(key), "--seed", "0", "--quiet"]
    args += ["--mode", sub] if kind == "stain" else ["--kind", sub]
    if images is not None:
        args += ["--images", str(images)]
    r = run_cli(args, timeout)
    cell["command"] = r
    verdict = classify(r)
    if verdict != "ok":
        where = f" (at onnxstain/{r['where']})" if r.get("where") else ""
        cell.update(verdict=verdict, summary=r["line"] + where)
        return cell
    vm = run_cli(["verify", str(out), "--key", str(key)], timeout)
    vo = run_cli(["verify", str(model), "--key", str(key)], timeout)
    ev_args = ["evaluate", str(model), str(out), "--key", str(key), "--views", str(views), "--quiet"]
    if images is not None:
        ev_args += ["--images", str(images)]
    ev = run_cli(ev_args, timeout)
    cell.update(verify_modified=vm, verify_original=vo, evaluate=ev)
    figures = measured_lines(ev["stdout"]) if ev["rc"] == 0 else []
    problems = []
    if vm["rc"] != 0:
        problems.append(f"verify modified exit {vm['rc']}: {vm['line']}")
    if vo["rc"] != 1:
        problems.append(f"verify original exit {vo['rc']}: {vo['line']}")
    if ev["rc"] != 0:
        problems.append(f"evaluate exit {ev['rc']}: {ev['line']}")
    if any(x["rc"] is None or (x["rc"] not in (0, 1, 2)) or x.get("traceback") for x in (vm, vo, ev)):
        cell["verdict"] = "ERROR"
    else:
        cell["verdict"] = "FAIL" if problems else "pass"
    cell["figures"] = figures
    cell["summary"] = "; ".join(problems) if problems else " | ".join(figures) or ev["line"]
    return cell


def quick_images(folder: Path, n: int = 24) -> Path:
    """``n`` bundled natural photos as PNG files (for ``--quick``), written once."""
    from PIL import Image

    from onnxstain.naturalset import natural_images

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) >= n:
        return folder
    px = natural_images("heldout", views=1).pixels
    step = max(1, len(px) // n)
    for i in range(n):
        Image.fromarray(px[(i * step) % len(px)]).save(folder / f"photo_{i:02d}.png")
    return folder


def markdown(results: list[dict[str, Any]], ops: tuple[str, ...]) -> str:
    from models.corpus import BY_NAME

    lines = ["| model | family / route / task | " + " | ".join(ops) + " |",
             "|---|---|" + "---|" * len(ops)]
    for res in results:
        e = BY_NAME.get(res["model"])
        desc = f"{e.family}; {e.route}; {e.task} {e.size}" if e else ""
        cells = []
        for op in ops:
            c = res["cells"].get(op)
            if c is None:
                cells.append("–")
                continue
            secs = c["command"]["seconds"]
            text = str(c.get("summary", "")).replace("|", "\\|").replace("\n", " ")
            if len(text) > 260:
                text = text[:257] + "…"
            cells.append(f"**{c['verdict']}** ({secs:.0f} s) {text}")
        lines.append(f"| `{res['model']}` | {desc} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def put_in_readme(table: str, header: str) -> None:
    readme = ROOT / "tools" / "README.md"
    text = readme.read_text()
    block = f"{MARK_START}\n{header}\n\n{table}{MARK_END}"
    if MARK_START in text and MARK_END in text:
        text = text[: text.index(MARK_START)] + block + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = readme.with_name(".README.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compat_table.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="comma-separated corpus names (default: every built one)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {','.join(OPS)}")
    parser.add_argument("--quick", action="store_true",
                        help="24 held-out photos as the --images folder of stain/lock/evaluate, 1 view each")
    parser.add_argument("--views", type=int, default=None, help="evaluate --views (default 16, --quick 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per command")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "compat")
    parser.add_argument("--resume", action="store_true", help="keep the per-model results already in --out")
    parser.add_argument("--readme", action="store_true", help="write the table into tools/README.md")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: rebuild the table from the per-model JSON files in --out")
    args = parser.parse_args(argv)

    from models.corpus import entries

    ops = tuple(o for o in args.ops.split(",") if o)
    bad = [o for o in ops if o not in OPS]
    if bad:
        parser.error(f"unknown op(s) {', '.join(bad)}; known: {', '.join(OPS)}")
    chosen = entries([n for n in args.models.split(",") if n] or None)
    todo = [e for e in chosen if e.built()]
    for e in chosen:
        if not e.built():
            print(f"{e.name}: not built (python -m models.corpus{' --heavy' if e.heavy else ''}); skipped")
    args.out.mkdir(parents=True, exist_ok=True)
    images = quick_images(args.out / "quick_images") if args.quick and not args.table_only else None
    views = args.views if args.views is not None else (1 if args.quick else 16)
    results = []
    for e in todo:
        per_model = args.out / f"{e.name}.json"
        res: dict[str, Any] = {"model": e.name, "path": str(e.path()), "cells": {}}
        if (args.resume or args.table_only) and per_model.is_file():
            res = json.loads(per_model.read_text())
        if args.table_only:
            if per_model.is_file():
                results.append(res)
            continue
        work = args.out / e.name
        work.mkdir(parents=True, exist_ok=True)
        for op in ops:
            if op in res["cells"]:
                continue
            cell = run_op(e.path(), op, work, args.timeout, images, views)
            res["cells"][op] = cell
            print(f"{e.name:26} {op:14} {cell['verdict']:8} {cell['command']['seconds']:6.1f} s  {cell['summary']}",
                  flush=True)
            per_model.write_text(json.dumps(res, indent=2) + "\n")
            for f in work.glob(f"{op}.onnx*"):  # keep the keys, drop the large models
                f.unlink()
        results.append(res)
    table = markdown(results, ops)
    (args.out / "compat_table.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "compat_table.md").write_text(table)
    print(table)
    if args.readme:
        spent = sum(c["command"]["seconds"] for r in results for c in r["cells"].values())
        limit = "" if args.table_only else f"time limit {args.timeout:.0f} s per command, evaluate --views {views}; "
        header = (f"Generated by `tools/compat_table.py` on {time.strftime('%Y-%m-%d')} (seed 0; {limit}the "
                  f"stain/lock/inspect commands took {spent / 60:.0f} min, verify and evaluate not counted). "
                  "Cell: **verdict** (seconds of the command) and the line that matters.")
        put_in_readme(table, header)
    errors = sum(c["verdict"] in ("ERROR", "TIMEOUT") for r in results for c in r["cells"].values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
