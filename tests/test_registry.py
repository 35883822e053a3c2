"""The registry of issued copies (onnxstain.fleet.registry) on real SQLite files, and its CLI.

The point of the module is that the registry and the dist folder never disagree: no issued row without its
file, no final-named file without an issued row, whatever is killed and whatever runs at once. Two writer
processes issue into one registry at once, and 20 processes are SIGKILLed at random moments while issuing
(a fork server started once: each trial forks a child from a process that has already imported onnxstain,
so a trial costs its kill delay, not an interpreter start). A scripted kill after each step of the write
protocol checks what recovery does at that step exactly.

Run as a script, this file is the worker those tests start (``place`` and ``serve``; see :func:`_worker_main`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from onnxstain.errors import BadInputError
from onnxstain.fleet.registry import (
    SCHEMA_VERSION,
    TEMP_PREFIX,
    AlreadyIssuedError,
    Registry,
    Writer,
)

REPO = Path(__file__).resolve().parent.parent
SRC = hashlib.sha256(b"the vendor's source model").hexdigest()
OTHER_SRC = hashlib.sha256(b"another source model").hexdigest()


# -- helpers ---------------------------------------------------------------------------------------------
def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _place(w: Writer, dist: Path, customer: str, *, kind: str = "stain", src: str = SRC, data: bytes | None = None,
           key: bytes | None = None, index: bytes | None = None, name: str | None = None) -> int:
    data = data if data is not None else f"model of {customer} {kind} {src[:8]}".encode()
    key = key if key is not None else f"key of {customer}".encode()
    return w.place(customer=customer, kind=kind, source_sha256=src, model_path=dist / (name or f"{customer}.onnx"),
                   data=data, key_bytes=key, key_commitment=hashlib.sha256(key).hexdigest(), bound_log10=-9.5,
                   index_blob=index)


def _consistent(db: Path, dist: Path) -> tuple[list[Any], Any]:
    """Open (which recovers) and check the invariants; returns (records, the recovery report)."""
    with Registry.open(db, check_files=True) as reg:
        report = reg.recovery
        recs = reg.copies()
    assert report is not None and report.consistent and not report.stray_temp, report
    assert [r.id for r in recs if r.state == "pending"] == []
    issued = {r.model_path: r for r in recs if r.state == "issued"}
    for r in issued.values():
        assert _sha(r.model_path) == r.model_sha256, r
    names = sorted(os.listdir(dist))
    assert [n for n in names if n.startswith(TEMP_PREFIX)] == []
    recorded = issued | {r.model_path: r for r in recs if r.state == "revoked"}  # a revoked copy's file may stay
    assert [n for n in names if str(dist / n) not in recorded] == []
    live = [(r.customer, r.source_sha256, r.kind) for r in recs if r.state != "revoked"]
    assert len(live) == len(set(live))
    assert os.listdir(f"{db}.writers") == []  # dead writers' lock files removed, no live writer here
    return recs, report


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def reg_dist(tmp_path: Path):
    dist = tmp_path / "dist"
    dist.mkdir()
    db = tmp_path / "copies.db"
    with Registry.open(db, create=True) as reg:
        yield reg, db, dist


# -- opening ---------------------------------------------------------------------------------------------
def test_create_is_owner_only_and_reopens(tmp_path: Path):
    db = tmp_path / "r.db"
    old = os.umask(0o002)  # a permissive umask must not widen the registry's files
    try:
        with Registry.open(db, create=True) as reg, reg.writer() as w:
            _place(w, tmp_path, "acme")
            for f in (db, f"{db}-wal", f"{db}-shm"):
                assert _mode(f) == 0o600, f
            assert _mode(f"{db}.writers") == 0o700
            os.chmod(f"{db}-wal", 0o644)  # as if another tool had made the WAL file: tightened on open
            with Registry.open(db) as again:
                assert _mode(f"{db}-wal") == 0o600
                assert [r.customer for r in again.copies()] == ["acme"]
                assert not again.encrypted
        assert not os.path.exists(f"{db}-wal")  # the last connection checkpoints and removes it
        with Registry.open(db, create=True) as reg:  # create on an existing registry opens it
            assert len(reg.copies()) == 1
        assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        os.umask(old)


def _refused(path: Path, match: str, **kw: Any) -> None:
    with pytest.raises(BadInputError, match=match) as exc:
        Registry.open(path, **kw)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


def test_bad_files_are_one_line_errors(tmp_path: Path):
    _refused(tmp_path / "missing.db", "does not exist")
    assert not (tmp_path / "missing.db").exists()
    text = tmp_path / "notes.db"
    text.write_bytes(b"not a database at all\n" * 100)
    _refused(text, "not an onnxstain registry")
    _refused(text, "not an onnxstain registry", create=True)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE copies (id INTEGER)")
    _refused(foreign, "something else", create=True)
    versioned = tmp_path / "versioned.db"  # another application's file that sets user_version too
    with sqlite3.connect(versioned) as con:
        con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB)")
        con.execute("PRAGMA user_version = 1")
    _refused(versioned, "something else")
    (tmp_path / "empty.db").touch()
    _refused(tmp_path / "empty.db", "empty database")
    _refused(tmp_path, "directory")
    assert text.read_bytes() == b"not a database at all\n" * 100  # nothing written to a file that is not ours


def test_newer_schema_is_refused(tmp_path: Path):
    db = tmp_path / "r.db"
    Registry.open(db, create=True).close()
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(BadInputError, match="newer than this onnxstain"):
        Registry.open(db)
    with pytest.raises(BadInputError, match="newer than this onnxstain"):
        Registry.open(db, readonly=True)


def test_a_version_1_registry_is_migrated_and_keeps_its_copies(tmp_path: Path, monkeypatch):
    """A registry written by schema version 1 (before a copy could keep a lock key) opens as version 2: its copies
    and keys as they were, none with a lock key."""
    from onnxstain.fleet import _schema

    db = tmp_path / "r.db"
    monkeypatch.setattr(_schema, "MIGRATIONS", _schema.MIGRATIONS[:1])
    monkeypatch.setattr(_schema, "SCHEMA_VERSION", 1)
    Registry.open(db, create=True).close()
    con = sqlite3.connect(db)
    with con:  # a copy as version 1 stored it
        con.execute("INSERT INTO copies (customer, kind, source_sha256, model_sha256, model_path, key_commitment, "
                    "key_blob, state) VALUES ('acme', 'stain', ?, ?, ?, 'c0mm1t', ?, 'issued')",
                    (SRC, SRC, str(tmp_path / "acme.onnx"), b"key of acme"))
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    con.close()
    monkeypatch.undo()
    with Registry.open(db) as reg:
        assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        (old,) = reg.copies()
        assert reg.key_bytes(old.id) == b"key of acme" and reg.lock_key_bytes(old.id) is None


def test_a_stained_and_locked_copy_keeps_its_lock_key_sealed(tmp_path: Path):
    db, dist = tmp_path / "r.db", tmp_path / "dist"
    dist.mkdir()
    with Registry.open(db, create=True, passphrase="pw") as reg:
        with reg.writer() as w:
            key = b"stain key of globex"
            both = w.place(customer="globex", kind="both", source_sha256=SRC, model_path=dist / "globex.locked.onnx",
                           data=b"locked copy", key_bytes=key, key_commitment=hashlib.sha256(key).hexdigest(),
                           lock_key_bytes=b"lock key of globex")
            plain = _place(w, dist, "acme")
        assert reg.lock_key_bytes(both) == b"lock key of globex" and reg.key_bytes(both) == key
        assert reg.lock_key_bytes(plain) is None
    blob = sqlite3.connect(db).execute("SELECT lock_key_blob FROM copies WHERE id = ?", (both,)).fetchone()[0]
    assert b"lock key of globex" not in bytes(blob)  # encrypted at rest, like the stain key


# -- issuing, reading, revoking --------------------------------------------------------------------------
def test_place_list_get_key_round_trip(reg_dist):
    reg, _, dist = reg_dist
    with reg.writer() as w:
        a = _place(w, dist, "acme", index=b"\x00index-of-acme")
        b = _place(w, dist, "bolt", kind="lock")
        c = _place(w, dist, "acme", src=OTHER_SRC, name="acme-other.onnx")
    recs = reg.copies()
    assert [r.id for r in recs] == [a, b, c] and {r.state for r in recs} == {"issued"}
    got = reg.get(str(a))
    assert got.customer == "acme" and got.kind == "stain" and got.source_sha256 == SRC
    assert got.model_path == str(dist / "acme.onnx") and _sha(got.model_path) == got.model_sha256
    assert got.bound_log10 == -9.5 and got.tool_version and got.created.endswith("Z") and len(got.created) == 20
    assert reg.get("bolt").id == b
    with pytest.raises(BadInputError, match=f"ids?.*{a}.*{c}"):  # two models: ambiguous, ids named
        reg.get("acme")
    with pytest.raises(BadInputError, match="no copy"):
        reg.get("nobody")
    with pytest.raises(BadInputError, match="no copy 999"):
        reg.get("999")
    assert reg.key_bytes(a) == b"key of acme"
    assert reg.copies(source_sha256=OTHER_SRC) == [reg.get(str(c))]
    assert reg.copies(state="revoked") == []
    assert reg.issued_customers(SRC, "stain") == {"acme"} and reg.issued_customers(SRC, "lock") == {"bolt"}
    assert reg.index_rows(SRC) == [(a, "acme", b"\x00index-of-acme"), (b, "bolt", None)]
    with pytest.raises(BadInputError):
        reg.copies(state="lost")


def test_a_live_customer_cannot_be_issued_twice_until_revoked(reg_dist):
    reg, db, dist = reg_dist
    with reg.writer() as w:
        first = _place(w, dist, "acme")
        with pytest.raises(AlreadyIssuedError, match=f"copy {first}"):
            _place(w, dist, "acme", name="acme-2.onnx")
        assert not (dist / "acme-2.onnx").exists() and sorted(os.listdir(dist)) == ["acme.onnx"]
        with pytest.raises(BadInputError, match="already the file of copy"):  # two live copies never share a file
            _place(w, dist, "bolt", name="acme.onnx")
        assert _sha(dist / "acme.onnx") == reg.get("acme").model_sha256
        revoked = reg.revoke("acme", "contract ended")
        assert revoked.state == "revoked" and revoked.revoke_reason == "contract ended" and revoked.revoked
        with pytest.raises(BadInputError, match="already revoked"):
            reg.revoke(str(first), "again")
        with pytest.raises(BadInputError, match="reason"):
            reg.revoke("acme", "  ")
        again = _place(w, dist, "acme", name="acme-2.onnx")
    assert reg.get("acme").id == again  # the live copy, of one revoked and one issued
    assert [i for i, _, _ in reg.index_rows()] == [first, again]  # a revoked copy is still identified
    assert reg.issued_customers(SRC, "stain") == {"acme"}
    _consistent(db, dist)


def test_export_is_the_public_record(reg_dist):
    reg, _, dist = reg_dist
    with reg.writer() as w:
        _place(w, dist, "acme", key=b"TOP-SECRET-KEY-acme", index=b"INDEX-BLOB-acme")
        _place(w, dist, "bolt", key=b"TOP-SECRET-KEY-bolt")
    reg.revoke("bolt", "leaked")
    data = reg.export()
    text = json.dumps(data)
    assert data["format"] == "onnxstain-registry-export" and data["version"] == 1
    assert [c["customer"] for c in data["copies"]] == ["acme", "bolt"]
    assert data["copies"][1]["state"] == "revoked" and data["copies"][1]["revoke_reason"] == "leaked"
    assert set(data["copies"][0]) == {"id", "customer", "kind", "source_sha256", "model_sha256", "model_path",
                                      "key_commitment", "bound_log10", "created", "tool_version", "state",
                                      "revoked", "revoke_reason"}
    assert "TOP-SECRET" not in text and "INDEX-BLOB" not in text


def test_place_removes_everything_when_it_fails(reg_dist):
    reg, db, dist = reg_dist
    with reg.writer() as w:
        with pytest.raises(BadInputError, match="customer name"):
            _place(w, dist, "12345")  # all digits would read as a copy id
        (dist / "taken.onnx").mkdir()  # the rename fails: the row and the temp file go
        with pytest.raises(OSError):
            _place(w, dist, "acme", name="taken.onnx")
        (dist / "taken.onnx").rmdir()
        assert os.listdir(dist) == [] and reg.copies() == []
        _place(w, dist, "acme")  # the customer is free again
    _consistent(db, dist)


def test_index_rows_are_fast_for_10000_copies(reg_dist):
    reg, db, _ = reg_dist
    con = sqlite3.connect(db)
    rows = [(f"customer-{i}", "stain", SRC if i % 2 else OTHER_SRC, "0" * 64, f"/dist/{i}.onnx", "c", b"k",
             os.urandom(64), "2024-01-01T00:00:00Z", "issued" if i % 10 else "revoked") for i in range(10_000)]
    with con:
        con.executemany("INSERT INTO copies (customer, kind, source_sha256, model_sha256, model_path, key_commitment,"
                        " key_blob, index_blob, created, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    con.close()
    t0 = time.perf_counter()
    got = reg.index_rows(SRC)
    everything = reg.index_rows()
    listed = reg.copies()
    elapsed = time.perf_counter() - t0
    assert len(got) == 5_000 and len(everything) == 10_000 and len(listed) == 10_000
    assert got[0] == (2, "customer-1", rows[1][7])
    assert elapsed < 1.0, f"{elapsed:.2f} s"


# -- encryption ------------------------------------------------------------------------------------------
def test_encrypted_keys(tmp_path: Path):
    db, dist = tmp_path / "r.db", tmp_path / "dist"
    dist.mkdir()
    secret = b"PLAINTEXT-KEY-MATERIAL-" + os.urandom(8).hex().encode()
    index = b"PLAINTEXT-INDEX-DIRECTION-" + os.urandom(8).hex().encode()
    with Registry.open(db, create=True, passphrase="correct horse") as reg, reg.writer() as w:
        assert reg.encrypted
        copy_id = _place(w, dist, "acme", key=secret, index=index)
        assert reg.key_bytes(copy_id) == secret and reg.index_rows() == [(copy_id, "acme", index)]
        files = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("r.db") and p.is_file())
        assert b"acme" in files  # the WAL is still there and holds the row
        assert b"PLAINTEXT-" not in files  # neither key nor index, in the database or in its WAL
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("r.db") and p.is_file())
    assert b"acme" in files and b"PLAINTEXT-" not in files
    with pytest.raises(BadInputError, match="wrong passphrase for registry"):
        Registry.open(db, passphrase="wrong horse")
    with Registry.open(db) as reg:  # no passphrase: everything but the keys
        assert [r.customer for r in reg.copies()] == ["acme"] and reg.export()["copies"][0]["customer"] == "acme"
        with pytest.raises(BadInputError, match="encrypted"):
            reg.key_bytes(copy_id)
        with pytest.raises(BadInputError, match="encrypted"):
            reg.index_rows()
        with pytest.raises(BadInputError, match="encrypted"):
            reg.writer()
        reg.revoke("acme", "no key needed to revoke")
    with Registry.open(db, passphrase="correct horse") as reg:
        assert reg.key_bytes(copy_id) == secret and reg.index_rows() == [(copy_id, "acme", index)]
    con = sqlite3.connect(db)  # a key blob moved to another row does not decrypt there
    con.execute("UPDATE copies SET key_commitment = 'forged' WHERE id = ?", (copy_id,))
    con.commit()
    con.close()
    with Registry.open(db, passphrase="correct horse") as reg, pytest.raises(BadInputError, match="integrity"):
        reg.key_bytes(copy_id)
    plain = tmp_path / "plain.db"
    Registry.open(plain, create=True).close()
    with pytest.raises(BadInputError, match="not encrypted"):
        Registry.open(plain, passphrase="correct horse")


def test_a_passphrase_without_the_cryptography_package(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)  # as if not installed
    with pytest.raises(BadInputError, match=r"pip install 'onnxstain\[fleet\]'"):
        Registry.open(tmp_path / "r.db", create=True, passphrase="p")
    assert not (tmp_path / "r.db").exists()
    Registry.open(tmp_path / "r.db", create=True).close()  # no passphrase: no cryptography needed


# -- concurrency and kills -------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                MKL_NUM_THREADS="1")


def test_two_writer_processes_at_once(tmp_path: Path):
    db, dist = tmp_path / "r.db", tmp_path / "dist"
    dist.mkdir()
    Registry.open(db, create=True).close()
    go = tmp_path / "go"
    names = [[f"c{i:03d}" for i in range(0, 100)], [f"c{i:03d}" for i in range(50, 150)]]  # 50 in both
    procs = [subprocess.Popen([sys.executable, __file__, "place", str(db), str(dist), str(seed), str(go), *names[seed]],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (0, 1)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < 2:  # both have imported and opened the registry
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    placed = [set(json.loads(out)["placed"]) for out, _ in outs]
    refused = [set(json.loads(out)["refused"]) for out, _ in outs]
    assert placed[0] | placed[1] == {f"c{i:03d}" for i in range(150)} and not placed[0] & placed[1]
    assert refused[0] == placed[1] & set(names[0]) and refused[1] == placed[0] & set(names[1])
    recs, _ = _consistent(db, dist)
    assert sorted(r.customer for r in recs) == sorted(placed[0] | placed[1])
    assert len(recs) == 150 and {r.state for r in recs} == {"issued"}


class _ForkServer:
    """A worker process (this file run as ``serve``) that forks a placing child per request."""

    def __init__(self, tmp: Path) -> None:
        self.log = tmp / "server.log"
        self._log = open(self.log, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen([sys.executable, __file__, "serve"], env=_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)

    def run(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the fork server died: {self.log.read_text()[-3000:]}"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    server = _ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


def test_kill_9_at_random_moments(fork_server: _ForkServer, tmp_path: Path):
    db, dist = tmp_path / "r.db", tmp_path / "dist"
    dist.mkdir()
    Registry.open(db, create=True).close()
    rng = random.Random(20240611)
    t0 = time.monotonic()
    actions = {"finished": 0, "rolled_back": 0, "removed_temp": 0}
    copies = 0
    for trial in range(20):
        delay = rng.uniform(0.020, 0.300)
        res = fork_server.run(mode="loop", db=str(db), dist=str(dist), seed=trial, delay=delay)
        assert res["killed"], f"trial {trial}: the child was not running when killed: {res}"
        recs, report = _consistent(db, dist)
        for name in actions:
            actions[name] += len(getattr(report, name))
        assert len(recs) >= copies  # an issued copy is never lost
        copies = len(recs)
    elapsed = time.monotonic() - t0
    print(f"20 kill trials in {elapsed:.1f} s: {copies} copies, recovery actions {actions}")
    assert copies > 20, "the children issued (almost) nothing before their kill"
    assert sum(actions.values()) > 0, "no kill landed inside the write protocol"
    assert elapsed < 40


@pytest.mark.parametrize("stop", ["temp", "pending", "renamed"])
def test_kill_9_after_each_step(fork_server: _ForkServer, tmp_path: Path, stop: str):
    """SIGKILL right after writing the temp file / adding the pending row / renaming: recovery removes the
    temp file / rolls the row back / finishes the copy."""
    db, dist = tmp_path / "r.db", tmp_path / "dist"
    dist.mkdir()
    Registry.open(db, create=True).close()
    res = fork_server.run(mode="step", db=str(db), dist=str(dist), seed=0, stop=stop)
    assert res["killed"], res
    with Registry.open(db, readonly=True) as reg:  # what the kill left, before any recovery
        left = reg.copies()
    assert [r.state for r in left] == ([] if stop == "temp" else ["pending"])
    recs, report = _consistent(db, dist)
    if stop == "temp":
        assert len(report.removed_temp) == 1 and recs == []
    elif stop == "pending":
        assert report.rolled_back == [left[0].id] and recs == [] and os.listdir(dist) == []
    else:
        assert report.finished == [left[0].id] and [r.state for r in recs] == ["issued"]
        assert os.listdir(dist) == ["victim.onnx"]


def test_recovery_leaves_a_live_writers_rows_alone(reg_dist):
    reg, db, dist = reg_dist
    with reg.writer() as w:
        data = b"in flight"
        temp = w.write_temp(dist, data)
        copy_id = w.add_pending(customer="acme", kind="both", source_sha256=SRC,
                                model_sha256=hashlib.sha256(data).hexdigest(), model_path=dist / "acme.onnx",
                                temp_path=temp, key_bytes=b"k", key_commitment="c", bound_log10=None, index_blob=None)
        stray = dist / f"{TEMP_PREFIX}12345-someone-else"  # another tool's temp file: reported, never removed
        stray.write_bytes(b"?")
        with Registry.open(db) as other:  # recovery from another connection, while the writer lives
            assert other.recovery is not None
            assert other.recovery.rolled_back == [] and other.recovery.removed_temp == []
            assert other.recovery.stray_temp == [str(stray)]
            assert other.get(str(copy_id)).state == "pending"
            assert other.issued_customers(SRC, "both") == {"acme"}  # a pending copy is live
        assert temp.exists()
        os.replace(temp, dist / "acme.onnx")
        w.commit(copy_id)
        stray.unlink()
    assert reg.get("acme").state == "issued"
    _consistent(db, dist)


def test_closing_a_writer_resolves_what_it_left_pending(reg_dist):
    reg, db, dist = reg_dist
    with reg.writer() as w:
        temp = w.write_temp(dist, b"never renamed")
        copy_id = w.add_pending(customer="acme", kind="stain", source_sha256=SRC,
                                model_sha256=hashlib.sha256(b"never renamed").hexdigest(),
                                model_path=dist / "acme.onnx", temp_path=temp, key_bytes=b"k", key_commitment="c",
                                bound_log10=None, index_blob=None)
        w.write_temp(dist, b"orphan")
    assert reg.copies() == [] and os.listdir(dist) == []
    with pytest.raises(BadInputError, match="closed"):
        w.commit(copy_id)
    _consistent(db, dist)


# -- the CLI ---------------------------------------------------------------------------------------------
def test_cli(reg_dist, tmp_path: Path):
    from click.testing import CliRunner

    from onnxstain.fleet.registry_cli import PASSPHRASE_ENV
    from onnxstain.fleet.registry_cli import registry as cli

    reg, db, dist = reg_dist
    with reg.writer() as w:
        _place(w, dist, "acme", key=b"SECRET-acme")
        _place(w, dist, "[bold]bolt", kind="lock", key=b"SECRET-bolt")
    run = CliRunner().invoke
    r = run(cli, ["list", str(db), "--json", str(tmp_path / "list.json")])
    assert r.exit_code == 0, r.output
    assert "acme" in r.output and "[bold]bolt" in r.output and "2 copies" in r.output
    assert [c["customer"] for c in json.loads((tmp_path / "list.json").read_text())["copies"]] == ["acme", "[bold]bolt"]
    r = run(cli, ["list", str(db), "--state", "revoked"])
    assert r.exit_code == 0 and "0 copies" in r.output
    r = run(cli, ["show", str(db), "acme"])
    assert r.exit_code == 0 and "model sha256" in r.output and "SECRET" not in r.output
    r = run(cli, ["revoke", str(db), "2", "--reason", "leaked on a forum"])
    assert r.exit_code == 0 and "revoked" in r.output, r.output
    r = run(cli, ["export", str(db), "-o", str(tmp_path / "public.json")])
    assert r.exit_code == 0, r.output
    public = (tmp_path / "public.json").read_text()
    assert "SECRET" not in public and json.loads(public)["copies"][1]["state"] == "revoked"
    r = run(cli, ["check", str(db), "--hashes"])
    assert r.exit_code == 0 and "ok" in r.output, r.output
    (dist / "acme.onnx").write_bytes(b"tampered")
    r = run(cli, ["check", str(db), "--hashes"])
    assert r.exit_code == 1 and "ALTERED" in r.output
    (dist / "acme.onnx").unlink()
    r = run(cli, ["check", str(db)])
    assert r.exit_code == 1 and "MISSING" in r.output
    # errors: one line, exit 2
    for args in (["show", str(db), "nobody"], ["export", str(db), "-o", str(db)],
                 ["list", str(tmp_path / "none.db")], ["revoke", str(db), "2", "--reason", "twice"]):
        r = run(cli, args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith("onnxstain: error:") and r.output.count("\n") == 1, (args, r.output)
    r = run(cli, ["check", str(db)], env={PASSPHRASE_ENV: "x"})
    assert r.exit_code == 2 and "not encrypted" in r.output


# -- the worker (this file run as a script) ---------------------------------------------------------------
def _placing_loop(db: str, dist: str, seed: int, ready_fd: int | None = None) -> None:
    """Issue copies until killed: small random models, customers drawn with repeats (some refused)."""
    rng = random.Random(seed)
    with Registry.open(db) as reg, reg.writer() as w:
        if ready_fd is not None:
            os.write(ready_fd, b"r")
        for i in range(100_000):
            customer = f"t{seed}-c{rng.randrange(400)}"
            data = rng.randbytes(rng.randrange(100, 5000))
            with contextlib.suppress(AlreadyIssuedError):
                _place(w, Path(dist), customer, data=data, name=f"{customer}-{i}.onnx")


def _scripted(db: str, dist: str, stop: str) -> None:
    """Do the protocol's steps by hand up to ``stop``, then die by SIGKILL (no clean-up runs)."""
    reg = Registry.open(db)
    w = reg.writer()
    data = b"the victim's model"
    temp = w.write_temp(dist, data)
    if stop != "temp":
        w.add_pending(customer="victim", kind="stain", source_sha256=SRC, model_sha256=hashlib.sha256(data).hexdigest(),
                      model_path=Path(dist) / "victim.onnx", temp_path=temp, key_bytes=b"k", key_commitment="c",
                      bound_log10=None, index_blob=None)
    if stop == "renamed":
        os.replace(temp, Path(dist) / "victim.onnx")
    os.kill(os.getpid(), signal.SIGKILL)


def _serve() -> None:
    """Per request line: fork a child that places copies (``loop``: SIGKILLed after ``delay`` s once it has
    opened the registry) or runs the protocol's steps up to ``stop`` and kills itself (``step``)."""
    for line in sys.stdin:
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                if req["mode"] == "loop":
                    _placing_loop(req["db"], req["dist"], req["seed"], ready_fd=w)
                else:
                    _scripted(req["db"], req["dist"], req["stop"])
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        os.close(w)
        if req["mode"] == "loop":
            os.read(r, 1)
            time.sleep(req["delay"])
            os.kill(pid, signal.SIGKILL)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        print(json.dumps({"killed": killed, "status": status}), flush=True)


def _place_many(db: str, dist: str, seed: int, go: str, customers: list[str]) -> None:
    """Wait for ``go``, then issue one copy to each customer (in a seeded order); print who was refused."""
    rng = random.Random(seed)
    rng.shuffle(customers)
    placed, refused = [], []
    with Registry.open(db) as reg, reg.writer() as w:
        Path(go).with_name(f"ready-{seed}").touch()
        while not os.path.exists(go):
            time.sleep(0.005)
        for c in customers:
            try:
                _place(w, Path(dist), c, data=f"{c} from writer {seed}: ".encode() + rng.randbytes(200))
                placed.append(c)
            except AlreadyIssuedError:
                refused.append(c)
    print(json.dumps({"placed": placed, "refused": refused}))


def _worker_main(argv: list[str]) -> None:
    if argv[0] == "serve":
        _serve()
    elif argv[0] == "place":
        _place_many(argv[1], argv[2], int(argv[3]), argv[4], argv[5:])


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
