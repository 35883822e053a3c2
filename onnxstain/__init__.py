"""onnxstain: stain and lock pre-trained vision models in ONNX files, without retraining.

The stable API::

    import onnxstain
    result = onnxstain.stain("model.onnx", "stained.onnx", "owner.key")
    report = onnxstain.verify("stained.onnx", "owner.key")
    locked = onnxstain.lock("model.onnx", "locked.onnx", "customer.key")
    batch = onnxstain.paste_patch(batch, "customer.key")   # unlock an already preprocessed batch
    onnxstain.quantize("locked.onnx", "locked.int8.onnx", "customer.key")  # int8, the mark kept
"""

from ._version import __version__
from .api import (
    EvaluateResult,
    Key,
    LockAuditResult,
    LockOptions,
    LockResult,
    Patch,
    PatchedPhoto,
    QuantizeResult,
    StainOptions,
    StainResult,
    VerifyResult,
    apply_patch,
    audit_lock,
    evaluate,
    inspect_model,
    load_key,
    lock,
    lock_patch,
    paste_patch,
    quantize,
    stain,
    stain_summary,
    verify,
)
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
