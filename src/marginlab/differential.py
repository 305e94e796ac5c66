"""Differential training (chapter 4): the linear theory, the 2-D nonlinear picture and the CIFAR-10 experiment.

Papers: 000 = Nar et al. 2019, *Cross-Entropy Loss and Low-Rank Features Have Responsibility for
Adversarial Examples* (§4–5, Thm 2–3, eqs. 2, 4–7, Figs. 3–5); 001 = *Cross-Entropy Loss Leads To
Poor Margins* (Thm 5–6, the same statements with the negative class written as −y_j).

Conventions: binary labels y ∈ {−1, +1} (+1 = class I, the "x_i"; −1 = class J, the "y_j");
numpy float64 for the linear part, torch for networks.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from . import config
from .losses import binary_scores, differential_bias

# ============================================================================================
# Input checks
# ============================================================================================


def _check_binary(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n, d), got shape {X.shape}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"y must have shape ({X.shape[0]},), got {y.shape}")
    if not set(np.unique(y).tolist()) <= {-1, 1}:
        raise ValueError(f"labels must be in {{-1, +1}}, got {sorted(set(np.unique(y).tolist()))}")
    if not (y == 1).any() or not (y == -1).any():
        raise ValueError("both classes (+1 and -1) must be present")
    return X, y.astype(np.int64)


def angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    """Angle between two vectors in degrees."""
    u, v = np.asarray(u, float).ravel(), np.asarray(v, float).ravel()
    c = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


# ============================================================================================
# Linear theory (000 §4.1, Thm 2–3, eq. 5; 001 Thm 5–6)
# ============================================================================================


def svm(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Hard-margin SVM with bias (P1). Uses ``marginlab.linear.svm``; falls back to a private cvxpy
    solve if that module is unavailable. Raises ValueError if the data are not separable."""
    X, y = _check_binary(X, y)
    try:
        from .linear import svm as _linear_svm
    except ImportError:  # toolkit module missing: private fallback (reported)
        _linear_svm = None
    if _linear_svm is not None:
        w, b = _linear_svm(X, y, bias=True)
        return np.asarray(w, dtype=np.float64), float(b)
    import cvxpy as cp

    w = cp.Variable(X.shape[1])
    b = cp.Variable()
    prob = cp.Problem(cp.Minimize(cp.sum_squares(w)), [cp.multiply(y, X @ w + b) >= 1])
    prob.solve()
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise ValueError(f"data are not linearly separable (SVM status {prob.status})")
    return np.asarray(w.value, dtype=np.float64), float(b.value)


def linear_margin(w: np.ndarray, b: float, X: np.ndarray, y: np.ndarray) -> float:
    """min_i y_i (w·x_i + b)/‖w‖ (negative if some point is misclassified)."""
    X, y = _check_binary(X, y)
    w = np.asarray(w, dtype=np.float64)
    return float(np.min(y * (X @ w + b)) / np.linalg.norm(w))


def eq5_bias(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    """000 eq. 5: b̂ = −½ min_{i∈I} ⟨ŵ, x_i⟩ − ½ max_{j∈J} ⟨ŵ, y_j⟩ (001 eq. 8 with −y_j)."""
    X, y = _check_binary(X, y)
    s = X @ np.asarray(w, dtype=np.float64)
    return differential_bias(torch.from_numpy(s[y == 1]), torch.from_numpy(s[y == -1]))


def pairwise_logistic_gd(X: np.ndarray, y: np.ndarray, steps: int, lr: float,
                         checkpoints: Sequence[int] = ()) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Gradient descent from w = 0 on the mean pairwise logistic loss, 000 eq. 2 / 001 eq. 5:
    L(w) = 1/(|I||J|) Σ_i Σ_j log(1 + exp(−wᵀ(x_i − y_j))).

    The gradient −1/(|I||J|) Σ_ij σ(−m_ij)(x_i − y_j), m_ij = wᵀx_i − wᵀy_j, is formed from the
    |I|×|J| matrix of σ(−m_ij) and its row/column sums, never from the |I||J| difference vectors.
    Returns the final w and {step: w} at the requested checkpoints.
    """
    X, y = _check_binary(X, y)
    if steps < 0 or lr <= 0:
        raise ValueError(f"need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    P, N = X[y == 1], X[y == -1]
    n_pairs = P.shape[0] * N.shape[0]
    w = np.zeros(X.shape[1])
    want = set(int(c) for c in checkpoints)
    saved: dict[int, np.ndarray] = {}
    if 0 in want:
        saved[0] = w.copy()
    for t in range(1, steps + 1):
        m = (P @ w)[:, None] - (N @ w)[None, :]
        s = expit(-m)  # σ(−m); stays > 0 for large margins, which then dominate the direction
        grad = -(s.sum(1) @ P - s.sum(0) @ N) / n_pairs
        w -= lr * grad
        if t in want:
            saved[t] = w.copy()
    return w, saved


def logistic_gd_with_bias(X: np.ndarray, y: np.ndarray, steps: int, lr: float) -> tuple[np.ndarray, float]:
    """GD from zero on the mean cross-entropy (logistic) loss with a bias — the CE baseline.
    Uses ``marginlab.linear.logistic_gd`` when present (private fallback otherwise)."""
    X, y = _check_binary(X, y)
    try:
        from .linear import logistic_gd as _lgd
    except ImportError:
        _lgd = None
    if _lgd is not None:
        w, b = _lgd(X, y, steps, lr, bias=True)
        return np.asarray(w, dtype=np.float64), float(b)
    Xa = np.c_[X, np.ones(len(X))]
    wa = np.zeros(Xa.shape[1])
    for _ in range(steps):
        m = y * (Xa @ wa)
        s = expit(-m)
        wa += lr * (s * y) @ Xa / len(X)
    return wa[:-1], float(wa[-1])


@dataclass
class Theorem3Instance:
    """Geometry of one instance for 000 Thm 3 / 001 Thm 6."""

    gamma: float          # SVM hard margin γ (2γ = distance between the convex hulls)
    r_x: float            # diameter of class I
    r_y: float            # diameter of class J
    condition: bool       # 2γ ≥ 5 max(R_x, R_y)
    pair_fraction_one_step: float   # fraction of pairs (i, j) whose single SGD step separates with eq. 5
    one_step_suffices: bool         # every pair's single step separates (whatever pair SGD draws)

    @property
    def ratio(self) -> float:
        return 2 * self.gamma / max(self.r_x, self.r_y)


def _diameter(A: np.ndarray) -> float:
    if len(A) < 2:
        return 0.0
    sq = (A * A).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2 * A @ A.T
    return float(np.sqrt(max(d2.max(), 0.0)))


def one_step_separates(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """For every pair (i, j): does one SGD step from w = 0 on pair (i, j) of eq. 2 separate the data
    with the eq. 5 bias?  (000 App. D: the step gives ŵ ∝ x_i − y_j, and eq. 5 then satisfies
    (4a)–(4b) iff min_{i'} ⟨x_{i'}, x_i − y_j⟩ ≥ max_{j'} ⟨y_{j'}, x_i − y_j⟩.)  Returns a |I|×|J| bool array."""
    X, y = _check_binary(X, y)
    P, N = X[y == 1], X[y == -1]
    D = P[:, None, :] - N[None, :, :]                    # (|I|, |J|, d): fine for the small instances used
    sp = np.einsum("ijd,kd->ijk", D, P).min(-1)
    sn = np.einsum("ijd,kd->ijk", D, N).max(-1)
    return sp >= sn


def theorem3_instance(X: np.ndarray, y: np.ndarray) -> Theorem3Instance:
    """Measure 000 Thm 3's quantities (γ from the SVM, R_x, R_y) and the one-step outcome."""
    X, y = _check_binary(X, y)
    w, b = svm(X, y)
    gamma = 1.0 / float(np.linalg.norm(w))
    ok = one_step_separates(X, y)
    r_x, r_y = _diameter(X[y == 1]), _diameter(X[y == -1])
    return Theorem3Instance(gamma, r_x, r_y, bool(2 * gamma >= 5 * max(r_x, r_y)),
                            float(ok.mean()), bool(ok.all()))


def random_clusters(n_pos: int, n_neg: int, dim: int, separation: float, radius: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two clusters: points uniform in balls of ``radius`` around centres ``separation`` apart
    (random direction, random offset of the pair from the origin)."""
    if min(n_pos, n_neg) < 1 or dim < 1 or separation <= 0 or radius < 0:
        raise ValueError("need n_pos, n_neg, dim >= 1, separation > 0, radius >= 0")
    rng = np.random.default_rng(seed)

    def ball(n):
        g = rng.standard_normal((n, dim))
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        return g * radius * rng.random((n, 1)) ** (1.0 / dim)

    u = rng.standard_normal(dim)
    u /= np.linalg.norm(u)
    c = rng.standard_normal(dim) * 2 * separation
    X = np.r_[c + 0.5 * separation * u + ball(n_pos), c - 0.5 * separation * u + ball(n_neg)]
    y = np.r_[np.ones(n_pos, int), -np.ones(n_neg, int)]
    return X, y


def theorem3_sweep(ratios: Sequence[float], n_instances: int, *, n_pos: int = 6, n_neg: int = 6,
                   dim: int = 5, seed: int = 0) -> list[Theorem3Instance]:
    """Random instances at several separation/radius ratios; each instance's ratio 2γ/max(R) is
    measured (not assumed) from its SVM solution."""
    out = []
    for k, r in enumerate(ratios):
        for s in range(n_instances):
            X, y = random_clusters(n_pos, n_neg, dim, separation=float(r), radius=0.5,
                                   seed=seed + 100_003 * k + s)
            try:
                out.append(theorem3_instance(X, y))
            except ValueError:  # overlapping balls: not separable, the theorem does not apply
                continue
    return out


def linear_experiment(X: np.ndarray, y: np.ndarray, steps: int, lr: float,
                      checkpoints: Sequence[int]) -> dict[str, Any]:
    """000 Thm 2 + eq. 5: angle between the differential-GD iterate and the SVM direction over
    iterations, margin with the eq. 5 bias, and the CE (logistic with bias) baseline's margin."""
    X, y = _check_binary(X, y)
    w_svm, b_svm = svm(X, y)
    w, path = pairwise_logistic_gd(X, y, steps, lr, checkpoints)
    its = sorted(k for k in path if k > 0)
    angles = [angle_deg(path[k], w_svm) for k in its]
    b_hat = eq5_bias(w, X, y)
    w_ce, b_ce = logistic_gd_with_bias(X, y, steps, lr)
    return {
        "iterations": its,
        "angle_deg": angles,
        "w": w, "b": b_hat,
        "w_svm": w_svm, "b_svm": b_svm,
        "w_ce": w_ce, "b_ce": b_ce,
        "margin_svm": linear_margin(w_svm, b_svm, X, y),
        "margin_differential": linear_margin(w, b_hat, X, y),
        "margin_ce": linear_margin(w_ce, b_ce, X, y),
        "angle_ce_deg": angle_deg(w_ce, w_svm),
    }


def imbalanced_gaussians(n_pos: int, n_neg: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """001 Fig. 2's two Gaussian classes (means (2, 12) and (40, 50), variance 25) with unequal sizes."""
    rng = np.random.default_rng(seed)
    X = np.r_[rng.normal([40.0, 50.0], 5.0, (n_pos, 2)), rng.normal([2.0, 12.0], 5.0, (n_neg, 2))]
    y = np.r_[np.ones(n_pos, int), -np.ones(n_neg, int)]
    return X, y
