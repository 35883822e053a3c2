"""The registry's SQLite file as storage: made owner-only, its schema and migrations, its format marker.

:func:`_settle_schema` makes a new registry (schema, format marker, creation time, plus whatever facts the
caller adds, such as the encryption salt), checks that an existing file is a registry this code reads, and
migrates an older one. Also here: how the registry stores times and text, and SQLite's errors as one line.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import BadInputError

FORMAT = "onnxstain-registry"


def _schema_v1(conn: sqlite3.Connection) -> None:
    """Version 1: the copies and the registry's own facts (creation time, format, encryption salt)."""
    for statement in (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB)",
        """CREATE TABLE copies (
            id INTEGER PRIMARY KEY,
            customer TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('stain', 'lock', 'both')),
            source_sha256 TEXT NOT NULL,
            model_sha256 TEXT NOT NULL,
            model_path TEXT NOT NULL,
            temp_path TEXT,
            key_commitment TEXT NOT NULL,
            key_blob BLOB NOT NULL,
            index_blob BLOB,
            bound_log10 REAL,
            created TEXT,
            tool_version TEXT,
            state TEXT NOT NULL CHECK (state IN ('pending', 'issued', 'revoked')),
            owner TEXT,
            revoked TEXT,
            revoke_reason TEXT
        )""",
        # one live copy per customer, model and kind, whatever runs at once
        "CREATE UNIQUE INDEX copies_live ON copies (customer, source_sha256, kind) WHERE state != 'revoked'",
        # two live copies never share a file (the second rename would destroy the first copy)
        "CREATE UNIQUE INDEX copies_live_path ON copies (model_path) WHERE state != 'revoked'",
        "CREATE INDEX copies_source ON copies (source_sha256, state)",
        "CREATE INDEX copies_pending ON copies (owner) WHERE state = 'pending'",
    ):
        conn.execute(statement)


def _schema_v2(conn: sqlite3.Connection) -> None:
    """Version 2: a copy both stained and locked (kind ``both``) keeps its lock key beside its stain key."""
    conn.execute("ALTER TABLE copies ADD COLUMN lock_key_blob BLOB")


# MIGRATIONS[i] takes a registry from schema version i to i + 1 (inside the caller's transaction).
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_schema_v1, _schema_v2)
SCHEMA_VERSION = len(MIGRATIONS)


# -- stored values and errors ----------------------------------------------------------------------------
def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


@contextlib.contextmanager
def _db_errors(path: Path) -> Iterator[None]:
    """SQLite's errors (locked past the busy timeout, read-only file, disk full, corrupt file) as one line."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        raise BadInputError(f"registry {path}: {exc}") from None


# -- the file --------------------------------------------------------------------------------------------
def _prepare_file(p: Path, create: bool) -> bool:
    """Check the path; with ``create``, make a missing file owner-only before SQLite sees it (SQLite gives its
    journal files the database file's permissions). True if this call created it."""
    if p.is_dir():
        raise BadInputError(f"registry {p} is a directory")
    if p.exists():
        return False
    if not create:
        raise BadInputError(f"registry {p} does not exist")
    if not p.parent.is_dir():
        raise BadInputError(f"registry {p}: its folder {p.parent} does not exist")
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another run created it just now
        return False
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return True


def _owner_only(p: Path) -> None:
    """The WAL and shared-memory files hold key blobs too: owner-only, like the database (when ours)."""
    for suffix in ("-wal", "-shm"):
        side = p.with_name(p.name + suffix)
        with contextlib.suppress(OSError):
            st = side.stat()
            if st.st_uid == os.getuid() and st.st_mode & 0o777 != 0o600:
                os.chmod(side, 0o600)


# -- settling a connection -------------------------------------------------------------------------------
def _settle_schema(conn: sqlite3.Connection, p: Path, create: bool,
                   new_meta: Callable[[], dict[str, Any]]) -> None:
    """Make a new registry, check an existing one is a registry this code can read, migrate an older one.
    ``new_meta``: the facts a new registry records besides its format and creation (called only to make one)."""
    not_registry = f"{p} is not an onnxstain registry"
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise BadInputError(f"{not_registry} ({exc})") from None
    if version == 0 and tables == 0:
        if not create:
            raise BadInputError(f"{not_registry} (an empty database)")
        _initialise(conn, p, new_meta)
        return
    if version == 0:
        raise BadInputError(f"{not_registry} (a SQLite database of something else)")
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    except sqlite3.DatabaseError:
        row = None
    if row is None or _text(row[0]) != FORMAT:
        raise BadInputError(f"{not_registry} (a SQLite database of something else)")
    if version > SCHEMA_VERSION:
        raise BadInputError(f"registry {p} has schema version {version}, newer than this onnxstain ({__version__}) "
                            f"reads (up to {SCHEMA_VERSION}): upgrade onnxstain")
    if version < SCHEMA_VERSION:
        _migrate(conn, p)


def _migrate(conn: sqlite3.Connection, p: Path) -> None:
    """Apply the migrations from the file's version on, in one transaction (re-read inside it: another
    process may have migrated it meanwhile)."""
    with _db_errors(p):
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for step in MIGRATIONS[version:]:
                step(conn)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _initialise(conn: sqlite3.Connection, p: Path, new_meta: Callable[[], dict[str, Any]]) -> None:
    """Schema, format marker, creation time and what ``new_meta`` adds (with a passphrase: the salt and a
    passphrase verifier)."""
    meta: dict[str, Any] = {"format": FORMAT, "created": _utc_now(), "created_by": __version__}
    meta.update(new_meta())
    with _db_errors(p):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:  # else: another run made it meanwhile
                for step in MIGRATIONS:
                    step(conn)
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
