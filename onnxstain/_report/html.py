"""The evaluate report as one self-contained HTML page (plots as embedded base64 PNG, no external assets).

The page's parts (CSS, escaping, tags, embedded figures) are :mod:`onnxstain._report.html_parts`'s.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from .._onnx.io import write_bytes_atomic
from ..math.bounds import Bound, format_probability
from .html_parts import CSS, escape, figure, png, tag
from .records import EvaluateResult, Fidelity, TriggerCheck


def _prob(log10: float) -> str:
    return format_probability(log10)


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else -math.inf


def score_histogram_png(res: EvaluateResult) -> str | None:
    """Plot 1: natural detector scores (log count axis), the firing threshold τ and the trigger's scores."""
    d = res.detector
    if d is None:
        return None
    fig = figure(8.0, 3.6)
    ax = fig.add_subplot()
    edges, counts = d.histogram_edges, d.histogram_counts
    centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    widths = [b - a for a, b in itertools.pairwise(edges)]
    ax.bar(centres, counts, width=widths, color="#6b8fbf", edgecolor="none", log=True,
           label=f"natural scores ({d.samples:,} image×position samples)")
    ax.axvline(d.threshold, color="#c0392b", linestyle="--", linewidth=1.6,
               label=f"firing threshold τ = {d.threshold:.3g}")
    trig = res.trigger.modified_scores or []
    for i, s in enumerate(trig):
        ax.axvline(s, color="#e67e22", linewidth=1.0, alpha=0.8,
                   label="trigger, selected positions (modified model)" if i == 0 else None)
    ax.set_xlabel("detector score S = v·(φ − c)")
    ax.set_ylabel("count (log scale)")
    ax.set_ylim(0.5, 40.0 * max(max(counts), 1))  # headroom for the legend above the bars
    ax.set_title("Detector scores on natural images")
    ax.legend(fontsize=8, loc="upper left")
    return png(fig)


def bounds_png(res: EvaluateResult) -> str | None:
    """Plot 2: the bounds and the measured per-image firing rate on a log axis (plotted as log10)."""
    rows: list[tuple[str, float, str]] = [("ball bound (key, worst case inside R)", res.ball_bound.log10, "bound")]
    if res.data_driven_bound is not None:
        rows.append(("data-driven bound (95 %)", res.data_driven_bound.log10, "bound"))
    if res.mixed_bound is not None:
        rows.append(("mixed bound (95 %)", res.mixed_bound.log10, "bound"))
    if res.measured is not None:
        rows.append(("measured rate, 95 % upper bound", _log10(res.measured.upper), "bound"))
        if res.measured.rate > 0:
            rows.append(("measured rate", _log10(res.measured.rate), "measured"))
    finite = [v for _, v, _ in rows if v > -math.inf]
    if not finite:
        return None
    floor = math.floor(min(finite)) - 1
    fig = figure(8.0, 0.55 * len(rows) + 1.3)
    ax = fig.add_subplot()
    labels = [r[0] for r in rows][::-1]
    vals = [max(r[1], floor) for r in rows][::-1]
    colours = ["#1a4d8f" if r[2] == "bound" else "#2e8b2e" for r in rows][::-1]
    ys = list(range(len(rows)))
    ax.barh(ys, [v - floor for v in vals], left=floor, color=colours, height=0.6)
    for y, (_, v, _) in zip(ys, rows[::-1], strict=True):
        ax.text(max(v, floor) + 0.1, y, _prob(v), va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlim(floor, 0.8)
    step = max(1, math.ceil(-floor / 12))
    ticks = list(range(0, floor - 1, -step))[::-1]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"1e{t}" if t else "1" for t in ticks], fontsize=8)
    measured = "" if res.measured is None or res.measured.rate > 0 else "; measured rate 0 (not drawn)"
    ax.set_xlabel(f"probability per image (log scale); blue: bounds, green: measurement{measured}")
    ax.set_title("Bounds vs measured firing rate")
    return png(fig)


def _bound_row(name: str, b: Bound | None) -> str:
    if b is None:
        return ""
    return (f"<tr><th>{tag('bound')}{escape(name)}</th><td class='num'>≤ {escape(_prob(b.log10))}</td>"
            f"<td>{escape(b.kind)}</td><td class='small'>{escape(b.statement)}</td></tr>")


def render(res: EvaluateResult) -> str:
    """The whole report as an HTML string."""
    verdict = "<span class='ok'>STAINED</span>" if res.trigger.stained else "<span class='bad'>NOT STAINED</span>"
    parts = [*_header(res, _summary(res, verdict)), *_detector_part(res), *_bounds_part(res),
             *_fidelity_part(res.fidelity), *_trigger_part(res.trigger, verdict)]
    if res.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in res.notes) + "</ul>")
    t = ", ".join(f"{k} {v:.1f} s" for k, v in res.timings.items())
    parts.append(f"<p class='small'>Time: {escape(t)}.</p></body></html>")
    return "\n".join(p for p in parts if p)


def _summary(res: EvaluateResult, verdict: str) -> list[tuple[str, str]]:
    """The summary table's rows: what was evaluated, the headline measurements, the verdict."""
    d, cov, fid, trig, info = res.detector, res.coverage, res.fidelity, res.trigger, res.images
    summary = [
        ("original", escape(res.original)), ("modified", escape(res.modified)),
        ("stain", escape(f"{res.mode}, {res.variant}; host {res.host} (m = {res.m})")),
        ("images", escape(f"{info.images:,} images = {info.photos} distinct photos × {info.views_per_photo} views; "
                      f"{info.height}×{info.width}; {info.source}")),
    ]
    if d is not None:
        summary += [
            (f"{tag('measured')}natural firings",
             escape(f"{d.firings:,} of {d.samples:,} image×position samples; "
                f"{d.images_firing:,} of {info.images:,} images")),
            (f"{tag('measured')}max natural score",
             escape(f"{d.max_score:.4g} = {d.max_score_over_threshold:.3g} τ (τ = {d.threshold:.4g}), "
                f"on {d.max_score_photo}")),
        ]
    if cov is not None:
        summary += [(f"{tag('measured')}radius coverage",
                     escape(f"{100 * cov.samples_inside:.4g} % of samples and {100 * cov.images_inside:.4g} % of "
                        f"images inside R = {cov.radius:.4g}; max radius {cov.max_radius:.4g} "
                        f"({cov.max_radius_over_r:.3g} R)"))]
    summary += [
        (f"{tag('measured')}output-map correlation", escape(f"mean {fid.agreement:.6f}, min {fid.min_correlation:.6f} "
                                                          f"({fid.differing} images below 0.999)"))
        if fid.metric == "correlation" else
        (f"{tag('measured')}top-1 agreement", escape(f"{100 * fid.agreement:.3f} % ({fid.differing} images differ)")),
        ("trigger", f"{verdict} — signature score {trig.signature_score:.4g} vs threshold "
                    f"{trig.signature_threshold:.4g}; original model {trig.original_signature_score:.4g}"),
    ]
    return summary


def _header(res: EvaluateResult, summary: list[tuple[str, str]]) -> list[str]:
    info = res.images
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>onnxstain evaluate — {escape(res.modified)}</title><style>{CSS}</style></head><body>",
        "<h1>onnxstain evaluate</h1>",
        f"<p class='small'>Key commitment {escape(res.key_commitment)}. "
        f"{tag('bound')} marks upper bounds (with their kind and statement); {tag('measured')} marks "
        "numbers measured on the images below.</p>",
        "<h2>Summary</h2><table>",
        *(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in summary),
        "</table>",
        f"<p class='small'>{escape(info.correlation)}</p>",
    ]
    return parts


def _detector_part(res: EvaluateResult) -> list[str]:
    d, hist = res.detector, score_histogram_png(res)
    parts = ["<h2>Detector on natural images</h2>"]
    if d is None:
        parts.append("<p>The modified model does not contain the detector's input tensor: the white-box measurements "
                     "and the data-driven bounds are not available.</p>")
    else:
        q = ", ".join(f"{k} %: {v:.3g}" for k, v in d.score_quantiles.items())
        parts.append(f"<p class='small'>Score quantiles over all samples — {escape(q)}.</p>")
        if hist:
            parts.append(f"<img alt='histogram of natural detector scores' src='data:image/png;base64,{hist}'>")
    return parts


def _bounds_part(res: EvaluateResult) -> list[str]:
    cov, trig, bplot = res.coverage, res.trigger, bounds_png(res)
    parts = ["<h2>Bounds and measured rate</h2>"]
    if bplot:
        parts.append(f"<img alt='bounds versus measured firing rate' src='data:image/png;base64,{bplot}'>")
    parts.append("<table><tr><th>quantity</th><th>value</th><th>kind</th><th>what it says</th></tr>")
    parts.append(_bound_row("ball bound (from the key)", res.ball_bound))
    parts.append(_bound_row("data-driven bound", res.data_driven_bound))
    parts.append(_bound_row("mixed bound", res.mixed_bound))
    if res.measured is not None:
        m = res.measured
        parts.append(f"<tr><th>{tag('measured')}per-image firing rate</th><td class='num'>{m.firing}/{m.total} = "
                     f"{m.rate:.3g}</td><td>measurement</td><td class='small'>{escape(m.statement)}</td></tr>")
        parts.append(f"<tr><th>{tag('bound')}its 95 % upper bound</th><td class='num'>≤ "
                     f"{escape(_prob(_log10(m.upper)))}"
                     "</td><td>Clopper–Pearson</td><td class='small'>one-sided, exact for independent images</td></tr>")
    pl = res.photo_level
    if pl is not None:
        parts.append(_bound_row(f"photo-level data-driven bound ({pl.photos} photos)", pl.data_driven))
        parts.append(_bound_row("photo-level mixed bound", pl.mixed))
        parts.append(f"<tr><th>{tag('bound')}photo-level 95 % upper bound on the firing rate</th>"
                     f"<td class='num'>≤ {escape(_prob(_log10(pl.measured.upper)))}</td><td>Clopper–Pearson</td>"
                     f"<td class='small'>{escape(pl.measured.statement)}</td></tr>")
    parts.append(_bound_row("cross-key bound (verify)", trig.cross_key_bound))
    parts.append("</table>")
    if pl is not None:
        parts.append(f"<p class='small'>{escape(pl.statement)}</p>")
    if cov is not None:
        rq = ", ".join(f"{k} %: {v:.3g}" for k, v in cov.radius_quantiles.items())
        parts.append(f"<p class='small'>Radii ‖φ − c‖ — {escape(rq)}; {cov.images_outside} images "
                     f"({cov.photos_outside} photos) have a position outside R.</p>")
    return parts


def _fidelity_part(fid: Fidelity) -> list[str]:
    parts: list[str] = []
    if fid.metric == "correlation":
        parts += [
            "<h2>Fidelity (original vs modified, same images)</h2><table>",
            f"<tr><th>images</th><td class='num'>{fid.images:,}</td></tr>",
            f"<tr><th>output-map Pearson correlation, mean / min</th><td class='num'>{fid.agreement:.6f} / "
            f"{fid.min_correlation:.6f}</td></tr>",
            f"<tr><th>maps correlating below 0.999</th><td class='num'>{fid.differing}</td></tr>",
            f"<tr><th>max |Δ|</th><td class='num'>{fid.max_abs_delta:.3g}</td></tr>",
            "</table>",
        ]
    else:
        parts += [
            "<h2>Fidelity (original vs modified, same images)</h2><table>",
            f"<tr><th>images</th><td class='num'>{fid.images:,}</td></tr>",
            f"<tr><th>top-1 agreement</th><td class='num'>{100 * fid.agreement:.4f} %</td></tr>",
            f"<tr><th>images whose top-1 differs</th><td class='num'>{fid.differing} ({fid.differing_fragile} of them "
            "fragile)</td></tr>",
            f"<tr><th>mean KL(softmax(original) ‖ softmax(modified))</th><td class='num'>{fid.mean_kl:.3g} nats "
            f"(max {fid.max_kl:.3g})</td></tr>",
            f"<tr><th>max |Δscore|</th><td class='num'>{fid.max_abs_delta:.3g}</td></tr>",
            f"<tr><th>fragile images (original top-1 margin &lt; {fid.fragile_margin:g})</th>"
            f"<td class='num'>{100 * fid.fragile_fraction:.3g} %</td></tr>",
            "</table>",
        ]
    return parts


def _trigger_part(trig: TriggerCheck, verdict: str) -> list[str]:
    def fmt(scores: list[float] | None) -> str:
        return "n/a" if scores is None else ", ".join(f"{s:.3g}" for s in scores)

    def fires(f: bool | None) -> str:
        return "n/a" if f is None else ("fires at every selected position" if f else "does not fire everywhere")

    return [
        "<h2>Trigger</h2><table>",
        f"<tr><th>firing threshold τ</th><td class='num'>{trig.threshold:.4g}</td></tr>",
        f"<tr><th>detector scores, modified model</th><td class='num'>{escape(fmt(trig.modified_scores))} — "
        f"{escape(fires(trig.modified_fires))}</td></tr>",
        f"<tr><th>detector scores, original model</th><td class='num'>{escape(fmt(trig.original_scores))}</td></tr>",
        f"<tr><th>verify (modified)</th><td>{verdict}: {trig.signature_type} signature score "
        f"{trig.signature_score:.4g}, threshold {trig.signature_threshold:.4g}</td></tr>",
        f"<tr><th>verify (original)</th><td>{'stained' if trig.original_stained else 'not stained'}: score "
        f"{trig.original_signature_score:.4g}</td></tr>",
        *(f"<tr><th>{escape(c['name'])} check</th><td class='small'>"
          f"{'pass' if c['passed'] else ('n/a' if not c['available'] else 'fail')} — {escape(c['detail'])}</td></tr>"
          for c in trig.checks),
        "</table>",
        "<p class='small'>S is computed from the host layer's input φ. Both stain modes leave the layers before the "
        "host unchanged, so the original model gives the same S on the trigger; what it lacks is a neuron that "
        "reads S, and the route to the output.</p>",
    ]


def write_html(res: EvaluateResult, path: str | Path) -> None:
    """The report of ``res`` as one HTML file, written atomically."""
    write_bytes_atomic(path, render(res).encode("utf-8"))
