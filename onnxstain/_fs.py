"""File-system steps shared by every writer of the package (the run's outputs, the fleet's registry)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def sync_folder(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (a kill cannot undo it anyway; a power cut could)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
