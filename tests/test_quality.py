"""Q1/Q2: the Fréchet distance between Gaussians and between fitted feature sets (reference/quality.py),
against independent truths: the diagonal 2-Wasserstein distance of reference/exact.py, the commuting closed
form, a 2×2 closed form of the trace of a matrix square root, Cholesky factors with an SVD (no
eigendecomposition), the eigenvalues of the non-symmetric product Σ₁Σ₂, a Monte Carlo run of the optimal
coupling, and a permutation test."""

from __future__ import annotations

import numpy as np
import pytest

from ldmkit.reference import exact, quality


def random_cov(rng, d: int, rank: int | None = None) -> np.ndarray:
    """A random symmetric PSD (d, d) matrix of the given rank (full by default), far from diagonal."""
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (0.0 if rank else 0.1 * np.eye(d))


def random_rotation(rng, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def test_Q1_diagonal_covariances_equal_the_squared_gaussian_w2():
    """Q1: with diagonal covariances FD is the squared 2-Wasserstein distance of exact.gaussian_w2,
    Σ (μ₁ − μ₂)² + (√v₁ − √v₂)², zero variances included."""
    rng = np.random.default_rng(0)
    for d in (1, 3, 8):
        m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
        v1, v2 = rng.uniform(0.0, 3.0, d), rng.uniform(0.0, 3.0, d)
        v1[0] = 0.0
        fd = quality.frechet_distance(m1, np.diag(v1), m2, np.diag(v2))
        assert fd == pytest.approx(exact.gaussian_w2(m1, v1, m2, v2) ** 2, rel=1e-12, abs=1e-14)


def test_Q1_commuting_covariances_closed_form():
    """Q1: Σ₁ = U diag(a) Uᵀ and Σ₂ = U diag(b) Uᵀ commute, and FD = ‖μ₁ − μ₂‖² + Σ (√a − √b)² (rotation
    invariance of the diagonal case), for a random rotation U."""
    rng = np.random.default_rng(1)
    d = 6
    u = random_rotation(rng, d)
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    fd = quality.frechet_distance(m1, u @ np.diag(a) @ u.T, m2, u @ np.diag(b) @ u.T)
    assert fd == pytest.approx(np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-11)


def test_Q1_general_covariances_by_three_other_routes():
    """Q1 on non-commuting covariances, the cross term tr((Σ₁Σ₂)^{1/2}) computed without the code's
    eigendecompositions: (a) d = 2: tr √M = √(tr M + 2√det M) for a 2×2 M with non-negative eigenvalues,
    applied to M = Σ₁Σ₂; (b) the sum of singular values of L₁ᵀL₂ for Cholesky factors Σ = L Lᵀ (the nuclear
    norm; (L₁ᵀL₂)ᵀ(L₁ᵀL₂) = L₂ᵀΣ₁L₂ has the eigenvalues of Σ₁Σ₂); (c) Σ √λ over the eigenvalues of the
    non-symmetric product Σ₁Σ₂ (numpy.linalg.eigvals)."""
    rng = np.random.default_rng(2)
    for d in (2, 5, 16):
        c1, c2 = random_cov(rng, d), random_cov(rng, d)
        assert not np.allclose(c1 @ c2, c2 @ c1)
        m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
        base = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2)
        fd = quality.frechet_distance(m1, c1, m2, c2)
        if d == 2:
            p = c1 @ c2
            assert fd == pytest.approx(base - 2 * np.sqrt(np.trace(p) + 2 * np.sqrt(np.linalg.det(p))), rel=1e-11)
        nuclear = np.linalg.svd(np.linalg.cholesky(c1).T @ np.linalg.cholesky(c2), compute_uv=False).sum()
        assert fd == pytest.approx(base - 2 * nuclear, rel=1e-10)
        eig = np.linalg.eigvals(c1 @ c2)
        assert np.abs(eig.imag).max() < 1e-10
        assert fd == pytest.approx(base - 2 * np.sqrt(eig.real).sum(), rel=1e-10)


def test_Q1_is_the_squared_w2_monte_carlo_of_the_optimal_coupling():
    """Q1 = W2²: the coupling X = μ₁ + L₁Z, Y = μ₂ + L₂RZ (Z ~ N(0, I), R = VUᵀ from the SVD L₁ᵀL₂ = USVᵀ, so Y ~
    N(μ₂, Σ₂)) has E‖X − Y‖² = FD, by Monte Carlo within 5 standard errors; and every other coupling of this
    family (R a random rotation: E‖X − Y‖² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr(L₁ᵀL₂R) exactly) costs more."""
    rng = np.random.default_rng(3)
    d, n = 4, 200_000
    c1, c2 = random_cov(rng, d), random_cov(rng, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    fd = quality.frechet_distance(m1, c1, m2, c2)
    l1, l2 = np.linalg.cholesky(c1), np.linalg.cholesky(c2)
    u, _, vt = np.linalg.svd(l1.T @ l2)
    r = vt.T @ u.T
    z = rng.standard_normal((n, d))
    x, y = m1 + z @ l1.T, m2 + z @ (l2 @ r).T
    np.testing.assert_allclose(np.cov(y, rowvar=False), c2, atol=0.03)  # a coupling: Y has the law N(μ₂, Σ₂)
    cost = ((x - y) ** 2).sum(axis=1)
    assert abs(cost.mean() - fd) < 5 * cost.std(ddof=1) / np.sqrt(n), (cost.mean(), fd)
    base = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2)
    others = [base - 2 * np.trace(l1.T @ l2 @ random_rotation(rng, d)) for _ in range(500)]
    assert min(others) > fd


def test_Q1_symmetric_zero_on_equal_laws_and_rank_deficient():
    """Q1: FD(a, b) = FD(b, a); FD of a law with itself is 0 (to rounding); rank-deficient covariances (fewer
    vectors than dimensions, a dead feature) give the value of the eigvals route, and never a negative one.
    Near-zero eigenvalues put the rounding error under a square root (√(1e-16) = 1e-8), hence rel 1e-7 there."""
    rng = np.random.default_rng(4)
    d = 10
    c1, c2 = random_cov(rng, d, rank=4), random_cov(rng, d, rank=6)
    c1[:, 0] = c1[0, :] = 0.0
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    fd = quality.frechet_distance(m1, c1, m2, c2)
    assert fd == pytest.approx(quality.frechet_distance(m2, c2, m1, c1), rel=1e-7)
    full1, full2 = random_cov(rng, d), random_cov(rng, d)
    assert quality.frechet_distance(m1, full1, m2, full2) == pytest.approx(
        quality.frechet_distance(m2, full2, m1, full1), rel=1e-12)
    eig = np.clip(np.linalg.eigvals(c1 @ c2).real, 0.0, None)
    assert fd == pytest.approx(np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(eig).sum(),
                               rel=1e-7)
    for c in (c1, c2, random_cov(rng, d)):
        assert 0.0 <= quality.frechet_distance(m1, c, m1, c) < 1e-10 * np.trace(c) + 1e-12


def test_Q2_fit_is_the_sample_mean_and_unbiased_covariance():
    """Q2: the fitted Gaussian is the mean and the (N − 1)-normalised covariance, written out as sums."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -2.0]
    mean, cov = quality.gaussian_fit(x)
    m = [sum(row[j] for row in x) / len(x) for j in range(3)]
    c = [[sum((row[i] - m[i]) * (row[j] - m[j]) for row in x) / (len(x) - 1) for j in range(3)] for i in range(3)]
    np.testing.assert_allclose(mean, m, rtol=1e-13)
    np.testing.assert_allclose(cov, c, rtol=1e-12)
    fd = quality.frechet_distance_of_samples(x, x[::-1] * 2.0)
    assert fd == pytest.approx(quality.frechet_distance(*quality.gaussian_fit(x), *quality.gaussian_fit(2 * x)))


def test_Q2_sample_fd_converges_to_Q1_monte_carlo():
    """Q2: the FD of two sets of N draws from N(μ₁, Σ₁) and N(μ₂, Σ₂) averages to Q1 of the true laws within
    5 standard errors (200 replicates, N = 20,000, d = 3: its O(d/N) upward bias, ≈ 5e-4 here, is a fifth of a
    standard error); it is invariant under a common rotation and shift of both sets."""
    rng = np.random.default_rng(6)
    d, n, reps = 3, 20_000, 200
    c1, c2 = random_cov(rng, d), random_cov(rng, d)
    m1, m2 = np.zeros(d), np.array([0.5, -0.3, 0.2])
    truth = quality.frechet_distance(m1, c1, m2, c2)
    l1, l2 = np.linalg.cholesky(c1), np.linalg.cholesky(c2)
    values = []
    for _ in range(reps):
        x = m1 + rng.standard_normal((n, d)) @ l1.T
        y = m2 + rng.standard_normal((n, d)) @ l2.T
        values.append(quality.frechet_distance_of_samples(x, y))
    values = np.array(values)
    assert abs(values.mean() - truth) < 5 * values.std(ddof=1) / np.sqrt(reps), (values.mean(), truth)
    u, shift = random_rotation(rng, d), rng.standard_normal(d)
    assert quality.frechet_distance_of_samples(x @ u + shift, y @ u + shift) == pytest.approx(values[-1], rel=1e-9)


def test_Q2_permutation_test_separates_different_laws_only():
    """Q2 as a two-sample statistic: against 200 random re-splits of the pooled vectors (the permutation null),
    two sets from one law rank in the bulk, two sets whose laws differ (a 0.4 shift in one of 4 dimensions,
    or a variance scaled by 1.5) rank above every re-split."""
    rng = np.random.default_rng(7)
    n, d = 300, 4

    def rank(x, y):
        pooled = np.concatenate([x, y])
        null = []
        for _ in range(200):
            p = rng.permutation(len(pooled))
            null.append(quality.frechet_distance_of_samples(pooled[p[:n]], pooled[p[n:]]))
        return float(np.mean(np.array(null) < quality.frechet_distance_of_samples(x, y)))

    same = rank(rng.standard_normal((n, d)), rng.standard_normal((n, d)))
    assert 0.02 < same < 0.98, same
    shifted = rng.standard_normal((n, d)) + np.array([0.4, 0.0, 0.0, 0.0])
    assert rank(rng.standard_normal((n, d)), shifted) == 1.0
    assert rank(rng.standard_normal((n, d)), rng.standard_normal((n, d)) * [1.5, 1, 1, 1]) == 1.0


def test_Q1_Q2_bad_input():
    """Q1, Q2: bad arguments raise an error naming the argument."""
    eye = np.eye(2)
    cases = [
        (lambda: quality.frechet_distance(np.zeros(3), eye, np.zeros(2), eye), ValueError, r"cov1 must have shape"),
        (lambda: quality.frechet_distance(np.zeros(2), eye, np.zeros(3), np.eye(3)), ValueError, r"same dimension"),
        (lambda: quality.frechet_distance(np.zeros((2, 1)), eye, np.zeros(2), eye), ValueError, r"mean1 must be"),
        (lambda: quality.frechet_distance(np.zeros(2), [[1, 1], [0, 1]], np.zeros(2), eye), ValueError,
         r"cov1 must be symmetric"),
        (lambda: quality.frechet_distance(np.zeros(2), eye, np.zeros(2), -eye), ValueError,
         r"cov2 must be positive semi-definite"),
        (lambda: quality.frechet_distance(np.zeros(2), eye, [0.0, np.nan], eye), ValueError, r"mean2 must be finite"),
        (lambda: quality.frechet_distance("a", eye, np.zeros(2), eye), TypeError, r"mean1 must be a numeric"),
        (lambda: quality.gaussian_fit(np.zeros((1, 3))), ValueError, r"features must be a 2-D array"),
        (lambda: quality.gaussian_fit(np.zeros(5)), ValueError, r"features must be a 2-D array"),
        (lambda: quality.frechet_distance_of_samples(np.zeros((4, 2)), np.zeros((4, 3))), ValueError,
         r"features1 and features2"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
