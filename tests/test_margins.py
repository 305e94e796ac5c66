"""marginlab.margins: exact linear margins, the Lipschitz lower bound (003 Thm 2) and the attack upper bound."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from marginlab import attacks, margins


def test_binary_linear_margins_exact():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 7))
    w, b = rng.normal(size=7), 0.3
    y = np.where(X @ w + b + rng.normal(scale=0.5, size=50) > 0, 1, -1)
    m = margins.linear_margins(w, b, X, y)
    direct = np.array([yi * (xi @ w + b) / np.sqrt(np.sum(w**2)) for xi, yi in zip(X, y)])
    assert isinstance(m, np.ndarray) and m.dtype == np.float64
    np.testing.assert_allclose(m, direct, rtol=0, atol=1e-12)
    try:
        from marginlab import linear
    except ImportError:  # pragma: no cover
        linear = None
    if linear is not None and hasattr(linear, "margin"):
        assert margins.min_average(m)[0] == pytest.approx(linear.margin(w, b, X, y), abs=1e-12)
    # the same through torch tensors (float32 inputs are promoted to float64)
    mt = margins.linear_margins(torch.tensor(w, dtype=torch.float32)[None], torch.tensor(b), torch.tensor(X),
                                torch.tensor(y))
    assert mt.dtype == torch.float64
    np.testing.assert_allclose(mt.numpy(), direct, atol=1e-6)
    lo, mean = margins.min_average(m)
    assert lo == pytest.approx(direct.min()) and mean == pytest.approx(direct.mean())


def test_multiclass_linear_margins_exact():
    """Distance to the predicted region's boundary = distance to the nearest projection that changes the prediction."""
    rng = np.random.default_rng(1)
    K, d, n = 4, 6, 40
    W, b = rng.normal(size=(K, d)), rng.normal(size=K)
    X = rng.normal(size=(n, d))
    y = rng.integers(0, K, size=n)
    m = margins.linear_margins(W, b, X, y)
    Z = X @ W.T + b
    pred = Z.argmax(1)
    for i in range(n):
        c = pred[i]
        dists = [(Z[i, c] - Z[i, j]) / np.linalg.norm(W[c] - W[j]) for j in range(K) if j != c]
        expected = min(dists) * (1 if c == y[i] else -1)
        assert m[i] == pytest.approx(expected, abs=1e-12)
        # moving by |m| (+tiny) along the nearest facet's normal changes the prediction; by |m| (-tiny) not
        j = [j for j in range(K) if j != c][int(np.argmin(dists))]
        u = (W[j] - W[c]) / np.linalg.norm(W[j] - W[c])
        assert (W @ (X[i] + (abs(m[i]) + 1e-9) * u) + b).argmax() != c
        assert (W @ (X[i] + (abs(m[i]) - 1e-9) * u) + b).argmax() == c


def test_linear_margins_errors():
    with pytest.raises(ValueError, match=r"\{-1, \+1\}"):
        margins.linear_margins(np.ones(3), 0.0, np.ones((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="non-zero"):
        margins.linear_margins(np.zeros(3), 0.0, np.ones((2, 3)), np.array([1, -1]))
    with pytest.raises(ValueError, match="features"):
        margins.linear_margins(np.ones(3), 0.0, np.ones((2, 4)), np.array([1, -1]))
    with pytest.raises(ValueError, match="labels"):
        margins.linear_margins(np.ones((3, 4)), np.zeros(3), np.ones((2, 4)), np.array([0, 3]))


@settings(max_examples=40, deadline=None)
@given(
    X=arrays(np.float64, (8, 3), elements=st.floats(-10, 10)),
    w=arrays(np.float64, 3, elements=st.floats(-5, 5)).filter(lambda v: np.linalg.norm(v) > 1e-3),
    b=st.floats(-5, 5),
    scale=st.floats(0.01, 100),
)
def test_linear_margin_properties(X, w, b, scale):
    y = np.where(X @ w + b >= 0, 1, -1)
    m = margins.linear_margins(w, b, X, y)
    assert np.all(m >= -1e-12)  # labels from the classifier itself: every margin >= 0
    # scale invariance of (w, b) and the point-to-hyperplane distance formula via the projection
    np.testing.assert_allclose(margins.linear_margins(scale * w, scale * b, X, y), m, rtol=1e-9, atol=1e-9)
    proj = X - ((X @ w + b) / (w @ w))[:, None] * w
    np.testing.assert_allclose(np.abs(m), np.linalg.norm(X - proj, axis=1), rtol=1e-7, atol=1e-7)
    # flipping every label flips every margin
    np.testing.assert_allclose(margins.linear_margins(w, b, X, -y), -m, atol=1e-12)


def test_lipschitz_bound_exact_on_linear_model():
    """003 Thm 2 is tight for a linear f: gradients are constant, so the estimate is the exact margin."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    x = (torch.rand(20, 1, 4, 4, dtype=torch.float64) * 0.2 + 0.4)
    y = torch.randint(0, 3, (20,))
    lin = model[1]
    exact = torch.as_tensor(margins.linear_margins(lin.weight, lin.bias, x, y))
    r = 5.0
    assert bool((exact.abs() < r).all())
    bound = margins.lipschitz_lower_bound(model, x, y, r=r, n_samples=16, batch_size=8, seed=0)
    torch.testing.assert_close(bound.double(), exact, rtol=1e-5, atol=1e-7)
    # capped at r (a radius smaller than every margin)
    small = margins.lipschitz_lower_bound(model, x, y, r=1e-4, n_samples=4)
    torch.testing.assert_close(small.abs().double(), torch.full((20,), 1e-4, dtype=torch.float64))
    # deterministic under the seed
    again = margins.lipschitz_lower_bound(model, x, y, r=r, n_samples=16, batch_size=8, seed=0)
    assert torch.equal(bound, again)


def _reference_lipschitz(model, x, y, r, n_samples, seed, norm="l2"):
    """Per-point, per-class reference of 003 Thm 2's estimate on the same samples (one point, one class at a time)."""
    out = []
    with torch.no_grad():
        z0 = model(x)
    for i in range(len(x)):
        c = int(z0[i].argmax())
        pts = margins._point_samples(x[i].reshape(-1), r, n_samples, norm, seed, i)
        assert torch.equal(pts[0], x[i].reshape(-1))  # the centre is one of the samples
        best = np.inf
        for j in range(z0.shape[1]):
            if j == c:
                continue
            lip = 0.0
            for p in pts:
                p = p.view(1, *x.shape[1:]).clone().requires_grad_(True)
                z = model(p)
                (g,) = torch.autograd.grad(z[0, c] - z[0, j], p)
                g = g.flatten().double()
                lip = max(lip, float(g.abs().sum() if norm == "linf" else g.norm()))
            gap = float(z0[i, c] - z0[i, j])
            if lip > 0:
                best = min(best, gap / lip)
        m = min(best, r)
        out.append(m if c == int(y[i]) else -m)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_lipschitz_bound_batched_equals_per_point_reference(norm):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.rand(7, 3, 2, 2)
    y = torch.randint(0, 4, (7,))
    ref = _reference_lipschitz(model, x, y, r=0.5, n_samples=10, seed=5, norm=norm)
    # packed points (3 per batch, the last batch short), one point per batch, and chunked samples (n > batch)
    for bs in (30, 10, 4, 1024):
        got = margins.lipschitz_lower_bound(model, x, y, r=0.5, n_samples=10, batch_size=bs, seed=5, norm=norm)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_lipschitz_bound_deterministic_and_batch_independent():
    """A point's samples depend on (seed, its index, n_samples) only: the same seed gives the same numbers,
    whatever the batching (up to float summation order) and whichever other points are in the call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 3))
    x, y = torch.rand(9, 20), torch.randint(0, 3, (9,))
    kw = dict(r=2.0, n_samples=300)  # > one sample block, so chunks straddle blocks for odd batch sizes
    a = margins.lipschitz_lower_bound(model, x, y, batch_size=1024, seed=1, **kw)
    assert torch.equal(a, margins.lipschitz_lower_bound(model, x, y, batch_size=1024, seed=1, **kw))
    for bs in (7, 100, 256, 5000):
        torch.testing.assert_close(margins.lipschitz_lower_bound(model, x, y, batch_size=bs, seed=1, **kw), a,
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(margins.lipschitz_lower_bound(model, x[:4], y[:4], seed=1, **kw), a[:4],
                               rtol=1e-5, atol=1e-6)
    assert not torch.equal(a, margins.lipschitz_lower_bound(model, x, y, seed=2, **kw))
    # samples lie in the ball, uniformly enough that their mean radius is near d/(d+1) r
    pts = margins._point_samples(x[0], 2.0, 2000, "l2", 1, 0)
    radii = (pts - x[0]).norm(dim=1)
    assert pts.shape == (2000, 20) and float(radii.max()) <= 2.0 + 1e-6
    assert float(radii[1:].mean()) == pytest.approx(2.0 * 20 / 21, rel=0.02)
    assert torch.equal(pts[300:700], margins._point_samples(x[0], 2.0, 2000, "l2", 1, 0, 300, 700))
    assert len(margins.lipschitz_lower_bound(model, x[:0], y[:0], **kw)) == 0


def test_lipschitz_bound_below_attack_distance_on_nonlinear_net():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 10, generator=g)
    y = (x[:, :5].sum(1) > x[:, 5:].sum(1)).long() + 2 * (x[:, 0] > 0.5).long()
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    xs, ys = x[:40], y[:40]
    lower = margins.lipschitz_lower_bound(model, xs, ys, r=1.0, n_samples=256, batch_size=256)
    upper = margins.upper_bound(model, xs, ys, methods=("deepfool",))
    with torch.no_grad():
        correct = model(xs).argmax(1) == ys
    assert correct.float().mean() > 0.7
    assert bool((lower[correct] > 0).all()) and bool((lower[~correct] <= 0).all())
    df = attacks.minimal_perturbation(model, xs, ys, methods=("deepfool",))
    ok = correct & torch.isfinite(df)
    assert bool((lower[ok].double() <= df[ok] + 1e-6).all()), (lower[ok], df[ok])
    # upper bound is signed like the margin and bounds |m| from above
    fin = torch.isfinite(upper)
    assert bool((lower[fin].double().abs() <= upper[fin].abs() + 1e-6).all())
    assert bool((torch.sign(upper[fin]) == torch.where(correct[fin], 1.0, -1.0).double()).all())
    assert all(p.grad is None for p in model.parameters())


def test_histogram_and_errors():
    counts, edges = margins.histogram(torch.tensor([0.1, 0.2, float("inf"), -0.3]), bins=3)
    assert counts.sum() == 3 and len(edges) == 4
    with pytest.raises(ValueError, match="NaN"):
        margins.histogram([float("nan")], bins=3)
    with pytest.raises(ValueError):
        margins.min_average([])
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="r must"):
        margins.lipschitz_lower_bound(model, torch.rand(2, 4), torch.tensor([0, 1]), r=0.0, n_samples=4)
    with pytest.raises(ValueError, match="labels"):
        margins.lipschitz_lower_bound(model, torch.rand(2, 4), torch.tensor([0, 5]), r=1.0, n_samples=4)
