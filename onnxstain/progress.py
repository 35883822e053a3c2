"""A minimal progress interface: the library reports work, the CLI decides how to show it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol


class Task(Protocol):
    def advance(self, n: float = 1) -> None: ...
    def update(self, description: str) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: float | None) -> contextlib.AbstractContextManager[Task]: ...


class _Silent:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, description: str) -> None:
        pass


class Silent:
    """No output: the default for library calls."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Task]:
        yield _Silent()
