"""Chapter 6 computation: minimum versus average margin (Wu & Yu 2019, paper 003).

* :func:`logistic_sgd_margins` — binary logistic regression trained by (stochastic) gradient
  descent with the exact minimum / average margin of every epoch (003 §3, Fig 1, Fig 3).
* :func:`is_linearly_separable` — an LP feasibility check, run before the hard-margin SVM.
* :func:`margin_curves` — margins of nonlinear models at chosen epochs by the Lipschitz lower bound
  (003 Thm 2, Hein & Andriushchenko 2017) and a minimal-perturbation upper bound (003 Fig 2, 5–7).
* :func:`compare_training` — standard training vs Lipschitz regularisation vs the average-margin
  regulariser: clean accuracy, L2-PGD accuracy and average margin (003 Table 1).

Margins here are signed L2 distances to the decision boundary (003 §2): positive when the point is
classified correctly, negative otherwise; exact for linear models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from . import config

# --------------------------------------------------------------------------------------------
# exact margins of linear classifiers and binary logistic regression by SGD (003 §3)
# --------------------------------------------------------------------------------------------


def _as_2d_float64(X, name: str) -> np.ndarray:
    if hasattr(X, "detach"):
        X = X.detach().cpu().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim < 2:
        raise ValueError(f"{name} must have shape (n, d) or (n, C, H, W), got {X.shape}")
    return X.reshape(X.shape[0], -1)


def _as_pm1(y, n: int, name: str) -> np.ndarray:
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} labels for {n} points")
    if not np.all(np.isin(y, (-1, 1))):
        raise ValueError(f"{name} must take values in {{-1, +1}}, got {np.unique(y)[:5]}")
    return y.astype(np.float64)


def signed_linear_margins(w: np.ndarray, b: float, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example signed distance y_i (w·x_i + b)/‖w‖ to the hyperplane (003 §2, exact for linear f)."""
    X = _as_2d_float64(X, "X")
    y = _as_pm1(y, X.shape[0], "y")
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    if w.shape[0] != X.shape[1]:
        raise ValueError(f"w has {w.shape[0]} entries, X has {X.shape[1]} features")
    norm = np.linalg.norm(w)
    if norm == 0:
        raise ValueError("the margin is undefined for w = 0")
    return y * (X @ w + float(b)) / norm


def is_linearly_separable(X, y, bias: bool = True) -> bool:
    """Whether some (w, b) has y_i (w·x_i + b) ≥ 1 for all i (LP feasibility, scipy HiGHS)."""
    from scipy.optimize import linprog

    X = _as_2d_float64(X, "X")
    y = _as_pm1(y, X.shape[0], "y")
    A = -(y[:, None] * (np.c_[X, np.ones(len(X))] if bias else X))
    res = linprog(np.zeros(A.shape[1]), A_ub=A, b_ub=-np.ones(len(X)), bounds=(None, None), method="highs")
    return res.status == 0


def svm_margins(X, y, X_test=None, y_test=None) -> dict[str, np.ndarray | float]:
    """Hard-margin SVM (``marginlab.linear.svm``, cvxpy) and its exact margins on train (and test) points.

    Raises ValueError when the training set is not linearly separable (the SVM does not exist).
    """
    X = _as_2d_float64(X, "X")
    y = _as_pm1(y, X.shape[0], "y")
    if not is_linearly_separable(X, y):
        raise ValueError("training data are not linearly separable: the hard-margin SVM does not exist")
    from . import linear

    w, b = linear.svm(X, y, bias=True)
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    out: dict[str, np.ndarray | float] = {"w": w, "b": float(np.asarray(b).reshape(()))}
    out["train"] = signed_linear_margins(w, out["b"], X, y)
    if X_test is not None:
        Xt = _as_2d_float64(X_test, "X_test")
        out["test"] = signed_linear_margins(w, out["b"], Xt, _as_pm1(y_test, Xt.shape[0], "y_test"))
    return out


@dataclass
class MarginTrace:
    """Margins of a linear classifier over training epochs (one row per tracked epoch)."""

    epochs: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    train_error: list[float] = field(default_factory=list)
    test_error: list[float] = field(default_factory=list)
    train_min: list[float] = field(default_factory=list)
    train_mean: list[float] = field(default_factory=list)
    test_min: list[float] = field(default_factory=list)
    test_mean: list[float] = field(default_factory=list)
    snapshots: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    w: np.ndarray | None = None
    b: float = 0.0

    def as_dict(self) -> dict:
        keys = ("epochs", "loss", "train_error", "test_error", "train_min", "train_mean", "test_min", "test_mean")
        return {k: list(getattr(self, k)) for k in keys}


def logistic_sgd_margins(
    X, y, X_test=None, y_test=None, *, epochs: int, lr: float = 0.01, momentum: float = 0.9,
    nesterov: bool = True, batch_size: int | None = 128, bias: bool = True, seed: int = 0,
    snapshot_epochs: Iterable[int] = (), track_every: int = 1,
) -> MarginTrace:
    """Binary logistic regression, mean loss log(1 + exp(−y(w·x + b))), from w = 0 by SGD (003 §3, App. A:
    lr 0.01, momentum 0.9, Nesterov, batch 128); ``batch_size=None`` is full-batch gradient descent.

    After every ``track_every``-th epoch it records the exact minimum and average signed margin
    (003 §2) on the training and test points, the loss and the errors; at ``snapshot_epochs`` it
    keeps every margin (for histograms, 003 Fig 1c). Float64 throughout: margins near the SVM's
    differ in the 4th digit. Labels in {−1, +1}.
    """
    X = _as_2d_float64(X, "X")
    y = _as_pm1(y, X.shape[0], "y")
    has_test = X_test is not None
    if has_test:
        Xt = _as_2d_float64(X_test, "X_test")
        yt = _as_pm1(y_test, Xt.shape[0], "y_test")
        if Xt.shape[1] != X.shape[1]:
            raise ValueError(f"X_test has {Xt.shape[1]} features, X has {X.shape[1]}")
    if epochs < 1 or track_every < 1:
        raise ValueError(f"epochs and track_every must be >= 1, got {epochs}, {track_every}")
    if lr <= 0 or not 0 <= momentum < 1:
        raise ValueError(f"need lr > 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
    n = X.shape[0]
    bs = n if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    snaps = set(int(e) for e in snapshot_epochs)

    gen = torch.Generator().manual_seed(seed)
    Xtr, ytr = torch.from_numpy(X), torch.from_numpy(y)
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=bias)
    params = [w, b] if bias else [w]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    trace = MarginTrace()

    def evaluate(epoch: int) -> None:
        with torch.no_grad():
            wn, bn = w.numpy().copy(), float(b)
        if not np.any(wn):
            return
        m_tr = signed_linear_margins(wn, bn, X, y)
        trace.epochs.append(epoch)
        trace.loss.append(float(np.mean(np.logaddexp(0.0, -y * (X @ wn + bn)))))
        trace.train_error.append(float(np.mean(m_tr <= 0)))
        trace.train_min.append(float(m_tr.min()))
        trace.train_mean.append(float(m_tr.mean()))
        snap = {"train": m_tr} if epoch in snaps else None
        if has_test:
            m_te = signed_linear_margins(wn, bn, Xt, yt)
            trace.test_error.append(float(np.mean(m_te <= 0)))
            trace.test_min.append(float(m_te.min()))
            trace.test_mean.append(float(m_te.mean()))
            if snap is not None:
                snap["test"] = m_te
        if snap is not None:
            trace.snapshots[epoch] = snap

    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=gen) if bs < n else torch.arange(n)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            opt.zero_grad(set_to_none=True)
            score = Xtr[idx] @ w + b
            loss = torch.nn.functional.softplus(-ytr[idx] * score).mean()
            loss.backward()
            opt.step()
        if epoch % track_every == 0 or epoch in snaps or epoch == epochs or epoch == 1:
            evaluate(epoch)
    trace.w, trace.b = w.detach().numpy().copy(), float(b.detach())
    return trace
