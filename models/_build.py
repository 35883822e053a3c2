"""Shared plumbing of the corpus recipes: cache paths, atomic writes, build stamps, torch export.

A built model lives in ``$ONNXSTAIN_CACHE/models/<name>/<name>.onnx`` with
``<name>.preprocessing.json`` (read by onnxstain) and ``<name>.build.json`` (what it was built from;
a build whose stamp differs is redone) beside it. Every file is written to a temporary file in the
same folder and moved into place, the model last, so a killed build never leaves a half file that
looks current.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onnxstain.cache import cache_dir
from onnxstain.preprocess import Preprocessing


def model_path(name: str, cache: Path | None = None) -> Path:
    return Path(cache if cache is not None else cache_dir()) / "models" / name / f"{name}.onnx"


def sibling(model: Path, suffix: str) -> Path:
    """``<dir>/<stem><suffix>`` beside ``<dir>/<stem>.onnx``."""
    return model.with_name(model.name.removesuffix(".onnx") + suffix)


def preprocessing_path(model: Path) -> Path:
    return sibling(model, ".preprocessing.json")


def marker_path(model: Path) -> Path:
    return sibling(model, ".build.json")


def file_stamp(path: Path) -> dict[str, object]:
    st = path.stat()
    return {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def up_to_date(model: Path, stamp: dict[str, Any]) -> bool:
    """True when the model, its sidecar and a build marker recording ``stamp`` all exist."""
    marker = marker_path(model)
    if not (model.is_file() and preprocessing_path(model).is_file() and marker.is_file()):
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(recorded.get(k) == v for k, v in stamp.items())


def temp_beside(path: Path) -> Path:
    """A new empty file in ``path``'s folder (same file system, so ``os.replace`` is atomic)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)
    return Path(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = temp_beside(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def publish(
    out: Path,
    write_model: Callable[[Path], dict[str, Any] | None],
    pre: Preprocessing,
    stamp: dict[str, Any],
) -> Path:
    """Write the model with ``write_model(tmp_path)`` (which may return extra stamp fields and may
    raise to reject it), then the sidecar, then the marker; each atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(out)
    try:
        extra = write_model(tmp) or {}
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_text(preprocessing_path(out), json.dumps(pre.to_dict(), indent=2) + "\n")
    marker = {**stamp, **extra, "onnx_sha256": sha256(out)}
    atomic_write_text(marker_path(out), json.dumps(marker, indent=2) + "\n")
    return out


def torch_export(
    model: Any,
    dummy: Any,
    path: Path,
    *,
    dynamo: bool,
    input_name: str,
    output_names: list[str],
    dynamic: dict[int, str] | None = None,
    opset: int = 17,
) -> None:
    """Export ``model`` with the TorchScript exporter (``dynamo=False``, ``dynamic`` axes of the input
    and the batch axis of every output) or the dynamo exporter (``dynamo=True``, weights inside the
    file; ``dynamic`` axes become ``torch.export.Dim``s)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not dynamo:
            axes: dict[str, dict[int, str]] = {}
            if dynamic:
                axes[input_name] = dict(dynamic)
                for o in output_names:
                    axes[o] = {0: dynamic[0]} if 0 in dynamic else {}
            torch.onnx.export(
                model, (dummy,), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=[input_name], output_names=output_names, dynamic_axes=axes or None,
            )
            return
        shapes = None
        if dynamic:
            shapes = ({axis: torch.export.Dim(name, min=1 if axis == 0 else 32, max=4096)
                       for axis, name in dynamic.items()},)
        program = torch.onnx.export(
            model, (dummy,), None, dynamo=True, opset_version=max(opset, 18), external_data=False,
            input_names=[input_name], output_names=output_names, dynamic_shapes=shapes, verbose=False,
        )
        program.save(str(path), external_data=False)


def data_parallel_state(path: Path | None, install: str) -> dict[str, Any]:
    """A torch state dict saved from ``DataParallel`` (every key prefixed ``module.``), without the prefix;
    ``FileNotFoundError`` naming ``install`` when the weights package is missing."""
    import torch

    if path is None:
        raise FileNotFoundError(install)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in state.items()}


def torchscript_recipe(
    name: str,
    weights: Path | None,
    install: str,
    version: int,
    load: Callable[[], Any],
    pre: Preprocessing,
    dummy_shape: tuple[int, ...],
    check_inputs: Callable[[Any], list[Any]],
    *,
    output_names: list[str],
    dynamic: dict[int, str],
    tolerance: float,
    cache: Path | None = None,
    force: bool = False,
) -> Path:
    """Build (or keep, when its stamp matches) the cached model of a recipe that loads torch weights from a
    registry package: the TorchScript export of ``load()`` with input ``input``, checked against torch on
    ``check_inputs(numpy_rng)`` (≤ ``tolerance``), published with ``pre`` as its sidecar. Without ``weights``
    (the package is not installed): ``FileNotFoundError`` naming ``install``."""
    if weights is None:
        raise FileNotFoundError(install)
    out = model_path(name, cache)
    stamp = {"recipe": name, "recipe_version": version, **{f"weights_{k}": v for k, v in file_stamp(weights).items()}}
    if not force and up_to_date(out, stamp):
        return out
    import numpy as np
    import torch

    model = load()

    def write(tmp: Path) -> dict[str, object]:
        torch_export(model, torch.zeros(*dummy_shape), tmp, dynamo=False, input_name="input",
                     output_names=output_names, dynamic=dynamic)
        diff = max_ort_torch_diff(model, tmp, check_inputs(np.random.default_rng(0)))
        if not diff < tolerance:
            raise RuntimeError(f"{name}: onnxruntime differs from torch by {diff:.2e}")
        return {"torch": torch.__version__, "exporter": "torchscript", "max_abs_diff_ort_vs_torch": diff}

    return publish(out, write, pre, stamp)


def recipe_main(argv: list[str] | None, name: str, build: Callable[..., Path]) -> int:
    """``python -m models.<name> [--cache DIR] [--force]``: build and print the model's path."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m models.{name}")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    print(build(name, args.cache, force=args.force))
    return 0


def max_ort_torch_diff(model: Any, path: Path, inputs: list[Any], output: int = 0) -> float:
    """Largest absolute difference between onnxruntime and torch on ``inputs`` (numpy arrays)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 0.0
    for x in inputs:
        got = session.run(None, {name: x})[output]
        with torch.no_grad():
            want = model(torch.from_numpy(x))
        want = want[output] if isinstance(want, tuple | list) else want
        worst = max(worst, float(np.abs(got - want.numpy()).max()))
    return worst
