"""Tests for marginlab.linear: SVM problems, two-point closed form, GD/flow, and the bounds of 000/001."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marginlab import linear

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _blobs(seed, n=8, d=3, sep=4.0):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    c = rng.normal(0, 3, d)
    X = np.vstack([c + sep * u + rng.normal(size=(n, d)), c - sep * u + rng.normal(size=(n, d))])
    return X, np.repeat([1.0, -1.0], n)


def _dual_svm(X, y):
    """Independent solver: the SVM dual max Σα − ½‖Σα_i y_i x_i‖², Σα_i y_i = 0, α ≥ 0 (cvxpy)."""
    import cvxpy as cp

    a = cp.Variable(len(y))
    prob = cp.Problem(cp.Maximize(cp.sum(a) - 0.5 * cp.sum_squares(cp.multiply(a, y) @ X)), [a >= 0, a @ y == 0])
    prob.solve(solver=cp.CLARABEL)
    alpha = np.maximum(a.value, 0)
    w = (alpha * y) @ X
    sv = alpha > 1e-6 * alpha.max()
    b = float(np.mean(y[sv] - X[sv] @ w))
    return w, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_svm_matches_dual_and_sklearn(seed):
    from sklearn.svm import SVC

    X, y = _blobs(seed)
    w, b = linear.svm(X, y)
    wd, bd = _dual_svm(X, y)
    np.testing.assert_allclose(w, wd, rtol=1e-5, atol=1e-6 * np.linalg.norm(w))
    assert abs(b - bd) <= 1e-5 * max(1.0, abs(b))
    clf = SVC(kernel="linear", C=1e8, tol=1e-10).fit(X, y)
    np.testing.assert_allclose(w, clf.coef_[0], rtol=1e-4, atol=1e-4 * np.linalg.norm(w))
    assert np.min(y * (X @ w + b)) == pytest.approx(1.0, abs=1e-6)


def test_bias_penalized_svm_is_augmented_svm_through_origin():
    X, y = _blobs(3)
    w, b = linear.bias_penalized_svm(X, y)
    wa, _ = linear.svm(linear.augment(X), y, bias=False)
    np.testing.assert_allclose(np.append(w, b), wa, rtol=1e-5, atol=1e-7)
    assert np.min(y * (X @ w + b)) == pytest.approx(1.0, abs=1e-6)
    assert linear.margin(w, b, X, y) == pytest.approx(1 / np.linalg.norm(w), rel=1e-6)


def test_two_point_limit_golden_and_gd():
    x, yn = np.array([1.0, 1.0]), np.array([-2.0, -1.0])
    lim = linear.two_point_limit(x, yn)
    np.testing.assert_allclose(lim, [3 / 7, 5 / 14, 3 / 14], rtol=1e-12)
    X, y = np.vstack([x, yn]), np.array([1.0, -1.0])
    W, b = linear.logistic_path(X, y, [1e12], lr=0.1)
    err = np.linalg.norm(np.append(W[0], b[0]) / np.log(1e12) - lim) / np.linalg.norm(lim)
    assert err < 0.06
    # the flow is plain GD in the small-step limit
    w_gd, b_gd = linear.logistic_gd(X, y, steps=2000, lr=0.1)
    Wf, bf = linear.logistic_path(X, y, [2000], lr=0.1)
    np.testing.assert_allclose(np.append(w_gd, b_gd), np.append(Wf[0], bf[0]), rtol=5e-3)


@FAST
@given(st.lists(st.floats(-3, 3), min_size=4, max_size=4))
def test_two_point_limit_matches_long_gradient_flow(v):
    x, yn = np.array(v[:2]), np.array(v[2:])
    if np.linalg.norm(x - yn) < 0.3:
        return
    lim = linear.two_point_limit(x, yn)
    X, y = np.vstack([x, yn]), np.array([1.0, -1.0])
    W, b = linear.logistic_path(X, y, [1e10, 1e14], lr=0.1)
    e = [np.linalg.norm(np.append(w, bb) / np.log(t) - lim) / np.linalg.norm(lim) for w, bb, t in zip(W, b, [1e10, 1e14])]
    assert e[1] < e[0] + 1e-9 and e[1] < 0.35
    # ... and the limit is the bias-penalised (P2) solution
    np.testing.assert_allclose(lim, np.append(*linear.bias_penalized_svm(X, y)), rtol=1e-4, atol=1e-6)


@FAST
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(1, 4), st.floats(-4, 4), st.floats(0, 10))
def test_affine_subspace_bound_holds(seed, k, m, shift, along):
    X, y, R, dl = linear.affine_subspace_instance(12, k, k + m, shift=shift, seed=seed)
    X = X + along * np.linalg.svd(X - X.mean(0))[2][0]
    w, b = linear.bias_penalized_svm(X, y)
    bound = linear.affine_subspace_bound(X, y, R, dl)
    ws, bs = linear.svm(X, y)
    assert linear.margin(w, b, X, y) <= bound * (1 + 1e-6)
    assert bound <= linear.margin(ws, bs, X, y) * (1 + 1e-6)


@FAST
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(1, 3))
def test_near_subspace_bound_corrected_holds(seed, k, m):
    rng = np.random.default_rng(seed)
    X, y, R, dl = linear.affine_subspace_instance(12, k, k + m, shift=rng.normal(0, 2, m), seed=seed)
    X = X + rng.uniform(0, 8) * np.linalg.svd(X - X.mean(0))[2][0]
    X = X + (np.abs(rng.normal(0, 0.5, (len(y), m))) * y[:, None]) @ R
    w, b = linear.bias_penalized_svm(X, y)
    mg = linear.margin(w, b, X, y)
    assert mg <= linear.near_subspace_bound(X, y, R, dl) * (1 + 1e-6)
    if np.all(b * dl >= 0):
        assert mg <= linear.near_subspace_bound_as_stated(X, y, R, dl) * (1 + 1e-6)


def test_near_subspace_printed_bound_counterexample():
    X, y = np.array([[-1.0], [-3.0]]), np.array([1.0, -1.0])
    w, b = linear.bias_penalized_svm(X, y)
    np.testing.assert_allclose([w[0], b], [1.0, 2.0], atol=1e-6)
    assert linear.near_subspace_bound_as_stated(X, y, [[1.0]], [-2.0]) == pytest.approx(0.25, rel=1e-6)
    assert linear.near_subspace_bound(X, y, [[1.0]], [-2.0]) == np.inf


@FAST
@given(st.floats(0.2, 5), st.floats(-50, 50), st.floats(0, 6.28))
def test_corollary1_bound(nx, a, phi):
    x = nx * np.array([np.cos(phi), np.sin(phi)])
    perp = np.array([-x[1], x[0]]) / nx
    y_p = x / nx**2 + a * perp  # x·y_p = 1
    c2 = np.cos(np.radians(linear.two_point_angle(x, -y_p))) ** 2
    assert c2 <= linear.corollary1_cos2_bound(x, -y_p) + 1e-9


def test_differential_gd_and_bias():
    X, y = _blobs(4, d=2)
    w = linear.differential_gd(X, y, steps=300, lr=1e-3)
    W = linear.differential_path(X, y, [300], lr=1e-3, method="gd")
    np.testing.assert_allclose(w, W[0], rtol=1e-10)
    b = linear.differential_bias(w, X, y)
    assert linear.margin(w, b, X, y) > 0
    s = X @ w
    assert (s[y > 0].min() + b) == pytest.approx(-(s[y < 0].max() + b))


def test_one_step_condition_implies_separation():
    X, y = _blobs(5, n=6, d=2, sep=30.0)
    cond = linear.one_step_condition(X, y)
    assert cond["holds"] and linear.one_step_separates(X, y)


def test_errors():
    X = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    xor = np.array([1.0, 1.0, -1.0, -1.0])
    for f in (linear.svm, linear.bias_penalized_svm):
        with pytest.raises(ValueError, match="separable"):
            f(X, xor)
    with pytest.raises(ValueError, match="labels"):
        linear.svm(X, np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="shape"):
        linear.svm(X, np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="2-D"):
        linear.svm(np.zeros(4), xor)
    with pytest.raises(ValueError):
        linear.two_point_limit(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="lr"):
        linear.logistic_gd(X[:2], np.array([1.0, -1.0]), steps=10, lr=-1.0)
    with pytest.raises(ValueError, match="affine subspace"):
        Xb, yb = _blobs(0)
        R, dl = np.eye(3)[:1], np.zeros(1)
        linear.affine_subspace_bound(Xb, yb, R, dl)
    with pytest.raises(ValueError, match="x·"):
        linear.corollary1_cos2_bound(np.array([1.0, 0.0]), np.array([2.0, 0.0]))
    assert not linear.is_separable(X, xor) and linear.is_separable(*_blobs(1))
