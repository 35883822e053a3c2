"""The identification index of an issued copy: the few facts of its key that ``identify`` reads for every
key of a registry (the full keys are read only for the black box's candidates).

Stored in the registry beside the (secret, possibly encrypted) key, so it is as secret as the key: it holds
the detector's direction. Format: one line of JSON (the facts), then the direction as little-endian float32.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from ..errors import BadInputError
from ..keys import Key

INDEX_FORMAT = "onnxstain-index"
INDEX_VERSION = 1


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    """What the white box needs of one stain key."""

    source_sha256: str
    mode: str  # "inplace" | "insert"
    variant: str  # "non-additive" | "additive"
    host: str  # the host node's name
    host_op: str
    m: int  # the detector's dimension (the host's fan-in)
    channel: int | None  # the host's channel the detector lives in (in place), else None
    direction: np.ndarray  # [m], unit
    source_path: str | None = None  # where the original was when the copy was issued (a hint, checked by hash)

    @classmethod
    def of(cls, key: Key, source_path: str | None = None) -> IndexEntry:
        if key.kind != "stain" or key.feature_detector.direction is None:
            raise BadInputError("the identification index holds stain keys (one detector direction)")
        channel = key.host.host_channel if key.mode == "inplace" else None
        return cls(source_sha256=key.model.source_sha256, mode=key.mode, variant=key.variant, host=key.host.name,
                   host_op=key.host.op, m=key.host.m, channel=channel,
                   direction=key.feature_detector.direction.array().astype(np.float64), source_path=source_path)

    def to_bytes(self) -> bytes:
        head = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "source_sha256": self.source_sha256,
                "mode": self.mode, "variant": self.variant, "host": self.host, "host_op": self.host_op, "m": self.m,
                "channel": self.channel, "source_path": self.source_path}
        return json.dumps(head, sort_keys=True).encode() + b"\n" + self.direction.astype("<f4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> IndexEntry:
        line, sep, raw = data.partition(b"\n")
        try:
            head = json.loads(line) if sep else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            head = None
        if not isinstance(head, dict) or head.get("format") != INDEX_FORMAT or head.get("version") != INDEX_VERSION:
            raise BadInputError("a registry row's identification index is not one this onnxstain reads")
        direction = np.frombuffer(raw, dtype="<f4").astype(np.float64)
        if direction.size != head["m"]:
            raise BadInputError(f"a registry row's identification index has {direction.size} values, not {head['m']}")
        return cls(source_sha256=head["source_sha256"], mode=head["mode"], variant=head["variant"], host=head["host"],
                   host_op=head["host_op"], m=int(head["m"]), channel=head["channel"], direction=direction,
                   source_path=head.get("source_path"))
