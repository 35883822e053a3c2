"""The lock audit as one self-contained HTML page (a bar chart as embedded base64 PNG, no external assets)."""

from __future__ import annotations

from . import html_parts as html
from .lock_audit_result import EXACT, KAPPA_LOCKED, LOCKED_MAP, PATCH_COST, SLACK, LockAuditRecord


def agreement_png(res: LockAuditRecord) -> str | None:
    fig = html.figure(8.5, 4.2)
    if fig is None:
        return None
    ax = fig.add_subplot(1, 1, 1)
    names = [c.name for c in res.conditions]
    vals = [100 * c.agreement for c in res.conditions]
    colours = ["#2e7d32" if c.passed else "#c62828" for c in res.conditions]
    ax.barh(names[::-1], vals[::-1], color=colours[::-1])
    dense = res.metric == "correlation"
    if dense:
        ax.axvline(50, color="#555", ls="--", lw=1, label="50 (locked below)")
    elif res.metric == "anchor mAP":
        ax.axvline(100 * LOCKED_MAP, color="#555", ls="--", lw=1, label=f"{100 * LOCKED_MAP:g} (locked at most)")
    elif not res.two_answers:  # two answers are judged by kappa (the table), not by a line on agreement
        ax.axvline(100 * (res.chance + SLACK), color="#555", ls="--", lw=1, label="chance + 2 points (locked)")
    ax.axvline(100 * PATCH_COST, color="#1a4d8f", ls=":", lw=1, label=f"{PATCH_COST:.0%} (patch cost target)")
    ax.axvline(100 * EXACT, color="#000", ls="-.", lw=1, label=f"{EXACT:.1%} (exact)")
    ax.set_xlim(0, 101)
    ax.set_xlabel({"correlation": "mean output-map correlation with the original (×100)",
                   "anchor mAP": "mean per-image anchor-level mAP against the original's detections (×100)"}.get(
                       res.metric, "top-1 agreement with the original (%)"))
    ax.legend(loc="lower right", fontsize=8)
    return html.png(fig)


def render(res: LockAuditRecord) -> str:
    img = agreement_png(res)
    top, left, h, w = res.patch_box
    rows = []
    for c in res.conditions:
        status = '<span class="ok">ok</span>' if c.passed else '<span class="bad">fails</span>'
        centre = "" if c.centre_agreement is None else f"{100 * c.centre_agreement:.2f}%"
        opened = "" if c.unlocked is None else f"{100 * c.unlocked:.1f}% (mean gate {c.mean_gate:.3f})"
        kappa = "" if c.kappa is None else f"<div class='small'>kappa {c.kappa:+.3f}</div>"
        rows.append(f"<tr><td>{html.escape(c.name)}<div class='small'>{html.escape(c.description)}</div></td>"
                    f"<td class='num'>{100 * c.agreement:.2f}%{kappa}</td><td class='num'>{centre}</td>"
                    f"<td class='num'>{opened}</td><td>{html.escape(c.expect)} {status}</td></tr>")
    f = res.firings
    fire = "" if f is None else (
        f"<p>{html.tag('measured')} {f.firings} of {f.samples} clean images put {f.threshold:.0f} or more of the "
        f"shuffled blocks in place (most: {f.max_weakest_score:.0f}).</p>") if f.detectors == 0 else (
        f"<p>{html.tag('measured')} {f.firings} firings over {f.samples} image×position samples of clean images "
        f"({f.detectors} detector(s) that must all fire; weakest-detector maximum {f.max_weakest_score:.4g} "
        f"against the margin τ = {f.threshold:.4g}).</p>")
    dd = "" if res.data_driven_bound is None else (
        f"<p>{html.tag('bound')} data-driven (95 %): {html.escape(res.data_driven_bound)} — "
        f"{html.escape(res.data_driven_bound.statement)}</p>")
    plot = f'<img alt="agreement per condition" src="data:image/png;base64,{img}">' if img else (
        "<p class='small'>matplotlib is not installed: no plot.</p>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in res.notes)
    info = res.images
    what = {"correlation": "agreement is the mean Pearson correlation of output maps (×100)",
            "anchor mAP": "agreement is the mean per-image anchor-level mAP of the detections against the "
                          "original's (×100; images where the original detects nothing are left out)"}.get(
                res.metric, f"{res.classes} classes (chance {100 * res.chance:.2f}%)" + (
                    f"; two answers: 'locked' means |Cohen's kappa| with the original's answers ≤ {KAPPA_LOCKED:g}"
                    if res.two_answers else ""))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>onnxstain lock audit</title>
<style>{html.CSS}</style></head><body>
<h1>Lock audit</h1>
<p class="small">{html.escape(res.locked)} against {html.escape(res.original)} — {html.escape(res.lock_kind)} lock,
{h}×{w} patch at row {top}, column {left}; {what}. Key commitment {html.escape(res.key_commitment)}.</p>
<p class="small">{info.images} images = {info.photos} photos × {info.views_per_photo} views
({res.centre_crops} centre crops); {html.escape(info.source)}. {html.escape(info.correlation)}</p>
<h2>Agreement with the original</h2>{plot}
<table><tr><th>condition</th><th>agreement</th><th>centre crops</th><th>lock opened</th><th>expected</th></tr>
{''.join(rows)}</table>
<h2>False unlocks</h2>{fire}
<p>{html.tag('bound')} per image, from the key: {html.escape(res.key_bound)} —
{html.escape(res.key_bound.statement)}</p>{dd}
<p>{html.tag('measured')} {html.escape(res.measured_statement or '')}</p>
<h2>Notes</h2><ul>{notes or '<li>none</li>'}</ul>
</body></html>
"""
