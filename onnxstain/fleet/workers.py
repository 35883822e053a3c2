"""Issuing with several workers: the customers not yet issued are shared out, and each worker runs
:func:`onnxstain.fleet.issue.issue` on its share — its own load and calibration, its own registry writer (the
registry's protocol keeps concurrent writers consistent), its share of the cores.

Backends: **Ray** when it is installed (a local Ray by default; ``ray_address`` joins a cluster, whose workers
must see the model, ``dist/`` and the registry at the same paths, e.g. a shared file system), else local
processes. One worker is the plain single-process path of :func:`issue`. The progress bar follows the
registry: copies count as they are committed, whichever worker issued them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._lock.types import LockOptions
from .._stain.result import StainOptions
from ..errors import BadInputError
from ..preprocess import Preprocessing, PreprocessingRequest
from ..progress import Progress, Silent
from .issue import IssueResult, check_customers, copy_kind, issue
from .registry import Registry

POLL_S = 0.5


@dataclasses.dataclass(frozen=True)
class Share:
    """One worker's part of a run (picklable: it crosses to the worker's process)."""

    model: str
    customers: list[str]
    dist: str
    registry: str
    passphrase: str | None
    options: StainOptions | LockOptions | None
    preprocessing: Preprocessing | PreprocessingRequest | None
    images: str | None
    seeds: list[int] | None
    threads: int
    signing_key: str | None = None
    then_lock: LockOptions | None = None


def issue_share(share: Share) -> IssueResult:
    """A worker's run: its share of the cores, its own registry connection, the single-process issue."""
    from ..runtime import set_threads

    set_threads(share.threads)
    import torch

    torch.set_num_threads(share.threads)
    with Registry.open(share.registry, passphrase=share.passphrase) as reg:
        return issue(share.model, share.customers, share.dist, reg, options=share.options,
                     preprocessing=share.preprocessing, images=share.images,
                     seeds=iter(share.seeds) if share.seeds is not None else None, signing_key=share.signing_key,
                     then_lock=share.then_lock)


def issue_parallel(model: str | Path, customers: Sequence[str], dist: str | Path, registry_path: str | Path, *,
                   workers: int, passphrase: str | None = None, ray_address: str | None = None,
                   backend: str = "auto",
                   options: StainOptions | LockOptions | None = None,
                   preprocessing: Preprocessing | PreprocessingRequest | None = None, images: str | Path | None = None,
                   progress: Progress | None = None, seeds: Sequence[int] | None = None,
                   signing_key: str | Path | None = None, then_lock: LockOptions | None = None) -> IssueResult:
    """Issue the copies with ``workers`` workers (see the module docstring). ``backend``: ``"auto"`` (Ray if
    installed), ``"ray"`` or ``"processes"``. ``seeds`` (tests and benchmarks only) gives the copies' seeds in
    the order of ``customers``."""
    from .._onnx.io import sha256_file

    if workers < 1:
        raise BadInputError(f"--workers must be at least 1, not {workers}")
    if backend not in ("auto", "ray", "processes"):
        raise BadInputError(f"the backend is auto, ray or processes, not {backend!r}")
    customers = check_customers(customers)
    if seeds is not None and len(seeds) < len(customers):
        raise BadInputError("one seed per customer")
    source = Path(model)
    if not source.is_file():
        raise BadInputError(f"{source}: no such model file")
    sha = sha256_file(source)
    start = time.perf_counter()
    with Registry.open(registry_path, create=True, passphrase=passphrase) as reg:
        done = reg.issued_customers(sha, copy_kind(options, then_lock))
    todo = [c for c in customers if c not in done]
    seed_of = dict(zip(customers, seeds, strict=False)) if seeds is not None else None
    n = max(1, min(workers, len(todo)))
    parts = [todo[i::n] for i in range(n)]
    threads = max(1, (os.cpu_count() or 1) // n) if ray_address is None else 1
    shares = [Share(str(source), part, str(dist), str(registry_path), passphrase, options, preprocessing,
                    None if images is None else str(images),
                    None if seed_of is None else [seed_of[c] for c in part], threads,
                    None if signing_key is None else str(signing_key), then_lock) for part in parts if part]
    ray = None if backend == "processes" else _ray(ray_address, required=backend == "ray")
    results = _run(shares, ray, ray_address, registry_path, passphrase, sha, copy_kind(options, then_lock), todo,
                   progress or Silent())
    skipped = [c for c in customers if c in done] + [c for r in results for c in r.skipped]
    issued = [c for r in results for c in r.issued]
    return IssueResult(source, sha, issued, skipped, max((r.setup_seconds for r in results), default=0.0),
                       results[0].notes if results else [], wall_seconds=time.perf_counter() - start,
                       workers=len(shares))


def _run(shares: list[Share], ray: Any, ray_address: str | None, registry_path: str | Path,
         passphrase: str | None, sha: str, kind: str, todo: list[str], progress: Progress) -> list[IssueResult]:
    if not shares:
        return []
    with progress.task(f"issuing {len(todo)} copies ({len(shares)} workers)", total=len(todo)) as task:
        if ray is not None:
            started = not ray.is_initialized()
            if started:
                ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            try:
                remote = ray.remote(num_cpus=shares[0].threads)(issue_share)
                refs = [remote.remote(s) for s in shares]
                _follow(lambda: len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs),
                        registry_path, passphrase, sha, kind, todo, task)
                return list(ray.get(refs))
            finally:
                if started:
                    ray.shutdown()
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch or onnxruntime state forked
        with concurrent.futures.ProcessPoolExecutor(max_workers=len(shares), mp_context=ctx) as pool:
            futures = [pool.submit(issue_share, s) for s in shares]
            _follow(lambda: all(f.done() for f in futures), registry_path, passphrase, sha, kind, todo, task)
            return [f.result() for f in futures]


def _ray(address: str | None, required: bool) -> Any:
    """The ray module, or None (then local processes); a cluster address without Ray is refused."""
    try:
        import ray
    except ImportError:
        if address is not None or required:
            raise BadInputError("--ray-address needs Ray: pip install 'onnxstain[fleet]'") from None
        return None
    return ray


def _follow(finished: Any, registry_path: str | Path, passphrase: str | None, sha: str, kind: str, todo: list[str],
            task: Any) -> None:
    """Advance the progress bar as copies are committed, until ``finished()``."""
    wanted, shown = set(todo), 0
    with Registry.open(registry_path, readonly=True, passphrase=passphrase) as reg:
        while True:
            done = finished()
            count = len(reg.issued_customers(sha, kind) & wanted)
            if count > shown:
                task.advance(count - shown)
                shown = count
            if done:
                return
            time.sleep(POLL_S)
