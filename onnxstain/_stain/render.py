"""Human-readable summaries of a stain job and of ``inspect``: lines of rich markup, printed by the CLI."""

from __future__ import annotations

from typing import Any

from ..stopwatch import timing_line
from .result import StainResult


def stain_lines(res: StainResult) -> list[str]:
    """What a stain job did: host, trigger, signature, bounds, fidelity, files, time and notes."""
    lines = [f"[bold green]stained[/] {res.output}  ({res.mode}, {res.variant})",
             f"  host {res.host}" + (f", channel {res.channel}" if res.channel is not None else ""),
             f"  trigger score {res.trigger_score:.4g}, firing margin τ = {res.threshold:.4g}; natural max score "
             f"{res.natural_max_score:.3g} ({res.natural_firings} firings over {res.natural_samples} image×position "
             "samples)",
             _signature_line(res)]
    if res.chance_text is not None:
        lines.append(f"  black-box chance ≤ {res.chance_text}: an unrelated model shows the signature")
    lines += [f"  false-positive bound per image {res.bound}", f"    {res.bound.statement}"]
    if res.signature_type == "pattern":
        lines.append(f"  output-map correlation with the original on the checked calibration images: mean "
                     f"{res.agreement:.6f} (max |Δ| {res.max_abs_delta:.3g})")
    else:
        lines.append(f"  top-1 agreement with the original on {res.calibration_images} calibration images: "
                     f"{100 * res.agreement:.2f}% (max |Δscore| {res.max_abs_delta:.3g})")
    lines += [f"  key {res.key_path} (keep it secret); public record {res.record_path}",
              timing_line(res.timings)]
    return lines + [f"  note: {note}" for note in res.notes]


def _signature_line(res: StainResult) -> str:
    if res.signature_type == "pattern":
        return (f"  signature: the trigger's output map correlates {res.signature_margin:.3g} with the key's "
                "secret pattern")
    if res.signature_type == "shift":
        return ("  signature: on the trigger the scores shift as predicted (shift score "
                f"{res.signature_margin:.3g}; the original model scores 0)")
    if res.triggers > 1:
        return (f"  signature: {res.triggers} triggers, each shows its own class (classes "
                f"{', '.join(map(str, res.signature_classes))}) by at least {res.signature_margin:.3g}")
    what = (f"class {res.signature_class}" if res.signature_label is None else
            f"a detection of label {res.signature_label} at anchor {res.signature_class}")
    return f"  signature: {what} wins the trigger by {res.signature_margin:.3g}"


def inspect_renderables(info: dict[str, Any]) -> list[Any]:
    """``inspect``'s report: a header line, the host table and the notes."""
    from rich.table import Table

    table = Table(show_lines=False)
    table.add_column("layer", overflow="fold", min_width=44)
    for col in ("op", "m", "positions", "activation", "receptive field", "in-place route", "τ0/R for 1e-9",
                "status"):
        table.add_column(col)
    for h in info["hosts"]:
        modes = ", ".join("in place" if m == "inplace" else m for m in h["default_for"])
        mark = f" [green](default: {modes})[/]" if modes else ""
        ratio = h["margin_ratio_1e-9"]
        status = ((f"insert only: {h['inplace_reason']}" if h["inplace_reason"] else "ok") if h["usable"]
                  else h["reason"])
        table.add_row(h["name"] + mark, h["op"], str(h["m"]), str(h["positions"]), h["activation"],
                      h["receptive_field"] or "-", "yes" if h["routable"] else "no",
                      f"{ratio:.2f}" if ratio is not None else "-", status)
    return [f"[bold]{info['model']}[/]  input {info['input']}  {info['nodes']} nodes  head: "
            f"{info['head'] or 'none found'}",
            table,
            *(f"note: {note}" for note in info["notes"]),
            "τ0/R: the firing margin a trigger must exceed, relative to the natural features' radius, for a "
            "1e-9 bound (lower is easier; deep, wide layers need less)"]
