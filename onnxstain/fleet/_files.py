"""The files of the registry's write protocol: temp files, folder sync, hashing, and writer tokens.

A writer's token names its temp files (``.onnxstain-tmp-w<token>-…``) and its lock file
(``<db>.writers/<token>.lock``, ``flock``-ed for the writer's life and listing the folders it writes temp files
to). :func:`_new_token` takes a fresh token; :func:`_claim_dead` takes a dead writer's token over, so that its
leftovers can be resolved; :func:`_temp_files`, :func:`_lock_tokens` and :func:`_remove_token_temps` find and
clear what writers left on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from ..errors import BadInputError

# The temp-file prefix of onnxstain.outputs (not imported from there: that module loads onnx). Its stale-file
# clean-up reads the text after the prefix as a process id; "w<token>" is none, so it leaves ours alone.
TEMP_PREFIX = ".onnxstain-tmp-"

_TOKEN = re.compile(r"[0-9a-f]{32}")
_TEMP_TOKEN = re.compile(re.escape(TEMP_PREFIX) + r"w([0-9a-f]{32})-")


# -- plain files -----------------------------------------------------------------------------------------
def _default_file_mode() -> int:
    """0o666 less the umask: what a plain ``open(path, "w")`` gives (onnxstain._onnx.io loads onnx)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _file_sha256(path: str | Path) -> str | None:
    """The file's SHA-256, or None when it is missing or unreadable."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def _remove(path: str | Path | None) -> bool:
    """Remove a file, or a writer's staging folder (:meth:`Writer.stage_folder`); True if it was there."""
    if not path:
        return False
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# -- writer tokens ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Claim:
    """A dead writer's token, claimed by holding its lock (``fd`` None: its lock file is gone or never was)."""

    token: str | None
    path: Path | None
    fd: int | None

    def folders(self) -> list[str]:
        """The folders the writer noted in its lock file (where its temp files may be)."""
        if self.fd is None:
            return []
        chunks = []
        os.lseek(self.fd, 0, os.SEEK_SET)
        while chunk := os.read(self.fd, 1 << 16):
            chunks.append(chunk)
        found = []
        for line in b"".join(chunks).decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, str):
                    found.append(value)
        return found

    def release(self) -> None:
        """Remove the lock file (only a holder of its lock ever does), then let the lock go."""
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _claim_dead(writers_dir: Path, token: str | None) -> _Claim | None:
    """Claim ``token`` if its writer is gone: its lock file is missing, or its lock can be taken at once.
    None while the writer lives (or its lock file cannot be opened: then it is left alone)."""
    if token is None or not _TOKEN.fullmatch(token):
        return _Claim(token, None, None)  # no lock file can exist: no live writer owns it
    path = writers_dir / f"{token}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return _Claim(token, None, None)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return _Claim(token, path, fd)


def _new_token(writers_dir: Path) -> tuple[str, int]:
    """A fresh writer token and the descriptor that holds its lock.

    The lock is taken after the file is created, so a recovery could take it in between, find the writer
    "dead" and remove the file; the writer then checks that the path still names the file it locked.
    """
    writers_dir.mkdir(mode=0o700, exist_ok=True)
    for _ in range(100):
        token = secrets.token_hex(16)
        path = writers_dir / f"{token}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held, named = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
                return token, fd
        except OSError:
            pass
        os.close(fd)
    raise BadInputError(f"cannot take a writer lock in {writers_dir}")


# -- what writers left -----------------------------------------------------------------------------------
def _temp_files(folders: set[str]) -> list[Path]:
    """The temp files (ours or another onnxstain run's) in the folders."""
    found = []
    for folder in sorted(folders):
        with contextlib.suppress(OSError), os.scandir(folder) as it:
            found += [Path(e.path) for e in it if e.name.startswith(TEMP_PREFIX)]
    return found


def _lock_tokens(writers_dir: Path) -> list[str]:
    """The tokens of the lock files in the writers folder (live writers' and dead ones' left by a kill)."""
    try:
        names = os.listdir(writers_dir)
    except OSError:
        return []
    return [n[:-5] for n in sorted(names) if n.endswith(".lock") and _TOKEN.fullmatch(n[:-5])]


def _remove_token_temps(token: str, folders: set[str]) -> list[str]:
    """Remove a dead writer's temp files (its pending rows are resolved: nothing references them)."""
    removed = []
    for t in _temp_files(folders):
        m = _TEMP_TOKEN.match(t.name)
        if m and m.group(1) == token and _remove(t):
            removed.append(str(t))
    return removed
