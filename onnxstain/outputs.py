"""The outputs of one run: checked before any work, written as one unit.

**Plan.** :class:`OutputPlan` lists a run's inputs (model, its external data, key, images,
preprocessing file, photos) and outputs (model, its ``.data``, key, public record, JSON, HTML, PNG,
a folder). :meth:`OutputPlan.check` refuses, before anything heavy is loaded: an output that is a
directory (or a folder output that is a file), an output whose folder is missing or not writable,
an output that is an input or another output — compared by ``(st_dev, st_ino)`` where the file
exists (symlinks, ``..`` and hard links) and by resolved path otherwise.

**Write protocol** (:class:`Artefacts`):

1. *stage*: every artefact is written to a temp file in its target folder (named
   ``.onnxstain-tmp-<pid>-…``; a model and its external data to a temp folder of that name, so
   the path-based ONNX checker sees them together), then ``fsync``-ed;
2. *commit*: an older model at the output path is removed (its replacement's key must never sit
   beside it), then the temp files are renamed into place in this order — the key, its public
   record, the model's external data, the model, then the side outputs (JSON, HTML, PNG) — and each
   target folder is ``fsync``-ed. A key without its model is harmless; a model without its key is lost
   work, so the model never lands before its key.
3. *failure*: an exception at any point removes every temp file, and during the commit also the
   files already renamed, so nothing new is left behind. A kill leaves at most a key (and record)
   without a model, plus temp files named as above, which the next run writing to the folder
   removes (their process is gone).

``ONNXSTAIN_TEST_KILL_AFTER_STEP=k`` (tests only) kills the process with SIGKILL right after the
k-th step (1-based) of the protocol: each temp write, each fsync, each rename, each folder sync.
``ONNXSTAIN_TEST_PAUSE_EACH_STEP=DIR`` stops it after every step until the test has inspected the
files — the state a kill at that step leaves (see :func:`_pause`) — so one run covers every step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ._fs import sync_folder
from ._onnx.io import default_file_mode
from .errors import BadInputError

if TYPE_CHECKING:
    import onnx

    from ._onnx.io import LoadedModel
    from .keys import Key

TEMP_PREFIX = ".onnxstain-tmp-"
KILL_ENV = "ONNXSTAIN_TEST_KILL_AFTER_STEP"
PAUSE_ENV = "ONNXSTAIN_TEST_PAUSE_EACH_STEP"

# commit order
KEY, RECORD, MODEL, SIDE = 0, 1, 2, 3

_steps = 0


def _step() -> None:
    """Count one step of the write protocol; the test hooks kill the process, or pause it, after it."""
    global _steps
    _steps += 1
    target = os.environ.get(KILL_ENV)
    if target and int(target) == _steps:
        os.kill(os.getpid(), signal.SIGKILL)
    handshake = os.environ.get(PAUSE_ENV)
    if handshake:
        _pause(Path(handshake), _steps)


def _pause(handshake: Path, step: int) -> None:
    """Test hook: stop after ``step`` (``step-<k>`` written) until the test has looked at the files
    (``go-<k>`` awaited). What it sees is exactly what a kill -9 after that step leaves: no code of
    this process runs in between, so no clean-up either."""
    (handshake / f"step-{step}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 300
    while not (handshake / f"go-{step}").exists():
        if time.monotonic() > deadline:
            os._exit(124)
        time.sleep(0.01)


# -- the plan ------------------------------------------------------------------------------------------
@dataclass
class _Item:
    label: str
    path: Path
    folder: bool = False  # an output folder (created if missing), or an input folder
    in_planned_folder: bool = False  # a file in an output folder of the plan (checked there)


@dataclass
class OutputPlan:
    """A run's inputs and outputs, as the command's arguments name them."""

    inputs: list[_Item] = field(default_factory=list)
    outputs: list[_Item] = field(default_factory=list)

    def input(self, label: str, path: str | Path | None, folder: bool = False) -> OutputPlan:
        if path is not None:
            self.inputs.append(_Item(label, Path(path), folder))
        return self

    def model_input(self, label: str, path: str | Path) -> OutputPlan:
        """A model and the files beside it that it may read (its ``.data``, its preprocessing sidecar)."""
        from ._onnx.inputs import sidecar_path

        p = Path(path)
        self.input(label, p)
        self.input(f"{label}'s external data", p.with_name(p.name + ".data"))
        return self.input(f"{label}'s preprocessing file", sidecar_path(p))

    def output(self, label: str, path: str | Path | None, folder: bool = False,
               in_planned_folder: bool = False) -> OutputPlan:
        if path is not None:
            self.outputs.append(_Item(label, Path(path), folder, in_planned_folder))
        return self

    def model_output(self, label: str, path: str | Path) -> OutputPlan:
        p = Path(path)
        self.output(label, p)
        return self.output(f"{label}'s external data", p.with_name(p.name + ".data"))

    def key_output(self, label: str, key: str | Path, record: str | Path | None = None) -> OutputPlan:
        from .keys import public_record_path

        self.output(label, key)
        return self.output("the key's public record", record if record is not None else public_record_path(key))

    def check(self) -> None:
        """Refuse, in one line, any output that cannot be written or that would replace an input."""
        seen: list[tuple[_Item, tuple[int, int] | None, str, str]] = []
        for it in self.inputs:
            seen.append((it, _identity(it.path), _resolved(it.path), "input"))
        folders: set[Path] = set()
        for it in self.outputs:
            _check_writable(it)
            ident, res = _identity(it.path), _resolved(it.path)
            for other, o_ident, o_res, what in seen:
                if (ident is not None and ident == o_ident) or res == o_res:
                    if what == "input":
                        raise BadInputError(f"{it.label} {it.path} is the same file as {other.label} {other.path}: "
                                            "onnxstain never modifies its input")
                    raise BadInputError(f"{it.label} {it.path} and {other.label} {other.path} are the same file")
            seen.append((it, ident, res, "output"))
            if not it.in_planned_folder:
                folders.add(it.path if it.folder else it.path.parent)
        for f in folders:
            clean_stale(f)


def _identity(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _resolved(p: Path) -> str:
    try:
        return os.path.realpath(p)
    except (OSError, ValueError):
        return os.path.abspath(p)


def _check_writable(it: _Item) -> None:
    p = it.path
    if it.folder:
        if p.exists() and not p.is_dir():
            raise BadInputError(f"{it.label} {p} is a file, not a folder")
        probe = p
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise BadInputError(f"{it.label} {p}: {probe} is a file, not a folder")
    else:
        if p.is_dir():
            raise BadInputError(f"{it.label} {p} is a directory, not a file")
        if p.name in ("", ".", ".."):
            raise BadInputError(f"{it.label} {p} is not a file name")
        if it.in_planned_folder:
            return
        probe = p.parent
        if not probe.exists():
            raise BadInputError(f"{it.label} {p}: its folder {probe} does not exist")
        if not probe.is_dir():
            raise BadInputError(f"{it.label} {p}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInputError(f"{it.label} {p}: cannot write to the folder {probe}")


def clean_stale(folder: Path) -> None:
    """Remove temp files that a killed onnxstain run left in ``folder`` (their process is gone)."""
    try:
        entries = list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        pid = entry.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# -- the writer ----------------------------------------------------------------------------------------
@dataclass
class _Staged:
    role: int
    order: int
    tmp: Path
    final: Path


class Artefacts:
    """A run's artefacts, staged as synced temp files and renamed together by :meth:`commit`."""

    def __init__(self) -> None:
        self._staged: list[_Staged] = []
        self._tmpdirs: list[Path] = []
        self._created_dirs: list[Path] = []
        self.key: Key | None = None
        self.committed = False

    def __enter__(self) -> Artefacts:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def _prefix(self) -> str:
        return f"{TEMP_PREFIX}{os.getpid()}-"

    def make_folder(self, folder: str | Path) -> Path:
        """Create an output folder (and missing parents) that an abort removes again."""
        f = Path(folder)
        missing = []
        probe = f
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for d in reversed(missing):
            d.mkdir()
            self._created_dirs.append(d)
        return f

    def stage_bytes(self, path: str | Path, data: bytes, role: int = SIDE, mode: int | None = None) -> None:
        final = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=self._prefix(), suffix=f"-{final.name}"[:64], dir=final.parent)
        self._staged.append(_Staged(role, len(self._staged), Path(tmp), final))
        os.fchmod(fd, default_file_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            _step()
            os.fsync(fh.fileno())
            _step()

    def stage_model(self, model: onnx.ModelProto, path: str | Path, source: LoadedModel | None = None,
                    external_data: bool | None = None) -> str:
        """Write the model (and its external data), checked and synced; return its SHA-256."""
        from ._onnx.io import write_model_files

        final = Path(path)
        tmpdir = Path(tempfile.mkdtemp(prefix=self._prefix(), dir=final.parent))
        self._tmpdirs.append(tmpdir)
        digest, files = write_model_files(model, tmpdir, final.name, source, external_data)
        _step()
        for f in files:
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            _step()
            self._staged.append(_Staged(MODEL, len(self._staged), f, final.parent / f.name))
        return digest

    def stage_key(self, key: Key, path: str | Path, record: str | Path) -> None:
        """The key (owner-only) and its public record."""
        import json

        key.checked()  # a key the loader would refuse is never written
        self.key = key
        self.stage_bytes(path, json.dumps(key.to_dict(), indent=1, sort_keys=True).encode() + b"\n", KEY, 0o600)
        self.stage_bytes(record, json.dumps(key.public_record(), indent=2, sort_keys=True).encode() + b"\n",
                         RECORD, 0o644)

    def commit(self) -> None:
        """Rename every staged file into place (key, record, model data, model, side outputs)."""
        done: list[Path] = []
        try:
            # An older model at the output path goes first: its replacement's key lands before the new
            # model, and must never sit beside the old model it does not match.
            for s in self._staged:
                if s.role == MODEL and s.final.exists():
                    s.final.unlink()
                    _step()
            for s in sorted(self._staged, key=lambda s: (s.role, s.order)):
                os.replace(s.tmp, s.final)
                done.append(s.final)
                _step()
            for folder in dict.fromkeys(s.final.parent for s in self._staged):
                sync_folder(folder)
                _step()
        except BaseException:
            for f in done:
                with contextlib.suppress(OSError):
                    f.unlink()
            self.abort()
            raise
        self.committed = True
        self._staged.clear()
        self._remove_tmpdirs()

    def abort(self) -> None:
        """Remove every temp file (and the folders this run created)."""
        for s in self._staged:
            with contextlib.suppress(OSError):
                s.tmp.unlink()
        self._staged.clear()
        self._remove_tmpdirs()
        for d in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()
        self._created_dirs.clear()

    def _remove_tmpdirs(self) -> None:
        for d in self._tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
        self._tmpdirs.clear()


@contextlib.contextmanager
def write_unit(artefacts: Artefacts | None) -> Iterator[Artefacts]:
    """The writer of a job's save stage: the caller's (staged only; the caller commits), or its own
    (committed when the block ends without error). Aborted on any error either way."""
    writer = artefacts if artefacts is not None else Artefacts()
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
    if artefacts is None:
        writer.commit()


def job_plan(model: str | Path, output: str | Path, key: str | Path, record: str | Path) -> OutputPlan:
    """The plan of a stain or lock job's own outputs (the CLI adds its side outputs)."""
    return (OutputPlan().model_input("the input model", model).model_output("the output model", output)
            .key_output("the key", key, record))


def checked_job_outputs(model: str | Path, output: str | Path, key_path: str | Path,
                        record_path: str | Path | None = None) -> tuple[Path, Path, Path]:
    """A stain or lock job's output model, key and public record (by default beside the key: ``<key>.public.json``),
    checked as one plan before any work."""
    from .keys import public_record_path

    out, key = Path(output), Path(key_path)
    record = Path(record_path) if record_path else public_record_path(key)
    job_plan(model, out, key, record).check()
    return out, key, record
