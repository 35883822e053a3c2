"""Adding copies to a registry: the :class:`Writer`, which runs the write protocol of :mod:`.registry`.

A writer holds a token (and its lock, :mod:`._files`) for its whole life; the rows it adds are ``pending``
and owned by that token until committed. It reaches its registry only through :class:`_Store`, the few
private members of :class:`~onnxstain.fleet.registry.Registry` it uses (so this module does not import
:mod:`.registry`, which imports it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from .._fs import sync_folder
from .._version import __version__
from ..errors import BadInputError, OnnxStainError
from ._checks import AlreadyIssuedError, _check_customer, _check_kind, _check_sha
from ._files import TEMP_PREFIX, _default_file_mode, _new_token, _remove, _remove_token_temps
from ._schema import _utc_now


class _Store(Protocol):
    """What a :class:`Writer` uses of its registry (:class:`~onnxstain.fleet.registry.Registry` has it all)."""

    _writers: list[Writer]  # the registry's open writers: a closing writer takes itself out

    @property
    def _writers_dir(self) -> Path:
        """The folder of the writers' lock files."""
        ...

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction."""
        ...

    def _seal(self, data: bytes, what: str, key_commitment: str) -> bytes:
        """``data`` as stored (encrypted when the registry is)."""
        ...

    def _resolve_pending(self, owner: str | None) -> tuple[list[int], list[int]]:
        """Finish or roll back the owner's pending rows."""
        ...


class Writer:
    """Adds copies to a registry (:meth:`Registry.writer`). Rows it adds are ``pending`` and owned by its
    token until committed; while it lives, no recovery touches them. Closing it resolves any it left pending
    (issued if the final file is in place, else rolled back) and gives up its lock."""

    def __init__(self, registry: _Store) -> None:
        self._reg = registry
        self._dir = registry._writers_dir
        self.token, self._fd = _new_token(self._dir)
        self._folders: set[str] = set()
        self.closed = False

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with contextlib.suppress(OnnxStainError, OSError):  # left for the next recovery otherwise
                self._reg._resolve_pending(self.token)
                _remove_token_temps(self.token, self._folders)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self._dir / f"{self.token}.lock")
            os.close(self._fd)
            with contextlib.suppress(ValueError):
                self._reg._writers.remove(self)

    def _live(self) -> None:
        if self.closed:
            raise BadInputError("this registry writer is closed")

    def _note_folder(self, folder: Path) -> None:
        """Record the folder in the lock file before the first temp file goes there: a recovery after a kill
        finds the writer's temp files even in a folder that no row names yet."""
        if str(folder) not in self._folders:
            os.write(self._fd, json.dumps(str(folder)).encode() + b"\n")
            os.fsync(self._fd)
            self._folders.add(str(folder))

    def stage_folder(self, near: str | Path) -> Path:
        """A private folder (0700) in ``near`` for files that must not outlive this writer (``issue`` stages each
        copy's secret key there before the registry holds it): named after the writer, it goes when the writer
        closes, or with the writer's temp files when a recovery finds the writer dead."""
        self._live()
        f = Path(os.path.abspath(near))
        self._note_folder(f)
        folder = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}w{self.token}-stage-", dir=f))
        os.chmod(folder, 0o700)
        return folder

    def write_temp(self, folder: str | Path, data: bytes, mode: int | None = None) -> Path:
        """Step 1: ``data`` in a new temp file in ``folder`` (named after this writer, ``fsync``-ed), with the
        given permission bits (default: 0o666 less the umask)."""
        self._live()
        f = Path(os.path.abspath(folder))
        if not f.is_dir():
            raise BadInputError(f"output folder {f} does not exist")
        self._note_folder(f)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}w{self.token}-", dir=f)
        try:
            os.fchmod(fd, _default_file_mode() if mode is None else mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            _remove(tmp)
            raise
        return Path(tmp)

    def add_pending(self, *, customer: str, kind: str, source_sha256: str, model_sha256: str,
                    model_path: str | Path, temp_path: str | Path, key_bytes: bytes, key_commitment: str,
                    bound_log10: float | None, index_blob: bytes | None, lock_key_bytes: bytes | None = None) -> int:
        """Step 2: record the copy as pending (its model is at ``temp_path``, bound for ``model_path`` in the same
        folder); returns its id. :class:`AlreadyIssuedError` if the customer has a live copy of this model and
        kind (also when another run added it a moment ago)."""
        self._live()
        _check_customer(customer)
        _check_kind(kind)
        _check_sha("source_sha256", source_sha256)
        _check_sha("model_sha256", model_sha256)
        final, temp = os.path.abspath(model_path), os.path.abspath(temp_path)
        if os.path.dirname(final) != os.path.dirname(temp) or final == temp:
            raise BadInputError(f"temp file {temp} must be another file in the folder of {final}")
        if not os.path.isfile(temp):
            raise BadInputError(f"temp file {temp} does not exist: write the model first")
        if not key_commitment:
            raise BadInputError("a copy needs its key commitment")
        blob = self._reg._seal(key_bytes, "key", key_commitment)
        index = None if index_blob is None else self._reg._seal(index_blob, "index", key_commitment)
        lock_blob = None if lock_key_bytes is None else self._reg._seal(lock_key_bytes, "lock key", key_commitment)
        with self._reg._write() as conn:
            live = conn.execute("SELECT id, state FROM copies WHERE customer = ? AND source_sha256 = ? AND kind = ? "
                                "AND state != 'revoked'", (customer, source_sha256, kind)).fetchone()
            if live is not None:
                raise AlreadyIssuedError(f"customer {customer!r} already has a {kind} copy of model "
                                         f"{source_sha256[:12]} (copy {live[0]}, {live[1]}): revoke it first")
            taken = conn.execute("SELECT id FROM copies WHERE model_path = ? AND state != 'revoked'",
                                 (final,)).fetchone()
            if taken is not None:
                raise BadInputError(f"{final} is already the file of copy {taken[0]}")
            cur = conn.execute(
                "INSERT INTO copies (customer, kind, source_sha256, model_sha256, model_path, temp_path, "
                "key_commitment, key_blob, index_blob, lock_key_blob, bound_log10, created, tool_version, state, "
                "owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                (customer, kind, source_sha256, model_sha256, final, temp, key_commitment, blob, index, lock_blob,
                 None if bound_log10 is None else float(bound_log10), _utc_now(), __version__, self.token))
            copy_id = cur.lastrowid
        assert copy_id is not None
        return copy_id

    def _own_pending(self, conn: sqlite3.Connection, copy_id: int) -> tuple[str, str | None]:
        """``(model_path, temp_path)`` of this writer's pending copy ``copy_id``, else a one-line refusal."""
        row = conn.execute("SELECT model_path, temp_path FROM copies WHERE id = ? AND state = 'pending' AND "
                           "owner = ?", (copy_id, self.token)).fetchone()
        if row is None:
            raise BadInputError(f"copy {copy_id} is not a pending copy of this writer")
        return row[0], row[1]

    def commit(self, copy_id: int) -> None:
        """Step 4: pending → issued (after the rename; refused if the final file is not there)."""
        self._live()
        with self._reg._write() as conn:
            model_path, _ = self._own_pending(conn, copy_id)
            if not os.path.isfile(model_path):
                raise BadInputError(f"copy {copy_id}: its model file {model_path} is not in place: not issued")
            conn.execute("UPDATE copies SET state = 'issued', temp_path = NULL, owner = NULL WHERE id = ?",
                         (copy_id,))

    def abandon(self, copy_id: int) -> None:
        """Delete a pending row of this writer and its temp file (the caller failed before the rename)."""
        self._live()
        with self._reg._write() as conn:
            _, temp_path = self._own_pending(conn, copy_id)
            _remove(temp_path)
            conn.execute("DELETE FROM copies WHERE id = ?", (copy_id,))

    def place(self, *, customer: str, kind: str, source_sha256: str, model_path: str | Path, data: bytes,
              key_bytes: bytes, key_commitment: str, bound_log10: float | None = None,
              index_blob: bytes | None = None, mode: int | None = None,
              before_rename: Callable[[], None] | None = None, lock_key_bytes: bytes | None = None) -> int:
        """Issue one copy: the whole protocol (temp file, pending row, rename, commit). Returns its id.

        Any failure before the rename removes the temp file and the row; a failure after it (the commit)
        removes the placed file and the row, so an exception always means "not issued". A kill at any point
        is resolved by the next :meth:`Registry.recover`. ``before_rename`` runs once the row is this writer's
        (no other run can issue the customer now) and before the copy lands: files that must accompany the
        copy (its signatures) are written there, never over another run's.
        """
        self._live()
        final = Path(os.path.abspath(model_path))
        temp = self.write_temp(final.parent, data, mode)
        try:
            copy_id = self.add_pending(customer=customer, kind=kind, source_sha256=source_sha256,
                                       model_sha256=hashlib.sha256(data).hexdigest(), model_path=final,
                                       temp_path=temp, key_bytes=key_bytes, key_commitment=key_commitment,
                                       bound_log10=bound_log10, index_blob=index_blob,
                                       lock_key_bytes=lock_key_bytes)
        except BaseException:
            _remove(temp)
            raise
        try:
            if before_rename is not None:
                before_rename()
            os.replace(temp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                self.abandon(copy_id)
            _remove(temp)
            raise
        try:
            sync_folder(final.parent)
            self.commit(copy_id)
        except BaseException:
            self._undo_placed(copy_id, final)
            raise
        return copy_id

    def _undo_placed(self, copy_id: int, final: Path) -> None:
        """Remove a renamed-but-uncommitted copy: file first, row in the same transaction (a kill in between
        leaves a pending row without its file, which recovery rolls back)."""
        with contextlib.suppress(Exception), self._reg._write() as conn:
            row = conn.execute("SELECT 1 FROM copies WHERE id = ? AND state = 'pending' AND owner = ?",
                               (copy_id, self.token)).fetchone()
            if row is not None:
                _remove(final)
                conn.execute("DELETE FROM copies WHERE id = ?", (copy_id,))
