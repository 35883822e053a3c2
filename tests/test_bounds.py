"""Tests for onnxstain.math.bounds: formulas checked against Monte Carlo and closed forms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import special

from onnxstain.math.bounds import (
    Bound,
    _ln_cap_cf,
    ball_bound,
    box_ball,
    cap_bound_gaussian,
    cap_bound_power,
    cap_probability,
    cross_key_bound,
    data_driven_bound,
    format_probability,
    log10_cap_bound_power,
    log10_cap_probability,
    mixed_bound,
    per_image_cap_sums,
    radius_exceedance_bound,
    threshold_for_target,
    window_side,
)

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def unit_vectors(
    rng: np.random.Generator, shape: tuple[int, ...], n: int, dtype: type = np.float64
) -> np.ndarray:
    """Uniform samples on S^{n-1}: normalised standard Gaussians, shape (*shape, n)."""
    g = rng.standard_normal((*shape, n), dtype=dtype)
    return g / np.linalg.norm(g, axis=-1, keepdims=True)


def mc_tolerance(p: float, n_samples: int) -> float:
    """max(4 binomial standard errors, 15 % relative)."""
    return max(4.0 * math.sqrt(p * (1.0 - p) / n_samples), 0.15 * p)


# --------------------------------------------------------------------------------------------------
# 1. the cap: Monte Carlo and exact special cases
# --------------------------------------------------------------------------------------------------

MC_CASES = {
    3: ([0.5, 0.9, 0.99], 1_000_000),
    10: ([0.2, 0.5, 0.75], 1_000_000),
    64: ([0.1, 0.25, 0.35], 600_000),
    320: ([0.04, 0.1, 0.15], 250_000),
}


@pytest.mark.parametrize("n", sorted(MC_CASES))
def test_cap_probability_monte_carlo(n: int) -> None:
    eps_list, n_samples = MC_CASES[n]
    rng = np.random.default_rng(1000 + n)
    e = unit_vectors(rng, (), n)  # a fixed, generic unit vector
    eps = np.asarray(eps_list)
    counts = np.zeros(eps.size)
    chunk = 50_000
    for start in range(0, n_samples, chunk):
        m = min(chunk, n_samples - start)
        dots = unit_vectors(rng, (m,), n, np.float32) @ e.astype(np.float32)
        counts += (dots[:, None] >= eps[None, :]).sum(axis=0)
    measured = counts / n_samples
    formula = np.asarray(cap_probability(eps, n))
    for p_hat, p in zip(measured, formula, strict=True):
        assert 1e-3 <= p <= 0.3
        tol = mc_tolerance(p, n_samples)
        assert abs(p_hat - p) <= tol, (n, p_hat, p, tol)
        # the test has teeth: a formula off by a factor of two would fail it
        assert abs(p_hat - 2.0 * p) > tol
        assert abs(p_hat - 0.5 * p) > tol


def test_cap_exact_low_dimensions() -> None:
    eps = np.linspace(-1.0, 1.0, 41)
    # n = 3: v.e is uniform on [-1, 1] (Archimedes), n = 2: the angle is uniform
    np.testing.assert_allclose(cap_probability(eps, 3), (1.0 - eps) / 2.0, atol=1e-14)
    np.testing.assert_allclose(cap_probability(eps, 2), np.arccos(eps) / np.pi, atol=1e-14)


def test_cap_edge_cases_and_vectorisation() -> None:
    assert cap_probability(0.0, 50) == pytest.approx(0.5)
    assert cap_probability(1.0, 50) == 0.0
    assert cap_probability(1.5, 50) == 0.0
    assert cap_probability(-1.5, 50) == 1.0
    assert isinstance(cap_probability(0.3, 50), float)
    eps = np.linspace(0.05, 0.95, 7)
    for n in (5, 147, 2048):
        np.testing.assert_allclose(cap_probability(-eps, n), 1.0 - np.asarray(cap_probability(eps, n)))
    grid = cap_probability(np.array([[0.1], [0.2]]), np.array([10, 20, 30]))
    assert grid.shape == (2, 3)
    with pytest.raises(ValueError):
        cap_probability(0.1, 1)


def test_cap_matches_method_table() -> None:
    """Values of the table in method.md section 5.4 (2 significant digits)."""
    table = {
        147: [1.1e-1, 7.4e-3, 1.1e-4, 4.9e-11],
        576: [8.1e-3, 6.4e-7, 9.1e-14, 4.0e-38],
        768: [2.8e-3, 1.1e-8, 9.3e-18, 3.5e-50],
        2048: [2.9e-6, 3.1e-20, 3.5e-44, 2.3e-130],
        2304: [7.5e-7, 1.6e-22, 1.9e-49, 2.3e-146],
        4096: [7.0e-11, 1.6e-38, 2.8e-86, 1.9e-258],
    }
    for n, row in table.items():
        got = 10.0 ** np.asarray(log10_cap_probability([0.1, 0.2, 0.3, 0.5], n))
        np.testing.assert_allclose(got, row, rtol=0.05)


# --------------------------------------------------------------------------------------------------
# 2-3. log10 version and closed-form bounds
# --------------------------------------------------------------------------------------------------


def test_closed_form_ordering() -> None:
    eps = np.linspace(0.0, 0.999, 400)
    for n in (2, 3, 10, 64, 147, 1280, 4096):
        exact = np.asarray(cap_probability(eps, n))
        power = np.asarray(cap_bound_power(eps, n))
        gauss = np.asarray(cap_bound_gaussian(eps, n))
        assert np.all(exact <= power * (1 + 1e-12))
        assert np.all(power <= gauss * (1 + 1e-12))
        lexact = np.asarray(log10_cap_probability(eps, n))
        lpower = np.asarray(log10_cap_bound_power(eps, n))
        assert np.all(lexact <= lpower + 1e-12)
        assert np.all(lpower <= -n * eps**2 / 2.0 / math.log(10.0) + 1e-12)
    assert cap_bound_power(1.0, 10) == 0.0
    assert log10_cap_bound_power(1.0, 10) == -math.inf


def test_log10_agrees_with_direct_where_representable() -> None:
    eps = np.linspace(-0.99, 0.999, 500)
    for n in (2, 3, 10, 147, 1280, 4096, 20000):
        direct = np.asarray(cap_probability(eps, n))
        ok = direct > 1e-300
        with np.errstate(divide="ignore"):
            ref = np.log10(direct[ok])
        got = np.asarray(log10_cap_probability(eps, n))[ok]
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_log_space_continued_fraction_against_direct() -> None:
    """The log-space route (used below 1e-250) reproduces the direct value where both are valid."""
    for n in (10, 100, 1280, 5000):
        eps = np.linspace(0.05, 0.995, 200)
        direct = np.asarray(cap_probability(eps, n))
        ok = (eps**2 > 4.0 / (n + 4)) & (direct > 1e-290)
        got = _ln_cap_cf(eps[ok], np.full(ok.sum(), float(n))) / math.log(10.0)
        np.testing.assert_allclose(got, np.log10(direct[ok]), rtol=1e-11)


def test_log10_underflow_regime() -> None:
    n, eps = 1280, 0.9
    assert cap_probability(eps, n) == 0.0  # underflows in float64
    got = log10_cap_probability(eps, n)
    assert math.isfinite(got)
    # sandwich: cap = L * 2F1(a+1/2, 1; a+1; x) with 1 <= 2F1 <= 1/eps^2,
    # L = x^a eps / (2 a B(a, 1/2)), x = 1 - eps^2, a = (n-1)/2
    a = (n - 1) / 2.0
    log10_l = (
        a * math.log1p(-(eps**2)) + math.log(eps) - math.log(2 * a) - special.betaln(a, 0.5)
    ) / math.log(10)
    assert log10_l <= got <= log10_l - 2 * math.log10(eps)
    assert got <= log10_cap_bound_power(eps, n)
    assert -470 < got < -455
    # far beyond: still finite, and -inf only at eps >= 1
    assert math.isfinite(log10_cap_probability(0.999, 100_000))
    assert log10_cap_probability(1.0, 1280) == -math.inf
    # the two routes join continuously around the switch-over (direct value 1e-250)
    eps_grid = np.linspace(0.7, 0.8, 2001)
    vals = np.asarray(log10_cap_probability(eps_grid, 1280))
    assert np.all(np.diff(vals) < 0)
    assert np.max(np.abs(np.diff(vals, 3))) < 1e-7  # no jump where the route changes (~ -250)


def test_log10_monotone_in_eps_and_n() -> None:
    eps = np.linspace(0.0, 0.999, 1000)
    ns = np.array([2, 3, 5, 10, 50, 147, 576, 1280, 4096, 20000])
    vals = np.asarray(log10_cap_probability(eps[None, :], ns[:, None]))
    assert np.all(np.isfinite(vals))
    assert np.all(np.diff(vals, axis=1) < 0)  # decreasing in eps
    assert np.all(np.diff(vals[:, 1:], axis=0) < 0)  # decreasing in n for eps > 0


# --------------------------------------------------------------------------------------------------
# 5. ball bound: union over positions, AND over detectors
# --------------------------------------------------------------------------------------------------


def _simulate_fire_rate(
    rng: np.random.Generator, features: np.ndarray, tau: float, detectors: int, n_samples: int
) -> float:
    """Fraction of keys (``detectors`` independent directions) firing at some position."""
    n = features.shape[1]
    v = unit_vectors(rng, (n_samples, detectors), n)
    proj = v @ features.T  # (N, D, P)
    fires_at = np.all(proj > tau, axis=1)  # AND over detectors, per position
    return float(np.mean(fires_at.any(axis=1)))  # OR over positions


def test_ball_bound_single_position_and_is_exact() -> None:
    rng = np.random.default_rng(7)
    n, radius, tau, n_samples = 10, 2.0, 0.5, 300_000
    feature = radius * unit_vectors(rng, (1,), n)
    for detectors in (1, 2, 3):
        bound = ball_bound(tau, radius, n, detectors=detectors)
        measured = _simulate_fire_rate(rng, feature, tau, detectors, n_samples)
        p = cap_probability(tau / radius, n) ** detectors
        assert bound.value == pytest.approx(p, rel=1e-12)
        assert abs(measured - p) <= mc_tolerance(p, n_samples)


def test_ball_bound_union_over_positions_monte_carlo() -> None:
    rng = np.random.default_rng(11)
    n, tau, detectors, n_samples = 10, 0.3, 2, 300_000
    radii = np.array([1.0, 0.8, 1.2, 0.6])
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    features = radii[:, None] * q[:, :4].T  # orthogonal features, one per position
    bound = ball_bound(tau, radii, n, detectors=detectors)
    expected = float(np.sum(np.asarray(cap_probability(tau / radii, n)) ** detectors))
    assert bound.value == pytest.approx(expected, rel=1e-10)
    assert bound.params["positions"] == 4
    measured = _simulate_fire_rate(rng, features, tau, detectors, n_samples)
    se = math.sqrt(measured * (1 - measured) / n_samples)
    assert measured <= bound.value + 4 * se
    # orthogonal features: the events barely overlap, so the union bound is nearly tight
    assert measured >= 0.85 * bound.value
    # scalar radius applied at every position: all features at the largest radius
    worst = ball_bound(tau, radii.max(), n, positions=4, detectors=detectors)
    assert worst.value >= bound.value
    same = radii.max() * q[:, :4].T
    measured_same = _simulate_fire_rate(rng, same, tau, detectors, n_samples)
    assert measured_same <= worst.value + 4 * math.sqrt(measured_same / n_samples)


def test_ball_bound_factors_clipping_and_log_space() -> None:
    p = cap_probability(0.4, 64)
    b = ball_bound(0.4, 1.0, 64, positions=49, draws=3, detectors=2)
    assert b.value == pytest.approx(49 * 3 * p**2, rel=1e-10)
    assert b.kind == "calibrated-radius"
    assert "calibration" in b.statement
    assert ball_bound(0.01, 1.0, 64, positions=100).value == 1.0
    assert ball_bound(0.5, 0.0, 64).value == 0.0
    assert ball_bound(0.5, 0.0, 64).log10 == -math.inf
    tiny = ball_bound(0.9, 1.0, 1280, positions=49, detectors=2, kind="data-free")
    assert tiny.value == 0.0
    assert tiny.log10 == pytest.approx(2 * log10_cap_probability(0.9, 1280) + math.log10(49), rel=1e-12)
    assert "certified" in tiny.statement
    with pytest.raises(ValueError):
        ball_bound(0.5, [1.0, 2.0], 64, positions=3)
    with pytest.raises(ValueError):
        ball_bound(0.5, 1.0, 64, kind="cross-key")
    with pytest.raises(ValueError):
        ball_bound(0.5, 1.0, 64, draws=0)


# --------------------------------------------------------------------------------------------------
# 6. threshold_for_target
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "log10_target", "radius", "n", "positions", "draws", "detectors"),
    [
        (1e-6, None, 11.2, 147, 1, 1, 1),
        (1e-9, None, 3.0, 64, 49, 4, 2),
        (1e-40, None, [11.2, 5.0, 3.0], 1280, 1, 3, 1),
        (None, -400.0, 11.2, 1280, 49, 1, 1),
    ],
)
def test_threshold_for_target_round_trip(
    target: float | None,
    log10_target: float | None,
    radius: float | list[float],
    n: int,
    positions: int,
    draws: int,
    detectors: int,
) -> None:
    kw = {"positions": positions, "draws": draws, "detectors": detectors}
    tau = threshold_for_target(target, radius, n, log10_target=log10_target, **kw)
    assert 0 < tau <= np.max(radius)
    goal = math.log10(target) if target is not None else log10_target
    got = ball_bound(tau, radius, n, **kw).log10
    ratio = 10.0 ** (got - goal)
    assert 1.0 - 1e-9 <= ratio <= 1.0  # meets the target, and is exact to 1e-9 relative
    # the smallest such tau: a slightly smaller margin misses the target
    assert ball_bound(tau * (1 - 1e-9), radius, n, **kw).log10 > goal


def test_threshold_for_target_errors_and_trivial() -> None:
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            threshold_for_target(bad, 1.0, 64)
    with pytest.raises(ValueError):
        threshold_for_target(None, 1.0, 64)
    assert threshold_for_target(0.9, 1.0, 64) == 0.0  # cap(0) = 1/2 already meets it


# --------------------------------------------------------------------------------------------------
# 7. data-driven bound
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "true_mean"),
    [
        (lambda rng, size: rng.beta(0.5, 20.0, size), 0.5 / 20.5),
        (lambda rng, size: (rng.random(size) < 0.02).astype(float), 0.02),
        (lambda rng, size: rng.beta(2.0, 2.0, size), 0.5),
    ],
)
def test_data_driven_bound_coverage(sampler, true_mean: float) -> None:
    rng = np.random.default_rng(2024)
    reps, n_samples = 300, 200
    samples = sampler(rng, (reps, n_samples))
    values = np.array([data_driven_bound(s, confidence=0.95).value for s in samples])
    assert np.mean(values >= true_mean) >= 0.93
    assert np.all(values < 1.0)
    assert np.median(values) < true_mean + 0.15  # not trivial


def test_data_driven_bound_formula_and_bernstein() -> None:
    rng = np.random.default_rng(3)
    f = rng.beta(0.2, 200.0, 5000)
    b = data_driven_bound(f, confidence=0.95)
    eta, n_s = 0.05, f.size
    hoeff = f.mean() + math.sqrt(math.log(2 / eta) / (2 * n_s))
    bern = (
        f.mean()
        + math.sqrt(2 * f.var(ddof=1) * math.log(4 / eta) / n_s)
        + 7 * math.log(4 / eta) / (3 * (n_s - 1))
    )
    assert b.params["hoeffding"] == pytest.approx(hoeff)
    assert b.params["bernstein"] == pytest.approx(bern)
    assert b.value == pytest.approx(min(hoeff, bern))
    assert bern < hoeff  # small variance: empirical Bernstein wins
    assert b.kind == "data-driven"
    with pytest.raises(ValueError):
        data_driven_bound([0.5, 1.5])


def test_per_image_cap_sums() -> None:
    rng = np.random.default_rng(5)
    radii = rng.uniform(0.5, 3.0, (20, 6))
    tau, n = 1.0, 32
    got = per_image_cap_sums(radii, tau, n, detectors=2)
    ref = np.minimum(1.0, (np.asarray(cap_probability(tau / radii, n)) ** 2).sum(axis=1))
    np.testing.assert_allclose(got, ref)
    assert per_image_cap_sums(radii[:, 0], tau, n).shape == (20,)
    assert np.all(per_image_cap_sums(np.zeros((3, 2)), tau, n) == 0.0)
    assert per_image_cap_sums(radii, 0.01, 3, draws=10).max() == 1.0


# --------------------------------------------------------------------------------------------------
# 8. resampling: the draws factor
# --------------------------------------------------------------------------------------------------


def test_resampling_factor_monte_carlo() -> None:
    rng = np.random.default_rng(99)
    n, radius, tau, max_draws, n_samples = 10, 1.0, 0.5, 3, 200_000
    e = unit_vectors(rng, (), n)
    x_feature = radius * e
    cap = cap_probability(tau / radius, n)
    bound = ball_bound(tau, radius, n, draws=max_draws).value
    assert bound == pytest.approx(max_draws * cap)
    v = unit_vectors(rng, (n_samples, max_draws), n)
    fires = v @ x_feature > tau  # (N, M): would draw j fire on x?
    rules = {
        "v.a > 0 with a = e": v @ e > 0.0,  # acceptance correlated with firing on x
        "adversarial: accept only firing draws": fires,
    }
    rows = np.arange(n_samples)
    for name, accept in rules.items():
        first = np.argmax(accept, axis=1)  # first accepted draw (J)
        accepted = accept.any(axis=1)
        rate = float(np.mean(accepted & fires[rows, first]))
        se = math.sqrt(rate * (1 - rate) / n_samples)
        assert rate <= bound + 4 * se, name
        # without the draws factor the bound would be violated
        assert rate > cap + 4 * se, name


# --------------------------------------------------------------------------------------------------
# 9. radius exceedance and the mixed bound
# --------------------------------------------------------------------------------------------------


def test_radius_exceedance_bound_values() -> None:
    assert radius_exceedance_bound(0, 600, 0.95) == pytest.approx(1 - 0.05 ** (1 / 600), rel=1e-9)
    assert radius_exceedance_bound(0, 600, 0.95) == pytest.approx(0.00498, abs=1e-5)
    assert radius_exceedance_bound(600, 600) == 1.0
    assert radius_exceedance_bound(3, 600) > radius_exceedance_bound(2, 600)
    with pytest.raises(ValueError):
        radius_exceedance_bound(5, 4)


def test_radius_exceedance_bound_coverage() -> None:
    rng = np.random.default_rng(42)
    for p, n_samples in ((0.004, 600), (0.05, 200)):
        ks = rng.binomial(n_samples, p, size=4000)
        ub = {k: radius_exceedance_bound(int(k), n_samples, 0.95) for k in np.unique(ks)}
        coverage = np.mean([ub[k] >= p for k in ks])
        assert coverage >= 0.93


def test_mixed_bound() -> None:
    ball = ball_bound(1.0, 2.0, 256, positions=49)
    m = mixed_bound(ball, 0, 600, 0.95)
    assert m.kind == "data-driven"
    assert m.value == pytest.approx(radius_exceedance_bound(0, 600) + ball.value, rel=1e-12)
    assert Bound.from_dict(m.params["ball"]) == ball
    m2 = mixed_bound(ball_bound(0.9, 1.0, 1280), 2, 1000, 0.99)
    assert m2.value == pytest.approx(radius_exceedance_bound(2, 1000, 0.99), rel=1e-12)


# --------------------------------------------------------------------------------------------------
# 10. cross-key bound
# --------------------------------------------------------------------------------------------------


def test_cross_key_bound_monte_carlo() -> None:
    rng = np.random.default_rng(8)
    n, tau, n_samples = 16, 1.0, 300_000
    radii = np.array([2.5, 1.5, 3.0])
    trigger = radii[:, None] * unit_vectors(rng, (3,), n)  # this key's trigger features
    b = cross_key_bound(radii, tau, n)
    assert b.kind == "cross-key"
    assert b.value == pytest.approx(float(np.sum(np.asarray(cap_probability(tau / radii, n)))), rel=1e-10)
    other_keys = unit_vectors(rng, (n_samples,), n)
    rate = float(np.mean((other_keys @ trigger.T > tau).any(axis=1)))
    assert rate <= b.value + 4 * math.sqrt(rate / n_samples)
    weighted = cross_key_bound(radii, tau, n, positions_weight=[1, 0, 2])
    expected = cap_probability(tau / 2.5, n) + 2 * cap_probability(tau / 3.0, n)
    assert weighted.value == pytest.approx(expected, rel=1e-10)


# --------------------------------------------------------------------------------------------------
# 4. Bound record
# --------------------------------------------------------------------------------------------------


def test_bound_round_trip_and_str() -> None:
    tiny = ball_bound(0.9, np.array([1.0, 1.0]), 1280, draws=2)
    assert tiny.value == 0.0 and math.isfinite(tiny.log10)
    zero = ball_bound(1.0, 0.5, 64)
    for b in (tiny, zero, ball_bound(0.3, 1.0, 64), data_driven_bound([0.0, 0.1, 0.2])):
        text = json.dumps(b.to_dict(), allow_nan=False)
        back = Bound.from_dict(json.loads(text))
        assert back == b
    assert str(tiny).startswith("≤ 10^-")
    assert str(zero) == "≤ 0 (calibrated-radius)"
    small = Bound.from_log10(math.log10(3.15e-31), "data-free", {"x": np.float64(1.0)}, "s")
    assert str(small) == "≤ 3.2e-31 (data-free)"
    assert isinstance(small.params["x"], float)
    assert format_probability(-460.0) == "10^-460"
    assert format_probability(-459.74) == "10^-459.7"
    assert format_probability(-1e308) == "10^-1e+308"  # an exponent beyond float range (a fuzzed key)
    with pytest.raises(ValueError):
        Bound(value=0.1, log10=-1.0, kind="guess", params={}, statement="")
    with pytest.raises(ValueError):
        Bound(value=0.5, log10=-1.0, kind="data-free", params={}, statement="")


# --------------------------------------------------------------------------------------------------
# pixel windows: a certified ball around a box, and the window side a bound target needs
# --------------------------------------------------------------------------------------------------


def test_box_ball_holds_every_point_of_the_box() -> None:
    rng = np.random.default_rng(0)
    lo = rng.normal(-2, 0.1, 12)
    hi = lo + rng.uniform(3, 5, 12)
    c, r = box_ball(lo, hi)
    corners = np.where(rng.integers(0, 2, (4096, 12)).astype(bool), hi, lo)
    inside = lo + rng.uniform(0, 1, (4096, 12)) * (hi - lo)
    assert np.linalg.norm(inside - c, axis=1).max() <= r
    assert np.allclose(np.linalg.norm(corners - c, axis=1), r)  # every corner is on the sphere: the ball is tight
    with pytest.raises(ValueError):
        box_ball(hi, lo)


def test_box_corner_reaches_sqrt_two_over_pi() -> None:
    """The best box point for a random direction has margin ≈ √(2/π) R: what window_side's reach relies on."""
    rng = np.random.default_rng(1)
    m = 75
    lo, hi = np.full(m, -2.1), np.full(m, 2.2)
    c, r = box_ball(lo, hi)
    g = rng.standard_normal((4000, m))
    v = g / np.linalg.norm(g, axis=1, keepdims=True)
    best = np.einsum("km,km->k", v, np.where(v > 0, hi, lo) - c) / r
    assert abs(best.mean() - math.sqrt(2 / math.pi)) < 0.01
    assert np.quantile(best, 0.01) > 0.68 * 1.03  # the locker's reach, with its acceptance factor


@pytest.mark.parametrize("target,reach,side", [(1e-6, 0.68, 5), (1e-3, 0.68, 4), (1e-9, 0.68, 5), (1e-12, 0.68, 6)])
def test_window_side_is_the_smallest_that_meets_the_target(target: float, reach: float, side: int) -> None:
    got = window_side(target, 3, reach, draws=32)
    assert got == side
    m = 3 * side * side
    tau = threshold_for_target(target, 1.0, m, draws=32)
    assert tau <= reach < threshold_for_target(target, 1.0, 3 * (side - 1) ** 2, draws=32)
    assert ball_bound(tau, 1.0, m, draws=32).log10 <= math.log10(target) + 1e-9
    assert window_side(1e-300, 3, reach, draws=32, max_side=10) is None
