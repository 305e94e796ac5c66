"""Shared figure helpers. Chapters call these so that figures look alike across the book."""
from __future__ import annotations

import matplotlib.pyplot as plt  # noqa: F401  (re-exported for chapters)
import numpy as np

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


def log_time_errors(ax, t, errors: dict[str, np.ndarray], *, reference: bool = True, ylabel="relative error"):
    """Errors vs time on log-log axes (Nar et al. 2019b, Thm 1: ||w̃(t)/log t − limit|| decays like 1/log t).

    With ``reference`` a dotted C/log t curve is fitted to the last point of each curve."""
    t = np.asarray(t, dtype=float)
    for label, err in errors.items():
        err = np.asarray(err, dtype=float)
        (line,) = ax.loglog(t, err, marker="o", ms=3, label=label)
        if reference:
            ax.loglog(t, err[-1] * np.log(t[-1]) / np.log(t), ls=":", color=line.get_color(), lw=1)
    ax.set_xlabel("t (gradient-descent steps)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize=8)
    return ax


def linear_boundaries(ax, X, y, boundaries: dict[str, tuple], *, lim=None, styles=None):
    """Points of two classes in 2-D and the lines w·x + b = 0 of several linear classifiers."""
    X = np.asarray(X, dtype=float)
    y = np.asarray(y)
    if lim is None:
        lo, hi = X.min(0), X.max(0)
        pad = 0.3 * (hi - lo).max() + 1.0
        lim = (lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad)
    styles = styles or {}
    xs = np.linspace(lim[0], lim[1], 400)
    for k, (label, (w, b)) in enumerate(boundaries.items()):
        w = np.asarray(w, dtype=float).ravel()
        st = {"color": f"C{k + 2}", "ls": "-", **styles.get(label, {})}
        if abs(w[1]) > 1e-12 * np.linalg.norm(w):
            ax.plot(xs, -(w[0] * xs + b) / w[1], label=label, **st)
        else:
            ax.axvline(-b / w[0], label=label, **st)
    ax.scatter(*X[y > 0].T, c="tab:blue", marker="o", s=25, label="class +1", zorder=3)
    ax.scatter(*X[y <= 0].T, c="tab:orange", marker="s", s=25, label="class −1", zorder=3)
    ax.set_xlim(lim[0], lim[1])
    ax.set_ylim(lim[2], lim[3])
    ax.set_aspect("equal")
    ax.legend(frameon=False, fontsize=8)
    return ax


def confidence_map(ax, w, b, lim, X=None, y=None, *, n=200, title=None):
    """Image of the confidence σ(|w·x + b|) of a linear classifier over a 2-D box (Nar et al. 2019b, Remark 2)."""
    gx, gy = np.meshgrid(np.linspace(lim[0], lim[1], n), np.linspace(lim[2], lim[3], n))
    s = np.c_[gx.ravel(), gy.ravel()] @ np.asarray(w, dtype=float).ravel() + float(b)
    conf = 1.0 / (1.0 + np.exp(-np.abs(s)))
    im = ax.imshow(conf.reshape(gx.shape), origin="lower", extent=lim, vmin=0.5, vmax=1.0, cmap="viridis",
                   aspect="auto")
    if X is not None:
        X = np.asarray(X, dtype=float)
        ax.scatter(*X[np.asarray(y) > 0].T, c="tab:blue", edgecolors="w", s=25)
        ax.scatter(*X[np.asarray(y) <= 0].T, c="tab:orange", marker="s", edgecolors="w", s=25)
    if title:
        ax.set_title(title, fontsize=9)
    return im

# ---- end section: chapters 1-2 ---------------------------------------------------------------

# ---- section: chapter 3 ----------------------------------------------------------------------


def singular_value_ratios(ax, traces: dict, *, k: int = 2, floor: float = 1e-17, yscale: str = "log", title=None):
    """σ_k/σ_1 of the feature matrix against the training step (log axis), one curve per labelled
    :class:`marginlab.lowrank.SpectrumTrace`; on a log ``yscale`` exact zeros are drawn at ``floor``."""
    for label, tr in traces.items():
        steps = np.asarray(tr.steps, dtype=float)
        r = np.maximum(tr.ratio(k), floor) if yscale == "log" else tr.ratio(k)
        ax.plot(np.maximum(steps, 0.5), r, marker=".", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale(yscale)
    ax.set_xlabel("gradient step (step 0 drawn at 0.5)")
    ax.set_ylabel(f"σ{k} / σ1 of the features")
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize="small")
    if title:
        ax.set_title(title)
    return ax


def curves_over_epochs(ax, curves: dict, *, ylabel: str, marks: dict | None = None, title=None):
    """One curve per label, ``curves[label] = (epochs, values)``; ``marks[label]`` = an epoch to mark
    (e.g. the first epoch with zero training error), drawn as a dot on the curve."""
    for label, (epochs, values) in curves.items():
        (line,) = ax.plot(epochs, values, label=label)
        e = (marks or {}).get(label)
        if e is not None and e in list(epochs):
            ax.plot([e], [list(values)[list(epochs).index(e)]], "o", color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    if title:
        ax.set_title(title)
    return ax

# ---- end section: chapter 3 ------------------------------------------------------------------

# ---- section: chapter 4 ----------------------------------------------------------------------


def train_test_robustness(ax, epsilons, curves_train: dict, curves_test: dict, *, scale=255, title=None):
    """Nar et al. 2019a, Fig. 4 layout: accuracy vs eps, solid = adversarials from training images, dashed = from test
    images; one colour per model (``curves_*``: {model label: accuracies})."""
    for k, label in enumerate(curves_train):
        color = f"C{k}"
        e = np.asarray(epsilons, dtype=float) * scale
        ax.plot(e, 100 * np.asarray(curves_train[label]), "-o", ms=3, color=color, label=f"{label} (train)")
        if label in curves_test:
            ax.plot(e, 100 * np.asarray(curves_test[label]), "--s", ms=3, color=color, label=f"{label} (test)")
    ax.set_xlabel("ε (Linf, ×1/255)" if scale == 255 else "ε")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def one_step_vs_ratio(ax, ratios, success, *, threshold=5.0, title=None):
    """Nar et al. 2019a, Thm 3: whether one SGD step separated each random instance, against its 2γ/max(R_x, R_y)."""
    r, s = np.asarray(ratios, float), np.asarray(success, float)
    jitter = np.random.default_rng(0).uniform(-0.03, 0.03, s.size)
    ax.scatter(r, s + jitter, s=8, alpha=0.5)
    ax.axvline(threshold, color="k", ls=":", label=f"2γ = {threshold:g}·max(R)")
    ax.set_xscale("log")
    ax.set_yticks([0, 1], ["no", "yes"])
    ax.set_xlabel("2γ / max(R_x, R_y)")
    ax.set_ylabel("one step separates")
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    return ax

# ---- end section: chapter 4 ------------------------------------------------------------------

# ---- section: chapter 5 ----------------------------------------------------------------------


def class_vectors_2d(ax, w, *, features=None, title=None, colors=("tab:blue", "tab:orange", "tab:green")):
    """Xu et al. 2020, Fig. 2: 2-D class vectors w_k as arrows, features coloured by their predicted class."""
    w = np.asarray(w, dtype=float)
    if features is not None:
        f = np.asarray(features, dtype=float)
        pred = np.argmax(f @ w.T, axis=1)
        for k in range(w.shape[0]):
            ax.scatter(*f[pred == k].T, s=3, alpha=0.35, color=colors[k % len(colors)])
    for k, v in enumerate(w):
        ax.annotate("", xy=v, xytext=(0, 0), arrowprops=dict(arrowstyle="->", lw=2, color=colors[k % len(colors)]))
        ax.text(*(1.12 * v), f"$w_{k + 1}$", ha="center", va="center")
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-1.3, 1.3)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    return ax


def loss_slices(ax, ts, curves: dict[str, np.ndarray], *, ylabel="loss", title=None, band=True):
    """1-D slices of a loss along a direction: median over examples with an interquartile band."""
    ts = np.asarray(ts, dtype=float)
    for label, c in curves.items():
        c = np.asarray(c, dtype=float)
        (line,) = ax.plot(ts, np.median(c, axis=0), label=label)
        if band and c.shape[0] > 1:
            ax.fill_between(ts, np.quantile(c, 0.25, axis=0), np.quantile(c, 0.75, axis=0),
                            color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step t along the direction")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def grouped_bars(ax, groups: dict[str, dict[str, float]], *, ylabel="accuracy (%)", title=None):
    """Bars grouped by outer key (e.g. method), one bar per inner key (e.g. attack); values in %."""
    outer = list(groups)
    inner = list(dict.fromkeys(k for g in groups.values() for k in g))
    width = 0.8 / max(len(inner), 1)
    x = np.arange(len(outer))
    for i, key in enumerate(inner):
        vals = [groups[o].get(key, np.nan) for o in outer]
        ax.bar(x + (i - (len(inner) - 1) / 2) * width, vals, width, label=key)
    ax.set_xticks(x, outer)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(frameon=False, fontsize=7, ncol=min(len(inner), 4))
    if title:
        ax.set_title(title)
    return ax

# ---- end section: chapter 5 ------------------------------------------------------------------

# ---- section: chapter 6 ----------------------------------------------------------------------


def margin_over_epochs(ax, epochs, curves: dict[str, list[float]], *, refs: dict[str, float] | None = None,
                       logx: bool = False, ylabel="margin", title=None):
    """Margin curves vs epoch (Wu & Yu 2019, Fig 1a-b, 2, 6), with horizontal reference lines (e.g. the SVM's)."""
    for label, vals in curves.items():
        ax.plot(epochs, np.asarray(vals, dtype=float), marker="." if len(epochs) < 30 else None, label=label)
    for i, (label, val) in enumerate((refs or {}).items()):
        ax.axhline(val, color=f"C{i + len(curves)}", ls="--", lw=1, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def margin_histogram_row(axes, snapshots: dict[int, np.ndarray], *, reference: np.ndarray | None = None,
                         reference_label="SVM", bins=30, xlabel="margin"):
    """One histogram per epoch on shared bins (Wu & Yu 2019, Fig 1c, 5, 7); ``reference`` is overlaid on every panel."""
    arrays = [np.asarray(m, dtype=float) for m in snapshots.values()]
    if reference is not None:
        arrays.append(np.asarray(reference, dtype=float))
    allm = np.concatenate([a[np.isfinite(a)] for a in arrays])
    edges = np.histogram_bin_edges(allm, bins=bins)
    for ax, (epoch, m) in zip(np.ravel(axes), snapshots.items()):
        m = np.asarray(m, dtype=float)
        ax.hist(m[np.isfinite(m)], bins=edges, alpha=0.7, label=f"epoch {epoch}")
        if reference is not None:
            ax.hist(np.asarray(reference, dtype=float), bins=edges, histtype="step", color="k", label=reference_label)
        ax.set_title(f"epoch {epoch}", fontsize=9)
        ax.set_xlabel(xlabel)
    np.ravel(axes)[0].set_ylabel("count")
    np.ravel(axes)[0].legend(frameon=False, fontsize=7)
    return axes

# ---- end section: chapter 6 ------------------------------------------------------------------
