"""What every pass returns: :class:`PassResult`, the new model and what the pass did to it.

A pass is a function ``(model, key material) -> PassResult``: it never changes its input model, prints
or writes files, and refuses a graph it cannot edit with the node's name (``ValueError`` for a
precondition its caller should have checked, :class:`~onnxstain.errors.UnsupportedModelError` for a
graph the user can change). ``added`` and ``changed`` are read from the two models (:func:`diff`), so
they say what the pass did, not what it meant to do: the in-place passes' checks ask for no added node.
"""

from __future__ import annotations

import dataclasses

import onnx


@dataclasses.dataclass(frozen=True)
class PassResult:
    """The model a pass made, the node names it added and the constant (initializer) names it wrote or
    added; ``signal``: the tensor that is 1 where an inserted detector fires and 0 elsewhere (None for
    passes that only write weights)."""

    model: onnx.ModelProto
    added: tuple[str, ...]
    changed: tuple[str, ...]
    signal: str | None = None


def diff(before: onnx.ModelProto, after: onnx.ModelProto) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(added node names, written initializer names)`` of ``after`` against ``before``, in graph order."""
    old_nodes = {n.name for n in before.graph.node}
    added = tuple(n.name for n in after.graph.node if n.name not in old_nodes)
    old_inits = {t.name: t for t in before.graph.initializer}
    changed = tuple(t.name for t in after.graph.initializer if t.name not in old_inits or t != old_inits[t.name])
    return added, changed


def result(before: onnx.ModelProto, after: onnx.ModelProto, signal: str | None = None) -> PassResult:
    """The :class:`PassResult` of a pass that turned ``before`` into ``after``."""
    added, changed = diff(before, after)
    return PassResult(after, added, changed, signal)
