"""What the lock's occlusion-aware refinement buys, and what it costs: lock real models with several refinement
settings and measure the patch's own cost on held-out photos.

For each model × seed × setting (``STEPS@LR``: refinement steps at that step size; ``0@0``: no refinement) the
model is locked through the public API (``onnxstain.lock``, default gate lock otherwise) and timed; then the
*original* model's top-1 on the held-out natural photos is compared with and without the patch pasted (the
locked model with its patch computes exactly that: what the patch covers is its whole cost to the user). One
JSON line per lock on stdout, and a table (median over seeds) with ``--out``.

    python tools/lock_refine.py --models mobilenet_v2,efficientnet_lite0_dynamo --seeds 1,2,3 \\
        --settings 0@0,15@8,200@2 --out out/lock_refine.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

import onnxstain  # noqa: E402
from onnxstain import LockOptions  # noqa: E402
from onnxstain.cache import cache_dir  # noqa: E402
from onnxstain.naturalset import natural_images  # noqa: E402
from onnxstain.runtime import run_batches, session  # noqa: E402


def model_path(name: str) -> Path:
    """A built recipe's model (``python -m models`` / ``models.corpus``) or a path."""
    p = Path(name)
    return p if p.suffix == ".onnx" else cache_dir() / "models" / name / f"{name}.onnx"


def settings(text: str) -> list[tuple[int, float]]:
    out = []
    for part in text.split(","):
        steps, _, lr = part.partition("@")
        out.append((int(steps), float(lr or LockOptions.occlusion_lr)))
    return out


def patch_cost(model: Path, key: Path, clean: dict) -> tuple[float, int]:
    """The original model's top-1 agreement, held-out photos with the key's patch pasted vs without."""
    sess = session(onnx.load(model))
    out = sess.get_outputs()[0].name
    x = clean["x"]
    if "scores" not in clean:
        clean["scores"] = run_batches(sess, x, [out])[out].reshape(len(x), -1)
    patched = run_batches(sess, onnxstain.paste_patch(x, key), [out])[out].reshape(len(x), -1)
    return float(np.mean(patched.argmax(1) == clean["scores"].argmax(1))), len(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenet_v2", help="recipe names or .onnx paths, comma separated")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--settings", default="0@0,15@8,200@2", help="STEPS@LR, comma separated")
    ap.add_argument("--out", type=Path, help="write the lines and the table as JSON")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            model = model_path(name)
            clean: dict = {}
            for seed in [int(s) for s in args.seeds.split(",")]:
                for steps, lr in settings(args.settings):
                    out, key = work / "locked.onnx", work / "locked.key"
                    for f in (out, key, work / "locked.key.public.json"):
                        f.unlink(missing_ok=True)
                    start = time.perf_counter()
                    res = onnxstain.lock(model, out, key, LockOptions(kind="gate", seed=seed, occlusion_steps=steps,
                                                                      occlusion_lr=lr or LockOptions.occlusion_lr))
                    seconds = time.perf_counter() - start
                    if "x" not in clean:
                        _, pre = onnxstain.lock_patch(key)
                        clean["x"] = pre.to_input(natural_images("heldout", size=res.input_hw).pixels)
                    agreement, images = patch_cost(model, key, clean)
                    row = {"model": name, "seed": seed, "steps": steps, "lr": lr, "seconds": round(seconds, 2),
                           "timings": {k: round(v, 2) for k, v in res.timings.items()},
                           "patched_agreement": round(agreement, 4), "images": images, "occlusion": res.occlusion}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    table = []
    for name in dict.fromkeys(r["model"] for r in rows):
        for steps, lr in dict.fromkeys((r["steps"], r["lr"]) for r in rows if r["model"] == name):
            mine = [r for r in rows if r["model"] == name and (r["steps"], r["lr"]) == (steps, lr)]
            table.append({"model": name, "setting": f"{steps}@{lr:g}", "seeds": len(mine),
                          "patched_agreement_median": statistics.median(r["patched_agreement"] for r in mine),
                          "patched_agreement_range": [min(r["patched_agreement"] for r in mine),
                                                      max(r["patched_agreement"] for r in mine)],
                          "patch_search_seconds_median": statistics.median(
                              r["timings"]["patch_search"] for r in mine),
                          "lock_seconds_median": statistics.median(r["seconds"] for r in mine)})
    for t in table:
        print(json.dumps(t))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"locks": rows, "table": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
