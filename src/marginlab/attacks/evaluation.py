"""Robust accuracy, worst cases over attacks, and the sanity rules of DESIGN §6.

An example counts as robust only if it is classified correctly on x AND on every adversarial
point run against it (the per-example worst case, including the clean point).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._validation import (
    Model,
    _attack_mode,
    _check_eps,
    _check_inputs,
    _check_int,
    _check_logits,
    _norm_name,
    _predict,
    _resolve_device,
    assert_in_ball,
)
from .base import DEFAULT_BATCH_SIZE
from .gradient import fgsm, multi_target, pgd

__all__ = [
    "accuracy_at_distances",
    "assert_sanity",
    "check_sanity",
    "correct",
    "robust_accuracy",
    "sanity_report",
    "worst_case_accuracy",
]

Attack = Callable[[Model, torch.Tensor, torch.Tensor, float], torch.Tensor]


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
    dev = _resolve_device(model, x, device)
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
    """Per-example correctness (bool, on x's device) under eval(), computed on the model's device in chunks."""
    dev = _resolve_device(model, x)
    bs = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    with _attack_mode(model), torch.no_grad():
        return torch.cat([(_predict(model, x[i : i + bs].to(dev)).argmax(dim=1) == y[i : i + bs].to(dev)).to(x.device)
                          for i in range(0, x.shape[0], bs)])


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
        _check_logits(model(x0[:1].to(_resolve_device(model, x0))), y0, 1)
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
            robust[sel] &= _accuracy(model, xa.detach().to(xb.device), yb, batch_size)
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
