"""Which of many keys a model's weights carry: one cosine per key, and the bound that an innocent key matches.

Each key ``k`` drew its detector direction ``v_k`` uniformly on the unit sphere of its host's ``m``-dimensional
feature space, and wrote it into one neuron of the host layer: the neuron's weight row becomes ``g v_k``
(an overwritten neuron) or gains ``g v_k`` (a neuron the detector hides in). So the evidence for key ``k`` in
a suspect model is the cosine between ``v_k`` and

* the suspect's row at the key's channel (overwritten neurons), or
* that row less the original model's row (hidden neurons: the change the stain made).

If the suspect does not carry key ``k`` — the original, another customer's copy, any model made without
``v_k`` — then that vector is fixed independently of ``v_k``, and the cosine is a spherical-cap variable:
``Pr[cos ≥ t] = ½ I_{1−t²}((m−1)/2, ½)`` (:func:`onnxstain.math.bounds.cap_probability`), whatever the vector
is. Where the key chose its channel after drawing ``v`` (the hidden stain's channel is the one whose statistics
hide the edit), the vector depends on ``v`` through that choice: the bound is a union over the layer's ``C``
channels (``C`` times the cap). Over a registry of ``N`` keys the chance that any innocent key reaches ``t`` is
at most ``N`` times that (a union bound; the vectors need not be independent of each other). A genuine copy
scores near 1: int8 rounding or a light fine-tune moves its row a little, and a copy averaged with others keeps
``1/√(colluders)`` of it when they share the channel (1 when they do not).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import bounds

DEFAULT_TARGET = 1e-6  # the cross-key false-match bound over a whole registry


def cosines(vectors: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Row-wise cosine of ``vectors`` ``[N, m]`` with unit ``directions`` ``[N, m]``; 0 for a zero vector (no
    change: no evidence)."""
    vectors = np.asarray(vectors, np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    dots = np.einsum("ij,ij->i", vectors, np.asarray(directions, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    return np.clip(cos, -1.0, 1.0)


def log10_tail(cos: np.ndarray, m: np.ndarray | int) -> np.ndarray:
    """``log10 Pr[cos(u, v) ≥ cos]`` for a fixed ``u`` and ``v`` uniform on S^{m−1}: the p-value of each score."""
    return np.asarray(bounds.log10_cap_probability(np.asarray(cos, np.float64), m), np.float64)


def threshold(m: int, keys: int, target: float = DEFAULT_TARGET) -> float:
    """The smallest cosine ``t`` with ``keys × Pr[cos ≥ t] ≤ target`` for one key's ``m``: above it, an innocent
    key matches with probability at most ``target`` over the whole registry."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"the target must be in (0, 1), not {target}")
    want = np.log10(target) - np.log10(max(keys, 1))
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection: the tail falls monotonically in t
        mid = 0.5 * (lo + hi)
        if float(log10_tail(np.array([mid]), m)[0]) > want:
            lo = mid
        else:
            hi = mid
    return hi


@dataclasses.dataclass(frozen=True)
class Scores:
    """Every key's cosine, its p-value and the registry-wide bound of the best one."""

    cos: np.ndarray  # [N]
    log10_p: np.ndarray  # [N] log10 Pr[an innocent key scores this high]
    keys: int  # N, the union bound's multiplier

    def order(self) -> np.ndarray:
        """Keys from the strongest evidence (smallest p-value) down."""
        return np.argsort(self.log10_p, kind="stable")

    def log10_bound(self, index: int) -> float:
        """log10 of the registry-wide chance that some innocent key scores as well as key ``index``."""
        return min(0.0, float(self.log10_p[index]) + float(np.log10(max(self.keys, 1))))


def score(vectors: np.ndarray, directions: np.ndarray, m: np.ndarray | int,
          choices: np.ndarray | int = 1) -> Scores:
    """The evidence for each key: cosine and p-value, over ``len(vectors)`` keys. ``choices``: how many vectors
    each key's could have been — the hidden stain picks its channel after drawing ``v`` (the one whose
    statistics hide the edit), so its p-value is a union over the layer's channels."""
    cos = cosines(vectors, directions)
    log10_p = np.minimum(0.0, log10_tail(cos, m) + np.log10(np.asarray(choices, np.float64)))
    return Scores(cos=cos, log10_p=log10_p, keys=len(cos))
