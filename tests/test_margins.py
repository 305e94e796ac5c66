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
    kw = dict(r=2.0, n_samples=margins.SAMPLE_BLOCK + 300)  # > one sample block: chunks straddle blocks
    a = margins.lipschitz_lower_bound(model, x, y, batch_size=4096, seed=1, **kw)
    assert torch.equal(a, margins.lipschitz_lower_bound(model, x, y, batch_size=4096, seed=1, **kw))
    for bs in (77, 1000, 1024, 20000):
        torch.testing.assert_close(margins.lipschitz_lower_bound(model, x, y, batch_size=bs, seed=1, **kw), a,
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(margins.lipschitz_lower_bound(model, x[:4], y[:4], seed=1, **kw), a[:4],
                               rtol=1e-5, atol=1e-6)
    assert not torch.equal(a, margins.lipschitz_lower_bound(model, x, y, seed=2, **kw))
    # samples lie in the ball, uniformly enough that their mean radius is near d/(d+1) r
    pts = margins._point_samples(x[0], 2.0, 3000, "l2", 1, 0)
    radii = (pts - x[0]).norm(dim=1)
    assert pts.shape == (3000, 20) and pts.dtype == torch.float32 and float(radii.max()) <= 2.0 + 1e-5
    assert float(radii[1:].mean()) == pytest.approx(2.0 * 20 / 21, rel=0.02)
    assert torch.equal(pts[300:2700], margins._point_samples(x[0], 2.0, 3000, "l2", 1, 0, 300, 2700))
    box = margins._point_samples(x[0], 0.5, 3000, "linf", 1, 0)
    assert float((box - x[0]).abs().max()) <= 0.5 + 1e-6 and float((box - x[0]).abs().max()) > 0.49
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


# ------------------------------------------------------------------------------------------------
# the float64 CPU implementation this package used before the device-side sampler (kept as a reference)


def _old_ball_samples(x, r, n, norm, gen):
    d = x.numel()
    if norm == "linf":
        delta = (torch.rand((n, d), generator=gen, dtype=torch.float64) * 2 - 1) * r
    else:
        u = torch.randn((n, d), generator=gen, dtype=torch.float64)
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
        delta = u * (r * torch.rand((n, 1), generator=gen, dtype=torch.float64).pow(1.0 / d))
    return x.reshape(1, -1) + delta.to(dtype=x.dtype)


def _old_lipschitz_float64(model, x, y, r, n_samples, seed=0, norm="l2", block=256):
    """One point at a time, samples drawn on the CPU in float64 (blocks of 256 from per-block generators)."""
    out = []
    with torch.no_grad():
        z0 = model(x)
    k = z0.shape[1]
    for i in range(len(x)):
        c = int(z0[i].argmax())
        parts = []
        for blk in range((n_samples - 1) // block + 1):
            st = np.random.SeedSequence([seed, i, blk]).generate_state(2, np.uint32)
            gen = torch.Generator().manual_seed(int(st[0]) << 31 | int(st[1]) >> 1)
            pts = _old_ball_samples(x[i].reshape(-1), r, min(block, n_samples - blk * block), norm, gen)
            if blk == 0:
                pts[0] = x[i].reshape(-1)
            parts.append(pts)
        pts = torch.cat(parts).view(-1, *x.shape[1:]).requires_grad_(True)
        z = model(pts)
        lip = []
        for j in range(k):
            (g,) = torch.autograd.grad((z[:, c] - z[:, j]).sum(), pts, retain_graph=True)
            g = g.flatten(1).double()
            lip.append(float((g.abs().sum(1) if norm == "linf" else g.norm(dim=1)).max()))
        gaps = (z0[i, c] - z0[i]).double()
        best = min((float(gaps[j]) / lip[j] for j in range(k) if j != c and lip[j] > 0), default=np.inf)
        m = min(best, r)
        out.append(m if c == int(y[i]) else -m)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_lipschitz_bound_matches_the_old_float64_cpu_sampler(norm):
    """Sampling on the model's device in float32 changes the samples, not the estimate: on a fixed smooth net in
    low dimension, where many samples pin the ball's largest gradient down, both samplers agree within 2 %
    (and exactly on a linear model, whose gradient is constant)."""
    torch.manual_seed(11)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 24), nn.Tanh(), nn.Linear(24, 3))
    x = torch.rand(6, 1, 2, 2)
    y = torch.randint(0, 3, (6,))
    r = 0.3 if norm == "l2" else 0.15
    old = _old_lipschitz_float64(net, x, y, r, 3000, seed=0, norm=norm)
    new = margins.lipschitz_lower_bound(net, x, y, r=r, n_samples=3000, seed=0, norm=norm)
    assert new.dtype == torch.float32
    torch.testing.assert_close(new.double(), old, rtol=0.02, atol=1e-6)
    assert not torch.equal(new.double(), old)  # the samples did change
    lin = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    torch.testing.assert_close(margins.lipschitz_lower_bound(lin, x, y, r=5.0, n_samples=50, norm=norm).double(),
                               _old_lipschitz_float64(lin, x, y, 5.0, 50, norm=norm), rtol=1e-5, atol=1e-6)


def test_estimators_return_on_the_callers_device_and_restore_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    x, y = torch.rand(10, 5), torch.randint(0, 3, (10,))
    low = margins.lipschitz_lower_bound(model, x, y, r=1.0, n_samples=20, device="cpu")
    up = margins.upper_bound(model, x, y, methods=("deepfool",), batch_size=3)
    assert low.device == x.device and up.device == x.device and up.dtype == torch.float64
    assert model.training and all(p.requires_grad for p in model.parameters())
    # chunking over points does not change the upper bound
    torch.testing.assert_close(up, margins.upper_bound(model, x, y, methods=("deepfool",)), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        margins.lipschitz_lower_bound(model, x, y, r=1.0, n_samples=4, batch_size=0)
    with pytest.raises(ValueError, match="norm"):
        margins.lipschitz_lower_bound(model, x, y, r=1.0, n_samples=4, norm="l7")


def test_multiclass_linear_margins_need_no_n_by_k_by_d_tensor():
    """Large (N, d) inputs: the facet normals' norms come from the (K, K) table, so memory is O(N K + K^2 d)."""
    rng = np.random.default_rng(4)
    W, b = rng.normal(size=(10, 3072)), rng.normal(size=10)
    X = rng.random(size=(2000, 3072))
    y = rng.integers(0, 10, size=2000)
    m = margins.linear_margins(W, b, X, y)
    Z = X[:5] @ W.T + b
    for i in range(5):
        c = Z[i].argmax()
        ref = min((Z[i, c] - Z[i, j]) / np.linalg.norm(W[c] - W[j]) for j in range(10) if j != c)
        assert abs(m[i]) == pytest.approx(ref, rel=1e-12)
