"""Compensating a lost classifier feature from the others (onnxstain.math.compensation)."""

from __future__ import annotations

import numpy as np

from onnxstain.math import compensation


def _features(n: int = 300, f: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative features where feature 3 is (nearly) a linear function of features 0..9, and a
    classifier ``[12, f]`` that leans on feature 3."""
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 1.0, (n, f))
    mix = rng.normal(0, 0.5, 10)
    mix[3] = 0.0
    x[:, 3] = x[:, :10] @ mix + 0.05 * rng.normal(size=n) + 2.0
    cols = rng.normal(0, 1, (12, f))
    cols[:, 3] *= 6.0
    return x, cols


def test_fit_matches_the_primal_ridge_solution():
    x, _ = _features()
    k = 3
    comp = compensation.fit(x, k, ridge=0.1)
    assert comp.feature == k and comp.weights[k] == 0.0
    others = np.delete(x, k, axis=1)
    xc = others - others.mean(axis=0)
    full = x - x.mean(axis=0)
    lam = 0.1 * np.trace(full @ full.T) / x.shape[1]  # ridge × the Gram trace per feature
    beta = np.linalg.solve(xc.T @ xc + lam * np.eye(xc.shape[1]), xc.T @ (x[:, k] - x[:, k].mean()))
    np.testing.assert_allclose(np.delete(comp.weights, k), beta, rtol=1e-8, atol=1e-10)
    # the fitted residual is much smaller than the feature's own spread
    assert comp.residual(x).std() < 0.2 * x[:, k].std()
    np.testing.assert_allclose(comp.residual(x).mean(), 0.0, atol=1e-9)


def test_compensation_beats_the_mean_on_unseen_images():
    x, cols = _features(seed=1)
    scores = x @ cols.T
    train, test = slice(0, 200), slice(200, 300)
    comp = compensation.fit(x[train], 3)
    base = scores[test].argmax(1)
    lost_mean = scores[test] + np.outer(x[train, 3].mean() - x[test, 3], cols[:, 3])
    lost_comp = scores[test] + np.outer(comp.residual(x[test]), cols[:, 3])
    flips_mean = int(np.sum(lost_mean.argmax(1) != base))
    flips_comp = int(np.sum(lost_comp.argmax(1) != base))
    assert flips_mean >= 10 and flips_comp <= flips_mean // 3


def test_cross_validated_flips_rank_a_predictable_feature_first():
    x, cols = _features(seed=2)
    cols[:, 5] = cols[:, 3]  # features 3 and 5 weigh the same, but only 3 can be predicted from the others
    scores = x @ cols.T
    flips = compensation.cross_validate(x, scores, cols, np.array([3, 5])).flips
    assert flips.shape == (2,) and flips[0] < flips[1]
    # the same count by brute force: refit on each fold's complement (contiguous folds)
    n, folds = len(x), 5
    fold_of = np.minimum(np.arange(n) * folds // n, folds - 1)
    total = 0
    for f in range(folds):
        tr, te = fold_of != f, fold_of == f
        comp = compensation.fit(x[tr], 3)
        new = scores[te] + np.outer(comp.residual(x[te]), cols[:, 3])
        total += int(np.sum(new.argmax(1) != scores[te].argmax(1)))
    assert flips[0] == total


def _leak(x: np.ndarray, k: int, seed: int = 3) -> np.ndarray:
    """A data-dependent change of feature ``k`` (an additive stain's leak): mostly a function of other
    features, plus a little noise."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 0.3, x.shape[1])
    mix[k] = 0.0
    return np.maximum(x @ mix, 0.0) * 0.5 + 0.02 * rng.normal(size=len(x))


def test_fit_to_a_target_matches_the_primal_ridge_solution():
    x, _ = _features(seed=4)
    k = 3
    y = _leak(x, k)
    comp = compensation.fit(x, k, ridge=0.1, target=y)
    assert comp.feature == k and comp.weights[k] == 0.0
    others = np.delete(x, k, axis=1)
    xc = others - others.mean(axis=0)
    full = x - x.mean(axis=0)
    lam = 0.1 * np.trace(full @ full.T) / x.shape[1]
    beta = np.linalg.solve(xc.T @ xc + lam * np.eye(xc.shape[1]), xc.T @ (y - y.mean()))
    np.testing.assert_allclose(np.delete(comp.weights, k), beta, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(comp.offset, y.mean() - x.mean(axis=0) @ comp.weights, rtol=1e-10)
    np.testing.assert_allclose(comp.residual(x, y), comp.predict(x) - y, atol=1e-12)
    assert comp.residual(x, y).std() < 0.7 * y.std()  # a ReLU of the others: mostly, not fully, linear


def test_changed_feature_compensated_on_unseen_images():
    """An additive leak ``Δ_k``: taking back its regression through the classifier leaves fewer flips
    on images the fit has not seen than leaving the classifier as it is."""
    x, cols = _features(seed=5)
    k = 3
    y = _leak(x, k, seed=6)
    scores = x @ cols.T
    train, test = slice(0, 200), slice(200, 300)
    comp = compensation.fit(x[train], k, target=y[train])
    base = scores[test].argmax(1)
    plain = scores[test] + np.outer(y[test], cols[:, k])
    # the classifier edit: other columns − w_k β, bias − w_k β0; column k unchanged
    edited = cols - np.outer(cols[:, k], comp.weights)
    assert np.array_equal(edited[:, k], cols[:, k])
    stained_feats = x[test].copy()
    stained_feats[:, k] += y[test]
    compensated = stained_feats @ edited.T - cols[:, k] * comp.offset
    np.testing.assert_allclose(compensated, scores[test] + np.outer(-comp.residual(x[test], y[test]), cols[:, k]),
                               atol=1e-9)
    flips_plain = int(np.sum(plain.argmax(1) != base))
    flips_comp = int(np.sum(compensated.argmax(1) != base))
    assert flips_plain >= 5 and flips_comp <= flips_plain // 2


def test_cross_validation_of_a_change_matches_brute_force():
    x, cols = _features(seed=7)
    scores = x @ cols.T
    cands = np.array([3, 5, 8])
    changes = np.stack([_leak(x, k, seed=10 + i) for i, k in enumerate(cands)], axis=1)
    cv = compensation.cross_validate(x, scores, cols, cands, changes=changes)
    n, folds = len(x), 5
    fold_of = np.minimum(np.arange(n) * folds // n, folds - 1)
    order = np.argsort(scores, axis=1)
    top, runner_up = order[:, -1], order[:, -2]
    for i, k in enumerate(cands):
        total, gaps = 0, np.zeros(n)
        for f in range(folds):
            tr, te = fold_of != f, fold_of == f
            comp = compensation.fit(x[tr], int(k), target=changes[tr, i])
            moved = np.outer(-comp.residual(x[te], changes[te, i]), cols[:, k])
            new = scores[te] + moved
            total += int(np.sum(new.argmax(1) != scores[te].argmax(1)))
            rows = np.arange(te.sum())
            gaps[te] = moved[rows, top[te]] - moved[rows, runner_up[te]]
        assert cv.flips[i] == total
        np.testing.assert_allclose(cv.decision_rms[i], np.sqrt(np.mean(gaps**2)), rtol=1e-9)
    # the default (feature lost) is the change −p_k
    lost = compensation.cross_validate(x, scores, cols, cands)
    as_change = compensation.cross_validate(x, scores, cols, cands, changes=-x[:, cands])
    np.testing.assert_array_equal(lost.flips, as_change.flips)
    np.testing.assert_allclose(lost.decision_rms, as_change.decision_rms, rtol=1e-12)


def test_decision_rms_ranks_the_gap_moving_change_above_an_equal_harmless_one():
    """Two changes of the same size: one moves every image's top-1 class against its runner-up, the
    other moves a class that is never in the top two. Neither flips anything at this size; only the
    decision RMS tells them apart."""
    rng = np.random.default_rng(11)
    n, f = 200, 30
    x = rng.gamma(2.0, 1.0, (n, f))
    scores = np.zeros((n, 4))
    scores[:, 0], scores[:, 1] = 10.0, 9.0  # class 0 wins by 1, class 1 is the runner-up
    cols = np.zeros((4, f))
    cols[0, 3], cols[1, 3] = 1.0, -1.0  # feature 3 moves the top-1 − runner-up gap (by 2 per unit)
    cols[3, 5] = 2.0  # feature 5 moves class 3 only
    noise = 0.05 * rng.normal(size=(n, 2))  # changes the other features cannot predict
    cv = compensation.cross_validate(x, scores, cols, np.array([3, 5]), changes=noise)
    assert cv.flips.tolist() == [0, 0]
    assert cv.decision_rms[1] == 0.0 and cv.decision_rms[0] > 0.05
