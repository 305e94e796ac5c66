"""Chapter 6 computation: minimum versus average margin (Wu & Yu 2019).

* :func:`logistic_sgd_margins` — binary logistic regression trained by (stochastic) gradient
  descent with the exact minimum / average margin of every epoch (Wu & Yu 2019, §3, Fig 1, Fig 3).
* :func:`svm_margins` — the hard-margin SVM's margins (reference lines), after a separability check.
* :func:`margin_curves` — margins of nonlinear models at chosen epochs by the Lipschitz lower bound
  (Wu & Yu 2019, Thm 2, Hein & Andriushchenko 2017) and a minimal-perturbation upper bound (Wu & Yu 2019, Fig 2, 5–7).
* :func:`compare_training` — standard training vs Lipschitz regularisation vs the average-margin
  regulariser: clean accuracy, L2-PGD accuracy and average margin (Wu & Yu 2019, Table 1).

Margins here are signed L2 distances to the decision boundary (Wu & Yu 2019, §2): positive when the point is
classified correctly, negative otherwise; exact for linear models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from . import config

if TYPE_CHECKING:  # only for annotations: jobs imports the chapter modules
    from . import jobs

# --------------------------------------------------------------------------------------------
# exact margins of linear classifiers and binary logistic regression by SGD (Wu & Yu 2019, §3)
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
    """Per-example signed distance y_i (w·x_i + b)/‖w‖ to the hyperplane (Wu & Yu 2019, §2, exact for linear f)."""
    from . import linear

    return linear.margins(w, b, X, y)


def svm_margins(X, y, X_test=None, y_test=None) -> dict[str, np.ndarray | float]:
    """Hard-margin SVM (``marginlab.linear.svm``, cvxpy) and its exact margins on train (and test) points.

    Raises ValueError when the training set is not linearly separable (the SVM does not exist).
    """
    X = _as_2d_float64(X, "X")
    y = _as_pm1(y, X.shape[0], "y")
    from . import linear

    if not linear.is_separable(X, y, bias=True):
        raise ValueError("training data are not linearly separable: the hard-margin SVM does not exist")
    w, b = linear.svm(X, y, bias=True)
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    out: dict[str, np.ndarray | float] = {"w": w, "b": float(np.asarray(b).reshape(()))}
    out["train"] = signed_linear_margins(w, out["b"], X, y)
    if X_test is not None:
        Xt = _as_2d_float64(X_test, "X_test")
        out["test"] = signed_linear_margins(w, out["b"], Xt, _as_pm1(y_test, Xt.shape[0], "y_test"))
    return out


def _single_thread_blas():
    """Small mat-vecs in one BLAS thread: on a shared, busy CPU threaded BLAS is up to 40x slower here."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


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
    """Binary logistic regression, mean loss log(1 + exp(−y(w·x + b))), from w = 0 by SGD (Wu & Yu 2019, §3, App. A:
    lr 0.01, momentum 0.9, Nesterov, batch 128); ``batch_size=None`` is full-batch gradient descent.

    After every ``track_every``-th epoch it records the exact minimum and average signed margin
    (Wu & Yu 2019, §2) on the training and test points, the loss and the errors; at ``snapshot_epochs`` it
    keeps every margin (for histograms, Wu & Yu 2019, Fig 1c). Float64 throughout: margins near the SVM's
    differ in the 4th digit. Labels in {−1, +1}.
    """
    with _single_thread_blas():
        return _logistic_sgd_margins(
            X, y, X_test, y_test, epochs=epochs, lr=lr, momentum=momentum, nesterov=nesterov,
            batch_size=batch_size, bias=bias, seed=seed, snapshot_epochs=snapshot_epochs, track_every=track_every)


def _logistic_sgd_margins(X, y, X_test, y_test, *, epochs, lr, momentum, nesterov, batch_size, bias, seed,
                          snapshot_epochs, track_every) -> MarginTrace:
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

    # Hand-written SGD in numpy: for a linear model this is ~20x faster than autograd on a busy CPU.
    # The update is PyTorch's SGD (v ← μv + g; step = g + μv with Nesterov, else v), from w = 0.
    rng = np.random.default_rng(seed)
    Xa = np.c_[X, np.ones(n)] if bias else X
    theta = np.zeros(Xa.shape[1])
    vel = np.zeros_like(theta)
    use_nesterov = nesterov and momentum > 0
    trace = MarginTrace()

    def evaluate(epoch: int) -> None:
        wn, bn = (theta[:-1], float(theta[-1])) if bias else (theta, 0.0)
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
        perm = rng.permutation(n) if bs < n else np.arange(n)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            xb, yb = Xa[idx], y[idx]
            # d/ds log(1 + exp(−y s)) = −y σ(−y s)
            g = xb.T @ (-yb * 0.5 * (1.0 - np.tanh(0.5 * yb * (xb @ theta)))) / len(idx)
            if momentum > 0:
                vel = momentum * vel + g
                g = g + momentum * vel if use_nesterov else vel
            theta = theta - lr * g
        if epoch % track_every == 0 or epoch in snaps or epoch == epochs or epoch == 1:
            evaluate(epoch)
    trace.w, trace.b = ((theta[:-1].copy(), float(theta[-1])) if bias else (theta.copy(), 0.0))
    return trace


# --------------------------------------------------------------------------------------------
# margins of nonlinear models over training (Wu & Yu 2019, §4.1–4.2, Fig 2, 5–7)
# --------------------------------------------------------------------------------------------

#: Epochs at which Wu & Yu 2019, App. A estimates the margins of the nonlinear models.
PAPER_EPOCHS = (1, 10, 20, 30, 40, 50, 80, 120, 160, 200)
#: Truncation τ of the average-margin regulariser per model (Wu & Yu 2019, App. A).
PAPER_TAU = {("mnist", "lr"): 5.0, ("mnist", "mlp"): 5.0, ("mnist", "cnn"): 10.0,
             ("cifar10", "lr"): 5.0, ("cifar10", "mlp"): 10.0, ("cifar10", "cnn"): 10.0}
#: L2-PGD radii of Wu & Yu 2019, Table 1.
PAPER_EPS = {"mnist": (0.5, 1.0, 1.5, 2.0), "cifar10": (0.1, 0.2, 0.3, 0.4)}
#: Wu & Yu 2019, Table 1 (clean and L2-PGD accuracy in %, average margin), keyed (dataset, model, method).
PAPER_TABLE1 = {
    ("mnist", "mlp", "Std"): (98.24, 89.26, 49.23, 15.78, 5.06, 0.80),
    ("mnist", "mlp", "LCR"): (95.99, 91.12, 80.62, 60.56, 34.07, 1.36),
    ("mnist", "mlp", "AMR"): (96.01, 91.18, 81.01, 62.93, 38.44, 1.41),
    ("mnist", "cnn", "Std"): (99.14, 95.95, 90.48, 88.72, 87.52, 1.01),
    ("mnist", "cnn", "LCR"): (99.29, 97.21, 87.83, 58.30, 26.96, 1.34),
    ("mnist", "cnn", "AMR"): (99.25, 97.90, 97.60, 97.51, 97.33, 1.40),
    ("cifar10", "mlp", "Std"): (54.04, 39.77, 26.67, 16.77, 9.95, 0.17),
    ("cifar10", "mlp", "LCR"): (50.09, 46.23, 41.65, 37.09, 32.62, 0.45),
    ("cifar10", "mlp", "AMR"): (50.36, 46.28, 42.81, 39.06, 35.67, 0.54),
    ("cifar10", "cnn", "Std"): (78.77, 54.32, 39.81, 37.14, 36.27, 0.09),
    ("cifar10", "cnn", "LCR"): (80.54, 70.84, 58.72, 44.82, 32.54, 0.26),
    ("cifar10", "cnn", "AMR"): (78.12, 69.59, 59.84, 49.02, 38.65, 0.31),
}


def make_model(kind: str, dataset: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """Wu & Yu 2019's six models (App. A): multiclass logistic regression ("lr"), one hidden layer of 1024 ReLU
    ("mlp"), and the Carlini–Wagner CNN ("cnn", as in C&W 2017: no BatchNorm). Seeded initialisation."""
    from . import models

    shape = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}.get(dataset)
    if shape is None:
        raise ValueError(f"dataset must be 'mnist' or 'cifar10', got {dataset!r}")
    torch.manual_seed(seed)
    if kind == "lr":
        return models.LinearModel(shape, num_classes)
    if kind == "mlp":
        return models.MLP(shape, hidden=(1024,), num_classes=num_classes)
    if kind == "cnn":
        return models.CWNet("mnist" if dataset == "mnist" else "cifar", num_classes=num_classes, batchnorm=False)
    raise ValueError(f"model kind must be 'lr', 'mlp' or 'cnn', got {kind!r}")


def _compute_device(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else where the model's parameters live (the one device boundary)."""
    if device is not None:
        return torch.device(device)
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def estimate_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, r: float = 5.0, n_samples: int = 256,
                     upper: bool = True, upper_methods: Sequence[str] = ("deepfool",), seed: int = 0,
                     device: str | torch.device | None = None, upper_options: dict | None = None) -> dict[str, np.ndarray]:
    """Signed margins of ``model`` at (x, y) (Wu & Yu 2019, §2): the Lipschitz lower bound (Wu & Yu 2019, Thm 2, r, n_samples
    random points in B(x, r); Wu & Yu 2019 uses r = 5 and 1024·50 samples) and, beyond the paper, the
    minimal-perturbation upper bound (smallest DeepFool/CW distortion inside [0, 1]^d). For a linear model
    the exact margin is added ("exact"). Returns float64 arrays keyed "lower", "upper", "exact"."""
    from . import margins

    dev = _compute_device(model, device)
    x, y = x.to(dev), y.to(dev)  # the margin-curve callback hands CPU points to a model on the device
    with torch.enable_grad():
        out = {"lower": margins.lipschitz_lower_bound(model, x, y, r=r, n_samples=n_samples, seed=seed,
                                                      device=dev).double().cpu().numpy()}
        if upper:
            opts = {k: v for k, v in (upper_options or {}).items() if k in upper_methods}  # per method run
            out["upper"] = margins.upper_bound(model, x, y, methods=tuple(upper_methods), device=dev,
                                               **opts).double().cpu().numpy()
    head = getattr(model, "head", None)
    if hasattr(model, "in_dim") and type(model).__name__ == "LinearModel" and isinstance(head, nn.Linear):
        out["exact"] = np.asarray(margins.linear_margins(head.weight.detach().cpu().double().numpy(),
                                                         None if head.bias is None else head.bias.detach().cpu().double().numpy(),
                                                         x.detach().cpu(), y.detach().cpu()), dtype=np.float64)
    return out


def summarize(m: np.ndarray) -> tuple[float, float]:
    """(minimum, average) of the finite margins (an upper bound is inf where no attack succeeded)."""
    m = np.asarray(m, dtype=np.float64)
    m = m[np.isfinite(m)]
    return (float(m.min()), float(m.mean())) if m.size else (math.nan, math.nan)


@dataclass
class MarginCurves:
    """Margins of one model at the tracked epochs, per point set ("train", "test") and estimator."""

    epochs: list[int]
    margins: dict[str, dict[str, list[np.ndarray]]]   # set -> estimator -> per-epoch arrays
    train_acc: list[float]
    seconds: float = 0.0
    cached: bool = False

    def curve(self, which: str, estimator: str, stat: str) -> list[float]:
        """Minimum ("min") or average ("mean") margin over the tracked epochs."""
        k = 0 if stat == "min" else 1
        if stat not in ("min", "mean"):
            raise ValueError(f"stat must be 'min' or 'mean', got {stat!r}")
        return [summarize(m)[k] for m in self.margins[which][estimator]]

    def as_dict(self) -> dict:
        out: dict = {"epochs": self.epochs, "train_acc": self.train_acc}
        for which, est in self.margins.items():
            for name in est:
                out[f"{which}_{name}_min"] = self.curve(which, name, "min")
                out[f"{which}_{name}_mean"] = self.curve(which, name, "mean")
        return out


def margins_callback(points: dict[str, tuple[torch.Tensor, torch.Tensor]], track: Iterable[int], *, r: float = 5.0,
                     n_samples: int = 256, upper: bool = True, upper_methods: Sequence[str] = ("deepfool",),
                     seed: int = 0, device: str | torch.device | None = None,
                     upper_options: dict | None = None) -> Callable[[int, nn.Module], dict]:
    """A ``fit`` callback: :func:`estimate_margins` of each named point set after the epochs in ``track`` (rows
    ``m_<set>_<estimator>``), so the margins ride in the training history. ``device`` None: the model's device
    (a device captured here would enter fit's cache key)."""
    from . import jobs

    wanted = {int(e) for e in track}

    def margins_cb(epoch: int, m: nn.Module) -> dict:
        if epoch not in wanted:
            return {}
        res = {}
        for which, (xp, yp) in points.items():
            est = estimate_margins(m, xp, yp, r=r, n_samples=n_samples, upper=upper, upper_methods=upper_methods,
                                   seed=seed, device=device, upper_options=upper_options)
            res.update({f"m_{which}_{k}": v for k, v in est.items()})
        return res

    # the name under which this callback was first hashed (inside margin_curves): keeps the models' cache keys
    return jobs.keep_cache_name(margins_cb, "margin_curves.<locals>.margins_cb")


def _check_track(track: Iterable[int], epochs: int) -> list[int]:
    track = sorted({int(e) for e in track})
    if not track or track[0] < 0 or track[-1] > epochs:
        raise ValueError(f"track must hold epochs in 0..{epochs}, got {track}")
    return track


def margin_curves(model: nn.Module, x: torch.Tensor, y: torch.Tensor, points: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  *, epochs: int, track: Iterable[int], r: float = 5.0, n_samples: int = 256, upper: bool = True,
                  upper_methods: Sequence[str] = ("deepfool",), cache: str | None = None, seed: int = 0,
                  device: str | torch.device | None = None, upper_options: dict | None = None,
                  **fit_kw) -> MarginCurves:
    """Train ``model`` with ``marginlab.train.fit`` (Wu & Yu 2019, App. A: SGD lr 0.01, momentum 0.9, Nesterov, batch 128)
    and estimate the margins of ``points`` (e.g. 500 random train and test images) after the epochs in
    ``track`` (Wu & Yu 2019, Fig 2, 6: epochs 1, 10, ..., 200). The margins ride in the training history, so a
    cache hit of ``fit`` restores them without recomputation."""
    from . import train

    track = _check_track(track, epochs)
    if not points:
        raise ValueError("points must name at least one (x, y) set")
    margins_cb = margins_callback(points, track, r=r, n_samples=n_samples, upper=upper, upper_methods=upper_methods,
                                  seed=seed, device=device, upper_options=upper_options)
    kw = dict(FIT_003)
    kw.update(fit_kw)
    with config.cpu_threads(1, config.device(device)):
        hist = train.fit(model, x, y, epochs=epochs, callbacks=(margins_cb,), cache=cache, seed=seed, device=device,
                         progress=False, **kw)
    return _curves(hist, points, track)


def _curves(hist, points: Iterable[str], track: Iterable[int]) -> MarginCurves:
    wanted = set(track)
    rows = [row for row in hist.rows if row["epoch"] in wanted]
    out: dict[str, dict[str, list[np.ndarray]]] = {}
    for which in points:
        prefix = f"m_{which}_"
        names = [k[len(prefix):] for k in rows[0] if k.startswith(prefix)]
        out[which] = {nm: [np.asarray(row[prefix + nm], dtype=np.float64) for row in rows] for nm in names}
    return MarginCurves(epochs=[int(r_["epoch"]) for r_ in rows], margins=out,
                        train_acc=[float(r_.get("train_acc", math.nan)) for r_ in rows],
                        seconds=float(hist.meta.get("seconds", 0.0)), cached=bool(hist.meta.get("cached", False)))


#: Wu & Yu 2019, App. A's optimiser for every model: SGD, lr 0.01, Nesterov momentum 0.9, batch 128.
FIT_003 = dict(optimizer="nesterov", lr=0.01, momentum=0.9, batch_size=128)


# --------------------------------------------------------------------------------------------
# The chapter's trainings as a job plan (python -m marginlab jobs 6); the notebook trains through the same jobs
# --------------------------------------------------------------------------------------------


def chapter_settings() -> dict:
    """Training sizes of the active run (:func:`marginlab.config.pick`): training images (``n_train`` None: all),
    epochs, tracked epochs and margin points/samples of the curves, which models the curves and Table 1 train.
    The quick profile trains far less than Wu & Yu 2019 (stated in the chapter); standard cuts the CNNs and CIFAR-10
    nonlinear models (CPU time) and estimates margins on 100 points x 256 samples (Wu & Yu 2019: 500 x 51,200)."""
    full_curves = [(d, k) for d in ("mnist", "cifar10") for k in ("lr", "mlp", "cnn")]
    full_table = [(d, k) for d in ("mnist", "cifar10") for k in ("mlp", "cnn")]
    return config.pick(
        quick=dict(n_train=3678, epochs=50, lr_full_epochs=50, track=(1, 3, 10, 30, 50), n_points=50, n_samples=32,
                   upper=("deepfool",), upper_options={}, curve_models=[("mnist", "lr"), ("mnist", "mlp")],
                   table_models=[("mnist", "mlp")], table_epochs=15),
        full=dict(n_train=None, epochs=200, lr_full_epochs=1000, track=PAPER_EPOCHS, n_points=500,
                  n_samples=1024 * 50, upper=("deepfool", "cw"), upper_options={}, curve_models=full_curves,
                  table_models=full_table, table_epochs=200),
        standard=dict(n_train=None, epochs=200, lr_full_epochs=1000, track=PAPER_EPOCHS, n_points=100, n_samples=256,
                      upper=("deepfool",), upper_options={},
                      curve_models=[("mnist", "lr"), ("mnist", "mlp"), ("cifar10", "lr")],
                      table_models=[("mnist", "mlp")], table_epochs=200),
        smoke=dict(n_train=256, epochs=1, lr_full_epochs=1, track=(1,), n_points=8, n_samples=8,
                   upper=("deepfool", "cw"), upper_options={"cw": dict(steps=3, binary_search_steps=1),
                                                            "deepfool": dict(steps=3)},
                   curve_models=full_curves, table_models=full_table, table_epochs=1),
    )


def table_settings() -> dict:
    """Table 1's evaluation budgets in the active run (:func:`marginlab.config.pick`): the chapter's ``S`` adds them
    to :func:`chapter_settings`, and ``benchmarks/estimate_full_profile.py`` costs the full profile from them.

    ``lr_epochs`` (the LR curves), ``n_test`` (test images; None: all), L2-PGD ``steps`` and ``step_size`` (None:
    2.5·ε/steps), ``stronger`` (the same PGD run longer, for the DESIGN §6 check), ``n_margin`` (points whose
    average margin is estimated), ``autoattack`` (version), ``aa_budget`` (a toy budget overriding the version's)
    and ``aa_n`` (AutoAttack on the first test images only; None: all). L2 AutoAttack joins L2-PGD in every
    profile: quick at its reduced version, the others at the standard one. Standard (CPU): Wu & Yu 2019's PGD
    budget on 1,000 test images, AutoAttack on the first 500 of them (≈ 0.2 s of one core per still-robust image
    and ε, measured on quick-profile MLPs); smoke: every full-profile path at toy sizes.
    """
    return config.pick(
        quick=dict(lr_epochs=1000, n_test=300, steps=40, step_size=None, stronger=80, n_margin=50,
                   autoattack="quick", aa_budget=None, aa_n=None),
        full=dict(lr_epochs=1000, n_test=None, steps=1000, step_size=0.01, stronger=2000, n_margin=500,
                  autoattack="standard", aa_budget=None, aa_n=None),
        standard=dict(lr_epochs=1000, n_test=1000, steps=1000, step_size=0.01, stronger=2000, n_margin=100,
                      autoattack="standard", aa_budget=None, aa_n=500),
        smoke=dict(lr_epochs=2, n_test=64, steps=3, step_size=0.01, stronger=3, n_margin=8, autoattack="standard",
                   aa_budget={"n_iter": 3, "n_target_classes": 2, "n_queries": 20}, aa_n=None),
    )


def train_set(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images of the active run: all of ``dataset``, or ``n_train`` of them (``data.subsample``,
    seed 0). The full profile first checks that the complete data set is there."""
    from . import data

    if config.run_name() == "full":
        data.require(dataset)
    x, y = data.load(dataset)
    n = chapter_settings()["n_train"]
    if n:
        x, y = data.subsample(x, y, n, seed=0)
    return x, y


def margin_points(dataset: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The fixed random training and test images (``n_points`` each, seed 0) whose margins the curves track."""
    from . import data

    x, y = train_set(dataset)
    xt, yt = data.load(dataset, "test")
    n = chapter_settings()["n_points"]
    g = torch.Generator().manual_seed(0)
    i_tr, i_te = torch.randperm(len(x), generator=g)[:n], torch.randperm(len(xt), generator=g)[:n]
    return {"train": (x[i_tr], y[i_tr]), "test": (xt[i_te], yt[i_te])}


def curve_epochs(kind: str) -> tuple[int, list[int]]:
    """Epochs of a curve model (logistic regression: ``lr_full_epochs``) and the epochs it tracks."""
    st = chapter_settings()
    ep = st["lr_full_epochs"] if kind == "lr" else st["epochs"]
    return ep, [e for e in st["track"] if e <= ep] + ([ep] if ep not in st["track"] else [])


def curve_job(dataset: str, kind: str) -> "jobs.Job":
    """The training of ``kind`` on ``dataset`` whose margins the curves (Wu & Yu 2019, Fig 2, 5-7) follow: Wu & Yu 2019's optimiser,
    :func:`margins_callback` (r = 5) on :func:`margin_points` at the tracked epochs."""
    from . import jobs

    st = chapter_settings()
    ep, track = curve_epochs(kind)
    cb = jobs.call(margins_callback, jobs.call(margin_points, dataset), _check_track(track, ep), r=5.0,
                   n_samples=st["n_samples"], upper=True, upper_methods=st["upper"], seed=0, device=None,
                   upper_options=st["upper_options"])
    return jobs.Job("06", f"curves-{dataset}-{kind}", model=jobs.call(make_model, kind, dataset, seed=0),
                    data=jobs.call(train_set, dataset),
                    fit=dict(epochs=ep, callbacks=(cb,), cache=f"ch06-curves-{dataset}-{kind}", seed=0, **FIT_003))


def chapter_curves(dataset: str, kind: str, device: str | torch.device | None = None) -> MarginCurves:
    """Train (or load from the cache) :func:`curve_job` and return its :class:`MarginCurves` — the notebook's call,
    the same job ``python -m marginlab jobs 6 --run`` trains."""
    from . import jobs, train

    b = jobs.build(curve_job(dataset, kind))
    with config.cpu_threads(1, config.device(device)):
        hist = train.fit(b.model, b.x, b.y, device=device, progress=False, **b.fit)
    return _curves(hist, ("train", "test"), curve_epochs(kind)[1])


def table_job(dataset: str, kind: str, method: str, tau: float | None = None) -> "jobs.Job":
    """Wu & Yu 2019, Table 1: ``kind`` on ``dataset`` trained with ``method`` ("Std", "LCR" or "AMR", see
    :func:`training_methods`) from the same initialisation, Wu & Yu 2019's optimiser, ``table_epochs`` epochs."""
    from . import jobs, losses

    tau = PAPER_TAU[(dataset, kind)] if tau is None else tau
    specs = {"Std": None, "LCR": jobs.call(losses.parseval_loss, beta=1e-2),
             "AMR": jobs.call(losses.amr_loss, lam=0.1, tau=tau, beta=1e-3)}
    if method not in specs:
        raise ValueError(f"method must be one of {tuple(specs)}, got {method!r}")
    return jobs.Job("06", f"t1-{dataset}-{kind}-{method}", model=jobs.call(make_model, kind, dataset, seed=0),
                    data=jobs.call(train_set, dataset),
                    fit=dict(loss_fn=specs[method], epochs=chapter_settings()["table_epochs"], seed=0,
                             cache=f"ch06-t1-{dataset}-{kind}-{method}", **FIT_003))


def training_jobs() -> list["jobs.Job"]:
    """Chapter 6's trainings in the active run: the margin-curve models, then Table 1's Std / LCR / AMR models."""
    st = chapter_settings()
    return ([curve_job(d, k) for d, k in st["curve_models"]]
            + [table_job(d, k, m) for d, k in st["table_models"] for m in ("Std", "LCR", "AMR")])


def trend(values: Sequence[float], start: int = 0) -> float:
    """last − first of a curve from index ``start`` on (the sign says whether it rose or fell)."""
    v = [float(a) for a in values[start:] if np.isfinite(a)]
    if len(v) < 2:
        return math.nan
    return v[-1] - v[0]


#: optimiser steps in Wu & Yu 2019's first epoch on MNIST: 60,000 images in batches of 128
PAPER_STEPS_PER_EPOCH = math.ceil(60_000 / FIT_003["batch_size"])


def average_margin_trends(curve: dict, n_train: int, from_steps: int = PAPER_STEPS_PER_EPOCH) -> dict:
    """The average-margin trends of a stored margin curve (``curves_<dataset>_<kind>`` of the chapter's results)
    from its first tracked epoch and from the first tracked epoch with at least ``from_steps`` optimiser steps
    (default: as many as in the paper's epoch 1): ``{"epoch 1": {...}, "epoch N": {...}}``, each with the change
    (last − first) of the training and test average margin (lower bound) and the epochs and steps it spans."""
    epochs = list(curve["epochs"])
    per_epoch = math.ceil(n_train / FIT_003["batch_size"])
    late = next((i for i, e in enumerate(epochs) if e * per_epoch >= from_steps), len(epochs) - 1)
    out = {}
    for start in dict.fromkeys([0, late]):
        out[f"epoch {epochs[start]}"] = {
            "steps at start": epochs[start] * per_epoch,
            "train avg margin change": trend(curve["train_lower_mean"], start),
            "test avg margin change": trend(curve["test_lower_mean"], start),
        }
    return out


# --------------------------------------------------------------------------------------------
# standard training vs LCR (Parseval) vs AMR (Wu & Yu 2019, §4.3, Table 1)
# --------------------------------------------------------------------------------------------


def training_methods(tau: float, lam: float = 0.1, beta_amr: float = 1e-3, beta_lcr: float = 1e-2) -> dict:
    """The three training objectives of Wu & Yu 2019, Table 1: "Std" (cross-entropy), "LCR" (Cisse et al. 2017,
    penalty form, β = 1e-2) and "AMR" (Wu & Yu 2019, eq. 4, λ = 0.1, β = 1e-3, τ per model)."""
    from . import losses

    return {"Std": None, "LCR": losses.parseval_loss(beta=beta_lcr),
            "AMR": losses.amr_loss(lam=lam, tau=tau, beta=beta_amr)}


#: Examples per attack call (bounds an attack's memory; results do not depend on it).
EVAL_BATCH_SIZE = 1000


def l2_pgd(steps: int, step_size: float | None = None, seed: int = 0):
    """Wu & Yu 2019, Table 1's attack: L2-PGD on the cross-entropy, random start (``step_size`` None: 2.5·eps/steps)."""
    import functools

    from . import attacks

    return functools.partial(attacks.pgd, steps=steps, step_size=step_size, norm="l2", loss="ce", seed=seed)


def _autoattack_points(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "l2",
                       version: str = "standard", seed: int = 0, **budget: int | None) -> torch.Tensor:
    """AutoAttack's per-example worst-case points (Croce & Hein 2020) at radius ``eps`` (for :func:`robust_masks`)."""
    from . import attacks

    return attacks.AutoAttack(eps, norm, version=version, seed=seed,
                              **{k: v for k, v in budget.items() if v is not None})(model, x, y)


def l2_autoattack(version: str = "standard", seed: int = 0, *, n_iter: int | None = None,
                  n_target_classes: int | None = None, n_queries: int | None = None):
    """L2 AutoAttack (APGD-CE, APGD-T, FAB-T, Square; Croce & Hein 2020) as ``attack(model, x, y, eps)``:
    ``version`` "standard" (the reference budgets) or "quick" (reduced); the keyword budgets override it."""
    import functools

    return functools.partial(_autoattack_points, norm="l2", version=version, seed=seed, n_iter=n_iter,
                             n_target_classes=n_target_classes, n_queries=n_queries)


def robust_masks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack, epsilons: Sequence[float], *,
                 batch_size: int | None = None, device: str | torch.device | None = None) -> torch.Tensor:
    """Per-example robustness (bool, (len(epsilons), N), on the CPU) under ``attack(model, x, y, eps)``:
    correct on x and on the adversarial point. The balls are nested, so an example broken at a smaller eps
    stays broken at every larger one and is not attacked again (as ``attacks.robust_accuracy(nested=True)``).
    Computes on the model's device in chunks of ``batch_size``; every adversarial is checked to lie in the ball."""
    from . import attacks

    dev = _compute_device(model, device)
    bs = EVAL_BATCH_SIZE if batch_size is None else int(batch_size)
    xd, yd = x.to(dev), y.to(dev)
    alive = torch.cat([attacks.correct(model, xd[i:i + bs], yd[i:i + bs]) for i in range(0, len(xd), bs)])
    out = torch.zeros(len(epsilons), len(xd), dtype=torch.bool)
    for k in sorted(range(len(epsilons)), key=lambda i: float(epsilons[i])):
        eps = float(epsilons[k])
        if eps > 0:
            idx = alive.nonzero().flatten()
            for i in range(0, idx.numel(), bs):
                sel = idx[i:i + bs]
                xa = attack(model, xd[sel], yd[sel], eps)
                attacks.assert_in_ball(xd[sel], xa, eps, getattr(attack, "keywords", {}).get("norm", "linf"))
                alive[sel] &= attacks.correct(model, xa, yd[sel])
        out[k] = alive.cpu()
    return out


def evaluate_robustness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epsilons: Sequence[float],
                        steps: int, step_size: float | None = None, stronger_steps: int | None = None,
                        unbounded_eps: float = 30.0, n_margin: int = 100, r: float = 5.0, n_samples: int = 256,
                        seed: int = 0, device: str | torch.device | None = None, extra_attacks: dict | None = None,
                        batch_size: int | None = None, upper_options: dict | None = None,
                        autoattack: str | None = "standard", autoattack_budget: dict | None = None,
                        autoattack_n: int | None = None) -> dict:
    """Clean and L2-PGD accuracy (Wu & Yu 2019, Table 1: step 0.01, 1000 iterations; our default step 2.5·eps/steps),
    plus the DESIGN §6 sanity rules, asserted: accuracy non-increasing in eps, eps = 0 is clean accuracy,
    an unbounded attack reaches 0% (median distortion reported), ``stronger_steps`` do not raise accuracy.
    The average margin is measured on the first ``n_margin`` points (Lipschitz lower bound, and upper bound).

    The ensemble is L2-PGD, L2 AutoAttack (Croce & Hein 2020; ``autoattack``: its version, "standard" or the
    reduced "quick", None to leave it out; ``autoattack_budget``: n_iter / n_target_classes / n_queries
    overrides) and ``extra_attacks`` (name -> ``attack(model, x, y, eps)``): the robust accuracy of record
    ("worst") is the per-example worst case over all of them, on the first ``autoattack_n`` test images
    (None: all), the ones AutoAttack attacked; "pgd" and "clean" are over every test image. The per-example
    booleans behind every number are returned under "per_example" (for bootstrap intervals over test images).
    Computes on the model's device (or ``device``) in chunks of ``batch_size``.
    """
    from . import attacks

    eps = [float(e) for e in epsilons]
    if any(e <= 0 for e in eps):
        raise ValueError(f"epsilons must be > 0 (eps = 0 is added), got {eps}")
    dev = _compute_device(model, device)
    bs = EVAL_BATCH_SIZE if batch_size is None else int(batch_size)
    xd, yd = x.to(dev), y.to(dev)
    grid = [0.0] + eps
    ensemble = {"L2-PGD": l2_pgd(steps, step_size, seed)}
    n_aa = len(xd) if autoattack_n is None else min(int(autoattack_n), len(xd))
    if autoattack is not None:
        ensemble["AutoAttack"] = l2_autoattack(autoattack, seed + 2, **(autoattack_budget or {}))
    ensemble.update(extra_attacks or {})
    with torch.enable_grad():
        masks = {name: robust_masks(model, xd[:n_aa] if name == "AutoAttack" else xd,
                                    yd[:n_aa] if name == "AutoAttack" else yd, atk, grid, batch_size=bs)
                 for name, atk in ensemble.items()}
        worst = torch.stack([m[:, :n_aa] for m in masks.values()]).all(dim=0)  # (len(grid), n_aa)
        acc = [float(m.double().mean()) for m in masks["L2-PGD"]]
        acc_worst = [float(m.double().mean()) for m in worst]
        clean_mask = masks["L2-PGD"][0]
        clean = acc[0]
        stronger = None
        if stronger_steps:
            # more effort = the same attack run longer: the same random start and step size, more steps (a
            # step of 2.5·eps/stronger_steps covers less ground than the attack it is meant to outdo when that
            # attack has a fixed step, and a new random start makes the comparison noise on small test sets)
            strong = robust_masks(model, xd, yd, l2_pgd(stronger_steps, step_size, seed), grid, batch_size=bs)
            stronger = [[float(m.double().mean()) for m in strong]]
        # an unbounded radius with a modest step (the largest eps over 10) and early stopping, so that the
        # distortion at the first adversarial iterate is a meaningful "how far did it have to go"
        unb_steps = max(steps, 100)
        unb_step = max(eps) / 10
        x_unb = torch.cat([attacks.pgd(model, xd[i:i + bs], yd[i:i + bs], unbounded_eps, steps=unb_steps,
                                       step_size=unb_step, norm="l2", loss="ce", random_start=False, seed=seed)
                           for i in range(0, len(xd), bs)])
        fooled = torch.cat([~attacks.correct(model, x_unb[i:i + bs], yd[i:i + bs]) for i in range(0, len(xd), bs)])
        fooled = fooled.cpu()
        unbounded = float(1.0 - fooled.double().mean())
        dist = attacks.perturbation_norms(xd, x_unb, "l2").cpu()
        median = float(dist[fooled].median()) if bool(fooled.any()) else math.nan
    # the stronger PGD is checked against L2-PGD on the same images; the worst case for the other rules
    pgd_report = attacks.assert_sanity(grid, acc, clean=clean, stronger=stronger, label="L2-PGD")
    report = attacks.assert_sanity(grid, acc_worst, clean=acc_worst[0], unbounded=unbounded, median_distortion=median,
                                   label="L2 ensemble")
    m = estimate_margins(model, xd[:n_margin], yd[:n_margin], r=r, n_samples=n_samples, upper=True, seed=seed,
                         device=dev, upper_options=upper_options)
    return {"clean": clean, "epsilons": eps, "pgd": acc[1:], "worst": acc_worst[1:], "n_worst": n_aa,
            "autoattack": None if autoattack is None else [float(m.double().mean()) for m in masks["AutoAttack"]][1:],
            "pgd_stronger": None if stronger is None else stronger[0][1:],
            "unbounded_acc": unbounded, "unbounded_median_l2": median, "sanity": pgd_report["message"] + " | " + report["message"],
            "avg_margin_lower": summarize(m["lower"])[1], "avg_margin_upper": summarize(m["upper"])[1],
            "margins": m, "per_example": {"clean": clean_mask, "worst": dict(zip(eps, worst[1:])),
                                          **{f"{name}": dict(zip(eps, mk[1:])) for name, mk in masks.items()}},
            "attack": dict(name="pgd", norm="l2", loss="ce", steps=steps,
                           step_size=step_size if step_size is not None else "2.5*eps/steps",
                           random_start=True, restarts=1, stronger_steps=stronger_steps,
                           unbounded_eps=unbounded_eps, unbounded_steps=unb_steps,
                           unbounded_step_size=unb_step, ensemble=list(ensemble),
                           autoattack=None if autoattack is None else repr(attacks.AutoAttack(
                               max(eps), "l2", version=autoattack, **(autoattack_budget or {}))).replace(
                               f"eps={max(eps)}", "eps=each ε"),
                           autoattack_images=n_aa if autoattack is not None else 0)}


def compare_training(kind: str, dataset: str, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
                     y_test: torch.Tensor, *, epochs: int, epsilons: Sequence[float] | None = None,
                     tau: float | None = None, cache: str | None = None, seed: int = 0,
                     device: str | torch.device | None = None, fit_kw: dict | None = None, **eval_kw) -> dict:
    """Wu & Yu 2019, Table 1 for one (dataset, model): train Std, LCR and AMR from the same initialisation with
    Wu & Yu 2019's optimiser and evaluate each with :func:`evaluate_robustness` on (x_test, y_test)."""
    from . import train

    tau = PAPER_TAU[(dataset, kind)] if tau is None else tau
    epsilons = PAPER_EPS[dataset] if epsilons is None else epsilons
    kw = dict(optimizer="nesterov", lr=0.01, momentum=0.9, batch_size=128)
    kw.update(fit_kw or {})
    rows = {}
    for name, loss_fn in training_methods(tau).items():
        model = make_model(kind, dataset, seed=seed)
        with config.cpu_threads(1, config.device(device)):
            hist = train.fit(model, x, y, loss_fn=loss_fn, epochs=epochs, seed=seed, device=device, progress=False,
                             cache=None if cache is None else f"{cache}-{name}", **kw)
            res = evaluate_robustness(model, x_test, y_test, epsilons=epsilons, seed=seed, device=device, **eval_kw)
        res["train_seconds"] = float(hist.meta.get("seconds", 0.0))
        res["cached"] = bool(hist.meta.get("cached", False))
        res["model"] = model
        rows[name] = res
    return rows
