"""Low-rank penultimate features (chapter 3).

Two parts:

* **Proposition 1 of Nar et al. 2019a** (§3 and App. B), exactly: a network
  ``score = head(φ(x))`` whose penultimate layer ends with a linear map,
  ``φ(x) = W h(x)``, trained by gradient descent on cross-entropy from
  ``W(0) = 0``, keeps ``rank{φ(x_i)} ≤ 1`` at every step (binary logistic loss,
  Nar et al. 2019a, Prop. 1 / eq. 11). The same argument gives ``rank ≤ K − 1`` for a
  ``K``-class softmax head (our extension, proved in the chapter), momentum
  included; with ``tanh`` before ``W`` and a random ``W(0)`` the ratio
  ``σ₂/σ₁`` of the feature matrix only *decays* (Nar et al. 2019a, App. B, a heuristic
  argument, not a theorem): :func:`feature_rank_dynamics` records it.
* **The CIFAR-10 airplane-vs-horse experiment** (Nar et al. 2019a, Fig. 2, Nar et al. 2019b, Fig. 3): a
  LeNet-style CNN trained with SGD+momentum, Adam and SGD+BatchNorm; PCA
  spectrum, components for a variance level and effective rank of its 84-d
  penultimate features (:func:`spectrum`, :func:`rank_callback`), and the
  margin of its own linear head on the frozen features against the SVM
  margin on the same features (:func:`head_vs_svm_margin`).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import config

if TYPE_CHECKING:  # only for annotations: jobs imports the chapter modules
    from . import jobs

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
    """Gaussian inputs ``X`` (n, d) labelled by a random linear teacher; every class is present.

    Labels are class indices in ``0..K-1``, the argmax of a linear map ``X U``
    (no bias; for K = 2 the sign of one direction), so the classes are
    linearly separable in input space. ``U`` is Gaussian; when that draw
    leaves a class empty (a thin cone of the argmax), the teacher is drawn
    again as ``K`` random inputs scaled to unit length, ``u_c = x_c/‖x_c‖``:
    input ``x_c`` then scores ``‖x_c‖`` on class ``c`` and ``‖x_c‖ cos θ``
    on any other, so it is labelled ``c`` and every class occurs. Same seed,
    same problem. Use :func:`signed_labels` for the ±1 labels of the logistic loss.

    Raises ``ValueError`` when ``K`` classes cannot all occur: ``n < K``, or
    ``d = 1`` with ``K > 2`` (a bias-free linear map of a scalar has at most two
    argmax regions, x > 0 and x < 0).
    """
    if n < 2 or d < 1 or num_classes < 2:
        raise ValueError(f"need n >= 2, d >= 1, num_classes >= 2; got n={n}, d={d}, num_classes={num_classes}")
    if n < num_classes:
        raise ValueError(f"n={n} inputs cannot hold all num_classes={num_classes} classes; need n >= num_classes")
    if d == 1 and num_classes > 2:
        raise ValueError(f"a linear teacher in d=1 labels at most 2 classes; got num_classes={num_classes}")
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    U = torch.randn(d, num_classes, generator=g, dtype=dtype)
    y = (X @ U).argmax(1)
    if len(torch.unique(y)) == num_classes:  # the usual case; kept as the first draw so old seeds keep their data
        return X, y
    # d = 1 (K = 2) needs inputs of both signs; redraw X until there are (each try fails with prob 2^(1-n))
    for _ in range(64):
        rows = _distinct_directions(X, num_classes, g)
        if rows is not None:
            break
        X = torch.randn(n, d, generator=g, dtype=dtype)
    else:
        raise ValueError(f"no {num_classes} inputs with distinct directions in 64 draws (n={n}, d={d})")
    U = (X[rows] / X[rows].norm(dim=1, keepdim=True)).T
    y = (X @ U).argmax(1)
    if len(torch.unique(y)) != num_classes:  # cannot happen: x_c scores strictly highest on its own u_c
        raise RuntimeError(f"teacher left a class empty (n={n}, d={d}, num_classes={num_classes}, seed={seed})")
    return X, y


def _distinct_directions(X: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor | None:
    """Indices of ``k`` rows of ``X`` (in a random order) no two of which point the same way
    (cosine < 1 − 1e-9), or None when there are fewer such rows."""
    unit = X / X.norm(dim=1, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)
    chosen: list[int] = []
    for i in torch.randperm(len(X), generator=generator).tolist():
        if X[i].norm() > 0 and all(float(unit[i] @ unit[j]) < 1 - 1e-9 for j in chosen):
            chosen.append(i)
            if len(chosen) == k:
                return torch.tensor(chosen)
    return None


def signed_labels(y: torch.Tensor) -> torch.Tensor:
    """Class indices {0, 1} -> labels {-1, +1} (class 1 is +1)."""
    y = torch.as_tensor(y)
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("signed_labels needs binary class indices in {0, 1}")
    return 2.0 * y.double() - 1.0


def prop1_rank_bound(loss: str, num_classes: int = 2) -> int:
    """Rank bound on {φ(x_i)} when W(0) = 0: 1 for the binary logistic loss (Nar et al. 2019a, Prop. 1),
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

    Nar et al. 2019a, Prop. 1 (and App. B eq. 11): ``h(x) = act(A x / √d)`` with ``A`` random
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
    with config.cpu_threads(1):
        for t in range(steps + 1):
            phi, value, err = forward()
            if t in when:
                rec_steps.append(t)
                svals.append(torch.linalg.svdvals(phi.detach()).numpy())
                losses.append(float(value.detach()))
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
    """Max over the recorded steps of σ_{rank+1}/σ_1: ≈ 0 (machine precision) iff rank{φ(x_i)} ≤ ``rank``
    at every recorded step."""
    return float(trace.ratio(rank + 1).max()) if len(trace.steps) else 0.0


def check_prop1(trace: SpectrumTrace, rtol: float = 1e-10) -> float:
    """Assert Nar et al. 2019a, Prop. 1 on a trace from ``init="zero"`` with GD or momentum: σ_{b+1}/σ_1 ≤ rtol at every step,
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
# Spectra of learned features (Nar et al. 2019a, Fig. 2, Nar et al. 2019b, Fig. 3)
# ---------------------------------------------------------------------------------------------

LEVELS = (0.9, 0.99, 0.999)


def spectrum(F_: torch.Tensor | np.ndarray, levels: Sequence[float] = LEVELS) -> dict[str, Any]:
    """PCA spectrum of a feature matrix (n, p): cumulative explained variance, components for each level and
    effective rank, via ``marginlab.features`` (Nar et al. 2019a, Fig. 2; Nar et al. 2019b, Fig. 3; Roy & Vetterli 2007)."""
    from . import features as mf

    cum = np.asarray(mf.explained_variance(F_), dtype=float)
    return {
        "cumulative": cum,
        "components": {lv: mf.components_for(cum, lv) for lv in levels},
        "effective_rank": mf.effective_rank(F_),
        "dim": int(F_.shape[1]),
    }


# ---------------------------------------------------------------------------------------------
# CIFAR-10 airplane vs horse: LeNet with three optimisers
# ---------------------------------------------------------------------------------------------

# Nar et al. 2019a and Nar et al. 2019b give no optimiser hyper-parameters (lr, momentum, batch size, epochs); these are
# conventional choices for a LeNet on CIFAR-10 (SGD lr 0.01 with momentum 0.9; Adam's default 1e-3; plain
# SGD needs a larger step), stated in the chapter, which trains each to zero training error.
VARIANTS: dict[str, dict[str, Any]] = {
    "SGD + momentum": dict(batchnorm=False, optimizer="momentum", lr=0.01, momentum=0.9),
    "Adam": dict(batchnorm=False, optimizer="adam", lr=1e-3),
    "SGD + BatchNorm": dict(batchnorm=True, optimizer="sgd", lr=0.05),
}


def binary_cifar(split: str = "train", root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 airplane vs horse (Nar et al. 2019a, §3 and §5; Nar et al. 2019b, §5): images in [0,1], labels as class indices
    {0 = airplane, 1 = horse} for the 2-logit soft-max head of Nar et al. 2019b, Fig. 3 (horse is the +1 class of
    ``binary_subset``)."""
    from . import data

    x, y = data.load("cifar10", split=split, root=root)
    x, y_pm = data.binary_subset(x, y, positive="horse", negative="airplane")
    return x, data.to_class_index(y_pm)


def train_variant(name: str, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int = 128,
                  seed: int = 0, callbacks: Sequence[Callable] = (), cache: str | None = None,
                  device=None, settings: dict[str, Any] | None = None, until_zero_error: bool = False):
    """A fresh He-initialised :class:`~marginlab.models.LeNet` (seeded by ``seed``) trained on cross-entropy
    with the optimiser of ``VARIANTS[name]`` (or ``settings``) for ``epochs`` epochs, or until zero
    training error with ``until_zero_error``. Returns ``(model, history)``."""
    from .train import fit

    opts = _variant_settings(name, settings)
    bn = opts.pop("batchnorm", False)
    model = lenet(batchnorm=bn, seed=seed, in_channels=x.shape[1])
    hist = _fit_single_thread(fit, model, x, y, device, epochs=epochs, batch_size=batch_size, seed=seed,
                              callbacks=callbacks, cache=cache, until_zero_error=until_zero_error, **opts)
    return model, hist


def _variant_settings(name: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    if settings is None:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose one of {tuple(VARIANTS)}")
        settings = VARIANTS[name]
    return dict(settings)


def _fit_single_thread(fit: Callable, model: nn.Module, x, y, device, **kw):
    # On a CPU a LeNet's small convolutions gain little from a second intra-op thread and lose 10-20x when
    # the cores are shared (measured: 0.28 s vs 5.7 s per epoch at load 3 on 2 cores), so train on one.
    single = config.device(device).type == "cpu"
    with config.cpu_threads(1) if single else nullcontext():
        return fit(model, x, y, device=device, **kw)


def lenet(batchnorm: bool = False, seed: int = 0, in_channels: int = 3, num_classes: int = 2) -> nn.Module:
    """The chapter's He-initialised :class:`~marginlab.models.LeNet`, seeded by ``seed``
    (``config.seed_everything``) — a model factory for the job plan."""
    from .models import LeNet

    config.seed_everything(seed)
    return LeNet(in_channels=in_channels, num_classes=num_classes, batchnorm=batchnorm)


# ---------------------------------------------------------------------------------------------
# The chapter's trainings as a job plan (python -m marginlab jobs 3); the notebook trains through the same jobs
# ---------------------------------------------------------------------------------------------


def chapter_settings() -> dict[str, Any]:
    """Sizes of the active run (:func:`marginlab.config.pick`; none of them is the paper's, see the chapter's
    settings table): batch size, epoch budgets, which variants are also trained long, smoke subset sizes."""
    return {
        "batch_size": config.pick(quick=32, full=128),
        "max_epochs": config.pick(quick=40, full=300, smoke=1),
        "long_epochs": config.pick(quick=60, full=1000, smoke=2),
        "long_variants": config.pick(quick=("SGD + momentum",), full=tuple(VARIANTS)),
        "seed": 0,
        # further seeds of the runs to zero training error, for an interval over seeds on the counts
        "extra_seeds": config.pick(quick=(), full=(1, 2)),
        "level": 0.99,
        # the smoke run: toy sizes of the full profile's code paths (None: every image)
        "n_train": config.pick(quick=None, full=None, smoke=256),
        "n_test": config.pick(quick=None, full=None, smoke=128),
    }


def chapter_data(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`binary_cifar` of ``split`` for the active run (the smoke run's first images only); the full
    profile first checks that all 10,000 airplane and horse images are there."""
    from . import data

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if config.run_name() == "full":
        data.require("cifar10")
    x, y = binary_cifar(split)
    n = chapter_settings()["n_train" if split == "train" else "n_test"]
    return (x, y) if n is None else (x[:n], y[:n])


def variant_tag(name: str, long: bool = False, seed: int | None = None) -> str:
    """The cache tag of a variant's run: ``ch03-SGD-momentum`` (``-seed1`` appended for a further seed); its
    long run ``ch03-momentum-long`` (momentum) or ``ch03-<name>-long``."""
    base = f"ch03-{name.replace(' ', '').replace('+', '-')}"
    if seed is not None and seed != chapter_settings()["seed"]:
        if long:
            raise ValueError("further seeds are trained to zero training error only, not long")
        return f"{base}-seed{seed}"
    if not long:
        return base
    return "ch03-momentum-long" if name == "SGD + momentum" else f"{base}-long"


def variant_job(name: str, long: bool = False, seed: int | None = None) -> "jobs.Job":
    """The training of variant ``name`` in the active run: until zero training error within ``max_epochs``
    (``long=False``), or ``long_epochs`` epochs regardless (``long=True``); the :func:`rank_callback` over the
    training and test features after every epoch rides in its history. ``seed`` (default: the chapter's)
    seeds both the initial weights and the batch order."""
    from . import jobs

    st = chapter_settings()
    tag = variant_tag(name, long, seed)
    seed = st["seed"] if seed is None else seed
    opts = _variant_settings(name)
    bn = opts.pop("batchnorm", False)
    sets = {"train": jobs.call(chapter_data, "train"), "test": jobs.call(chapter_data, "test")}
    fit = dict(epochs=st["long_epochs"] if long else st["max_epochs"], batch_size=st["batch_size"], seed=seed,
               callbacks=[jobs.call(rank_callback, sets, level=st["level"])], cache=tag,
               until_zero_error=not long, **opts)
    return jobs.Job("03", tag.removeprefix("ch03-"),
                    model=jobs.call(lenet, batchnorm=bn, seed=seed, in_channels=3),
                    data=jobs.call(chapter_data, "train"), fit=fit)


def training_jobs() -> list["jobs.Job"]:
    """Every training of chapter 3 in the active run: each variant to zero training error, then the long runs."""
    st = chapter_settings()
    return ([variant_job(n) for n in VARIANTS] + [variant_job(n, long=True) for n in st["long_variants"]]
            + [variant_job(n, seed=s) for s in st["extra_seeds"] for n in VARIANTS])


def train_chapter_variant(name: str, long: bool = False, device=None, seed: int | None = None):
    """Train (or load from the cache) :func:`variant_job` ``(name, long, seed)``: the notebook's call, the same
    job ``python -m marginlab jobs 3 --run`` trains. Returns ``(model, history)``."""
    from . import jobs
    from .train import fit

    b = jobs.build(variant_job(name, long, seed))
    return b.model, _fit_single_thread(fit, b.model, b.x, b.y, device, **b.fit)


def components_over_seeds(name: str, level: float = 0.99, device=None) -> dict[int, int]:
    """Components for ``level`` of the training features' variance of variant ``name``, trained to zero
    training error from the chapter's seed and each of its ``extra_seeds``: ``{seed: count}``."""
    st = chapter_settings()
    x, _ = chapter_data("train")
    counts = {}
    for seed in (st["seed"], *st["extra_seeds"]):
        model, _ = train_chapter_variant(name, device=device, seed=seed)
        counts[seed] = spectrum(penultimate(model, x, device=device), levels=(level,))["components"][level]
    return counts


def penultimate(model: nn.Module, x: torch.Tensor, device=None) -> torch.Tensor:
    """The 84-d penultimate features ``model.features(x)`` (eval mode, no grad) as float64 on the CPU."""
    from .features import extract_features

    return extract_features(model, x, device=device).double()


def rank_callback(sets: dict[str, tuple[torch.Tensor, torch.Tensor]], level: float = 0.99,
                  device=None) -> Callable[[int, nn.Module], dict]:
    """A ``fit`` callback for the penultimate features of each named labelled set, e.g.
    ``{"train": (x, y), "test": (xt, yt)}``, after every epoch: ``<name>_head_err`` (error of the model's
    own head on these features, eval mode), ``<name>_eff_rank``, ``<name>_components`` (for ``level``) and
    ``<name>_cumulative`` (the explained-variance curve, a list). All-zero variance (dead ReLUs) gives NaN."""

    def rank_of_features(epoch: int, model: nn.Module) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for name, (x, y) in sets.items():
            Fm = penultimate(model, x, device=device)
            logits = model.head(Fm.to(next(model.head.parameters())).to(next(model.head.parameters()).device))
            row[f"{name}_head_err"] = float((logits.argmax(1).cpu() != torch.as_tensor(y)).double().mean())
            try:
                sp = spectrum(Fm, levels=(level,))
                row[f"{name}_eff_rank"], row[f"{name}_components"] = sp["effective_rank"], sp["components"][level]
                row[f"{name}_cumulative"] = [float(c) for c in sp["cumulative"]]
            except ValueError:  # zero variance: rank undefined
                row[f"{name}_eff_rank"] = row[f"{name}_components"] = math.nan
                row[f"{name}_cumulative"] = None
        return row

    return rank_of_features


def first_zero_error_epoch(history, name: str = "train") -> int | None:
    """The first epoch whose ``<name>_head_err`` (from :func:`rank_callback`) is 0, or None."""
    for row in history.rows:
        if row.get(f"{name}_head_err") == 0.0:
            return int(row["epoch"])
    return None


def active_units(F_: torch.Tensor | np.ndarray) -> int:
    """Number of feature coordinates that are non-zero on at least one input (a ReLU unit that is zero on
    every input is dead: it caps the rank of the features)."""
    Fm = torch.as_tensor(np.asarray(F_) if not isinstance(F_, torch.Tensor) else F_)
    return int((Fm.abs().sum(0) > 0).sum())


def head_direction(head: nn.Linear) -> tuple[np.ndarray, float]:
    """The binary score of a 2-logit head, s(φ) = (w₁ − w₀)·φ + (b₁ − b₀) (s > 0 ⇔ class 1);
    a 1-output head is its own score."""
    Wt = head.weight.detach().double().cpu().numpy()
    bt = head.bias.detach().double().cpu().numpy() if head.bias is not None else np.zeros(len(Wt))
    if Wt.shape[0] == 2:
        return Wt[1] - Wt[0], float(bt[1] - bt[0])
    if Wt.shape[0] == 1:
        return Wt[0], float(bt[0])
    raise ValueError(f"head_direction needs a binary head (1 or 2 outputs), got {Wt.shape[0]}")


def head_vs_svm_margin(model: nn.Module, x: torch.Tensor, y01: torch.Tensor, device=None) -> dict[str, Any]:
    """Margin of the trained head on its own frozen penultimate features vs the hard-margin SVM on them.

    Both are Euclidean distances in the 84-d feature space: the head's
    ``min_i y_i s(φ_i)/‖w₁ − w₀‖`` and the SVM's (``marginlab.linear.svm``, with a
    free bias). Their ratio is scale-free and ≤ 1 whenever the head separates the
    features (the SVM margin is the largest possible: asserted). Also returned:
    the angle between the two normals, the mean margins, and the margins divided
    by the RMS distance of the features to their mean (``*_rel``), to compare
    networks whose features have different scales.
    """
    from . import linear

    Fm = penultimate(model, x, device=device).numpy()
    ys = 2.0 * torch.as_tensor(y01).double().numpy() - 1.0
    w_h, b_h = head_direction(model.head)
    m_h = linear.margins(w_h, b_h, Fm, ys)
    scale = float(np.sqrt(((Fm - Fm.mean(0)) ** 2).sum(1).mean()))
    out: dict[str, Any] = {"head_margin": float(m_h.min()), "head_mean_margin": float(m_h.mean()),
                           "feature_scale": scale, "svm_margin": None, "svm_mean_margin": None,
                           "ratio": None, "angle_deg": None, "head_margin_rel": float(m_h.min()) / scale,
                           "svm_margin_rel": None, "separable": None}
    out["separable"] = linear.is_separable(Fm, ys, bias=True)
    if not out["separable"]:
        return out  # no SVM exists on these features
    w_s, b_s = linear.svm(Fm, ys, bias=True)
    m_s = linear.margins(w_s, b_s, Fm, ys)
    # the SVM maximises the minimum margin: a larger head margin could only be a solver failure
    assert m_h.min() <= m_s.min() * (1 + 1e-4) + 1e-9, f"head margin {m_h.min()} > SVM margin {m_s.min()}"
    out.update(svm_margin=float(m_s.min()), svm_mean_margin=float(m_s.mean()),
               angle_deg=linear.angle(w_h, w_s), svm_margin_rel=float(m_s.min()) / scale)
    if m_h.min() > 0:  # a ratio of margins only when the head separates the features too
        out["ratio"] = float(m_h.min() / m_s.min())
    return out
