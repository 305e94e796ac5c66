"""Training losses. Every loss has the trainer's signature ``loss_fn(model, xb, yb) -> scalar``,
or is a factory returning such a callable, so that one trainer serves every chapter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ---- section: cross-entropy (toolkit) -------------------------------------------------------


def cross_entropy(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of the model's logits (the default training loss)."""
    return F.cross_entropy(model(xb), yb)


def binary_logistic(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Mean logistic loss log(1 + exp(-y s(x))) of a one-score model s (output (B,) or (B, 1)), labels y = ±1
    (Nar et al. 2019b, eq. 1, Wu & Yu 2019, §4). Equals :func:`cross_entropy` on ``BinaryLogits(model)`` with labels mapped -1 -> 0."""
    s = model(xb)
    if s.dim() == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.dim() != 1:
        raise ValueError(f"binary_logistic needs one score per example, got model output {tuple(s.shape)}")
    return F.softplus(-yb.to(s.dtype) * s).mean()

# ---- end section: cross-entropy --------------------------------------------------------------

# ---- section: differential training (chapter 4) ---------------------------------------------


def binary_scores(model: nn.Module, xb: torch.Tensor) -> torch.Tensor:
    """One real score f(x) per example, computed once per batch (Nar et al. 2019a, §4.2: f = wᵀφ_θ(x) + b).

    A model with one output gives that output; a two-logit model (e.g. ``BinaryLogits``, or a
    2-class head trained for comparison) gives ``logit[1] − logit[0]``, whose sign is its decision.
    """
    out = model(xb)
    if out.ndim == 1:
        return out
    if out.ndim == 2 and out.shape[1] == 1:
        return out[:, 0]
    if out.ndim == 2 and out.shape[1] == 2:
        return out[:, 1] - out[:, 0]
    raise ValueError(
        f"differential losses need one score per example: model output of shape {tuple(out.shape)} "
        "is neither (N,), (N, 1) nor (N, 2)"
    )


def split_classes(yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (positive, negative) for labels in {-1, +1} (``binary_subset``) or {0, 1} (class indices).

    Raises ValueError for other labels or when the batch lacks one of the classes: a pairwise loss
    has no pair to form then (use ``fit(..., sampler="balanced")``).
    """
    yb = torch.as_tensor(yb)
    if yb.ndim != 1:
        raise ValueError(f"labels must be a 1-D tensor, got shape {tuple(yb.shape)}")
    values = set(torch.unique(yb).tolist())
    if not values <= {-1, 1} and not values <= {0, 1}:
        raise ValueError(f"differential losses need labels in {{-1,+1}} or {{0,1}}, got values {sorted(values)}")
    pos = yb == 1
    neg = ~pos
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"batch lacks a class ({n_pos} positive, {n_neg} negative examples): differential losses are "
            "defined on pairs from both classes; train with sampler='balanced'"
        )
    return pos, neg


def pair_differences(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """All |I_b|×|J_b| score differences f(x_i) − f(y_j) of a batch, by broadcasting.

    Each image's score is computed once (one forward pass over the batch), so a differential epoch
    costs one forward/backward per image, like cross-entropy. A bias in f cancels in the differences,
    which therefore equal wᵀ(φ(x_i) − φ(y_j)) as in Nar et al. 2019a, eqs. 6–7.
    """
    if xb.shape[0] != yb.shape[0]:
        raise ValueError(f"{xb.shape[0]} inputs but {yb.shape[0]} labels")
    pos, neg = split_classes(yb.to(xb.device))
    s = binary_scores(model, xb)
    return s[pos][:, None] - s[neg][None, :]


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def pairwise_logistic_loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
                           reduction: str = "mean") -> torch.Tensor:
    """Differential logistic loss over the batch's pairs, Nar et al. 2019a, eq. 2 (linear) / eq. 6 (features):
    Σ_{i∈I_b} Σ_{j∈J_b} log(1 + exp(−(f(x_i) − f(y_j)))); ``reduction="mean"`` divides by |I_b||J_b|."""
    return _reduce(F.softplus(-pair_differences(model, xb, yb)), reduction)


def squared_differential_loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
                              reduction: str = "mean") -> torch.Tensor:
    """Squared differential loss, Nar et al. 2019a, eq. 7: Σ_{i∈I_b} Σ_{j∈J_b} (wᵀφ(x_i) − wᵀφ(y_j) − 1)²
    with f(x) = wᵀφ(x) (+ a bias, which cancels); ``reduction="mean"`` divides by |I_b||J_b|."""
    return _reduce((pair_differences(model, xb, yb) - 1.0) ** 2, reduction)


def differential_bias(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float:
    """Bias of Nar et al. 2019a, eq. 5 for scores s = ⟨ŵ, ·⟩ without bias: b̂ = −½ min_i s(x_i) − ½ max_j s(y_j).

    It puts the boundary midway between the two classes' extreme scores on the training set (the
    largest hard margin along ŵ); it separates them (4a–4b) iff min_i s(x_i) ≥ max_j s(y_j).
    """
    scores_pos = torch.as_tensor(scores_pos).reshape(-1)
    scores_neg = torch.as_tensor(scores_neg).reshape(-1)
    if scores_pos.numel() == 0 or scores_neg.numel() == 0:
        raise ValueError("differential_bias needs scores of both classes")
    return float(-0.5 * scores_pos.min() - 0.5 * scores_neg.max())

# ---- end section: differential training -----------------------------------------------------

# ---- section: angular margin penalty and MMC (chapter 5) -------------------------------------


def simplex_gram(num_classes: int, s: float = 1.0, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The target Gram matrix Σ of Xu et al. 2020, eq. (3.7): s² on the diagonal, s²/(1−K) off it."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not s > 0:
        raise ValueError(f"s must be positive, got {s!r}")
    k = num_classes
    off = torch.full((k, k), s * s / (1 - k), dtype=dtype, device=device)
    return off + torch.eye(k, dtype=dtype, device=device) * (s * s - s * s / (1 - k))


def angular_penalty(weight: torch.Tensor, s: float = 0.1) -> torch.Tensor:
    """‖W Wᵀ − Σ‖_F of Xu et al. 2020, eq. (3.8): the Frobenius norm itself, not its square (as in the authors' code).

    ``weight`` is the (K, P) weight of the classification layer (rows = class vectors w_i).
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be a (K, P) matrix, got shape {tuple(weight.shape)}")
    sigma = simplex_gram(weight.shape[0], s, dtype=weight.dtype, device=weight.device)
    return torch.linalg.matrix_norm(weight @ weight.T - sigma, ord="fro")


def angular_penalty_loss(alpha: float = 100.0, s: float = 0.1):
    """Factory for Xu et al. 2020, eq. (3.8): softmax CE + α‖W Wᵀ − Σ‖_F, W = ``model.head.weight``.

    s is the common length of the class vectors w_i, so it sets the scale of the logits W f(x)
    (with tanh features, |logit| ≤ s·√P). The head should be bias-free (Xu et al. 2020, §3.1 sets b = 0).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    if not s > 0:
        raise ValueError(f"s must be positive, got {s!r}")

    def angular_penalty_ce(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        logits = model.head(model.features(xb))
        return F.cross_entropy(logits, yb) + alpha * angular_penalty(model.head.weight, s)

    angular_penalty_ce.alpha, angular_penalty_ce.s = alpha, s  # visible to the trainer's cache key
    return angular_penalty_ce


def mmc_loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Max-Mahalanobis centre loss (Pang et al. 2020, eq. 8): ½‖z − μ_y‖², mean over the batch.

    ``model`` exposes ``features`` (z) and ``head.centers`` (the fixed (K, P) centres μ_k),
    e.g. :class:`marginlab.angular.MMCNet`.
    """
    z = model.features(xb)
    mu = model.head.centers
    if yb.min() < 0 or yb.max() >= mu.shape[0]:
        raise ValueError(f"labels must lie in [0, {mu.shape[0]}), got range [{int(yb.min())}, {int(yb.max())}]")
    return 0.5 * (z - mu[yb]).pow(2).sum(dim=1).mean()


def pgd_adversarial_loss(eps: float, steps: int = 7, step_size: float | None = None, norm: str = "linf",
                         base_loss=None):
    """Factory for Madry et al. (2018) adversarial training: ``base_loss`` (default CE) on PGD examples.

    The examples are made inside the loss with :func:`marginlab.attacks.pgd`, which puts the model in
    eval() (BatchNorm uses running statistics while attacking) and restores train mode before the
    training forward pass. A call counter varies the random start from batch to batch.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    calls = [0]

    def pgd_adversarial(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        from . import attacks  # late import: attacks imports nothing from here, but keep losses light

        calls[0] += 1
        was_training = model.training
        x_adv = attacks.pgd(model, xb, yb, eps, steps, step_size=step_size, norm=norm, random_start=True,
                            early_stop=False, seed=calls[0]).detach()
        model.train(was_training)  # belt and braces: the attack must restore the mode
        loss = base_loss or cross_entropy
        return loss(model, x_adv, yb)

    pgd_adversarial.eps, pgd_adversarial.steps = eps, steps
    pgd_adversarial.step_size, pgd_adversarial.norm = step_size, norm
    return pgd_adversarial

# ---- end section: angular margin penalty and MMC ---------------------------------------------

# ---- section: average-margin regulariser and Parseval (chapter 6) ----------------------------


def _check_int_labels(logits: torch.Tensor, yb: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"expected logits of shape (N, K>=2), got {tuple(logits.shape)}")
    if yb.ndim != 1 or yb.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(yb.shape)}")
    if yb.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be integer class indices, got dtype {yb.dtype}")
    if yb.numel() and (int(yb.min()) < 0 or int(yb.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}]")


def feature_margins(logits: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Per-example feature-space margin min_{k≠y} (w_y − w_k)ᵀΦ(x) (Wu & Yu 2019, eq. 4, second term).

    With logits z = W_L Φ(x) (+ b) this is z_y − max_{k≠y} z_k; a head bias adds b_y − b_k,
    the natural extension of the paper's bias-free f(x) = W_L σ(...).
    """
    _check_int_labels(logits, yb)
    true = logits.gather(1, yb.long()[:, None]).squeeze(1)
    others = logits.scatter(1, yb.long()[:, None], float("-inf"))
    return true - others.max(dim=1).values


def orthogonality_penalty(module: nn.Module) -> torch.Tensor:
    """Σ_l ‖W_l W_lᵀ − I‖_F² over every Linear/Conv weight (Wu & Yu 2019, eq. 4, third term; Cisse et al. 2017).

    Conv kernels are flattened to (out, in·k·k) as in Parseval networks. The Gram matrix is taken
    on the smaller side, so the penalty is zero exactly for W with orthonormal rows (out ≤ in) or
    columns (out > in); ‖WᵀW − I‖² and ‖WWᵀ − I‖² differ only by the constant |in − out|, so the
    gradient is the paper's either way.
    """
    terms = []
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = m.weight.reshape(m.weight.shape[0], -1)
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            eye = torch.eye(gram.shape[0], dtype=w.dtype, device=w.device)
            terms.append(((gram - eye) ** 2).sum())
    if not terms:
        raise ValueError("orthogonality_penalty: the model has no Linear or Conv weights")
    return torch.stack(terms).sum()


def parseval_retract(module: nn.Module, beta: float) -> None:
    """Cisse et al. 2017 retraction W ← (1+β)W − βWWᵀW, in place, on every Linear/Conv weight.

    It is one gradient step of size β on ¼‖WWᵀ − I‖_F² (the penalty's gradient), offered for
    users who prefer the original projection-style update to the penalty form used in training.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                w = m.weight.reshape(m.weight.shape[0], -1)
                w_new = (1 + beta) * w - beta * (w @ w.T @ w)
                m.weight.copy_(w_new.reshape(m.weight.shape))


def amr_loss(lam: float = 0.1, tau: float = 5.0, beta: float = 1e-3, normalize: bool = False):
    """Average-margin regulariser (Wu & Yu 2019, eq. 4) as a ``loss_fn(model, xb, yb)`` factory:

        mean_i CE(f(x_i), y_i) − λ · mean_i min{τ, min_{k≠y_i} (w_{y_i} − w_k)ᵀΦ(x_i)}
                               + β · Σ_l ‖W_l W_lᵀ − I‖_F².

    The paper writes sums over i; with a mean cross-entropy the margin term is a mean too so that λ
    keeps its meaning per example. ``normalize=True`` divides each pairwise margin by ‖w_y − w_k‖
    (the true feature-space distance; the paper's orthogonality term makes ‖w_y − w_k‖ ≈ √2 anyway).
    Paper settings (App. A): λ = 0.1, β = 1e-3, τ = 5 (LR, MNIST-MLP), 10 (MNIST-CNN, CIFAR-MLP/CNN).
    """
    if lam < 0 or beta < 0:
        raise ValueError(f"lam and beta must be >= 0, got lam={lam}, beta={beta}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")

    def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        logits = model(xb)
        margin = feature_margins(logits, yb)  # validates the labels before anything else
        ce = F.cross_entropy(logits, yb)
        if normalize:
            w = model.head.weight
            diff = w[yb][:, None, :] - w[None, :, :]            # (N, K, d): w_y − w_k
            dist = logits.gather(1, yb[:, None]) - logits      # (N, K): z_y − z_k
            norms = (diff.pow(2).sum(dim=2) + 1e-12).sqrt()     # smooth at w_y − w_y = 0
            ratio = (dist / norms).scatter(1, yb[:, None], float("inf"))
            margin = ratio.min(dim=1).values
        reg = -lam * torch.clamp(margin, max=tau).mean()
        if beta > 0:
            reg = reg + beta * orthogonality_penalty(model)
        return ce + reg

    return loss


def parseval_loss(beta: float = 1e-2):
    """Lipschitz-constant regularisation (LCR, Cisse et al. 2017 as used in Wu & Yu 2019, Table 1) in penalty form:
    mean CE + β Σ_l ‖W_l W_lᵀ − I‖_F² (Wu & Yu 2019, App. A: β = 1e-2). A ``loss_fn(model, xb, yb)`` factory.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")

    def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(xb), yb) + beta * orthogonality_penalty(model)

    return loss

# ---- end section: average-margin regulariser and Parseval ------------------------------------
