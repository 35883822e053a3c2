"""``python -m models``: build every available recipe and the natural-image caches."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from models import RECIPES, available_recipes, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    parser.add_argument("--cache", type=Path, default=None, help="cache root (sets ONNXSTAIN_CACHE)")
    parser.add_argument("--force", action="store_true", help="rebuild models even if up to date")
    parser.add_argument("--no-natural", action="store_true", help="skip the natural-image caches")
    args = parser.parse_args(argv)
    if args.cache is not None:
        os.environ["ONNXSTAIN_CACHE"] = str(args.cache.resolve())

    ready = available_recipes()
    for name in RECIPES:
        if name not in ready:
            print(f"{name}: skipped (requirements not installed)")
            continue
        start = time.perf_counter()
        path = build(name, force=args.force)
        print(f"{name}: {path} ({time.perf_counter() - start:.1f} s)")

    if not args.no_natural:
        from onnxstain.naturalset import describe, natural_images

        info = describe()
        sources = ", ".join(
            f"{src} {d['calibration'] + d['heldout']}" for src, d in sorted(info["sources"].items())
        )
        print(f"natural photos: {info['photos']} ({sources})")
        for split in ("calibration", "heldout"):
            start = time.perf_counter()
            ns = natural_images(split, progress=sys.stderr.isatty())
            print(
                f"natural {split}: {len(ns)} images from {ns.n_photos} photos "
                f"({time.perf_counter() - start:.1f} s)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
