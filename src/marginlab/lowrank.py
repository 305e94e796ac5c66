"""Low-rank penultimate features (chapter 3).

Two parts:

* **Proposition 1 of 000** (Nar et al. 2019, §3 and App. B), exactly: a network
  ``score = head(φ(x))`` whose penultimate layer ends with a linear map,
  ``φ(x) = W h(x)``, trained by gradient descent on cross-entropy from
  ``W(0) = 0``, keeps ``rank{φ(x_i)} ≤ 1`` at every step (binary logistic loss,
  000 Prop. 1 / eq. 11). The same argument gives ``rank ≤ K − 1`` for a
  ``K``-class softmax head (our extension, proved in the chapter), momentum
  included; with ``tanh`` before ``W`` and a random ``W(0)`` the ratio
  ``σ₂/σ₁`` of the feature matrix only *decays* (000 App. B, a heuristic
  argument, not a theorem): :func:`feature_rank_dynamics` records it.
* **The CIFAR-10 airplane-vs-horse experiment** (000 Fig. 2, 001 Fig. 3): a
  LeNet-style CNN trained with SGD+momentum, Adam and SGD+BatchNorm; PCA
  spectrum, components for a variance level and effective rank of its 84-d
  penultimate features (:func:`spectrum`, :func:`rank_callback`), and the
  margin of its own linear head on the frozen features against the SVM
  margin on the same features (:func:`head_vs_svm_margin`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import config

LOSSES = ("logistic", "softmax")
OPTIMIZERS = ("gd", "momentum", "adam")
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "identity": lambda z: z}


# ---------------------------------------------------------------------------------------------
# Proposition 1: φ = W h(x), W(0) = 0  =>  rank{φ(x_i)} ≤ 1
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectrumTrace:
    """Singular values of the (uncentred) feature matrix Φ = [φ(x_1); …; φ(x_n)] during training."""

    steps: np.ndarray  # (T,) gradient steps taken when recorded (0 = initialisation)
    singular_values: np.ndarray  # (T, r) descending, r = min(n, p)
    loss: np.ndarray  # (T,)
    train_error: np.ndarray  # (T,) fraction misclassified
    settings: dict[str, Any] = field(default_factory=dict)

    def ratio(self, k: int = 2) -> np.ndarray:
        """σ_k / σ_1 per recorded step (0 where Φ = 0, and 0 when Φ has fewer than k singular values)."""
        if k < 2:
            raise ValueError(f"k must be >= 2, got {k}")
        s = self.singular_values
        if s.shape[1] < k:
            return np.zeros(len(s))
        s1 = s[:, 0]
        return np.where(s1 > 0, s[:, k - 1] / np.where(s1 > 0, s1, 1.0), 0.0)


def random_feature_problem(
    n: int = 40,
    d: int = 10,
    *,
    num_classes: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs ``X`` (n, d) labelled by a random linear teacher.

    Labels are class indices in ``0..K-1`` (argmax of a random linear map; for
    K = 2 the sign of one direction), so the classes are linearly separable in
    input space. Use :func:`signed_labels` for the ±1 labels of the logistic loss.
    """
    if n < 2 or d < 1 or num_classes < 2:
        raise ValueError(f"need n >= 2, d >= 1, num_classes >= 2; got n={n}, d={d}, num_classes={num_classes}")
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    U = torch.randn(d, num_classes, generator=g, dtype=dtype)
    y = (X @ U).argmax(1)
    return X, y


def signed_labels(y: torch.Tensor) -> torch.Tensor:
    """Class indices {0, 1} -> labels {-1, +1} (class 1 is +1)."""
    y = torch.as_tensor(y)
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("signed_labels needs binary class indices in {0, 1}")
    return 2.0 * y.double() - 1.0


def prop1_rank_bound(loss: str, num_classes: int = 2) -> int:
    """Rank bound on {φ(x_i)} when W(0) = 0: 1 for the binary logistic loss (000 Prop. 1),
    K − 1 for a K-class softmax head (our extension: the updates of W stay in the span
    of the head's row differences)."""
    if loss == "logistic":
        return 1
    if loss == "softmax":
        return num_classes - 1
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def feature_rank_dynamics(
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    width: int = 30,
    features: int = 8,
    activation: str = "relu",
    loss: str = "logistic",
    init: str = "zero",
    init_scale: float = 1.0,
    optimizer: str = "gd",
    lr: float = 0.1,
    momentum: float = 0.9,
    steps: int = 200,
    record: Sequence[int] | None = None,
    train_h: bool = False,
    seed: int = 0,
) -> SpectrumTrace:
    """Full-batch training of ``score = head(W h(x))`` on cross-entropy; singular values of Φ = H Wᵀ per step.

    000 Prop. 1 (and App. B eq. 11): ``h(x) = act(A x / √d)`` with ``A`` random
    (fixed unless ``train_h``), ``W`` of shape (features, width) initialised to
    zero (``init="zero"``, the proposition) or Gaussian with std
    ``init_scale/√width`` (``init="normal"``, App. B). ``loss="logistic"``:
    one score ``wᵀ W h(x)``, mean of ``log(1 + exp(−y s))``, labels ±1 (the
    paper's form); ``loss="softmax"``: K logits ``V W h(x) + c``, labels
    ``0..K−1``. The head (``w`` or ``V``) starts Gaussian (it must be non-zero or
    nothing moves). Computation in float64. ``record``: the steps at which
    to take the SVD (default: every step).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if init not in ("zero", "normal"):
        raise ValueError(f"init must be 'zero' or 'normal', got {init!r}")
    if width < 1 or features < 1 or steps < 0 or lr <= 0:
        raise ValueError(f"need width, features >= 1, steps >= 0, lr > 0; got {width}, {features}, {steps}, {lr}")
    X = torch.as_tensor(X, dtype=torch.float64)
    y = torch.as_tensor(y)
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise ValueError(f"X must be (n, d) and y (n,); got {tuple(X.shape)} and {tuple(y.shape)}")
    if loss == "logistic":
        if not bool(((y == 1) | (y == -1)).all()):
            raise ValueError("the logistic loss needs labels in {-1, +1} (see signed_labels)")
        y = y.double()
        num_classes = 2
    else:
        if y.dtype.is_floating_point or bool((y < 0).any()):
            raise ValueError("the softmax loss needs integer class indices 0..K-1")
        y = y.long()
        num_classes = max(2, int(y.max()) + 1)

    n, d = X.shape
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    A = (torch.randn(width, d, generator=g, dtype=dt) / math.sqrt(d)).requires_grad_(train_h)
    W = torch.zeros(features, width, dtype=dt)
    if init == "normal":
        W = init_scale * torch.randn(features, width, generator=g, dtype=dt) / math.sqrt(width)
    W.requires_grad_(True)
    if loss == "logistic":
        head = [torch.randn(features, generator=g, dtype=dt).div_(math.sqrt(features)).requires_grad_(True)]
    else:
        head = [
            torch.randn(num_classes, features, generator=g, dtype=dt).div_(math.sqrt(features)).requires_grad_(True),
            torch.zeros(num_classes, dtype=dt, requires_grad=True),
        ]
    params = [W, *head] + ([A] if train_h else [])
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum if optimizer == "momentum" else 0.0)
    act = ACTIVATIONS[activation]
    when = set(range(steps + 1)) if record is None else {int(s) for s in record if 0 <= int(s) <= steps} | {0}

    def forward() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        phi = act(X @ A.T) @ W.T  # (n, features): φ(x_i) = W h(x_i)
        if loss == "logistic":
            s = phi @ head[0]
            return phi, F.softplus(-y * s).mean(), (y * s <= 0).double().mean()
        logits = phi @ head[0].T + head[1]
        return phi, F.cross_entropy(logits, y), (logits.argmax(1) != y).double().mean()

    rec_steps, svals, losses, errors = [], [], [], []
    for t in range(steps + 1):
        phi, value, err = forward()
        if t in when:
            rec_steps.append(t)
            svals.append(torch.linalg.svdvals(phi.detach()).numpy())
            losses.append(float(value))
            errors.append(float(err))
        if t == steps:
            break
        opt.zero_grad()
        value.backward()
        opt.step()
    settings = dict(width=width, features=features, activation=activation, loss=loss, init=init,
                    init_scale=init_scale, optimizer=optimizer, lr=lr, momentum=momentum, steps=steps,
                    train_h=train_h, seed=seed, n=n, d=d, num_classes=num_classes)
    return SpectrumTrace(np.asarray(rec_steps), np.stack(svals), np.asarray(losses), np.asarray(errors), settings)


def max_excess_ratio(trace: SpectrumTrace, rank: int) -> float:
    """max over recorded steps of σ_{rank+1}/σ_1: ≈ 0 (machine precision) iff rank{φ(x_i)} ≤ ``rank`` throughout."""
    return float(trace.ratio(rank + 1).max()) if len(trace.steps) else 0.0


def check_prop1(trace: SpectrumTrace, rtol: float = 1e-10) -> float:
    """Assert 000 Prop. 1 on a trace from ``init="zero"`` with GD or momentum: σ_{b+1}/σ_1 ≤ rtol at every step,
    b = :func:`prop1_rank_bound`. Returns the worst ratio."""
    s = trace.settings
    if s.get("init") != "zero" or s.get("optimizer") == "adam":
        raise ValueError("Prop. 1 covers W(0) = 0 with gradient descent (plain or momentum), not this trace")
    bound = prop1_rank_bound(s["loss"], s["num_classes"])
    worst = max_excess_ratio(trace, bound)
    assert worst <= rtol, f"rank exceeded {bound}: max σ_{bound + 1}/σ_1 = {worst:.3e} > {rtol:g}"
    return worst


def decay_summary(trace: SpectrumTrace) -> dict[str, float]:
    """Numbers behind the App. B curve: σ₂/σ₁ at the start and the end, and how σ₁ and σ₂ changed.

    App. B's mechanism is that the rank-one part (rows of W along v) grows while
    the rest does not, so σ₁ should grow and σ₂ stay put.
    """
    r = trace.ratio(2)
    s = trace.singular_values
    return {
        "ratio_start": float(r[0]),
        "ratio_end": float(r[-1]),
        "ratio_drop": float(r[-1] / r[0]) if r[0] > 0 else float("nan"),
        "sigma1_growth": float(s[-1, 0] / s[0, 0]) if s[0, 0] > 0 else float("nan"),
        "sigma2_growth": float(s[-1, 1] / s[0, 1]) if s.shape[1] > 1 and s[0, 1] > 0 else float("nan"),
        "final_train_error": float(trace.train_error[-1]),
        "final_loss": float(trace.loss[-1]),
    }


def log_steps(steps: int, points: int = 60) -> list[int]:
    """About ``points`` log-spaced step indices in [0, steps] (for long runs' SVD records)."""
    if steps < 1:
        return [0]
    grid = np.unique(np.round(np.logspace(0, math.log10(steps), points)).astype(int))
    return [0, *grid.tolist()]


# ---------------------------------------------------------------------------------------------
# Spectra of learned features (000 Fig. 2, 001 Fig. 3)
# ---------------------------------------------------------------------------------------------

LEVELS = (0.9, 0.99, 0.999)


def _as_matrix(F_: torch.Tensor | np.ndarray) -> np.ndarray:
    Fm = F_.detach().cpu().numpy() if hasattr(F_, "detach") else np.asarray(F_)
    if Fm.ndim != 2 or len(Fm) < 2:
        raise ValueError(f"features must be a 2-D (n >= 2, p) matrix, got shape {Fm.shape}")
    if not np.isfinite(Fm).all():
        raise ValueError("features contain NaN or inf")
    return Fm.astype(np.float64)


def _explained_variance(Fm: np.ndarray) -> np.ndarray:
    """Cumulative PCA explained-variance ratio (centred features), length p."""
    s = np.linalg.svd(Fm - Fm.mean(0), compute_uv=False)
    var = s**2
    total = var.sum()
    cum = np.cumsum(var) / total if total > 0 else np.ones_like(var)
    out = np.ones(Fm.shape[1])
    out[: cum.size] = np.minimum(cum, 1.0)
    return out


def _components_for(cum: np.ndarray, level: float) -> int:
    # tolerance so that a level reached up to round-off counts as reached
    return int(np.searchsorted(cum, level - 1e-12) + 1)


def _effective_rank(Fm: np.ndarray) -> float:
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values of the centred features."""
    s = np.linalg.svd(Fm - Fm.mean(0), compute_uv=False)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def spectrum(F_: torch.Tensor | np.ndarray, levels: Sequence[float] = LEVELS) -> dict[str, Any]:
    """PCA spectrum of a feature matrix (n, p): cumulative explained variance, components for each level,
    effective rank (000 Fig. 2; 001 Fig. 3). Uses ``marginlab.features`` when it is importable."""
    Fm = _as_matrix(F_)
    try:
        from . import features as mf

        cum = np.asarray(mf.explained_variance(Fm), dtype=float)
        comps = {lv: int(mf.components_for(cum, lv)) for lv in levels}
        erank = float(mf.effective_rank(Fm))
    except (ImportError, AttributeError):  # toolkit not there yet: same definitions, private copy
        cum = _explained_variance(Fm)
        comps = {lv: _components_for(cum, lv) for lv in levels}
        erank = _effective_rank(Fm)
    return {"cumulative": cum, "components": comps, "effective_rank": erank, "dim": Fm.shape[1]}


# ---------------------------------------------------------------------------------------------
# CIFAR-10 airplane vs horse: LeNet with three optimisers
# ---------------------------------------------------------------------------------------------

# 000 and 001 give no optimiser hyper-parameters (lr, momentum, batch size, epochs); these are
# conventional choices for a LeNet on CIFAR-10, stated in the chapter. Every run trains to zero
# training error ("until_zero_error") within ``epochs``.
VARIANTS: dict[str, dict[str, Any]] = {
    "SGD + momentum": dict(batchnorm=False, optimizer="momentum", lr=0.01, momentum=0.9),
    "Adam": dict(batchnorm=False, optimizer="adam", lr=1e-3),
    "SGD + BatchNorm": dict(batchnorm=True, optimizer="sgd", lr=0.05),
}


def binary_cifar(split: str = "train", n: int | None = None, root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 airplane (class index 0) vs horse (class index 1), as in 000 §5 / 001 §5.

    Returns images in [0,1] and labels as class indices {0, 1} for 2-logit
    cross-entropy (horse = 1, the ``+1`` class of ``binary_subset``).
    ``n``: keep the first n images (None = all).
    """
    from . import data

    x, y = data.load("cifar10", split=split, root=root)
    x, y = data.binary_subset(x, y, positive=7, negative=0)  # horse = +1, airplane = −1
    y = torch.as_tensor(y)
    y01 = (y > 0).long()
    if n is not None:
        x, y01 = x[:n], y01[:n]
    return x, y01


@torch.no_grad()
def penultimate(model: nn.Module, x: torch.Tensor, batch_size: int = 1024, device=None) -> torch.Tensor:
    """The model's penultimate features ``model.features(x)`` in eval mode, float64 on the CPU."""
    dev = config.device(device)
    was = model.training
    model.eval()
    try:
        out = [model.features(x[i : i + batch_size].to(dev)).double().cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was)
    return torch.cat(out)


def rank_callback(sets: dict[str, torch.Tensor], level: float = 0.99, device=None) -> Callable[[int, nn.Module], dict]:
    """A ``fit`` callback: effective rank and components for ``level`` of the penultimate features of each
    named input set (e.g. ``{"train": x_train, "test": x_test}``) after every epoch."""

    def cb(epoch: int, model: nn.Module) -> dict[str, float]:
        row = {}
        for name, x in sets.items():
            sp = spectrum(penultimate(model, x, device=device), levels=(level,))
            row[f"{name}_eff_rank"] = sp["effective_rank"]
            row[f"{name}_comp{int(round(level * 1000)) / 10:g}"] = sp["components"][level]
        return row

    return cb


def head_direction(head: nn.Linear) -> tuple[np.ndarray, float]:
    """The binary score of a 2-logit head, s(φ) = (w₁ − w₀)·φ + (b₁ − b₀) (positive ⇔ class 1);
    a 1-output head is its own score."""
    Wt = head.weight.detach().double().cpu().numpy()
    bt = head.bias.detach().double().cpu().numpy() if head.bias is not None else np.zeros(len(Wt))
    if Wt.shape[0] == 2:
        return Wt[1] - Wt[0], float(bt[1] - bt[0])
    if Wt.shape[0] == 1:
        return Wt[0], float(bt[0])
    raise ValueError(f"head_direction needs a binary head (1 or 2 outputs), got {Wt.shape[0]}")


def _linear_margins(w: np.ndarray, b: float, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    return y * (X @ w + b) / np.linalg.norm(w)


def head_vs_svm_margin(model: nn.Module, x: torch.Tensor, y01: torch.Tensor, device=None) -> dict[str, Any]:
    """Margin of the trained head on its own frozen penultimate features vs the hard-margin SVM on them.

    Both are Euclidean distances in the 84-d feature space: the head's
    ``min_i y_i s(φ_i)/‖w₁ − w₀‖`` and the SVM's (``marginlab.linear.svm``, with
    bias). Their ratio is scale-free and ≤ 1 whenever the head separates the
    features (the SVM margin is the largest; asserted). Also: the angle between
    the two normals, and both margins divided by the RMS distance of the
    features to their mean (to compare networks whose features differ in scale).
    """
    from . import linear

    Fm = penultimate(model, x, device=device).numpy()
    ys = 2.0 * torch.as_tensor(y01).double().numpy() - 1.0
    w_h, b_h = head_direction(model.head)
    m_head = float(_linear_margins(w_h, b_h, Fm, ys).min())
    out: dict[str, Any] = {"head_margin": m_head, "separable_by_head": m_head > 0,
                           "feature_scale": float(np.sqrt(((Fm - Fm.mean(0)) ** 2).sum(1).mean()))}
    out["svm_margin"] = out["ratio"] = out["angle_deg"] = None
    if m_head <= 0:
        return out  # the head errs on some training point; the SVM may not exist either
    w_s, b_s = linear.svm(Fm, ys, bias=True)
    w_s, b_s = np.asarray(w_s, dtype=float), float(b_s)
    m_svm = float(linear.margin(w_s, b_s, Fm, ys))
    cos = float(w_h @ w_s / (np.linalg.norm(w_h) * np.linalg.norm(w_s)))
    out.update(svm_margin=m_svm, ratio=m_head / m_svm, angle_deg=math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
    # The SVM maximises the margin: a larger head margin would mean a solver failure.
    assert m_head <= m_svm * (1 + 1e-4) + 1e-8, f"head margin {m_head} exceeds SVM margin {m_svm}"
    out["head_margin_rel"] = m_head / out["feature_scale"]
    out["svm_margin_rel"] = m_svm / out["feature_scale"]
    return out
