"""The registry of issued model copies: one SQLite file that records every customer's copy and holds its key.

A vendor issues one stained (or locked) copy of a model per customer. The registry is what later says whose
copy a leaked model is, so it must never disagree with the files on disk. The rule it keeps: **no issued row
whose model file is missing, and no model file at a final path without a row**, even when a run is killed or
two runs issue at once.

**Write protocol** (:meth:`Writer.place` does it all; a caller may do the steps itself):

1. write the model bytes to a temp file in the dist folder (:meth:`Writer.write_temp`: named
   ``.onnxstain-tmp-w<token>-…`` after the writer's token, ``fsync``-ed);
2. :meth:`Writer.add_pending`: the row, ``pending``, owned by the writer's token (one ``BEGIN IMMEDIATE``
   transaction, so two runs cannot both add a live copy for the same customer, model and kind);
3. ``os.replace`` the temp file onto the final path, then ``fsync`` the folder;
4. :meth:`Writer.commit`: ``pending`` → ``issued``.

**Writers.** A :class:`Writer` holds an ``flock`` on ``<db>.writers/<token>.lock`` for its whole life (the
lock file also lists the folders it writes temp files to). The kernel drops the lock when the process dies,
however it dies, so "is the owner of this pending row alive?" is a non-blocking ``flock`` away.

**Recovery** (:meth:`Registry.recover`; :meth:`Registry.open` runs it unless read-only): for every writer
token that is dead (its lock can be taken, or its lock file is gone), each pending row is resolved: its final
file exists with the recorded hash (killed between the rename and the commit) → ``issued``; otherwise the row is
deleted and its temp file removed. The dead writer's other temp files (killed before step 2) are removed and
its lock file last. Live writers' rows and temp files are not touched. Temp files of no writer (another
tool's, or named by a caller that did not use :meth:`Writer.write_temp`) are reported, never deleted, and so
are issued rows whose file is missing or (``check_files=True``) altered.

Keys may be encrypted at rest (AES-256-GCM, the key derived with scrypt from a passphrase; needs the
``cryptography`` package: ``pip install 'onnxstain[fleet]'``). Listing, showing and exporting need no
passphrase: only key bytes are encrypted.

This module is the registry itself: opening a file, the queries, revocation and recovery (:class:`Registry`),
and the records it returns. The parts it builds on, one job each: :mod:`._schema` (the SQLite file, schema and
migrations), :mod:`._sealing` (passphrase encryption), :mod:`._files` (temp files, writer tokens and lock
files), :mod:`._checks` (the values a copy may take) and :mod:`.writer` (:class:`Writer`, the write protocol).
Their public names are importable from here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import BadInputError
from ._checks import KINDS, STATES, AlreadyIssuedError, _check_kind, _check_state
from ._files import (
    _TEMP_TOKEN,
    TEMP_PREFIX,
    _claim_dead,
    _file_sha256,
    _lock_tokens,
    _remove,
    _remove_token_temps,
    _temp_files,
)
from ._schema import (
    FORMAT,
    MIGRATIONS,
    SCHEMA_VERSION,
    _db_errors,
    _owner_only,
    _prepare_file,
    _settle_schema,
    _text,
    _utc_now,
)
from ._sealing import PASSPHRASE_HINT, SCRYPT_N, SCRYPT_P, SCRYPT_R, _aad, _crypto, _Sealer, _sealing_meta, _unlock
from .writer import Writer

__all__ = [
    "BUSY_TIMEOUT_S",
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "FORMAT",
    "KINDS",
    "MIGRATIONS",
    "PASSPHRASE_HINT",
    "SCHEMA_VERSION",
    "SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "STATES",
    "TEMP_PREFIX",
    "AlreadyIssuedError",
    "CopyRecord",
    "RecoveryReport",
    "Registry",
    "Writer",
]

EXPORT_FORMAT = "onnxstain-registry-export"
EXPORT_VERSION = 1
BUSY_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class CopyRecord:
    """One issued copy as the registry records it; no secrets (neither the key nor the index blob)."""

    id: int
    customer: str
    kind: str
    source_sha256: str
    model_sha256: str
    model_path: str
    key_commitment: str
    bound_log10: float | None
    created: str
    tool_version: str | None
    state: str
    revoked: str | None
    revoke_reason: str | None


_RECORD_COLUMNS = ", ".join(f.name for f in dataclasses.fields(CopyRecord))


@dataclasses.dataclass
class RecoveryReport:
    """What :meth:`Registry.recover` did and found.

    ``finished``/``rolled_back``: ids of dead writers' pending rows now issued / deleted. ``missing``/``altered``:
    ids of issued rows whose model file is gone / differs from its hash (reported only). ``stray_temp``: temp
    files no writer owns (reported only). ``removed_temp``: temp files of dead writers that were removed.
    """

    finished: list[int] = dataclasses.field(default_factory=list)
    rolled_back: list[int] = dataclasses.field(default_factory=list)
    missing: list[int] = dataclasses.field(default_factory=list)
    altered: list[int] = dataclasses.field(default_factory=list)
    stray_temp: list[str] = dataclasses.field(default_factory=list)
    removed_temp: list[str] = dataclasses.field(default_factory=list)

    @property
    def consistent(self) -> bool:
        """Every issued row's model file is in place (and, if hashes were checked, unchanged)."""
        return not (self.missing or self.altered)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- the registry ----------------------------------------------------------------------------------------
class Registry:
    """An open registry file. Use :meth:`open`; a context manager that closes it."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, readonly: bool, encrypted: bool,
                 sealer: _Sealer | None) -> None:
        self._conn = conn
        self.path = path
        self.readonly = readonly
        self.encrypted = encrypted
        self._sealer = sealer
        self._writers: list[Writer] = []
        self.recovery: RecoveryReport | None = None  # what the recovery at open did (None: read-only)

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, create: bool = False, passphrase: str | None = None,
             readonly: bool = False, check_files: bool = False) -> Registry:
        """Open (or with ``create`` make) a registry.

        Unless ``readonly``, runs :meth:`recover` first (its report: :attr:`recovery`), so that a killed run's
        leftovers are resolved before anything new is written; ``check_files`` makes it compare hashes too.
        ``readonly`` opens for listing only: no recovery, and :meth:`writer`, :meth:`revoke` and
        :meth:`recover` refuse. ``passphrase``: needed to read or add keys of an encrypted registry (with
        ``create``, a new registry is encrypted with it); a wrong one is refused here.
        """
        p = Path(os.path.abspath(path))
        if passphrase is not None and not passphrase:
            raise BadInputError("the registry passphrase is empty")
        if passphrase is not None:
            _crypto()  # before anything is created: a missing package is one line, not an empty file
        created_file = _prepare_file(p, create)
        try:
            conn = sqlite3.connect(p.as_uri() + "?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S,
                                   isolation_level=None)
        except sqlite3.Error as exc:
            raise BadInputError(f"cannot open registry {p}: {exc}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            _settle_schema(conn, p, create, lambda: _sealing_meta(passphrase))
            with _db_errors(p):
                if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                    raise BadInputError(f"registry {p}: its file system does not allow SQLite's WAL journal")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
            _owner_only(p)
            encrypted, sealer = _unlock(conn, p, passphrase)
        except BaseException:
            conn.close()
            if created_file:  # not left half made: the next create starts afresh
                for suffix in ("", "-wal", "-shm", "-journal"):
                    _remove(p.with_name(p.name + suffix))
            raise
        reg = cls(conn, p, readonly=readonly, encrypted=encrypted, sealer=sealer)
        if not readonly:
            try:
                reg.recovery = reg.recover(check_files=check_files)
            except BaseException:
                reg.close()
                raise
        return reg

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the writers (their unfinished rows resolved) and the database."""
        for w in list(self._writers):
            w.close()
        self._conn.close()

    def __repr__(self) -> str:
        return f"Registry({str(self.path)!r})"

    @property
    def _writers_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".writers")

    # -- transactions --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: the write lock is taken up front, so the reads inside it
        see what no other writer can change before the commit."""
        if self.readonly:
            raise BadInputError(f"registry {self.path} is open read-only")
        conn = self._conn
        with _db_errors(self.path):
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with _db_errors(self.path):
            return self._conn.execute(sql, args).fetchall()

    def _meta(self, key: str) -> Any:
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    # -- writing -------------------------------------------------------------------------------------
    def writer(self) -> Writer:
        """A writer (a context manager): a lock-held token that owns the rows it adds while they are pending."""
        if self.readonly:
            raise BadInputError(f"registry {self.path} is open read-only")
        self._need_keys()
        w = Writer(self)
        self._writers.append(w)
        return w

    def _need_keys(self) -> None:
        if self.encrypted and self._sealer is None:
            raise BadInputError(f"registry {self.path} is encrypted: its keys (and identification indexes) are "
                                "read and added only with its passphrase")

    def _seal(self, data: bytes, what: str, key_commitment: str) -> bytes:
        """``data`` as stored: encrypted when the registry is (a key, or an index that holds key material)."""
        self._need_keys()
        if self._sealer is None:
            return bytes(data)
        return self._sealer.seal(bytes(data), _aad(what, key_commitment))

    def _unseal(self, blob: bytes, what: str, key_commitment: str, copy_id: int) -> bytes:
        if not self.encrypted:
            return blob
        self._need_keys()
        assert self._sealer is not None
        plain = self._sealer.open(blob, _aad(what, key_commitment))
        if plain is None:
            raise BadInputError(f"registry {self.path}: the {what} of copy {copy_id} fails its integrity check "
                                "(altered or corrupt)")
        return plain

    def revoke(self, ref: str, reason: str) -> CopyRecord:
        """Mark an issued copy revoked (the customer may then be issued a new one). Its file and key stay: a
        revoked customer's leaked copy must still be identified."""
        reason = (reason or "").strip()
        if not reason:
            raise BadInputError("a revocation needs a reason")
        rec = self.get(ref)
        with self._write() as conn:
            state, revoked = conn.execute("SELECT state, revoked FROM copies WHERE id = ?", (rec.id,)).fetchone()
            if state == "revoked":
                raise BadInputError(f"copy {rec.id} ({rec.customer}) is already revoked (since {revoked})")
            if state == "pending":
                raise BadInputError(f"copy {rec.id} ({rec.customer}) is still being issued: revoke it once issued")
            conn.execute("UPDATE copies SET state = 'revoked', revoked = ?, revoke_reason = ? WHERE id = ?",
                         (_utc_now(), reason, rec.id))
        return self.get(str(rec.id))

    # -- recovery ------------------------------------------------------------------------------------
    def recover(self, check_files: bool = False) -> RecoveryReport:
        """Resolve dead writers' pending rows and temp files; report issued rows whose file is missing (or,
        with ``check_files``, altered) and temp files no writer owns. Safe while other writers run."""
        if self.readonly:
            raise BadInputError(f"registry {self.path} is open read-only")
        report = RecoveryReport()
        folders = {os.path.dirname(p) for (p,) in self._rows("SELECT DISTINCT model_path FROM copies")}
        owners = [o for (o,) in self._rows("SELECT DISTINCT owner FROM copies WHERE state = 'pending'")]
        temps = _temp_files(folders)
        tokens = dict.fromkeys([*owners, *_lock_tokens(self._writers_dir),
                                *(m.group(1) for t in temps if (m := _TEMP_TOKEN.match(t.name)))])
        live: set[str] = set()
        for token in tokens:
            claim = _claim_dead(self._writers_dir, token)
            if claim is None:
                live.add(str(token))
                continue
            try:
                finished, rolled_back = self._resolve_pending(token)
                report.finished += finished
                report.rolled_back += rolled_back
                if token is not None:
                    report.removed_temp += _remove_token_temps(token, folders | set(claim.folders()))
            finally:
                claim.release()
        referenced = {t for (t,) in self._rows("SELECT temp_path FROM copies WHERE state = 'pending'")}
        for t in temps:
            m = _TEMP_TOKEN.match(t.name)
            if str(t) in referenced or (m and m.group(1) in live) or str(t) in report.removed_temp or not t.exists():
                continue
            report.stray_temp.append(str(t))
        for copy_id, path, sha in self._rows("SELECT id, model_path, model_sha256 FROM copies "
                                             "WHERE state = 'issued' ORDER BY id"):
            if not os.path.isfile(path):
                report.missing.append(copy_id)
            elif check_files and _file_sha256(path) != sha:
                report.altered.append(copy_id)
        return report

    def _resolve_pending(self, owner: str | None) -> tuple[list[int], list[int]]:
        """Finish or roll back the pending rows of a writer that is gone (or is closing): issued when the
        final file is in place with its hash, else deleted with its temp file. Returns (finished, rolled back).
        The files are touched inside the transaction: a kill there leaves a pending row that the next recovery
        resolves the same way."""
        finished, rolled_back = [], []
        with self._write() as conn:
            rows = conn.execute("SELECT id, model_path, temp_path, model_sha256 FROM copies "
                                "WHERE state = 'pending' AND owner IS ?", (owner,)).fetchall()
            for copy_id, path, temp, sha in rows:
                if temp != path:
                    _remove(temp)
                if _file_sha256(path) == sha:
                    conn.execute("UPDATE copies SET state = 'issued', temp_path = NULL, owner = NULL WHERE id = ?",
                                 (copy_id,))
                    finished.append(copy_id)
                else:
                    conn.execute("DELETE FROM copies WHERE id = ?", (copy_id,))
                    rolled_back.append(copy_id)
        return finished, rolled_back

    # -- reading -------------------------------------------------------------------------------------
    def issued_customers(self, source_sha256: str, kind: str) -> set[str]:
        """The customers with a live (pending or issued) copy of this model and kind."""
        _check_kind(kind)
        rows = self._rows("SELECT customer FROM copies WHERE source_sha256 = ? AND kind = ? AND state != 'revoked'",
                          (source_sha256, kind))
        return {c for (c,) in rows}

    def copies(self, *, source_sha256: str | None = None, state: str | None = None) -> list[CopyRecord]:
        """Every copy, oldest first; optionally of one source model and/or in one state."""
        _check_state(state)
        rows = self._rows(f"SELECT {_RECORD_COLUMNS} FROM copies WHERE (? IS NULL OR source_sha256 = ?) "
                          "AND (? IS NULL OR state = ?) ORDER BY id", (source_sha256, source_sha256, state, state))
        return [CopyRecord(*r) for r in rows]

    def get(self, ref: str) -> CopyRecord:
        """A copy by id (``"17"``) or by customer: the customer's only copy, or only live copy; several →
        an error naming their ids."""
        ref = str(ref).strip()
        if ref.isdigit():
            rows = self._rows(f"SELECT {_RECORD_COLUMNS} FROM copies WHERE id = ?", (int(ref),))
            if not rows:
                raise BadInputError(f"registry {self.path} has no copy {ref}")
            return CopyRecord(*rows[0])
        recs = [CopyRecord(*r) for r in
                self._rows(f"SELECT {_RECORD_COLUMNS} FROM copies WHERE customer = ? ORDER BY id", (ref,))]
        if not recs:
            raise BadInputError(f"registry {self.path} has no copy for customer {ref!r}")
        live = [r for r in recs if r.state != "revoked"]
        if len(recs) == 1 or len(live) == 1:
            return recs[0] if len(recs) == 1 else live[0]
        listed = ", ".join(f"{r.id} ({r.kind} of {r.source_sha256[:12]}, {r.state})" for r in recs)
        raise BadInputError(f"customer {ref!r} has {len(recs)} copies: name one by its id: {listed}")

    def key_bytes(self, copy_id: int) -> bytes:
        """The copy's key file bytes (decrypted)."""
        rows = self._rows("SELECT key_blob, key_commitment FROM copies WHERE id = ?", (int(copy_id),))
        if not rows:
            raise BadInputError(f"registry {self.path} has no copy {copy_id}")
        return self._unseal(bytes(rows[0][0]), "key", rows[0][1], int(copy_id))

    def lock_key_bytes(self, copy_id: int) -> bytes | None:
        """A stained and locked copy's lock key file bytes (decrypted); None for a copy of another kind."""
        rows = self._rows("SELECT lock_key_blob, key_commitment FROM copies WHERE id = ?", (int(copy_id),))
        if not rows:
            raise BadInputError(f"registry {self.path} has no copy {copy_id}")
        blob = rows[0][0]
        return None if blob is None else self._unseal(bytes(blob), "lock key", rows[0][1], int(copy_id))

    def index_rows(self, source_sha256: str | None = None) -> list[tuple[int, str, bytes | None]]:
        """(id, customer, index blob) of every issued and revoked copy (a revoked customer's leaked copy must
        still be identified), oldest first; optionally of one source model. The index blobs of an encrypted
        registry are encrypted like its keys (they hold key material): reading them needs the passphrase."""
        self._need_keys()
        rows = self._rows("SELECT id, customer, index_blob, key_commitment FROM copies "
                          "WHERE state IN ('issued', 'revoked') AND (? IS NULL OR source_sha256 = ?) ORDER BY id",
                          (source_sha256, source_sha256))
        return [(i, c, None if b is None else self._unseal(bytes(b), "index", k, i)) for i, c, b, k in rows]

    def export(self) -> dict[str, Any]:
        """The public record: every copy's fields, no key bytes and no index blobs."""
        return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "tool_version": __version__,
                "exported": _utc_now(), "registry_created": _text(self._meta("created")),
                "copies": [dataclasses.asdict(r) for r in self.copies()]}
