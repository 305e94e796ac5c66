"""Differential training (chapter 4): the linear theory, the 2-D nonlinear picture and the CIFAR-10 experiment.

Papers: Nar et al. 2019a = Nar et al. 2019, *Cross-Entropy Loss and Low-Rank Features Have Responsibility for
Adversarial Examples* (§4–5, Thm 2–3, eqs. 2, 4–7, Figs. 3–5); Nar et al. 2019b = *Cross-Entropy Loss Leads To
Poor Margins* (Thm 5–6, the same statements with the negative class written as −y_j).

Conventions: binary labels y ∈ {−1, +1} (+1 = class I, the "x_i"; −1 = class J, the "y_j");
numpy float64 for the linear part, torch for networks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from . import config
from .losses import binary_scores, differential_bias

if TYPE_CHECKING:  # only for annotations: jobs imports the chapter modules
    from . import jobs

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
# Linear theory (Nar et al. 2019a, §4.1, Thm 2–3, eq. 5; Nar et al. 2019b, Thm 5–6)
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
    """Nar et al. 2019a, eq. 5: b̂ = −½ min_{i∈I} ⟨ŵ, x_i⟩ − ½ max_{j∈J} ⟨ŵ, y_j⟩ (Nar et al. 2019b, eq. 8 with −y_j)."""
    X, y = _check_binary(X, y)
    s = X @ np.asarray(w, dtype=np.float64)
    return differential_bias(torch.from_numpy(s[y == 1]), torch.from_numpy(s[y == -1]))


def pairwise_logistic_gd(X: np.ndarray, y: np.ndarray, steps: int, lr: float,
                         checkpoints: Sequence[int] = (), normalized: bool = False,
                         ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Gradient descent from w = 0 on the mean pairwise logistic loss, Nar et al. 2019a, eq. 2 / Nar et al. 2019b, eq. 5:
    L(w) = 1/(|I||J|) Σ_i Σ_j log(1 + exp(−wᵀ(x_i − y_j))).

    The gradient −1/(|I||J|) Σ_ij σ(−m_ij)(x_i − y_j), m_ij = wᵀx_i − wᵀy_j, is formed from the
    |I|×|J| matrix of σ(−m_ij) and its row/column sums, never from the |I||J| difference vectors.
    ``normalized=True`` divides each step by the loss (normalized GD, Nacson et al. 2019), which
    converges to the same max-margin direction much faster than the theorem's fixed step (whose
    angle to the SVM decays only like 1/log t, Soudry et al. 2018).
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
        if normalized:
            # step lr·∇L/L (normalized GD): both scaled by e^{min m} so that neither underflows
            shift = m.min()
            s = np.exp(shift - m - np.logaddexp(0.0, -m))                  # σ(−m)·e^{shift}
            mc = np.minimum(m, 30.0)
            log_sp = np.where(m > 30.0, -m, np.log(np.log1p(np.exp(-mc))))  # log softplus(−m)
            loss = np.exp(log_sp + shift).sum()
            grad = -(s.sum(1) @ P - s.sum(0) @ N) / loss
        else:
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
    """Geometry of one instance for Nar et al. 2019a, Thm 3 / Nar et al. 2019b, Thm 6."""

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
    with the eq. 5 bias?  (Nar et al. 2019a, App. D: the step gives ŵ ∝ x_i − y_j, and eq. 5 then satisfies
    (4a)–(4b) iff min_{i'} ⟨x_{i'}, x_i − y_j⟩ ≥ max_{j'} ⟨y_{j'}, x_i − y_j⟩.)  Returns a |I|×|J| bool array."""
    X, y = _check_binary(X, y)
    P, N = X[y == 1], X[y == -1]
    D = P[:, None, :] - N[None, :, :]                    # (|I|, |J|, d): fine for the small instances used
    sp = np.einsum("ijd,kd->ijk", D, P).min(-1)
    sn = np.einsum("ijd,kd->ijk", D, N).max(-1)
    return sp >= sn


def theorem3_instance(X: np.ndarray, y: np.ndarray) -> Theorem3Instance:
    """Measure Nar et al. 2019a, Thm 3's quantities (γ from the SVM, R_x, R_y) and the one-step outcome."""
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
    """Nar et al. 2019a, Thm 2 + eq. 5: angle between the differential-GD iterate and the SVM direction over
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


def _check_counts(**counts: int) -> None:
    for name, n in counts.items():
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be a positive int (both classes present), got {n!r}")


def imbalanced_gaussians(n_pos: int, n_neg: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Nar et al. 2019b, Fig. 2's two Gaussian classes (means (2, 12) and (40, 50), variance 25) with unequal sizes
    (both classes present: ``n_pos``, ``n_neg`` ≥ 1)."""
    _check_counts(n_pos=n_pos, n_neg=n_neg)
    rng = np.random.default_rng(seed)
    X = np.r_[rng.normal([40.0, 50.0], 5.0, (n_pos, 2)), rng.normal([2.0, 12.0], 5.0, (n_neg, 2))]
    y = np.r_[np.ones(n_pos, int), -np.ones(n_neg, int)]
    return X, y


# ============================================================================================
# Networks: the eq. 5 bias, score models, pair usage (Nar et al. 2019a, §4.2, §5)
# ============================================================================================


def score_model(model: nn.Module) -> nn.Module:
    """The one-score model inside a ``BinaryLogits`` wrapper (or the model itself)."""
    return getattr(model, "score_model", model)


def _model_device(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else where the model's parameters live (the one device boundary)."""
    if device is not None:
        return torch.device(device)
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def scores(model: nn.Module, x: torch.Tensor, batch_size: int = 1024,
           device: str | torch.device | None = None) -> torch.Tensor:
    """f(x) for every input (eval mode; see ``losses.binary_scores``), computed on ``device`` (default: the
    model's) and returned on the CPU."""
    dev = _model_device(model, device)
    was = model.training
    model.eval()
    try:
        out = [binary_scores(model, x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def _positive_mask(y: torch.Tensor) -> torch.Tensor:
    y = torch.as_tensor(y)
    vals = set(torch.unique(y).tolist())
    if not (vals <= {-1, 1} or vals <= {0, 1}) or len(vals) != 2:
        raise ValueError(f"need binary labels of both classes in {{-1,+1}} or {{0,1}}, got {sorted(vals)}")
    return y == 1


@torch.no_grad()
def set_eq5_bias(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 device: str | torch.device | None = None) -> float:
    """Shift the score's bias (the head bias of the one-output model) by b̂ of Nar et al. 2019a, eq. 5, computed on the
    training scores: the boundary then lies midway between min_i f(x_i) and max_j f(y_j), the paper's
    choice after differential training (the loss is blind to the bias: it cancels in every pair).
    Modifies ``model`` in place and returns b̂."""
    head = score_model(model).head
    if head.bias is None or head.out_features != 1:
        raise ValueError("set_eq5_bias needs a one-output head with a bias (e.g. BinaryLogits(LeNet(num_classes=1)))")
    s = scores(model, x, device=device)
    pos = _positive_mask(y)
    b_hat = differential_bias(s[pos], s[~pos])
    head.bias += b_hat
    return b_hat


def pair_usage(y: torch.Tensor, batch_size: int, epochs: int, seed: int = 0) -> dict[str, list[float]]:
    """Which of the |I|×|J| pairs differential training with ``fit(sampler="balanced", seed=seed)`` formed,
    epoch by epoch: the trainer's balanced batch order is replayed exactly (same generator), every batch
    contributing its (B/2)² broadcast pairs (Nar et al. 2019a, §4.1 item 2: "only a few percent of |I|×|J| pairs").

    Returns per epoch (0..epochs): ``evaluations`` (pair-loss terms computed / |I||J|, with repeats) and
    ``distinct`` (fraction of distinct pairs ever formed).
    """
    from .train import _balanced_batches  # the trainer's own sampler: replayed, not re-implemented

    y = torch.as_tensor(y)
    if batch_size < 2 or epochs < 0:
        raise ValueError(f"need batch_size >= 2 and epochs >= 0, got {batch_size}, {epochs}")
    values = torch.unique(y)
    if values.numel() != 2:
        raise ValueError(f"need exactly two label values, got {values.tolist()}")
    groups = [torch.nonzero(y == v).view(-1) for v in values]
    pos_val = values.max()
    rank = torch.full((len(y),), -1, dtype=torch.long)
    for g in groups:
        rank[g] = torch.arange(g.numel())
    is_pos = y == pos_val
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    seen = torch.zeros(n_pos, n_neg, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    half = batch_size // 2
    evals, distinct, total = [0.0], [0.0], 0
    for _ in range(epochs):
        for idx in _balanced_batches(groups, half, gen):
            p = rank[idx[is_pos[idx]]]
            q = rank[idx[~is_pos[idx]]]
            seen[p[:, None], q[None, :]] = True
            total += p.numel() * q.numel()
        evals.append(total / (n_pos * n_neg))
        distinct.append(float(seen.float().mean()))
    return {"evaluations": evals, "distinct": distinct}


# ============================================================================================
# 2-D nonlinear picture (Nar et al. 2019a, §4.2, Fig. 3)
# ============================================================================================


def fig3_data(n_blue: int = 10, n_red: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D problem needing a nonlinear boundary: class +1 ("blue") in a thin vertical strip at the
    centre, class −1 ("red") in two strips to its left and right — nearly low-rank along x."""
    _check_counts(n_blue=n_blue, n_red=n_red)
    rng = np.random.default_rng(seed)
    blue = np.c_[rng.uniform(-0.4, 0.4, n_blue), rng.uniform(-1.0, 1.0, n_blue)]
    side = np.where(np.arange(n_red) % 2 == 0, -1.0, 1.0)
    red = np.c_[side * rng.uniform(1.4, 2.2, n_red), rng.uniform(-1.0, 1.0, n_red)]
    return np.r_[blue, red], np.r_[np.ones(n_blue, int), -np.ones(n_red, int)]


def boundary_distances(score_fn: Callable[[np.ndarray], np.ndarray], X: np.ndarray, y: np.ndarray,
                       lim: tuple[float, float, float, float], n: int = 801) -> np.ndarray:
    """Signed input-space margins in 2-D: the exact (to grid interpolation) Euclidean distance from each
    point to the zero level set of ``score_fn``, traced with marching squares on an n×n grid over ``lim``;
    negative for misclassified points, +inf if the boundary does not cross the window."""
    import contourpy

    X, y = _check_binary(X, y)
    if X.shape[1] != 2:
        raise ValueError("boundary_distances is for 2-D inputs")
    gx, gy = np.meshgrid(np.linspace(lim[0], lim[1], n), np.linspace(lim[2], lim[3], n))
    z = np.asarray(score_fn(np.c_[gx.ravel(), gy.ravel()]), dtype=float).reshape(gx.shape)
    lines = contourpy.contour_generator(gx, gy, z).lines(0.0)
    if not lines:
        return np.full(len(X), np.inf)
    V = np.concatenate(lines)
    # distance to the polyline segments (not just vertices)
    A, B = np.concatenate([ln[:-1] for ln in lines]), np.concatenate([ln[1:] for ln in lines])
    d = np.full(len(X), np.inf)
    AB = B - A
    L2 = np.maximum((AB * AB).sum(1), 1e-30)
    for k, p in enumerate(X):
        t = np.clip(((p - A) * AB).sum(1) / L2, 0.0, 1.0)
        proj = A + t[:, None] * AB
        d[k] = min(np.sqrt(((proj - p) ** 2).sum(1)).min(), np.sqrt(((V - p) ** 2).sum(1)).min())
    correct = np.sign(np.asarray(score_fn(X), dtype=float)) == y
    return np.where(correct, d, -d)


def train_2d(loss: str, X: np.ndarray, y: np.ndarray, *, hidden: int = 64, epochs: int = 3000,
             lr: float = 0.05, seed: int = 0, cache: str | None = None) -> nn.Module:
    """A two-layer ReLU net (one score) trained full-batch with ``loss`` in "ce" | "eq6" | "eq7"
    (Nar et al. 2019a, Fig. 3); differential models get the eq. 5 bias. Returns BinaryLogits(score net) on the CPU."""
    from . import losses
    from .models import BinaryLogits, TwoLayerNet

    loss_fns = {"ce": losses.cross_entropy, "eq6": losses.pairwise_logistic_loss,
                "eq7": losses.squared_differential_loss}
    if loss not in loss_fns:
        raise ValueError(f"loss must be one of {sorted(loss_fns)}, got {loss!r}")
    X, y = _check_binary(X, y)
    torch.manual_seed(seed)
    model = BinaryLogits(TwoLayerNet(in_dim=X.shape[1], hidden=hidden, out_dim=1))
    xt, yt = torch.tensor(X, dtype=torch.float32), torch.tensor(y)
    target = (yt > 0).long() if loss == "ce" else yt
    # Full-batch GD in a plain loop: 20 points, thousands of steps -- the generic trainer's per-epoch
    # bookkeeping would dominate the cost here.
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        value = loss_fns[loss](model, xt, target)
        if not torch.isfinite(value):
            raise FloatingPointError(f"2-D training with {loss} diverged (lr={lr})")
        value.backward()
        opt.step()
    if loss != "ce":
        set_eq5_bias(model, xt, yt, device="cpu")
    return model.cpu().eval()


def score_fn_np(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """numpy (M, d) -> (M,) scores of a (CPU) model, for plotting and 2-D margins."""
    def f(P: np.ndarray) -> np.ndarray:
        return scores(model, torch.tensor(np.asarray(P), dtype=torch.float32), device="cpu").numpy()
    return f


# ============================================================================================
# CIFAR-10 airplane vs horse (Nar et al. 2019a, §5, Figs. 4-5)
# ============================================================================================


@dataclass
class CifarConfig:
    """Sizes and settings of the CIFAR-10 experiment. Nar et al. 2019a, §5 states only: planes vs horses, a four-layer
    CNN, both models trained to zero training error, PGD and CW from Foolbox. Optimiser, learning rate,
    epochs and attack budgets are not given: ours. ``match_zero_error``: eq. 7 is stopped at its first
    epoch with zero training error (eq. 5 bias), as cross-entropy is, so both are compared at matched
    (zero) training error."""

    n_train: int = 10_000
    n_test: int = 2_000
    epochs: int = 200
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    seed: int = 0
    n_attack_train: int = 1_000       # training images attacked (Fig. 4 solid lines)
    n_attack_test: int = 2_000        # test images attacked (Fig. 4 dashed, Fig. 5)
    n_cw: int = 2_000
    epsilons: tuple[float, ...] = tuple(e / 255 for e in (0, 1, 2, 4, 8, 16, 32))
    pgd_steps: int = 100
    pgd_restarts: int = 1
    strong_steps: int = 1_000
    strong_restarts: int = 10
    unbounded_steps: int = 1_000
    cw_steps: int = 1_000
    cw_search: int = 9
    deepfool_steps: int = 50
    cw_epsilons: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
    match_zero_error: bool = True
    eval_batch_size: int = 1_000      # examples per attack call (memory, not results)
    # AutoAttack (Croce & Hein 2020), the evaluation of record (DESIGN §6): "standard" = the reference budgets
    # (100 iterations, 9 targets -- 1 for two classes --, 5,000 Square queries); "quick" = reduced; the
    # aa_* overrides set toy budgets (smoke)
    autoattack_version: str = "standard"
    aa_n_iter: int | None = None
    aa_n_queries: int | None = None


def cifar_config() -> CifarConfig:
    """The active run's configuration (:func:`marginlab.config.pick`).

    quick: the 1,033/207 CIFAR subset, few steps. standard (CPU): the full profile's optimiser and attack
    budgets on every local airplane/horse image (1,033 train, all 207 test attacked); training images
    attacked: the first 100 (cut: the full profile attacks 1,000). smoke: toy sizes of the full paths.
    """
    return config.pick(
        quick=CifarConfig(n_train=1_033, n_test=207, epochs=40, batch_size=64, n_attack_train=128,
                          n_attack_test=128, n_cw=64, pgd_steps=10, strong_steps=30, strong_restarts=2,
                          unbounded_steps=100, cw_steps=50, cw_search=4, deepfool_steps=30, match_zero_error=False,
                          autoattack_version="quick"),
        full=CifarConfig(),
        standard=CifarConfig(n_train=10_000, n_test=2_000, n_attack_train=100, n_attack_test=2_000, n_cw=2_000),
        smoke=CifarConfig(n_train=256, n_test=128, epochs=1, n_attack_train=32, n_attack_test=64, n_cw=32,
                          epsilons=(0.0, 8 / 255), pgd_steps=2, strong_steps=3, strong_restarts=1,
                          unbounded_steps=3, cw_steps=3, cw_search=1, deepfool_steps=3,
                          cw_epsilons=(0.0, 0.5), eval_batch_size=64, aa_n_iter=3, aa_n_queries=20),
    )


def load_airplane_horse(n_train: int, n_test: int, root=None) -> dict[str, torch.Tensor]:
    """CIFAR-10 airplane (+1) vs horse (−1), the first n images of each split (Nar et al. 2019a, §5)."""
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        out[f"x_{split}"], out[f"y_{split}"] = airplane_horse(split, n, root=root)
    return out


def airplane_horse(split: str, n: int, root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` CIFAR-10 airplane (+1) / horse (−1) images of ``split`` (a data factory of the job plan); the
    full profile first checks that the complete CIFAR-10 is there."""
    from . import data
    from .data import binary_subset, load

    if config.run_name() == "full":
        data.require("cifar10")
    x, y = load("cifar10", split=split, root=root)
    x, y = binary_subset(x, y, positive="airplane", negative="horse")
    return torch.as_tensor(x)[:n], torch.as_tensor(y)[:n]


def cifar_model(seed: int = 0) -> nn.Module:
    """The chapter's LeNet with one score, wrapped as two logits, initialised from ``torch.manual_seed(seed)``."""
    from .models import BinaryLogits, LeNet

    torch.manual_seed(seed)
    return BinaryLogits(LeNet(in_channels=3, num_classes=1))


def test_accuracy_callback(kind: str, train: tuple[torch.Tensor, torch.Tensor],
                           test: tuple[torch.Tensor, torch.Tensor]) -> Callable[[int, nn.Module], dict[str, float]]:
    """A ``fit`` callback: test accuracy per epoch ("test_acc"; for eq7 with the eq. 5 bias of that epoch, whose
    training accuracy is "train_acc_eq5"). Computes on the model's own device: capturing a device would put it into
    fit's cache key (callbacks are hashed), and a model trained on a GPU would not be reused on a CPU."""
    from . import jobs
    from .train import accuracy

    (xtr, ytr), (xte, yte) = train, test
    yte01 = (yte > 0).long()

    def test_acc(epoch: int, model: nn.Module) -> dict[str, float]:
        if kind == "ce":
            return {"test_acc": accuracy(model, xte, yte01)}
        s_tr, s_te = scores(model, xtr), scores(model, xte)
        pos = ytr > 0
        b = differential_bias(s_tr[pos], s_tr[~pos])
        return {"test_acc": float(((s_te + b > 0).long() == yte01).float().mean()),
                "train_acc_eq5": float(((s_tr + b > 0) == pos).float().mean())}

    # the name under which this callback was first hashed (inside train_cifar): keeps the models' cache keys
    return jobs.keep_cache_name(test_acc, "train_cifar.<locals>.test_acc")


def train_cifar_job(kind: str, cfg: CifarConfig | None = None, epochs: int | None = None) -> "jobs.Job":
    """The training of ``kind`` ("ce" or "eq7") under ``cfg`` (default :func:`cifar_config`): Adam on the first
    ``cfg.n_train`` training images, CE until zero training error, eq7 on balanced batches, for ``epochs``
    (default ``cfg.epochs``; eq7's matched re-run stops at its first zero-error epoch)."""
    from . import jobs, losses

    if kind not in ("ce", "eq7"):
        raise ValueError(f"kind must be 'ce' or 'eq7', got {kind!r}")
    cfg = cfg or cifar_config()
    matched = epochs is not None and epochs != cfg.epochs
    epochs = cfg.epochs if epochs is None else int(epochs)
    train, test = jobs.call(airplane_horse, "train", cfg.n_train), jobs.call(airplane_horse, "test", cfg.n_test)
    fit = dict(loss_fn=None if kind == "ce" else losses.squared_differential_loss, optimizer=cfg.optimizer,
               lr=cfg.lr, epochs=epochs, batch_size=cfg.batch_size,
               sampler="shuffle" if kind == "ce" else "balanced", seed=cfg.seed,
               callbacks=(jobs.call(test_accuracy_callback, kind, train, test),), cache=f"ch04-{kind}",
               until_zero_error=(kind == "ce"))
    return jobs.Job("04", f"{kind}-matched-{epochs}ep" if matched else kind,
                    model=jobs.call(cifar_model, cfg.seed), data=train, fit=fit)


def zero_error_epoch(history) -> int | None:
    """eq7's first epoch (> 0) whose eq. 5 training accuracy is 100%, or None."""
    return next((int(r["epoch"]) for r in history.rows if r.get("train_acc_eq5") == 1.0 and r["epoch"] > 0), None)


def training_jobs() -> list["jobs.Job"]:
    """Chapter 4's trainings in the active run: CE and eq7; with ``match_zero_error``, once eq7 is in the cache, its
    re-run up to its first zero-error epoch (``python -m marginlab jobs 4 --run`` plans again after each round)."""
    from . import jobs

    cfg = cifar_config()
    out = [train_cifar_job("ce", cfg), train_cifar_job("eq7", cfg)]
    if cfg.match_zero_error:
        hist = jobs.cached_history(out[1])
        first = None if hist is None else zero_error_epoch(hist)
        if first is not None and first < len(hist.rows) - 1:
            out.append(train_cifar_job("eq7", cfg, epochs=first))
    return out


def train_cifar(kind: str, data: dict[str, torch.Tensor] | None = None, cfg: CifarConfig | None = None, *,
                device: str | torch.device | None = None) -> tuple[nn.Module, Any]:
    """LeNet (one score, wrapped as two logits) trained with "ce" (cross-entropy) or "eq7"
    (squared differential loss, balanced batches): :func:`train_cifar_job`, the job the plan trains. The eq7
    model gets the eq. 5 bias afterwards. ``data``, if given, must be ``load_airplane_horse(cfg.n_train,
    cfg.n_test)`` (checked). Returns (model, history); the history's rows hold the test accuracy per epoch
    ("test_acc", with the eq. 5 bias of that epoch for eq7)."""
    from . import jobs
    from .train import fit

    cfg = cfg or cifar_config()
    dev = config.device(device)

    def run(epochs: int | None):
        b = jobs.build(train_cifar_job(kind, cfg, epochs))
        if data is not None and not (torch.equal(data["x_train"], b.x) and torch.equal(data["y_train"], b.y)):
            raise ValueError("data must be load_airplane_horse(cfg.n_train, cfg.n_test): the job trains on those")
        return b.model, fit(b.model, b.x, b.y, device=dev, progress=False, **b.fit), b

    model, hist, b = run(None)
    if kind == "eq7" and cfg.match_zero_error:
        # matched training error: stop at the first epoch whose eq. 5 training accuracy is 100%, as
        # cross-entropy stops at zero training error; the same seed replays the same batches exactly
        first = zero_error_epoch(hist)
        if first is not None and first < len(hist.rows) - 1:
            model, hist, b = run(first)
        hist.meta["stopped_at_zero_error"] = first
    if kind == "eq7":
        set_eq5_bias(model, b.x, b.y)
    return model.eval(), hist


@dataclass
class AttackSpec:
    """One attack and all its hyperparameters (reported in the chapter's table)."""

    name: str
    fn: str                      # "pgd" | "fgsm" | "autoattack"
    params: dict[str, Any] = field(default_factory=dict)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        from . import attacks

        if eps == 0:
            return x.clone()
        if self.fn == "pgd":
            return attacks.pgd(model, x, y, eps, **self.params)
        if self.fn == "fgsm":
            return attacks.fgsm(model, x, y, eps, **self.params)
        if self.fn == "autoattack":  # per-example worst case over APGD-CE, APGD-T, FAB-T, Square
            return attacks.AutoAttack(eps, **self.params)(model, x, y)
        raise ValueError(f"unknown attack function {self.fn!r}")


def attack_specs(cfg: CifarConfig) -> list[AttackSpec]:
    """DESIGN §6: CE- and margin-loss PGD, a stronger PGD (more steps and restarts), FGSM (single-step
    reference), step_size = 2.5·eps/steps (Madry et al. 2018); and AutoAttack (Croce & Hein 2020), the
    evaluation of record, at ``cfg.autoattack_version`` (its budgets overridden by ``cfg.aa_*`` if set)."""
    return [
        AttackSpec("PGD-CE", "pgd", dict(steps=cfg.pgd_steps, norm="linf", loss="ce", random_start=True,
                                          restarts=cfg.pgd_restarts, seed=0)),
        AttackSpec("PGD-margin", "pgd", dict(steps=cfg.pgd_steps, norm="linf", loss="margin", random_start=True,
                                              restarts=cfg.pgd_restarts, seed=1)),
        AttackSpec("PGD-margin-strong", "pgd", dict(steps=cfg.strong_steps, norm="linf", loss="margin",
                                                     random_start=True, restarts=cfg.strong_restarts, seed=2)),
        AttackSpec("FGSM", "fgsm", dict(norm="linf", loss="ce")),
        AttackSpec("AutoAttack", "autoattack", dict(norm="linf", version=cfg.autoattack_version, seed=4,
                                                   n_iter=cfg.aa_n_iter, n_queries=cfg.aa_n_queries)),
    ]


def _chunks(n: int, batch_size: int) -> list[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(i, i + batch_size) for i in range(0, n, batch_size)]


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y01: torch.Tensor, batch_size: int = 1_000) -> torch.Tensor:
    """Per-example correctness (bool, on the CPU); computed on the model's device in chunks."""
    from . import attacks

    dev = _model_device(model)
    return torch.cat([attacks.correct(model, x[s].to(dev), y01[s].to(dev)).cpu()
                      for s in _chunks(len(x), batch_size)]) if len(x) else torch.zeros(0, dtype=torch.bool)


def robustness_masks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, specs: Sequence[AttackSpec],
                     epsilons: Sequence[float], batch_size: int = 1_000) -> dict[str, torch.Tensor]:
    """Per-example robustness (bool (len(epsilons), N), on the CPU) under each attack and the per-example
    worst case over all of them ("worst case"; DESIGN §6); "clean" is the clean correctness (N,).

    The eps-balls are nested, so an example broken at a smaller eps counts as broken at every larger
    eps (the same adversarial point is feasible there) and is not attacked again, as in
    ``attacks.robust_accuracy(nested=True)``. Attacks run on the model's device in chunks of ``batch_size``.
    Adding an attack to the ensemble is adding an :class:`AttackSpec` to ``specs``.
    """
    y01 = (torch.as_tensor(y) > 0).long()
    if any(e < 0 for e in epsilons):
        raise ValueError("epsilons must be >= 0")
    dev = _model_device(model)
    xd, yd = x.to(dev), y01.to(dev)
    clean = _correct(model, xd, yd, batch_size)
    survivors = {s.name: clean.clone() for s in specs}
    out = {name: torch.zeros(len(epsilons), len(x), dtype=torch.bool) for name in [*survivors, "worst case"]}
    for k in sorted(range(len(epsilons)), key=lambda i: epsilons[i]):
        eps = float(epsilons[k])
        worst = clean.clone()
        for s in specs:
            idx = survivors[s.name].nonzero().flatten()
            if eps > 0 and len(idx):
                for part in _chunks(len(idx), batch_size):
                    sel = idx[part]
                    xs = xd[sel.to(dev)]
                    ok = _correct(model, s.run(model, xs, yd[sel.to(dev)], eps), yd[sel.to(dev)], batch_size)
                    survivors[s.name][sel] &= ok
            out[s.name][k] = survivors[s.name]
            worst &= survivors[s.name]
        out["worst case"][k] = worst
    out["clean"] = clean
    return out


def robustness_curves(model: nn.Module, x: torch.Tensor, y: torch.Tensor, specs: Sequence[AttackSpec],
                      epsilons: Sequence[float], batch_size: int = 1_000) -> dict[str, list[float]]:
    """Accuracy vs Linf eps under each attack and the per-example worst case (means of :func:`robustness_masks`)."""
    masks = robustness_masks(model, x, y, specs, epsilons, batch_size)
    clean = masks.pop("clean")
    curves = {name: [float(row.float().mean()) for row in m] for name, m in masks.items()}
    curves["clean"] = [float(clean.float().mean())] * len(epsilons)
    return curves


def unbounded_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                    batch_size: int = 1_000) -> dict[str, float]:
    """DESIGN §6: margin-loss PGD with eps = 1 (the whole [0,1] box) must reach 0% accuracy;
    returns its accuracy and the median Linf / L2 distortion of the adversarials it found.
    Computes on the model's device in chunks of ``batch_size``."""
    from . import attacks

    y01 = (torch.as_tensor(y) > 0).long()
    dev = _model_device(model)
    xd, yd = x.to(dev), y01.to(dev)
    xa = torch.cat([attacks.pgd(model, xd[s], yd[s], 1.0, steps=steps, norm="linf", loss="margin",
                                random_start=False, step_size=2.0 / steps, seed=3) for s in _chunks(len(x), batch_size)])
    ok = _correct(model, xa, yd, batch_size)
    d = (xa - xd).flatten(1).cpu()
    fooled = ~ok
    return {"accuracy": float(ok.float().mean()),
            "median_linf": float(d.abs().amax(1)[fooled].median()) if fooled.any() else math.inf,
            "median_l2": float(d.norm(dim=1)[fooled].median()) if fooled.any() else math.inf}


def minimal_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: CifarConfig) -> torch.Tensor:
    """Per-example minimal L2 perturbation found by CW-L2 and DeepFool (the smaller of the two), on the CPU;
    computed on the model's device in chunks of ``cfg.eval_batch_size``."""
    from . import attacks

    y01 = (torch.as_tensor(y) > 0).long()
    dev = _model_device(model)
    return torch.cat([attacks.minimal_perturbation(
        model, x[s].to(dev), y01[s].to(dev), norm="l2", methods=("deepfool", "cw"),
        cw=dict(steps=cfg.cw_steps, binary_search_steps=cfg.cw_search, lr=0.01, initial_const=1e-3),
        deepfool=dict(steps=cfg.deepfool_steps, overshoot=0.02),
    ).cpu() for s in _chunks(len(x), cfg.eval_batch_size)])


def attack_table(cfg: CifarConfig, n_train: int | None = None, n_test: int | None = None) -> list[dict[str, Any]]:
    """Every attack run in the chapter with all its hyperparameters; ``n_train``/``n_test`` (the images loaded,
    e.g. ``cifar_experiment``'s ``n_train``/``n_test``) turn the configured caps into the counts attacked."""
    n_tr = cfg.n_attack_train if n_train is None else min(cfg.n_attack_train, n_train)
    n_te = cfg.n_attack_test if n_test is None else min(cfg.n_attack_test, n_test)
    n_cw = cfg.n_cw if n_test is None else min(cfg.n_cw, n_test)
    images = f"{n_tr} train / {n_te} test"
    rows = []
    for s in attack_specs(cfg):
        p = dict(s.params)
        if s.fn == "autoattack":  # the members' budgets as the built object has them
            from . import attacks

            aa = attacks.AutoAttack(8 / 255, **p)
            rows.append({"attack": s.name, "norm": aa.norm, "loss": "CE, targeted DLR, FAB, Square (margin)",
                         "steps": f"{aa.n_iter} (APGD-CE, APGD-T, FAB-T); Square {aa.n_queries} queries",
                         "step size": "APGD: adaptive from 2·eps", "restarts": 1, "random start": "APGD: on the eps-sphere",
                         "other": f"version={aa.version}"
                                  + (" (REDUCED budget)" if aa.version == "quick" else "")
                                  + f", target classes 1 (two classes; the version's {aa.n_target_classes}), "
                                  f"Square p_init=0.8, seed={p['seed']}",
                         "eps": "Linf grid", "images": images})
            continue
        rows.append({"attack": s.name, "norm": p.pop("norm", "linf"), "loss": p.pop("loss", "ce"),
                     "steps": p.pop("steps", 1), "step size": "2.5·eps/steps" if s.fn == "pgd" else "eps",
                     "restarts": p.pop("restarts", 1), "random start": p.pop("random_start", False),
                     "other": ", ".join(f"{k}={v}" for k, v in p.items()) or "-",
                     "eps": "Linf grid", "images": images})
    rows.append({"attack": "PGD-unbounded", "norm": "linf", "loss": "margin", "steps": cfg.unbounded_steps,
                 "step size": f"2/{cfg.unbounded_steps}", "restarts": 1, "random start": False, "other": "seed=3",
                 "eps": "1.0 (whole box)", "images": f"{n_te} test"})
    rows.append({"attack": "CW-L2 (minimal)", "norm": "l2", "loss": "CW f6, confidence 0", "steps": cfg.cw_steps,
                 "step size": "Adam lr 0.01", "restarts": 1, "random start": False,
                 "other": f"binary search {cfg.cw_search}, initial const 1e-3", "eps": "minimal",
                 "images": f"{n_cw} test"})
    rows.append({"attack": "DeepFool (minimal)", "norm": "l2", "loss": "-", "steps": cfg.deepfool_steps,
                 "step size": "-", "restarts": 1, "random start": False, "other": "overshoot 0.02",
                 "eps": "minimal", "images": f"{n_cw} test"})
    return rows


def cifar_experiment(cfg: CifarConfig | None = None, device: str | torch.device | None = None) -> dict[str, Any]:
    """Nar et al. 2019a, §5: train CE and eq7 models, then clean accuracy, Linf robustness curves on training and
    test images (Fig. 4), minimal L2 distances on test images (Fig. 5, CW + DeepFool), the unbounded
    sanity attack, and the fraction of pairs used. DESIGN §6 rules are asserted."""
    from . import attacks

    cfg = cfg or cifar_config()
    dev = config.device(device)
    data = load_airplane_horse(cfg.n_train, cfg.n_test)
    specs = attack_specs(cfg)
    res: dict[str, Any] = {"config": cfg, "n_train": len(data["y_train"]), "n_test": len(data["y_test"])}
    for kind in ("ce", "eq7"):
        model, hist = train_cifar(kind, data, cfg, device=dev)
        r: dict[str, Any] = {"history": hist}
        for split in ("train", "test"):
            x, y = data[f"x_{split}"], data[f"y_{split}"]
            r[f"{split}_correct"] = _correct(model, x, (y > 0).long(), cfg.eval_batch_size)
            r[f"{split}_acc"] = float(r[f"{split}_correct"].float().mean())
        n_tr, n_te = min(cfg.n_attack_train, len(data["y_train"])), min(cfg.n_attack_test, len(data["y_test"]))
        for split, n in (("train", n_tr), ("test", n_te)):
            x, y = data[f"x_{split}"][:n], data[f"y_{split}"][:n]
            masks = robustness_masks(model, x, y, specs, cfg.epsilons, cfg.eval_batch_size)
            r[f"pgd_{split}_masks"] = masks  # per-example booleans (bootstrap intervals over images)
            curves = {name: [float(row.float().mean()) for row in m] for name, m in masks.items() if name != "clean"}
            curves["clean"] = [float(masks["clean"].float().mean())] * len(cfg.epsilons)
            clean = curves["clean"][0]
            unb = unbounded_check(model, x, y, cfg.unbounded_steps, cfg.eval_batch_size)
            for s in (s for s in specs if s.name != "FGSM"):
                # more steps and restarts must not raise accuracy: the strong attack against the same-loss PGD
                attacks.assert_sanity(cfg.epsilons, curves[s.name], clean=clean, label=f"{kind}/{split}/{s.name}",
                                      single_step=curves["FGSM"] if s.name != "FGSM" else None,
                                      stronger=[curves["PGD-margin-strong"]] if s.name == "PGD-margin" else None)
            attacks.assert_sanity(cfg.epsilons, curves["worst case"], clean=clean, unbounded=unb["accuracy"],
                                  median_distortion=unb["median_linf"], label=f"{kind}/{split}/worst case")
            r[f"pgd_{split}"], r[f"unbounded_{split}"] = curves, unb
        n_cw = min(cfg.n_cw, len(data["y_test"]))
        dist = minimal_l2(model, data["x_test"][:n_cw], data["y_test"][:n_cw], cfg)
        r["l2_distances"] = dist.numpy()
        r["cw_curve"] = attacks.accuracy_at_distances(dist, cfg.cw_epsilons)
        fooled = torch.isfinite(dist) & (dist > 0)
        r["median_l2"] = float(dist[torch.isfinite(dist)].median())  # 0 for misclassified, inf excluded
        r["median_l2_correct"] = float(dist[fooled].median()) if fooled.any() else math.inf
        r["cw_found_all"] = bool(torch.isfinite(dist).all())
        res[kind] = r
    epochs_run = len(res["eq7"]["history"].rows) - 1
    res["pairs"] = pair_usage(data["y_train"], cfg.batch_size, epochs_run, cfg.seed)
    return res


def pairs_to_match(history, pairs: dict[str, list[float]], target_acc: float, tol: float = 0.01) -> float | None:
    """Fraction of distinct pairs formed by the first epoch whose test accuracy is within ``tol`` of
    ``target_acc`` (Nar et al. 2019a, §4.1: "a few percent of |I|×|J| pairs"); None if never reached."""
    acc = history.column("test_acc")
    for epoch, a in enumerate(acc):
        if epoch > 0 and a >= target_acc - tol:
            return pairs["distinct"][epoch]
    return None
