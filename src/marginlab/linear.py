"""Linear classifiers on separable data: SVM problems, gradient descent on cross-entropy and on the
differential (pairwise) loss, the two-point closed form and the margin bounds of Nar et al.

Papers: Nar et al. 2019a, *Cross-Entropy Loss and Low-Rank Features Have Responsibility for
Adversarial Examples* (arXiv:1901.08360); Nar et al. 2019b, *Cross-Entropy Loss Leads To Poor Margins*
(ICLR 2019 submission). The chapters call them 000 and 001.

Conventions (numpy float64 in and out):

* ``X`` has shape (n, d); labels ``y`` are in {-1, +1}. A linear classifier is ``(w, b)`` with
  decision ``sign(w·x + b)``.
* "Augmented" vectors append a constant feature: ``x̃ = [x, 1]``, ``w̃ = [w, b]`` (Nar et al. 2019b §2). With
  ``z_i = y_i x̃_i`` the cross-entropy (logistic) loss is ``Σ_i log(1 + exp(-w̃·z_i))`` (Nar et al. 2019b eq. 3).
* Time. Gradient descent with learning rate ``lr`` is the explicit Euler discretisation of the
  gradient flow ``dw̃/dt = lr · Σ_i z_i σ(-w̃·z_i)`` (Nar et al. 2019b Thm 1 uses this continuous-time model
  with δ = lr), so *time t = number of GD steps*. Long horizons (t up to 1e12) are integrated on
  the flow in the log-time variable ``s = log(1 + t)`` with ``scipy.integrate.solve_ivp``
  (LSODA, rtol 1e-10): in ``s`` the right-hand side ``lr · e^s Σ z σ(-w̃·z)`` stays O(1) because the
  margins grow like log t, so the integrator takes O(1) steps per decade instead of one per GD
  step. ``method="gd"`` runs the exact discrete iteration instead (vectorised; for validation and
  moderate horizons).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy.integrate import solve_ivp
from scipy.special import expit

Array = np.ndarray

__all__ = [
    "check_data", "augment", "is_separable", "svm", "bias_penalized_svm", "margin", "margins", "angle",
    "two_point_limit", "two_point_regime", "two_point_angle", "corollary1_cos2_bound",
    "corollary1_cos2", "corollary1_sigma_term", "corollary1_cos2_lower_bound", "corollary1_small_x_limit",
    "logistic_gd", "logistic_path", "differential_gd", "differential_path", "differential_bias",
    "affine_hull", "affine_subspace_bound", "near_subspace_bound", "near_subspace_bound_as_stated",
    "near_subspace_summary", "bias_penalized_margin", "offset_embedding", "offset_margin",
    "one_step_condition", "one_step_separates", "confidence", "gaussian_two_class",
    "affine_subspace_instance", "random_near_subspace_instance", "near_subspace_attaining_instance",
]


# ---- validation --------------------------------------------------------------------------------


def check_data(X, y, *, need_both: bool = True) -> tuple[Array, Array]:
    """Validate a labelled data set; return float64 copies ``X`` (n, d) and ``y`` (n,) in {-1, +1}."""
    X = np.array(X, dtype=np.float64)
    y = np.array(y, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n, d), got shape {X.shape}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y must have shape ({X.shape[0]},) to match X, got {y.shape}")
    if X.shape[0] == 0:
        raise ValueError("empty data set")
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or infinite values")
    if not np.all(np.isin(y, (-1.0, 1.0))):
        raise ValueError(f"labels must be in {{-1, +1}}, got values {np.unique(y)[:5]}")
    if need_both and not (np.any(y > 0) and np.any(y < 0)):
        raise ValueError("both classes (+1 and -1) must be present")
    return X, y


def augment(X: Array) -> Array:
    """``[x, 1]`` for every row (Nar et al. 2019b §2: the bias as a weight on a constant feature)."""
    X = np.asarray(X, dtype=np.float64)
    return np.hstack([X, np.ones((X.shape[0], 1))])


def _signed(X: Array, y: Array, bias: bool) -> Array:
    """Rows ``z_i = y_i x̃_i`` (augmented when ``bias``): the loss is Σ log(1 + exp(-w̃·z_i))."""
    return y[:, None] * (augment(X) if bias else X)


def is_separable(X, y, bias: bool = True) -> bool:
    """Strict linear separability, by an LP feasibility problem: ∃(w, b) with y_i(w·x_i + b) ≥ 1."""
    from scipy.optimize import linprog

    X, y = check_data(X, y)
    Z = _signed(X, y, bias)
    # maximise t subject to z_i·w ≥ t, -1 ≤ w ≤ 1 (bounded, always feasible): separable iff t* > 0
    n, D = Z.shape
    c = np.zeros(D + 1)
    c[-1] = -1.0
    A = np.hstack([-Z, np.ones((n, 1))])
    res = linprog(c, A_ub=A, b_ub=np.zeros(n), bounds=[(-1, 1)] * D + [(None, 1)], method="highs")
    scale = max(1.0, float(np.abs(Z).max()))
    return bool(res.status == 0 and -res.fun > 1e-9 * scale)


def _require_separable(X: Array, y: Array, bias: bool, what: str) -> None:
    if not is_separable(X, y, bias=bias):
        kind = "linearly separable" if bias else "linearly separable by a hyperplane through the origin"
        raise ValueError(f"{what} needs data that are {kind}; these are not")


# ---- SVM problems (Nar et al. 2019b P1, P2, eq. 4) ---------------------------------------------------------


def _solve_qp(X: Array, y: Array, penalize_bias: bool, bias: bool) -> tuple[Array, float]:
    import cvxpy as cp

    n, d = X.shape
    w = cp.Variable(d)
    b = cp.Variable() if bias else cp.Constant(0.0)
    objective = cp.sum_squares(w) + (cp.square(b) if (bias and penalize_bias) else 0)
    prob = cp.Problem(cp.Minimize(objective), [cp.multiply(y, X @ w + b) >= 1])
    try:
        prob.solve(solver=cp.CLARABEL)
    except cp.error.SolverError:  # pragma: no cover - fall back when Clarabel is absent
        prob.solve()
    if prob.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        raise ValueError("the data are not linearly separable (the hard-margin problem is infeasible)")
    if prob.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise RuntimeError(f"SVM solver failed with status {prob.status!r}")
    return np.asarray(w.value, dtype=np.float64), float(b.value) if bias else 0.0


def svm(X, y, bias: bool = True) -> tuple[Array, float]:
    """Hard-margin SVM (Nar et al. 2019b P1): min ||w||² s.t. y_i (w·x_i + b) ≥ 1, solved with cvxpy (Clarabel).

    ``bias=False`` forces b = 0 (a hyperplane through the origin). Raises ValueError on
    non-separable data. The optimal margin is γ = 1/||w||.
    """
    X, y = check_data(X, y)
    _require_separable(X, y, bias, "svm")
    return _solve_qp(X, y, penalize_bias=False, bias=bias)


def bias_penalized_svm(X, y) -> tuple[Array, float]:
    """The problem GD on cross-entropy with a bias actually solves (Nar et al. 2019b P2 = eq. 4;
    Nar et al. 2019a eq. 9):
    min ||w||² + b² s.t. y_i (w·x_i + b) ≥ 1. Equals the hard-margin SVM through the origin in
    the augmented space ``[x, 1]``. Raises ValueError on non-separable data.
    """
    X, y = check_data(X, y)
    _require_separable(X, y, True, "bias_penalized_svm")
    return _solve_qp(X, y, penalize_bias=True, bias=True)


def margins(w, b, X, y) -> Array:
    """Signed distances y_i (w·x_i + b) / ||w|| of every point to the hyperplane (w, b)."""
    X, y = check_data(X, y, need_both=False)
    w = np.asarray(w, dtype=np.float64).ravel()
    if w.shape[0] != X.shape[1]:
        raise ValueError(f"w has {w.shape[0]} entries but X has {X.shape[1]} columns")
    nw = np.linalg.norm(w)
    if nw == 0:
        raise ValueError("the margin is undefined for w = 0: it defines no hyperplane")
    return y * (X @ w + float(b)) / nw


def margin(w, b, X, y) -> float:
    """The margin min_i y_i (w·x_i + b) / ||w|| (negative when a point is misclassified)."""
    return float(margins(w, b, X, y).min())


def angle(u, v, degrees: bool = True) -> float:
    """The angle between two vectors (degrees by default)."""
    u = np.asarray(u, dtype=np.float64).ravel()
    v = np.asarray(v, dtype=np.float64).ravel()
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0:
        raise ValueError("angle of a zero vector is undefined")
    a = math.acos(float(np.clip(u @ v / (nu * nv), -1.0, 1.0)))
    return math.degrees(a) if degrees else a


# ---- two-point problem (Nar et al. 2019b §2, Thm 1, Cor 1) -------------------------------------------------


def _two_point_vectors(x, y, bias: bool) -> tuple[Array, Array]:
    """Paper notation: x̄ = [x, 1] for the class +1 point and ȳ = [-y_neg, -1] = -[y_neg, 1]."""
    x = np.asarray(x, dtype=np.float64).ravel()
    yn = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != yn.shape or x.size == 0:
        raise ValueError(f"x and y must be 1-D vectors of the same length, got {x.shape} and {yn.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(yn))):
        raise ValueError("x and y must be finite")
    xb = np.append(x, 1.0) if bias else x
    yb = -(np.append(yn, 1.0) if bias else yn)
    return xb, yb


def two_point_regime(x, y, bias: bool = True) -> str:
    """Which case of Nar et al. 2019b Thm 1 applies (after ordering so that ||x̄|| ≤ ||ȳ||): ``"both"`` when
    σ_xy < σ_x (both points are support vectors; includes σ_xy < 0, = 0 and 0 < σ_xy < σ_x,
    Lemmas 5, 1, 7 of the proof) or ``"one"`` when σ_xy ≥ σ_x (only the shorter point, Lemma 8)."""
    xb, yb = _two_point_vectors(x, y, bias)
    sx, sy, sxy = xb @ xb, yb @ yb, xb @ yb
    return "one" if sxy >= min(sx, sy) else "both"


def two_point_limit(x, y, bias: bool = True) -> Array:
    """lim_{t→∞} w̃(t)/log t for GD from zero on cross-entropy with two points (Nar et al. 2019b Thm 1, eq. 2).

    ``x`` is the class +1 point, ``y`` the class -1 point (the paper's -y). Returns the augmented
    vector [w, b] of length d+1 (length d with ``bias=False``). With x̄ = [x, 1], ȳ = [-y, -1],
    σ_x = ||x̄||², σ_y = ||ȳ||², σ_xy = x̄·ȳ and (w.l.o.g., as in the theorem) σ_x ≤ σ_y:

    * σ_xy < σ_x:  ((σ_y − σ_xy) x̄ + (σ_x − σ_xy) ȳ) / (σ_x σ_y − σ_xy²)
    * σ_xy ≥ σ_x:  x̄ / σ_x

    i.e. the minimum-norm ũ with ũ·x̄ ≥ 1 and ũ·ȳ ≥ 1 (Nar et al. 2019b eq. 4). The formula is applied
    symmetrically, so the ordering of the norms is not required of the caller. The limit does
    not depend on the learning rate (a rescaling of time only shifts log t by a constant).
    """
    xb, yb = _two_point_vectors(x, y, bias)
    sx, sy, sxy = xb @ xb, yb @ yb, xb @ yb
    det = sx * sy - sxy**2
    if det <= 1e-12 * sx * sy and sxy < 0:
        raise ValueError("the two points coincide (x̄ = −ȳ): they cannot be separated")
    short, long_, s_short, s_long = (xb, yb, sx, sy) if sx <= sy else (yb, xb, sy, sx)
    if sxy >= s_short:
        return short / s_short
    return ((s_long - sxy) * short + (s_short - sxy) * long_) / det


def two_point_angle(x, y, degrees: bool = True, augmented: bool = False) -> float:
    """Angle ψ between the Thm 1 limit and the SVM direction x − y_neg (the paper's x + y): Nar et al. 2019b,
    Corollary 1.

    By default the weight part of the limit (the normal of the decision boundary, as in the
    paper's proof) is compared with x − y_neg in R^d. ``augmented=True`` compares the whole
    limit [w, b] with x̄ + ȳ = [x − y_neg, 0] in R^(d+1) instead: a different angle, which is not
    the angle between decision boundaries.
    """
    lim = two_point_limit(x, y)
    svm_dir = np.asarray(x, float).ravel() - np.asarray(y, float).ravel()
    if augmented:
        return angle(lim, np.append(svm_dir, 0.0), degrees=degrees)
    return angle(lim[:-1], svm_dir, degrees=degrees)


def _corollary1_sigmas(x, y, tol: float) -> tuple[float, float]:
    """σ_x = ||x||² + 1 and σ_y = ||y_p||² + 1 (y_p = −y_neg, the paper's y), after checking x·y_p = 1."""
    x = np.asarray(x, dtype=np.float64).ravel()
    yp = -np.asarray(y, dtype=np.float64).ravel()
    if x.shape != yp.shape or x.size == 0:
        raise ValueError(f"x and y must be 1-D vectors of the same length, got {x.shape} and {yp.shape}")
    if abs(x @ yp - 1.0) > tol * max(1.0, abs(x @ yp)):
        raise ValueError(f"Corollary 1 needs x·(−y) = 1, got {x @ yp:.6g}")
    return float(x @ x + 1.0), float(yp @ yp + 1.0)


def corollary1_cos2(x, y, tol: float = 1e-9) -> float:
    """Exact cos²ψ of Nar et al. 2019b Cor 1 (its proof, App. B): if x·y_p = 1 (y_p = −y_neg), then σ_xy = 0, the
    weight part of the limit is x/σ_x + y_p/σ_y, its inner product with x + y_p is 2, ||x + y_p||² = σ_x + σ_y, so

    cos²ψ = 4 / [(σ_x+σ_y)((σ_x−1)/σ_x² + 2/(σ_xσ_y) + (σ_y−1)/σ_y²)], σ_x = ||x||²+1, σ_y = ||y_p||²+1.
    """
    sx, sy = _corollary1_sigmas(x, y, tol)
    return 4.0 / ((sx + sy) * ((sx - 1) / sx**2 + 2 / (sx * sy) + (sy - 1) / sy**2))


def corollary1_sigma_term(x, y, tol: float = 1e-9) -> float:
    """Q = (σ_max/σ_min)(1 − 1/σ_min), the term of Nar et al. 2019b Cor 1's bound cos²ψ ≤ 4/(2 + Q).

    Expanding the denominator of :func:`corollary1_cos2` gives cos²ψ = 4/(2 + Q + E) with
    E = (σ_min/σ_max)(1 − 1/σ_max) + 1/σ_min + 1/σ_max ∈ (0, 2), hence 4/(4 + Q) < cos²ψ ≤ 4/(2 + Q):
    ψ → 90° if and only if Q → ∞.
    """
    sx, sy = _corollary1_sigmas(x, y, tol)
    smin, smax = min(sx, sy), max(sx, sy)
    return (smax / smin) * (1.0 - 1.0 / smin)


def corollary1_cos2_bound(x, y, tol: float = 1e-9) -> float:
    """Nar et al. 2019b Cor 1 (re-derived): if x·y_p = 1 (y_p = −y_neg, the paper's y), then
    cos²ψ ≤ 4 / (2 + Q), Q = (σ_max/σ_min)(1 − 1/σ_min), σ_x = ||x||²+1, σ_y = ||y_p||²+1.

    The exact value is :func:`corollary1_cos2`; :func:`corollary1_cos2_lower_bound` brackets it from
    below. The bound tends to 0 (ψ → 90°) only if Q → ∞, e.g. ||x|| fixed and ||y|| → ∞;
    ||x||/||y|| → 0 alone does not suffice (x = εe, y_p = e/ε gives ψ = 0).
    """
    return 4.0 / (2.0 + corollary1_sigma_term(x, y, tol))


def corollary1_cos2_lower_bound(x, y, tol: float = 1e-9) -> float:
    """A lower bound 4/(4 + Q) < cos²ψ under the condition x·y_p = 1 of Nar et al. 2019b Cor 1
    (see :func:`corollary1_sigma_term`).

    With the upper bound 4/(2 + Q) it shows that Q → ∞ is necessary as well as sufficient for ψ → 90°.
    """
    return 4.0 / (4.0 + corollary1_sigma_term(x, y, tol))


def corollary1_small_x_limit(norm_product, degrees: bool = True) -> float:
    """lim ψ of Nar et al. 2019b Cor 1 when ||x|| → 0 with x·y_p = 1 and ||x||·||y_p|| → c (c ≥ 1).

    Then σ_min = σ_x → 1, σ_y ||x||² → c², and :func:`corollary1_cos2` tends to 4/(3 + c²):
    ψ → arccos(2/√(3 + c²)). Because x·y_p = 1, c = 1/cos∠(x, y_p): ψ → 0 for collinear points,
    ψ → 90° only as x and y_p become orthogonal (c → ∞), and strictly in between otherwise.
    """
    c = float(norm_product)
    if not (math.isfinite(c) and c >= 1.0 - 1e-12):
        raise ValueError("norm_product must be a finite number ≥ 1 (x·y = 1 forces ||x||·||y|| ≥ 1), "
                         f"got {norm_product!r}")
    a = math.acos(min(1.0, 2.0 / math.sqrt(3.0 + c * c)))
    return math.degrees(a) if degrees else a


# ---- gradient descent / gradient flow --------------------------------------------------------------


def _flow(Z: Array, times: Array, lr: float, w0: Array | None = None) -> Array:
    """Gradient flow dw/dt = lr Σ_i z_i σ(−w·z_i) from w(0)=w0, integrated in s = log(1+t)."""
    n, D = Z.shape
    w0 = np.zeros(D) if w0 is None else np.asarray(w0, dtype=np.float64)
    s_eval = np.log1p(times)

    def rhs(s, w):
        m = Z @ w
        # e^s σ(−m) = exp(s − log(1 + e^m)), computed without overflow
        c = np.exp(s - np.logaddexp(0.0, m))
        return lr * (Z.T @ c)

    def jac(s, w):
        m = Z @ w
        c = np.exp(s - np.logaddexp(0.0, m) - np.logaddexp(0.0, -m))  # e^s σ(m)σ(−m)
        return -lr * (Z.T * c) @ Z

    out = np.empty((times.size, D))
    mask = s_eval > 0
    out[~mask] = w0
    if mask.any():
        sol = solve_ivp(rhs, (0.0, float(s_eval[mask].max())), w0, method="LSODA", jac=jac,
                        t_eval=s_eval[mask], rtol=1e-10, atol=1e-12)
        if not sol.success:  # pragma: no cover
            raise RuntimeError(f"gradient-flow integration failed: {sol.message}")
        out[mask] = sol.y.T
    return out


def _gd(Z: Array, times: Array, lr: float, w0: Array | None = None) -> Array:
    """Exact GD w ← w + lr Σ_i z_i σ(−w·z_i), recorded after ``times`` steps (integers)."""
    n, D = Z.shape
    w = np.zeros(D) if w0 is None else np.array(w0, dtype=np.float64)
    steps = np.asarray(times, dtype=np.int64)
    order = np.argsort(steps)
    out = np.empty((steps.size, D))
    k = 0
    for idx in order:
        while k < steps[idx]:
            w += lr * (Z.T @ expit(-(Z @ w)))
            k += 1
        out[idx] = w
    return out


def _check_run(steps_or_times, lr: float) -> None:
    if not (isinstance(lr, (int, float, np.floating)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    t = np.asarray(steps_or_times)
    if t.size == 0 or np.any(t < 0) or not np.all(np.isfinite(t)):
        raise ValueError("steps/times must be non-negative and finite")


def logistic_gd(X, y, steps: int, lr: float, bias: bool = True) -> tuple[Array, float]:
    """``steps`` iterations of GD from zero on the cross-entropy (logistic) loss (Nar et al. 2019b eq. 3;
    Nar et al. 2019a eq. 1):
    w̃ ← w̃ + lr Σ_i z_i σ(−w̃·z_i), z_i = y_i [x_i, 1]. Returns (w, b) (b = 0 when ``bias=False``)."""
    X, y = check_data(X, y)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    _check_run(steps, lr)
    w = _gd(_signed(X, y, bias), np.array([int(steps)]), float(lr))[0]
    return (w[:-1], float(w[-1])) if bias else (w, 0.0)


def logistic_path(X, y, times, lr: float, bias: bool = True,
                  method: Literal["flow", "gd"] = "flow") -> tuple[Array, Array]:
    """Iterates of cross-entropy GD from zero at ``times`` (in GD steps; log-spaced is typical).

    ``method="flow"``: gradient flow at rate ``lr`` integrated in log time (cheap up to t ~ 1e12);
    ``method="gd"``: the exact discrete iteration (times rounded to integers).
    Returns ``W`` (len(times), d) and ``b`` (len(times),).
    """
    X, y = check_data(X, y)
    times = np.asarray(times, dtype=np.float64).ravel()
    _check_run(times, lr)
    Z = _signed(X, y, bias)
    if method == "flow":
        Wt = _flow(Z, times, float(lr))
    elif method == "gd":
        Wt = _gd(Z, np.round(times), float(lr))
    else:
        raise ValueError(f"method must be 'flow' or 'gd', got {method!r}")
    if bias:
        return Wt[:, :-1], Wt[:, -1]
    return Wt, np.zeros(times.size)


def _pair_differences(X: Array, y: Array) -> Array:
    """All x_i − y_j for x_i in class +1 and y_j in class −1 (Nar et al. 2019a eq. 2)."""
    P, N = X[y > 0], X[y < 0]
    return (P[:, None, :] - N[None, :, :]).reshape(-1, X.shape[1])


def differential_gd(X, y, steps: int, lr: float) -> Array:
    """``steps`` iterations of GD from zero on Σ_ij log(1 + exp(−w·(x_i − y_j))) (Nar et al. 2019a eq. 2;
    Nar et al. 2019b eq. 5).

    The gradient is formed from the |I|×|J| score differences without materialising the pair
    vectors: ∇ = −Σ_i x_i Σ_j σ_ij + Σ_j y_j Σ_i σ_ij with σ_ij = σ(−(w·x_i − w·y_j)).
    Returns w (no bias; pick it with :func:`differential_bias`).
    """
    X, y = check_data(X, y)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    _check_run(steps, lr)
    P, N = X[y > 0], X[y < 0]
    w = np.zeros(X.shape[1])
    for _ in range(int(steps)):
        S = expit(-((P @ w)[:, None] - (N @ w)[None, :]))
        w += lr * (P.T @ S.sum(1) - N.T @ S.sum(0))
    return w


def differential_path(X, y, times, lr: float, method: Literal["flow", "gd"] = "flow") -> Array:
    """Iterates of differential-training GD (Nar et al. 2019a eq. 2) at ``times``; see :func:`logistic_path`."""
    X, y = check_data(X, y)
    times = np.asarray(times, dtype=np.float64).ravel()
    _check_run(times, lr)
    D = _pair_differences(X, y)
    if method == "flow":
        return _flow(D, times, float(lr))
    if method == "gd":
        return _gd(D, np.round(times), float(lr))
    raise ValueError(f"method must be 'flow' or 'gd', got {method!r}")


def differential_bias(w, X, y) -> float:
    """The bias giving the largest margin for a fixed w (Nar et al. 2019a eq. 5; Nar et al. 2019b eq. 8):
    b = −½ min_{i∈+} w·x_i − ½ max_{j∈−} w·y_j."""
    X, y = check_data(X, y)
    s = X @ np.asarray(w, dtype=np.float64).ravel()
    return float(-0.5 * s[y > 0].min() - 0.5 * s[y < 0].max())


def confidence(w, b, points) -> Array:
    """The classifier's confidence max(σ(s), σ(−s)) = σ(|s|), s = w·x + b, at each point
    (Nar et al. 2019b Remark 2)."""
    P = np.asarray(points, dtype=np.float64)
    s = P @ np.asarray(w, dtype=np.float64).ravel() + float(b)
    return expit(np.abs(s))


# ---- affine-subspace bounds (Nar et al. 2019a Thm 1, Cor 1 = Nar et al. 2019b Thm 3, 4) --------------------


def affine_hull(X, tol: float = 1e-9) -> tuple[Array, Array]:
    """Orthonormal vectors r_k normal to the affine hull of the rows of X and the offsets
    Δ_k = ⟨r_k, x⟩ shared by every row (Nar et al. 2019a Thm 1's {r_k}, {Δ_k}). Returns R (m, d), delta (m,)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {X.shape}")
    C = X - X.mean(0)
    _, s, Vt = np.linalg.svd(C, full_matrices=True)
    scale = max(1.0, float(np.abs(X).max()))
    rank = int(np.sum(s > tol * scale * max(X.shape)))
    R = Vt[rank:]
    return R, X.mean(0) @ R.T


def _check_R(R, delta, d: int) -> tuple[Array, Array]:
    R = np.atleast_2d(np.asarray(R, dtype=np.float64))
    delta = np.atleast_1d(np.asarray(delta, dtype=np.float64))
    if R.shape[1] != d or R.shape[0] != delta.shape[0]:
        raise ValueError(f"R must be (m, {d}) and delta (m,), got {R.shape} and {delta.shape}")
    if not np.allclose(R @ R.T, np.eye(R.shape[0]), atol=1e-8):
        raise ValueError("the rows of R must be orthonormal")
    return R, delta


def affine_subspace_bound(X, y, R=None, delta=None, tol: float = 1e-7) -> float:
    """Nar et al. 2019a Thm 1 = Nar et al. 2019b Thm 3: on separable data with ⟨r_k, x⟩ = Δ_k for every
    point, the margin of
    cross-entropy GD (the P2 solution (w̄, B), normalised by its constraints y(w̄·x + B) ≥ 1) is
    at most 1/√(1/γ² + B² Σ_k Δ_k²), γ the SVM margin.

    Proof (re-derived): KKT of P2 gives ⟨w̄, r_k⟩ = BΔ_k, so w̄ = u + Σ_k BΔ_k r_k with u ⊥ r_k;
    u meets the SVM constraints u·(x_i − y_j) ≥ 2, hence ||u|| ≥ 1/γ and the P2 margin
    1/||w̄|| = 1/√(||u||² + B²ΣΔ_k²) ≤ the bound. R, delta default to :func:`affine_hull`.
    (Nar et al. 2019a scales w̄ so that min_ij w̄·(x_i − y_j) = 2 instead; that B is ≤ ours in magnitude, so its
    bound is weaker and implied by this one.)
    """
    X, y = check_data(X, y)
    if R is None:
        R, delta = affine_hull(X)
    R, delta = _check_R(R, delta, X.shape[1])
    resid = np.abs(X @ R.T - delta[None, :]).max() if R.shape[0] else 0.0
    if resid > tol * max(1.0, float(np.abs(X).max())):
        raise ValueError(f"the points are not on the affine subspace ⟨r_k, x⟩ = Δ_k (max residual {resid:.3g});"
                         " use near_subspace_bound")
    w_svm, _ = svm(X, y)
    _, B = bias_penalized_svm(X, y)
    gamma = 1.0 / np.linalg.norm(w_svm)
    return float(1.0 / math.sqrt(1.0 / gamma**2 + B**2 * float(delta @ delta)))


def _check_near(X, y, R, delta, tol):
    X, y = check_data(X, y)
    R, delta = _check_R(R, delta, X.shape[1])
    proj = X @ R.T - delta[None, :]
    scale = tol * max(1.0, float(np.abs(X).max()))
    if np.any(proj[y > 0] < -scale) or np.any(proj[y < 0] > scale):
        raise ValueError("near-subspace condition violated: need ⟨r_k, x_i⟩ ≥ Δ_k on class +1 and ≤ Δ_k on class −1")
    return X, y, R, delta


def _inverse_sqrt_or_inf(s: float) -> float:
    return math.inf if s == 0 else 1.0 / math.sqrt(s)


def near_subspace_bound(X, y, R, delta, tol: float = 1e-9) -> float:
    """Nar et al. 2019a Cor 1 = Nar et al. 2019b Thm 4, corrected: if ⟨r_k, x_i⟩ ≥ Δ_k (class +1) and
    ⟨r_k, y_j⟩ ≤ Δ_k (class −1),
    the P2 margin is at most 1/√(Σ_k max(BΔ_k, 0)²).

    The KKT argument gives ⟨w̄, r_k⟩ ≥ BΔ_k, which bounds ⟨w̄, r_k⟩² from below only where BΔ_k ≥ 0.
    The papers' 1/√(B²ΣΔ_k²) (:func:`near_subspace_bound_as_stated`) assumes that for every k; their
    reduction "w.l.o.g. B ≥ 0" flips the sign of Δ_k too, so it does not remove the assumption.
    Returns inf when no term is positive. Equality holds iff w̄ = Σ_k max(BΔ_k, 0) r_k
    (see :func:`near_subspace_summary`).
    """
    X, y, R, delta = _check_near(X, y, R, delta, tol)
    _, B = bias_penalized_svm(X, y)
    return _inverse_sqrt_or_inf(float(np.sum(np.maximum(B * delta, 0.0) ** 2)))


def near_subspace_bound_as_stated(X, y, R, delta, tol: float = 1e-9) -> float:
    """Nar et al. 2019a Cor 1 / Nar et al. 2019b Thm 4 exactly as printed: 1/√(B² Σ_k Δ_k²). Its proof
    needs BΔ_k ≥ 0 for all k
    (see :func:`near_subspace_bound`); that is sufficient, not necessary: it can fail otherwise."""
    X, y, R, delta = _check_near(X, y, R, delta, tol)
    _, B = bias_penalized_svm(X, y)
    return _inverse_sqrt_or_inf(float(B**2 * (delta @ delta)))


def near_subspace_summary(X, y, R, delta, tol: float = 1e-9) -> dict:
    """Every quantity of the near-subspace bound (Nar et al. 2019a Cor 1 = Nar et al. 2019b Thm 4) on one
    instance, from one P2 solve.

    Keys: ``margin`` (P2 = cross-entropy margin 1/||w̄||), ``svm_margin`` γ, ``B``, ``bound``
    (corrected, :func:`near_subspace_bound`), ``printed_bound`` (:func:`near_subspace_bound_as_stated`),
    ``signs`` ("all >= 0" when every BΔ_k ≥ 0 — the printed proof's assumption —, "all <= 0" when
    every BΔ_k ≤ 0 and the corrected bound is infinite, else "mixed"), ``printed_holds``, and
    ``slack`` = 1/margin² − 1/bound² and ``gap`` = ||w̄ − Σ_k c_k r_k||², c_k = max(BΔ_k, 0).

    Re-derived: with a_k = ⟨w̄, r_k⟩ ≥ BΔ_k, slack − gap = 2Σ_k c_k(a_k − c_k) ≥ 0, so the bound is
    attained iff w̄ = Σ_k c_k r_k (``gap`` = 0), and the slack is at least the squared distance of w̄
    from that vector.
    """
    X, y, R, delta = _check_near(X, y, R, delta, tol)
    w, B = bias_penalized_svm(X, y)
    ws, _ = svm(X, y)
    c = np.maximum(B * delta, 0.0)
    bd = B * delta
    scale = max(1.0, float(np.abs(bd).max()) if bd.size else 1.0) * 1e-12
    if np.all(bd >= -scale):
        signs = "all >= 0"
    elif np.all(bd <= scale):
        signs = "all <= 0"
    else:
        signs = "mixed"
    margin_ = 1.0 / float(np.linalg.norm(w))
    bound = _inverse_sqrt_or_inf(float(c @ c))
    printed = _inverse_sqrt_or_inf(float(B**2 * (delta @ delta)))
    return {
        "margin": margin_, "svm_margin": 1.0 / float(np.linalg.norm(ws)), "B": float(B),
        "bound": bound, "printed_bound": printed, "signs": signs,
        "printed_holds": bool(margin_ <= printed * (1 + 1e-6)),
        "slack": float(w @ w - c @ c), "gap": float(np.sum((w - R.T @ c) ** 2)),
    }


# ---- offsets from the origin: codimension (Nar et al. 2019a Remark 1 = Nar et al. 2019b Remark 3) -------


def bias_penalized_margin(X, y) -> float:
    """Margin 1/||w̄|| of the bias-penalised problem P2 (the limit of cross-entropy GD with a bias)."""
    w, b = bias_penalized_svm(X, y)
    return margin(w, b, X, y)


def offset_embedding(P, offset, rotation_seed: int | None = None) -> tuple[Array, Array, Array]:
    """Points with in-subspace coordinates ``P`` (n, k) placed on a k-dim affine subspace of R^(k+m) at
    offset Δ = ``offset`` (m,) from the origin: x = [p, Δ] (optionally rotated by a random orthogonal
    matrix). Returns X (n, k+m), the normals R (m, k+m) and Δ, as taken by :func:`affine_subspace_bound`.
    """
    P = np.asarray(P, dtype=np.float64)
    offset = np.atleast_1d(np.asarray(offset, dtype=np.float64))
    if P.ndim != 2 or offset.ndim != 1 or offset.size == 0:
        raise ValueError(f"P must be (n, k) and offset a non-empty vector, got {P.shape} and {offset.shape}")
    n, k = P.shape
    m = offset.size
    X = np.hstack([P, np.broadcast_to(offset, (n, m))])
    R = np.hstack([np.zeros((m, k)), np.eye(m)])
    if rotation_seed is not None:
        Q, _ = np.linalg.qr(np.random.default_rng(rotation_seed).standard_normal((k + m, k + m)))
        X, R = X @ Q.T, R @ Q.T
    return X, R, offset.copy()


def offset_margin(P, y, offset_norm: float) -> float:
    """P2 margin of :func:`offset_embedding` data, from the in-subspace coordinates and ||Δ|| alone.

    Re-derived: in the augmented space every point is [p, Δ, 1]; the last m+1 coordinates are the same
    vector (Δ, 1) for all points, and a rotation (P2 is the SVM through 0 on augmented points, hence
    rotation invariant) turns it into (s, 0, …, 0), s = √(1 + ||Δ||²). So P2 equals the SVM through the
    origin on [p, s], with solution (v, β); mapping back, w̄ = [v, βΔ/s] and the margin is
    1/√(||v||² + β²||Δ||²/s²). It depends on Δ only through ||Δ||, whatever the codimension m.
    """
    P, y = check_data(P, y)
    d = float(offset_norm)
    if not (math.isfinite(d) and d >= 0):
        raise ValueError(f"offset_norm must be a finite number ≥ 0, got {offset_norm!r}")
    s = math.sqrt(1.0 + d * d)
    u, _ = svm(np.hstack([P, np.full((P.shape[0], 1), s)]), y, bias=False)
    v, beta = u[:-1], u[-1]
    return 1.0 / math.sqrt(float(v @ v) + (beta * d / s) ** 2)


# ---- one-step separation of differential SGD (Nar et al. 2019a Thm 3 = Nar et al. 2019b Thm 6) -------------


def one_step_condition(X, y) -> dict:
    """Quantities of Nar et al. 2019a Thm 3: γ (SVM margin, 2γ = max_u min_ij ⟨x_i − y_j, u/||u||⟩), the class
    diameters R_x, R_y, and whether 2γ ≥ 5 max(R_x, R_y).

    Re-derived: with p_x − p_y = 2γ w_SVM the closest points of the two convex hulls,
    ⟨x_i − y_j, x_i' − y_j'⟩ ≥ 4γ² − 8γR − 4R² > 0 once γ > (1 + √2) R, R = max(R_x, R_y); 2γ ≥ 5R
    implies this.
    """
    X, y = check_data(X, y)
    w, _ = svm(X, y)
    gamma = 1.0 / np.linalg.norm(w)
    diam = lambda A: float(np.max(np.linalg.norm(A[:, None] - A[None], axis=-1)))  # noqa: E731
    Rx, Ry = diam(X[y > 0]), diam(X[y < 0])
    return {"gamma": gamma, "Rx": Rx, "Ry": Ry, "holds": bool(2 * gamma >= 5 * max(Rx, Ry))}


def one_step_separates(X, y) -> bool:
    """Whether every single-pair SGD step from w = 0 on the differential loss (w ∝ x_i − y_j),
    with the bias of Nar et al. 2019a eq. 5, classifies all points correctly — Nar et al. 2019a eq. (13):
    ⟨x_i' − y_j', x_i − y_j⟩ > 0 for all pairs."""
    X, y = check_data(X, y)
    D = _pair_differences(X, y)
    return bool(np.all(D @ D.T > 0))


# ---- synthetic instances ---------------------------------------------------------------------------------


def gaussian_two_class(n_per_class: int, means, std: float, seed: int) -> tuple[Array, Array]:
    """Two isotropic Gaussian classes: the first mean is class +1, the second class −1 (Nar et al. 2019b Fig 2).

    Uses ``marginlab.data.gaussian_blobs`` when that helper exists, else a local generator."""
    try:
        from .data import gaussian_blobs  # type: ignore[attr-defined]
    except ImportError:
        gaussian_blobs = None
    if gaussian_blobs is not None:
        X, y = gaussian_blobs(n_per_class, means, std, seed)
        return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.asarray(means, dtype=np.float64)
    X = np.vstack([m + std * rng.standard_normal((n_per_class, means.shape[1])) for m in means])
    y = np.repeat([1.0, -1.0], n_per_class)
    return X, y


def affine_subspace_instance(n: int, k: int, d: int, shift: float | Array, gap: float = 1.0,
                             seed: int = 0) -> tuple[Array, Array, Array, Array]:
    """A separable set of ``n`` points in a random k-dim affine subspace of R^d at offsets Δ.

    Points are Gaussian in the subspace, labelled by a random in-subspace direction with a gap
    of ``gap`` on each side. ``shift`` gives Δ_k (a scalar is used for every normal direction).
    Returns X (n, d), y, R (d−k, d) orthonormal normals, delta (d−k,).
    """
    if not (1 <= k < d):
        raise ValueError(f"need 1 ≤ k < d, got k={k}, d={d}")
    if n < 2:
        raise ValueError("need at least two points")
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    U, R = Q[:, :k].T, Q[:, k:].T
    delta = np.broadcast_to(np.asarray(shift, dtype=np.float64), (d - k,)).copy()
    C = rng.standard_normal((n, k))
    v = rng.standard_normal(k)
    v /= np.linalg.norm(v)
    s = C @ v
    y = np.where(s >= np.median(s), 1.0, -1.0)
    C += np.outer(y * gap, v)
    X = C @ U + delta @ R
    return X, y, R, delta


def random_near_subspace_instance(seed: int, max_k: int = 3, max_codim: int = 4) -> tuple[Array, Array, Array, Array]:
    """A random instance for the near-subspace bound (Nar et al. 2019a Cor 1 = Nar et al. 2019b Thm 4), all
    drawn from ``seed``.

    k ∈ [1, max_k], codimension m ∈ [1, max_codim], 6–24 points of :func:`affine_subspace_instance`
    at Gaussian offsets Δ_k ~ N(0, 2²), moved along the subspace by U(0, 10) (top in-subspace
    principal direction), then pushed off it one-sidedly: class +1 up and class −1 down along every
    r_k by |N(0, 0.5²)|, so ⟨r_k, x_i⟩ ≥ Δ_k ≥ ⟨r_k, y_j⟩. Returns X, y, R, delta.
    """
    if max_k < 1 or max_codim < 1:
        raise ValueError(f"max_k and max_codim must be ≥ 1, got {max_k} and {max_codim}")
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, max_k + 1))
    d = k + int(rng.integers(1, max_codim + 1))
    n = int(rng.integers(6, 25))
    X, y, R, delta = affine_subspace_instance(n, k, d, shift=rng.normal(0, 2, d - k), seed=int(rng.integers(2**31)))
    X = X + rng.uniform(0, 10) * np.linalg.svd(X - X.mean(0))[2][0]
    X = X + (np.abs(rng.normal(0, 0.5, (n, d - k))) * y[:, None]) @ R
    return X, y, R, delta


def near_subspace_attaining_instance(n: int, k: int, d: int, seed: int = 0) -> tuple[Array, Array, Array, Array]:
    """An instance on which the near-subspace bound is attained: margin = 1/√(Σ max(BΔ_k, 0)²).

    Construction (re-derived): Δ_k > 0, one class +1 point at the foot x_1 = Σ_k Δ_k r_k of the
    subspace, the other class +1 points above it (⟨r_k, x⟩ ≥ Δ_k) and the class −1 points far below
    (⟨r_k, y⟩ = −αΔ_k − s_k, α ≥ 1 + 2/||Δ||², s_k ≥ 0), all with Gaussian in-subspace coordinates. Then
    w̃ = x̄_1/||x̄_1||² (the minimum-norm vector with w̃·x̄_1 ≥ 1) meets every constraint, so it solves P2:
    w̄ = x_1/(1 + ||Δ||²) = Σ_k BΔ_k r_k with B = 1/(1 + ||Δ||²), and margin = bound = (1 + ||Δ||²)/||Δ||.
    Returns X, y, R, delta.
    """
    if not (1 <= k < d) or n < 2:
        raise ValueError(f"need 1 ≤ k < d and n ≥ 2, got n={n}, k={k}, d={d}")
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    U, R = Q[:, :k].T, Q[:, k:].T
    m = d - k
    delta = rng.uniform(0.2, 2.0, m)
    n_pos = max(1, n // 2)
    s_pos = np.abs(rng.normal(0, 1, (n_pos, m)))
    s_pos[0] = 0.0                                                   # x_1: the foot of the subspace
    g_pos = rng.normal(0, 3, (n_pos, k))
    g_pos[0] = 0.0
    alpha = 1.0 + 2.0 / float(delta @ delta) + rng.uniform(0, 2, n - n_pos)
    offs_neg = -alpha[:, None] * delta[None, :] - np.abs(rng.normal(0, 1, (n - n_pos, m)))
    X = np.vstack([g_pos @ U + (delta + s_pos) @ R, rng.normal(0, 3, (n - n_pos, k)) @ U + offs_neg @ R])
    y = np.r_[np.ones(n_pos), -np.ones(n - n_pos)]
    return X, y, R, delta
