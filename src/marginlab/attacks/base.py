"""Attack objects: one final ``__call__`` that owns the conventions; subclasses write only ``_run``.

Two kinds, as in foolbox 3 (Rauber et al. 2017): a :class:`FixedEpsilonAttack` searches for an
adversarial inside a given eps-ball (PGD, APGD, FAB-T restricted to eps, Square); a
:class:`MinimizationAttack` searches for the smallest adversarial perturbation (CW-L2, DeepFool).

:meth:`Attack.run` (and ``__call__``, which returns only the points) does for every attack:

1. validate x, y, targets and the radius (``ValueError`` naming the argument);
2. move inputs to the compute device: ``device`` if given, else the model's (no error when the
   caller's tensors live elsewhere: they are moved in and the results moved back);
3. put the model in ``eval()`` with frozen parameters (modes and flags restored after);
4. run the subclass's ``_run`` in chunks of ``batch_size`` examples, each chunk with its own
   generator seeded from (``seed``, chunk index) on the compute device, so a chunk's result does
   not depend on the other chunks; CPU and CUDA random streams differ, so the same seed gives
   different (equally valid) random starts on the two;
5. clamp to [0, 1] (and project onto the ball for a fixed-eps attack: a no-op for a correct
   attack) and check every output is inside the ball and [0, 1] (``RuntimeError`` otherwise: a bug);
6. evaluate success (misclassified, or the target hit for a targeted attack) on the device;
7. return the points (and success) on the caller's device.

``batch_size`` default (:data:`DEFAULT_BATCH_SIZE` = 256 examples per forward/backward pass): the
chapters' small CNNs save ~2.9 MiB of activations per CIFAR image for a backward pass; the papers'
largest model, WRN-34-10 on CIFAR-10, saves roughly 35 MiB per image (an estimate from counting its
saved float32 tensors: 3 per conv, 10 convs per width group at 32^2x160, 16^2x320, 8^2x640), so a
chunk of 256 needs ~9 GiB and fits a 24 GB card with room for FAB's per-class gradients. Pass a
smaller ``batch_size`` on a smaller card, a larger one for tiny models.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, final

import torch

from ._validation import (
    Model,
    _attack_mode,
    _check_eps_vec,
    _check_inputs,
    _check_int,
    _check_logits,
    _check_targets,
    _in_ball,
    _norm_name,
    _project,
    _resolve_device,
    _take,
)

__all__ = ["DEFAULT_BATCH_SIZE", "Attack", "AttackResult", "Batch", "FixedEpsilonAttack", "MinimizationAttack"]

DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True)
class AttackResult:
    """Adversarial points and per-example success, on the caller's device."""

    x_adv: torch.Tensor
    success: torch.Tensor


@dataclass(frozen=True)
class Batch:
    """What ``_run`` gets besides (model, x, y): per-chunk radius and targets, the chunk's generator, K,
    and the chunk's ``index`` into the caller's batch (to slice the attack's own per-example options)."""

    eps: float | torch.Tensor | None
    targets: torch.Tensor | None
    generator: torch.Generator
    num_classes: int
    index: slice


def _chunk_seed(seed: int, chunk: int) -> int:
    """Seed of chunk ``chunk``: chunk 0 uses ``seed`` itself (a single-chunk run is the unchunked run)."""
    return (int(seed) + 1_000_003 * chunk) % (2**63 - 1)


class Attack(abc.ABC):
    """Base class; see the module docstring for what ``run``/``__call__`` guarantee."""

    #: the norm the attack's guarantee refers to ("linf" or "l2")
    norm: str

    def __init__(self, *, norm: str = "linf", seed: int = 0, batch_size: int | None = None,
                 device: str | torch.device | None = None) -> None:
        self.norm = _norm_name(norm)
        self.seed = _check_int(seed, "seed", 0)
        self.batch_size = DEFAULT_BATCH_SIZE if batch_size is None else _check_int(batch_size, "batch_size", 1)
        self.device = device

    # ---- subclass hooks -------------------------------------------------------------------

    @abc.abstractmethod
    def _run(self, model: Model, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Attack one chunk already on the compute device, under eval() and no_grad; return points."""

    def _radius(self, n: int) -> float | torch.Tensor | None:
        """The checked radius (float or per-example CPU tensor), or None for a minimisation attack."""
        return None

    def _finish(self, x: torch.Tensor, x_adv: torch.Tensor, eps: Any) -> torch.Tensor:
        return x_adv.clamp(0.0, 1.0)

    # ---- the one entry point --------------------------------------------------------------

    @final
    def run(self, model: Model, x: torch.Tensor, y: torch.Tensor, *,
            targets: torch.Tensor | None = None) -> AttackResult:
        """Attack (x, y); see the module docstring. ``targets``: target labels for a targeted attack."""
        x0, y0 = _check_inputs(x, y)
        n = x0.shape[0]
        eps = self._radius(n)
        dev = _resolve_device(model, x, self.device)
        caller = x.device
        if n == 0:
            return AttackResult(x.detach().clone(), torch.zeros(0, dtype=torch.bool, device=caller))
        with _attack_mode(model), torch.no_grad():
            k = _check_logits(model(x0[:1].to(dev)), y0, 1)
            tgt = _check_targets(targets, y0, k) if targets is not None else None
            if eps is not None and not bool((torch.as_tensor(eps) > 0).any()):  # eps = 0: the clean points
                ok = torch.cat([model(x0[i : i + self.batch_size].to(dev)).argmax(1).to(caller)
                                for i in range(0, n, self.batch_size)])
                fooled = ok == tgt if tgt is not None else ok != y0
                return AttackResult(x.detach().clone(), fooled)
            out = torch.empty_like(x0)
            success = torch.empty(n, dtype=torch.bool, device=caller)
            for chunk, start in enumerate(range(0, n, self.batch_size)):
                sl = slice(start, start + self.batch_size)
                xb, yb = x0[sl].to(dev), y0[sl].to(dev)
                eb = _take(eps, sl)
                if isinstance(eb, torch.Tensor):
                    eb = eb.to(device=dev, dtype=xb.dtype)
                tb = None if tgt is None else tgt[sl].to(dev)
                gen = torch.Generator(device=dev).manual_seed(_chunk_seed(self.seed, chunk))
                xa = self._run(model, xb, yb, Batch(eb, tb, gen, k, sl))
                xa = self._finish(xb, xa.detach().to(xb.dtype), eb)
                inside = _in_ball(xb, xa, eb if eps is not None else 1.0, self.norm if eps is not None else "linf")
                if not bool(inside.all()):
                    raise RuntimeError(f"{type(self).__name__} returned points outside the ball or [0, 1]: a bug")
                pred = model(xa).argmax(dim=1)
                success[sl] = (pred == tb if tb is not None else pred != yb).to(caller)
                out[sl] = xa.to(caller)
        return AttackResult(out, success)

    @final
    def __call__(self, model: Model, x: torch.Tensor, y: torch.Tensor, *,
                 targets: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial points for (x, y) on x's device (see :meth:`run`)."""
        return self.run(model, x, y, targets=targets).x_adv

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class FixedEpsilonAttack(Attack):
    """An attack inside the ``norm`` ball of radius ``eps`` (a float, or a tensor (N,) of per-example radii)."""

    def __init__(self, eps: float | torch.Tensor, *, norm: str = "linf", seed: int = 0,
                 batch_size: int | None = None, device: str | torch.device | None = None) -> None:
        super().__init__(norm=norm, seed=seed, batch_size=batch_size, device=device)
        if isinstance(eps, torch.Tensor) and eps.ndim > 0:
            self.eps = eps  # checked against N at call time
        else:
            self.eps = _check_eps_vec(eps, 0)

    def _radius(self, n: int) -> float | torch.Tensor:
        return _check_eps_vec(self.eps, n)

    def _finish(self, x: torch.Tensor, x_adv: torch.Tensor, eps: Any) -> torch.Tensor:
        return _project(x_adv, x, eps, self.norm)


class MinimizationAttack(Attack):
    """An attack that searches for the smallest adversarial perturbation in ``norm`` (no radius)."""
