"""Chapter 5: the angular-margin weight penalty of Xu, Li & Yang (2020) and its baselines.

* geometry: the regular simplex (Xu et al. 2020, Lemma 2), the max-min-angle problem of Xu et al. 2020, Thm 1 solved by
  optimisation, the ReLU counter-example of Xu et al. 2020, §3.2 / Fig. 2;
* Max-Mahalanobis centres and the MMC model of Pang et al. (2020) (centres fixed, logits −‖z − μ_k‖²);
* experiment drivers: models and training for CE / penalty / PGD-AT / MMC, the paper's Table-1 attack
  suite, the adaptive-attack audit, and per-example worst cases.

The losses themselves live in :mod:`marginlab.losses` (``angular_penalty_loss``, ``mmc_loss``,
``pgd_adversarial_loss``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import attacks, config
from .losses import angular_penalty, angular_penalty_loss, mmc_loss, pgd_adversarial_loss, simplex_gram

if TYPE_CHECKING:  # only for annotations: jobs imports the chapter modules
    from . import jobs

# ============================================================================================
# Geometry: simplex, Theorem 1, ReLU counter-example
# ============================================================================================


def _check_kp(num_classes: int, dim: int, what: str | None = None) -> None:
    """Validate K and P; with ``what`` also K ≤ P + 1 (Xu et al. 2020, Thm 1's assumption), naming what needs it."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"K (number of classes) must be an int >= 2, got {num_classes!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"P (feature dimension) must be an int >= 1, got {dim!r}")
    if what is not None and num_classes > dim + 1:
        raise ValueError(f"{what} of K={num_classes} needs P >= K-1 = {num_classes - 1}, got P={dim}")


def simplex(num_classes: int, dim: int, s: float = 1.0, *, dtype: torch.dtype = torch.float64,
            device: torch.device | str | None = None) -> torch.Tensor:
    """K rows in R^P of length s with pairwise inner products s²/(1−K): the W = [V, 0] of Xu et al. 2020, Lemma 2.

    Built from the centred basis vectors e_i − 1/K expressed in the Helmert basis of 1^⊥ (so it is
    exact and deterministic). Needs K ≤ P + 1 (Xu et al. 2020, Thm 1's assumption).
    """
    _check_kp(num_classes, dim, "a regular simplex")
    k = num_classes
    if not s > 0:
        raise ValueError(f"s must be positive, got {s!r}")
    # Helmert rows h_j (j = 1..K-1): orthonormal basis of the sum-zero subspace.
    helmert = torch.zeros(k - 1, k, dtype=torch.float64)
    for j in range(1, k):
        helmert[j - 1, :j] = 1.0
        helmert[j - 1, j] = -float(j)
        helmert[j - 1] /= math.sqrt(j * (j + 1))
    centred = torch.eye(k, dtype=torch.float64) - 1.0 / k
    v = centred @ helmert.T * (s * math.sqrt(k / (k - 1)))  # (K, K-1), rows of length s
    w = torch.zeros(k, dim, dtype=torch.float64)
    w[:, : k - 1] = v
    return w.to(dtype=dtype, device=device)


def pairwise_angles(w: torch.Tensor) -> torch.Tensor:
    """Angles (radians) between all pairs of rows of ``w``, as a vector over i < j."""
    if w.ndim != 2 or w.shape[0] < 2:
        raise ValueError(f"w must be a (K >= 2, P) matrix, got shape {tuple(w.shape)}")
    u = F.normalize(w, dim=1)
    cos = (u @ u.T).clamp(-1.0, 1.0)
    i, j = torch.triu_indices(w.shape[0], w.shape[0], offset=1)
    return torch.arccos(cos[i, j])


def simplex_angle(num_classes: int) -> float:
    """The optimal minimum pairwise angle arccos(1/(1−K)) of Xu et al. 2020, Thm 1 (radians)."""
    _check_kp(num_classes, 1)
    return math.acos(1.0 / (1 - num_classes))


@dataclass
class MaxMinAngleResult:
    w: torch.Tensor  # (K, P) unit rows
    min_angle: float  # radians
    history: list[float]  # min angle (degrees) every `record_every` steps
    gram_error: float | None  # max |W Wᵀ − Σ| when K <= P + 1, else None


def max_min_angle(num_classes: int, dim: int, *, steps: int = 800, lr: float = 0.05,
                  beta: tuple[float, float] = (5.0, 200.0), seed: int = 0, record_every: int = 25
                  ) -> MaxMinAngleResult:
    """Maximise the minimum pairwise angle of K unit vectors in R^P by gradient descent (Xu et al. 2020, Thm 1, (3.5)).

    The objective is the smooth maximum (1/β) log Σ_{i<j} exp(β cos_ij) of the pairwise cosines, β
    annealed geometrically from ``beta[0]`` to ``beta[1]`` so that it tends to max_{i<j} cos_ij (A.3).
    Starting point: i.i.d. Gaussian rows (``seed``). Works for any K, P; the Gram error against Σ is
    reported when K ≤ P + 1, where Thm 1 says the optimum is the simplex.
    """
    _check_kp(num_classes, dim)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if dim == 1:
        # S^0 = {−1, +1} is disconnected: no gradient path exists, so enumerate (alternate the signs)
        w = torch.tensor([[(-1.0) ** i] for i in range(num_classes)], dtype=torch.float64)
        err = float((w @ w.T - simplex_gram(2, 1.0, dtype=w.dtype)).abs().max()) if num_classes == 2 else None
        ang = math.degrees(float(pairwise_angles(w).min()))
        return MaxMinAngleResult(w, math.radians(ang), [ang], err)
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(num_classes, dim, generator=g, dtype=torch.float64).requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 1e-3)
    i, j = torch.triu_indices(num_classes, num_classes, offset=1)
    history = []
    for t in range(steps):
        b = beta[0] * (beta[1] / beta[0]) ** (t / max(steps - 1, 1))
        u = F.normalize(raw, dim=1)
        cos = (u @ u.T)[i, j]
        obj = torch.logsumexp(b * cos, dim=0) / b
        opt.zero_grad()
        obj.backward()
        opt.step()
        sched.step()
        if t % record_every == 0 or t == steps - 1:
            history.append(math.degrees(float(pairwise_angles(raw.detach()).min())))
    w = F.normalize(raw.detach(), dim=1)
    err = None
    if num_classes <= dim + 1:
        err = float((w @ w.T - simplex_gram(num_classes, 1.0, dtype=w.dtype)).abs().max())
    return MaxMinAngleResult(w, float(pairwise_angles(w).min()), history, err)


def relu_counterexample(n: int = 20000, seed: int = 0) -> dict[str, np.ndarray]:
    """Xu et al. 2020, §3.2 / Fig. 2: with K = 3, P = 2 and evenly spread w_i, a class whose w lies in the third
    quadrant is never predicted for non-negative (ReLU) features, but is for tanh features in (−1, 1)².

    Returns the weights (w_3 in the third quadrant) and the share of each predicted class over
    features drawn uniformly from [0, 1]² (ReLU range, capped) and from (−1, 1)² (tanh range).
    """
    angles = np.deg2rad([100.0, 340.0, 220.0])  # w_2 in the fourth quadrant, w_3 strictly in the third
    w = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    rng = np.random.default_rng(seed)
    f_relu = rng.uniform(0.0, 1.0, size=(n, 2))
    f_tanh = rng.uniform(-1.0, 1.0, size=(n, 2))
    share = lambda f: np.bincount(np.argmax(f @ w.T, axis=1), minlength=3) / len(f)  # noqa: E731
    # The algebra behind it: w_3 − w_j has two negative coordinates for j = 1, 2, so
    # (w_3 − w_j)·f < 0 for every f >= 0, f != 0.
    diffs = np.stack([w[2] - w[0], w[2] - w[1]])
    return {"w": w, "share_relu": share(f_relu), "share_tanh": share(f_tanh), "w3_minus_wj": diffs,
            "f_relu": f_relu[:2000], "f_tanh": f_tanh[:2000]}


def fixed_head_toy(activation: str, *, n_per_class: int = 200, steps: int = 400, seed: int = 0,
                   scale: float = 5.0) -> dict[str, float | np.ndarray]:
    """Train a tiny 2→64→2 network whose 2-D features feed a *fixed* simplex head (w_3 in the third
    quadrant, as when weights are fixed in advance, Xu et al. 2020, §3.2) on three Gaussian blobs; per-class recall.

    With ``activation="relu"`` class 3 can never be predicted (asserted in the chapter);
    ``"tanh"`` features can reach every class.
    """
    if activation not in ("relu", "tanh"):
        raise ValueError(f"activation must be 'relu' or 'tanh', got {activation!r}")
    gen = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0, 3.0], [2.6, -1.5], [-2.6, -1.5]])
    x = torch.cat([m + 0.7 * torch.randn(n_per_class, 2, generator=gen) for m in means])
    y = torch.arange(3).repeat_interleave(n_per_class)
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))
    act = torch.relu if activation == "relu" else torch.tanh
    w = torch.tensor(relu_counterexample(n=3)["w"], dtype=torch.float32) * scale
    opt = torch.optim.Adam(body.parameters(), lr=0.01)
    for _ in range(steps):
        loss = F.cross_entropy(act(body(x)) @ w.T, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (act(body(x)) @ w.T).argmax(1)
    recall = np.array([float((pred[y == k] == k).float().mean()) for k in range(3)])
    return {"recall": recall, "accuracy": float((pred == y).float().mean()), "loss": float(loss.detach())}


# ============================================================================================
# MMC (Pang et al. 2020)
# ============================================================================================


def mmc_centers(num_classes: int, dim: int, c_mm: float = 10.0, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Max-Mahalanobis centres (Pang et al. 2018/2020, Algorithm 1): μ_1 = e_1, then μ_i solves
    μ_iᵀμ_j = 1/(1−K) for j < i with ‖μ_i‖ = 1 in the first i coordinates; scaled by C_MM."""
    _check_kp(num_classes, dim, "Max-Mahalanobis centres")
    k = num_classes
    if not c_mm > 0:
        raise ValueError(f"C_MM must be positive, got {c_mm!r}")
    mu = np.zeros((k, dim))
    mu[0, 0] = 1.0
    for i in range(1, k):
        for j in range(i):
            mu[i, j] = -(1.0 / (k - 1) + mu[i] @ mu[j]) / mu[j, j]
        # the last free coordinate makes ‖μ_i‖ = 1; index i exists because i <= K-1 <= P
        if i < dim:
            mu[i, i] = math.sqrt(max(1.0 - mu[i] @ mu[i], 0.0))
    return torch.tensor(c_mm * mu, dtype=dtype, device=device)


class MMCHead(nn.Module):
    """Fixed-centre head: logits_k = −‖z − μ_k‖² (Pang et al. 2020), so argmax = nearest centre."""

    def __init__(self, centers: torch.Tensor):
        super().__init__()
        if centers.ndim != 2:
            raise ValueError(f"centers must be (K, P), got shape {tuple(centers.shape)}")
        self.register_buffer("centers", centers.detach().clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.centers.shape[1]:
            raise ValueError(f"features must be (N, {self.centers.shape[1]}), got {tuple(z.shape)}")
        # expanded difference rather than cdist: exact, and differentiable at z = μ_k
        return -(z.unsqueeze(1) - self.centers).pow(2).sum(-1)


class MMCNet(nn.Module):
    """Wraps a model's feature extractor with an :class:`MMCHead`; the model's own head is dropped.

    Attacks apply unchanged: the logits −‖z − μ_k‖² are what Pang et al. attack with SCE.
    """

    def __init__(self, base: nn.Module, num_classes: int, feature_dim: int, c_mm: float = 10.0):
        super().__init__()
        self.base = base
        self.head = MMCHead(mmc_centers(num_classes, feature_dim, c_mm))
        self.c_mm = c_mm

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def extra_repr(self) -> str:
        return f"c_mm={self.c_mm}"


def mmc_predict(z: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Class of the nearest centre (Pang et al. 2020 prediction rule)."""
    return torch.cdist(z, centers).argmin(dim=1)


# ============================================================================================
# Experiment configuration
# ============================================================================================

METHODS = ("CE", "AT", "MMC", "Ours")

#: Examples per attack call: bounds the activations an attack keeps for its backward pass (the small
#: CNNs: ~3 MiB per CIFAR image; WRN-34-10: ~35 MiB, so its drivers pass a smaller ``batch_size``).
EVAL_BATCH_SIZE = 500


#: the attack kinds of the suite; "autoattack" is Croce & Hein's (2020) evaluation of record (DESIGN §6)
ATTACK_KINDS = ("pgd", "mta", "deepfool", "cw", "autoattack")
#: the hyperparameters each kind uses (every one named; reported in :func:`attack_table`)
_KIND_PARAMS = {
    "pgd": ("steps", "step_size", "loss", "random_start", "restarts", "early_stop"),
    "mta": ("steps", "step_size", "loss", "num_targets", "random_start", "early_stop"),
    "deepfool": ("steps", "overshoot", "candidates"),
    "cw": ("steps", "lr", "binary_search_steps", "initial_const", "confidence", "abort_early"),
    "autoattack": ("version", "n_iter", "n_target_classes", "n_queries"),
}


@dataclass(frozen=True)
class AttackSpec:
    """One attack of the suite with every hyperparameter named (only those of its ``kind`` are used).

    Fixed-eps attacks (PGD, MTA, AutoAttack) search inside the ``norm`` ball of radius ``eps``; the
    minimal-perturbation attacks (DeepFool, C&W) count an example as broken when the adversarial they
    find lies within ``eps``. :meth:`build` makes the :mod:`marginlab.attacks` object.
    """

    name: str  # column name of the paper's table (e.g. "PGD40")
    kind: str  # one of ATTACK_KINDS
    eps: float
    norm: str = "linf"
    steps: int = 0  # PGD / MTA / DeepFool iterations, C&W Adam steps per search step
    step_size: float | None = None  # PGD / MTA step (None: 2.5·eps/steps)
    loss: str = "ce"  # PGD "ce" | "margin"; MTA "margin" (targeted logit difference)
    random_start: bool = True  # PGD / MTA
    restarts: int = 1  # PGD
    num_targets: int | None = None  # MTA: the most likely wrong classes tried (None = every wrong class)
    overshoot: float = 0.02  # DeepFool
    candidates: int | None = 10  # DeepFool: classes linearised per step
    lr: float = 0.01  # C&W Adam learning rate
    binary_search_steps: int = 9  # C&W
    initial_const: float = 1e-3  # C&W
    confidence: float = 0.0  # C&W
    version: str = "standard"  # AutoAttack: "standard" (Croce & Hein's budgets) | "quick" (reduced)
    n_iter: int | None = None  # AutoAttack: APGD / FAB iterations (None = the version's)
    n_target_classes: int | None = None  # AutoAttack: APGD-T / FAB-T targets (None = the version's)
    n_queries: int | None = None  # AutoAttack: Square queries (None = the version's)
    paper: str = ""  # the paper's setting (Xu et al. 2020, Table 1), for the report
    n_examples: int | None = None  # attack only the first n test images (None = all): a stated cut

    def __post_init__(self):
        if self.kind not in ATTACK_KINDS:
            raise ValueError(f"kind must be one of {ATTACK_KINDS}, got {self.kind!r}")

    def build(self, seed: int = 0, batch_size: int | None = None):
        """The :mod:`marginlab.attacks` object of this spec (``batch_size``: examples per chunk)."""
        common = dict(batch_size=batch_size)
        if self.kind == "pgd":
            return attacks.PGD(self.eps, self.steps, self.step_size, norm=self.norm, loss=self.loss,
                               random_start=self.random_start, restarts=self.restarts, seed=seed, **common)
        if self.kind == "mta":
            return attacks.MultiTargetPGD(self.eps, self.steps, self.step_size, norm=self.norm, loss=self.loss,
                                          num_targets=self.num_targets, random_start=self.random_start, seed=seed,
                                          **common)
        if self.kind == "deepfool":
            return attacks.DeepFool(self.steps, self.overshoot, norm=self.norm, candidates=self.candidates, **common)
        if self.kind == "cw":
            if self.norm != "l2":
                raise ValueError(f"C&W is an L2 attack, got norm {self.norm!r}")
            return attacks.CarliniWagnerL2(self.steps, self.lr, self.initial_const, self.binary_search_steps,
                                           self.confidence, **common)
        return attacks.AutoAttack(self.eps, self.norm, version=self.version, seed=seed, batch_size=batch_size,
                                  n_iter=self.n_iter, n_target_classes=self.n_target_classes, n_queries=self.n_queries)

    def hyperparameters(self) -> dict[str, object]:
        """Every hyperparameter this attack runs with (the built object's, so defaults are shown too)."""
        built = self.build()
        out = {"eps": self.eps, "norm": self.norm}
        for k in _KIND_PARAMS[self.kind]:
            v = getattr(built, k) if hasattr(built, k) else getattr(self, k)
            out[k] = "2.5·eps/steps" if k == "step_size" and v is None else v
        return out


@dataclass(frozen=True)
class Ch5Config:
    dataset: str = "mnist"  # "mnist" | "cifar10" | "cifar100"
    n_train: int | None = None  # None = every training image available
    n_test: int = 200
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.01
    alpha: float = 100.0
    s: float = 0.1
    c_mm: float = 10.0
    at_steps: int = 3
    at_step_size: float | None = None
    attacks: tuple[AttackSpec, ...] = ()
    audit_steps: int = 100
    audit_restarts: int = 2
    seed: int = 0
    at_epochs: int | None = None  # epochs of PGD adversarial training (None = ``epochs``)
    audit_n: int | None = None  # test images the audit attacks (None = all n_test)
    model: str = "cwnet"  # "cwnet" (Xu et al. 2020, Tables 4/5) | "wrn" (Tables 2/3)
    wrn_depth: int = 34
    wrn_width: int = 10
    augment: str | None = None  # "crop_flip": 4-pixel padding, random 32x32 crop, horizontal flip (Xu et al. 2020, §4.1)
    lr_schedule: str | None = None  # "step:60:0.9": lr x 0.9 every 60 epochs (Xu et al. 2020, §4.1)
    eval_batch_size: int = EVAL_BATCH_SIZE  # examples per attack call (memory, not results)

    @property
    def eps(self) -> float:
        return 0.3 if self.dataset == "mnist" else 8 / 255

    @property
    def arch(self) -> str:
        return "mnist" if self.dataset == "mnist" else "cifar"

    @property
    def num_classes(self) -> int:
        return 100 if self.dataset == "cifar100" else 10


def paper_attacks(dataset: str, scale: float = 1.0, cw_binary_search: int = 9, cw_initial_const: float = 1e-3,
                  mta_targets: int | None = None, cw_lr: float = 0.01, cw_steps: int | None = None,
                  autoattack: str | None = "standard", autoattack_budget: dict | None = None,
                  autoattack_n: int | None = None) -> tuple[AttackSpec, ...]:
    """The attack suite of Xu et al. 2020, Table 1 for ``dataset``, plus AutoAttack (Croce & Hein 2020) at the paper's eps.

    ``scale`` < 1 shrinks step counts (quick profile) while keeping eps and the total travel (steps ×
    step size, capped below by one eps) comparable. ``autoattack``: its version ("standard": the
    reference budgets; "quick": reduced) or None to leave it out; ``autoattack_budget`` overrides
    ``n_iter`` / ``n_target_classes`` / ``n_queries`` (the smoke run's toy sizes); ``autoattack_n``: on
    the first n test images only (a stated cut).
    """
    mnist = dataset == "mnist"
    eps = 0.3 if mnist else 8 / 255
    cw_eps = 3.0 if mnist else 1.0
    # scale = 0 is the smoke run's toy size (3 steps); otherwise at least 5 steps
    n = lambda k: k if scale >= 1 else 3 if scale == 0 else max(5, int(round(k * scale)))  # noqa: E731

    def step(k: int, size: float) -> float:
        # with fewer steps, use Madry's rule 2.5·eps/steps so the attack can still cross the ball
        return size if n(k) == k else max(size, 2.5 * eps / n(k))

    if mnist:
        pgd = [("PGD40", 40, 0.01), ("PGD200", 200, 0.01)]
        mta = ("MTA200", 200, 0.01)
    else:
        pgd = [("PGD20", 20, 0.0031), ("PGD100", 100, 0.0031)]
        mta = ("MTA100", 100, 0.0031)
    specs = [AttackSpec(nm, "pgd", eps, steps=n(k), step_size=step(k, a), loss="ce", random_start=True, restarts=1,
                        paper=f"{k} steps, step {a}") for nm, k, a in pgd]
    specs.append(AttackSpec("DeepFool", "deepfool", eps, steps=n(50) if scale == 0 else max(n(50), 5),
                            overshoot=0.02, paper="50 steps, overshoot 0.02, Linf"))
    specs.append(AttackSpec("C&W", "cw", cw_eps, norm="l2", steps=cw_steps or n(1000), lr=cw_lr,
                            binary_search_steps=cw_binary_search, initial_const=cw_initial_const,
                            paper=f"1000 steps, lr 0.01, L2 eps {cw_eps:g} (binary search 9, c0 1e-3)"))
    specs.append(AttackSpec(mta[0], "mta", eps, steps=n(mta[1]), step_size=step(mta[1], mta[2]), loss="margin",
                            num_targets=mta_targets, paper=f"{mta[1]} steps, step {mta[2]}, every target"))
    if autoattack is not None:
        specs.append(AttackSpec("AutoAttack", "autoattack", eps, version=autoattack, n_examples=autoattack_n,
                                **(autoattack_budget or {}),
                                paper="not run in 002 (Croce & Hein 2020: APGD-CE, APGD-T, FAB-T, Square)"))
    return tuple(specs)


#: AutoAttack in the standard profile: at Croce & Hein's budgets on the first n test images (a stated cut)
STANDARD_AUTOATTACK_N = {"mnist": 100, "cifar10": 10, "cifar100": 10}
#: AutoAttack in the smoke run: the standard version's code paths at toy budgets
SMOKE_AUTOATTACK = {"n_iter": 3, "n_target_classes": 2, "n_queries": 20}


def default_config(dataset: str = "mnist", model: str = "cwnet") -> Ch5Config:
    """The active run's settings for ``dataset`` via :func:`marginlab.config.pick`.

    ``model="cwnet"``: the small CNNs of Xu et al. 2020, Tables 4 (MNIST) and 5 (CIFAR-10); ``model="wrn"``: the
    WRN-34-10 of Tables 2 (CIFAR-10) and 3 (CIFAR-100) with the paper's pad-crop-flip augmentation and
    step schedule (lr x 0.9 every 60 epochs), full profile only (and its smoke run, with a narrow WRN).

    Every profile's suite ends with AutoAttack (Croce & Hein 2020) at the paper's eps, the evaluation of record.

    * full: the paper (400 epochs, all data, Xu et al. 2020, Table 1's attacks on every test image), AutoAttack standard;
    * standard (CPU, ~45 min for the chapter): the paper's optimiser, lr, batch, architectures and attack
      budgets, AutoAttack standard; every local training image; epochs cut, and the costliest attacks (C&W,
      MTA, AutoAttack) and the audit on the first test images only — every cut is in the chapter's settings table;
    * quick: a CPU pipeline check (~1/20 of the attack steps, 5 epochs, AutoAttack's reduced "quick" version);
    * smoke (full profile, ``MARGINLAB_SMOKE=1``): the full profile's code paths at toy sizes.
    """
    if dataset not in ("mnist", "cifar10", "cifar100"):
        raise ValueError(f"dataset must be 'mnist', 'cifar10' or 'cifar100', got {dataset!r}")
    if model not in ("cwnet", "wrn"):
        raise ValueError(f"model must be 'cwnet' or 'wrn', got {model!r}")
    mnist = dataset == "mnist"
    eps = 0.3 if mnist else 8 / 255
    wrn = dict(model="wrn", augment="crop_flip", lr_schedule="step:60:0.9") if model == "wrn" else {}
    full = Ch5Config(dataset=dataset, n_train=None, n_test=10000, epochs=400,
                     at_steps=40 if mnist else 7, at_step_size=0.01 if mnist else 2 / 255,
                     attacks=paper_attacks(dataset), audit_steps=500, audit_restarts=10,
                     eval_batch_size=128 if model == "wrn" else EVAL_BATCH_SIZE, **wrn)
    # standard: estimates from single-thread throughput measured on an idle core (CWNet+BN: MNIST ~1,700,
    # CIFAR ~280 images/s for a training step or an attack step); see the chapter's settings table
    few = 50 if mnist else 10  # C&W and MTA (thousands of steps per robust image) on the first images only
    # AutoAttack at Croce & Hein's standard budgets costs ~2,000 gradient steps + 5,000 queries per still-robust
    # image: on the first images only (see the chapter's settings table)
    few_aa = STANDARD_AUTOATTACK_N[dataset]
    standard = Ch5Config(
        dataset=dataset, n_train=None, n_test=1000 if mnist else 200, epochs=20 if mnist else 5,
        at_epochs=2 if mnist else 1, at_steps=full.at_steps, at_step_size=full.at_step_size,
        attacks=tuple(_replace(a, n_examples=few) if a.kind in ("cw", "mta") else a
                      for a in paper_attacks(dataset, autoattack_n=few_aa)),
        audit_steps=500, audit_restarts=2, audit_n=100, **wrn)
    # quick: a CPU smoke run of every code path (2560 of the 3678 training images, 5 epochs, 100 test images,
    # attacks with ~1/10-1/20 of the paper's steps; C&W: one run at c = 1, no binary search; AutoAttack at its
    # REDUCED "quick" budget: 25 iterations, 3 targets, 1,000 Square queries)
    quick = Ch5Config(dataset=dataset, n_train=2560, n_test=100, epochs=5,
                      at_steps=2, at_step_size=eps / 2,
                      attacks=paper_attacks(dataset, scale=0.05, cw_binary_search=1, cw_initial_const=1.0,
                                            mta_targets=3, cw_lr=0.05, cw_steps=20, autoattack="quick"),
                      audit_steps=20, audit_restarts=2, **wrn)
    # smoke: the full profile's paths at toy sizes (<= 256 / 128 images, 1 epoch, <= 3 attack steps, 1 restart;
    # the WRN is the same class at depth 10, width 1)
    smoke = Ch5Config(dataset=dataset, n_train=256, n_test=128, epochs=1, at_steps=2, at_step_size=eps / 2,
                      attacks=tuple(_replace(a, n_examples=64) if a.kind in ("cw", "mta") else a for a in
                                    paper_attacks(dataset, scale=0.0, cw_binary_search=1, cw_initial_const=1.0,
                                                  mta_targets=2, cw_lr=0.05, cw_steps=3,
                                                  autoattack_budget=SMOKE_AUTOATTACK)),
                      audit_steps=3, audit_restarts=1, audit_n=64, wrn_depth=10, wrn_width=1,
                      eval_batch_size=64, **wrn)
    if model == "wrn":
        quick = standard = smoke if config.smoke() else full  # WRN-34-10 is for the GPU (full profile) only
    return config.pick(quick=quick, full=full, standard=standard, smoke=smoke)


def _replace(spec: AttackSpec, **kw) -> AttackSpec:
    from dataclasses import replace

    return replace(spec, **kw)


# ============================================================================================
# Models and training
# ============================================================================================


def make_model(method: str, cfg: Ch5Config, *, feature_activation: str | None = None) -> nn.Module:
    """CW small CNN with BatchNorm for ``method`` (Xu et al. 2020, §4.2).

    CE / AT: ReLU features, biased head. Ours: tanh features, bias-free head (Xu et al. 2020, §3.1-3.2).
    MMC: ReLU features (as in Pang et al.), fixed centres of norm C_MM.
    """
    from .models import CWNet

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    torch.manual_seed(cfg.seed)
    if cfg.model == "wrn":
        return _make_wrn(method, cfg, feature_activation)
    if method == "Ours":
        act = feature_activation or "tanh"
        return CWNet(dataset=cfg.arch, num_classes=cfg.num_classes, batchnorm=True, activation="relu",
                     feature_activation=act, head_bias=False)
    base = CWNet(dataset=cfg.arch, num_classes=cfg.num_classes, batchnorm=True, activation="relu",
                 feature_activation=feature_activation or "relu", head_bias=True)
    if method == "MMC":
        return MMCNet(base, cfg.num_classes, base.head.in_features, cfg.c_mm)
    return base


def _make_wrn(method: str, cfg: Ch5Config, feature_activation: str | None) -> nn.Module:
    """WRN-``depth``-``width`` (Zagoruyko & Komodakis 2016) for Xu et al. 2020, Tables 2-3, with the same head
    conventions as the small CNNs (Ours: tanh features, bias-free head)."""
    from .models import WideResNet

    ours = method == "Ours"
    # Xu et al. 2020, §4.1 normalises the images; the per-channel statistics of the CIFAR training sets
    stats_ = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
              "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
    base = WideResNet(depth=cfg.wrn_depth, widen_factor=cfg.wrn_width, num_classes=cfg.num_classes,
                      normalize=stats_.get(cfg.dataset), feature_activation=feature_activation or ("tanh" if ours else "relu"),
                      head_bias=not ours)
    if method == "MMC":
        return MMCNet(base, cfg.num_classes, base.head.in_features, cfg.c_mm)
    return base


def loss_for(method: str, cfg: Ch5Config, *, alpha: float | None = None, s: float | None = None):
    """The training loss of ``method`` (a trainer loss_fn)."""
    from .losses import cross_entropy

    if method == "CE":
        return cross_entropy
    if method == "Ours":
        return angular_penalty_loss(cfg.alpha if alpha is None else alpha, cfg.s if s is None else s)
    if method == "MMC":
        return mmc_loss
    if method == "AT":
        return pgd_adversarial_loss(cfg.eps, cfg.at_steps, cfg.at_step_size)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def load_data(cfg: Ch5Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train / test tensors of ``cfg.dataset`` (inputs in [0,1]); test = the first ``n_test`` images.

    The full profile first checks that the complete data set is present (``data.require``). The smoke
    run stands in CIFAR-10 for CIFAR-100 when CIFAR-100 is absent (said in a warning): the model keeps
    100 outputs, so the code path is the same.
    """
    import warnings

    from . import data

    name = cfg.dataset
    if config.run_name() == "full":
        data.require(name)
    if name == "cifar100" and config.smoke():
        try:
            data.load(name, "test")
        except (OSError, RuntimeError) as err:
            warnings.warn(f"smoke run: CIFAR-100 is absent ({type(err).__name__}); CIFAR-10 stands in for it",
                          stacklevel=2)
            name = "cifar10"
    xtr, ytr = data.load(name, "train")
    xte, yte = data.load(name, "test")
    if cfg.n_train is not None:
        xtr, ytr = xtr[: cfg.n_train], ytr[: cfg.n_train]
    return xtr, ytr, xte[: cfg.n_test], yte[: cfg.n_test]


def train_method(method: str, cfg: Ch5Config, x: torch.Tensor, y: torch.Tensor, *, tag: str = "ch05",
                 feature_activation: str | None = None, alpha: float | None = None, s: float | None = None,
                 epochs: int | None = None, callbacks=(), device=None):
    """Train ``method`` with Adam (lr ``cfg.lr``, batch ``cfg.batch_size``; ``cfg.lr_schedule``, ``cfg.augment``)
    for ``epochs`` (default ``cfg.epochs``, ``cfg.at_epochs`` for AT) and return (model, history) on the
    training device."""
    from .train import fit

    model = make_model(method, cfg, feature_activation=feature_activation)
    if epochs is None:
        epochs = cfg.at_epochs if method == "AT" and cfg.at_epochs is not None else cfg.epochs
    extra = {} if cfg.augment is None else {"augment": cfg.augment}  # only the WRN runs augment
    hist = fit(model, x, y, loss_fn=loss_for(method, cfg, alpha=alpha, s=s), optimizer="adam", lr=cfg.lr,
               epochs=epochs, batch_size=cfg.batch_size, seed=cfg.seed, lr_schedule=cfg.lr_schedule,
               device=device, callbacks=callbacks, cache=f"{tag}-{method}", **extra)
    model.eval()
    return model, hist


# --------------------------------------------------------------------------------------------
# The chapter's trainings as a job plan (python -m marginlab jobs 5). The specs rebuild the run's configuration
# from (dataset, model) with default_config, as the notebook does, so a worker needs no pickled Ch5Config.
# --------------------------------------------------------------------------------------------


def train_data(dataset: str = "mnist", model: str = "cwnet") -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and labels of ``default_config(dataset, model)`` (:func:`load_data`): a data factory."""
    xtr, ytr, _, _ = load_data(default_config(dataset, model))
    return xtr, ytr


def method_model(method: str, dataset: str = "mnist", model: str = "cwnet", *,
                 feature_activation: str | None = None) -> nn.Module:
    """:func:`make_model` under ``default_config(dataset, model)`` (seeded by the configuration's seed)."""
    return make_model(method, default_config(dataset, model), feature_activation=feature_activation)


def method_loss(method: str, dataset: str = "mnist", model: str = "cwnet", *, alpha: float | None = None,
                s: float | None = None):
    """:func:`loss_for` under ``default_config(dataset, model)``."""
    return loss_for(method, default_config(dataset, model), alpha=alpha, s=s)


def method_job(method: str, dataset: str = "mnist", model: str = "cwnet", *, tag: str = "ch05",
               feature_activation: str | None = None, alpha: float | None = None, s: float | None = None,
               name: str | None = None) -> "jobs.Job":
    """The training :func:`train_method` runs for ``method`` under ``default_config(dataset, model)`` (same model,
    data, loss, optimiser and cache tag ``f"{tag}-{method}"``)."""
    from . import jobs

    cfg = default_config(dataset, model)
    epochs = cfg.at_epochs if method == "AT" and cfg.at_epochs is not None else cfg.epochs
    extra = {} if cfg.augment is None else {"augment": cfg.augment}
    fit = dict(loss_fn=jobs.call(method_loss, method, dataset, model, alpha=alpha, s=s), optimizer="adam", lr=cfg.lr,
               epochs=epochs, batch_size=cfg.batch_size, seed=cfg.seed, lr_schedule=cfg.lr_schedule, callbacks=(),
               cache=f"{tag}-{method}", **extra)
    return jobs.Job("05", name or f"{tag.removeprefix('ch05-')}-{dataset}-{method}".removeprefix("ch05-"),
                    model=jobs.call(method_model, method, dataset, model, feature_activation=feature_activation),
                    data=jobs.call(train_data, dataset, model), fit=fit)


def table_runs() -> list[tuple[str, str, tuple[str, ...], str]]:
    """The tables the chapter trains in the active run, as (dataset, model, methods, tag): Table 4 (MNIST) always;
    Table 5 (CIFAR-10) outside the quick profile; the WRN-34-10 Tables 2 and 3 (penalty method) in the full
    profile and its smoke run."""
    runs = [("mnist", "cwnet", METHODS, "ch05")]
    if config.run_name() != "quick":
        runs.append(("cifar10", "cwnet", METHODS, "ch05"))
    if config.profile() == "full":
        runs += [("cifar10", "wrn", ("Ours",), "ch05-wrn"), ("cifar100", "wrn", ("Ours",), "ch05-wrn")]
    return runs


def ablation_settings() -> dict[str, tuple]:
    """The ablation grid of the active run (Xu et al. 2020, Figs. 5-6): α, s and the feature activations; the quick and
    standard profiles cut it to α ∈ {0, 100}, s = 0.1, ReLU vs tanh."""
    return {
        "alphas": config.pick(quick=(0.0, 100.0), full=(0.0, 1.0, 10.0, 100.0, 1000.0), standard=(0.0, 100.0),
                              smoke=(0.0, 100.0)),
        "ss": config.pick(quick=(0.1,), full=(0.01, 0.1, 1.0, 10.0), standard=(0.1,), smoke=(0.1, 1.0)),
        "activations": config.pick(quick=("relu", "tanh"), full=("relu", "prelu", "leaky_relu", "tanh"),
                                   standard=("relu", "tanh"), smoke=("prelu", "tanh")),
    }


def ablation_grid(cfg: Ch5Config, alphas, ss, activations) -> list[tuple[str, tuple, Any]]:
    """The ablation's points in the order :func:`run_ablation` evaluates them: ``(group, point, how)`` with group
    "alpha_s" (point (α, s), tanh features) or "activation" (point (activation, s), α = ``cfg.alpha``). ``how`` is
    the keyword arguments of the penalty model's training, or, for a tanh point that is the α-s grid's model at
    (``cfg.alpha``, s), the reference ``("alpha_s", (cfg.alpha, s))``."""
    out: list[tuple[str, tuple, Any]] = [("alpha_s", (a, s), {"alpha": a, "s": s}) for a in alphas for s in ss]
    grid = {(a, s) for a in alphas for s in ss}
    for act in activations:
        for s in ss:
            if act == "tanh" and (cfg.alpha, s) in grid:  # same model as the α-s grid point
                out.append(("activation", (act, s), ("alpha_s", (cfg.alpha, s))))
            else:
                out.append(("activation", (act, s), {"feature_activation": act, "s": s}))
    return out


def is_base_point(cfg: Ch5Config, kw: dict[str, Any]) -> bool:
    """Whether an ablation point is the table's penalty model (α = ``cfg.alpha``, s = ``cfg.s``, tanh)."""
    return (kw.get("alpha", cfg.alpha) == cfg.alpha and kw.get("s", cfg.s) == cfg.s
            and kw.get("feature_activation", "tanh") == "tanh")


def ablation_tag(kw: dict[str, Any], tag: str = "ch05-ablation") -> str:
    """The cache tag prefix of an ablation point, e.g. ``ch05-ablation-alpha0.0-s0.1``."""
    return tag + "-" + "-".join(f"{k}{v}" for k, v in kw.items())


def training_jobs() -> list["jobs.Job"]:
    """Chapter 5's trainings in the active run: every table's methods (:func:`table_runs`), then the MNIST
    ablation grid (:func:`ablation_grid`) without the points whose model the table already trained."""
    out = [method_job(m, d, mod, tag=tag, name=f"{'wrn-' if mod == 'wrn' else ''}{d}-{m}")
           for d, mod, methods, tag in table_runs() for m in methods]
    cfg = default_config("mnist")
    for _, _, kw in ablation_grid(cfg, **ablation_settings()):
        if isinstance(kw, dict) and not is_base_point(cfg, kw):
            tag = ablation_tag(kw)
            out.append(method_job("Ours", "mnist", tag=tag, name=tag.removeprefix("ch05-"), **kw))
    return out


# ============================================================================================
# Evaluation
# ============================================================================================


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) live: the device every computation on it runs on."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _batched(fn: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int | None,
             *extra: torch.Tensor) -> torch.Tensor:
    """``fn(x[s], y[s], *extra[s])`` over chunks of ``batch_size`` rows, concatenated (per-example outputs).

    Bounds the memory of an attack (one backward pass over a chunk), not its work: examples are independent.
    """
    bs = EVAL_BATCH_SIZE if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if len(x) <= bs:
        return fn(x, y, *extra)
    return torch.cat([fn(x[i:i + bs], y[i:i + bs], *(e[i:i + bs] for e in extra)) for i in range(0, len(x), bs)])


def _on_model(model: nn.Module, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move the inputs in: the public drivers compute on the model's device and return on the caller's."""
    dev = _device_of(model)
    return tuple(t.to(dev) for t in ts)


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Per-example correctness (bool) of ``model`` on x, on x's device; chunked, on the model's device."""
    home = x.device
    xd, yd = _on_model(model, x, y)
    return _batched(lambda a, b: attacks.correct(model, a, b), xd, yd, batch_size).to(home)


def _dist(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def run_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, seed: int = 0,
               batch_size: int | None = None, *, report: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one attack of the suite; returns (x_adv, robust mask) on x's device.

    Computes on the model's device in chunks of ``batch_size`` examples (default ``EVAL_BATCH_SIZE``).
    Minimal-perturbation attacks (DeepFool, C&W) count an example as robust when the found
    adversarial point is farther than ``spec.eps`` or is not adversarial at all. For AutoAttack,
    ``report`` (a dict, if given) receives its record: per example the member that broke it
    (``broken_by``), the accuracy after each member and their seconds.
    """
    home = x.device
    xd, yd = _on_model(model, x, y)
    attack = spec.build(seed=seed, batch_size=EVAL_BATCH_SIZE if batch_size is None else int(batch_size))
    if spec.kind == "autoattack":
        rec = attack.run(model, xd, yd)
        if report is not None:
            report.update(broken_by=rec.broken_by, accuracy=rec.accuracy, seconds=rec.seconds, attacks=rec.attacks)
        return rec.x_adv.to(home), rec.robust.to(home)
    x_adv = attack(model, xd, yd)
    fooled = ~_correct(model, x_adv, yd, batch_size)
    if spec.kind in ("pgd", "mta"):
        return x_adv.to(home), (~fooled).to(home)
    ok = _correct(model, xd, yd, batch_size)
    within = _dist(x_adv, xd, spec.norm) <= spec.eps * (1 + 1e-5)
    return x_adv.to(home), (ok & ~(fooled & within)).to(home)


@dataclass
class Evaluation:
    """Per-example results of one model under an attack suite (all tensors (n,) on one device).

    An attack given ``n_examples`` covers only the first n test images: its accuracy is over those, and
    the worst case over several attacks is taken on the images every one of them attacked.
    """

    clean: torch.Tensor  # (N,) bool
    robust: dict[str, torch.Tensor]  # attack name -> (n <= N,) bool, the first n test images
    distances: dict[str, torch.Tensor] = field(default_factory=dict)  # minimal attacks: (n,) distances
    records: dict[str, dict] = field(default_factory=dict)  # AutoAttack: broken_by per example, accuracy per member

    def accuracy(self) -> dict[str, float]:
        out = {"Clean": float(self.clean.float().mean())}
        out.update({k: float(v.float().mean()) for k, v in self.robust.items()})
        out["worst case"] = float(self.worst_case().float().mean())
        return out

    def counts(self) -> dict[str, int]:
        """How many test images each column of :meth:`accuracy` rests on."""
        return {"Clean": len(self.clean), **{k: len(v) for k, v in self.robust.items()},
                "worst case": len(self.worst_case())}

    def per_example(self) -> dict[str, torch.Tensor]:
        """The per-example booleans behind :meth:`accuracy` (for intervals: bootstrap over test images)."""
        return {"Clean": self.clean, **self.robust, "worst case": self.worst_case()}

    def estimates(self, level: float = 0.95, seed: int = 0) -> dict[str, object]:
        """:meth:`accuracy` with percentile-bootstrap intervals over test images (``marginlab.stats``)."""
        from . import stats

        return {k: stats.bootstrap(v.detach().cpu().double().numpy(), level=level, seed=seed)
                for k, v in self.per_example().items()}

    def worst_case(self, names=None) -> torch.Tensor:
        """Per-example worst case: robust only if clean-correct and robust to every attack (DESIGN §6),
        on the first n test images, n the fewest any selected attack covered."""
        masks = [v for k, v in self.robust.items() if names is None or k in names]
        n = min([len(self.clean), *(len(v) for v in masks)])
        m = self.clean[:n].clone()
        for v in masks:
            m &= v[:n]
        return m


    def broken(self) -> dict[str, torch.Tensor]:
        """Per attack (and per AutoAttack member, as "AutoAttack/apgd-ce", ...): which test images it broke
        (bool over the images it attacked: clean-correct there and not robust)."""
        out = {k: self.clean[: len(v)] & ~v for k, v in self.robust.items()}
        for name, rec in self.records.items():
            for member in rec.get("accuracy", {}):
                if member != "clean":
                    out[f"{name}/{member}"] = torch.tensor([b == member for b in rec["broken_by"]],
                                                           dtype=torch.bool, device=self.clean.device)
        return out

    def breakdown(self) -> list[dict[str, object]]:
        """Rows: per attack, how many images it broke and how many of those no other attack column broke
        (AutoAttack's members are compared with the other columns, not with each other)."""
        broken = self.broken()
        rows = []
        for k, b in broken.items():
            top = k.split("/")[0]
            others = [v for kk, v in broken.items() if kk.split("/")[0] != top]
            alone = b.clone()
            for v in others:
                n = min(len(alone), len(v))
                alone[:n] &= ~v[:n]
            rows.append({"attack": k, "images attacked": len(b), "broke": int(b.sum()), "broke alone": int(alone.sum())})
        return rows


def black_box_only(ev: Evaluation, *extra: Evaluation, autoattack: str = "AutoAttack",
                   black_box: str = "square") -> torch.Tensor:
    """Gradient-masking flag (DESIGN §6; Croce & Hein 2020 §5): the test images that AutoAttack's black-box
    member ``black_box`` (Square) broke although every white-box attack run on them failed — AutoAttack's own
    APGD-CE, APGD-T and FAB-T (Square runs only on what they left) and every other column of ``ev`` and of the
    ``extra`` evaluations (e.g. the audit's) that covers the image. Bool over the images AutoAttack attacked."""
    rec = ev.records.get(autoattack)
    if rec is None:
        raise ValueError(f"the evaluation has no {autoattack!r} record; run the suite with an AutoAttack spec")
    flag = torch.tensor([b == black_box for b in rec["broken_by"]], dtype=torch.bool, device=ev.clean.device)
    for e in (ev, *extra):
        for k, v in e.robust.items():
            if e is ev and k == autoattack:
                continue
            n = min(len(flag), len(v))
            flag[:n] &= v[:n].to(flag.device)  # still robust under the white-box attack k
    return flag


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, specs: tuple[AttackSpec, ...],
             seed: int = 0, batch_size: int | None = None) -> Evaluation:
    """Clean correctness and per-attack robustness masks under the suite ``specs``.

    Per-example (N,) tensors on x's device, so that intervals (bootstrap over test examples) and the
    per-example worst case can be computed; attacks run on the model's device in chunks of
    ``batch_size``. Adding an attack to the ensemble is adding an :class:`AttackSpec` to ``specs``.
    """
    home = x.device
    xd, yd = _on_model(model, x, y)
    ev = Evaluation(_correct(model, xd, yd, batch_size), {})
    for spec in specs:
        n = len(xd) if spec.n_examples is None else min(int(spec.n_examples), len(xd))
        xs, ys, clean = xd[:n], yd[:n], ev.clean[:n]
        rec: dict = {}
        x_adv, rob = run_attack(model, xs, ys, spec, seed=seed, batch_size=batch_size, report=rec)
        ev.robust[spec.name] = rob & clean
        if rec:
            ev.records[spec.name] = rec
        if spec.kind in ("deepfool", "cw"):
            d = _dist(x_adv, xs, spec.norm)
            d[_correct(model, x_adv, ys, batch_size)] = float("inf")  # not adversarial: no distance found
            d[~clean] = 0.0
            ev.distances[spec.name] = d
    return _to(ev, home)


def _to(ev: Evaluation, dev: torch.device) -> Evaluation:
    return Evaluation(ev.clean.to(dev), {k: v.to(dev) for k, v in ev.robust.items()},
                      {k: v.to(dev) for k, v in ev.distances.items()}, dict(ev.records))


# ============================================================================================
# Adaptive-attack audit
# ============================================================================================


@dataclass
class Audit:
    evaluation: Evaluation  # masks at the table's eps: FGSM, margin-PGD, CE-PGD (restarts), transfer
    epsilons: list[float]
    curves: dict[str, list[float]]  # accuracy vs eps: "PGD" (table-like), "FGSM", "stronger", "transfer"
    unbounded: dict[str, object]
    sanity: dict[str, object]


def audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Ch5Config, *,
          source: nn.Module | None = None, seed: int = 0, grid: int = 2, label: str = "Ours",
          batch_size: int | None = None) -> Audit:
    """Adaptive attacks on top of the paper's suite (Carlini et al. 2019 checklist), on eps-grids
    ``[0, eps/grid, ..., eps]`` so that DESIGN §6 can be checked (and is, with a strict assertion):

    * "PGD": CE-loss PGD with ``cfg.audit_steps // 2`` steps (the table-style attack);
    * "FGSM": one step (iterative must beat single-step);
    * "stronger": margin-loss (logit-difference) PGD, ``cfg.audit_steps`` steps × ``cfg.audit_restarts``
      restarts, worst case with CE-PGD at the same budget (more effort must not raise accuracy);
    * "transfer": PGD examples made on ``source`` (the plain-CE model) (white-box must beat transfer);
    * unbounded: eps = 1 margin-PGD must reach 0% (with the median minimal Linf distortion).

    Runs on the model's device (``source`` must share it) in chunks of ``batch_size``; the masks of the
    returned evaluation are per-example, on x's device.
    """
    home = x.device
    if cfg.audit_n is not None:
        x, y = x[: cfg.audit_n], y[: cfg.audit_n]
    x, y = _on_model(model, x, y)
    if source is not None and _device_of(source) != x.device:
        raise ValueError(f"source model is on {_device_of(source)}, the audited model on {x.device}")
    eps_grid = [cfg.eps * i / grid for i in range(grid + 1)]
    steps = cfg.audit_steps

    def pgd_ce(m, xb, yb, e, k=max(steps // 2, 1), r=1, loss="ce", s=seed):
        return attacks.pgd(m, xb, yb, e, k, loss=loss, restarts=r, seed=s)

    def stronger(m, xb, yb, e):
        xa = pgd_ce(m, xb, yb, e, steps, cfg.audit_restarts, "margin", seed + 1)
        xc = pgd_ce(m, xb, yb, e, steps, cfg.audit_restarts, "ce", seed + 2)
        ok = attacks.correct(m, xa, yb)
        return torch.where(ok.view(-1, *[1] * (xb.dim() - 1)), xc, xa)  # keep whichever fooled

    def fgsm(m, xb, yb, e):
        return attacks.fgsm(m, xb, yb, e)

    ev = Evaluation(_correct(model, x, y, batch_size), {})
    curves: dict[str, list[float]] = {}
    named = {"PGD": pgd_ce, "FGSM": fgsm, "stronger": stronger}
    if source is not None:
        named["transfer"] = lambda m, xb, yb, e: pgd_ce(source, xb, yb, e, steps, 1, "ce", seed + 3)
    for name, atk in named.items():
        accs = []
        for e in eps_grid:
            if e == 0:
                accs.append(float(ev.clean.float().mean()))
                continue
            xa = _batched(lambda xb, yb: atk(model, xb, yb, e), x, y, batch_size)
            attacks.assert_in_ball(x, xa, e, "linf")
            rob = _correct(model, xa, y, batch_size) & ev.clean
            accs.append(float(rob.float().mean()))
            if e == eps_grid[-1]:
                ev.robust[{"PGD": f"PGD-CE {max(steps // 2, 1)}", "FGSM": "FGSM",
                           "stronger": f"PGD-margin+CE {steps}×{cfg.audit_restarts}",
                           "transfer": "transfer from CE"}[name]] = rob
        curves[name] = accs
    unb = unbounded_attack(model, x, y, steps=max(steps, 20), restarts=cfg.audit_restarts, seed=seed,
                           batch_size=batch_size)
    med = float(unb["linf_distortion"][ev.clean].median()) if bool(ev.clean.any()) else float("nan")
    unb["median_linf"] = med
    unb["linf_distortion"] = unb["linf_distortion"].to(home)
    report = attacks.assert_sanity(
        eps_grid, curves["PGD"], clean=float(ev.clean.float().mean()), unbounded=unb["accuracy"],
        median_distortion=med, stronger=[curves["stronger"]], single_step=curves["FGSM"],
        transfer=curves.get("transfer"), tol=0.05, unbounded_tol=0.0, label=label)
    return Audit(_to(ev, home), eps_grid, curves, unb, report)


def unbounded_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 100,
                     restarts: int = 1, halvings: int = 5, seed: int = 0,
                     batch_size: int | None = None) -> dict[str, float | torch.Tensor]:
    """Sanity check (DESIGN §6): Linf margin-PGD with eps = 1 (the whole image cube) must reach 0%.

    Where PGD fails, a gradient-free blend towards another class's image finishes the job (and its
    failure share is reported as ``pgd_accuracy``: > 0 there is a sign of gradient masking).
    Also the per-example Linf distortion needed: start from the distance of the unbounded attack's
    point, then ``halvings`` bisection steps on a per-example eps with the same attack (inf where the
    unbounded attack failed, 0 where the clean input is already wrong). Report its median.
    Computes on the model's device in chunks of ``batch_size``; the distortions are on x's device.
    """
    home = x.device
    x, y = _on_model(model, x, y)
    x_adv = _batched(lambda xb, yb: attacks.pgd(model, xb, yb, 1.0, steps, step_size=0.05, loss="margin",
                                                 random_start=True, restarts=restarts, seed=seed, early_stop=True),
                     x, y, batch_size)
    fooled = ~_correct(model, x_adv, y, batch_size)
    pgd_acc = float((~fooled).float().mean())
    # gradient-free fallback (immune to masking): blend towards a correctly classified image of another
    # class, x + t (x_j − x), at the first t on a grid that changes the prediction (t = 1 is x_j itself)
    ok = _correct(model, x, y, batch_size)
    if bool((~fooled).any()):
        x_adv = x_adv.clone()
        donors = (ok).nonzero().squeeze(1)
        for i in (~fooled).nonzero().squeeze(1).tolist():
            cand = donors[y[donors] != y[i]]
            if len(cand) == 0:
                continue
            j = int(cand[(cand - i).abs().argmin()])
            tgrid = torch.linspace(0.05, 1.0, 20, device=x.device).view(-1, *([1] * (x.dim() - 1)))
            blend = (x[i:i + 1] + tgrid * (x[j:j + 1] - x[i:i + 1])).clamp(0, 1)
            hit = (~attacks.correct(model, blend, y[i].repeat(len(blend)))).nonzero()
            if len(hit):
                x_adv[i] = blend[int(hit[0])]
                fooled[i] = True
    acc = float((~fooled).float().mean())
    hi = torch.where(fooled, _dist(x_adv, x, "linf"), torch.full((len(x),), float("inf"), device=x.device))
    lo = torch.zeros(len(x), device=x.device)
    live = ok & torch.isfinite(hi)
    for _ in range(halvings):
        if not bool(live.any()):
            break
        mid = (lo + hi) / 2
        # margin-loss Linf PGD with radius mid_i per example; early stop keeps the first adversarial
        # iterate, and the result lies in each example's own ball, so "fooled" certifies dist <= mid_i
        xa = _batched(lambda xb, yb, eb: attacks.pgd(model, xb, yb, eb, max(steps // 4, 5), loss="margin",
                                                      random_start=True, restarts=1, seed=seed),
                      x[live], y[live], batch_size, mid[live])
        f = ~_correct(model, xa, y[live], batch_size)
        idx = live.nonzero().squeeze(1)
        hi[idx[f]] = mid[idx[f]]
        lo[idx[~f]] = mid[idx[~f]]
    dist = torch.where(ok, hi, torch.zeros_like(hi))
    return {"accuracy": acc, "pgd_accuracy": pgd_acc, "linf_distortion": dist.to(home)}


def loss_along_direction(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ts: torch.Tensor, *,
                         direction: str = "gradient", seed: int = 0) -> dict[str, torch.Tensor]:
    """CE loss and margin (max_{j≠y} z_j − z_y) at x + t·d for t in ``ts`` (1-D slice; gradient masking
    shows up as a flat or jagged CE along the signed gradient while the margin still moves).

    ``direction`` "gradient": d = sign(∇_x CE); "random": a random sign vector (drawn on the CPU, so the
    same seed gives the same direction on every device). Computes on the model's device; the results
    are on x's device.
    """
    if direction not in ("gradient", "random"):
        raise ValueError(f"direction must be 'gradient' or 'random', got {direction!r}")
    home = x.device
    x, y = _on_model(model, x, y)
    was = model.training
    model.eval()
    try:
        if direction == "gradient":
            xg = x.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
            d = g.sign()
        else:
            gen = torch.Generator().manual_seed(seed)
            d = (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1).to(x)
        ce, mg = [], []
        with torch.no_grad():
            for t in ts.tolist():
                z = model((x + t * d).clamp(0, 1))
                ce.append(F.cross_entropy(z, y, reduction="none"))
                mg.append(attacks.margin_gap(z, y))
    finally:
        model.train(was)
    return {"t": ts, "ce": torch.stack(ce, 1).to(home), "margin": torch.stack(mg, 1).to(home),
            "grad_zero_frac": (d == 0).float().mean().to(home)}


def weight_geometry(model: nn.Module) -> dict[str, float]:
    """Row norms, min pairwise angle (degrees) and penalty value of the classification layer."""
    w = model.head.centers if isinstance(model.head, MMCHead) else model.head.weight
    w = w.detach().double()
    k = w.shape[0]
    return {"min_angle_deg": math.degrees(float(pairwise_angles(w).min())),
            "simplex_angle_deg": math.degrees(simplex_angle(k)),
            "mean_row_norm": float(w.norm(dim=1).mean()),
            "penalty_s0.1": float(angular_penalty(w, 0.1))}


# ============================================================================================
# The paper's numbers (Xu et al. 2020, Tables 2-5, transcribed from the text) and side-by-side tables
# ============================================================================================

#: Xu et al. 2020, Table 4 (MNIST, small CNN) and Table 5 (CIFAR-10, small CNN), accuracies in %.
PAPER_TABLES: dict[str, dict[str, dict[str, float]]] = {
    "mnist": {
        "AT": {"Clean": 99.47, "PGD40": 96.38, "PGD200": 94.58, "DeepFool": 96.79, "C&W": 39.82, "MTA200": 98.57},
        "MMC": {"Clean": 89.55, "PGD40": 35.98, "PGD200": 34.91, "DeepFool": 34.12, "C&W": 2.08, "MTA200": 12.40},
        "Ours": {"Clean": 99.39, "PGD40": 81.90, "PGD200": 80.39, "DeepFool": 97.28, "C&W": 97.95, "MTA200": 88.31},
    },
    "cifar10": {
        "AT": {"Clean": 68.81, "PGD20": 21.36, "PGD100": 18.94, "DeepFool": 24.68, "C&W": 10.91, "MTA100": 57.15},
        "MMC": {"Clean": 73.30, "PGD20": 39.23, "PGD100": 38.96, "DeepFool": 16.86, "C&W": 1.49, "MTA100": 25.96},
        "Ours": {"Clean": 81.43, "PGD20": 57.11, "PGD100": 56.22, "DeepFool": 59.11, "C&W": 59.11, "MTA100": 64.88},
    },
    # Xu et al. 2020, Table 3 (CIFAR-100, WRN-34-10) and Table 2 (CIFAR-10, WRN-34-10): "Ours" rows
    "cifar100": {"Ours": {"Clean": 73.84, "PGD20": 47.17, "PGD100": 46.47, "DeepFool": 55.21, "C&W": 54.82}},
    "cifar10-wrn": {"Ours": {"Clean": 94.10, "PGD20": 78.40, "DeepFool": 79.92, "C&W": 83.42}},
}


def comparison_table(results: dict[str, dict[str, float]] | None, dataset: str) -> list[dict[str, str]]:
    """Rows (for :func:`marginlab.scorecard.markdown_table`): per method a 'paper' and an 'ours' row, in %.

    ``results``: method -> {column: fraction} (our measurements; None = not run). Columns follow the
    paper's table, plus our per-example worst case over the whole suite.
    """
    paper = PAPER_TABLES[dataset]
    cols = list(next(iter(paper.values())))
    fmt = lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731
    rows = []
    methods = list(paper) + [m for m in (results or {}) if m not in paper]
    for m in methods:
        if m in paper:
            rows.append({"method": m, "source": "paper", **{c: fmt(paper[m].get(c)) for c in cols},
                         "worst case": "—"})
        ours = (results or {}).get(m)
        rows.append({"method": m, "source": "ours" if ours else "ours (not run)",
                     **{c: fmt(100 * ours[c]) if ours and c in ours else "—" for c in cols},
                     "worst case": fmt(100 * ours["worst case"]) if ours and "worst case" in ours else "—"})
    return rows


def attack_table(specs: tuple[AttackSpec, ...]) -> list[dict[str, str]]:
    """Rows: every attack with all its hyperparameters (ours) next to the paper's Table-1 setting."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = []
    for s in specs:
        hp = s.hyperparameters()
        rows.append({"attack": s.name, "kind": s.kind, "norm": s.norm, "eps": fmt(s.eps),
                     "hyperparameters": ", ".join(f"{k} {fmt(v)}" for k, v in hp.items() if k not in ("eps", "norm")),
                     "test images": "all" if s.n_examples is None else f"first {s.n_examples}",
                     "paper (002 Table 1)": s.paper})
    return rows


# ============================================================================================
# Experiment drivers (the chapter calls these)
# ============================================================================================


@dataclass
class MethodRun:
    model: nn.Module
    history: object
    evaluation: Evaluation
    seconds: float


def run_table(cfg: Ch5Config, methods: tuple[str, ...] = METHODS, *, tag: str = "ch05", data=None,
              progress: Callable[[str], None] | None = print) -> dict[str, MethodRun]:
    """Train every method on ``cfg.dataset`` and evaluate it under the Table-1 suite ``cfg.attacks``."""
    import time

    xtr, ytr, xte, yte = data if data is not None else load_data(cfg)
    out = {}
    for m in methods:
        t0 = time.perf_counter()
        model, hist = train_method(m, cfg, xtr, ytr, tag=tag)
        ev = evaluate(model, xte, yte, cfg.attacks, seed=cfg.seed, batch_size=cfg.eval_batch_size)
        out[m] = MethodRun(model, hist, ev, time.perf_counter() - t0)
        if progress:
            acc = ev.accuracy()
            progress(f"{m:5s} " + "  ".join(f"{k} {100 * v:5.1f}" for k, v in acc.items())
                     + f"   ({out[m].seconds:.0f} s)")
    return out


def run_ablation(cfg: Ch5Config, data, *, alphas=(0.0, 1.0, 100.0), ss=(0.1, 1.0),
                 activations=("relu", "prelu", "leaky_relu", "tanh"), attack: AttackSpec | None = None,
                 tag: str = "ch05-ablation", base_model: nn.Module | None = None) -> dict[str, dict]:
    """Xu et al. 2020, §4.3 / Figs. 5-6: clean and PGD accuracy of the penalty method over α, s and the feature
    activation (α = ``cfg.alpha`` for the activation sweep, s from ``ss``). ``base_model``, when given,
    is the already trained model at (cfg.alpha, cfg.s, tanh) on the same data and is reused there."""
    xtr, ytr, xte, yte = data
    attack = attack or cfg.attacks[0]
    res: dict[str, dict] = {"alpha_s": {}, "activation": {}}

    def one(**kw):
        if base_model is not None and is_base_point(cfg, kw):
            model = base_model
        else:
            model, _ = train_method("Ours", cfg, xtr, ytr, tag=ablation_tag(kw, tag), **kw)
        ok = _correct(model, xte, yte, cfg.eval_batch_size)
        _, rob = run_attack(model, xte, yte, attack, seed=cfg.seed, batch_size=cfg.eval_batch_size)
        return float(ok.float().mean()), float((rob & ok).float().mean())

    for group, point, how in ablation_grid(cfg, alphas, ss, activations):  # the job plan's grid, in its order
        res[group][point] = res[how[0]][how[1]] if isinstance(how, tuple) else one(**how)
    return res
