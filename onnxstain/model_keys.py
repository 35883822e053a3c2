"""One model for many keys: what :class:`onnxstain._stain.many.Stainer` and :class:`onnxstain._lock.many.Locker`
share — the model loaded, checked and calibrated once — and what a fleet reads of it (:mod:`onnxstain.fleet.issue`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ._onnx.io import LoadedModel
from .preprocess import Preprocessing


class ModelJob(Protocol):
    """The model's part of a stain or lock job (``StainJob`` and ``LockJob`` both are one)."""

    loaded: LoadedModel
    pre: Preprocessing
    notes: list[str]


class ModelForKeys:
    """The model a subclass prepared in ``_job``, for as many keys as its own method stains or locks."""

    model: Path
    _job: ModelJob

    @property
    def source_sha256(self) -> str:
        return self._job.loaded.sha256

    @property
    def notes(self) -> list[str]:
        """What loading and calibrating the model noted (each key's result adds its own)."""
        return list(self._job.notes)

    @property
    def preprocessing(self) -> Preprocessing:
        """The model's preprocessing, settled (given, its sidecar file, or from the model's metadata)."""
        return self._job.pre

    def release(self) -> None:
        """Drop what the keys shared and no longer need (nothing, unless a subclass holds sessions)."""

    def __enter__(self) -> ModelForKeys:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
