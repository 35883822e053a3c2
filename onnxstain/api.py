"""The stable public API. Everything else in the package is internal."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._lock.pipeline import LockOptions, LockResult, lock
from ._onnx import head as head_mod
from ._onnx.dense import find_dense_output
from ._onnx.graph import GraphView
from ._onnx.hosts import find_hosts
from ._onnx.inputs import image_input
from ._onnx.io import load_model
from ._report.evaluate import EvaluateResult, evaluate
from ._report.lock_audit import LockAuditResult
from ._stain.dense import choose_dense_host
from ._stain.pipeline import StainOptions, StainResult, choose_host, stain
from .errors import BadInputError, BadKeyError
from .keys import Key, load_key
from .math import bounds
from .outputs import Artefacts, OutputPlan
from .patch import Patch, paste_input, paste_photo, paste_pixels
from .preprocess import Preprocessing
from .quantize import QuantizeResult, quantize
from .verify import VerifyResult, key_patch, verify

__all__ = [
    "EvaluateResult",
    "Key",
    "LockAuditResult",
    "LockOptions",
    "LockResult",
    "Patch",
    "PatchedPhoto",
    "QuantizeResult",
    "StainOptions",
    "StainResult",
    "VerifyResult",
    "apply_patch",
    "audit_lock",
    "evaluate",
    "inspect_model",
    "load_key",
    "lock",
    "lock_patch",
    "paste_patch",
    "quantize",
    "stain",
    "stain_summary",
    "verify",
]


def inspect_model(model: str | Path, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Candidate host layers of ``model`` with their dimensions, routes and the default choice.

    ``size`` (height, width) is the input size to analyse a model with dynamic height and width at
    (default: the recorded preprocessing's, else 224×224).
    """
    from ._onnx.inputs import infer_preprocessing

    loaded = load_model(model)
    info = image_input(loaded.model)
    overrides: dict[str, Any] = {"height": size[0], "width": size[1]} if size else {}
    pre, pre_notes = infer_preprocessing(loaded.model, loaded.path, **overrides)
    view = GraphView(loaded.model, pre.input_shape())
    head = head_mod.find_scores_head(view)
    hosts = find_hosts(loaded.model, view)
    notes: list[str] = [n for n in pre_notes if "input size" in n]
    default = {}
    for mode in ("inplace", "insert"):
        try:
            default[mode] = choose_host(hosts, view, head, mode, None).name if head else None
        except Exception as exc:  # report why, do not fail inspect
            default[mode] = None
            notes.append(f"{mode}: {exc}")
    dense = find_dense_output(view) if head is None else None
    if dense is not None:
        try:
            default["insert"] = choose_dense_host(hosts, None).name
        except Exception as exc:  # report why, do not fail inspect
            notes.append(f"insert: {exc}")
        notes.append(f"dense output {dense.output!r} and no classifier head: stains are inserted (--mode insert) "
                     "with a pattern signature; locks are gate locks (--kind gate)")
    elif head is None:
        notes.append("no classifier head found: stains need a Gemm/MatMul+Add producing the scores")
    elif head.layout is not None:  # a detector
        anchors, width = head.layout
        what = (f"packed output {head.output!r} ({anchors} anchors × {head.first_label} box + "
                f"{width - head.first_label} score columns, {'probabilities' if head.probabilities else 'logits'})"
                if head.first_label == head_mod.PACKED_BOX else
                f"class logits {head.output!r} ({anchors} anchors × {width} labels) beside box outputs")
        notes.append(f"detector: {what}; stains are inserted (--mode insert) and show a prescribed detection; "
                     "locks are shuffle or gate locks")
    from ._lock.auto import default_kind
    from ._lock.window import pixel_conv

    lock = default_kind(view, hosts, head, pre) if head is not None or dense is not None else None
    if lock is not None and lock["kind"] == "shuffle":
        notes.append(f"lock: the default kind makes a shuffle lock here, reordering {lock['layer']!r} in "
                     f"{lock['blocks']} blocks (if that locks the model on the calibration images; else a gate lock)")
    elif lock is not None:
        notes.append(f"lock: the default kind makes a gate lock here ({lock['reason']}; a graph edit opens it)")
    conv = pixel_conv(view, hosts, pre.height, pre.width, pre.channels)
    if conv is not None:
        notes.append(f"gate lock: {conv.name!r} reads the image through per-element ops, so a gate lock's "
                     "detector reads a few raw corner pixels there (--layer pixels; data-free bound)")
    rows = []
    for h in hosts:
        routable = head is not None and head_mod.direct_route(view, h, head)[0] is not None
        rf = h.receptive_field
        rows.append({
            "name": h.name, "op": h.op, "m": h.m, "positions": h.positions, "activation": h.activation,
            "receptive_field": f"{rf.size[0]}x{rf.size[1]}" if rf else None,
            "routable": routable, "usable": h.usable, "reason": h.reason, "depth": h.depth,
            "activation_ops": h.act_label, "zero_point": h.zero_point, "inplace_reason": h.inplace_reason,
            "default": h.name in (default.get("inplace"), default.get("insert")),
            "default_for": [mode for mode in ("inplace", "insert") if default.get(mode) == h.name],
            "out_channels": h.out_channels,
            # margin the trigger must reach, as a fraction of the natural radius, for a 1e-9 bound
            "margin_ratio_1e-9": (bounds.threshold_for_target(1e-9, 1.0, h.m, positions=h.positions, draws=8)
                                  if h.usable else None),
        })
    dynamic = "" if info.height and info.width else f" (dynamic; analysed at {pre.height}x{pre.width})"
    grey = " grey (1 channel: the pixels' luma)" if pre.channel_order == "GRAY" else ""
    shape = f"{info.layout or pre.layout} {info.height or '?'}x{info.width or '?'}{dynamic} {info.dtype}{grey}"
    return {"model": str(loaded.path), "sha256": loaded.sha256, "input": shape,
            "nodes": len(view.graph.node), "head": head.node if head else None, "hosts": rows,
            "default": default, "lock": lock, "notes": notes}


def stain_summary(res: StainResult) -> dict[str, Any]:
    d = dataclasses.asdict(res)
    d["bound"] = res.bound.to_dict()
    for k in ("output", "key_path", "record_path"):
        d[k] = str(d[k])
    return d


def lock_patch(key: Key | str | Path) -> tuple[Patch, Preprocessing]:
    """The patch of a lock key and the preprocessing it was made for."""
    key = key if isinstance(key, Key) else load_key(key)
    if key.kind != "lock":
        raise BadKeyError("this is a stain key; patches belong to lock keys")
    return key_patch(key), key.preprocessing


def paste_patch(batch: np.ndarray, key: Key | str | Path) -> np.ndarray:
    """Paste the lock's patch into an already preprocessed input batch (what the locked model takes)."""
    patch, pre = lock_patch(key)
    return paste_input(batch, patch, pre)


@dataclasses.dataclass(frozen=True)
class PatchedPhoto:
    path: Path
    max_error: int  # largest 0..255 error of the patch once the photo goes through the preprocessing


def apply_patch(photos: Sequence[str | Path], key: Key | str | Path, out_dir: str | Path,
                raw: bool = False) -> list[PatchedPhoto]:
    """Write each photo with the patch as PNG into ``out_dir``.

    Default: the photo is resized and centre-cropped to the model's input as the recorded
    preprocessing does, and the patch is pasted exactly (error 0); feed the PNG to the model as it
    is. ``raw=True`` keeps the photo's own size and changes the pixels that the preprocessing
    (resize the shorter side, centre crop) maps onto the patch, solved so that the preprocessed
    photo carries the patch (:func:`onnxstain.patch.paste_photo`; ``max_error`` says how closely).
    """
    from PIL import Image, UnidentifiedImageError

    out = Path(out_dir)
    sources = [Path(p) for p in photos]
    plan = OutputPlan().input("--key", None if isinstance(key, Key) else key).output("-o", out, folder=True)
    for src in sources:
        plan.input("photo", src)
    for src in sources:
        plan.output(f"the patched copy of {src}", out / (src.stem + ".png"), in_planned_folder=True)
    plan.check()
    patch, pre = lock_patch(key)
    written = []
    with Artefacts() as staged:  # every photo is read and patched before any file lands in out_dir
        staged.make_folder(out)
        for src in sources:
            try:
                with Image.open(src) as img:
                    photo = img.convert("RGB")  # decodes it all: a corrupt file fails here
            except (UnidentifiedImageError, Image.DecompressionBombError):
                raise BadInputError(f"{src} is not a readable image") from None
            except Exception as exc:  # PIL raises assorted errors on a corrupt file
                raise BadInputError(f"{src} is not a readable image ({type(exc).__name__})") from None
            if raw:
                result, err = paste_photo(photo, patch, pre)
            else:
                result, err = Image.fromarray(paste_pixels(pre.fit_photo(photo), patch)), 0
            dest = out / (src.stem + ".png")
            buf = io.BytesIO()
            result.save(buf, format="PNG")
            staged.stage_bytes(dest, buf.getvalue())
            written.append(PatchedPhoto(dest, err))
        staged.commit()
    return written


def audit_lock(original: str | Path, locked: str | Path, key: Key | str | Path,
               images: str | Path | np.ndarray | None = None, views: int = 16,
               providers: list[str] | None = None, progress: Any = None, batch: int = 32) -> LockAuditResult:
    """Lock audit of ``locked`` against ``original`` on natural images (see :mod:`onnxstain._report.lock_audit`)."""
    from ._report.lock_audit import audit_lock as run

    key = key if isinstance(key, Key) else load_key(key)
    return run(original, locked, key, images=images, views=views, providers=providers, progress=progress,
               batch=batch)
