"""Square Attack (Andriushchenko, Croce, Flammarion & Hein 2020, ECCV), Linf and L2: a score-based
black-box random search, no gradients -- the member of AutoAttack that gradient masking cannot fool.

Random search on the margin loss z_y - max_{j!=y} z_j (minimised; <= 0 means fooled). Each query
changes one random square window of side s (shared by the batch in a step, a random sign per
example and channel) and keeps the change where the loss decreased. The side follows the
piecewise-constant schedule p(i) of the fraction of changed pixels, s = round(sqrt(p * h * w)):
p_init = 0.8 halved at queries 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (their §3 and
the reference implementation; ``rescale_schedule`` stretches it to ``n_queries`` / 10000 of the
way, for reduced budgets).

* Linf (their Alg. 2 and §3.1): start from vertical stripes of +-eps; a query sets the window to
  +-eps (a vertex of the cube) per channel.
* L2 (§3.2): start from a grid of 5 x 5 "centre-peaked" blocks eta of +-1 (rings weighted 1/(k+1)^2,
  opposite signs on the two halves), rescaled to norm eps; a query moves the mass of a second
  window into the first one, redistributed as a new eta block, so the norm stays eps.

Semantics checked against the authors' reference implementation (github.com/fra31/auto-attack), not
copied. Inputs that are not images (N, C, H, W) are treated as (N, 1, 1, D). The batch is compacted
(fooled examples dropped, one host sync) every :data:`_COMPACT_EVERY` queries rather than every query.
"""
from __future__ import annotations

import math

import torch

from .. import threads
from ._validation import (
    Model,
    _bview,
    _check_eps,
    _check_int,
    _flat_norm,
    _take,
    margin_gap,
)
from .base import Batch, FixedEpsilonAttack

__all__ = ["Square", "square"]

_COMPACT_EVERY = 20
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))


def _p_selection(p_init: float, it: int, n_queries: int, rescale: bool) -> float:
    """Fraction of pixels changed at query ``it``: p_init divided at the schedule's milestones."""
    if rescale:
        it = int(it / n_queries * 10000)
    div = 1
    for milestone, d in _SCHEDULE:
        if it > milestone:
            div = 2 * d
    return p_init / div


def _eta_rings(a: int, b: int, device: torch.device) -> torch.Tensor:
    """a x b block of concentric rectangles around the centre weighted 1 / (k + 1)^2, unit L2 norm."""
    rows = torch.arange(a, device=device)[:, None]
    cols = torch.arange(b, device=device)[None, :]
    ca, cb = a // 2, b // 2  # ring k covers rows [ca - k, ca + k], cols [cb - k, cb + k]
    ring = torch.maximum((rows - ca).abs(), (cols - cb).abs())
    # ring k is inside rings k, k+1, ...: the accumulated weight is sum_{j >= k} 1 / (j + 1)^2
    n_rings = max(ca, cb) + 1
    w = 1.0 / torch.arange(1, n_rings + 1, device=device, dtype=torch.float32) ** 2
    tail = w.flip(0).cumsum(0).flip(0)
    block = tail[ring.clamp(max=n_rings - 1)]
    block = torch.where(ring < n_rings, block, torch.zeros_like(block))
    return block / block.norm()


def _eta(s: int, gen: torch.Generator) -> torch.Tensor:
    """s x s L2 block: rings on the top half, negated rings on the bottom half, unit norm, random transpose."""
    dev = gen.device
    top = _eta_rings(s // 2, s, dev) if s // 2 else torch.zeros(0, s, device=dev)
    block = torch.cat([top, -_eta_rings(s - s // 2, s, dev)])
    block = block / block.norm()
    if bool(torch.rand((), generator=gen, device=dev) > 0.5):
        block = block.t()
    return block


def _randint(high: int, gen: torch.Generator) -> int:
    return int(torch.randint(0, max(high, 1), (), generator=gen, device=gen.device)) if high > 0 else 0


def _signs(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=gen, device=gen.device) * 2 - 1).to(dtype)


def _square_run(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, norm: str,
                n_queries: int, p_init: float, rescale: bool, gen: torch.Generator) -> torch.Tensor:
    n, c, h, w = x.shape
    ndim = 4

    def margin(xa: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return -margin_gap(model(xa), yy)  # z_y - max_{j != y} z_j: <= 0 means fooled

    e4 = _bview(eps, ndim) if isinstance(eps, torch.Tensor) else eps
    if norm == "linf":
        x_best = (x + e4 * _signs((n, c, 1, w), gen, x.dtype)).clamp(0.0, 1.0)
    else:
        s0 = max(h // 5, 1)
        start = (h - s0 * 5) // 2 if h >= 5 else 0
        delta = torch.zeros_like(x)
        for vh in range(start, h - s0 + 1, s0):
            for vw in range(start, w - s0 + 1, s0):
                delta[:, :, vh : vh + s0, vw : vw + s0] += _eta(s0, gen)[None, None] * _signs((n, c, 1, 1), gen, x.dtype)
        x_best = (x + delta / _bview(_flat_norm(delta, "l2").clamp_min(1e-12), ndim) * e4).clamp(0.0, 1.0)
    m_best = margin(x_best, y)
    out = x_best.clone()
    idx = torch.arange(n, device=x.device)
    xw, yw, ew = x, y, eps
    for i in range(n_queries):
        threads.balance()
        if i % _COMPACT_EVERY == 0:  # one host sync every few queries: drop the fooled examples
            active = m_best > 0
            n_active = int(active.sum())
            if n_active == 0:
                break
            if n_active < active.shape[0]:
                out[idx] = x_best
                keep = active.nonzero().squeeze(1)
                idx, xw, yw, x_best, m_best, ew = idx[keep], xw[keep], yw[keep], x_best[keep], m_best[keep], _take(ew, keep)
                e4 = _bview(ew, ndim) if isinstance(ew, torch.Tensor) else ew
        m = xw.shape[0]
        p = _p_selection(p_init, i, n_queries, rescale)
        if norm == "linf":
            s = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
            vh, vw = _randint(h - s, gen), _randint(w - s, gen)
            x_new = x_best.clone()
            x_new[:, :, vh : vh + s, vw : vw + s] = (
                xw[:, :, vh : vh + s, vw : vw + s] + e4 * _signs((m, c, 1, 1), gen, x.dtype))
            x_new = torch.minimum(torch.maximum(x_new, xw - e4), xw + e4).clamp(0.0, 1.0)
        else:
            s = max(int(round(math.sqrt(p * h * w))), 3)
            s = min(s + 1 if s % 2 == 0 else s, h, w)
            vh, vw = _randint(h - s, gen), _randint(w - s, gen)
            vh2, vw2 = _randint(h - s, gen), _randint(w - s, gen)
            delta = x_best - xw
            win1 = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
            win2 = (slice(None), slice(None), slice(vh2, vh2 + s), slice(vw2, vw2 + s))
            mask = torch.zeros_like(xw[:1])
            mask[win1] = 1.0
            mask[win2] = 1.0
            norm_win1 = delta[win1].pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
            norm_windows = (delta * mask).pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
            norm_image = _bview(_flat_norm(delta, "l2"), ndim)
            new = _eta(s, gen)[None, None] * _signs((m, c, 1, 1), gen, x.dtype) + delta[win1] / (norm_win1 + 1e-12)
            budget = ((e4 * e4 - norm_image * norm_image).clamp_min(0) / c + norm_windows * norm_windows).sqrt()
            new = new / (new.pow(2).sum(dim=(2, 3), keepdim=True).sqrt() + 1e-12) * budget
            delta[win2] = 0.0
            delta[win1] = new
            x_new = (xw + delta / _bview(_flat_norm(delta, "l2").clamp_min(1e-12), ndim) * e4).clamp(0.0, 1.0)
        m_new = margin(x_new, yw)
        better = m_new < m_best  # the margin loss is the objective: improved or fooled, both decrease it
        x_best = torch.where(_bview(better, ndim), x_new, x_best)
        m_best = torch.where(better, m_new, m_best)
    out[idx] = x_best
    return out


class Square(FixedEpsilonAttack):
    """Square Attack in the Linf or L2 eps-ball (Andriushchenko et al. 2020); AutoAttack's standard:
    5,000 queries, p_init = 0.8, the schedule not rescaled. Success: misclassified."""

    def __init__(self, eps: float | torch.Tensor, *, norm: str = "linf", n_queries: int = 5000, p_init: float = 0.8,
                 rescale_schedule: bool = False, seed: int = 0, batch_size: int | None = None,
                 device: str | torch.device | None = None) -> None:
        super().__init__(eps, norm=norm, seed=seed, batch_size=batch_size, device=device)
        self.n_queries = _check_int(n_queries, "n_queries", 0)
        self.p_init = _check_eps(p_init, "p_init")
        if not 0 < self.p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init}")
        self.rescale_schedule = bool(rescale_schedule)

    def _run(self, model: Model, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        if batch.targets is not None:
            raise ValueError("Square is untargeted here")
        shape = x.shape
        xi = x if x.ndim == 4 else x.reshape(x.shape[0], 1, 1, -1)

        def image_model(t: torch.Tensor) -> torch.Tensor:
            return model(t.reshape(t.shape[0], *shape[1:]))

        out = _square_run(image_model if x.ndim != 4 else model, xi, y, batch.eps, self.norm, self.n_queries,
                          self.p_init, self.rescale_schedule, batch.generator)
        return out.reshape(shape)


def square(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, norm: str = "linf",
           n_queries: int = 5000, p_init: float = 0.8, seed: int = 0, batch_size: int | None = None,
           device: str | torch.device | None = None) -> torch.Tensor:
    """:class:`Square` as a function; the result is on x's device."""
    return Square(eps, norm=norm, n_queries=n_queries, p_init=p_init, seed=seed, batch_size=batch_size,
                  device=device)(model, x, y)
