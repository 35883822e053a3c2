"""``onnxstain issue`` and ``onnxstain identify``: the command-line layer over :mod:`onnxstain.fleet`.

Registered on the main group by :mod:`onnxstain.cli`. Parsing and printing only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import click

from ..cli_support import (
    EXIT_NEGATIVE,
    EXIT_OK,
    RichProgress,
    handle_errors,
    print_lines,
    provider_option,
    providers_list,
    signer_key_option,
)
from ..outputs import OutputPlan
from .registry_cli import registry_passphrase


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--customers", required=True, type=click.Path(dir_okay=False),
              help="CSV of customer names: the 'customer' column, else the first column.")
@click.option("-o", "--output", "dist", required=True, type=click.Path(file_okay=False),
              help="Folder for the copies (created if missing): <customer>.onnx each. Keys never go there.")
@click.option("--registry", "registry_path", required=True, type=click.Path(dir_okay=False),
              help="The registry database (created if missing, owner-only). It holds every copy's secret key; "
                   "encrypted at rest when ONNXSTAIN_REGISTRY_PASSPHRASE is set.")
@click.option("--images", type=click.Path(file_okay=False),
              help="Calibration images folder (default: the built-in natural photo set).")
@click.option("--lock", "lock_copies", is_flag=True,
              help="Issue locked copies instead: <customer>.locked.onnx, useless without the customer's own patch, "
                   "beside <customer>.locked.key (the customer's key: `onnxstain apply-patch` pastes its patch).")
@click.option("--lock-kind", type=click.Choice(["auto", "gate", "shuffle"]),
              help="With --lock: the kind of lock (`onnxstain lock --kind`; default auto: shuffle where it locks the "
                   "model, else gate); shuffle resists a graph edit, each copy with an order of its own.")
@click.option("--both", "both", is_flag=True,
              help="Stain each copy, then lock it: <customer>.locked.onnx beside <customer>.locked.key, the lock's "
                   "key; the registry keeps both keys (the stain names the customer of a leaked copy).")
@click.option("--fpr", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              help="Target false-positive (stains) or false-unlock (--lock) bound per image; with --both, the "
                   "stain's (its lock keeps 1e-6).  [default: 1e-09 for stains, 1e-06 for locks]")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Parallel workers, each with its share of the cores (Ray when installed, else local processes).")
@click.option("--ray-address", help="Join this Ray cluster (its workers must see the model, the output folder and "
                                    "the registry at the same paths).")
@click.option("--signing-key", type=click.Path(dir_okay=False),
              help="Sign each copy with model-signing and this P-256 PEM private key (<copy>.onnx.sig), and write "
                   "a signed in-toto statement of its key commitment (<copy>.onnx.intoto.json).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write a JSON summary of the run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@provider_option
@handle_errors
def issue(model: str, customers: str, dist: str, registry_path: str, images: str | None, lock_copies: bool,
          lock_kind: Literal["auto", "gate", "shuffle"] | None, both: bool, fpr: float | None, workers: int,
          ray_address: str | None, signing_key: str | None, json_out: str | None, quiet: bool,
          providers: str | None) -> None:
    """Issue one stained copy of MODEL per customer (default stain settings, a fresh secret key each), or with
    --lock one locked copy each (the shuffle lock where it locks the model, else the gate lock; a patch of its
    own each), or with --both one stained copy each, then locked.

    Re-running skips customers that already have a copy, so a killed run is resumed by running it again."""
    from ..api import LockOptions, StainOptions
    from .issue import issue as do_issue
    from .issue import read_customers
    from .registry import Registry

    (OutputPlan().model_input("MODEL", model).input("--customers", customers).input("--images", images, folder=True)
     .input("--signing-key", signing_key).output("--json", json_out).check())
    names = read_customers(customers)
    Path(dist).mkdir(parents=True, exist_ok=True)
    if lock_copies and both:
        raise click.UsageError("--lock and --both exclude each other")
    if lock_kind is not None and not lock_copies:
        raise click.UsageError("--lock-kind goes with --lock (--both locks each stained copy with the gate lock)")
    opts: StainOptions | LockOptions
    if lock_copies:
        opts = LockOptions(kind=lock_kind or "auto", fpr=LockOptions.fpr if fpr is None else fpr,
                           providers=providers_list(providers))
    else:
        opts = StainOptions(fpr=StainOptions.fpr if fpr is None else fpr, providers=providers_list(providers))
    then_lock = LockOptions(kind="gate", providers=opts.providers) if both else None
    progress = RichProgress(not quiet and sys.stderr.isatty())
    if workers > 1 or ray_address:
        from .workers import issue_parallel

        res = issue_parallel(model, names, dist, registry_path, workers=workers, passphrase=registry_passphrase(),
                             ray_address=ray_address, options=opts, images=images, progress=progress,
                             signing_key=signing_key, then_lock=then_lock)
    else:
        with Registry.open(registry_path, create=True, passphrase=registry_passphrase()) as reg:
            res = do_issue(model, names, dist, reg, options=opts, images=images, progress=progress,
                           signing_key=signing_key, then_lock=then_lock)
    per = res.per_copy()
    lines = [f"issued {len(res.issued)} copies into {dist} (registry {registry_path}); skipped {len(res.skipped)} "
             f"already issued; {res.workers} worker(s), {res.wall_seconds:.1f}s"]
    if res.issued:
        lines.append(f"  time: load and calibration {res.setup_seconds:.1f}s once; per copy median "
                     f"{per['median']:.1f}s (min {per['min']:.1f}s, max {per['max']:.1f}s)")
    lines += [f"  note: {n}" for n in res.notes]
    print_lines(lines)
    if json_out:
        from .._onnx.io import write_bytes_atomic

        report = {"format": "onnxstain-issue-report", "version": 1, "source": str(res.source),
                  "source_sha256": res.source_sha256, "setup_seconds": res.setup_seconds, "per_copy_seconds": per,
                  "wall_seconds": res.wall_seconds, "workers": res.workers, "copies_per_hour": res.throughput(),
                  "issued": [{"customer": c.customer, "copy_id": c.copy_id, "path": str(c.path),
                              "model_sha256": c.model_sha256, "seconds": c.seconds} for c in res.issued],
                  "skipped": res.skipped, "notes": res.notes}
        write_bytes_atomic(json_out, json.dumps(report, indent=2).encode() + b"\n")


@click.command()
@click.argument("suspect", type=click.Path(dir_okay=False), required=False)
@click.option("--registry", "registry_path", required=True, type=click.Path(dir_okay=False),
              help="The registry the copies were issued into.")
@click.option("--endpoint", help="Query this HTTP inference endpoint instead of a model file (black box; the "
                                 "protocol: POST a .npy batch of preprocessed inputs, get a .npy of scores; "
                                 "tools/serve_model.py serves one).")
@click.option("--original", type=click.Path(dir_okay=False),
              help="The model the copies were issued from (default: where it was at issue time, if unchanged). "
                   "The white box reads hidden stains as the change from it.")
@click.option("--black-box", is_flag=True, help="Query the model with every key's trigger instead of reading "
                                                "its weights.")
@click.option("--target", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=1e-6,
              show_default=True, help="Name a customer only if the chance that an innocent key of the registry "
                                      "matches as well is at most this.")
@click.option("--query-budget", type=click.IntRange(1), help="Black box: refuse to send more images than this.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write a versioned JSON report.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@signer_key_option
@provider_option
@handle_errors
def identify(suspect: str | None, registry_path: str, endpoint: str | None, original: str | None, black_box: bool,
             target: float, query_budget: int | None, json_out: str | None, quiet: bool, signer_key: str | None,
             providers: str | None) -> None:
    """Which customer's copy SUSPECT (a model file) or --endpoint is. Exit 0: named (with the bound); 1: no
    customer's stain found."""
    from ..math.bounds import format_probability
    from .identify import identify as do_identify
    from .registry import Registry

    plan = OutputPlan().input("--registry", registry_path).input("--original", original)
    if suspect is not None:
        plan.model_input("SUSPECT", suspect)
    plan.input("--signer-key", signer_key).output("--json", json_out).check()
    with Registry.open(registry_path, passphrase=registry_passphrase()) as reg:
        res = do_identify(suspect, reg, original=original, black_box=black_box, target=target,
                          providers=providers_list(providers), query_budget=query_budget,
                          progress=RichProgress(not quiet and sys.stderr.isatty()), signer_key=signer_key,
                          endpoint=endpoint)
    if res.named:
        lines = [f"IDENTIFIED ({res.basis}, {res.keys} keys): " + ", ".join(
            f"{m.customer} (copy {m.copy_id}, score {m.score:.3g})" for m in res.named)]
        if res.bound_log10 is not None:
            lines.append(f"  chance that an innocent key of the registry matches as well: ≤ "
                         f"{format_probability(res.bound_log10)}")
    else:
        best = res.best
        lines = [f"NOT IDENTIFIED ({res.basis}, {res.keys} keys)"
                 + (f": best {best.customer} scores {best.score:.3g}, short of the target" if best else "")]
    if res.runner_up is not None and res.named:
        lines.append(f"  runner-up: {res.runner_up.customer} (score {res.runner_up.score:.3g})")
    lines.append(f"  time {res.seconds:.2f}s" + (f", {res.queries} queries" if res.queries else ""))
    lines += [f"  note: {n}" for n in res.notes]
    print_lines(lines)
    if json_out:
        res.write_json(json_out)
    sys.exit(EXIT_OK if res.named else EXIT_NEGATIVE)


@click.command()
@click.argument("private", type=click.Path(dir_okay=False))
@click.argument("public", type=click.Path(dir_okay=False))
@handle_errors
def keygen(private: str, public: str) -> None:
    """Write a new P-256 signing key pair (PEM): PRIVATE (owner-only) for `issue --signing-key`, PUBLIC for
    `verify`/`identify --signer-key` and model-signing's own verifier."""
    from .signing import generate_key_pair

    OutputPlan().output("PRIVATE", private).output("PUBLIC", public).check()
    generate_key_pair(private, public)
    print_lines([f"wrote {private} (private, 0600) and {public} (public)"])
