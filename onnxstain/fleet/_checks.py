"""What a copy may be: its kinds and states, the checks of a new copy's customer name and hashes, and the
error for a second live copy (shared by :mod:`.registry` and :mod:`.writer`)."""

from __future__ import annotations

import re

from ..errors import BadInputError, OnnxStainError

KINDS = ("stain", "lock", "both")
STATES = ("pending", "issued", "revoked")

_SHA256 = re.compile(r"[0-9a-f]{64}")


class AlreadyIssuedError(OnnxStainError):
    """The customer already has a live (pending or issued) copy of this model and kind: revoke it first."""


def _check_customer(customer: str) -> None:
    """Names must be findable again by :meth:`Registry.get`: an all-digit name would read as a copy id."""
    if (not isinstance(customer, str) or not customer or customer != customer.strip() or customer.isdigit()
            or len(customer) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in customer)):
        raise BadInputError(f"customer name {customer!r}: use 1-200 printable characters, no surrounding spaces, "
                            "not only digits (a number names a copy id)")


def _check_sha(label: str, value: str) -> None:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise BadInputError(f"{label} must be 64 lowercase hex digits, not {value!r}")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise BadInputError(f"copy kind must be one of {', '.join(KINDS)}, not {kind!r}")


def _check_state(state: str | None) -> None:
    if state is not None and state not in STATES:
        raise BadInputError(f"copy state must be one of {', '.join(STATES)}, not {state!r}")
