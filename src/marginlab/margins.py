"""Input-space margins: exact for linear models, bounded for networks (003 §2, §4.1).

Signed individual margin (003 §2): m(x, y) = sign(ŷ = y) · d(x, bd F_ŷ), the distance from x to
the boundary of its *predicted* region, positive when the prediction is right and negative when
it is wrong. Every function here follows that definition, so for a correctly classified point

    lipschitz_lower_bound <= m <= upper_bound

and for a misclassified one the same inequalities hold for |m| (all three are negative).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from . import attacks as _attacks

__all__ = [
    "linear_margins",
    "min_average",
    "lipschitz_lower_bound",
    "upper_bound",
    "histogram",
]

Model = Callable[[torch.Tensor], torch.Tensor]


def _as_f64(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64)
    try:
        return torch.as_tensor(np.asarray(a, dtype=np.float64))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric (array or tensor)") from None


def linear_margins(w: Any, b: Any, x: Any, y: Any) -> np.ndarray | torch.Tensor:
    """Exact signed input-space margins of a linear classifier, in float64 (003 §2; 000 §3).

    Binary (w of shape (d,) or (1, d), scalar b, y in {-1, +1}): m_i = y_i (w·x_i + b) / ||w||_2.
    Multiclass (w of shape (K, d), b of shape (K,) or None, y class indices): with prediction ŷ,
    m_i = sign(ŷ = y) · min_{j != ŷ} (z_ŷ - z_j) / ||w_ŷ - w_j||, the distance to the nearest facet
    of the (convex) predicted region, which is its exact boundary distance; pairs with w_ŷ = w_j
    never form a boundary and are skipped. For correctly classified points this is
    min_{j != y} (z_y - z_j) / ||w_y - w_j||. x may be (N, d) or (N, ...) (flattened).
    Returns a NumPy array if w is NumPy/list, else a float64 tensor (on the CPU).
    """
    numpy_out = not isinstance(w, torch.Tensor)
    W = _as_f64(w, "w")
    X = _as_f64(x, "x")
    if X.ndim == 1:
        X = X[None, :]
    X = X.reshape(X.shape[0], -1)
    if W.ndim == 2 and W.shape[0] == 1:
        W = W[0]
    if W.ndim == 1:
        out = _binary_margins(W, b, X, y)
    elif W.ndim == 2:
        out = _multiclass_margins(W, b, X, y)
    else:
        raise ValueError(f"w must have shape (d,) or (K, d), got {tuple(W.shape)}")
    return out.numpy() if numpy_out else out


def _binary_margins(W: torch.Tensor, b: Any, X: torch.Tensor, y: Any) -> torch.Tensor:
    d = W.shape[0]
    if X.shape[1] != d:
        raise ValueError(f"x has {X.shape[1]} features but w has {d}")
    B = _as_f64(0.0 if b is None else b, "b").reshape(-1)
    if B.numel() != 1:
        raise ValueError(f"a binary classifier needs a scalar bias, got shape {tuple(B.shape)}")
    Y = _as_f64(y, "y").reshape(-1)
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"y has {Y.shape[0]} labels for {X.shape[0]} points")
    if not bool(((Y == 1) | (Y == -1)).all()):
        raise ValueError(
            "binary labels must be in {-1, +1} (use data.binary_subset; class indices need w of shape (K, d))"
        )
    norm = torch.linalg.vector_norm(W)
    if not bool(norm > 0) or not bool(torch.isfinite(norm)):
        raise ValueError("w must be non-zero and finite: the margin of w = 0 is undefined")
    return Y * (X @ W + B[0]) / norm


def _multiclass_margins(W: torch.Tensor, b: Any, X: torch.Tensor, y: Any) -> torch.Tensor:
    k, d = W.shape
    if X.shape[1] != d:
        raise ValueError(f"x has {X.shape[1]} features but w has {d}")
    B = torch.zeros(k, dtype=torch.float64) if b is None else _as_f64(b, "b").reshape(-1)
    if B.shape[0] != k:
        raise ValueError(f"b must have {k} entries, got {B.shape[0]}")
    Y = torch.as_tensor(np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y))
    if Y.ndim != 1 or Y.shape[0] != X.shape[0] or Y.dtype.is_floating_point or Y.dtype == torch.bool:
        raise ValueError(f"multiclass labels must be integer indices of shape ({X.shape[0]},)")
    Y = Y.long()
    if Y.numel() and (int(Y.min()) < 0 or int(Y.max()) >= k):
        raise ValueError(f"labels must lie in [0, {k - 1}]")
    Z = X @ W.T + B  # (N, K)
    pred = Z.argmax(dim=1)
    zp = Z.gather(1, pred[:, None])  # (N, 1)
    diff_w = W[pred][:, None, :] - W[None, :, :]  # (N, K, d): w_ŷ - w_j
    dn = torch.linalg.vector_norm(diff_w, dim=2)
    dist = (zp - Z) / dn
    dist = torch.where(dn > 0, dist, torch.full_like(dist, float("inf")))
    dist.scatter_(1, pred[:, None], float("inf"))
    m = dist.amin(dim=1)
    return torch.where(pred == Y, m, -m)


def min_average(m: Any) -> tuple[float, float]:
    """(minimum margin, average margin) of signed individual margins (003 §2)."""
    t = _as_f64(m, "m").reshape(-1)
    if t.numel() == 0:
        raise ValueError("no margins given")
    if bool(torch.isnan(t).any()):
        raise ValueError("margins contain NaN")
    return float(t.min()), float(t.mean())


def _dual_norm(g: torch.Tensor, norm: str) -> torch.Tensor:
    """||g||_q with 1/p + 1/q = 1: L2 for L2 balls, L1 for Linf balls (Hein & Andriushchenko 2017, Thm 2.1)."""
    flat = g.flatten(-g.ndim + 2) if g.ndim > 2 else g
    return flat.abs().sum(dim=-1) if norm == "linf" else flat.norm(dim=-1)


def _ball_samples(x: torch.Tensor, r: float, n: int, norm: str, gen: torch.Generator) -> torch.Tensor:
    """n points uniform in the ball B_p(x, r) of R^d (not clipped to [0, 1]: the theorem is on R^d)."""
    d = x.numel()
    if norm == "linf":
        delta = (torch.rand((n, d), generator=gen, dtype=torch.float64) * 2 - 1) * r
    else:
        u = torch.randn((n, d), generator=gen, dtype=torch.float64)
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
        delta = u * (r * torch.rand((n, 1), generator=gen, dtype=torch.float64).pow(1.0 / d))
    return x.reshape(1, -1) + delta.to(device=x.device, dtype=x.dtype)


#: Samples of one point are drawn in blocks of this many, each block from its own generator seeded by
#: (seed, point index, block index): a point's samples do not depend on batch_size or on the other points.
_SAMPLE_BLOCK = 256


def _block_generator(seed: int, i: int, block: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed) % 2**64, int(i), int(block)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _point_samples(
    x: torch.Tensor, r: float, n_samples: int, norm: str, seed: int, i: int, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """Samples ``start:stop`` of the ``n_samples`` ball samples of point ``i`` (x flattened, shape (d,));
    sample 0 is the centre x itself. Deterministic in (seed, i, n_samples), whatever the batching."""
    stop = n_samples if stop is None else stop
    parts = []
    for blk in range(start // _SAMPLE_BLOCK, (stop - 1) // _SAMPLE_BLOCK + 1):
        lo = blk * _SAMPLE_BLOCK
        pts = _ball_samples(x, r, min(_SAMPLE_BLOCK, n_samples - lo), norm, _block_generator(seed, i, blk))
        if blk == 0:
            pts[0] = x.reshape(-1)  # the centre is always one of the samples
        parts.append(pts[max(start - lo, 0) : stop - lo])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _gap_gradient_norms(model: Model, pts: torch.Tensor, c: torch.Tensor, k: int, norm: str) -> torch.Tensor:
    """(rows, K) dual norms of ∇(f_c - f_j) at every row of ``pts`` for every class j (row-wise c):
    one forward and K backward passes over the whole batch (row j = c is 0)."""
    pts = pts.detach().requires_grad_(True)
    with torch.enable_grad():
        z = model(pts)
        onehot = torch.nn.functional.one_hot(c, k).to(z.dtype)
        cols = []
        for j in range(k):
            go = onehot.clone()
            go[:, j] -= 1.0  # d/dz of sum_rows (z_c - z_j)
            (g,) = torch.autograd.grad(z, pts, grad_outputs=go, retain_graph=j < k - 1)
            cols.append(_dual_norm(g.flatten(1).double(), norm))
    return torch.stack(cols, dim=1)


def lipschitz_lower_bound(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    r: float,
    n_samples: int,
    batch_size: int = 1024,
    seed: int = 0,
    norm: str = "l2",
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Signed Lipschitz lower bound on the margin (003 Thm 2 = Hein & Andriushchenko 2017 Thm 2.1).

    With ŷ = argmax f(x) and g_j = f_ŷ - f_j, d(x, bd F_ŷ) >= min_{j != ŷ} min(g_j(x) / L_j, r),
    L_j the Lipschitz constant of g_j on B(x, r) (dual norm of the gradient). As in 003 §4.1, L_j
    is estimated by the largest gradient norm over ``n_samples`` points drawn uniformly in the ball
    (x itself included), so the bound is an estimate, exact for a linear model. The result is
    signed like the margin: positive if ŷ = y, negative if not (003 §2). float32 tensor (N,) on x's device.

    Batched: up to ``batch_size`` sample rows per forward pass, several points' samples packed together
    (``batch_size // n_samples`` points) or one point's samples in chunks when n_samples > batch_size;
    K backward passes per batch. Point i's samples depend only on (seed, i, n_samples).
    """
    r = _attacks._check_eps(r, "r")
    if r == 0:
        raise ValueError("r must be > 0")
    n_samples = _attacks._check_int(n_samples, "n_samples", 1)
    batch_size = _attacks._check_int(batch_size, "batch_size", 1)
    norm = _attacks._norm_name(norm)
    x0, y0, dev = _attacks._prepare(model, x, y, device)
    n = x0.shape[0]
    with _attacks._attack_mode(model), torch.no_grad():
        if n == 0:
            return torch.empty(0, dtype=torch.float32, device=x.device)
        z0 = model(x0)
        k = _attacks._check_logits(z0, y0, n)
        pred = z0.argmax(dim=1)
        flat = x0.reshape(n, -1)
        if n_samples <= batch_size:
            per = max(1, batch_size // n_samples)
            jobs = [(a, min(a + per, n), 0, n_samples) for a in range(0, n, per)]
        else:
            jobs = [(i, i + 1, s, min(s + batch_size, n_samples)) for i in range(n) for s in range(0, n_samples, batch_size)]
        lip = torch.zeros(n, k, dtype=torch.float64, device=dev)
        for a, b, s0, s1 in jobs:
            pts = torch.cat([_point_samples(flat[i], r, n_samples, norm, seed, i, s0, s1) for i in range(a, b)])
            m = s1 - s0
            dn = _gap_gradient_norms(model, pts.view(-1, *x0.shape[1:]), pred[a:b].repeat_interleave(m), k, norm)
            lip[a:b] = torch.maximum(lip[a:b], dn.view(b - a, m, k).amax(dim=1))
        gap = (z0.gather(1, pred[:, None]) - z0).double()  # g_j(x) >= 0 since ŷ = argmax
        ratio = torch.where(lip > 0, gap / lip, torch.full_like(lip, float("inf")))
        ratio.scatter_(1, pred[:, None], float("inf"))
        out = ratio.amin(dim=1).clamp(max=r)
        sign = torch.where(pred == y0, 1.0, -1.0).double()
    return (out * sign).to(x.device, torch.float32)


def upper_bound(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "l2",
    methods: tuple[str, ...] = ("deepfool", "cw"),
    device: str | torch.device | None = None,
    **kw: dict[str, Any],
) -> torch.Tensor:
    """Signed minimal-perturbation upper bound on the margin (beyond 003: attacks instead of bounds).

    The smallest distortion found by ``attacks.minimal_perturbation`` that changes the model's
    *prediction* ŷ (so misclassified points get a finite distance too), signed like 003's margin:
    + if ŷ = y, - otherwise. inf where no attack succeeded. Options per method as in
    ``minimal_perturbation`` (e.g. ``cw=dict(steps=200)``). float64 tensor (N,) on x's device.
    """
    x0, y0, dev = _attacks._prepare(model, x, y, device)
    with _attacks._attack_mode(model), torch.no_grad():
        z0 = model(x0) if len(x0) else torch.zeros(0, 2, device=dev)
        _attacks._check_logits(z0, y0, len(x0))
        pred = z0.argmax(dim=1)
    dist = _attacks.minimal_perturbation(model, x0, pred, norm=norm, methods=methods, **kw)
    sign = torch.where(pred == y0, 1.0, -1.0).to(dist)
    return (dist * sign).to(x.device)


def histogram(m: Any, bins: int | Any = 30, range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of the finite margins (``np.histogram``); inf margins (no adversarial found) are left out."""
    t = _as_f64(m, "m").reshape(-1).numpy()
    if np.isnan(t).any():
        raise ValueError("margins contain NaN")
    return np.histogram(t[np.isfinite(t)], bins=bins, range=range)
