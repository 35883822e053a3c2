"""Exceptions for the mistakes a user can make. The CLI prints each as one line and exits 2."""

from __future__ import annotations


class OnnxStainError(Exception):
    """Base class: a problem the user can act on (never a bug in onnxstain)."""


class BadModelError(OnnxStainError):
    """The file is not a readable, valid ONNX model."""


class UnsupportedModelError(OnnxStainError):
    """The model is valid but has nothing onnxstain can work with (no host layer, no route...)."""


class BadInputError(OnnxStainError):
    """A bad argument: output path equal to the input, unreadable image folder, bad preprocessing..."""


class BadKeyError(OnnxStainError):
    """The key file is missing, corrupt or of an unknown version."""


class KeyMismatchError(OnnxStainError):
    """The key was made for another model (its host layer or shapes are not in this model)."""


class UnreachableBoundError(OnnxStainError):
    """The requested false-positive target cannot be met with the chosen host layer."""


class MarkLostError(OnnxStainError):
    """A transformation (int8 quantisation) would have removed the model's stain or lock: nothing written."""


class InternalError(Exception):
    """A check of onnxstain's own work failed: a bug, not the user's mistake (deliberately not an
    :class:`OnnxStainError`). The CLI reports it with its own exit code and a "please report" line."""
