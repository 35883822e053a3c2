"""The seed of a key's random choices: the one asked for, or fresh entropy from the operating system.

Every seed is below ``SEED_LIMIT`` = 2^53: a key stores it as a JSON number, and the key schema refuses
integers that float64 (and so many JSON readers) cannot hold exactly. 53 bits are far more than anyone can
enumerate by re-running the search for each seed.
"""

from __future__ import annotations

import secrets

from .errors import BadInputError

SEED_LIMIT = 2**53


def fresh_seed() -> int:
    """53 bits from the operating system's entropy."""
    return secrets.randbelow(SEED_LIMIT)


def draw_seed(seed: int | None) -> int:
    """The job's seed: the one asked for (checked), else a fresh one."""
    if seed is None:
        return fresh_seed()
    check_seed(seed)
    return seed


def check_seed(seed: int | None) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
        raise BadInputError(f"--seed must be a non-negative integer below 2^53, not {seed}")
