"""onnxruntime sessions: provider choice, feature taps and batched runs.

CUDA is used automatically when ``onnxruntime-gpu`` provides it, the CPU otherwise; ``providers``
narrows the choice by case-insensitive prefix (``["cpu"]``, ``["cuda", "cpu"]``), as Polygraphy does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from ._onnx.tensors import external_folder
from .errors import BadInputError, BadModelError

_ELEM_FLOAT = onnx.TensorProto.FLOAT
_default_threads: int | None = None  # a worker process's share of the cores (set_threads)


def set_threads(threads: int | None) -> None:
    """Cap every later session of this process at ``threads`` intra-op threads (None: onnxruntime's default, all
    cores). Parallel workers on one machine each take their share (:mod:`onnxstain.fleet.workers`)."""
    global _default_threads
    _default_threads = threads


def resolve_providers(wanted: Sequence[str] | None = None) -> list[str]:
    available = ort.get_available_providers()
    if not wanted:
        preferred = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        return preferred or list(available)
    chosen: list[str] = []
    for w in wanted:
        match = [p for p in available if p.lower().startswith(w.lower())]
        if not match:
            raise BadInputError(f"provider {w!r} is not available (have: {', '.join(available)})")
        chosen.extend(p for p in match if p not in chosen)
    return chosen


def session(
    model: onnx.ModelProto | bytes | str,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> ort.InferenceSession:
    ort.set_default_logger_severity(4)  # fatal only: onnxruntime's errors reach the user as exceptions
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    threads = threads or _default_threads
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if isinstance(model, onnx.ModelProto):
        folder = external_folder(model)
        if folder is not None:  # weights left on disk by load_model: tell onnxruntime where
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
            # onnxruntime maps external data into memory; pre-packing would copy every weight
            # (twice, briefly): without it a session of a multi-GB model costs no anonymous memory.
            opts.add_session_config_entry("session.disable_prepacking", "1")
        data = model.SerializeToString()
    else:
        data = model
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=resolve_providers(providers))
    except Exception as exc:  # ORT raises its own exception types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadModelError(f"onnxruntime cannot run the model: {msg[:300]}") from None


def with_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``tensors`` (feature taps)."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    have = {o.name for o in tapped.graph.output}
    for name in tensors:
        if name not in have:
            tapped.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            have.add(name)
    return tapped


def input_name(sess: ort.InferenceSession) -> str:
    return sess.get_inputs()[0].name


def run_batches(
    sess: ort.InferenceSession,
    inputs: np.ndarray,
    outputs: Sequence[str],
    batch: int = 32,
    progress=None,
) -> dict[str, np.ndarray]:
    """Run ``inputs`` through ``sess`` in batches; concatenate each requested output (a name given twice
    is run once)."""
    outputs = list(dict.fromkeys(outputs))
    name = input_name(sess)
    parts: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
    fixed = sess.get_inputs()[0].shape[0]
    step = batch if not isinstance(fixed, int) else fixed
    for start in range(0, len(inputs), step):
        chunk = inputs[start : start + step]
        if isinstance(fixed, int) and len(chunk) != fixed:
            pad = np.repeat(chunk[-1:], fixed - len(chunk), axis=0)
            res = sess.run(list(outputs), {name: np.concatenate([chunk, pad])})
            res = [r[: len(chunk)] for r in res]
        else:
            res = sess.run(list(outputs), {name: chunk})
        for o, r in zip(outputs, res, strict=True):
            parts[o].append(r)
        if progress is not None:
            progress(len(chunk))
    try:
        return {o: np.concatenate(v) if v else np.empty((0,)) for o, v in parts.items()}
    except ValueError:  # rank 0, or another shape per batch: not one row per image
        shapes = {o: sorted({tuple(r.shape) for r in v}) for o, v in parts.items()}
        raise BadModelError(f"the model's outputs do not have one row per image (shapes per batch: {shapes})") from None


def image_rows(scores: np.ndarray, name: str, images: int) -> np.ndarray:
    """An output of ``images`` images as ``[images, K]``: refuse one without a batch axis (one row per image)."""
    if scores.ndim == 0 or scores.shape[0] != images:
        raise BadModelError(f"the model's output {name!r} has shape {list(scores.shape)} for {images} images; "
                            "it needs one row per image")
    return scores.reshape(images, -1)
