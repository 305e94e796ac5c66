"""FAB, the fast adaptive boundary attack (Croce & Hein 2020b, ICML, "Minimally distorted adversarial
examples with a fast adaptive boundary attack"), Linf and L2, untargeted and targeted (FAB-T).

Each step linearises the decision function f(z) = z_k - z_y of the chosen class k (targeted: the
target; untargeted: the class whose linearised boundary is nearest, |f_k| / ||grad f_k||_q with q the
dual norm) at the current iterate x_i, projects both x_i and the original point x onto that
hyperplane within the box [0, 1] (smallest-norm projections d_i and d_0), and moves to the convex
combination (1 - a)(x_i + eta d_i) + a (x + eta d_0) with a = min(|d_i| / (|d_i| + |d_0|), alpha_max)
(their eq. 8-9): biased toward the original point, so the iterates stay close to it. When an iterate
is adversarial it is recorded if closer than the best so far and pulled back toward x:
x_i <- x + beta (x_i - x). Defaults as in AutoAttack: alpha_max = 0.1, eta = 1.05, beta = 0.9,
100 iterations, and for FAB-T 9 target classes (the most likely wrong ones), 1 restart each.
Semantics checked against the authors' reference implementation (github.com/fra31/auto-attack).

Box-constrained projection onto {d : w.d = r, 0 <= p + d <= 1} (our derivation): with r >= 0 (flip
w otherwise) and c_i the room to the box face in the direction sign(w_i), the KKT conditions give
Linf: d_i = sign(w_i) min(s, c_i) with s solving sum_i |w_i| min(s, c_i) = r;
L2:   d_i = sign(w_i) min(s |w_i|, c_i) with s solving sum_i w_i^2 min(s, c_i / |w_i|) = r.
Both are g(s) = sum_i a_i min(s, h_i) = r, piecewise linear and non-decreasing in s, solved exactly
by sorting the breakpoints h_i (O(d log d) per row, no iteration). If r is out of reach inside the
box, the box corner in that direction is returned (then the step is clamped to [0, 1] anyway).

As a fixed-eps attack (:class:`FAB`), an example counts as fooled once an adversarial point within
eps is found; it is then dropped from the working batch (further iterations would only shrink a
distance already below eps). Success needs the distance <= eps, as in AutoAttack.
"""
from __future__ import annotations

import torch

from .. import threads
from ._validation import (
    Model,
    _bview,
    _check_eps,
    _check_int,
    _flat_norm,
    _scale,
    _take,
)
from .base import Batch, FixedEpsilonAttack

__all__ = ["FAB", "fab", "project_hyperplane_box"]

# FAB: how often (iterations) the examples fooled within eps are dropped from the working set (one sync each).
_COMPACT_EVERY = 10


def project_hyperplane_box(p: torch.Tensor, w: torch.Tensor, r: torch.Tensor, norm: str) -> torch.Tensor:
    """Smallest Linf/L2 d with w.d = r and p + d in [0, 1], per row of p, w (M, D), r (M,) (see module doc)."""
    sign_r = torch.where(r >= 0, 1.0, -1.0).to(w.dtype)
    ws = w * sign_r[:, None]
    rr = r.abs()
    absw = ws.abs()
    cap = torch.where(ws > 0, 1 - p, p).clamp_min(0)
    if norm == "linf":
        a, h = absw, cap
    else:
        a, h = absw * absw, torch.where(absw > 0, cap / absw.clamp_min(1e-30), torch.zeros_like(cap))
    hs, order = h.sort(dim=1)
    a_s = a.gather(1, order)
    cum_ah, cum_a = (a_s * hs).cumsum(dim=1), a_s.cumsum(dim=1)
    total = cum_a[:, -1:]
    g_at_break = cum_ah + hs * (total - cum_a)
    k = (g_at_break < rr[:, None]).sum(dim=1)  # first breakpoint reaching r; D: out of reach
    km1 = (k - 1).clamp_min(0)[:, None]
    before_ah = torch.where(k > 0, cum_ah.gather(1, km1).squeeze(1), torch.zeros_like(rr))
    before_a = torch.where(k > 0, cum_a.gather(1, km1).squeeze(1), torch.zeros_like(rr))
    s = (rr - before_ah) / (total.squeeze(1) - before_a).clamp_min(1e-30)
    s = torch.where(k >= w.shape[1], torch.full_like(s, float("inf")), s)
    s = s[:, None]
    if norm == "linf":
        mag = torch.minimum(s, cap)
    else:  # out of reach s = inf, and inf * 0 would be NaN on zero-weight coordinates: those do not move
        mag = torch.where(absw > 0, torch.minimum(s * absw, cap), torch.zeros_like(cap))
    return torch.sign(ws) * mag


def _boundary(model: Model, x1: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, norm: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, grad f) of the linearised boundary to cross: f = z_t - z_y (targeted) or the nearest class's."""
    xa = x1.detach().requires_grad_(True)
    with torch.enable_grad():
        z = model(xa)
        zy = z.gather(1, y[:, None]).squeeze(1)
        if target is not None:
            f = z.gather(1, target[:, None]).squeeze(1) - zy
            (g,) = torch.autograd.grad(f.sum(), xa)
            return f.detach(), g
        k = z.shape[1]
        grads = [torch.autograd.grad(z[:, j].sum(), xa, retain_graph=j < k - 1)[0] for j in range(k)]
    z = z.detach()
    g_all = torch.stack(grads, dim=1)  # (N, K, ...)
    rows = torch.arange(x1.shape[0], device=x1.device)
    f_all = z - z[rows, y][:, None]
    dg = (g_all - g_all[rows, y][:, None]).flatten(2)
    dual = dg.abs().sum(dim=2) if norm == "linf" else dg.norm(dim=2)
    dist = f_all.abs() / (dual + 1e-12)
    dist[rows, y] = float("inf")
    best = dist.argmin(dim=1)
    return f_all[rows, best], (g_all[rows, best] - g_all[rows, y])


def _fab_run(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, norm: str, n_iter: int,
             target: torch.Tensor | None, start: torch.Tensor, alpha_max: float, eta: float, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One FAB run; returns (closest adversarial found or x, its distance or inf)."""
    n, ndim = x.shape[0], x.ndim
    best = x.clone()
    best_dist = torch.full((n,), float("inf"), device=x.device, dtype=torch.float32)
    idx = torch.arange(n, device=x.device)
    x0, yw, tw, ew, x1 = x, y, target, eps, start
    bd = best_dist.clone()
    bx = best.clone()
    flat0 = x0.flatten(1)
    for it in range(n_iter):
        threads.balance()
        f, g = _boundary(model, x1, yw, tw, norm)
        w = g.flatten(1)
        flat1 = x1.flatten(1)
        both = project_hyperplane_box(torch.cat([flat1, flat0]), torch.cat([w, w]),
                                      torch.cat([-f, -f - (w * (flat0 - flat1)).sum(dim=1)]), norm)
        m = x1.shape[0]
        d1, d0 = both[:m], both[m:]
        a1 = _flat_norm(d1, norm).clamp_min(1e-8)
        a0 = _flat_norm(d0, norm).clamp_min(1e-8)
        alpha = (a1 / (a1 + a0)).clamp(0.0, alpha_max)[:, None]
        x1 = ((flat1 + eta * d1) * (1 - alpha) + (flat0 + eta * d0) * alpha).clamp(0.0, 1.0).view_as(x0)
        with torch.no_grad():
            adv = model(x1).argmax(dim=1) != yw
        dist = _flat_norm(x1 - x0, norm).to(bd.dtype)
        closer = adv & (dist < bd)
        bx = torch.where(_bview(closer, ndim), x1, bx)
        bd = torch.where(closer, dist, bd)
        x1 = torch.where(_bview(adv, ndim), x0 + beta * (x1 - x0), x1)
        if (it + 1) % _COMPACT_EVERY == 0 and it + 1 < n_iter:
            done = bd <= (ew if not isinstance(ew, torch.Tensor) else ew.to(bd.dtype))
            if bool(done.any()):  # one host sync every few iterations
                best[idx], best_dist[idx] = bx, bd
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    return best, best_dist
                idx, x0, yw, x1, bx, bd = idx[keep], x0[keep], yw[keep], x1[keep], bx[keep], bd[keep]
                tw, ew = (None if tw is None else tw[keep]), _take(ew, keep)
                flat0 = x0.flatten(1)
    best[idx], best_dist[idx] = bx, bd
    return best, best_dist


def _fab_start(x: torch.Tensor, eps: float | torch.Tensor, norm: str, gen: torch.Generator) -> torch.Tensor:
    """A random point on the sphere of radius eps / 2 around x (FAB's restarts), clamped to [0, 1]."""
    if norm == "linf":
        v = torch.rand(x.shape, generator=gen, device=gen.device, dtype=torch.float32) * 2 - 1
    else:
        v = torch.randn(x.shape, generator=gen, device=gen.device, dtype=torch.float32)
    v = v / _bview(_flat_norm(v, norm).clamp_min(1e-12), x.ndim)
    return (x + 0.5 * _scale(eps, x.ndim) * v.to(x.dtype)).clamp(0.0, 1.0)


class FAB(FixedEpsilonAttack):
    """FAB (untargeted) or FAB-T (``targeted=True``: the ``n_target_classes`` most likely wrong classes in
    turn) restricted to the eps-ball: success = an adversarial found at distance <= eps. The first run of
    each target starts at x, further ``n_restarts`` from random points at distance eps/2 (as the reference).
    """

    def __init__(self, eps: float | torch.Tensor, *, norm: str = "linf", targeted: bool = True,
                 n_target_classes: int = 9, n_iter: int = 100, n_restarts: int = 1, alpha_max: float = 0.1,
                 eta: float = 1.05, beta: float = 0.9, seed: int = 0, batch_size: int | None = None,
                 device: str | torch.device | None = None) -> None:
        super().__init__(eps, norm=norm, seed=seed, batch_size=batch_size, device=device)
        self.targeted = bool(targeted)
        self.n_target_classes = _check_int(n_target_classes, "n_target_classes", 1)
        self.n_iter = _check_int(n_iter, "n_iter", 1)
        self.n_restarts = _check_int(n_restarts, "n_restarts", 1)
        self.alpha_max = _check_eps(alpha_max, "alpha_max")
        self.eta = _check_eps(eta, "eta")
        self.beta = _check_eps(beta, "beta")

    def _run(self, model: Model, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        if batch.targets is not None:
            raise ValueError("FAB chooses its own targets (the most likely wrong classes)")
        eps = batch.eps
        with torch.no_grad():
            z0 = model(x)
        out = x.clone()
        fooled = z0.argmax(dim=1) != y
        if self.targeted:
            order = z0.argsort(dim=1, descending=True)
            targets = [order[:, j] for j in range(1, min(self.n_target_classes, batch.num_classes - 1) + 1)]
        else:
            targets = [None]
        for target in targets:
            for restart in range(self.n_restarts):
                todo = (~fooled).nonzero().squeeze(1)  # one host sync per run
                if todo.numel() == 0:
                    return out
                xs, es = x[todo], _take(eps, todo)
                start = xs if restart == 0 else _fab_start(xs, es, self.norm, batch.generator)
                pts, dist = _fab_run(model, xs, y[todo], es, self.norm, self.n_iter,
                                     None if target is None else target[todo], start, self.alpha_max, self.eta,
                                     self.beta)
                ok = dist <= (es.to(dist.dtype) if isinstance(es, torch.Tensor) else es)
                out[todo] = torch.where(_bview(ok, x.ndim), pts, out[todo])
                fooled[todo] = ok
        return out


def fab(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, norm: str = "linf",
        targeted: bool = True, n_target_classes: int = 9, n_iter: int = 100, n_restarts: int = 1, seed: int = 0,
        batch_size: int | None = None, device: str | torch.device | None = None) -> torch.Tensor:
    """:class:`FAB` as a function (default FAB-T, AutoAttack's setting); the result is on x's device."""
    return FAB(eps, norm=norm, targeted=targeted, n_target_classes=n_target_classes, n_iter=n_iter,
               n_restarts=n_restarts, seed=seed, batch_size=batch_size, device=device)(model, x, y)
