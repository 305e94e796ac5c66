"""Fixed-eps gradient attacks: FGSM, PGD (Linf and L2, CE or margin loss, restarts) and multi-target PGD.

FGSM: Goodfellow et al. 2015. PGD: Madry et al. 2018 (eq. 2.1 and their Appendix C: random start,
step 2.5 eps / steps). Multi-target PGD: the attack of Xu et al. 2020's Table 1 (targeted PGD
toward each wrong class, per-example worst case).
"""
from __future__ import annotations

import torch

from .. import threads
from ._validation import (
    Model,
    _bview,
    _check_eps,
    _check_eps_vec,
    _check_int,
    _flat_norm,
    _loss_name,
    _objective,
    _project,
    _random_start,
    _scale,
    _take,
)
from .base import Batch, FixedEpsilonAttack

__all__ = ["FGSM", "PGD", "MultiTargetPGD", "fgsm", "multi_target", "pgd"]

# PGD early stop: how often (steps) the frozen examples are dropped from the working set (one host sync each).
_COMPACT_EVERY = 5


def _pgd_run(
    model: Model,
    x0: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    steps: int,
    step_size: float | torch.Tensor,
    norm: str,
    loss: str,
    start: torch.Tensor,
    early_stop: bool,
    target: torch.Tensor | None,
    success_vs_label: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One PGD trajectory from ``start``; returns (x_adv, success, objective at x_adv).

    Per-example early stop: an example is frozen at the first iterate that is adversarial, so the
    attack keeps the adversarial it found. The freeze is a mask (no per-step host sync); every
    ``_COMPACT_EVERY`` steps the frozen examples are dropped from the working batch (one sync).
    """
    ndim = x0.ndim
    out = start.clone()
    # working set: the examples still being attacked (compacted every few steps under early stop)
    idx = torch.arange(x0.shape[0], device=x0.device)
    x_adv, xw, yw, tw = start, x0, y, target
    active = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)

    def success(z: torch.Tensor, yy: torch.Tensor, tt: torch.Tensor | None) -> torch.Tensor:
        pred = z.argmax(dim=1)
        if tt is None or success_vs_label:
            return pred != yy
        return pred == tt

    for it in range(steps):
        threads.balance()
        xa = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            z = model(xa)
            obj = _objective(z, yw, tw, loss)
            (grad,) = torch.autograd.grad(obj.sum(), xa)
        if norm == "linf":
            step = grad.sign_().mul_(_scale(step_size, ndim))
        else:
            gn = _flat_norm(grad, "l2").clamp_min(1e-12)
            step = grad.mul_(_bview(step_size / gn, ndim))
        x_new = _project(x_adv + step, xw, eps, norm)
        if not early_stop:
            x_adv = x_new
            continue
        active = active & ~success(z.detach(), yw, tw)
        x_adv = torch.where(_bview(active, ndim), x_new, x_adv)
        if (it + 1) % _COMPACT_EVERY == 0 and it + 1 < steps:
            # one host sync every few steps: drop frozen examples from the working set
            n_active = int(active.sum())
            if n_active < 0.75 * active.shape[0]:
                out[idx] = x_adv
                keep = active.nonzero().squeeze(1)
                idx, x_adv, xw, yw = idx[keep], x_adv[keep], xw[keep], yw[keep]
                eps, step_size = _take(eps, keep), _take(step_size, keep)
                tw = None if tw is None else tw[keep]
                active = active[keep]
                if n_active == 0:
                    break
    out[idx] = x_adv
    x_adv = out
    z = model(x_adv)
    return x_adv, success(z, y, target), _objective(z, y, None if success_vs_label else target, loss)


def _pgd_restarts(
    model: Model,
    x0: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    steps: int,
    step_size: float | torch.Tensor,
    norm: str,
    loss: str,
    random_start: bool,
    restarts: int,
    early_stop: bool,
    target: torch.Tensor | None,
    gen: torch.Generator,
    success_vs_label: bool = False,
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example worst case over restarts: an example adversarial in any restart stays adversarial.

    Later restarts only run on the examples not yet fooled (one host sync per restart).
    """
    if best is None:
        best_x = x0.clone()
        best_succ = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
        best_obj = torch.full((x0.shape[0],), float("-inf"), device=x0.device)
    else:
        best_x, best_succ, best_obj = best
    for r in range(restarts):
        idx = None
        if r > 0 or best is not None:
            idx = (~best_succ).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
        xs, ys = (x0, y) if idx is None else (x0[idx], y[idx])
        ts = target if (target is None or idx is None) else target[idx]
        es, ss = (eps, step_size) if idx is None else (_take(eps, idx), _take(step_size, idx))
        if random_start:
            start = _random_start(xs, es, norm, gen)
        else:
            start = xs.clone()
        xr, succ, obj = _pgd_run(model, xs, ys, es, steps, ss, norm, loss, start, early_stop, ts,
                                 success_vs_label)
        if idx is None:
            replace = ~best_succ & (succ | (obj > best_obj))
            best_x = torch.where(_bview(replace, x0.ndim), xr, best_x)
            best_obj = torch.where(replace, obj, best_obj)
            best_succ = best_succ | succ
        else:
            replace = succ | (obj > best_obj[idx])
            best_x[idx] = torch.where(_bview(replace, x0.ndim), xr, best_x[idx])
            best_obj[idx] = torch.where(replace, obj, best_obj[idx])
            best_succ[idx] = succ
    return best_x, best_succ, best_obj


class PGD(FixedEpsilonAttack):
    """Projected gradient ascent in the Linf or L2 eps-ball (Madry et al. 2018, eq. 2.1 + Appendix C).

    Linf: x <- Proj(x + a sign(grad)); L2: x <- Proj(x + a grad/||grad||_2); the default step
    a = 2.5 eps / steps (Madry's choice). ``loss="ce"`` is the cross-entropy, ``"margin"`` the
    Carlini–Wagner logit margin max_{j!=y} z_j - z_y. With ``targets`` (at call time) the attack
    descends the loss of the target class instead (success = predicted target). ``random_start``
    draws uniformly in the ball; ``restarts`` keeps the per-example worst case; ``early_stop``
    freezes each example at its first adversarial iterate. ``eps`` and ``step_size`` may be tensors
    (N,) of per-example values (the default step is then 2.5 eps_i / steps).
    """

    def __init__(self, eps: float | torch.Tensor, steps: int, step_size: float | torch.Tensor | None = None, *,
                 norm: str = "linf", loss: str = "ce", random_start: bool = True, restarts: int = 1,
                 early_stop: bool = True, seed: int = 0, batch_size: int | None = None,
                 device: str | torch.device | None = None) -> None:
        super().__init__(eps, norm=norm, seed=seed, batch_size=batch_size, device=device)
        self.steps = _check_int(steps, "steps", 0)
        self.restarts = _check_int(restarts, "restarts", 1)
        self.loss = _loss_name(loss)
        if step_size is None or not (isinstance(step_size, torch.Tensor) and step_size.ndim > 0):
            self.step_size = None if step_size is None else _check_eps(step_size, "step_size")
        else:
            self.step_size = _check_eps_vec(step_size, step_size.shape[0] if step_size.ndim == 1 else -1,
                                            "step_size")
        self.random_start = bool(random_start)
        self.early_stop = bool(early_stop)

    def _radius(self, n: int) -> float | torch.Tensor:
        eps = super()._radius(n)
        if isinstance(self.step_size, torch.Tensor) and self.step_size.shape[0] != n:
            raise ValueError(f"step_size must be a float or a tensor of shape ({n},), "
                             f"got shape {tuple(self.step_size.shape)}")
        return eps

    def _run(self, model: Model, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        eps = batch.eps
        if self.step_size is None:
            step = 2.5 * eps / self.steps if self.steps else eps * 0.0
        else:
            step = _take(self.step_size, batch.index)
            if isinstance(step, torch.Tensor):
                step = step.to(device=x.device, dtype=x.dtype)
        out, _, _ = _pgd_restarts(model, x, y, eps, self.steps, step, self.norm, self.loss, self.random_start,
                                  self.restarts, self.early_stop, batch.targets, batch.generator)
        return out


class FGSM(FixedEpsilonAttack):
    """Fast gradient (sign) method: one step of size eps from x (Goodfellow et al. 2015).

    Linf: x + eps sign(grad); L2 ("fast gradient method"): x + eps grad/||grad||_2; then clamp to [0, 1].
    """

    def __init__(self, eps: float, *, norm: str = "linf", loss: str = "ce", batch_size: int | None = None,
                 device: str | torch.device | None = None) -> None:
        super().__init__(eps, norm=norm, batch_size=batch_size, device=device)
        self.loss = _loss_name(loss)

    def _run(self, model: Model, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        out, _, _ = _pgd_restarts(model, x, y, batch.eps, 1, batch.eps, self.norm, self.loss, False, 1, False,
                                  batch.targets, batch.generator)
        return out


class MultiTargetPGD(FixedEpsilonAttack):
    """Targeted PGD toward each wrong class; per-example worst case (the multi-target attack of Xu et al.
    2020, Table 1).

    Targets: every class j != y (``num_targets=None``), or the ``num_targets`` most likely wrong
    classes under the clean logits. An example counts as fooled as soon as it is misclassified
    (any wrong class), and stays fooled; targets are tried in decreasing clean-logit order.
    """

    def __init__(self, eps: float, steps: int, step_size: float | None = None, *, norm: str = "linf",
                 loss: str = "margin", num_targets: int | None = None, random_start: bool = True,
                 early_stop: bool = True, seed: int = 0, batch_size: int | None = None,
                 device: str | torch.device | None = None) -> None:
        super().__init__(_check_eps(eps), norm=norm, seed=seed, batch_size=batch_size, device=device)
        self.steps = _check_int(steps, "steps", 0)
        self.loss = _loss_name(loss)
        if step_size is None:
            step_size = 2.5 * self.eps / self.steps if self.steps else 0.0
        self.step_size = _check_eps(step_size, "step_size")
        self.num_targets = None if num_targets is None else _check_int(num_targets, "num_targets", 1)
        self.random_start = bool(random_start)
        self.early_stop = bool(early_stop)

    def _run(self, model: Model, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        z0 = model(x)
        k = batch.num_classes
        n_t = min(k - 1 if self.num_targets is None else self.num_targets, k - 1)
        order = z0.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)[:, :n_t]
        best = (x.clone(), z0.argmax(dim=1) != y, _objective(z0, y, None, self.loss))
        for t in range(n_t):
            best = _pgd_restarts(model, x, y, batch.eps, self.steps, self.step_size, self.norm, self.loss,
                                 self.random_start, 1, self.early_stop, order[:, t], batch.generator,
                                 success_vs_label=True, best=best)
        return best[0]


# --------------------------------------------------------------------------------------------
# functional API: thin wrappers over the classes
# --------------------------------------------------------------------------------------------


def pgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    steps: int,
    step_size: float | torch.Tensor | None = None,
    norm: str = "linf",
    loss: str = "ce",
    random_start: bool = True,
    restarts: int = 1,
    early_stop: bool = True,
    targeted: torch.Tensor | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """:class:`PGD` as a function (see there); ``targeted``: target labels. eps=0 returns a copy of x.

    Runs on ``device`` (default: the model's), in chunks of ``batch_size``; the result is on x's device.
    """
    return PGD(eps, steps, step_size, norm=norm, loss=loss, random_start=random_start, restarts=restarts,
               early_stop=early_stop, seed=seed, batch_size=batch_size, device=device)(model, x, y, targets=targeted)


def fgsm(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    loss: str = "ce",
    device: str | torch.device | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """:class:`FGSM` as a function: one step of size eps, then clamp to [0, 1] (Goodfellow et al. 2015)."""
    return FGSM(_check_eps(eps), norm=norm, loss=loss, batch_size=batch_size, device=device)(model, x, y)


def multi_target(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    norm: str = "linf",
    step_size: float | None = None,
    random_start: bool = True,
    seed: int = 0,
    loss: str = "margin",
    num_targets: int | None = None,
    early_stop: bool = True,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """:class:`MultiTargetPGD` as a function (Xu et al. 2020, Table 1's multi-target attack)."""
    return MultiTargetPGD(eps, steps, step_size, norm=norm, loss=loss, num_targets=num_targets,
                          random_start=random_start, early_stop=early_stop, seed=seed, batch_size=batch_size,
                          device=device)(model, x, y)
