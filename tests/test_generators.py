"""Synthetic generators keep their docstrings' promises: every class present (or a clear error),
same seed same data, separable where they say so."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from marginlab import data, differential, linear
from marginlab import lowrank as L


def _linearly_separable_multiclass(X: np.ndarray, y: np.ndarray, k: int) -> bool:
    """Whether some bias-free U (d, k) has x_i·(u_{y_i} − u_j) ≥ 1 for every i and j ≠ y_i (an LP)."""
    n, d = X.shape
    rows = []
    for i in range(n):
        for j in range(k):
            if j != y[i]:
                a = np.zeros((d, k))
                a[:, y[i]], a[:, j] = -X[i], X[i]  # −x_i·(u_{y_i} − u_j) ≤ −1
                rows.append(a.ravel())
    res = linprog(np.zeros(d * k), A_ub=np.array(rows), b_ub=-np.ones(len(rows)), bounds=(None, None),
                  method="highs")
    return res.status == 0


@settings(max_examples=60, deadline=None)
@given(k=st.integers(2, 7), extra=st.integers(0, 40), d=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_random_feature_problem_has_every_class(k, extra, d, seed):
    """Every class 0..K−1 occurs, for any n ≥ K (issue 15: k=5, seed=103 had only four)."""
    n = k + extra
    X, y = L.random_feature_problem(n, d, num_classes=k, seed=seed)
    assert X.shape == (n, d) and y.shape == (n,) and y.dtype == torch.int64
    assert sorted(torch.unique(y).tolist()) == list(range(k))
    X2, y2 = L.random_feature_problem(n, d, num_classes=k, seed=seed)
    assert torch.equal(X, X2) and torch.equal(y, y2)  # same seed, same problem


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
def test_random_feature_problem_binary_in_one_dimension(n, seed):
    """d = 1: the teacher is a sign, so both signs of x must occur; even n = 2 gets both classes."""
    _, y = L.random_feature_problem(n, 1, seed=seed)
    assert sorted(torch.unique(y).tolist()) == [0, 1]


@pytest.mark.parametrize("k, seed", [(5, 103), (4, 41), (5, 36), (3, 0), (6, 7)])
def test_random_feature_problem_separable_by_a_linear_teacher(k, seed):
    """The labels come from a bias-free linear argmax, so an LP finds one; the fallback teacher included
    ((5, 103), (4, 41) and (5, 36) left a class empty on the first draw)."""
    X, y = L.random_feature_problem(12 * k, 6, num_classes=k, seed=seed)
    assert len(torch.unique(y)) == k
    assert _linearly_separable_multiclass(X.numpy(), y.numpy(), k)


def test_random_feature_problem_keeps_first_draw():
    """Where the first Gaussian teacher already gives every class, the data are what they always were
    (chapter 3 and the golden values in test_lowrank use seeds 0 and 1)."""
    for n, d, k, seed in [(40, 10, 2, 0), (60, 10, 4, 1), (30, 8, 2, 1)]:
        g = torch.Generator().manual_seed(seed)
        X0 = torch.randn(n, d, generator=g, dtype=torch.float64)
        y0 = (X0 @ torch.randn(d, k, generator=g, dtype=torch.float64)).argmax(1)
        X, y = L.random_feature_problem(n, d, num_classes=k, seed=seed)
        assert torch.equal(X, X0) and torch.equal(y, y0)


def test_random_feature_problem_bad_input():
    with pytest.raises(ValueError, match="num_classes"):
        L.random_feature_problem(4, 3, num_classes=5)  # fewer inputs than classes
    with pytest.raises(ValueError, match="d=1"):
        L.random_feature_problem(20, 1, num_classes=3)  # a scalar's linear argmax has two regions
    with pytest.raises(ValueError):
        L.random_feature_problem(1, 3)
    with pytest.raises(ValueError):
        L.random_feature_problem(10, 3, num_classes=1)


# ---- the binary generators of data, linear and differential: both classes, as documented ----------------


@settings(max_examples=25, deadline=None)
@given(n_pos=st.integers(1, 12), n_neg=st.integers(1, 12), d=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_gaussian_blobs_counts(n_pos, n_neg, d, seed):
    X, y = data.gaussian_blobs((n_pos, n_neg), [np.zeros(d), np.ones(d)], 1.0, seed=seed)
    assert X.shape == (n_pos + n_neg, d)
    assert (y == 1).sum() == n_pos and (y == -1).sum() == n_neg


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), sub=st.integers(1, 4), extra=st.integers(1, 3), gap=st.floats(0.1, 2.0),
       seed=st.integers(0, 10_000))
def test_affine_subspace_data_separable(n, sub, extra, gap, seed):
    """Both classes, on an affine subspace at the stated offset, separable through the origin."""
    X, y, basis = data.affine_subspace_data(n, sub + extra, sub, offset=3.0, gap=gap, seed=seed)
    assert (y == 1).sum() == (n + 1) // 2 and (y == -1).sum() == n // 2
    foot = X[0] - basis @ (basis.T @ X[0])  # the subspace's point closest to the origin
    assert np.linalg.norm(foot) == pytest.approx(3.0)
    assert linear.is_separable(X, y.astype(float), bias=False)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), k=st.integers(1, 4), extra=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_affine_subspace_instance_both_classes(n, k, extra, seed):
    X, y, R, delta = linear.affine_subspace_instance(n, k, k + extra, shift=2.0, seed=seed)
    assert set(np.unique(y)) == {-1.0, 1.0}
    assert np.allclose(X @ R.T, delta)  # every point at offset Δ along each normal
    assert linear.is_separable(X, y, bias=False)


@settings(max_examples=20, deadline=None)
@given(n_pos=st.integers(1, 8), n_neg=st.integers(1, 8), dim=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_differential_generators_counts(n_pos, n_neg, dim, seed):
    for _, y in (differential.random_clusters(n_pos, n_neg, dim, 3.0, 0.5, seed),
                 differential.imbalanced_gaussians(n_pos, n_neg, seed)):
        assert (y == 1).sum() == n_pos and (y == -1).sum() == n_neg
    _, y = differential.fig3_data(n_pos, n_neg, seed)
    assert (y == 1).sum() == n_pos and (y == -1).sum() == n_neg


@pytest.mark.parametrize("make", [differential.imbalanced_gaussians, differential.fig3_data])
def test_differential_generators_refuse_an_empty_class(make):
    for counts, name in (((0, 3), "n_pos|n_blue"), ((3, 0), "n_neg|n_red")):
        with pytest.raises(ValueError, match=name):
            make(*counts)
