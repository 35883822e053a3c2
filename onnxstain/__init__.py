"""onnxstain: stain and lock pre-trained vision models in ONNX files, without retraining.

The stable API::

    import onnxstain
    result = onnxstain.stain("model.onnx", "stained.onnx", "owner.key")
    report = onnxstain.verify("stained.onnx", "owner.key")
    locked = onnxstain.lock("model.onnx", "locked.onnx", "customer.key")
    batch = onnxstain.paste_patch(batch, "customer.key")   # unlock an already preprocessed batch
    onnxstain.quantize("locked.onnx", "locked.int8.onnx", "customer.key")  # int8, the mark kept
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    BadInputError,
    BadKeyError,
    BadModelError,
    KeyMismatchError,
    MarkLostError,
    OnnxStainError,
    UnreachableBoundError,
    UnsupportedModelError,
)
from .preprocess import Preprocessing, PreprocessingRequest

# Names that are also modules of the package load now: importing the module (``onnxstain.verify``) would otherwise
# leave the module where the function belongs.
from .quantize import QuantizeResult, quantize
from .verify import VerifyResult, verify

if TYPE_CHECKING:
    from .api import (
        EvaluateResult,
        Key,
        LockAuditResult,
        LockOptions,
        LockResult,
        Patch,
        PatchedPhoto,
        StainOptions,
        StainResult,
        apply_patch,
        audit_lock,
        evaluate,
        inspect_model,
        load_key,
        lock,
        lock_patch,
        paste_patch,
        stain,
        stain_summary,
    )

_API = frozenset({
    "EvaluateResult", "Key", "LockAuditResult", "LockOptions", "LockResult", "Patch", "PatchedPhoto", "StainOptions",
    "StainResult", "apply_patch", "audit_lock", "evaluate", "inspect_model", "load_key", "lock", "lock_patch",
    "paste_patch", "stain", "stain_summary",
})


def __getattr__(name: str) -> Any:
    """The API's names load on first use (PEP 562): a command that only verifies never imports the stain and lock
    pipelines (``onnxstain verify`` starts in half the time)."""
    if name in _API:
        from . import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'onnxstain' has no attribute {name!r}")


__all__ = [
    "BadInputError",
    "BadKeyError",
    "BadModelError",
    "EvaluateResult",
    "Key",
    "KeyMismatchError",
    "LockAuditResult",
    "LockOptions",
    "LockResult",
    "MarkLostError",
    "OnnxStainError",
    "Patch",
    "PatchedPhoto",
    "Preprocessing",
    "PreprocessingRequest",
    "QuantizeResult",
    "StainOptions",
    "StainResult",
    "UnreachableBoundError",
    "UnsupportedModelError",
    "VerifyResult",
    "__version__",
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
