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
    "margin_gap",
    "correct",
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
# PGD early stop: how often (steps) the frozen examples are dropped from the working set (one host sync each).
_COMPACT_EVERY = 5


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


def _check_eps_vec(eps: Any, n: int, name: str = "eps") -> float | torch.Tensor:
    """A scalar radius (float) or per-example radii: a 1-D tensor of length ``n`` (returned float32, CPU)."""
    if isinstance(eps, torch.Tensor) and eps.ndim > 0:
        if eps.ndim != 1 or eps.shape[0] != n:
            raise ValueError(f"{name} must be a float or a tensor of shape ({n},), got shape {tuple(eps.shape)}")
        if eps.is_complex() or eps.dtype == torch.bool:
            raise ValueError(f"{name} must be real, got dtype {eps.dtype}")
        e = eps.detach().to(device="cpu", dtype=torch.float64)
        if bool(torch.isnan(e).any()):
            raise ValueError(f"{name} contains NaN")
        if bool((e < 0).any()):
            raise ValueError(f"{name} must be >= 0, got min {float(e.min())}")
        if bool(torch.isinf(e).any()):
            raise ValueError(f"{name} must be finite (inputs live in [0, 1])")
        return e.to(torch.float32)
    return _check_eps(eps, name)


def _scale(v: float | torch.Tensor, ndim: int) -> float | torch.Tensor:
    """A scalar as is; per-example values (N,) reshaped to broadcast against a batch of rank ``ndim``."""
    return _bview(v, ndim) if isinstance(v, torch.Tensor) else v


def _take(v: float | torch.Tensor, idx: torch.Tensor) -> float | torch.Tensor:
    """Per-example values restricted to ``idx`` (a scalar is shared by every example)."""
    return v[idx] if isinstance(v, torch.Tensor) else v


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


def margin_gap(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example max_{j != y} z_j - z_y of logits z (N, K) (Carlini & Wagner 2017's margin, the
    "margin" loss of :func:`pgd`); > 0 iff misclassified, ties aside. Differentiable."""
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"z must be logits of shape (N, K >= 2), got {getattr(z, 'shape', type(z))}")
    if not isinstance(y, torch.Tensor) or y.shape != (z.shape[0],):
        raise ValueError(f"y must have shape ({z.shape[0]},), got {getattr(y, 'shape', type(y))}")
    y = y.to(device=z.device, dtype=torch.long)
    zy = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return other - zy


_margin_gap = margin_gap  # internal name used by the attacks below


def _objective(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, loss: str) -> torch.Tensor:
    """Per-example objective the attacker maximises."""
    if target is None:
        if loss == "ce":
            return F.cross_entropy(z, y, reduction="none")
        return _margin_gap(z, y)
    if loss == "ce":
        return -F.cross_entropy(z, target, reduction="none")
    return -_margin_gap(z, target)


def _project(x_adv: torch.Tensor, x0: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """Project onto the eps-ball around x0 (eps scalar or per example), then clamp to [0, 1]
    (which cannot leave the ball)."""
    if norm == "linf":
        e = _scale(eps, x0.ndim)
        out = torch.minimum(torch.maximum(x_adv, x0 - e), x0 + e)
    else:
        delta = x_adv - x0
        n = _flat_norm(delta, "l2")
        factor = (eps / n.clamp_min(1e-12)).clamp(max=1.0)
        out = x0 + delta * _bview(factor, delta.ndim)
    return out.clamp_(0.0, 1.0)


def _random_start(x0: torch.Tensor, eps: float | torch.Tensor, norm: str, gen: torch.Generator) -> torch.Tensor:
    """A uniform draw from the Linf cube or the L2 ball of radius eps (Madry et al. 2018), clamped to [0, 1].

    Drawn on the CPU (``eps`` per example must then be on the device of ``x0``; it is moved here)."""
    shape = x0.shape
    eps_cpu = eps.cpu() if isinstance(eps, torch.Tensor) else eps
    if norm == "linf":
        delta = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * _scale(eps_cpu, len(shape))
    else:
        n, d = shape[0], int(x0[0].numel()) if shape[0] else 0
        direction = torch.randn((n, max(d, 1)), generator=gen, dtype=torch.float32)[:, :d]
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        # radius ~ eps * U^(1/d): the uniform distribution on the ball, not on its centre.
        radius = eps_cpu * torch.rand(n, generator=gen, dtype=torch.float32).pow(1.0 / max(d, 1))
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
) -> torch.Tensor:
    """Projected gradient ascent in the Linf or L2 eps-ball (Madry et al. 2018, eq. 2.1 + §C).

    Linf: x <- Proj(x + a sign(grad)); L2: x <- Proj(x + a grad/||grad||_2); the default step
    a = 2.5 eps / steps (Madry's choice). loss="ce" is the cross-entropy, "margin" the
    Carlini–Wagner logit margin max_{j!=y} z_j - z_y. ``targeted`` (target labels) makes the
    attack descend the loss of the target class instead (success = predicted target).
    ``random_start`` draws uniformly in the ball; ``restarts`` keeps the per-example worst case;
    ``early_stop`` freezes each example at its first adversarial iterate. eps=0 returns a copy of x.
    ``eps`` (and ``step_size``) may also be a tensor (N,) of per-example radii: each example is
    projected onto its own ball and the default step is 2.5 eps_i / steps (e.g. for a bisection on
    the minimal distortion); a tensor of equal values gives the float's result up to float noise.
    Computation runs on ``device`` (default: x's device); the result is on x's device.
    """
    n = x.shape[0] if isinstance(x, torch.Tensor) and x.ndim else 0
    eps = _check_eps_vec(eps, n)
    steps = _check_int(steps, "steps", 0)
    restarts = _check_int(restarts, "restarts", 1)
    norm, loss = _norm_name(norm), _loss_name(loss)
    if step_size is None:
        step_size = 2.5 * eps / steps if steps else eps * 0.0
    step_size = _check_eps_vec(step_size, n, "step_size")
    x0, y0 = _check_inputs(x, y)
    dev = _resolve_device(x, device)
    _check_model_device(model, dev)
    x0, y0 = x0.to(dev), y0.to(dev)
    if isinstance(eps, torch.Tensor):
        eps = eps.to(device=dev, dtype=x0.dtype)
    if isinstance(step_size, torch.Tensor):
        step_size = step_size.to(device=dev, dtype=x0.dtype)
    with _attack_mode(model), torch.no_grad():
        k = _check_logits(model(x0[:1]) if len(x0) else torch.zeros(0, 2), y0, min(len(x0), 1))
        target = _check_targets(targeted, y0, k) if targeted is not None else None
        all_zero = bool((eps == 0).all()) if isinstance(eps, torch.Tensor) else eps == 0
        if all_zero or len(x0) == 0:
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


def _prepare(
    model: Model, x: torch.Tensor, y: torch.Tensor, device: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    """Validate inputs and move them to the compute device (default: x's device)."""
    x0, y0 = _check_inputs(x, y)
    dev = _resolve_device(x, device)
    _check_model_device(model, dev)
    return x0.to(dev), y0.to(dev), dev


# --------------------------------------------------------------------------------------------
# multi-target PGD (002 Table 1)
# --------------------------------------------------------------------------------------------


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
) -> torch.Tensor:
    """Targeted PGD toward each wrong class; per-example worst case (the multi-target attack of 002 Table 1).

    Targets: every class j != y (``num_targets=None``), or the ``num_targets`` most likely wrong
    classes under the clean logits. An example counts as fooled as soon as it is misclassified
    (any wrong class), and stays fooled; targets are tried in decreasing clean-logit order.
    """
    eps = _check_eps(eps)
    steps = _check_int(steps, "steps", 0)
    norm, loss = _norm_name(norm), _loss_name(loss)
    if step_size is None:
        step_size = 2.5 * eps / steps if steps else 0.0
    step_size = _check_eps(step_size, "step_size")
    x0, y0, dev = _prepare(model, x, y, device)
    with _attack_mode(model), torch.no_grad():
        if len(x0) == 0:
            return x.detach().clone()
        z0 = model(x0)
        k = _check_logits(z0, y0, len(x0))
        n_t = k - 1 if num_targets is None else _check_int(num_targets, "num_targets", 1)
        n_t = min(n_t, k - 1)
        if eps == 0:
            return x.detach().clone()
        order = z0.scatter(1, y0[:, None], float("-inf")).argsort(dim=1, descending=True)[:, :n_t]
        gen = torch.Generator().manual_seed(int(seed))
        succ0 = z0.argmax(dim=1) != y0
        best = (x0.clone(), succ0, _objective(z0, y0, None, loss))
        for t in range(n_t):
            best = _pgd_restarts(model, x0, y0, eps, steps, step_size, norm, loss, random_start, 1, early_stop,
                                 order[:, t], gen, success_vs_label=True, best=best)
    return best[0].to(x.device)


# --------------------------------------------------------------------------------------------
# Carlini–Wagner L2
# --------------------------------------------------------------------------------------------


def cw_l2(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 1000,
    lr: float = 0.01,
    initial_const: float = 1e-3,
    binary_search_steps: int = 9,
    confidence: float = 0.0,
    abort_early: bool = True,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Carlini–Wagner L2 attack (Carlini & Wagner 2017, §V.A, their eq. for f_6 with the tanh box).

    minimise ||x' - x||_2^2 + c * max(z_y - max_{j!=y} z_j + confidence, 0) over
    x' = (tanh(w) + 1)/2 with Adam; a per-example binary search over c (x10 until a first
    success). Returns, per example, the smallest-L2 adversarial found; examples for which none
    was found are returned unchanged, as are inputs the model already misclassifies (distance 0).
    ``abort_early`` stops a binary-search step when the total loss stalls (checked every steps/10).
    """
    steps = _check_int(steps, "steps", 0)
    binary_search_steps = _check_int(binary_search_steps, "binary_search_steps", 1)
    lr = _check_eps(lr, "lr")
    initial_const = _check_eps(initial_const, "initial_const")
    confidence = _check_eps(confidence, "confidence")
    x0, y0, dev = _prepare(model, x, y, device)
    with _attack_mode(model), torch.no_grad():
        if len(x0) == 0:
            return x.detach().clone()
        z0 = model(x0)
        _check_logits(z0, y0, len(x0))
        best = x0.clone()
        todo = (z0.argmax(dim=1) == y0).nonzero().squeeze(1)
        if todo.numel() == 0 or steps == 0:
            return best.to(x.device)
        xs, ys = x0[todo], y0[todo]
        n, ndim = xs.shape[0], xs.ndim
        # tanh change of variables; the 0.999999 keeps atanh finite at the box's faces.
        w0 = torch.atanh((xs * 2 - 1).clamp(-1, 1) * 0.999999)
        lower = torch.zeros(n, device=dev)
        upper = torch.full((n,), float("inf"), device=dev)
        const = torch.full((n,), initial_const, device=dev)
        best_l2 = torch.full((n,), float("inf"), device=dev)
        best_x = xs.clone()
        check_every = max(steps // 10, 1)
        for bs in range(binary_search_steps):
            if binary_search_steps >= 10 and bs == binary_search_steps - 1:
                const = torch.where(torch.isinf(upper), const, upper)  # CW: last round at the upper bound
            delta = torch.zeros_like(w0)
            m = torch.zeros_like(w0)
            v = torch.zeros_like(w0)
            found = torch.zeros(n, dtype=torch.bool, device=dev)
            prev = float("inf")
            for it in range(steps):
                wd = (w0 + delta).requires_grad_(True)
                with torch.enable_grad():
                    xa = (torch.tanh(wd) + 1) / 2
                    z = model(xa)
                    l2sq = (xa - xs).flatten(1).pow(2).sum(dim=1)
                    gap = _margin_gap(z, ys)  # > confidence  <=>  adversarial with confidence
                    f = (confidence - gap).clamp_min(0)
                    total = l2sq + const * f
                    (g,) = torch.autograd.grad(total.sum(), wd)
                xa = xa.detach()
                succ = gap.detach() > confidence
                dist = l2sq.detach().sqrt()
                improved = succ & (dist < best_l2)
                best_l2 = torch.where(improved, dist, best_l2)
                best_x = torch.where(_bview(improved, ndim), xa, best_x)
                found |= succ
                # Adam (Kingma & Ba) on the tanh-space perturbation, elementwise, so examples are independent.
                t = it + 1
                m.mul_(0.9).add_(g, alpha=0.1)
                v.mul_(0.999).addcmul_(g, g, value=0.001)
                mhat = m / (1 - 0.9**t)
                vhat = v / (1 - 0.999**t)
                delta = delta - lr * mhat / (vhat.sqrt() + 1e-8)
                if abort_early and it % check_every == 0:
                    current = float(total.detach().sum())  # one host sync per steps/10
                    if current > prev * 0.9999:
                        break
                    prev = current
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            const = torch.where(torch.isinf(upper), const * 10, (lower + upper) / 2)
        best[todo] = best_x.clamp(0, 1)
    return best.to(x.device)


# --------------------------------------------------------------------------------------------
# DeepFool
# --------------------------------------------------------------------------------------------


def _sync_step(k: int) -> bool:
    """Steps at which DeepFool checks (with one host sync) whether every example is done.

    DeepFool usually converges in 2-4 steps; checking early and then every 4th step bounds the
    wasted work to 3 steps without a sync in every iteration.
    """
    return k < 4 or k % 4 == 3


def deepfool(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 50,
    overshoot: float = 0.02,
    norm: str = "l2",
    candidates: int | None = 10,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Multiclass DeepFool (Moosavi-Dezfooli et al. 2016, Alg. 2; L2 and its Linf variant eq. 11-12).

    At every step, among the ``candidates`` most likely classes k (clean logits), linearise
    g_k = z_k - z_y and step to the nearest linearised boundary: distance |g_k| / ||grad g_k||_q
    (q = 2 for L2, q = 1 for Linf); the accumulated perturbation is scaled by (1 + overshoot)
    and the point clipped to [0, 1]. Examples already misclassified are frozen (misclassified
    inputs are returned unchanged). The returned point may be non-adversarial if ``steps`` ran out.
    """
    steps = _check_int(steps, "steps", 0)
    overshoot = _check_eps(overshoot, "overshoot")
    norm = _norm_name(norm)
    x0, y0, dev = _prepare(model, x, y, device)
    with _attack_mode(model), torch.no_grad():
        if len(x0) == 0:
            return x.detach().clone()
        z0 = model(x0)
        k = _check_logits(z0, y0, len(x0))
        nc = k if candidates is None else _check_int(candidates, "candidates", 2)
        nc = min(nc, k)
        others = z0.scatter(1, y0[:, None], float("-inf")).argsort(dim=1, descending=True)[:, : nc - 1]
        n, ndim = x0.shape[0], x0.ndim
        rows = torch.arange(n, device=dev)
        x_adv = x0.clone()
        p_total = torch.zeros_like(x0)
        active = z0.argmax(dim=1) == y0
        for it in range(steps):
            xa = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                z = model(xa)
                grads, gaps = [], []
                for j in range(nc - 1):
                    cls = others[:, j]
                    gk = z[rows, cls] - z[rows, y0]
                    (g,) = torch.autograd.grad(gk.sum(), xa, retain_graph=j < nc - 2)
                    grads.append(g)
                    gaps.append(gk.detach())
            active = active & (z.detach().argmax(dim=1) == y0)
            if _sync_step(it) and not bool(active.any()):
                break
            gaps_t = torch.stack(gaps, dim=1)  # (N, C-1), negative while correctly classified
            grads_t = torch.stack(grads, dim=1)  # (N, C-1, ...)
            gn = grads_t.flatten(2).abs().sum(dim=2) if norm == "linf" else grads_t.flatten(2).norm(dim=2)
            dist = gaps_t.abs() / (gn + 1e-8)
            best = dist.argmin(dim=1)
            d = dist[rows, best] + 1e-4  # a hair past the linearised boundary, for numerical stability
            g = grads_t[rows, best]
            if norm == "linf":
                step = _bview(d, ndim) * g.sign()
            else:
                step = _bview(d / (gn[rows, best] + 1e-8), ndim) * g
            p_total = p_total + step * _bview(active, ndim)
            x_new = (x0 + (1 + overshoot) * p_total).clamp(0, 1)
            x_adv = torch.where(_bview(active, ndim), x_new, x_adv)
    return x_adv.to(x.device)


# --------------------------------------------------------------------------------------------
# minimal perturbations, accuracy curves
# --------------------------------------------------------------------------------------------


def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Per-example ||x_adv - x|| in the given norm (float64 for stable comparisons)."""
    norm = _norm_name(norm)
    if x.shape != x_adv.shape:
        raise ValueError(f"x_adv has shape {tuple(x_adv.shape)}, x has shape {tuple(x.shape)}")
    return _flat_norm(x_adv.detach().double() - x.detach().to(x_adv.device).double(), norm)


def in_ball(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str = "linf") -> torch.Tensor:
    """Per-example bool: x_adv within the eps-ball around x (float32 slack) and inside [0, 1]."""
    eps = _check_eps(eps)
    dist = perturbation_norms(x, x_adv, norm)
    box = (x_adv.flatten(1) >= 0).all(dim=1) & (x_adv.flatten(1) <= 1).all(dim=1)
    return (dist <= eps * (1 + _BALL_RTOL) + _BALL_ATOL) & box


def assert_in_ball(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str = "linf") -> None:
    """Raise AssertionError (also under ``python -O``) unless every x_adv is in the ball and in [0, 1]."""
    ok = in_ball(x, x_adv, eps, norm)
    if not bool(ok.all()):
        bad = (~ok).nonzero().squeeze(1)[:5].tolist()
        worst = float(perturbation_norms(x, x_adv, norm).max())
        raise AssertionError(
            f"attack output outside the {norm} ball of radius {eps} or [0, 1] for examples {bad} "
            f"(largest distortion {worst:.6g}, range [{float(x_adv.min()):.4g}, {float(x_adv.max()):.4g}])"
        )


_MIN_METHODS = ("deepfool", "cw")


def minimal_perturbation(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "l2",
    methods: Sequence[str | Callable[..., torch.Tensor]] = ("deepfool", "cw"),
    return_points: bool = False,
    device: str | torch.device | None = None,
    **kw: dict[str, Any],
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Smallest successful distortion per example over minimal-perturbation attacks.

    ``methods``: "deepfool", "cw" (L2 only) or callables ``attack(model, x, y) -> x_adv``; options
    per method as keyword dicts, e.g. ``cw=dict(steps=200), deepfool=dict(overshoot=0.02)``.
    Returns float64 distances (N,) in ``norm``: 0 where the model already misclassifies x, inf
    where no method found an adversarial. With ``return_points`` also the points (x where inf).
    """
    norm = _norm_name(norm)
    names = [m for m in methods if isinstance(m, str)]
    unknown = [m for m in names if m not in _MIN_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be non-empty, from {_MIN_METHODS} or callables; got {list(methods)}")
    if "cw" in names and norm != "l2":
        raise ValueError("the CW attack here is L2 only; use methods=('deepfool',) for norm='linf'")
    bad_kw = [key for key in kw if key not in names]
    if bad_kw:
        raise ValueError(f"options given for methods not run: {bad_kw}")
    x0, y0, dev = _prepare(model, x, y, device)
    n = x0.shape[0]
    dist = torch.full((n,), float("inf"), dtype=torch.float64, device=dev)
    points = x0.clone()
    with _attack_mode(model), torch.no_grad():
        z0 = model(x0) if n else torch.zeros(0, 2, device=dev)
        _check_logits(z0, y0, n)
        wrong = z0.argmax(dim=1) != y0 if n else torch.zeros(0, dtype=torch.bool, device=dev)
    dist[wrong] = 0.0
    for method in methods:
        if method == "deepfool":
            xa = deepfool(model, x0, y0, norm=norm, **kw.get("deepfool", {}))
        elif method == "cw":
            xa = cw_l2(model, x0, y0, **kw.get("cw", {}))
        else:
            xa = method(model, x0, y0)
        with _attack_mode(model), torch.no_grad():
            fooled = model(xa).argmax(dim=1) != y0
        d = perturbation_norms(x0, xa, norm)
        better = fooled & (d < dist)
        dist = torch.where(better, d, dist)
        points = torch.where(_bview(better, x0.ndim), xa, points)
    dist = dist.to(x.device)
    if return_points:
        return dist, points.to(x.device)
    return dist


def correct(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Per-example correctness: bool (N,) with argmax model(x) == y, on x's device.

    The model runs in ``eval()`` under no_grad (every submodule's mode restored after), in chunks of
    ``batch_size`` on ``device`` (default: the device of the model's parameters, else x's device).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.ndim < 2:
        raise ValueError("x must be a batch tensor (N, ...) and y a tensor of labels (N,)")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) matching x, got {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels must be integer class indices (int64), got dtype {y.dtype}")
    batch_size = _check_int(batch_size, "batch_size", 1)
    if device is None:
        p = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
        dev = p.device if p is not None else x.device
    else:
        dev = torch.device(device)
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    out = []
    with _attack_mode(model), torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            z = model(x[i : i + batch_size].detach().to(dev))
            yb = y[i : i + batch_size].to(device=z.device, dtype=torch.long)
            _check_logits(z, yb, yb.shape[0])
            out.append((z.argmax(dim=1) == yb).to(x.device))
    return torch.cat(out)


def _accuracy(model: Model, x: torch.Tensor, y: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """Per-example correctness (bool) under eval()."""
    with _attack_mode(model), torch.no_grad():
        return _predict(model, x, batch_size).argmax(dim=1) == y


def _infer_norm(attack: Any) -> str | None:
    """The norm an attack partial was bound to (pgd/fgsm/multi_target default to Linf), else None."""
    if isinstance(attack, functools.partial):
        if "norm" in attack.keywords:
            return _norm_name(attack.keywords["norm"])
        if attack.func in (pgd, fgsm, multi_target):
            return "linf"
    return None


def robust_accuracy(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack,
    epsilons: Sequence[float],
    batch_size: int | None = None,
    norm: str | None = None,
    nested: bool = True,
) -> list[float]:
    """Accuracy under ``attack(model, x, y, eps) -> x_adv`` for each eps (fractions in [0, 1]).

    An example counts as robust if it is classified correctly on x AND on x_adv (the per-example
    worst case including the clean point). eps == 0 gives the clean accuracy without calling the
    attack. Every x_adv is checked to lie in the eps-ball and [0, 1]: in ``norm`` if given or bound
    in a ``functools.partial``, else in the Linf ball (which contains the L2 ball of equal radius).

    ``nested=True`` (default): the eps-balls are nested, so an adversarial example found at a
    smaller radius is one at every larger radius too; an example broken at some eps stays broken
    at all larger eps, and only the examples still robust are attacked at the next radius (cheaper,
    and never weaker). ``nested=False`` attacks every example afresh at each eps — the raw curve,
    whose monotonicity is a diagnostic of the attack itself (DESIGN §6).
    """
    x0, y0 = _check_inputs(x, y)
    eps_list = [_check_eps(e) for e in epsilons]
    check_norm = _norm_name(norm) if norm is not None else (_infer_norm(attack) or "linf")
    if batch_size is not None:
        batch_size = _check_int(batch_size, "batch_size", 1)
    n = x0.shape[0]
    if n == 0:
        raise ValueError("robust_accuracy needs a non-empty batch")
    with _attack_mode(model), torch.no_grad():
        _check_logits(model(x0[:1]), y0, 1)
    clean = _accuracy(model, x0, y0, batch_size)
    chunk = n if batch_size is None else batch_size
    result: dict[int, float] = {}
    survivors = clean.clone()  # nested: robust at every radius attacked so far
    order = sorted(range(len(eps_list)), key=lambda k: eps_list[k]) if nested else range(len(eps_list))
    for k in order:
        eps = eps_list[k]
        if eps == 0:
            result[k] = float(clean.double().mean())
            continue
        robust = survivors.clone() if nested else clean.clone()
        idx = robust.nonzero().flatten()  # misclassified or already-broken examples need no attack
        for i in range(0, idx.numel(), chunk):
            sel = idx[i : i + chunk]
            xb, yb = x0[sel], y0[sel]
            xa = attack(model, xb, yb, eps)
            if not isinstance(xa, torch.Tensor) or xa.shape != xb.shape:
                raise ValueError(f"the attack must return a tensor of shape {tuple(xb.shape)}")
            assert_in_ball(xb, xa, eps, check_norm)
            robust[sel] &= _accuracy(model, xa.to(xb.device), yb, batch_size)
        if nested:
            survivors = robust
        result[k] = float(robust.double().mean())
    return [result[k] for k in range(len(eps_list))]


def accuracy_at_distances(distances: torch.Tensor | Sequence[float], epsilons: Sequence[float]) -> list[float]:
    """Fraction of examples whose minimal adversarial distance exceeds eps (distance 0 = wrong at every eps)."""
    d = torch.as_tensor(distances, dtype=torch.float64).flatten()
    if d.numel() == 0:
        raise ValueError("distances is empty")
    if bool(torch.isnan(d).any()) or bool((d < 0).any()):
        raise ValueError("distances must be >= 0 and not NaN (inf = no adversarial found)")
    return [float((d > _check_eps(e)).double().mean()) for e in epsilons]


def worst_case_accuracy(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    adversarials: Sequence[torch.Tensor],
    batch_size: int | None = None,
) -> float:
    """Per-example worst case over attacks (DESIGN §6): correct only if correct on x and on every x_adv."""
    x0, y0 = _check_inputs(x, y)
    correct = _accuracy(model, x0, y0, batch_size)
    for xa in adversarials:
        if not isinstance(xa, torch.Tensor) or xa.shape != x0.shape:
            raise ValueError(f"every adversarial batch must have the shape of x, {tuple(x0.shape)}")
        correct &= _accuracy(model, xa.detach().to(x0.device), y0, batch_size)
    return float(correct.double().mean())


# --------------------------------------------------------------------------------------------
# DESIGN §6 sanity rules
# --------------------------------------------------------------------------------------------


def _curve(values: Sequence[float], n: int, name: str) -> list[float]:
    vals = [float(v) for v in values]
    if len(vals) != n:
        raise ValueError(f"{name} has {len(vals)} values but epsilons has {n}")
    return vals


def sanity_report(
    epsilons: Sequence[float],
    accuracies: Sequence[float],
    *,
    clean: float | None = None,
    unbounded: float | None = None,
    median_distortion: float | None = None,
    stronger: Sequence[Sequence[float]] | None = None,
    single_step: Sequence[float] | None = None,
    transfer: Sequence[float] | None = None,
    tol: float = 0.02,
    unbounded_tol: float = 0.0,
    label: str = "attack",
) -> dict[str, Any]:
    """Evaluate the DESIGN §6 rules on accuracy curves (fractions); never raises on a failed rule.

    * ``monotone``: accuracy non-increasing in eps (within ``tol``);
    * ``eps0_is_clean``: the eps=0 point equals ``clean`` (to 1e-6);
    * ``unbounded_zero``: the unbounded attack's accuracy ``unbounded`` <= ``unbounded_tol``
      (report ``median_distortion`` with it: it is put in the message);
    * ``more_effort_not_higher``: each curve in ``stronger`` (more steps / restarts, same eps) is
      <= ``accuracies`` + tol pointwise;
    * ``iterative_beats_single_step``: ``accuracies`` <= ``single_step`` + tol pointwise;
    * ``whitebox_beats_transfer``: ``accuracies`` <= ``transfer`` + tol pointwise.

    Returns {rule: bool for each rule that could be checked, "ok": all of them, "message": str}.
    """
    eps = [float(e) for e in epsilons]
    acc = _curve(accuracies, len(eps), "accuracies")
    if not eps:
        raise ValueError("epsilons is empty")
    report: dict[str, Any] = {}
    notes: list[str] = []
    order = sorted(range(len(eps)), key=lambda i: eps[i])
    s_acc = [acc[i] for i in order]
    rises = [(eps[order[i + 1]], s_acc[i + 1] - s_acc[i])
             for i in range(len(s_acc) - 1) if s_acc[i + 1] > s_acc[i] + tol]
    report["monotone"] = not rises
    if rises:
        notes.append(f"accuracy rises with eps at {rises}")
    if clean is not None:
        zero = [acc[i] for i in range(len(eps)) if eps[i] == 0]
        if zero:
            report["eps0_is_clean"] = all(abs(a - float(clean)) <= 1e-6 for a in zero)  # float32 vs float64 means
            if not report["eps0_is_clean"]:
                notes.append(f"eps=0 accuracy {zero[0]:.4f} != clean {float(clean):.4f}")
    if unbounded is not None:
        report["unbounded_zero"] = float(unbounded) <= unbounded_tol
        med = "" if median_distortion is None else f", median distortion {float(median_distortion):.4g}"
        notes.append(f"unbounded {label}: accuracy {float(unbounded):.4f}{med}")
    for name, curve, rule in (
        ("more_effort_not_higher", stronger, "stronger"),
        ("iterative_beats_single_step", [single_step] if single_step is not None else None, "single-step"),
        ("whitebox_beats_transfer", [transfer] if transfer is not None else None, "transfer"),
    ):
        if curve is None:
            continue
        ok = True
        for c in curve:
            c = _curve(c, len(eps), name)
            if rule == "stronger":  # the stronger attack must not be the higher one
                lo, hi = c, acc
            else:  # our white-box iterative curve must not be above the weaker attack's
                lo, hi = acc, c
            viol = [(eps[i], lo[i], hi[i]) for i in range(len(eps)) if lo[i] > hi[i] + tol]
            if viol:
                ok = False
                notes.append(f"{name} violated at (eps, acc, reference) {viol}")
        report[name] = ok
    rules = [k for k in report]
    report["ok"] = all(report[k] for k in rules)
    head = f"{label}: §6 sanity {'OK' if report['ok'] else 'FAILED'} ({', '.join(rules)})"
    report["message"] = "; ".join([head, *notes])
    return report


def check_sanity(*args: Any, strict: bool = True, **kwargs: Any) -> dict[str, Any]:
    """``sanity_report`` that raises AssertionError with its message when a rule fails (unless strict=False)."""
    report = sanity_report(*args, **kwargs)
    if strict and not report["ok"]:
        raise AssertionError(report["message"])
    return report


def assert_sanity(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Raise AssertionError with details unless every checkable DESIGN §6 rule holds; returns the report."""
    return check_sanity(*args, strict=True, **kwargs)
