"""Extra natural photos from Debian's ``darknet`` and ``opencv-doc`` packages, without root.

``python -m models.debian_images`` runs ``apt-get download darknet opencv-doc`` in a temporary
folder, unpacks each package with ``dpkg-deb -x`` and keeps only the photos that
:mod:`onnxstain.naturalset` uses, under ``<cache_dir()>/debian/`` with their file-system layout
(``usr/share/darknet/data/dog.jpg``...). Everything else (about 100 MB of packages) is deleted.
It does nothing when the photos are already there, and exits 0 with one line when apt is unusable:
the photos are optional.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from onnxstain.cache import cache_dir
from onnxstain.naturalset import DEBIAN_SOURCES

_TIMEOUT = 600


def target_dir() -> Path:
    return cache_dir() / "debian"


def wanted_files() -> dict[str, list[str]]:
    """Debian package → the paths (relative to ``/``) of the photos to keep."""
    out: dict[str, list[str]] = {}
    for _prefix, package, folder, names in DEBIAN_SOURCES:
        out.setdefault(package, []).extend(f"{folder}/{n}" for n in names)
    return out


def _missing(dest: Path) -> dict[str, list[str]]:
    return {
        pkg: rels
        for pkg, rels in wanted_files().items()
        if not all((dest / r).is_file() or (Path("/") / r).is_file() for r in rels)
    }


def fetch(dest: Path | None = None, quiet: bool = False) -> int:
    """Download and unpack what is missing; returns the number of photos now in ``dest``."""
    dest = dest or target_dir()
    say = (lambda _msg: None) if quiet else print
    missing = _missing(dest)
    if not missing:
        say(f"Debian photos already present in {dest} (or installed system-wide)")
        return _count(dest)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        say("Debian photos skipped: apt-get/dpkg-deb not available")
        return _count(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix="debian-dl.") as tmp:
        work = Path(tmp)
        try:
            subprocess.run(
                ["apt-get", "download", *missing],
                cwd=work,
                check=True,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            lines = [ln for ln in str(detail).strip().splitlines() if ln.startswith("E:")] or [str(exc)]
            say(f"Debian photos skipped: apt-get download failed ({lines[-1].strip()})")
            return _count(dest)
        for pkg, rels in missing.items():
            debs = sorted(work.glob(f"{pkg}_*.deb"))
            if not debs:
                say(f"Debian photos from {pkg} skipped: no .deb downloaded")
                continue
            unpacked = work / f"x-{pkg}"
            try:
                subprocess.run(
                    ["dpkg-deb", "-x", str(debs[0]), str(unpacked)],
                    check=True,
                    capture_output=True,
                    timeout=_TIMEOUT,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                say(f"Debian photos from {pkg} skipped: dpkg-deb failed ({exc})")
                continue
            for rel in rels:
                src = unpacked / rel
                if src.is_file():
                    out = dest / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, out)
            shutil.rmtree(unpacked, ignore_errors=True)
    n = _count(dest)
    say(f"Debian photos: {n} in {dest}")
    return n


def _count(dest: Path) -> int:
    return sum((dest / r).is_file() for rels in wanted_files().values() for r in rels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.debian_images", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dest", type=Path, default=None, help="target folder (default: <cache>/debian)")
    args = parser.parse_args(argv)
    fetch(args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
