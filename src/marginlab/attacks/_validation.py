"""Input checks, the eps-ball, the model-mode context and the device boundary shared by every attack.

Nothing here attacks anything: these are the conventions of DESIGN §2 in one place (inputs in
[0, 1], logits (N, K), int64 labels, ``ValueError`` naming the argument, the model in ``eval()``
with its mode and ``requires_grad`` flags restored, results inside the ball and the box).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Model = Callable[[torch.Tensor], torch.Tensor]

_NORMS = {"linf": "linf", "inf": "linf", "l_inf": "linf", "l2": "l2", "2": "l2"}
_LOSSES = ("ce", "margin")
# Float32 slack for ball/box checks: x_adv - x is recomputed after a rounding x + delta.
_BALL_ATOL = 1e-6
_BALL_RTOL = 1e-5


# --------------------------------------------------------------------------------------------
# argument checks
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


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the batch and labels (one host sync for the [0, 1] check); return detached references."""
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


# --------------------------------------------------------------------------------------------
# the device boundary and the model's mode
# --------------------------------------------------------------------------------------------


def _model_device(model: Model) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a parameter-free callable."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return None


def _resolve_device(model: Model, x: torch.Tensor, device: Any = None) -> torch.device:
    """Where the attack computes: ``device`` if given, else the model's device, else x's device.

    Inputs are moved there and results back to the caller's device (one device boundary). An
    explicit ``device`` that differs from the model's is an error: the model is not moved.
    """
    model_dev = _model_device(model)
    if device is None:
        return model_dev if model_dev is not None else x.device
    dev = torch.device(device)
    if model_dev is not None and model_dev.type != dev.type:
        raise ValueError(f"device={dev} but the model's parameters are on {model_dev}; move the model first")
    return model_dev if model_dev is not None else dev


def _prepare(
    model: Model, x: torch.Tensor, y: torch.Tensor, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    """Validate inputs and move them to the compute device (default: the model's device)."""
    x0, y0 = _check_inputs(x, y)
    dev = _resolve_device(model, x, device)
    return x0.to(dev), y0.to(dev), dev


@contextlib.contextmanager
def frozen_eval(model: Model) -> Iterator[None]:
    """eval() + frozen parameters during an attack or a margin estimate; every submodule's mode and
    flag restored after.

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


_attack_mode = frozen_eval


def _predict(model: Model, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Logits of a batch under no_grad (chunked when batch_size is given)."""
    with torch.no_grad():
        if batch_size is None or x.shape[0] <= batch_size:
            return model(x)
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


# --------------------------------------------------------------------------------------------
# per-example broadcasting, norms, the ball
# --------------------------------------------------------------------------------------------


def _bview(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-example vector (N,) to broadcast against a batch of rank ``ndim``."""
    return v.view(-1, *([1] * (ndim - 1)))


def _scale(v: float | torch.Tensor, ndim: int) -> float | torch.Tensor:
    """A scalar as is; per-example values (N,) reshaped to broadcast against a batch of rank ``ndim``."""
    return _bview(v, ndim) if isinstance(v, torch.Tensor) else v


def _take(v: Any, idx: torch.Tensor | slice) -> Any:
    """Per-example values restricted to ``idx`` (a scalar or None is shared by every example)."""
    return v[idx] if isinstance(v, torch.Tensor) and v.ndim > 0 else v


def _flat_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    flat = t.flatten(1)
    if norm == "linf":
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    return flat.norm(p=2, dim=1)


def _project(x_adv: torch.Tensor, x0: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """Project onto the eps-ball around x0 (eps scalar or per example), then clamp to [0, 1].

    Clamping moves each coordinate towards x0 (which is in [0, 1]), so it cannot leave the ball.
    """
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

    Drawn in float32 on ``gen``'s device (the model's): no host round trip; CPU and CUDA streams differ.
    """
    shape, dev = x0.shape, gen.device
    if norm == "linf":
        delta = (torch.rand(shape, generator=gen, device=dev, dtype=torch.float32) * 2 - 1) * _scale(eps, len(shape))
    else:
        n, d = shape[0], int(x0[0].numel()) if shape[0] else 0
        direction = torch.randn((n, max(d, 1)), generator=gen, device=dev, dtype=torch.float32)[:, :d]
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        # radius ~ eps * U^(1/d): the uniform distribution on the ball, not on its centre.
        radius = eps * torch.rand(n, generator=gen, device=dev, dtype=torch.float32).pow(1.0 / max(d, 1))
        delta = (direction * radius[:, None]).view(shape)
    return _project(x0 + delta.to(x0.dtype), x0, eps, norm)


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


_margin_gap = margin_gap


def _objective(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, loss: str) -> torch.Tensor:
    """Per-example objective the attacker maximises (untargeted: push away from y; targeted: toward target)."""
    if target is None:
        if loss == "ce":
            return F.cross_entropy(z, y, reduction="none")
        return margin_gap(z, y)
    if loss == "ce":
        return -F.cross_entropy(z, target, reduction="none")
    return -margin_gap(z, target)


def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Per-example ||x_adv - x|| in the given norm (float64 for stable comparisons)."""
    norm = _norm_name(norm)
    if x.shape != x_adv.shape:
        raise ValueError(f"x_adv has shape {tuple(x_adv.shape)}, x has shape {tuple(x.shape)}")
    return _flat_norm(x_adv.detach().double() - x.detach().to(x_adv.device).double(), norm)


def _in_ball(x: torch.Tensor, x_adv: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """in_ball for a checked radius: a float or per-example radii (N,) on any device."""
    dist = perturbation_norms(x, x_adv, norm)
    e = eps.to(dist.device, torch.float64) if isinstance(eps, torch.Tensor) else eps
    flat = x_adv.flatten(1)
    box = (flat >= 0).all(dim=1) & (flat <= 1).all(dim=1)
    return (dist <= e * (1 + _BALL_RTOL) + _BALL_ATOL) & box


def in_ball(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str = "linf") -> torch.Tensor:
    """Per-example bool: x_adv within the eps-ball around x (float32 slack) and inside [0, 1]."""
    return _in_ball(x, x_adv, _check_eps(eps), _norm_name(norm))


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
