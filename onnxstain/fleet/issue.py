"""Issue one stained (or locked) copy of a model per customer into a folder and a registry.

The model is loaded and calibrated once (:class:`onnxstain._stain.many.Stainer`, or
:class:`onnxstain._lock.many.Locker` for locked copies); each customer's copy then costs only its own key's
work — a secret seed of 53 fresh bits, the trigger (patch) search, the edit, the checks on the copy — and its
placement: the model goes into ``dist/`` and its key into the registry in one protocol
(:meth:`onnxstain.fleet.registry.Writer.place`), so a kill leaves every registered copy in place and no copy
unregistered. Stain keys never touch ``dist/`` (it ships): each is staged in the registry writer's private
folder beside the registry (:meth:`onnxstain.fleet.registry.Writer.stage_folder`: removed when the writer
closes, or by the recovery that finds it dead) and removed once the registry holds it. A locked copy ships
with its customer's own lock key (``<customer>.locked.key``: the patch the customer pastes with
``onnxstain apply-patch``), written once the customer's pending row is the run's; the registry keeps a copy.

A run is resumable: customers that already have a live copy of this model are skipped, so re-running after a
kill issues only the rest.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._lock.types import LockOptions, LockResult
from .._onnx.io import write_bytes_atomic
from .._stain.result import StainOptions, StainResult
from .._version import __version__
from ..errors import BadInputError
from ..keys import load_key
from ..outputs import clean_stale
from ..preprocess import Preprocessing, PreprocessingRequest
from ..progress import Progress, Silent
from ..seeds import SEED_LIMIT
from .index import IndexEntry
from .registry import AlreadyIssuedError, Registry
from .signing import CopyClaim, check_signing_key, model_signature, statement, write_signatures

if TYPE_CHECKING:
    from .writer import Writer

# a customer name becomes a file name in dist/: letters, digits and . _ - @ + only, not starting with a dot
_FILE_SAFE = re.compile(r"[A-Za-z0-9_@+\-][A-Za-z0-9._@+\-]{0,199}")


@dataclasses.dataclass(frozen=True)
class IssuedCopy:
    customer: str
    copy_id: int
    path: Path
    model_sha256: str
    seconds: float  # this copy's own work (search, edit, checks, write, placement)
    timings: dict[str, float]  # the stain's stages and the placement ("place")


@dataclasses.dataclass
class IssueResult:
    source: Path
    source_sha256: str
    issued: list[IssuedCopy]
    skipped: list[str]  # customers that already had a live copy
    setup_seconds: float  # load and calibration, once for every copy (per worker)
    notes: list[str]
    wall_seconds: float = 0.0  # the whole run
    workers: int = 1

    def throughput(self) -> float:
        """Copies per hour over the whole run."""
        return 3600.0 * len(self.issued) / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def per_copy(self) -> dict[str, float]:
        """Median and extremes of the copies' own times."""
        t = np.array([c.seconds for c in self.issued]) if self.issued else np.zeros(1)
        return {"median": float(np.median(t)), "min": float(t.min()), "max": float(t.max())}


def read_customers(path: str | Path) -> list[str]:
    """Customer names from a CSV: the ``customer`` column if the header has one, else the first column; blank
    lines skipped; a name twice is refused (each customer gets one copy)."""
    p = Path(path)
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except FileNotFoundError:
        raise BadInputError(f"{p}: no such customers file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInputError(f"cannot read customers file {p}: {exc}") from None
    if not rows:
        raise BadInputError(f"{p} lists no customers")
    header = [c.strip().lower() for c in rows[0]]
    column = header.index("customer") if "customer" in header else 0
    body = rows[1:] if "customer" in header else rows
    names = [r[column].strip() if column < len(r) else "" for r in body]
    return check_customers(names, str(p))


def check_customers(names: Sequence[str], where: str = "the customer list") -> list[str]:
    """Every name usable as a file name in ``dist/`` and listed once."""
    seen: set[str] = set()
    for name in names:
        if not _FILE_SAFE.fullmatch(name) or name.isdigit():
            raise BadInputError(f"{where}: customer name {name!r} is not usable as a file name (letters, digits, "
                                ". _ - @ +, up to 200, not only digits, not starting with a dot)")
        if name in seen:
            raise BadInputError(f"{where}: customer {name!r} is listed twice")
        seen.add(name)
    if not names:
        raise BadInputError(f"{where} lists no customers")
    return list(names)


def copy_kind(options: StainOptions | LockOptions | None, then_lock: LockOptions | None = None) -> str:
    """The registry's kind of the copies ``options`` make: ``"lock"`` for :class:`LockOptions`, ``"both"`` for a
    stain then locked (``then_lock``), else ``"stain"``."""
    if isinstance(options, LockOptions):
        if then_lock is not None:
            raise BadInputError("a locked copy is locked once: give the stain's options with a lock to add")
        return "lock"
    return "both" if then_lock is not None else "stain"


def copy_path(dist: str | Path, customer: str, kind: str) -> Path:
    """Where a customer's copy lands: ``<customer>.onnx`` (stained), ``<customer>.locked.onnx`` (locked, or stained
    and locked: a customer may hold a stained and a locked copy of one model, never in the same file)."""
    return Path(dist) / (f"{customer}.onnx" if kind == "stain" else f"{customer}.locked.onnx")


def customer_key_path(copy: Path) -> Path:
    """A locked copy's key for its customer, beside it: ``<customer>.locked.key``."""
    return copy.with_suffix(".key")


def issue(model: str | Path, customers: Sequence[str], dist: str | Path, registry: Registry, *,
          options: StainOptions | LockOptions | None = None,
          preprocessing: Preprocessing | PreprocessingRequest | None = None,
          images: str | Path | np.ndarray | None = None, progress: Progress | None = None,
          seeds: Iterator[int] | None = None, signing_key: str | Path | None = None,
          then_lock: LockOptions | None = None) -> IssueResult:
    """One stained copy of ``model`` per customer not yet issued, as ``dist/<customer>.onnx``; with
    :class:`LockOptions`, one locked copy each, as ``dist/<customer>.locked.onnx`` beside its customer's lock key;
    with ``then_lock``, each stained copy is then locked (``dist/<customer>.locked.onnx`` and its lock key; the
    registry keeps both keys: the stain names the customer of a leaked copy, the lock keeps it useless to others).

    ``seeds`` (tests and benchmarks only: a copy's seed is its secret) gives each copy's seed in turn; by
    default each is 53 fresh bits from the operating system. ``signing_key`` (a P-256 PEM private key): each copy
    is signed with model-signing and gets a signed in-toto statement of its key commitment
    (:mod:`onnxstain.fleet.signing`), written before the copy lands."""
    from .._lock.many import Locker
    from .._onnx.io import sha256_file
    from .._stain.many import Stainer

    customers = check_customers(customers)
    if signing_key is not None:
        check_signing_key(signing_key)
    if any(o is not None and o.seed is not None for o in (options, then_lock)):
        raise BadInputError("issued copies take fresh secret seeds; --seed does not apply")
    if then_lock is not None and then_lock.kind == "shuffle":
        raise BadInputError("a stained copy is not locked with the shuffle lock (it could reorder the layer that "
                            "hosts the stain, whose row identify reads from the weights): use the gate lock")
    if then_lock is not None and then_lock.kind == "auto":
        then_lock = dataclasses.replace(then_lock, kind="gate")
    out = Path(dist)
    if not out.is_dir():
        raise BadInputError(f"output folder {out} does not exist")
    source = Path(model)
    if not source.is_file():
        raise BadInputError(f"{source}: no such model file")
    progress = progress or Silent()
    kind = copy_kind(options, then_lock)
    source_sha = sha256_file(source)
    done = registry.issued_customers(source_sha, kind)
    todo = [c for c in customers if c not in done]
    skipped = [c for c in customers if c in done]
    clean_stale(out)
    start = time.perf_counter()
    issued: list[IssuedCopy] = []
    if not todo:
        return IssueResult(source, source_sha, [], skipped, 0.0, [])
    maker = (Locker(source, options, preprocessing, images, progress) if isinstance(options, LockOptions)
             else Stainer(source, options, preprocessing, images, progress))
    with maker, registry.writer() as writer:
        work = writer.stage_folder(registry.path.parent)  # keys never touch dist/; gone with the writer
        setup = time.perf_counter() - start
        how = _Copy(maker.lock if isinstance(maker, Locker) else maker.stain, maker.source_sha256, kind, source,
                    then_lock, maker.preprocessing, images)
        with progress.task(f"issuing {len(todo)} copies", total=len(todo)) as task:
            for customer in todo:
                seed = None if seeds is None else next(seeds)
                copy = _issue_one(how, writer, work, copy_path(out, customer, kind), customer, seed, signing_key)
                if copy is None:  # another run issued it meanwhile
                    skipped.append(customer)
                    continue
                issued.append(copy)
                task.advance()
        notes = maker.notes
    return IssueResult(source, maker.source_sha256, issued, skipped, setup, notes,
                       wall_seconds=time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class _Copy:
    """How this run makes a copy: ``make(output, key, record, seed=...)`` (a Stainer's or a Locker's), of which
    source, and what kind of copy it is."""

    make: Callable[..., StainResult | LockResult]
    source_sha256: str
    kind: str
    source: Path
    then_lock: LockOptions | None = None  # kind "both": the lock made on each stained copy
    preprocessing: Preprocessing | None = None  # the source's, settled (a stained copy has no sidecar of its own)
    images: str | Path | np.ndarray | None = None


def _issue_one(how: _Copy, writer: Writer, work: Path, dest: Path, customer: str, seed: int | None,
               signing_key: str | Path | None) -> IssuedCopy | None:
    """One customer's copy: make it in the writer's private folder, sign it (if asked), place it with its key
    in the registry (None: another run holds the customer), and clear the staged files. A locked copy's key
    goes beside it for its customer, written with the signatures once the customer's pending row is the run's."""
    t0 = time.perf_counter()
    model_tmp, key_tmp = work / "model.onnx", work / "copy.key"
    try:
        result = how.make(model_tmp, key_tmp, work / "copy.key.public.json", seed=seed)
        key = load_key(key_tmp)
        key_bytes = key_tmp.read_bytes()
        lock_bytes, timings = None, dict(result.timings)
        if how.then_lock is not None:  # the stained copy, locked: the copy that ships
            # a given seed (tests and benchmarks) gives the lock's too; else each is fresh
            lock_seed = None if seed is None else (seed + 1) % SEED_LIMIT
            lock_bytes, lock_timings = _lock_copy(work, model_tmp, how, lock_seed)
            timings.update({f"lock_{k}": v for k, v in lock_timings.items()})
            timings["total"] = result.timings.get("total", 0.0) + lock_timings.get("total", 0.0)
        data = model_tmp.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        signatures = None
        if signing_key is not None:
            claim = CopyClaim(dest.name, sha, key.commitment, how.source_sha256,
                              result.bound.log10, f"onnxstain {__version__}")
            signatures = (model_signature(model_tmp, signing_key), statement(claim, signing_key))

        def beside() -> None:  # once the customer's pending row is ours: never over another run's files
            if how.kind != "stain":
                write_bytes_atomic(customer_key_path(dest), lock_bytes or key_bytes, mode=0o600)
            if signatures is not None:
                write_signatures(dest, *signatures)
        index = IndexEntry.of(key, str(how.source.resolve())).to_bytes() if how.kind != "lock" else None
        try:
            copy_id = writer.place(customer=customer, kind=how.kind, source_sha256=how.source_sha256,
                                   model_path=dest, data=data, key_bytes=key_bytes,
                                   key_commitment=key.commitment, bound_log10=result.bound.log10,
                                   index_blob=index, before_rename=beside, lock_key_bytes=lock_bytes)
        except AlreadyIssuedError:
            return None
    finally:
        for f in work.iterdir():
            f.unlink()
    seconds = time.perf_counter() - t0
    timings["place"] = seconds - timings.get("total", 0.0)
    return IssuedCopy(customer, copy_id, dest, sha, seconds, timings)


def _lock_copy(work: Path, model: Path, how: _Copy, seed: int | None) -> tuple[bytes, dict[str, float]]:
    """Lock the stained copy ``model`` in place (a full lock of that copy, its own calibration: each copy's weights
    are its own), with the source's preprocessing; the lock key's bytes and the lock's timings."""
    from .._lock.pipeline import lock

    assert how.then_lock is not None
    locked, lock_key = work / "locked.onnx", work / "lock.key"
    res = lock(model, locked, lock_key, dataclasses.replace(how.then_lock, seed=seed),
               preprocessing=how.preprocessing, images=how.images, record_path=work / "lock.key.public.json")
    os.replace(locked, model)
    return lock_key.read_bytes(), res.timings
