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


def _cor1_pair(nx, a, phi):
    """x of norm nx at angle phi and the paper's y_p with x·y_p = 1 (a: component across x)."""
    x = nx * np.array([np.cos(phi), np.sin(phi)])
    perp = np.array([-x[1], x[0]]) / nx
    return x, x / nx**2 + a * perp


@FAST
@given(st.floats(1e-3, 30), st.floats(-300, 300), st.floats(0, 6.28))
def test_corollary1_exact_value_and_two_sided_bound(nx, a, phi):
    x, y_p = _cor1_pair(nx, a, phi)
    cos2 = np.cos(np.radians(linear.two_point_angle(x, -y_p))) ** 2
    assert linear.corollary1_cos2(x, -y_p) == pytest.approx(cos2, rel=1e-7, abs=1e-12)
    # 4/(4 + Q) < cos²ψ ≤ 4/(2 + Q): ψ → 90° iff Q → ∞
    assert linear.corollary1_cos2_lower_bound(x, -y_p) < cos2 * (1 + 1e-9) + 1e-15
    assert cos2 <= linear.corollary1_cos2_bound(x, -y_p) * (1 + 1e-9)


def test_corollary1_sigma_term_golden():
    x, y_p = np.array([1.0, 0.0]), np.array([1.0, 3.0])  # σ_x = 2, σ_y = 11
    assert linear.corollary1_sigma_term(x, -y_p) == pytest.approx(11 / 2 * (1 - 1 / 2))
    exact = 4 / (13 * (1 / 4 + 2 / 22 + 10 / 121))
    assert linear.corollary1_cos2(x, -y_p) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("theta_deg", [0.0, 30.0, 60.0, 80.0])
def test_corollary1_small_x_limit(theta_deg):
    t = np.radians(theta_deg)
    c = 1 / np.cos(t)
    limit = linear.corollary1_small_x_limit(c)
    errs = []
    for eps in (1e-1, 1e-2, 1e-3, 1e-4):
        x, y_p = eps * np.array([1.0, 0.0]), np.array([1.0, np.tan(t)]) / eps   # x·y_p = 1, ||x||·||y_p|| = c
        errs.append(abs(linear.two_point_angle(x, -y_p) - limit))
    assert errs[-1] < 1e-4 and errs[-1] <= errs[0]
    assert 0 <= limit < 90


def test_corollary1_small_x_limit_golden():
    assert linear.corollary1_small_x_limit(1.0) == pytest.approx(0.0, abs=1e-6)
    assert linear.corollary1_small_x_limit(2.0) == pytest.approx(np.degrees(np.arccos(2 / np.sqrt(7))), rel=1e-12)
    assert linear.corollary1_small_x_limit(1e8) == pytest.approx(90.0, abs=1e-5)
    with pytest.raises(ValueError, match="norm_product"):
        linear.corollary1_small_x_limit(0.5)


@FAST
@given(st.floats(1e-2, 10), st.floats(-100, 100), st.floats(0, 6.28))
def test_two_point_augmented_angle_closed_form(nx, a, phi):
    # with x·y_p = 1 (σ_xy = 0) the augmented limit is x̄/σ_x + ȳ/σ_y and cos² of its angle to x̄ + ȳ is 4σ_xσ_y/(σ_x+σ_y)²
    x, y_p = _cor1_pair(nx, a, phi)
    sx, sy = x @ x + 1, y_p @ y_p + 1
    cos2 = np.cos(np.radians(linear.two_point_angle(x, -y_p, augmented=True))) ** 2
    assert cos2 == pytest.approx(4 * sx * sy / (sx + sy) ** 2, rel=1e-7, abs=1e-12)


def test_collinear_pair_weight_angle_zero_augmented_angle_to_90():
    for eps in (1e-1, 1e-2, 1e-3):
        x, y_p = np.array([eps, 0.0]), np.array([1 / eps, 0.0])
        assert linear.two_point_angle(x, -y_p) == pytest.approx(0.0, abs=1e-6)
        assert linear.two_point_angle(x, -y_p, augmented=True) > 90 - 200 * eps
        # ... while the cross-entropy [w, b] equals the SVM's [w, b] (two active constraints fix both)
        w, b = linear.svm(np.vstack([x, -y_p]), np.array([1.0, -1.0]))
        np.testing.assert_allclose(linear.two_point_limit(x, -y_p), np.append(w, b), rtol=1e-5, atol=1e-8)


@FAST
@given(st.integers(0, 100_000))
def test_near_subspace_summary_slack_at_least_gap(seed):
    X, y, R, dl = linear.random_near_subspace_instance(seed)
    r = linear.near_subspace_summary(X, y, R, dl)
    tol = 1e-6 / r["margin"] ** 2
    assert r["margin"] <= r["bound"] * (1 + 1e-6) and r["margin"] <= r["svm_margin"] * (1 + 1e-6)
    assert r["slack"] >= r["gap"] - tol                        # equality iff w̄ = Σ max(BΔ_k, 0) r_k
    assert (r["bound"] == np.inf) == (r["signs"] == "all <= 0")
    if r["signs"] == "all >= 0":
        assert r["printed_holds"] and r["printed_bound"] == pytest.approx(r["bound"], rel=1e-12)
    assert r["bound"] == pytest.approx(linear.near_subspace_bound(X, y, R, dl), rel=1e-5)
    assert r["printed_bound"] == pytest.approx(linear.near_subspace_bound_as_stated(X, y, R, dl), rel=1e-5)


@pytest.mark.parametrize("seed,k,d", [(0, 1, 2), (1, 2, 5), (2, 3, 4)])
def test_near_subspace_bound_attained(seed, k, d):
    X, y, R, dl = linear.near_subspace_attaining_instance(14, k, d, seed=seed)
    r = linear.near_subspace_summary(X, y, R, dl)
    assert r["signs"] == "all >= 0" and r["gap"] < 1e-9
    assert r["margin"] == pytest.approx(r["bound"], rel=1e-6)
    assert r["margin"] == pytest.approx((1 + dl @ dl) / np.linalg.norm(dl), rel=1e-6)
    assert r["B"] == pytest.approx(1 / (1 + dl @ dl), rel=1e-5)


def test_near_subspace_printed_bound_can_hold_with_negative_terms():
    # some BΔ_k < 0 is outside the printed proof but not always a failure: both outcomes occur
    outcomes = set()
    for seed in range(40):
        r = linear.near_subspace_summary(*linear.random_near_subspace_instance(seed))
        if r["signs"] != "all >= 0":
            outcomes.add(r["printed_holds"])
    assert outcomes == {True, False}


@FAST
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 6), st.floats(0.0, 20.0))
def test_p2_margin_depends_on_offset_only_through_its_norm(seed, m1, m2, norm):
    rng = np.random.default_rng(seed)
    X, y, _, _ = linear.affine_subspace_instance(10, 2, 3, shift=0.0, seed=seed)
    P = X @ np.linalg.svd(X)[2][:2].T + rng.normal(0, 5, 2)
    u1, u2 = rng.normal(size=m1), rng.normal(size=m2)
    u1 *= norm / np.linalg.norm(u1)
    u2 *= norm / np.linalg.norm(u2)
    X1, _, _ = linear.offset_embedding(P, u1)
    X2, R2, d2 = linear.offset_embedding(P, u2, rotation_seed=seed)
    np.testing.assert_allclose(X2 @ R2.T, np.broadcast_to(d2, (len(y), m2)), atol=1e-9)   # on the subspace
    m_1, m_2 = linear.bias_penalized_margin(X1, y), linear.bias_penalized_margin(X2, y)
    assert m_1 == pytest.approx(m_2, rel=1e-5)
    assert m_1 == pytest.approx(linear.offset_margin(P, y, norm), rel=1e-5)


def test_offset_margin_limits():
    X, y, _, _ = linear.affine_subspace_instance(12, 2, 3, shift=0.0, seed=3)
    P = X @ np.linalg.svd(X)[2][:2].T + np.array([4.0, -2.0])
    assert linear.offset_margin(P, y, 0.0) == pytest.approx(linear.bias_penalized_margin(P, y), rel=1e-5)
    gamma = linear.margin(*linear.svm(P, y), P, y)
    assert linear.offset_margin(P, y, 1e4) == pytest.approx(gamma, rel=1e-4)   # the bias becomes free: P1


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
    with pytest.raises(ValueError, match="x·"):
        linear.corollary1_cos2(np.array([1.0, 0.0]), np.array([2.0, 0.0]))
    with pytest.raises(ValueError, match="offset"):
        linear.offset_embedding(np.zeros((3, 2)), np.zeros(0))
    with pytest.raises(ValueError, match="offset_norm"):
        linear.offset_margin(*_blobs(0), -1.0)
    with pytest.raises(ValueError, match="max_k"):
        linear.random_near_subspace_instance(0, max_k=0)
    with pytest.raises(ValueError, match="near-subspace"):
        Xb, yb = _blobs(0)
        linear.near_subspace_summary(Xb, yb, np.eye(3)[:1], [1e3])
    assert not linear.is_separable(X, xor) and linear.is_separable(*_blobs(1))
