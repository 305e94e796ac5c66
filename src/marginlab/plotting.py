"""Shared figure helpers. Chapters call these so that figures look alike across the book."""
from __future__ import annotations

import matplotlib

matplotlib.use(matplotlib.get_backend())  # keep the inline backend in notebooks; Agg elsewhere
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# ---- section: common (lead) ------------------------------------------------------------------


def accuracy_vs_eps(ax, epsilons, curves: dict[str, list[float]], *, xlabel="ε", title=None):
    """Plot accuracy-vs-eps curves (one per label) on ``ax``; accuracies as fractions."""
    for label, acc in curves.items():
        ax.plot(epsilons, 100 * np.asarray(acc, dtype=float), marker="o", ms=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    return ax


def margin_histograms(ax, margins: dict[str, np.ndarray], bins=40, *, xlabel="margin", title=None):
    """Overlaid histograms of per-example margins, one per label."""
    all_m = np.concatenate([np.asarray(m, dtype=float).ravel() for m in margins.values()])
    all_m = all_m[np.isfinite(all_m)]
    edges = np.histogram_bin_edges(all_m, bins=bins) if all_m.size else bins
    for label, m in margins.items():
        m = np.asarray(m, dtype=float).ravel()
        ax.hist(m[np.isfinite(m)], bins=edges, alpha=0.5, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    return ax


def explained_variance(ax, cumulative: dict[str, np.ndarray], *, levels=(0.9, 0.99), title=None):
    """Cumulative explained variance vs number of components, one curve per label."""
    for label, cum in cumulative.items():
        cum = np.asarray(cum, dtype=float)
        ax.plot(np.arange(1, cum.size + 1), cum, marker=".", label=label)
    for level in levels:
        ax.axhline(level, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("number of principal components")
    ax.set_ylabel("cumulative explained variance")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    return ax


def decision_boundary_2d(ax, score_fn, X, y, *, lim=None, levels=(0.0,), n=300, label=None, color="k", ls="-"):
    """Draw the zero level set of ``score_fn`` (maps (M, 2) arrays to (M,) scores) over 2-D data ``X``, labels ±1."""
    X = np.asarray(X, dtype=float)
    if lim is None:
        lo, hi = X.min(0), X.max(0)
        pad = 0.25 * (hi - lo).max() + 1e-9
        lim = (lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad)
    gx, gy = np.meshgrid(np.linspace(lim[0], lim[1], n), np.linspace(lim[2], lim[3], n))
    z = np.asarray(score_fn(np.c_[gx.ravel(), gy.ravel()]), dtype=float).reshape(gx.shape)
    cs = ax.contour(gx, gy, z, levels=list(levels), colors=color, linestyles=ls)
    if label:
        cs.collections[0].set_label(label) if hasattr(cs, "collections") else ax.plot([], [], color=color, ls=ls, label=label)
    ax.scatter(*X[np.asarray(y) > 0].T, marker="o", c="tab:blue", s=18)
    ax.scatter(*X[np.asarray(y) <= 0].T, marker="x", c="tab:red", s=18)
    ax.set_xlim(lim[0], lim[1])
    ax.set_ylim(lim[2], lim[3])
    ax.set_aspect("equal")
    return ax

# ---- end section: common ---------------------------------------------------------------------

# ---- section: chapters 1-2 -------------------------------------------------------------------
# ---- end section: chapters 1-2 ---------------------------------------------------------------

# ---- section: chapter 3 ----------------------------------------------------------------------
# ---- end section: chapter 3 ------------------------------------------------------------------

# ---- section: chapter 4 ----------------------------------------------------------------------
# ---- end section: chapter 4 ------------------------------------------------------------------

# ---- section: chapter 5 ----------------------------------------------------------------------
# ---- end section: chapter 5 ------------------------------------------------------------------

# ---- section: chapter 6 ----------------------------------------------------------------------
# ---- end section: chapter 6 ------------------------------------------------------------------
