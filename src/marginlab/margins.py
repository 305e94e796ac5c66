"""Input-space margins: exact for linear models, bounded for networks (Wu & Yu 2019, §2, §4.1).

Signed individual margin (Wu & Yu 2019, §2): m(x, y) = sign(ŷ = y) · d(x, bd F_ŷ), the distance from x to
the boundary of its *predicted* region, positive when the prediction is right and negative when
it is wrong. Every function here follows that definition, so for a correctly classified point

    lipschitz_lower_bound <= m <= upper_bound

and for a misclassified one the same inequalities hold for |m| (all three are negative).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .attacks._validation import frozen_eval

__all__ = [
    "linear_margins",
    "min_average",
    "lipschitz_lower_bound",
    "upper_bound",
    "histogram",
    "SAMPLE_BLOCK",
    "GPU_BATCH_SIZE",
    "CPU_BATCH_SIZE",
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
    """Exact signed input-space margins of a linear classifier, in float64 (Wu & Yu 2019, §2; Nar et al. 2019a, §3).

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
    pair_norms = torch.cdist(W, W, compute_mode="donot_use_mm_for_euclid_dist")  # (K, K): ||w_a - w_b||, so no (N, K, d) tensor is formed
    dn = pair_norms[pred]  # (N, K): ||w_ŷ - w_j||
    dist = (zp - Z) / dn
    dist = torch.where(dn > 0, dist, torch.full_like(dist, float("inf")))
    dist.scatter_(1, pred[:, None], float("inf"))
    m = dist.amin(dim=1)
    return torch.where(pred == Y, m, -m)


def min_average(m: Any) -> tuple[float, float]:
    """(minimum margin, average margin) of signed individual margins (Wu & Yu 2019, §2)."""
    t = _as_f64(m, "m").reshape(-1)
    if t.numel() == 0:
        raise ValueError("no margins given")
    if bool(torch.isnan(t).any()):
        raise ValueError("margins contain NaN")
    return float(t.min()), float(t.mean())


def _dual_norm(g: torch.Tensor, norm: str) -> torch.Tensor:
    """||g||_q row-wise with 1/p + 1/q = 1: L2 for L2 balls, L1 for Linf balls (Hein & Andriushchenko 2017, Thm 2.1)."""
    flat = g.flatten(1)
    return flat.abs().sum(dim=1) if norm == "linf" else flat.norm(dim=1)


# ------------------------------------------------------------------------------------------ validation
# (self-contained: the estimators do not depend on the attacks' private helpers)

_NORMS = {"l2": "l2", "2": "l2", "linf": "linf", "inf": "linf"}


def _norm_name(norm: Any) -> str:
    key = "inf" if norm == float("inf") else str(norm).lower().replace(" ", "")
    if key not in _NORMS:
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    return _NORMS[key]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _radius(r: Any) -> float:
    if isinstance(r, torch.Tensor):
        if r.numel() != 1:
            raise ValueError(f"r must be a scalar, got a tensor of shape {tuple(r.shape)}")
        r = r.item()
    try:
        value = float(r)
    except (TypeError, ValueError):
        raise ValueError(f"r must be a real number, got {r!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"r must be a finite number > 0, got {r!r}")
    return value


def _model_device(model: Model, device: str | torch.device | None, fallback: torch.device) -> torch.device:
    """``device`` if given, else the device of the model's parameters, else ``fallback`` (x's device)."""
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return fallback


def _model_dtype(model: Model) -> torch.dtype:
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            if t.is_floating_point():
                return t.dtype
    return torch.float32


def _check_batch(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError("x and y must be torch tensors")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must be a batch of shape (N, ...), got shape {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape (N,) = ({x.shape[0]},) matching x, got shape {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels must be integer class indices (int64), got dtype {y.dtype}")
    return x.detach(), y.detach()


def _check_logits(z: Any, n: int) -> int:
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] != n:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"the model must return logits of shape (N, K) = ({n}, K), got {shape}")
    if z.shape[1] < 2:
        raise ValueError(f"the model returns {z.shape[1]} logit(s); margins need K >= 2 "
                         "(wrap a score model in models.BinaryLogits)")
    return int(z.shape[1])


@torch.no_grad()
def _logits(model: Model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _check_labels(y: torch.Tensor, k: int) -> None:
    if y.numel():
        lo, hi = torch.aminmax(y)  # one host synchronisation for the whole call
        if bool(lo < 0) or bool(hi >= k):
            raise ValueError(f"labels must lie in [0, {k - 1}], got range [{int(lo)}, {int(hi)}]")


# ------------------------------------------------------------------------------------------ ball sampling

#: Samples of one point are drawn in blocks of this many rows, each block from a generator on the compute
#: device seeded by (seed, point index, block index): a point's samples do not depend on ``batch_size``
#: or on the other points in the call, only on (seed, i, n_samples) and the device's random-number stream.
SAMPLE_BLOCK = 1024
#: Default sample rows per forward pass of :func:`lipschitz_lower_bound`: on a GPU, 4096 rows of a
#: CIFAR CNN with K = 10 retained backward graphs take a few GB; on a CPU larger batches do not help.
GPU_BATCH_SIZE = 4096
CPU_BATCH_SIZE = 1024


def _block_seed(seed: int, i: int, block: int) -> int:
    state = np.random.SeedSequence([int(seed) % 2**64, int(i), int(block)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def _ball_block(center: torch.Tensor, r: float, m: int, norm: str, gen: torch.Generator | None) -> torch.Tensor:
    """m points uniform in the ball B_p(center, r) of R^d, on center's device and in its dtype (not clipped
    to [0, 1]: the theorem is on R^d). L2: a uniform direction (normalised Gaussian) times r·U^(1/d)."""
    d = center.numel()
    opts = dict(device=center.device, dtype=center.dtype, generator=gen)
    if norm == "linf":
        delta = torch.rand((m, d), **opts).mul_(2).sub_(1).mul_(r)
    else:
        delta = torch.randn((m, d), **opts)
        delta.div_(delta.norm(dim=1, keepdim=True).clamp_min_(torch.finfo(center.dtype).tiny))
        delta.mul_(torch.rand((m, 1), **opts).pow_(1.0 / d).mul_(r))
    return delta.add_(center.reshape(1, -1))


def _point_samples(center: torch.Tensor, r: float, n_samples: int, norm: str, seed: int, i: int, start: int = 0,
                   stop: int | None = None, gen: torch.Generator | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of the ``n_samples`` ball samples of point ``i`` (center flattened, shape (d,));
    row 0 is the centre itself. ``gen``: a generator on center's device (made if None), re-seeded per block."""
    stop = n_samples if stop is None else stop
    gen = _device_generator(center.device) if gen is None else gen
    parts = []
    for blk in range(start // SAMPLE_BLOCK, (stop - 1) // SAMPLE_BLOCK + 1):
        lo = blk * SAMPLE_BLOCK
        if gen is not None:
            gen.manual_seed(_block_seed(seed, i, blk))
        pts = _ball_block(center, r, min(SAMPLE_BLOCK, n_samples - lo), norm, gen)
        if blk == 0:
            pts[0] = center.reshape(-1)  # the centre is always one of the samples
        parts.append(pts[max(start - lo, 0) : stop - lo])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _device_generator(dev: torch.device) -> torch.Generator | None:
    try:
        return torch.Generator(device=dev)
    except (RuntimeError, TypeError):  # a device without generators: the global stream (seeded below)
        return None


def _gap_gradient_norms(model: Model, pts: torch.Tensor, c: torch.Tensor, k: int, norm: str) -> torch.Tensor:
    """(rows, K) dual norms of ∇(f_c - f_j) at every row of ``pts`` for every class j (row-wise c):
    one forward and K backward passes over the whole batch (column j = c is 0)."""
    pts = pts.detach().requires_grad_(True)
    with torch.enable_grad():
        z = model(pts)
        onehot = torch.nn.functional.one_hot(c, k).to(z.dtype)
        cols = []
        for j in range(k):
            go = onehot.clone()
            go[:, j] -= 1.0  # d/dz of sum_rows (z_c - z_j)
            (g,) = torch.autograd.grad(z, pts, grad_outputs=go, retain_graph=j < k - 1)
            cols.append(_dual_norm(g, norm))
    return torch.stack(cols, dim=1)


def lipschitz_lower_bound(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    r: float,
    n_samples: int,
    batch_size: int | None = None,
    seed: int = 0,
    norm: str = "l2",
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Signed Lipschitz lower bound on the margin (Wu & Yu 2019, Thm 2 = Hein & Andriushchenko 2017 Thm 2.1).

    With ŷ = argmax f(x) and g_j = f_ŷ - f_j, d(x, bd F_ŷ) >= min_{j != ŷ} min(g_j(x) / L_j, r),
    L_j the Lipschitz constant of g_j on B(x, r) (dual norm of the gradient). As in Wu & Yu 2019, §4.1, L_j
    is estimated by the largest gradient norm over ``n_samples`` points drawn uniformly in the ball
    (x itself included), so the bound is an estimate, exact for a linear model. The result is
    signed like the margin: positive if ŷ = y, negative if not (Wu & Yu 2019, §2).

    Device boundary: everything runs on the model's device (``device`` overrides) in the model's dtype —
    the samples are drawn there from a seeded device generator, in blocks of :data:`SAMPLE_BLOCK` rows,
    up to ``batch_size`` sample rows per forward pass (several points packed together, or one point's
    samples in chunks; default :data:`GPU_BATCH_SIZE` on CUDA, :data:`CPU_BATCH_SIZE` elsewhere), K backward
    passes per chunk, no host synchronisation inside the loop. On a CPU the K backward passes dominate the
    cost (the sampling is a few per cent of it); on a GPU the device-side sampling keeps it busy. Returns
    float32 (N,) on ``x``'s device. Point i's samples depend only on (seed, i, n_samples) and the device.
    """
    r = _radius(r)
    n_samples = _positive_int(n_samples, "n_samples")
    norm = _norm_name(norm)
    seed = int(seed)
    x_in, y_in = _check_batch(x, y)
    home = x_in.device
    dev = _model_device(model, device, home)
    if batch_size is None:
        batch_size = GPU_BATCH_SIZE if dev.type == "cuda" else CPU_BATCH_SIZE
    batch_size = _positive_int(batch_size, "batch_size")
    x0 = x_in.to(dev, _model_dtype(model))
    y0 = y_in.to(dev).long()
    n = x0.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=home)
    gen = _device_generator(dev)
    with frozen_eval(model), torch.random.fork_rng(devices=_cuda_indices(dev)):
        if gen is None:
            torch.manual_seed(seed)
        z0 = _logits(model, x0, batch_size)
        k = _check_logits(z0, n)
        _check_labels(y0, k)
        pred = z0.argmax(dim=1)
        flat = x0.reshape(n, -1)
        if n_samples <= batch_size:
            per = max(1, batch_size // n_samples)
            jobs = [(a, min(a + per, n), 0, n_samples) for a in range(0, n, per)]
        else:
            jobs = [(i, i + 1, s, min(s + batch_size, n_samples))
                    for i in range(n) for s in range(0, n_samples, batch_size)]
        lip = torch.zeros(n, k, dtype=z0.dtype, device=dev)
        for a, b, s0, s1 in jobs:
            with torch.no_grad():
                pts = torch.cat([_point_samples(flat[i], r, n_samples, norm, seed, i, s0, s1, gen)
                                 for i in range(a, b)])
            m = s1 - s0
            dn = _gap_gradient_norms(model, pts.view(-1, *x0.shape[1:]), pred[a:b].repeat_interleave(m), k, norm)
            lip[a:b] = torch.maximum(lip[a:b], dn.view(b - a, m, k).amax(dim=1))
        with torch.no_grad():
            gap = z0.gather(1, pred[:, None]) - z0  # g_j(x) >= 0 since ŷ = argmax
            ratio = torch.where(lip > 0, gap / lip, torch.full_like(lip, float("inf")))
            ratio.scatter_(1, pred[:, None], float("inf"))
            out = ratio.amin(dim=1).clamp(max=r)
            out = torch.where(pred == y0, out, -out)
    return out.to(device=home, dtype=torch.float32)


def _cuda_indices(dev: torch.device) -> list[int]:
    """The CUDA device whose global stream ``fork_rng`` must save and restore (none off CUDA)."""
    if dev.type != "cuda" or not torch.cuda.is_available():
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


def upper_bound(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "l2",
    methods: tuple[str, ...] = ("deepfool", "cw"),
    device: str | torch.device | None = None,
    batch_size: int = 1024,
    **kw: dict[str, Any],
) -> torch.Tensor:
    """Signed minimal-perturbation upper bound on the margin (beyond Wu & Yu 2019: attacks instead of bounds).

    The smallest distortion found by ``attacks.minimal_perturbation`` that changes the model's
    *prediction* ŷ (so misclassified points get a finite distance too), signed like Wu & Yu 2019's margin:
    + if ŷ = y, - otherwise. inf where no attack succeeded. Options per method as in
    ``minimal_perturbation`` (e.g. ``cw=dict(steps=200)``).

    Device boundary: runs on the model's device (``device`` overrides), ``batch_size`` points per attack
    call; returns float64 (N,) on ``x``'s device.
    """
    from . import attacks  # imported here: the estimators above do not need the attack package

    batch_size = _positive_int(batch_size, "batch_size")
    x_in, y_in = _check_batch(x, y)
    home = x_in.device
    dev = _model_device(model, device, home)
    x0, y0 = x_in.to(dev, _model_dtype(model)), y_in.to(dev).long()
    n = x0.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.float64, device=home)
    with frozen_eval(model):
        z0 = _logits(model, x0, batch_size)
    k = _check_logits(z0, n)
    _check_labels(y0, k)
    pred = z0.argmax(dim=1)
    parts = []
    for a in range(0, n, batch_size):
        parts.append(attacks.minimal_perturbation(model, x0[a : a + batch_size], pred[a : a + batch_size],
                                                  norm=norm, methods=methods, device=dev, **kw))
    dist = torch.cat(parts).to(dev, torch.float64)
    sign = torch.where(pred == y0, 1.0, -1.0).to(dist)
    return (dist * sign).to(home)


def histogram(m: Any, bins: int | Any = 30, range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of the finite margins (``np.histogram``); inf margins (no adversarial found) are left out."""
    t = _as_f64(m, "m").reshape(-1).numpy()
    if np.isnan(t).any():
        raise ValueError("margins contain NaN")
    return np.histogram(t[np.isfinite(t)], bins=bins, range=range)
