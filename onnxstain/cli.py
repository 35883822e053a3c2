"""Command line: a thin layer over the public API. Parsing, progress bars and printing only.

Exit codes: 0 success (``verify``: stained), 1 ``verify``: not stained, 2 error (one line
``onnxstain: error: …``: a bad option, file, model, key or image), 3 internal error (a bug: one line
and a "please report" line; the traceback with ``--debug`` or ``ONNXSTAIN_DEBUG=1``); the shared handler,
printer and option groups are in :mod:`onnxstain.cli_support`, the fleet's commands in
:mod:`onnxstain.fleet.commands` and :mod:`onnxstain.fleet.registry_cli`.

Every command first checks its outputs against its inputs and each other
(:class:`onnxstain.outputs.OutputPlan`), then writes all of them as one unit
(:class:`onnxstain.outputs.Artefacts`).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from .cli_support import (
    _PRE_PARAMS,
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_NEGATIVE,
    EXIT_OK,
    RichProgress,
    _Group,
    _LazyRequest,
    _size,
    handle_errors,
    preprocessing_options,
    print_lines,
    provider_option,
    providers_list,
    set_debug,
    signer_key_option,
)
from .errors import InternalError
from .fleet.commands import identify, issue, keygen
from .fleet.registry_cli import registry
from .outputs import Artefacts, OutputPlan
from .seeds import SEED_LIMIT

if TYPE_CHECKING:
    from .keys import Key

__all__ = ["EXIT_ERROR", "EXIT_INTERNAL", "EXIT_NEGATIVE", "EXIT_OK", "_PRE_PARAMS", "_LazyRequest", "main"]

# -- commands ----------------------------------------------------------------------------------------
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxstain")
@click.option("--debug", is_flag=True, help="Print the traceback of an internal error.")
def main(debug: bool) -> None:
    """Stain (watermark) and lock vision models in ONNX files, without retraining."""
    set_debug(debug)


for _command in (issue, identify, registry, keygen):
    main.add_command(_command)


def _write(plan_items: list[tuple[str | None, bytes, int | None]]) -> None:
    """Write side outputs (path, bytes, mode) as one unit."""
    with Artefacts() as out:
        for path, data, mode in plan_items:
            if path:
                out.stage_bytes(path, data, mode=mode)
        out.commit()


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2).encode() + b"\n"


def _written_key(out: Artefacts) -> Key:
    """The key a stain or lock job staged in ``out``."""
    if out.key is None:
        raise InternalError("internal check failed: the job staged no key")
    return out.key


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the host list as JSON.")
@click.option("--size", help="Input size HxW to analyse a model whose height and width are dynamic.")
@handle_errors
def inspect(model: str, json_out: str | None, size: str | None) -> None:
    """List the layers that can host a detector, and the one the tool would pick."""
    from ._stain.render import inspect_renderables
    from .api import inspect_model

    OutputPlan().model_input("MODEL", model).output("--json", json_out).check()
    info = inspect_model(model, _size(size))
    print_lines(inspect_renderables(info))
    if json_out:
        _write([(json_out, _json_bytes(info), None)])


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Stained model path.")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="Secret key file to write (owner-only permissions).")
@click.option("--mode", type=click.Choice(["inplace", "insert"]), default="inplace", show_default=True,
              help="inplace: change weights only; insert: add the detector as new nodes (lossless).")
@click.option("--variant", type=click.Choice(["auto", "non-additive", "additive"]), default="auto",
              show_default=True,
              help="additive: hide the detector in a working neuron no weight statistic singles out; non-additive: "
                   "overwrite a neuron (its classifier column stands out); auto: additive in place on a "
                   "classifier with enough classes (1000 at the default targets) whose route allows it, else "
                   "non-additive, saying why.")
@click.option("--layer", help="Host layer name (see `onnxstain inspect`); default: the tool picks.")
@click.option("--channel", type=int, help="Host channel to use (default: chosen with the calibration data).")
@click.option("--images", type=click.Path(file_okay=False),
              help="Calibration images folder (default: the built-in natural photo set).")
@click.option("--fpr", type=float, default=1e-9, show_default=True,
              help="Target false-positive bound per image.")
@click.option("--chance", type=float,
              help="Target black-box chance that an unrelated model shows the signature (default: the --fpr, "
                   "but not below 2e-3; few-class models take several triggers in --mode insert).")
@click.option("--seed", type=click.IntRange(0, SEED_LIMIT - 1),
              help="Seed of the key's random choices (default: fresh randomness).")
@click.option("--trigger-png", type=click.Path(dir_okay=False), help="Also write the secret trigger as PNG.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write a JSON summary.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@preprocessing_options
@provider_option
@handle_errors
def stain(model, output, key_path, mode, variant, layer, channel, images, fpr, chance, seed, trigger_png, json_out,
          quiet, preprocessing, providers) -> None:
    """Implant a secret detector in MODEL and write the stained model and its key."""
    from ._stain.render import stain_lines
    from .api import StainOptions, stain_summary
    from .api import stain as do_stain
    from .keys import png_bytes

    (OutputPlan().model_input("MODEL", model).input("--images", images, folder=True)
     .input("--preprocessing", preprocessing.file).model_output("-o", output).key_output("--key", key_path)
     .output("--trigger-png", trigger_png).output("--json", json_out).check())
    with Artefacts() as out:
        opts = StainOptions(mode=mode, variant=variant, layer=layer, channel=channel, seed=seed, fpr=fpr,
                            chance=chance, providers=providers_list(providers))
        res = do_stain(model, output, key_path, options=opts, preprocessing=preprocessing.request(), images=images,
                       progress=RichProgress(not quiet and sys.stderr.isatty()), artefacts=out)
        if trigger_png:
            out.stage_bytes(trigger_png, png_bytes(_written_key(out).trigger.png), mode=0o600)
        if json_out:
            out.stage_bytes(json_out, _json_bytes(stain_summary(res)))
        out.commit()
    print_lines(stain_lines(res))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Locked model path.")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="Secret key file to write; it holds the patch (owner-only permissions).")
@click.option("--kind", type=click.Choice(["auto", "gate", "inplace", "shuffle"]), default="auto", show_default=True,
              help="shuffle: a mid-network layer's channels stored out of order, put back by the order of the patch's "
                   "pixels (no gate to bypass, no detector to read the patch from); gate: an inserted gate on the "
                   "classifier's features (any model; a graph edit opens it); inplace: weights only, the signal "
                   "carried through existing channels (costs a few channels); auto: shuffle where it locks the "
                   "model, else gate, saying why.")
@click.option("--layer", help="Where the corner detectors read: 'pixels' (gate default where the model reads a "
                             "float NCHW image: a few raw corner pixels, data-free bound) or an early Conv layer "
                             "(its corner position's receptive field is the patch; in-place default: the tool picks). "
                             "Shuffle: the Conv whose channels are reordered (default: the middle one it can use). "
                             "Needs --kind gate, inplace or shuffle.")
@click.option("--detectors", type=int, default=1, show_default=True,
              help="Independent detectors that must all fire (more: smaller bound for the same patch).")
@click.option("--images", type=click.Path(file_okay=False), help="Calibration images folder.")
@click.option("--fpr", type=float, default=1e-6, show_default=True, help="Target false-unlock bound per image.")
@click.option("--seed", type=click.IntRange(0, SEED_LIMIT - 1), help="Seed of the key's random choices.")
@click.option("--occlusion-steps", type=click.IntRange(0), default=15, show_default=True,
              help="Steps of the occlusion-aware patch refinement (0: keep the plain patch; faster, costs "
                   "more accuracy with the patch).")
@click.option("--patch-png", type=click.Path(dir_okay=False), help="Also write the secret patch as PNG.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@preprocessing_options
@provider_option
@handle_errors
def lock(model, output, key_path, kind, layer, detectors, images, fpr, seed, occlusion_steps, patch_png, quiet,
         preprocessing, providers) -> None:
    """Lock MODEL: useless unless the secret patch sits in the image corner."""
    from ._lock.render import lock_lines
    from .api import LockOptions
    from .api import lock as do_lock
    from .keys import png_bytes

    (OutputPlan().model_input("MODEL", model).input("--images", images, folder=True)
     .input("--preprocessing", preprocessing.file).model_output("-o", output).key_output("--key", key_path)
     .output("--patch-png", patch_png).check())
    with Artefacts() as out:
        opts = LockOptions(kind=kind, layer=layer, detectors=detectors, fpr=fpr, seed=seed,
                           occlusion_steps=occlusion_steps, providers=providers_list(providers))
        res = do_lock(model, output, key_path, options=opts, preprocessing=preprocessing.request(), images=images,
                      progress=RichProgress(not quiet and sys.stderr.isatty()), artefacts=out)
        if patch_png:
            out.stage_bytes(patch_png, png_bytes(_written_key(out).trigger.png), mode=0o600)
        out.commit()
    print_lines(lock_lines(res))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Quantised model path.")
@click.option("--key", "key_path", type=click.Path(dir_okay=False),
              help="The model's stain or lock key: a lock's patch goes into the calibration images, and the "
                   "quantised model is written only if it still carries the mark.")
@click.option("--dynamic", is_flag=True, help="Dynamic int8 (weights only; no calibration images) instead of "
              "static QDQ int8.")
@click.option("--per-tensor", is_flag=True, help="One scale per weight tensor instead of one per channel "
              "(breaks an in-place stain's classifier).")
@click.option("--images", type=click.Path(file_okay=False),
              help="Calibration images folder (default: the built-in natural calibration photos).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write a JSON report.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@preprocessing_options
@provider_option
@handle_errors
def quantize(model, output, key_path, dynamic, per_tensor, images, json_out, quiet, preprocessing,
             providers) -> None:
    """Quantise a stained or locked MODEL to int8 so that its mark and its accuracy survive."""
    from ._report.render import quantize_lines
    from .quantize import quantize as do_quantize

    (OutputPlan().model_input("MODEL", model).input("--key", key_path).input("--images", images, folder=True)
     .input("--preprocessing", preprocessing.file).model_output("-o", output).output("--json", json_out).check())
    with Artefacts() as out:
        res = do_quantize(model, output, key_path, mode="dynamic" if dynamic else "static", per_channel=not per_tensor,
                          images=images, preprocessing=preprocessing.request(), providers=providers_list(providers),
                          progress=RichProgress(not quiet and sys.stderr.isatty()), artefacts=out)
        if json_out:
            out.stage_bytes(json_out, _json_bytes(res.to_dict()))
        out.commit()
    print_lines(quantize_lines(res))


@main.command("apply-patch")
@click.argument("photos", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help="The lock's key.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the patched images (created).")
@click.option("--raw", is_flag=True, help="Keep each photo's own size and solve its pixels so that the recorded "
              "preprocessing (resize, centre crop) brings the patch into place, for pipelines that "
              "preprocess themselves.")
@handle_errors
def apply_patch(photos, key_path, out_dir, raw) -> None:
    """Paste the lock's patch into PHOTOS (PNG output; model input size unless --raw)."""
    from .api import apply_patch as do_apply

    for item in do_apply(photos, key_path, out_dir, raw=raw):
        extra = "" if not raw else f"  (patch error after preprocessing: {item.max_error} grey levels)"
        click.echo(f"{item.path}{extra}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help="The stain's key.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write a versioned JSON report.")
@click.option("--tolerance", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.75, show_default=True,
              help="Share of the detector's designed firing level that weight drift (quantisation, noise) may "
                   "take before the white-box check fails (non-additive stains).")
@click.option("--unlock", type=click.Path(dir_okay=False),
              help="The lock key of a copy that was stained, then locked (issue --both): its patch goes into every "
                   "image the stain's check sends.")
@signer_key_option
@provider_option
@handle_errors
def verify(model: str, key_path: str, json_out: str | None, tolerance: float, unlock: str | None,
           signer_key: str | None, providers: str | None) -> None:
    """Check whether MODEL carries the stain of KEY (exit 0: stained, 1: not stained, 2: error)."""
    from ._report.render import verify_lines
    from .api import verify as do_verify

    (OutputPlan().model_input("MODEL", model).input("--key", key_path).input("--unlock", unlock)
     .input("--signer-key", signer_key).output("--json", json_out).check())
    res = do_verify(model, key_path, providers=providers_list(providers), tolerance=tolerance, signer_key=signer_key,
                    unlock=unlock)
    if json_out:
        _write([(json_out, _json_bytes(res.to_dict()), None)])
    print_lines(verify_lines(res))
    sys.exit(EXIT_OK if res.stained else EXIT_NEGATIVE)


@main.command()
@click.argument("original", type=click.Path(dir_okay=False))
@click.argument("modified", type=click.Path(dir_okay=False))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="The stain's or the lock's key.")
@click.option("--images", type=click.Path(file_okay=False),
              help="Images folder (default: the built-in held-out natural photos).")
@click.option("--views", type=int, default=16, show_default=True,
              help="Views per built-in photo (seeded augmentations; ignored with --images).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write a versioned JSON report.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False),
              help="Write a self-contained HTML report (needs matplotlib).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@provider_option
@handle_errors
def evaluate(original: str, modified: str, key_path: str, images: str | None, views: int, json_out: str | None,
             html_out: str | None, quiet: bool, providers: str | None) -> None:
    """Measure the stain or lock of KEY in MODIFIED on natural images, against ORIGINAL and the bounds.

    With a lock key this is the lock audit: agreement with the original without the patch, with it,
    with wrong patches, and the false-unlock bound.
    """
    from ._report.render import evaluate_lines
    from .api import evaluate as do_evaluate
    from .api import load_key

    (OutputPlan().model_input("ORIGINAL", original).model_input("MODIFIED", modified).input("--key", key_path)
     .input("--images", images, folder=True).output("--json", json_out).output("--html", html_out).check())
    if load_key(key_path).kind == "lock":
        _lock_audit(original, modified, key_path, images, views, json_out, html_out, quiet, providers)
        return
    res = do_evaluate(original, modified, key_path, images=images, views=views, providers=providers_list(providers),
                      progress=RichProgress(not quiet and sys.stderr.isatty()))
    _write_reports(res, json_out, html_out, "_report.html")
    print_lines(evaluate_lines(res))


def _write_reports(res: Any, json_out: str | None, html_out: str | None, renderer: str) -> None:
    """The JSON and HTML reports of an evaluation, rendered first and written as one unit."""
    import importlib

    html = importlib.import_module(f".{renderer}", __package__).render(res).encode("utf-8") if html_out else b""
    _write([(json_out, _json_bytes(res.to_dict()), None), (html_out, html, None)])


def _lock_audit(original: str, locked: str, key_path: str, images: str | None, views: int, json_out: str | None,
                html_out: str | None, quiet: bool, providers: str | None) -> None:
    from ._report.render import lock_audit_lines
    from .api import audit_lock

    res = audit_lock(original, locked, key_path, images=images, views=views, providers=providers_list(providers),
                     progress=RichProgress(not quiet and sys.stderr.isatty()))
    _write_reports(res, json_out, html_out, "_report.lock_html")
    print_lines(lock_audit_lines(res))


if __name__ == "__main__":  # pragma: no cover
    main()
