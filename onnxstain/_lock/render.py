"""Human-readable summary of a lock job: lines of rich markup, printed by the CLI."""

from __future__ import annotations

from ..stopwatch import timing_line
from .types import LockResult

# What int8 quantisation does to each kind (tools/attack_suite.py, three models: README "Threat model").
INT8_GATE = ("onnxruntime's dynamic and static (QDQ) quantisers keep this lock, calibrated on clean photos too (each "
             "map of its detector holds its open level); `onnxstain quantize` also checks it before writing")
INT8_PACKED = ("quantise a packed detector with `onnxstain quantize` (static or --dynamic), which keeps the nodes "
               "after its last Conv layers in float and checks the lock before writing: onnxruntime's static "
               "quantiser as it is gives boxes and scores one scale and rounds the scores away (a YOLOv8n's locked "
               "model: 0 % anchor mAP with the patch; with its tail in float 100 %, and 0 % without the patch)")
INT8_INPLACE = ("an in-place lock does not survive int8 quantisation (with the patch it no longer restores the "
                "model); lock with --kind gate to quantise")


INT8_SHUFFLE = ("dynamic int8 keeps this lock as it is; for static int8 use `onnxstain quantize`, which calibrates "
                "with the patch on every image (unpatched, the layers past the reordering see scrambled activations: "
                "onnxruntime's static quantiser calibrated on clean photos kept MobileNetV2's unlocked model at 90 % "
                "of the quantised original, against 99 %); the patch's sort keys lie {gap:.1f} pixel levels apart")


def lock_lines(res: LockResult) -> list[str]:
    """What a lock job did: patch, detectors, bound, what the lock does to the model, files, time, notes."""
    if res.kind == "shuffle":
        return _shuffle_lines(res)
    top, left, h, w = res.patch_box
    lines = [f"[bold green]locked[/] {res.output}  ({res.kind})",
             f"  patch {h}x{w} px at top-left corner (row {top}, col {left}) of the {res.input_hw[0]}x"
             f"{res.input_hw[1]} input",
             f"  host {res.host}, {res.detectors} detector(s) that must all fire; margin τ = {res.threshold:.4g}, "
             f"patch scores {', '.join(f'{s:.3g}' for s in res.trigger_scores)}",
             f"  natural: {res.natural_firings} firings over {res.natural_samples} image×position samples "
             f"(max score {res.natural_max_score:.3g})",
             f"  false-unlock bound per image {res.bound}",
             f"    {res.bound.statement}",
             _effect_line(res)]
    if res.unlocked_agreement < 1.0 and res.metric == "top-1":
        lines.append(f"  unlocked (the lock's signal present), top-1 agreement with the original on the clean "
                     f"calibration images: {100 * res.unlocked_agreement:.2f}% — the conduit channels' cost; "
                     "--kind gate restores the original exactly")
    int8 = INT8_PACKED if res.packed_detector else INT8_GATE if res.kind == "gate" else INT8_INPLACE
    lines += [f"  key {res.key_path} (keep it secret: it holds the patch); public record {res.record_path}",
              "  int8: " + int8, timing_line(res.timings)]
    return lines + [f"  note: {note}" for note in res.notes]


def _effect_line(res: LockResult) -> str:
    if res.metric == "correlation":
        return (f"  locked: mean output-map correlation with the original {res.locked_agreement:.3f}; with the "
                f"patch: bit-identical to the original on the same image, {res.unlocked_agreement:.4f} against "
                "the original on clean images")
    if res.metric == "anchor mAP":
        return (f"  locked: detections' anchor-level mAP against the original's {res.locked_agreement:.3f} on "
                f"{min(res.calibration_images, 64)} calibration images; with the patch: bit-identical to the "
                "original on the same image")
    line = (f"  locked top-1 agreement with the original on {res.calibration_images} calibration images: "
            f"{100 * res.locked_agreement:.2f}% (chance {100 * res.chance:.2f}%)")
    if res.kappa is not None:
        line += (f"; Cohen's kappa {res.kappa:+.3f} (two answers: 0 when the locked answers say nothing of the "
                 "original's, -1 when they are its opposite)")
    return line


def _shuffle_lines(res: LockResult) -> list[str]:
    top, left, h, w = res.patch_box
    lines = [f"[bold green]locked[/] {res.output}  (shuffle)",
             f"  patch {h}x{w} px at top-left corner (row {top}, col {left}) of the {res.input_hw[0]}x"
             f"{res.input_hw[1]} input: its pixels sort into the secret order",
             f"  layer {res.host}: {res.flipped_features} output channels stored in {res.blocks} blocks out of order",
             f"  natural: {res.natural_firings} of {res.natural_samples} calibration images put {res.threshold:.0f} or "
             f"more blocks in place (most: {res.natural_max_score:.0f})",
             f"  false-unlock bound per image {res.bound}",
             f"    {res.bound.statement}",
             _effect_line(res) + ("" if res.metric != "top-1" else "; with the patch: the original's outputs"),
             f"  key {res.key_path} (keep it secret: it holds the patch); public record {res.record_path}",
             "  int8: " + INT8_SHUFFLE.format(gap=res.gap or 0.0), timing_line(res.timings)]
    return lines + [f"  note: {note}" for note in res.notes]
