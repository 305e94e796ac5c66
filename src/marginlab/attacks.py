"""Adversarial attacks and robust-accuracy curves (DESIGN §2 conventions, §6 sanity rules).

Conventions shared by every attack here (the pitfalls every attack library's users hit):

* inputs lie in [0, 1]; the model maps a batch (N, ...) to raw logits (N, K); labels are int64
  class indices (a binary score model is wrapped as two logits, e.g. ``models.BinaryLogits``);
* the model is put in ``eval()`` during the attack and every submodule's mode is restored
  afterwards, as is ``requires_grad`` of its parameters; gradients are taken w.r.t. the input
  only (``torch.autograd.grad``), so no parameter ``.grad`` is created or accumulated;
* the caller's tensors are never modified; the result lives on ``x``'s device;
* a returned point is always inside the eps-ball (Linf or L2) around ``x`` AND inside [0, 1]:
  we project onto the ball, then clamp to [0, 1] — clamping moves each coordinate towards
  ``x`` (which is in [0, 1]), so it can only shrink the perturbation in either norm;
* randomness comes from a ``torch.Generator`` seeded with ``seed`` (drawn on the CPU and moved,
  so CPU and GPU runs start from the same points);
* bad input (eps < 0 or NaN, unknown norm/loss, shape mismatch, labels out of range, x outside
  [0, 1]) raises ``ValueError``.

References: Goodfellow et al. 2015 (FGSM); Madry et al. 2018 (PGD, {cite}`madry2018towards`);
Carlini & Wagner 2017 (CW-L2, {cite}`carlini2017towards`); Moosavi-Dezfooli et al. 2016 (DeepFool,
{cite}`moosavi2016deepfool`); 002 Table 1 (the multi-target attack); DESIGN §6 (sanity rules).
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "fgsm",
    "pgd",
    "cw_l2",
    "deepfool",
    "multi_target",
    "minimal_perturbation",
    "robust_accuracy",
    "accuracy_at_distances",
    "worst_case_accuracy",
    "perturbation_norms",
    "in_ball",
    "assert_in_ball",
    "sanity_report",
    "check_sanity",
    "assert_sanity",
]

Model = Callable[[torch.Tensor], torch.Tensor]
Attack = Callable[[Model, torch.Tensor, torch.Tensor, float], torch.Tensor]

_NORMS = {"linf": "linf", "inf": "linf", "l_inf": "linf", "l2": "l2", "2": "l2"}
_LOSSES = ("ce", "margin")
# Float32 slack for ball/box checks: x_adv - x is recomputed after a rounding x + delta.
_BALL_ATOL = 1e-6
_BALL_RTOL = 1e-5


# --------------------------------------------------------------------------------------------
# validation and model-state helpers
# --------------------------------------------------------------------------------------------


def _norm_name(norm: Any) -> str:
    key = str(norm).lower().replace(" ", "")
    if norm == float("inf"):
        key = "inf"
    if key not in _NORMS:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return _NORMS[key]


def _loss_name(loss: str) -> str:
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    return loss


def _check_eps(eps: Any, name: str = "eps") -> float:
    if isinstance(eps, torch.Tensor):
        if eps.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(eps.shape)}")
        eps = eps.item()
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {eps!r}") from None
    if math.isnan(value):
        raise ValueError(f"{name} is NaN")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if math.isinf(value):
        raise ValueError(
            f"{name} must be finite; for an unbounded attack use eps=1 (Linf) or sqrt(d) (L2): "
            "inputs live in [0, 1]"
        )
    return value


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the batch and labels (one host sync for the [0, 1] check); return detached copies-by-reference."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError("x and y must be torch tensors")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must be a batch of shape (N, ...), got shape {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must have shape (N,) = ({x.shape[0]},) matching x, got shape {tuple(y.shape)}"
        )
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels must be integer class indices (int64), got dtype {y.dtype}")
    if x.numel():
        lo, hi = torch.aminmax(x.detach())
        if not (bool(lo >= 0) and bool(hi <= 1)):  # NaN fails both comparisons
            raise ValueError(
                f"inputs must lie in [0, 1] (got min {lo.item():.4g}, max {hi.item():.4g}); "
                "normalisation belongs inside the model"
            )
    return x.detach(), y.detach().to(device=x.device, dtype=torch.long)


def _check_logits(z: torch.Tensor, y: torch.Tensor, n: int) -> int:
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] != n:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z)
        raise ValueError(f"the model must return logits of shape (N, K) = ({n}, K), got {shape}")
    k = z.shape[1]
    if k < 2:
        raise ValueError(
            f"the model returns {k} logit(s); attacks need K >= 2 (wrap a score model in models.BinaryLogits)"
        )
    if y.numel() and (bool(y.min() < 0) or bool(y.max() >= k)):
        raise ValueError(f"labels must lie in [0, {k - 1}], got range [{int(y.min())}, {int(y.max())}]")
    return k


def _check_targets(targets: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor) or targets.shape != y.shape:
        raise ValueError(f"targeted must be a tensor of target labels with shape {tuple(y.shape)}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"target labels must be integer class indices, got dtype {targets.dtype}")
    t = targets.detach().to(device=y.device, dtype=torch.long)
    if t.numel() and (bool(t.min() < 0) or bool(t.max() >= k)):
        raise ValueError(f"target labels must lie in [0, {k - 1}]")
    return t


def _resolve_device(x: torch.Tensor, device: Any) -> torch.device:
    return x.device if device is None else torch.device(device)


@contextlib.contextmanager
def _attack_mode(model: Model) -> Iterator[None]:
    """eval() + frozen parameters during an attack; every submodule's mode and flag restored after.

    Freezing the parameters means autograd builds no graph towards them: no ``.grad`` can be left
    behind and the backward pass is cheaper.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def _check_model_device(model: Model, dev: torch.device) -> None:
    if isinstance(model, nn.Module):
        p = next(iter(model.parameters()), None)
        if p is not None and p.device.type != dev.type:
            raise ValueError(f"the model's parameters are on {p.device} but the attack runs on {dev}")


def _bview(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-example vector (N,) to broadcast against a batch of rank ``ndim``."""
    return v.view(-1, *([1] * (ndim - 1)))


def _flat_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    flat = t.flatten(1)
    if norm == "linf":
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    return flat.norm(p=2, dim=1)


def _margin_gap(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y (Carlini–Wagner's margin on logits; > 0 iff misclassified, ties aside)."""
    zy = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return other - zy


def _objective(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, loss: str) -> torch.Tensor:
    """Per-example objective the attacker maximises."""
    if target is None:
        if loss == "ce":
            return F.cross_entropy(z, y, reduction="none")
        return _margin_gap(z, y)
    if loss == "ce":
        return -F.cross_entropy(z, target, reduction="none")
    return -_margin_gap(z, target)


def _project(x_adv: torch.Tensor, x0: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project onto the eps-ball around x0, then clamp to [0, 1] (which cannot leave the ball)."""
    if norm == "linf":
        out = torch.minimum(torch.maximum(x_adv, x0 - eps), x0 + eps)
    else:
        delta = x_adv - x0
        n = _flat_norm(delta, "l2")
        factor = (eps / n.clamp_min(1e-12)).clamp(max=1.0)
        out = x0 + delta * _bview(factor, delta.ndim)
    return out.clamp_(0.0, 1.0)


def _random_start(x0: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    """A uniform draw from the Linf cube or the L2 ball of radius eps (Madry et al. 2018), clamped to [0, 1]."""
    shape = x0.shape
    if norm == "linf":
        delta = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * eps
    else:
        n, d = shape[0], int(x0[0].numel()) if shape[0] else 0
        direction = torch.randn((n, max(d, 1)), generator=gen, dtype=torch.float32)[:, :d]
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        # radius ~ eps * U^(1/d): the uniform distribution on the ball, not on its centre.
        radius = eps * torch.rand(n, generator=gen, dtype=torch.float32).pow(1.0 / max(d, 1))
        delta = (direction * radius[:, None]).view(shape)
    delta = delta.to(device=x0.device, dtype=x0.dtype)
    return _project(x0 + delta, x0, eps, norm)


def _predict(model: Model, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Logits of a batch under no_grad (chunked when batch_size is given)."""
    with torch.no_grad():
        if batch_size is None or x.shape[0] <= batch_size:
            return model(x)
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


# --------------------------------------------------------------------------------------------
# FGSM / PGD
# --------------------------------------------------------------------------------------------


def _pgd_run(
    model: Model,
    x0: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    norm: str,
    loss: str,
    start: torch.Tensor,
    early_stop: bool,
    target: torch.Tensor | None,
    success_vs_label: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One PGD trajectory from ``start``; returns (x_adv, success, objective at x_adv).

    Per-example early stop: an example is frozen at the first iterate that is adversarial, so the
    attack keeps the adversarial it found (no host sync: the freeze is a mask).
    """
    ndim = x0.ndim
    x_adv = start
    active = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)

    def success(z: torch.Tensor) -> torch.Tensor:
        pred = z.argmax(dim=1)
        if target is None or success_vs_label:
            return pred != y
        return pred == target

    for _ in range(steps):
        xa = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            z = model(xa)
            obj = _objective(z, y, target, loss)
            (grad,) = torch.autograd.grad(obj.sum(), xa)
        if norm == "linf":
            step = grad.sign_().mul_(step_size)
        else:
            gn = _flat_norm(grad, "l2").clamp_min(1e-12)
            step = grad.mul_(_bview(step_size / gn, ndim))
        x_new = _project(x_adv + step, x0, eps, norm)
        if early_stop:
            active = active & ~success(z.detach())
            x_adv = torch.where(_bview(active, ndim), x_new, x_adv)
        else:
            x_adv = x_new
    z = model(x_adv)
    return x_adv, success(z), _objective(z, y, None if success_vs_label else target, loss)


def _pgd_restarts(
    model: Model,
    x0: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
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
        if random_start:
            start = _random_start(xs, eps, norm, gen)
        else:
            start = xs.clone()
        xr, succ, obj = _pgd_run(model, xs, ys, eps, steps, step_size, norm, loss, start, early_stop, ts,
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


def pgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    norm: str = "linf",
    loss: str = "ce",
    random_start: bool = True,
    restarts: int = 1,
    early_stop: bool = True,
    targeted: torch.Tensor | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Projected gradient ascent in the Linf or L2 eps-ball (Madry et al. 2018, eq. 2.1 + §C).

    Linf: x <- Proj(x + a sign(grad)); L2: x <- Proj(x + a grad/||grad||_2); the default step
    a = 2.5 eps / steps (Madry's choice). loss="ce" is the cross-entropy, "margin" the
    Carlini–Wagner logit margin max_{j!=y} z_j - z_y. ``targeted`` (target labels) makes the
    attack descend the loss of the target class instead (success = predicted target).
    ``random_start`` draws uniformly in the ball; ``restarts`` keeps the per-example worst case;
    ``early_stop`` freezes each example at its first adversarial iterate. eps=0 returns a copy of x.
    Computation runs on ``device`` (default: x's device); the result is on x's device.
    """
    eps = _check_eps(eps)
    steps = _check_int(steps, "steps", 0)
    restarts = _check_int(restarts, "restarts", 1)
    norm, loss = _norm_name(norm), _loss_name(loss)
    if step_size is None:
        step_size = 2.5 * eps / steps if steps else 0.0
    step_size = _check_eps(step_size, "step_size")
    x0, y0 = _check_inputs(x, y)
    dev = _resolve_device(x, device)
    _check_model_device(model, dev)
    x0, y0 = x0.to(dev), y0.to(dev)
    with _attack_mode(model), torch.no_grad():
        k = _check_logits(model(x0[:1]) if len(x0) else torch.zeros(0, 2), y0, min(len(x0), 1))
        target = _check_targets(targeted, y0, k) if targeted is not None else None
        if eps == 0 or len(x0) == 0:
            return x.detach().clone()
        gen = torch.Generator().manual_seed(int(seed))
        out, _, _ = _pgd_restarts(model, x0, y0, eps, steps, step_size, norm, loss, random_start, restarts,
                                  early_stop, target, gen)
    return out.to(x.device)


def fgsm(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    loss: str = "ce",
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Fast gradient (sign) method: one step of size eps from x (Goodfellow et al. 2015).

    Linf: x + eps sign(grad); L2 ("fast gradient method"): x + eps grad/||grad||_2; then clamp to [0, 1].
    """
    return pgd(model, x, y, eps, steps=1, step_size=_check_eps(eps), norm=norm, loss=loss,
               random_start=False, restarts=1, early_stop=False, device=device)
