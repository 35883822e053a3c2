"""Compensating a lost classifier feature from the others (numpy only).

A non-additive in-place stain takes one feature ``k`` of the classifier's input away from the
model: on natural inputs it reads 0 instead of its natural value ``p_k``. The classifier can make up
for most of the loss through the features it still has: with a ridge regression
``p_k ≈ β · p + β0`` (``β_k = 0``) fitted on calibration images, adding ``w_k β_j`` to the weight of
every other feature ``j`` and ``w_k β0`` to the bias changes the natural scores by
``w_k (β · p + β0 − p_k)`` — the regression's residual — instead of ``w_k (mean(p_k) − p_k)``.

An additive in-place stain keeps feature ``k`` but changes it: on natural inputs it reads
``p_k + Δ_k(x)``, where ``Δ_k`` (the hidden detector's leak through the activation and the pooling) is
known exactly on the calibration images. The same regression, with ``Δ_k`` as its target
(``Δ_k ≈ β · p + β0``, ``β_k = 0``), is subtracted through the classifier — every other column gets
``− w_k β_j``, the bias ``− w_k β0`` — so natural scores change by ``w_k (Δ_k − β · p − β0)`` instead of
``w_k Δ_k``. In both cases the feature *gains* ``y`` (``−p_k`` when lost, ``Δ_k`` when changed) and the
classifier takes back the regression's prediction ``ŷ``: the scores move by ``w_k (y − ŷ)``.

Everything is solved in the dual (an ``n × n`` system for ``n`` images), so trying many candidate
features with cross-validation stays cheap even when there are more features than images.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict

import numpy as np

RIDGE = 0.1  # λ = RIDGE × the trace of the Gram matrix per feature (0.03–1 measured alike on MobileNetV2)


@dataclasses.dataclass(frozen=True)
class Compensation:
    """``y ≈ weights · p + offset`` (``weights[k] = 0``); ``y`` is ``p_k`` itself unless fitted to a target."""

    feature: int
    weights: np.ndarray
    offset: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weights + self.offset

    def residual(self, features: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
        """Prediction minus the target (``p_k`` by default)."""
        return self.predict(features) - (features[:, self.feature] if target is None else target)


class _DualSolver:
    """Solves ``(G − x_k x_kᵀ + λI) a = y`` for any column ``k`` of the centred features.

    ``G = X Xᵀ`` is factored once (``λ = RIDGE ×`` its mean diagonal per feature); dropping column
    ``k`` is a rank-one update, handled by Sherman–Morrison: each candidate costs ``O(n²)``, and all
    candidates are solved together as matrix products.
    """

    def __init__(self, xc: np.ndarray, ridge: float) -> None:
        self.xc = xc
        gram = xc @ xc.T
        lam = ridge * max(float(np.trace(gram)), 1e-12) / max(xc.shape[1], 1)
        evals, self.q = np.linalg.eigh(gram)
        self.inv = 1.0 / (evals + lam)

    def _apply(self, v: np.ndarray) -> np.ndarray:
        """``(G + λI)⁻¹ v`` for the columns of ``v`` ``[n, C]``."""
        return self.q @ (self.inv[:, None] * (self.q.T @ v))

    def solve(self, k: int, y: np.ndarray) -> np.ndarray:
        return self.solve_each(np.array([k]), np.asarray(y).reshape(-1, 1))[:, 0]

    def solve_each(self, ks: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Column ``i`` of the result solves the system without column ``ks[i]`` for ``ys[:, i]``."""
        cols = self.xc[:, ks]
        my, mc = self._apply(ys), self._apply(cols)
        return my + mc * (np.einsum("ij,ij->j", cols, my) / (1.0 - np.einsum("ij,ij->j", cols, mc)))


def fit(features: np.ndarray, k: int, ridge: float = RIDGE, target: np.ndarray | None = None) -> Compensation:
    """The ridge regression of feature ``k`` (or of ``target`` ``[n]``) on all the features but ``k``,
    over ``features`` ``[n, F]``."""
    x = np.asarray(features, np.float64)
    y = x[:, k] if target is None else np.asarray(target, np.float64).reshape(-1)
    if len(y) != len(x):
        raise ValueError(f"target has {len(y)} values for {len(x)} images")
    solver, mean = _fold_solver(x, _digest(x), np.ones(len(x), bool), ridge)
    a = solver.solve(k, y - y.mean())
    w = solver.xc.T @ a
    w[k] = 0.0
    return Compensation(k, w, float(y.mean() - mean @ w))


@dataclasses.dataclass(frozen=True)
class CrossValidation:
    """Held-out-fold figures per candidate feature (see :func:`cross_validate`)."""

    flips: np.ndarray  # top-1 flips, summed over the folds
    decision_rms: np.ndarray  # RMS change of each image's top-1 − runner-up gap


def cross_validate(features: np.ndarray, scores: np.ndarray, cols: np.ndarray, candidates: np.ndarray,
                   folds: int = 5, ridge: float = RIDGE, changes: np.ndarray | None = None) -> CrossValidation:
    """How the scores move, per candidate feature, when it is lost (or changed) and compensated, over
    ``folds`` held-out folds.

    Folds are contiguous blocks of the images (a natural set ordered photo by photo keeps each
    photo's views together, so a fold tests on photos the fit has not seen). ``cols`` is the
    classifier's ``[classes, features]`` weight matrix and ``scores`` the original scores.
    ``changes`` ``[n, len(candidates)]``: what each candidate feature gains on each image (default
    ``−p_k``: the feature is lost); the regression of that change on the other features is taken
    back through the classifier, so the scores move by ``w_k (y − ŷ)``.

    Flips are few and coarse (on a few hundred images most good candidates have none), so the result
    also holds a smooth figure: the RMS, over the held-out images, of how much each image's gap between
    its top-1 class and its runner-up moves, ``(y − ŷ) (w_k[top] − w_k[runner-up])``. That gap is what a
    near-tie image flips on.
    """
    x = np.asarray(features, np.float64)
    n = len(x)
    cand = np.asarray(candidates, dtype=np.int64)
    y_all = -x[:, cand] if changes is None else np.asarray(changes, np.float64).reshape(n, len(cand))
    fold_of = np.minimum(np.arange(n) * folds // max(n, 1), folds - 1)
    order = np.argsort(-scores, axis=1, kind="stable")  # classes by descending score; ties as argmax breaks them
    cand_cols = cols[:, cand]  # [classes, C]
    gap_cols = cand_cols[order[:, 0]] - cand_cols[order[:, 1]]  # [n, C]: w_k[top] − w_k[runner-up]
    flips = np.zeros(len(cand), dtype=np.int64)
    squares = np.zeros(len(cand))
    tested, digest = 0, _digest(x)
    for f in range(folds):
        train, test = fold_of != f, fold_of == f
        if not test.any() or train.sum() < 2:
            continue
        tested += int(test.sum())
        solver, mean = _fold_solver(x, digest, train, ridge)
        xc, xt = solver.xc, x[test] - mean
        y = y_all[train]
        a = solver.solve_each(cand, y - y.mean(axis=0))  # [n_train, C]
        # prediction on the test fold without feature k: (xt − xt_k ⊗ xc_k) a
        pred = xt @ (xc.T @ a) - xt[:, cand] * np.einsum("ij,ij->j", xc[:, cand], a) + y.mean(axis=0)
        residual = y_all[test] - pred  # [n_test, C]
        squares += np.sum((residual * gap_cols[test]) ** 2, axis=0)
        flips += _flips(scores[test], order[test], residual, cand_cols)
    return CrossValidation(flips, np.sqrt(squares / max(tested, 1)))


def _digest(x: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest()


def _fold_solver(x: np.ndarray, digest: bytes, train: np.ndarray, ridge: float) -> tuple[_DualSolver, np.ndarray]:
    """The factored Gram matrix of ``x``'s ``train`` rows (centred) and their mean, kept for the next call on
    the same features (``digest``: of ``x``): every key of a fleet (:class:`onnxstain._stain.many.Stainer`)
    fits and cross-validates over the same calibration features, and the factorisation is most of the cost."""
    key = (digest, x.shape, np.packbits(train).tobytes(), ridge)
    hit = _SOLVERS.get(key)
    if hit is None:
        mean = x[train].mean(axis=0)
        hit = _SOLVERS[key] = (_DualSolver(x[train] - mean, ridge), mean)
        while len(_SOLVERS) > _SOLVER_CACHE:
            _SOLVERS.popitem(last=False)
    else:
        _SOLVERS.move_to_end(key)
    return hit


_SOLVER_CACHE = 12  # two feature sets: five folds and the whole set each
_SOLVERS: OrderedDict[tuple, tuple[_DualSolver, np.ndarray]] = OrderedDict()


def _flips(scores: np.ndarray, order: np.ndarray, residual: np.ndarray, cand_cols: np.ndarray) -> np.ndarray:
    """Top-1 flips per candidate when the scores move by ``residual[:, c] ⊗ cand_cols[:, c]``.

    A class ``j`` can overtake the top-1 class ``t`` only if its gap ``s_t − s_j`` is below what the move
    can change it by, ``|r| (|w_j| + |w_t|) ≤ 2 max|r| max|w|``; only the classes within that reach of
    each image's top (``order``: classes by descending score, top-1 first) are compared.
    """
    rows = np.arange(len(scores))[:, None]
    gaps = scores[rows, order[:, :1]] - scores[rows, order]  # [n, classes], ascending
    flips = np.zeros(residual.shape[1], dtype=np.int64)
    for j in range(0, residual.shape[1], _FLIP_CHUNK):
        r, w = residual[:, j : j + _FLIP_CHUNK], cand_cols[:, j : j + _FLIP_CHUNK]
        reach = 2.0 * np.abs(r).max(axis=1) * float(np.abs(w).max())
        near = order[:, : max(int((gaps <= reach[:, None]).sum(axis=1).max()), 1)]  # [n, M], top-1 first
        moved = scores[rows, near][:, :, None] + r[:, None, :] * w[near]  # [n, M, chunk]
        flips[j : j + _FLIP_CHUNK] = np.sum(moved.argmax(axis=1) != 0, axis=0)
    return flips


_FLIP_CHUNK = 64  # candidates compared at once
