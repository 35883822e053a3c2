"""Human-readable summaries of ``verify``, ``evaluate`` and the lock audit: lines of rich markup."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..math.bounds import format_probability
from ..stopwatch import timing_line
from .lock_audit import LockAuditResult
from .lock_audit_result import KAPPA_LOCKED
from .records import EvaluateResult

if TYPE_CHECKING:
    from ..quantize import QuantizeResult
    from ..verify import VerifyResult


def verify_lines(res: VerifyResult) -> list[str]:
    """The verdict, the score against its threshold, each check, and the bounds."""
    word = "LOCKED" if res.kind == "lock" else "STAINED"
    verdict = f"[bold green]{word}[/]" if res.stained else f"[bold red]NOT {word}[/]"
    lines = [f"{verdict}  {res.model}  ({res.basis})", f"  score {res.score:.4g}  threshold {res.threshold:.4g}"]
    for c in res.checks:
        state = "pass" if c.passed else ("n/a" if not c.available else "fail")
        margin = f" (margin {c.margin:+.3g})" if c.margin is not None else ""
        lines.append(f"  {c.name}: {state}{margin} — {c.detail}")
    if res.chance_text is not None:
        lines.append(f"  black-box chance ≤ {res.chance_text}: a model that does not depend on the key shows "
                     "every prescribed class")
    what = "false-unlock bound of this lock per image" if res.kind == "lock" else "natural-input bound of this stain"
    lines += [f"  false-positive bound {res.fpr_bound}: {res.fpr_bound.statement}", f"  {what} {res.natural_bound}"]
    return lines + [f"  note: {note}" for note in res.notes]


def _upper(rate_upper: float) -> str:
    return format_probability(math.log10(rate_upper)) if rate_upper > 0 else "0"


def evaluate_lines(res: EvaluateResult) -> list[str]:
    """Images, detector measurements, bounds, fidelity and the trigger's verdict of a stain evaluation."""
    info = res.images
    lines = [f"[bold]evaluate[/] {res.modified}  (against {res.original})",
             f"  images: {info.images} = {info.photos} photos × {info.views_per_photo} views at "
             f"{info.height}x{info.width}; {info.source}",
             f"  note: {info.correlation}"]
    d, cov = res.detector, res.coverage
    if d is not None and cov is not None:
        lines += [f"  measured: {d.firings} firings / {d.samples} image×position samples "
                  f"({d.images_firing} / {info.images} images, {d.photos_firing} / {info.photos} photos)",
                  f"  measured: max natural score {d.max_score:.4g} vs τ = {d.threshold:.4g} "
                  f"({d.max_score_over_threshold:.3g} τ, on {d.max_score_photo})",
                  f"  measured: coverage of R = {cov.radius:.4g}: {100 * cov.samples_inside:.4g}% of samples, "
                  f"{100 * cov.images_inside:.4g}% of images inside; max radius {cov.max_radius:.4g} "
                  f"({cov.max_radius_over_r:.3g} R)"]
    else:
        lines.append("  detector: not measured (the modified model lacks the detector's input tensor)")
    lines.append(f"  bound: ball (key) {res.ball_bound}")
    if res.data_driven_bound is not None:
        lines.append(f"  bound: data-driven (95%) {res.data_driven_bound}")
    if res.mixed_bound is not None:
        lines.append(f"  bound: mixed (95%) {res.mixed_bound}")
    if res.measured is not None:
        m = res.measured
        lines.append(f"  measured: per-image firing rate {m.firing}/{m.total} = {m.rate:.3g}; "
                     f"bound: its 95% upper bound ≤ {_upper(m.upper)} (Clopper-Pearson)")
    if res.photo_level is not None:
        pl = res.photo_level
        lines.append(f"  bound: photo level ({pl.photos} independent photos): data-driven {pl.data_driven}, "
                     f"mixed {pl.mixed}, firing rate ≤ {_upper(pl.measured.upper)}")
    lines += [_fidelity_line(res), *_trigger_lines(res)]
    lines += [f"  note: {note}" for note in res.notes]
    return [*lines, timing_line(res.timings, 1)]


def _fidelity_line(res: EvaluateResult) -> str:
    f = res.fidelity
    if f.metric == "anchor mAP":
        return (f"  measured: detections' anchor-level mAP against the original's, per image: mean "
                f"{f.agreement:.6f}, min {f.min_correlation:.6f} ({f.differing} of {f.images} images with "
                f"detections below 1), max |Δ| {f.max_abs_delta:.3g}")
    if f.metric == "correlation":
        return (f"  measured: output-map correlation with the original mean {f.agreement:.6f}, min "
                f"{f.min_correlation:.6f} ({f.differing} of {f.images} below 0.999), max |Δ| {f.max_abs_delta:.3g}")
    return (f"  measured: top-1 agreement {100 * f.agreement:.3f}% ({f.differing} of {f.images} differ), "
            f"mean KL {f.mean_kl:.3g}, max |Δscore| {f.max_abs_delta:.3g}; "
            f"{100 * f.fragile_fraction:.3g}% fragile (top-1 margin < {f.fragile_margin:g})")


def _trigger_lines(res: EvaluateResult) -> list[str]:
    t = res.trigger
    verdict = "[bold green]STAINED[/]" if t.stained else "[bold red]NOT STAINED[/]"
    lines = []
    if t.modified_scores is not None:
        lines.append(f"  trigger: detector min score {min(t.modified_scores):.4g} at the selected positions vs "
                     f"τ = {t.threshold:.4g} ({'fires' if t.modified_fires else 'does not fire'})")
    lines.append(f"  trigger: {verdict} — signature score {t.signature_score:.4g} vs threshold "
                 f"{t.signature_threshold:.4g} (original model {t.original_signature_score:.4g}); "
                 f"cross-key bound {t.cross_key_bound}")
    return lines


def lock_audit_lines(res: LockAuditResult) -> list[str]:
    """Each audited condition against its expectation, the firings and the false-unlock bounds."""
    info = res.images
    top, left, h, w = res.patch_box
    lines = [f"[bold]lock audit[/] {res.locked}  (against {res.original}; {res.lock_kind} lock, "
             f"{h}x{w} patch at row {top}, col {left})",
             f"  images: {info.images} = {info.photos} photos × {info.views_per_photo} views "
             f"({res.centre_crops} centre crops); {info.source}",
             _agreement_legend(res)]
    for c in res.conditions:
        ok = "[green]ok[/]" if c.passed else "[bold red]FAIL[/]"
        extra = f", centre crops {100 * c.centre_agreement:.2f}%" if c.centre_agreement is not None else ""
        opened = f", lock opened on {100 * c.unlocked:.1f}%" if c.unlocked is not None else ""
        delta = f", max |Δscore| {c.max_abs_delta:.3g}" if c.max_abs_delta is not None else ""
        kappa = f", kappa {c.kappa:+.3f}" if c.kappa is not None else ""
        lines.append(f"  {ok} {c.name:<20} agreement {100 * c.agreement:6.2f}%{kappa}{extra}{opened}{delta}  "
                     f"(expect {c.expect})")
    f = res.firings
    if f is not None and f.detectors == 0:  # a shuffle lock: blocks each clean image's corner puts in place
        lines.append(f"  measured: {f.firings} of {f.samples} clean images put {f.threshold:.0f} or more of the blocks "
                     f"in place (most: {f.max_weakest_score:.0f})")
    elif f is not None:
        lines.append(f"  measured: {f.firings} firings / {f.samples} image×position samples of clean images "
                     f"(weakest-detector max {f.max_weakest_score:.4g} vs τ = {f.threshold:.4g})")
    lines.append(f"  bound: false unlock per image (key) {res.key_bound}")
    if res.data_driven_bound is not None:
        lines.append(f"  bound: data-driven (95%) {res.data_driven_bound}")
    lines += [f"  note: {note}" for note in res.notes]
    return [*lines, timing_line(res.timings, 1)]


def _agreement_legend(res: LockAuditResult) -> str:
    if res.metric == "correlation":
        return "  agreement = mean Pearson correlation of output maps (×100); 'locked' means below 50"
    if res.metric == "anchor mAP":
        return ("  agreement = mean per-image anchor-level mAP of the detections against the original's (×100; "
                "images where the original detects nothing are left out); 'locked' means at most 5")
    if res.two_answers:
        return (f"  two answers (chance {100 * res.chance:.2f}%): 'locked' means |Cohen's kappa| with the original's "
                f"answers ≤ {KAPPA_LOCKED:g} (independent answers; a model answering the opposite has kappa -1 and "
                "is the original relabelled)")
    return f"  chance (1/K) {100 * res.chance:.2f}%; 'locked' means agreement ≤ chance + 2 points"


def quantize_lines(res: QuantizeResult) -> list[str]:
    """How the model was quantised, whether it still carries its mark, and what int8 cost it."""
    how = f"{res.mode} int8, {'per channel' if res.per_channel else 'per tensor'}"
    lines = [f"[bold green]quantised[/] {res.output}  ({how})"]
    if res.calibration_images:
        patched = (f", {res.patched_calibration_images} of them with the lock's patch"
                   if res.patched_calibration_images else
                   f", {res.trigger_calibration_images} of them the stain's triggers"
                   if res.trigger_calibration_images else "")
        lines.append(f"  calibration: {res.calibration_images} images{patched}")
    if res.verified is not None:
        v = res.verified
        word = ("" if v.stained else "NOT ") + ("LOCKED" if v.kind == "lock" else "STAINED")
        lines.append(f"  verify: {word} ({v.basis}; score {v.score:.4g} vs threshold {v.threshold:.4g})")
    else:
        lines.append("  verify: no key given, the mark was not checked")
    lines.append(f"  {res.metric} agreement with the float model on {res.agreement_images} held-out photos"
                 f"{' with the patch' if res.patched else ''}: {100 * res.agreement:.1f}%")
    if res.closed is not None:
        lines.append(f"  without the patch: {100 * res.closed:.1f}% (the lock kept: opened − closed ≥ half the way "
                     "from chance, 50 points on many classes)")
    lines += [f"  note: {note}" for note in res.notes]
    return [*lines, timing_line(res.timings)]
