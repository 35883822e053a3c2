"""``onnxstain registry``: list, show, revoke, export and check the copies a registry records.

None of these commands reads key bytes, so none needs the passphrase of an encrypted registry; ``check``
verifies it when ``ONNXSTAIN_REGISTRY_PASSPHRASE`` is set (a passphrase is never a command-line argument: it
would show in the process list and the shell history). Exit codes as everywhere (:mod:`onnxstain.cli`);
``check`` exits 1 when an issued copy's file is missing or altered.

The shared error handler and printer come from :mod:`onnxstain.cli_support`; :mod:`onnxstain.cli` registers
the group.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from ..cli_support import handle_errors, print_lines
from .registry import STATES, CopyRecord, RecoveryReport, Registry

PASSPHRASE_ENV = "ONNXSTAIN_REGISTRY_PASSPHRASE"


def registry_passphrase() -> str | None:
    """The registry passphrase from the environment (unset or empty: none)."""
    return os.environ.get(PASSPHRASE_ENV) or None


def _write_json(db: str, label: str, path: str, obj: Any) -> None:
    """Write ``obj`` atomically, refusing a path that is the registry (or one of its side files)."""
    from .._onnx.io import write_bytes_atomic
    from ..outputs import OutputPlan

    (OutputPlan().input("DB", db).input("DB's WAL", db + "-wal").input("DB's shared memory", db + "-shm")
     .output(label, path).check())
    write_bytes_atomic(path, json.dumps(obj, indent=2).encode() + b"\n")


def _esc(text: object) -> str:
    from rich.markup import escape

    return escape(str(text))


@click.group("registry", context_settings={"help_option_names": ["-h", "--help"]})
def registry() -> None:
    """Inspect and maintain a registry of issued model copies (one per customer)."""


@registry.command("list")
@click.argument("db", type=click.Path(dir_okay=False))
@click.option("--model-sha", help="Only copies of the source model with this SHA-256.")
@click.option("--state", type=click.Choice(list(STATES)), help="Only copies in this state.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the list as JSON.")
@handle_errors
def list_copies(db: str, model_sha: str | None, state: str | None, json_out: str | None) -> None:
    """List the copies recorded in DB."""
    from rich.table import Table

    with Registry.open(db, readonly=True) as reg:
        recs = reg.copies(source_sha256=model_sha.lower() if model_sha else None, state=state)
    table = Table()
    for col in ("id", "customer", "kind", "state", "model sha", "created"):
        table.add_column(col, overflow="fold")
    for r in recs:
        table.add_row(str(r.id), _esc(r.customer), r.kind, _state(r.state), r.model_sha256[:12], r.created or "")
    print_lines([table, f"{len(recs)} cop{'y' if len(recs) == 1 else 'ies'}"])
    if json_out:
        _write_json(db, "--json", json_out, {"copies": [_fields(r) for r in recs]})


@registry.command()
@click.argument("db", type=click.Path(dir_okay=False))
@click.argument("ref")
@handle_errors
def show(db: str, ref: str) -> None:
    """Show one copy of DB: REF is its id or its customer."""
    with Registry.open(db, readonly=True) as reg:
        rec = reg.get(ref)
    print_lines(_record_lines(rec))


@registry.command()
@click.argument("db", type=click.Path(dir_okay=False))
@click.argument("ref")
@click.option("--reason", required=True, help="Why (recorded with the revocation).")
@handle_errors
def revoke(db: str, ref: str, reason: str) -> None:
    """Revoke a copy (REF: its id or its customer); the customer may then be issued a new one."""
    with Registry.open(db) as reg:
        rec = reg.revoke(ref, reason)
    print_lines([f"[bold]revoked[/] copy {rec.id} ({_esc(rec.customer)}, {rec.kind}) at {rec.revoked}"])


@registry.command()
@click.argument("db", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSON file to write.")
@handle_errors
def export(db: str, output: str) -> None:
    """Write DB's public record as JSON: every copy's fields, no keys."""
    with Registry.open(db, readonly=True) as reg:
        data = reg.export()
    _write_json(db, "-o", output, data)
    print_lines([f"exported {len(data['copies'])} copies to {_esc(output)}"])


@registry.command()
@click.argument("db", type=click.Path(dir_okay=False))
@click.option("--hashes", is_flag=True, help="Also compare every issued file with its recorded SHA-256.")
@handle_errors
def check(db: str, hashes: bool) -> None:
    """Resolve what killed runs left and check every issued copy's file (exit 1: missing or altered)."""
    with Registry.open(db, passphrase=registry_passphrase(), check_files=hashes) as reg:
        report = reg.recovery
        issued = len(reg.copies(state="issued"))
    assert report is not None
    print_lines(_report_lines(report, issued, hashes))
    sys.exit(0 if report.consistent else 1)


# -- rendering -------------------------------------------------------------------------------------------
def _state(state: str) -> str:
    return {"issued": "[green]issued[/]", "pending": "[yellow]pending[/]", "revoked": "[red]revoked[/]"}[state]


def _fields(rec: CopyRecord) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(rec)


def _record_lines(rec: CopyRecord) -> list[str]:
    lines = [f"[bold]copy {rec.id}[/]  {_state(rec.state)}"]
    for name, value in _fields(rec).items():
        if name not in ("id", "state") and value is not None:
            lines.append(f"  {name.replace('_', ' ')}: {_esc(value)}")
    return lines


def _report_lines(report: RecoveryReport, issued: int, hashes: bool) -> list[str]:
    checked = "present and unchanged" if hashes else "present"
    bad = len(report.missing) + len(report.altered)
    lines = [f"[bold green]ok[/] {issued} issued copies, every file {checked}" if not bad else
             f"[bold red]{bad} of {issued} issued copies have a problem[/]"]
    for label, ids in (("finished (killed after its file was placed)", report.finished),
                       ("rolled back (killed before its file was placed)", report.rolled_back),
                       ("MISSING file", report.missing), ("ALTERED file", report.altered)):
        if ids:
            lines.append(f"  {label}: {', '.join(map(str, ids))}")
    for label, paths in (("removed temp file of a killed run", report.removed_temp),
                         ("temp file of no registry writer (left in place)", report.stray_temp)):
        lines += [f"  {label}: {_esc(p)}" for p in paths]
    return lines
