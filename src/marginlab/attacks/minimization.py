"""Minimisation attacks: Carlini–Wagner L2, DeepFool, and the per-example smallest perturbation over them.

Carlini & Wagner 2017 (§V.A, the f_6 objective with the tanh box); Moosavi-Dezfooli et al. 2016
(DeepFool, Alg. 2, and its Linf variant, eq. 11-12).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import threads
from ._validation import (
    Model,
    _attack_mode,
    _bview,
    _check_eps,
    _check_int,
    _check_logits,
    _margin_gap,
    _norm_name,
    _predict,
    _prepare,
    perturbation_norms,
)
from .base import DEFAULT_BATCH_SIZE, Batch, MinimizationAttack

__all__ = ["CarliniWagnerL2", "DeepFool", "cw_l2", "deepfool", "minimal_perturbation"]


class CarliniWagnerL2(MinimizationAttack):
    """Carlini–Wagner L2 attack (Carlini & Wagner 2017, §V.A, their f_6 with the tanh box).

    minimise ||x' - x||_2^2 + c * max(z_y - max_{j!=y} z_j + confidence, 0) over
    x' = (tanh(w) + 1)/2 with Adam; a per-example binary search over c (x10 until a first
    success). Returns, per example, the smallest-L2 adversarial found; examples for which none
    was found are returned unchanged, as are inputs the model already misclassifies (distance 0).
    ``abort_early`` stops a binary-search step when the total loss stalls (checked every steps/10).
    """

    def __init__(self, steps: int = 1000, lr: float = 0.01, initial_const: float = 1e-3,
                 binary_search_steps: int = 9, confidence: float = 0.0, abort_early: bool = True, *,
                 batch_size: int | None = None, device: str | torch.device | None = None) -> None:
        super().__init__(norm="l2", batch_size=batch_size, device=device)
        self.steps = _check_int(steps, "steps", 0)
        self.binary_search_steps = _check_int(binary_search_steps, "binary_search_steps", 1)
        self.lr = _check_eps(lr, "lr")
        self.initial_const = _check_eps(initial_const, "initial_const")
        self.confidence = _check_eps(confidence, "confidence")
        self.abort_early = bool(abort_early)

    def _run(self, model: Model, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        z0 = model(x)
        best = x.clone()
        todo = (z0.argmax(dim=1) == y).nonzero().squeeze(1)
        if todo.numel() == 0 or self.steps == 0:
            return best
        xs, ys = x[todo], y[todo]
        n, ndim = xs.shape[0], xs.ndim
        # tanh change of variables; the 0.999999 keeps atanh finite at the box's faces.
        w0 = torch.atanh((xs * 2 - 1).clamp(-1, 1) * 0.999999)
        lower = torch.zeros(n, device=x.device)
        upper = torch.full((n,), float("inf"), device=x.device)
        const = torch.full((n,), self.initial_const, device=x.device)
        best_l2 = torch.full((n,), float("inf"), device=x.device)
        best_x = xs.clone()
        check_every = max(self.steps // 10, 1)
        for bs in range(self.binary_search_steps):
            if self.binary_search_steps >= 10 and bs == self.binary_search_steps - 1:
                const = torch.where(torch.isinf(upper), const, upper)  # CW: last round at the upper bound
            delta = torch.zeros_like(w0)
            m = torch.zeros_like(w0)
            v = torch.zeros_like(w0)
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            prev = float("inf")
            for it in range(self.steps):
                threads.balance()
                wd = (w0 + delta).requires_grad_(True)
                with torch.enable_grad():
                    xa = (torch.tanh(wd) + 1) / 2
                    z = model(xa)
                    l2sq = (xa - xs).flatten(1).pow(2).sum(dim=1)
                    gap = _margin_gap(z, ys)  # > confidence  <=>  adversarial with that confidence
                    f = (self.confidence - gap).clamp_min(0)
                    total = l2sq + const * f
                    (g,) = torch.autograd.grad(total.sum(), wd)
                xa = xa.detach()
                succ = gap.detach() > self.confidence
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
                delta = delta - self.lr * mhat / (vhat.sqrt() + 1e-8)
                if self.abort_early and it % check_every == 0:
                    current = float(total.detach().sum())  # one host sync per steps/10
                    if current > prev * 0.9999:
                        break
                    prev = current
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            const = torch.where(torch.isinf(upper), const * 10, (lower + upper) / 2)
        best[todo] = best_x.clamp(0, 1)
        return best


def _sync_step(k: int) -> bool:
    """Steps at which DeepFool checks (with one host sync) whether every example is done.

    DeepFool usually converges in 2-4 steps; checking early and then every 4th step bounds the
    wasted work to 3 steps without a sync in every iteration.
    """
    return k < 4 or k % 4 == 3


class DeepFool(MinimizationAttack):
    """Multiclass DeepFool (Moosavi-Dezfooli et al. 2016, Alg. 2; L2 and its Linf variant eq. 11-12).

    At every step, among the ``candidates`` most likely classes k (clean logits), linearise
    g_k = z_k - z_y and step to the nearest linearised boundary: distance |g_k| / ||grad g_k||_q
    (q = 2 for L2, q = 1 for Linf); the accumulated perturbation is scaled by (1 + overshoot)
    and the point clipped to [0, 1]. Examples already misclassified are frozen (misclassified
    inputs are returned unchanged). The returned point may be non-adversarial if ``steps`` ran out.
    """

    def __init__(self, steps: int = 50, overshoot: float = 0.02, norm: str = "l2", candidates: int | None = 10, *,
                 batch_size: int | None = None, device: str | torch.device | None = None) -> None:
        super().__init__(norm=norm, batch_size=batch_size, device=device)
        self.steps = _check_int(steps, "steps", 0)
        self.overshoot = _check_eps(overshoot, "overshoot")
        self.candidates = None if candidates is None else _check_int(candidates, "candidates", 2)

    def _run(self, model: Model, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        z0 = model(x)
        k = batch.num_classes
        nc = min(k if self.candidates is None else self.candidates, k)
        others = z0.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)[:, : nc - 1]
        n, ndim = x.shape[0], x.ndim
        rows = torch.arange(n, device=x.device)
        x_adv = x.clone()
        p_total = torch.zeros_like(x)
        active = z0.argmax(dim=1) == y
        for it in range(self.steps):
            threads.balance()
            xa = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                z = model(xa)
                grads, gaps = [], []
                for j in range(nc - 1):
                    cls = others[:, j]
                    gk = z[rows, cls] - z[rows, y]
                    (g,) = torch.autograd.grad(gk.sum(), xa, retain_graph=j < nc - 2)
                    grads.append(g)
                    gaps.append(gk.detach())
            active = active & (z.detach().argmax(dim=1) == y)
            if _sync_step(it) and not bool(active.any()):
                break
            gaps_t = torch.stack(gaps, dim=1)  # (N, C-1), negative while correctly classified
            grads_t = torch.stack(grads, dim=1)  # (N, C-1, ...)
            gn = grads_t.flatten(2).abs().sum(dim=2) if self.norm == "linf" else grads_t.flatten(2).norm(dim=2)
            dist = gaps_t.abs() / (gn + 1e-8)
            best = dist.argmin(dim=1)
            d = dist[rows, best] + 1e-4  # a hair past the linearised boundary, for numerical stability
            g = grads_t[rows, best]
            if self.norm == "linf":
                step = _bview(d, ndim) * g.sign()
            else:
                step = _bview(d / (gn[rows, best] + 1e-8), ndim) * g
            p_total = p_total + step * _bview(active, ndim)
            x_new = (x + (1 + self.overshoot) * p_total).clamp(0, 1)
            x_adv = torch.where(_bview(active, ndim), x_new, x_adv)
        return x_adv


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
    batch_size: int | None = None,
) -> torch.Tensor:
    """:class:`CarliniWagnerL2` as a function (Carlini & Wagner 2017); the result is on x's device."""
    return CarliniWagnerL2(steps, lr, initial_const, binary_search_steps, confidence, abort_early,
                           batch_size=batch_size, device=device)(model, x, y)


def deepfool(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 50,
    overshoot: float = 0.02,
    norm: str = "l2",
    candidates: int | None = 10,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """:class:`DeepFool` as a function (Moosavi-Dezfooli et al. 2016); the result is on x's device."""
    return DeepFool(steps, overshoot, norm, candidates, batch_size=batch_size, device=device)(model, x, y)


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
        z0 = _predict(model, x0, DEFAULT_BATCH_SIZE) if n else torch.zeros(0, 2, device=dev)
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
            xa = xa.to(dev)
            fooled = _predict(model, xa, DEFAULT_BATCH_SIZE).argmax(dim=1) != y0
        d = perturbation_norms(x0, xa, norm)
        better = fooled & (d < dist)
        dist = torch.where(better, d, dist)
        points = torch.where(_bview(better, x0.ndim), xa, points)
    dist = dist.to(x.device)
    if return_points:
        return dist, points.to(x.device)
    return dist


