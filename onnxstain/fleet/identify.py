"""Whose copy is this? Score a suspect model against every key of a registry.

* **White box** (the weights in hand, the default): one pass over the suspect's host layers. For each key, the
  cosine between its detector direction and the suspect's row at the key's channel (an overwritten neuron),
  or that row less the original model's (a neuron the detector hides in: the additive stain, the default on
  1000-class models — it needs the original, which the vendor has). Each cosine has an exact p-value for a
  model that does not carry the key (:mod:`onnxstain.math.identify`); a key is named when ``keys × p`` — the
  chance that any innocent key of the registry scores as well — is at most the target (1e-6). Host layers
  are found by name, else (renamed by an optimiser or a re-export) by their weights' closeness to the
  original's.
* **Black box** (``black_box=True``, or no white box possible): every key's trigger through the suspect in
  batches (one query per trigger), each key's signature read on its own trigger; the keys that pass are then
  verified in full (:func:`onnxstain.verify`: controls, and its cross-key bound). The registry-wide bound is
  the sum of the keys' cross-key bounds: the chance that the copy of another customer shows some key's
  signature because its own detector fires on that key's trigger.

Several keys may be named at once: copies averaged or mixed by colluders carry each colluder's stain.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .._onnx.io import LoadedModel, load_model, sha256_file, write_bytes_atomic
from .._onnx.layer_rows import LayerRows, row_change
from ..errors import BadInputError
from ..keys import Key
from ..math import identify as ident
from ..math.bounds import format_probability
from ..progress import Progress, Silent
from .index import IndexEntry
from .queries import EndpointQueries, ModelQueries, Queries
from .registry import Registry
from .signing import check_signatures

REPORT_FORMAT = "onnxstain-identify-report"
REPORT_VERSION = 1
QUERY_CHUNK = 256  # black box: keys whose triggers are preprocessed and queried at once (~150 MB at 224×224)


@dataclasses.dataclass(frozen=True)
class Match:
    """One key's evidence. ``passed``: the key's own test (white box: its cosine's p-value times the registry's
    keys meets the target; black box: the trigger shows the signature and verify confirms it). ``named``: passed,
    and the registry-wide bound ``log10_bound`` meets the target."""

    copy_id: int
    customer: str
    score: float  # white box: the cosine; black box: the signature's score over its threshold (≥ 1: shown)
    passed: bool
    log10_bound: float  # log10 of the chance that an innocent key of the registry does as well
    named: bool


@dataclasses.dataclass
class IdentifyResult:
    model: str  # the model file, or the endpoint's URL
    model_sha256: str | None  # None for an endpoint
    basis: str  # "white-box" | "black-box"
    keys: int  # keys scored (the union bound's multiplier)
    target_log10: float
    named: list[Match]  # every key whose registry-wide bound meets the target
    best: Match | None
    runner_up: Match | None
    bound_log10: float | None  # registry-wide chance that an innocent key matches as well as the best
    queries: int  # black box: images sent to the model
    notes: list[str]
    seconds: float
    signature: dict[str, Any] | None = None  # the model-signing signature beside the model, if any

    @property
    def identified(self) -> bool:
        return bool(self.named)

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "version": REPORT_VERSION, "model": self.model,
                "model_sha256": self.model_sha256, "identified": self.identified, "basis": self.basis,
                "keys": self.keys, "target": 10.0 ** self.target_log10,
                "named": [dataclasses.asdict(m) for m in self.named],
                "best": dataclasses.asdict(self.best) if self.best else None,
                "runner_up": dataclasses.asdict(self.runner_up) if self.runner_up else None,
                "bound_log10": self.bound_log10, "queries": self.queries, "notes": self.notes,
                "seconds": self.seconds, "signature": self.signature}

    def write_json(self, path: str | Path) -> None:
        write_bytes_atomic(path, json.dumps(self.to_dict(), indent=2).encode() + b"\n")


def identify(suspect: str | Path | None, registry: Registry, *, original: str | Path | None = None,
             black_box: bool = False, target: float = ident.DEFAULT_TARGET, providers: list[str] | None = None,
             query_budget: int | None = None, progress: Progress | None = None,
             signer_key: str | Path | None = None, endpoint: str | None = None) -> IdentifyResult:
    """Which registry copy ``suspect`` (a model file) or ``endpoint`` (an HTTP inference endpoint, black box
    only: :mod:`onnxstain.fleet.queries`) is (see the module docstring); a signature beside a file is reported
    (checked with ``signer_key``)."""
    if (suspect is None) == (endpoint is None):
        raise BadInputError("identify takes a suspect model file or an --endpoint, one of them")
    if not 0.0 < target < 1.0:
        raise BadInputError(f"the target bound must be in (0, 1), not {target}")
    if endpoint is not None:
        return _identify_endpoint(endpoint, registry, target, query_budget, progress)
    assert suspect is not None
    res = _identify(suspect, registry, original, black_box, target, providers, query_budget, progress)
    found = check_signatures(suspect, signer_key)
    if found is not None:
        res.signature = dataclasses.asdict(found)
        res.notes.append(f"signature: {found.detail}")
    return res


def _identify(suspect: str | Path, registry: Registry, original: str | Path | None, black_box: bool, target: float,
              providers: list[str] | None, query_budget: int | None, progress: Progress | None) -> IdentifyResult:
    start = time.perf_counter()
    loaded = load_model(suspect)
    rows = _rows(registry)
    notes: list[str] = []
    if not black_box:
        white = _white_box(loaded, registry, rows, original, notes)
        if white is not None:
            return _result(str(loaded.path), loaded.sha256, "white-box", white, target, 0, notes, start)
        notes.append("white box unavailable (see above): the verdict rests on the black box")
    scored, queries = _black_box(ModelQueries(loaded, providers), registry, rows, query_budget,
                                 progress or Silent(), notes)
    return _result(str(loaded.path), loaded.sha256, "black-box", scored, target, queries, notes, start)


def _identify_endpoint(url: str, registry: Registry, target: float, query_budget: int | None,
                       progress: Progress | None) -> IdentifyResult:
    start = time.perf_counter()
    notes = [f"endpoint {url}: black box only (no weights to read)"]
    scored, queries = _black_box(EndpointQueries(url), registry, _rows(registry), query_budget, progress or Silent(),
                                 notes)
    return _result(url, None, "black-box", scored, target, queries, notes, start)


def _rows(registry: Registry) -> list[tuple[int, str, IndexEntry]]:
    rows = [(cid, cust, IndexEntry.from_bytes(blob)) for cid, cust, blob in registry.index_rows() if blob]
    if not rows:
        raise BadInputError(f"{registry.path} holds no issued stain copies to identify")
    return rows


# -- white box --------------------------------------------------------------------------------------------
def _white_box(loaded: LoadedModel, registry: Registry, rows: list[tuple[int, str, IndexEntry]],
               original: str | Path | None, notes: list[str]) -> list[_Evidence] | None:
    """The cosine and p-value of every key the weights can be read for; None if none can."""
    _check_original(original, rows)
    suspect = LayerRows(loaded.model)
    originals: dict[str, LayerRows | None] = {}
    vectors, directions, dims, choices, who = [], [], [], [], []
    for cid, customer, entry in rows:
        if entry.mode != "inplace" or entry.channel is None:
            continue  # an inserted detector is a new node, not a row of a known layer
        if entry.source_sha256 not in originals:
            originals[entry.source_sha256] = _original_layers(entry, original, notes)
        base = originals[entry.source_sha256]
        rows_s = suspect.rows(entry.host, base)
        if rows_s is None or entry.channel >= len(rows_s) or rows_s.shape[1] != entry.m:
            continue
        if entry.variant == "additive":
            if base is None:
                continue
            rows_o = base.rows(entry.host, None)
            if rows_o is None or rows_o.shape != rows_s.shape:
                continue
            vectors.append(row_change(rows_s[entry.channel], rows_o[entry.channel]))
        else:
            vectors.append(rows_s[entry.channel])
        directions.append(entry.direction)
        dims.append(entry.m)
        choices.append(len(rows_s) if entry.variant == "additive" else 1)  # the hidden channel is chosen after v
        who.append((cid, customer))
    skipped = len(rows) - len(who)
    if not who:
        notes.append(f"none of the {len(rows)} keys' host layers could be read in this model")
        return None
    if skipped:
        notes.append(f"{skipped} of {len(rows)} keys could not be read from the weights (inserted detectors, a "
                     "host layer not in this model, or a hidden detector without the original model)")
    scores = ident.score(np.stack(vectors), np.stack(directions), np.asarray(dims), np.asarray(choices))
    return [_Evidence(cid, cust, float(c), scores.log10_bound(i)) for i, (cid, cust), c in
            zip(range(len(who)), who, scores.cos, strict=True)]


def _check_original(original: str | Path | None, rows: list[tuple[int, str, IndexEntry]]) -> None:
    """A given original must be the model some of the registry's copies were issued from."""
    if original is None:
        return
    p = Path(original)
    if not p.is_file():
        raise BadInputError(f"{p}: no such original model")
    sources = {entry.source_sha256 for _, _, entry in rows}
    if sha256_file(p) not in sources:
        raise BadInputError(f"{p} is not the model these copies were issued from (SHA-256 "
                            f"{', '.join(s[:12] + '…' for s in sorted(sources))} expected)")


def _original_layers(entry: IndexEntry, original: str | Path | None, notes: list[str]) -> LayerRows | None:
    """The original this key's copy was issued from: ``original`` if it is that model (a registry may hold copies
    of several), else the path recorded at issue time if the file there still has its hash."""
    for path, given in ((original, True), (entry.source_path, False)):
        if path is None or not Path(path).is_file():
            continue
        if sha256_file(path) != entry.source_sha256:
            if not given:
                notes.append(f"the original recorded at issue time ({path}) has changed; pass --original")
            continue
        return LayerRows(load_model(path).model)
    notes.append("the original model is not at hand (--original): hidden (additive) stains are read from the "
                 "black box")
    return None


# -- black box --------------------------------------------------------------------------------------------
def _black_box(suspect: Queries, registry: Registry, rows: list[tuple[int, str, IndexEntry]],
               budget: int | None, progress: Progress, notes: list[str]) -> tuple[list[_Evidence], int]:
    """Screen every key on its own trigger(s), then confirm the keys that pass (a model file: ``verify``; an
    endpoint: the signature again with verify's controls made from the trigger, through the endpoint). The bound
    of a key that passes is the registry-wide cross-key bound (the sum of every key's)."""
    from ..patch import paste_pixels
    from ..verify import cross_key_bound, key_patch, key_triggers, screen_triggers

    keys = [(cid, cust, Key.loaded(json.loads(registry.key_bytes(cid)))) for cid, cust, _ in rows]
    # a stained-then-locked copy (issue --both) computes as the stained one only with its customer's patch: that
    # customer's trigger goes with it
    locks = {cid: Key.loaded(json.loads(b)) for cid, _, _ in rows if (b := registry.lock_key_bytes(cid)) is not None}

    def triggers_of(i: int) -> np.ndarray:
        cid, _, key = keys[i]
        return key_triggers(key) if cid not in locks else paste_pixels(key_triggers(key), key_patch(locks[cid]))

    counts = [_trigger_count(k) for _, _, k in keys]
    queries = sum(counts)
    if budget is not None and queries > budget:
        raise BadInputError(f"the registry's {len(keys)} keys need {queries} queries; the budget is {budget}")
    raw: dict[int, np.ndarray] = {}
    # keys of one model share a preprocessing: one batched run per distinct preprocessing
    by_pre: dict[str, list[int]] = {}
    for i, (_, _, k) in enumerate(keys):
        by_pre.setdefault(json.dumps(k.preprocessing.to_dict(), sort_keys=True), []).append(i)
    with progress.task("black box: the keys' triggers", total=queries) as task:
        for members in by_pre.values():
            key0 = keys[members[0]][2]
            # a chunk of keys at a time: 10,000 keys' triggers as float32 model inputs would take gigabytes
            for start in range(0, len(members), QUERY_CHUNK):
                chunk = members[start:start + QUERY_CHUNK]
                got = suspect.scores(key0.preprocessing.to_input(np.concatenate([triggers_of(i) for i in chunk])),
                                     key0.model.scores, task.advance)
                at = 0
                for i in chunk:
                    raw[i] = got[at:at + counts[i]]
                    at += counts[i]
    scored = []
    for i, (cid, cust, k) in enumerate(keys):
        ratio, passed = screen_triggers(k, raw[i])
        if passed:
            passed = suspect.confirm(k, locks.get(cid))
            queries += suspect.confirm_queries
            if not passed:
                notes.append(f"customer {cust!r}: the trigger shows the signature but the confirmation (controls, "
                             "drift, weights) does not")
        scored.append((cid, cust, ratio, cross_key_bound(k).log10, passed))
    total = min(0.0, float(np.log10(sum(10.0 ** s[3] for s in scored))))
    notes.append(f"black box: {queries} queries; registry-wide cross-key bound {format_probability(total)} (the "
                 "chance that another customer's copy shows some key's signature)")
    return [_Evidence(cid, cust, ratio, total if passed else 0.0, passed)
            for cid, cust, ratio, _, passed in scored], queries


def _trigger_count(key: Key) -> int:
    """How many trigger images a stain key's signature has (one, or one per class of a multi-class one)."""
    sig = key.signature
    assert sig is not None  # a stain key has one (checked on load)
    return len(sig.triggers or ()) if sig.kind == "multi-class" else 1


# -- the result -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Evidence:
    copy_id: int
    customer: str
    score: float
    log10_bound: float  # registry-wide
    passed: bool | None = None  # black box: its own test; white box (None): the bound decides


def _result(model: str, sha256: str | None, basis: str, scored: list[_Evidence], target: float, queries: int,
            notes: list[str], start: float) -> IdentifyResult:
    log10_target = float(np.log10(target))

    def match(e: _Evidence) -> Match:
        meets = e.log10_bound <= log10_target
        passed = meets if e.passed is None else e.passed
        return Match(copy_id=e.copy_id, customer=e.customer, score=e.score, passed=passed,
                     log10_bound=e.log10_bound, named=passed and meets)

    matches = sorted((match(e) for e in scored), key=lambda m: (not m.passed, m.log10_bound, -m.score))
    shown = [m for m in matches if m.passed and not m.named]
    if shown:
        notes.append(f"{', '.join(m.customer for m in shown)}: the key's test passes, but the registry-wide bound "
                     f"{format_probability(shown[0].log10_bound)} is above the target {target:g}: not named")
    best = matches[0] if matches else None
    return IdentifyResult(
        model=model, model_sha256=sha256, basis=basis, keys=len(scored), target_log10=log10_target,
        named=[m for m in matches if m.named], best=best, runner_up=matches[1] if len(matches) > 1 else None,
        bound_log10=None if best is None else best.log10_bound, queries=queries, notes=notes,
        seconds=time.perf_counter() - start)
