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

import base64
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from ._onnx.io import write_bytes_atomic
from .errors import BadKeyError

KEY_FORMAT = "onnxstain-key"
RECORD_FORMAT = "onnxstain-public-record"
KEY_VERSION = 1
SUPPORTED_KEY_VERSIONS = (1,)


def encode_array(a: np.ndarray) -> dict[str, Any]:
    arr = np.ascontiguousarray(np.asarray(a, dtype="<f8"))
    return {"shape": list(arr.shape), "f8": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_array(d: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(d["f8"])
    return np.frombuffer(raw, dtype="<f8").reshape(d["shape"]).copy()


def encode_png(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8), "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(data))) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def png_bytes(data: str) -> bytes:
    return base64.b64decode(data)


@dataclasses.dataclass
class Key:
    """A stain (or lock) key. ``body`` is the versioned JSON content."""

    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    def __getitem__(self, item: str) -> Any:
        return self.body[item]

    def get(self, item: str, default: Any = None) -> Any:
        return self.body.get(item, default)

    def canonical(self) -> bytes:
        return json.dumps(self.body, sort_keys=True, separators=(",", ":")).encode()

    @property
    def commitment(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def array(self, section: str, name: str) -> np.ndarray:
        return decode_array(self.body[section][name])

    def trigger_pixels(self) -> np.ndarray:
        return decode_png(self.body["trigger"]["png"])

    def public_record(self) -> dict[str, Any]:
        bound = self.body.get("bound", {})
        return {
            "format": RECORD_FORMAT,
            "version": KEY_VERSION,
            "kind": self.kind,
            "commitment": self.commitment,
            "commitment_method": "sha256 of the key's canonical JSON (sorted keys, no spaces), "
                                 "which contains a secret 256-bit nonce",
            "model_sha256": self.body["model"]["output_sha256"],
            "source_model_sha256": self.body["model"]["source_sha256"],
            "fpr_bound": {"value": bound.get("value"), "log10": bound.get("log10"), "kind": bound.get("kind")},
            "tool": f"onnxstain {self.body.get('tool_version', '?')}",
            "created": self.body.get("created"),
        }

    def save(self, path: str | Path) -> None:
        data = json.dumps(self.body, indent=1, sort_keys=True).encode() + b"\n"
        write_bytes_atomic(path, data, mode=0o600)

    def save_public_record(self, path: str | Path) -> None:
        data = json.dumps(self.public_record(), indent=2, sort_keys=True).encode() + b"\n"
        write_bytes_atomic(path, data, mode=0o644)


def calibration_section(stats: Any, images: int, radius: float, natural_scores: np.ndarray, natural_firings: int,
                        fpr_target: float) -> dict[str, Any]:
    """The key's ``calibration`` record: the calibration set, its feature statistics (a
    :class:`onnxstain.math.detector.FeatureStats`), the radius R and the detector's natural scores."""
    return {"images": images, "samples": stats.samples, "max_radius": stats.max_radius, "radius": radius,
            "radius_quantiles": stats.radius_quantiles, "natural_max_score": float(np.max(natural_scores)),
            "natural_firings": natural_firings, "fpr_target": fpr_target}


def detection_layout(key: Key) -> tuple[int, int] | None:
    """A detector's class-logit layout ``(anchors, labels)`` as the key records it (None: not a detector)."""
    layout = key["model"].get("layout")
    return None if layout is None else (int(layout[0]), int(layout[1]))


def new_key_body(kind: str) -> dict[str, Any]:
    return {
        "format": KEY_FORMAT,
        "version": KEY_VERSION,
        "kind": kind,
        "nonce": secrets.token_hex(32),
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool_version": __version__,
    }


def load_key(path: str | Path) -> Key:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise BadKeyError(f"{p}: no such key file") from None
    except OSError as exc:
        raise BadKeyError(f"cannot read key {p}: {exc.strerror}") from None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadKeyError(f"{p} is not an onnxstain key (not JSON)") from None
    if not isinstance(body, dict) or body.get("format") != KEY_FORMAT:
        raise BadKeyError(f"{p} is not an onnxstain key (format field missing or wrong)")
    if body.get("version") not in SUPPORTED_KEY_VERSIONS:
        raise BadKeyError(f"{p} has key version {body.get('version')!r}; this onnxstain reads "
                          f"{', '.join(map(str, SUPPORTED_KEY_VERSIONS))}")
    required = ("kind", "model", "host", "detector", "trigger", "preprocessing")
    missing = [k for k in required if k not in body]
    if missing:
        raise BadKeyError(f"{p} is incomplete: missing {', '.join(missing)}")
    return Key(body)


def public_record_path(key_path: str | Path) -> Path:
    p = Path(key_path)
    return p.with_name(p.name + ".public.json")
