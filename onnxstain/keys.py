"""Key files (secret, the owner's to keep) and public records (publishable).

A key is a versioned JSON document holding everything verification needs: the host layer and
channel, the detector direction and centre, the margins, the trigger as an 8-bit PNG, the expected
signature, the bound and the hashes of the source and stained models. It is written with
owner-only permissions. Arrays are stored as base64 of little-endian float64 with their shape.

The public record commits to the key without revealing it: ``commitment`` is the SHA-256 of the
key's canonical JSON, which includes a random 256-bit nonce, so the hash cannot be tested against
guessed keys. Publishing the record (with the stained model's SHA-256) before distributing the
model timestamps the claim.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from ._onnx.io import write_bytes_atomic
from ._version import __version__
from .errors import BadKeyError, InternalError, KeyMismatchError
from .fields import F8, FieldError
from .key_schema import (
    KEY_FORMAT,
    KEY_VERSION,
    SCHEMA_VERSION,
    CalibrationSection,
    DetectorSection,
    HostSection,
    KeyBody,
    LockSection,
    ModelSection,
    OcclusionSection,
    ReferencesSection,
    ScoreViewSection,
    ShuffleSection,
    SignatureSection,
    SignatureTrigger,
    TriggerSection,
    WhiteBoxSection,
    decode_png,
)

__all__ = [
    "F8",
    "KEY_FORMAT",
    "KEY_VERSION",
    "RECORD_FORMAT",
    "SCHEMA_VERSION",
    "CalibrationSection",
    "DetectorSection",
    "HostSection",
    "Key",
    "LockSection",
    "ModelSection",
    "OcclusionSection",
    "ReferencesSection",
    "ScoreViewSection",
    "ShuffleSection",
    "SignatureSection",
    "SignatureTrigger",
    "TriggerSection",
    "WhiteBoxSection",
    "decode_png",
    "encode_png",
    "envelope",
    "load_key",
    "png_bytes",
    "public_record_path",
]

RECORD_FORMAT = "onnxstain-public-record"
MAX_KEY_BYTES = 256 * 2**20  # a key holds a few arrays; anything larger is not one of ours


def encode_png(pixels: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8), "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_bytes(data: str) -> bytes:
    import base64

    return base64.b64decode(data)


def envelope(kind: str) -> dict[str, Any]:
    """The fields every new key starts with: format, versions, kind, a fresh nonce, time and tool."""
    return {
        "format": KEY_FORMAT,
        "version": KEY_VERSION,
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "nonce": secrets.token_hex(32),
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool_version": __version__,
    }


@dataclasses.dataclass(frozen=True)
class Key(KeyBody):
    """A stain (or lock) key: the typed sections of :class:`onnxstain.key_schema.KeyBody` and what is done
    with a key (its commitment, public record, saving, the facts a model must match)."""

    @classmethod
    def loaded(cls, body: Any, where: str = "") -> Key:
        """A key from its JSON object, every field checked (one-line :class:`BadKeyError` naming the field)."""
        try:
            key = cls.from_dict(body)
        except FieldError as exc:
            raise BadKeyError(f"{where}{_phrase(exc)}") from None
        except RecursionError:
            raise BadKeyError(f"{where}the key is nested too deeply to be an onnxstain key") from None
        # the commitment is to the document as written (a key from before schema_version keeps its own)
        object.__setattr__(key, "_canonical", _canonical_json(body))
        return key

    def canonical(self) -> bytes:
        raw = self.__dict__.get("_canonical")
        return raw if raw is not None else _canonical_json(self.to_dict())

    @property
    def commitment(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def __getitem__(self, item: str) -> Any:
        """The JSON view of a top-level field (for scripts; the package reads the attributes)."""
        return self.to_dict()[item]

    def array(self, section: str, name: str) -> np.ndarray:
        """An array field by name (for scripts), e.g. ``key.array("detector", "centre")``."""
        value = getattr(getattr(self, section), name)
        if not isinstance(value, F8):
            raise KeyError(f"{section}.{name} is not an array of this key")
        return value.array()

    @property
    def feature_detector(self) -> DetectorSection:
        """The detector section, which every key but a shuffle lock's has."""
        if self.detector is None:
            raise BadKeyError("a shuffle lock's key has no detector")
        return self.detector

    @property
    def feature_calibration(self) -> CalibrationSection:
        """The calibration section, which every key but a shuffle lock's has."""
        if self.calibration is None:
            raise BadKeyError("a shuffle lock's key has no calibration")
        return self.calibration

    def trigger_pixels(self) -> np.ndarray:
        return self.trigger.pixels()

    def detection_layout(self) -> tuple[int, int] | None:
        """A detector's class-logit layout ``(anchors, labels)`` (None: not a detector)."""
        layout = self.model.layout
        return None if layout is None else (int(layout[0]), int(layout[1]))

    def detection_anchors_last(self) -> bool:
        """Whether a detector's raw scores are laid out ``[labels, anchors]`` per sample (YOLOv8's export)."""
        return self.model.label_layout == "anchors_last"

    def detection_scores(self, raw: np.ndarray) -> np.ndarray:
        """A detector's raw scores ``[N, ...]`` as ``[N, anchors, labels]`` (the key's layout)."""
        from .math.detection_agreement import anchor_scores

        layout = self.detection_layout()
        assert layout is not None
        return anchor_scores(raw, layout, self.detection_anchors_last())

    def detection_labels(self) -> tuple[int, bool]:
        """A detector's first label column and whether its label columns are probabilities (else logits)."""
        first = self.model.label_offset
        return (1 if first is None else int(first)), self.model.label_scores == "probabilities"

    def public_record(self) -> dict[str, Any]:
        bound = self.bound.to_dict()
        return {
            "format": RECORD_FORMAT,
            "version": KEY_VERSION,
            "kind": self.kind,
            "commitment": self.commitment,
            "commitment_method": "sha256 of the key's canonical JSON (sorted keys, no spaces), "
                                 "which contains a secret 256-bit nonce",
            "model_sha256": self.model.output_sha256,
            "source_model_sha256": self.model.source_sha256,
            "fpr_bound": {"value": bound.get("value"), "log10": bound.get("log10"), "kind": bound.get("kind")},
            "tool": f"onnxstain {self.tool_version}",
            "created": self.created,
        }

    def checked(self) -> Key:
        """This key as it will be read back: a key the loader would refuse is never written."""
        try:
            return Key.loaded(json.loads(json.dumps(self.to_dict())))
        except BadKeyError as exc:
            raise InternalError(f"internal check failed: {exc}") from None

    def save(self, path: str | Path) -> None:
        self.checked()
        data = json.dumps(self.to_dict(), indent=1, sort_keys=True).encode() + b"\n"
        write_bytes_atomic(path, data, mode=0o600)

    def save_public_record(self, path: str | Path) -> None:
        data = json.dumps(self.public_record(), indent=2, sort_keys=True).encode() + b"\n"
        write_bytes_atomic(path, data, mode=0o644)

    # -- the key's facts against a model (one line each) ------------------------------------------------------
    def check_input_size(self, height: int | None, width: int | None, which: str = "this model") -> None:
        pre = self.preprocessing
        if height and width and (height, width) != (pre.height, pre.width):
            raise KeyMismatchError(f"the key was made for a {pre.height}x{pre.width} input; {which} takes "
                                   f"{height}x{width}")

    def check_channel(self, channels: int, tensor: str) -> None:
        ch = self.white_box.channel
        if ch is not None and ch >= channels:
            raise KeyMismatchError(f"the key's white_box.channel is {ch}; tensor {tensor!r} of this model has "
                                   f"{channels} channel(s)")


def _canonical_json(body: Any) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _phrase(exc: FieldError) -> str:
    return f"the key's {exc.path} {exc.problem}"


def load_key(path: str | Path) -> Key:
    p = Path(path)
    try:
        if p.is_dir():
            raise BadKeyError(f"{p} is a folder, not a key file")
        if p.stat().st_size > MAX_KEY_BYTES:
            raise BadKeyError(f"{p} is too large to be an onnxstain key")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise BadKeyError(f"{p}: no such key file") from None
    except OSError as exc:
        raise BadKeyError(f"cannot read key {p}: {exc.strerror}") from None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise BadKeyError(f"{p} is not an onnxstain key (not JSON)") from None
    if not isinstance(body, dict) or body.get("format") != KEY_FORMAT:
        raise BadKeyError(f"{p} is not an onnxstain key (format field missing or wrong)")
    if body.get("version") != KEY_VERSION:
        raise BadKeyError(f"{p} has key version {body.get('version')!r}; this onnxstain reads {KEY_VERSION}")
    return Key.loaded(body, where=f"{p}: ")


def public_record_path(key_path: str | Path) -> Path:
    p = Path(key_path)
    return p.with_name(p.name + ".public.json")
