"""Auto-PGD (Croce & Hein 2020, ICML, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks"): APGD on the cross-entropy or DLR loss, and APGD-T on the
targeted DLR loss over the most likely wrong classes.

What makes it "auto" (their Alg. 1 and §3.1-3.2; semantics checked against the authors' reference
implementation, github.com/fra31/auto-attack, not copied):

* step size eta starts at 2 eps and is halved at checkpoints w_j only where progress stalled:
  (1) the loss increased in at most a fraction rho = 0.75 of the steps since the last checkpoint,
  or (2) the step was not halved at the last checkpoint and the best loss has not improved since;
  after a halving the iterate restarts from the best point found so far (and its gradient);
* checkpoints: the first after 22% of the iterations, then intervals shrinking by 3% of the
  iterations down to 6% (Croce & Hein's p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06));
* a momentum step: z = P(x_k + eta s(grad)), x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))
  (no momentum in the first step), s = sign for Linf, grad / ||grad||_2 for L2;
* the random start lies on the sphere of radius eps (Linf: a uniform draw in the cube rescaled to
  Linf norm eps; L2: a Gaussian direction of norm eps), clamped to [0, 1].

Losses (per example, maximised; pi_i is the index of the i-th largest logit):
DLR(z, y) = -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3) (their eq. 5) and targeted
DLR_t(z, y) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) (their eq. 6); both are invariant to
shifts and positive rescaling of the logits. With fewer than 3 (resp. 4) classes the denominator is
undefined; the un-normalised margin is used instead (documented deviation).

Differences from the reference, none of which weakens the attack: an example is frozen at its first
adversarial iterate and dropped from the working batch at the next checkpoint (the reference keeps
iterating on it: wasted work); randomness is a seeded generator on the compute device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import threads
from ._validation import (
    Model,
    _bview,
    _check_eps,
    _check_int,
    _flat_norm,
    _project,
    _scale,
    _take,
)
from .base import Batch, FixedEpsilonAttack

__all__ = ["APGD", "APGDT", "apgd", "apgd_t", "dlr_loss", "targeted_dlr_loss"]

_APGD_LOSSES = ("ce", "dlr")


def dlr_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference-of-logits-ratio loss (Croce & Hein 2020, eq. 5), per example; > 0 iff misclassified."""
    top = z.topk(min(3, z.shape[1]), dim=1).values
    zy = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    if z.shape[1] < 3:
        return other - zy
    return (other - zy) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss (Croce & Hein 2020, eq. 6), per example, maximised by the attacker."""
    zy = z.gather(1, y[:, None]).squeeze(1)
    zt = z.gather(1, target[:, None]).squeeze(1)
    if z.shape[1] < 4:
        return zt - zy
    top = z.topk(4, dim=1).values
    return (zt - zy) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _checkpoint_steps(n_iter: int) -> set[int]:
    """Iterations (0-based) after which the step size is reviewed: first after 22% of n_iter, then
    intervals shrinking by 3% of n_iter, never below 6% (Croce & Hein 2020, §3.2)."""
    first, shrink, least = max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    points, at, interval = set(), 0, first
    while at + interval <= n_iter:
        at += interval
        points.add(at - 1)
        interval = max(interval - shrink, least)
    return points


def _sphere_start(x: torch.Tensor, eps: float | torch.Tensor, norm: str, gen: torch.Generator) -> torch.Tensor:
    """x + eps * v / ||v|| with v uniform in [-1, 1]^d (Linf) or Gaussian (L2), clamped to [0, 1]."""
    if norm == "linf":
        v = torch.rand(x.shape, generator=gen, device=gen.device, dtype=torch.float32) * 2 - 1
    else:
        v = torch.randn(x.shape, generator=gen, device=gen.device, dtype=torch.float32)
    v = v / _bview(_flat_norm(v, norm).clamp_min(1e-12), x.ndim)
    return (x + _scale(eps, x.ndim) * v.to(x.dtype)).clamp(0.0, 1.0)


def _apgd_run(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, norm: str,
              n_iter: int, loss: str, target: torch.Tensor | None, gen: torch.Generator,
              rho: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run from a random start; returns (points, fooled). A fooled example's point is its first
    adversarial iterate; an unfooled one's the highest-loss iterate. Host syncs: one per checkpoint."""
    n, ndim = x.shape[0], x.ndim

    def objective(xa: torch.Tensor, yy: torch.Tensor, tt: torch.Tensor | None):
        xa = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            z = model(xa)
            if tt is not None:
                obj = targeted_dlr_loss(z, yy, tt)
            elif loss == "ce":
                obj = F.cross_entropy(z, yy, reduction="none")
            else:
                obj = dlr_loss(z, yy)
            (g,) = torch.autograd.grad(obj.sum(), xa)
        return obj.detach(), g, z.detach().argmax(dim=1) != yy

    def direction(g: torch.Tensor) -> torch.Tensor:
        if norm == "linf":
            return g.sign()
        return g / _bview(_flat_norm(g, "l2").clamp_min(1e-12), ndim)

    out = torch.empty_like(x)
    out_fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    idx = torch.arange(n, device=x.device)  # working set -> caller rows
    xw, yw, tw, ew = x, y, target, eps
    x_adv = _sphere_start(x, eps, norm, gen)
    obj, grad, fooled = objective(x_adv, yw, tw)
    found = x_adv.clone()
    x_best, grad_best, obj_best = x_adv.clone(), grad.clone(), obj.clone()
    step = torch.full((n,), 2.0, device=x.device, dtype=x.dtype) * ew
    x_prev = x_adv
    last_obj, n_increase = obj, torch.zeros(n, device=x.device)
    best_at_check, reduced_last = obj_best.clone(), torch.ones(n, dtype=torch.bool, device=x.device)
    checkpoints, since_check = _checkpoint_steps(n_iter), 0
    for i in range(n_iter):
        threads.balance()
        momentum = 0.75 if i > 0 else 1.0
        z1 = _project(x_adv + _bview(step, ndim) * direction(grad), xw, ew, norm)
        x_new = _project(x_adv + momentum * (z1 - x_adv) + (1 - momentum) * (x_adv - x_prev), xw, ew, norm)
        x_prev, x_adv = x_adv, x_new
        obj, grad, wrong = objective(x_adv, yw, tw)
        newly = wrong & ~fooled
        found = torch.where(_bview(newly, ndim), x_adv, found)
        fooled = fooled | wrong
        n_increase += (obj > last_obj).to(n_increase.dtype)
        last_obj = obj
        better = obj > obj_best
        x_best = torch.where(_bview(better, ndim), x_adv, x_best)
        grad_best = torch.where(_bview(better, ndim), grad, grad_best)
        obj_best = torch.where(better, obj, obj_best)
        since_check += 1
        if i not in checkpoints:
            continue
        stalled = n_increase <= rho * since_check
        no_progress = ~reduced_last & (best_at_check >= obj_best)
        reduce = stalled | no_progress
        step = torch.where(reduce, step / 2, step)
        x_adv = torch.where(_bview(reduce, ndim), x_best, x_adv)
        grad = torch.where(_bview(reduce, ndim), grad_best, grad)
        reduced_last, best_at_check = reduce, obj_best.clone()
        n_increase.zero_()
        since_check = 0
        # one host sync per checkpoint: drop the examples already fooled from the working batch
        n_fooled = int(fooled.sum())
        if n_fooled:
            out[idx[fooled]] = found[fooled]
            out_fooled[idx[fooled]] = True
            keep = (~fooled).nonzero().squeeze(1)
            if keep.numel() == 0:
                return out, out_fooled
            idx, xw, yw = idx[keep], xw[keep], yw[keep]
            tw, ew = (None if tw is None else tw[keep]), _take(ew, keep)
            x_adv, x_prev, grad, found = x_adv[keep], x_prev[keep], grad[keep], found[keep]
            x_best, grad_best, obj_best = x_best[keep], grad_best[keep], obj_best[keep]
            step, last_obj, n_increase = step[keep], last_obj[keep], n_increase[keep]
            best_at_check, reduced_last, fooled = best_at_check[keep], reduced_last[keep], fooled[keep]
    out[idx] = torch.where(_bview(fooled, ndim), found, x_best)
    out_fooled[idx] = fooled
    return out, out_fooled


def _restarts(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, norm: str, n_iter: int,
              loss: str, targets: list[torch.Tensor | None], n_restarts: int, gen: torch.Generator,
              rho: float) -> torch.Tensor:
    """Run APGD for every target (None: untargeted) and restart on the examples not yet fooled."""
    with torch.no_grad():
        out = x.clone()
        fooled = model(x).argmax(dim=1) != y
    for target in targets:
        for _ in range(n_restarts):
            todo = (~fooled).nonzero().squeeze(1)  # one host sync per run
            if todo.numel() == 0:
                return out
            t = None if target is None else target[todo]
            pts, ok = _apgd_run(model, x[todo], y[todo], _take(eps, todo), norm, n_iter, loss, t, gen, rho)
            # the unfooled rows keep the last run's highest-loss point
            out[todo] = pts
            fooled[todo] = ok
    return out


class APGD(FixedEpsilonAttack):
    """APGD on the cross-entropy (APGD-CE) or DLR (APGD-DLR) loss (Croce & Hein 2020, Alg. 1).

    ``n_iter`` = 100 and ``n_restarts`` = 1 are AutoAttack's standard setting for APGD-CE; later
    restarts run only on the examples not yet fooled. Success: misclassified.
    """

    def __init__(self, eps: float | torch.Tensor, *, norm: str = "linf", loss: str = "ce", n_iter: int = 100,
                 n_restarts: int = 1, rho: float = 0.75, seed: int = 0, batch_size: int | None = None,
                 device: str | torch.device | None = None) -> None:
        super().__init__(eps, norm=norm, seed=seed, batch_size=batch_size, device=device)
        if loss not in _APGD_LOSSES:
            raise ValueError(f"loss must be one of {_APGD_LOSSES}, got {loss!r}")
        self.loss = loss
        self.n_iter = _check_int(n_iter, "n_iter", 1)
        self.n_restarts = _check_int(n_restarts, "n_restarts", 1)
        self.rho = _check_eps(rho, "rho")

    def _run(self, model: Model, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        if batch.targets is not None:
            raise ValueError("APGD is untargeted; use APGDT for targets")
        return _restarts(model, x, y, batch.eps, self.norm, self.n_iter, self.loss, [None], self.n_restarts,
                         batch.generator, self.rho)


class APGDT(FixedEpsilonAttack):
    """APGD-T: APGD on the targeted DLR loss toward each of the ``n_target_classes`` most likely wrong
    classes in turn (the 2nd, 3rd, ... largest clean logits), each run only on the examples not yet
    fooled (Croce & Hein 2020, §4; AutoAttack's standard: 9 targets, 100 iterations, 1 restart each).
    Success: misclassified (any wrong class), as in AutoAttack.
    """

    def __init__(self, eps: float | torch.Tensor, *, norm: str = "linf", n_target_classes: int = 9,
                 n_iter: int = 100, n_restarts: int = 1, rho: float = 0.75, seed: int = 0,
                 batch_size: int | None = None, device: str | torch.device | None = None) -> None:
        super().__init__(eps, norm=norm, seed=seed, batch_size=batch_size, device=device)
        self.n_target_classes = _check_int(n_target_classes, "n_target_classes", 1)
        self.n_iter = _check_int(n_iter, "n_iter", 1)
        self.n_restarts = _check_int(n_restarts, "n_restarts", 1)
        self.rho = _check_eps(rho, "rho")

    def _run(self, model: Model, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        if batch.targets is not None:
            raise ValueError("APGDT chooses its own targets (the most likely wrong classes)")
        with torch.no_grad():
            order = model(x).argsort(dim=1, descending=True)
        n_t = min(self.n_target_classes, batch.num_classes - 1)
        targets = [order[:, j] for j in range(1, n_t + 1)]
        return _restarts(model, x, y, batch.eps, self.norm, self.n_iter, "dlr", targets, self.n_restarts,
                         batch.generator, self.rho)


def apgd(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, norm: str = "linf",
         loss: str = "ce", n_iter: int = 100, n_restarts: int = 1, seed: int = 0, batch_size: int | None = None,
         device: str | torch.device | None = None) -> torch.Tensor:
    """:class:`APGD` as a function: APGD-CE (``loss="ce"``) or APGD-DLR; the result is on x's device."""
    return APGD(eps, norm=norm, loss=loss, n_iter=n_iter, n_restarts=n_restarts, seed=seed,
                batch_size=batch_size, device=device)(model, x, y)


def apgd_t(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, norm: str = "linf",
           n_target_classes: int = 9, n_iter: int = 100, n_restarts: int = 1, seed: int = 0,
           batch_size: int | None = None, device: str | torch.device | None = None) -> torch.Tensor:
    """:class:`APGDT` as a function (targeted DLR over the most likely wrong classes)."""
    return APGDT(eps, norm=norm, n_target_classes=n_target_classes, n_iter=n_iter, n_restarts=n_restarts,
                 seed=seed, batch_size=batch_size, device=device)(model, x, y)
