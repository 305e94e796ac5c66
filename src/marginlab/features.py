"""Spectra of learned representations: PCA explained variance and effective rank (Nar et al. 2019a, §3, Fig. 2; Nar et al. 2019b, Fig. 3).

Nar et al. 2019a, Prop. 1 / App. B argue that cross-entropy training drives the penultimate features toward low rank; the
chapter measures it by the cumulative explained variance of the (centred) training features and, beyond the
paper, by the effective rank of Roy & Vetterli (2007). All spectra are computed in float64 on the CPU.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["explained_variance", "components_for", "effective_rank", "singular_values", "extract_features"]


def _as_matrix(F: Any) -> torch.Tensor:
    if isinstance(F, np.ndarray):
        F = torch.from_numpy(np.ascontiguousarray(F))
    if not isinstance(F, torch.Tensor):
        raise TypeError(f"features must be a tensor or array (N, d), got {type(F).__name__}")
    if F.dim() != 2:
        raise ValueError(f"features must be a matrix (N, d), got shape {tuple(F.shape)}")
    if F.shape[0] < 2 or F.shape[1] < 1:
        raise ValueError(f"need at least 2 examples and 1 feature, got shape {tuple(F.shape)}")
    F = F.detach().to("cpu", torch.float64)
    if not torch.isfinite(F).all():
        raise ValueError("features contain NaN or inf")
    return F


def singular_values(F: Any, centered: bool = True) -> np.ndarray:
    """Singular values (descending) of the feature matrix, column-centred by default."""
    F = _as_matrix(F)
    if centered:
        F = F - F.mean(0, keepdim=True)
    return torch.linalg.svdvals(F).numpy()


def explained_variance(F: Any) -> np.ndarray:
    """Cumulative explained-variance ratio of PCA on features F (N, d): entry k-1 is the share of the total
    variance captured by the top k principal components (Nar et al. 2019a, Fig. 2). Length min(N, d); ends at 1.

    PCA = SVD of the column-centred matrix; component variances are the squared singular values.
    Raises ``ValueError`` when the features have zero variance (every example has the same features).
    """
    s = singular_values(F, centered=True)
    var = s ** 2
    total = var.sum()
    if not total > 0:
        raise ValueError("features have zero variance (all rows equal): explained variance is undefined")
    cum = np.cumsum(var) / total
    return np.minimum(cum, 1.0)


def components_for(F_or_cumulative: Any, level: float = 0.99, tol: float = 1e-9) -> int:
    """Smallest k with cumulative explained variance ≥ ``level`` (Nar et al. 2019a, Fig. 2: 'rank 2', '≤ 20 of 84').

    Accepts the features (N, d) or an already computed cumulative curve (1-D). ``tol`` absorbs rounding, so
    that exactly rank-r data give k = r at level 1.0.
    """
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must be in (0, 1], got {level}")
    arr = F_or_cumulative
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 2:
        cum = explained_variance(arr)
    elif arr.ndim == 1:
        cum = arr
        if cum.size == 0 or np.any(np.diff(cum) < -1e-12) or cum[0] < -1e-12 or cum[-1] > 1 + 1e-9:
            raise ValueError("a 1-D input must be a non-decreasing cumulative explained-variance curve in [0, 1]")
    else:
        raise ValueError(f"expected features (N, d) or a cumulative curve (k,), got shape {arr.shape}")
    hits = np.nonzero(cum >= level - tol)[0]
    return int(hits[0]) + 1 if hits.size else int(cum.size)


def effective_rank(F: Any, centered: bool = True) -> float:
    """Effective rank (Roy & Vetterli 2007): exp(H(p)) with p_i = σ_i / Σ_j σ_j the L1-normalised singular
    values and H the Shannon entropy (natural log). Between 1 (rank one) and min(N, d) (flat spectrum).

    Centred by default (the spectrum of the feature *covariance*, as for PCA); ``centered=False`` analyses the
    raw matrix, where a common offset counts as one direction.
    """
    s = singular_values(F, centered=centered)
    total = s.sum()
    if not total > 0:
        raise ValueError("features are all zero (after centring): effective rank is undefined")
    p = s / total
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


@torch.no_grad()
def extract_features(model: nn.Module, x: torch.Tensor, batch_size: int | None = None,
                     device: str | torch.device | None = None) -> torch.Tensor:
    """``model.features(x)`` for all of x in eval mode under ``no_grad``: a (N, d) tensor on ``x``'s device.

    Computed on the model's device (``device`` overrides), ``batch_size`` rows at a time (default
    ``train.EVAL_BATCH_SIZE``); the model's train/eval flags are restored.
    """
    from .train import _as_x, _eval_batches, eval_mode

    if not hasattr(model, "features"):
        raise AttributeError(f"{type(model).__name__} has no .features(x) method")
    home = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    x = _as_x(x)
    outs = []
    with eval_mode(model):
        for _, xb in _eval_batches(model, x, batch_size, device):
            outs.append(model.features(xb).flatten(1))
    return torch.cat(outs).to(home)
