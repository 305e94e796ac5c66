"""Chapter 4: differential losses (000 eqs. 2, 5, 6, 7), the linear theory (000 Thm 2-3) and helpers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from marginlab import differential as D
from marginlab import losses


class _Linear(nn.Module):
    """f(x) = w·x + b, one output."""

    def __init__(self, d: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(d, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64).float())
            self.head.bias.fill_(0.3)

    def forward(self, x):
        return self.head(x)


def _batch(n_pos=3, n_neg=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_pos + n_neg, d, generator=g)
    y = torch.tensor([1] * n_pos + [-1] * n_neg)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def _naive(model, x, y, term):
    total, count = 0.0, 0
    for i in range(len(y)):
        for j in range(len(y)):
            if y[i] == 1 and y[j] != 1:
                with torch.no_grad():
                    d = float(model(x[i:i + 1])[0, 0] - model(x[j:j + 1])[0, 0])
                total += term(d)
                count += 1
    return total, count


@pytest.mark.parametrize("name,term", [
    ("pairwise_logistic_loss", lambda d: np.log1p(np.exp(-d))),         # 000 eq. 2 / 6
    ("squared_differential_loss", lambda d: (d - 1.0) ** 2),           # 000 eq. 7
])
def test_loss_matches_naive_double_loop(name, term):
    model = _Linear(4)
    x, y = _batch()
    total, count = _naive(model, x, y, term)
    fn = getattr(losses, name)
    assert fn(model, x, y, reduction="sum").item() == pytest.approx(total, rel=1e-5)
    assert fn(model, x, y).item() == pytest.approx(total / count, rel=1e-5)
    # {0,1} class indices give the same value as {-1,+1}
    assert fn(model, x, (y > 0).long()).item() == pytest.approx(total / count, rel=1e-5)


def test_two_logit_models_use_the_logit_difference():
    from marginlab.models import BinaryLogits

    model = _Linear(4)
    x, y = _batch()
    a = losses.squared_differential_loss(model, x, y)
    b = losses.squared_differential_loss(BinaryLogits(model), x, y)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_bias_cancels_in_differential_losses():
    model = _Linear(4)
    x, y = _batch()
    before = losses.pairwise_logistic_loss(model, x, y).item()
    with torch.no_grad():
        model.head.bias += 7.0
    assert losses.pairwise_logistic_loss(model, x, y).item() == pytest.approx(before, rel=1e-6)


@pytest.mark.parametrize("name", ["pairwise_logistic_loss", "squared_differential_loss"])
def test_gradcheck(name):
    x, y = _batch(seed=1)
    x = x.double()
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)

    class M(nn.Module):
        def forward(self, inp):
            return inp @ w

    fn = getattr(losses, name)
    assert torch.autograd.gradcheck(lambda w_: fn(type("Q", (nn.Module,), {"forward": lambda s, i: i @ w_})(), x, y),
                                    (w,))
    # analytic gradient of eq. 2 (mean): -1/(|I||J|) sum sigma(-m_ij)(x_i - y_j)
    if name == "pairwise_logistic_loss":
        loss = fn(M(), x, y)
        loss.backward()
        P, N = x[y == 1], x[y == -1]
        d = P[:, None, :] - N[None, :, :]
        m = d @ w.detach()
        expected = -(torch.sigmoid(-m)[..., None] * d).mean((0, 1))
        assert torch.allclose(w.grad, expected, atol=1e-10)


def test_clear_errors():
    model = _Linear(4)
    x, y = _batch()
    with pytest.raises(ValueError, match="lacks a class"):
        losses.pairwise_logistic_loss(model, x, torch.ones(len(y), dtype=torch.long))
    with pytest.raises(ValueError, match="lacks a class"):
        losses.squared_differential_loss(model, x, -torch.ones(len(y), dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        losses.pairwise_logistic_loss(model, x, torch.full((len(y),), 2))
    with pytest.raises(ValueError, match="inputs but"):
        losses.pairwise_logistic_loss(model, x, y[:-1])
    with pytest.raises(ValueError, match="reduction"):
        losses.pairwise_logistic_loss(model, x, y, reduction="max")
    three = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="one score"):
        losses.squared_differential_loss(three, x, y)
    with pytest.raises(ValueError):
        D.pairwise_logistic_gd(np.zeros((3, 2)), np.array([1, 1, 1]), 10, 0.1)
    with pytest.raises(ValueError):
        D.pairwise_logistic_gd(np.zeros((3, 2)), np.array([1, 0, -1]), 10, 0.1)


def test_eq5_bias_is_the_midpoint_and_gives_the_svm_margin():
    X, y = D.imbalanced_gaussians(10, 10, seed=0)
    X = X / 10
    w_svm, b_svm = D.svm(X, y)
    b = D.eq5_bias(w_svm, X, y)
    s = X @ w_svm
    assert b == pytest.approx(-0.5 * s[y == 1].min() - 0.5 * s[y == -1].max())
    assert D.linear_margin(w_svm, b, X, y) == pytest.approx(D.linear_margin(w_svm, b_svm, X, y), rel=1e-4)


@pytest.mark.parametrize("n_pos,n_neg", [(10, 10), (3, 60)])  # balanced and imbalanced, no resampling
def test_differential_gd_direction_tends_to_svm(n_pos, n_neg):
    """000 Thm 2: GD on eq. 2 converges in direction to w_SVM; eq. 5 then gives the SVM margin."""
    X, y = D.imbalanced_gaussians(n_pos, n_neg, seed=0)
    X = X / 10
    w_svm, b_svm = D.svm(X, y)
    w, path = D.pairwise_logistic_gd(X, y, 3000, 1.0, checkpoints=(100, 3000), normalized=True)
    assert D.angle_deg(w, w_svm) < 1.0
    assert D.angle_deg(path[3000], w_svm) < D.angle_deg(path[100], w_svm)
    m_svm = D.linear_margin(w_svm, b_svm, X, y)
    assert D.linear_margin(w, D.eq5_bias(w, X, y), X, y) == pytest.approx(m_svm, rel=1e-3)
    # plain fixed-step GD (the theorem's algorithm) moves towards w_SVM too, only slowly (1/log t)
    _, p = D.pairwise_logistic_gd(X, y, 2000, 1.0, checkpoints=(10, 2000))
    assert D.angle_deg(p[2000], w_svm) < D.angle_deg(p[10], w_svm)


def test_linear_toolkit_differential_gd_agrees():
    from marginlab import linear

    X, y = D.imbalanced_gaussians(6, 9, seed=2)
    X = X / 10
    w_ours, _ = D.pairwise_logistic_gd(X, y, 200, 0.5)
    w_tool = linear.differential_gd(X, y, 200, 0.5)
    # the toolkit may sum rather than average over pairs: compare directions of the first steps only
    assert D.angle_deg(w_ours, w_tool) < 5.0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), dim=st.integers(2, 6), n_pos=st.integers(1, 6), n_neg=st.integers(1, 6),
       extra=st.floats(0.0, 4.0))
def test_theorem3_one_step(seed, dim, n_pos, n_neg, extra):
    """000 Thm 3 / 001 Thm 6: if 2γ ≥ 5 max(R_x, R_y), one SGD step on any pair separates with eq. 5."""
    radius = 0.5
    # diameters <= 1, so separation >= 6 + 1 guarantees 2γ >= 6 >= 5 max(R)
    X, y = D.random_clusters(n_pos, n_neg, dim, separation=7.0 + extra, radius=radius, seed=seed)
    inst = D.theorem3_instance(X, y)
    assert inst.condition
    assert inst.one_step_suffices


def test_one_step_separates_matches_direct_check():
    X, y = D.random_clusters(4, 5, 3, separation=1.3, radius=0.5, seed=3)
    ok = D.one_step_separates(X, y)
    P, N = X[y == 1], X[y == -1]
    for i in range(len(P)):
        for j in range(len(N)):
            w = P[i] - N[j]
            b = D.eq5_bias(w, X, y)
            assert ok[i, j] == (np.all(P @ w + b >= 0) and np.all(N @ w + b <= 0))


def test_pair_usage_replays_balanced_sampler():
    y = torch.tensor([1] * 6 + [-1] * 10)
    u = D.pair_usage(y, batch_size=4, epochs=3, seed=0)
    # 5 batches per epoch (ceil(10/2)), 2x2 pairs each, 60 pairs in all
    assert u["evaluations"] == pytest.approx([0, 20 / 60, 40 / 60, 60 / 60])
    assert all(a <= b for a, b in zip(u["distinct"], u["distinct"][1:]))
    assert u["distinct"][-1] <= u["evaluations"][-1]
    with pytest.raises(ValueError):
        D.pair_usage(torch.ones(5), 4, 1)


def test_boundary_distances_of_a_line():
    X = np.array([[1.0, 0.0], [-2.0, 0.5], [0.5, 1.0]])
    y = np.array([1, -1, -1])
    d = D.boundary_distances(lambda P: P[:, 0], X, y, lim=(-3, 3, -3, 3), n=301)
    assert d == pytest.approx([1.0, 2.0, -0.5], abs=1e-6)


def test_set_eq5_bias_on_a_network():
    from marginlab.models import BinaryLogits, TwoLayerNet

    torch.manual_seed(0)
    model = BinaryLogits(TwoLayerNet(2, 8, 1))
    x = torch.randn(20, 2)
    y = torch.where(x[:, 0] > 0, 1, -1)
    D.set_eq5_bias(model, x, y, device="cpu")
    s = D.scores(model, x, device="cpu")
    assert float(s[y == 1].min()) == pytest.approx(-float(s[y == -1].max()), abs=1e-5)


# ---- device boundary, chunking and the cache key (issue 12) -----------------------------------


def _tiny_cifar(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([1, -1] * (n // 2))
    x = torch.rand(n, 3, 32, 32, generator=g) * 0.5 + 0.25 * (y > 0).float().view(-1, 1, 1, 1)
    return {"x_train": x, "y_train": y, "x_test": x[:8].clone(), "y_test": y[:8].clone()}


def test_cifar_cache_key_does_not_depend_on_the_device(tmp_path, monkeypatch):
    """Regression (issue 12 item 10): the test-accuracy callback captured the device, so the cache key did
    too and a model trained on the GPU was retrained on the CPU. Same run on two devices, one key."""
    device_strict = pytest.importorskip("device_strict")
    monkeypatch.setenv("MARGINLAB_CACHE", str(tmp_path))
    cfg = D.CifarConfig(n_train=32, n_test=8, epochs=1, batch_size=8, match_zero_error=False)
    try:  # train_cifar trains the chapter's job, on the real airplane/horse images
        D.load_airplane_horse(cfg.n_train, cfg.n_test)
    except (OSError, RuntimeError) as err:
        pytest.skip(f"CIFAR-10 airplane/horse images not available ({type(err).__name__}); set MARGINLAB_DATA")
    _, h_cpu = D.train_cifar("eq7", None, cfg, device="cpu")
    with device_strict.strict_device() as dev:
        _, h_dev = D.train_cifar("eq7", None, cfg, device=dev)
    assert not h_cpu.cached and h_dev.cached and h_cpu.meta["key"] == h_dev.meta.get("key", h_cpu.meta["key"])


def test_cifar_evaluation_moves_cpu_data_to_the_models_device():
    """Regression (issue 12 item 2 for chapter 4): every evaluation entry point gets CPU images and a model
    on the (imitated) accelerator; results come back on the CPU."""
    device_strict = pytest.importorskip("device_strict")
    from marginlab.models import BinaryLogits, LeNet

    data = _tiny_cifar()
    cfg = D.CifarConfig(pgd_steps=2, strong_steps=2, strong_restarts=1, unbounded_steps=2, cw_steps=2, cw_search=1,
                        deepfool_steps=2, epsilons=(0.0, 4 / 255, 8 / 255), eval_batch_size=5, aa_n_iter=2,
                        aa_n_queries=10)
    torch.manual_seed(0)
    with device_strict.strict_device() as dev:
        model = BinaryLogits(LeNet(in_channels=3, num_classes=1)).to(dev).eval()
        masks = D.robustness_masks(model, data["x_test"], data["y_test"], D.attack_specs(cfg), cfg.epsilons,
                                   batch_size=3)
        unb = D.unbounded_check(model, data["x_test"], data["y_test"], 2, batch_size=3)
        dist = D.minimal_l2(model, data["x_test"], data["y_test"], cfg)
        s = D.scores(model, data["x_test"])
    for t in [*masks.values(), dist, s]:
        assert t.device.type == "cpu" and not device_strict.is_device_tensor(t)
    assert masks["worst case"].shape == (3, 8) and 0.0 <= unb["accuracy"] <= 1.0


def test_robustness_masks_nested_and_worst_case():
    from marginlab.models import BinaryLogits, LeNet

    data = _tiny_cifar()
    cfg = D.CifarConfig(pgd_steps=3, strong_steps=3, strong_restarts=1, epsilons=(0.0, 2 / 255, 8 / 255, 32 / 255),
                        aa_n_iter=3, aa_n_queries=20)
    torch.manual_seed(0)
    model = BinaryLogits(LeNet(in_channels=3, num_classes=1)).eval()
    specs = D.attack_specs(cfg)
    assert specs[-1].name == "AutoAttack"  # the evaluation of record is always in the worst case (DESIGN §6)
    masks = D.robustness_masks(model, data["x_test"], data["y_test"], specs, cfg.epsilons, batch_size=3)
    for name in [s.name for s in specs] + ["worst case"]:
        m = masks[name]
        assert torch.equal(m[0], masks["clean"])          # eps = 0: clean correctness
        assert bool((m[1:] <= m[:-1]).all())               # nested: never robust again once broken
    worst = torch.stack([masks[s.name] for s in specs]).all(0)
    assert torch.equal(worst, masks["worst case"])
    curves = D.robustness_curves(model, data["x_test"], data["y_test"], specs, cfg.epsilons, batch_size=100)
    assert curves["worst case"] == [float(r.float().mean()) for r in masks["worst case"]]


def test_cifar_config_profiles(monkeypatch):
    for profile, smoke in [("standard", "0"), ("full", "1")]:
        monkeypatch.setenv("MARGINLAB_PROFILE", profile)
        monkeypatch.setenv("MARGINLAB_SMOKE", smoke)
        cfg, full = D.cifar_config(), D.CifarConfig()
        if profile == "standard":  # the full profile's optimiser and attack budgets
            same = ("optimizer", "lr", "batch_size", "epochs", "pgd_steps", "strong_steps", "strong_restarts",
                    "unbounded_steps", "cw_steps", "cw_search", "deepfool_steps", "epsilons", "cw_epsilons")
            assert all(getattr(cfg, k) == getattr(full, k) for k in same)
            assert cfg.n_attack_test >= 207 and cfg.match_zero_error
            assert cfg.autoattack_version == "standard" and cfg.aa_n_iter is None and cfg.aa_n_queries is None
        else:
            assert cfg.n_train <= 256 and cfg.n_test <= 128 and cfg.epochs == 1 and cfg.pgd_steps <= 3
            assert cfg.strong_restarts == 1 and len(cfg.epsilons) <= 2
            assert cfg.aa_n_iter <= 3 and cfg.aa_n_queries <= 20  # AutoAttack's code paths at toy budgets


def test_autoattack_spec_runs_with_its_budget_and_stays_in_the_ball():
    from marginlab import attacks
    from marginlab.models import BinaryLogits, LeNet

    data = _tiny_cifar()
    cfg = D.CifarConfig(autoattack_version="quick", aa_n_iter=2, aa_n_queries=5)
    spec = D.attack_specs(cfg)[-1]
    assert spec.fn == "autoattack" and spec.params["version"] == "quick"
    torch.manual_seed(0)
    model = BinaryLogits(LeNet(in_channels=3, num_classes=1)).eval()
    y01 = (data["y_test"] > 0).long()
    xa = spec.run(model, data["x_test"], y01, 8 / 255)
    attacks.assert_in_ball(data["x_test"], xa, 8 / 255, "linf")
    row = next(r for r in D.attack_table(cfg) if r["attack"] == "AutoAttack")
    assert "REDUCED" in row["other"] and row["steps"].startswith("2 ")


def test_attack_table_shows_the_images_attacked_not_the_caps():
    cfg = D.CifarConfig(n_attack_train=100, n_attack_test=2_000, n_cw=2_000)
    rows = D.attack_table(cfg, n_train=1_033, n_test=207)
    assert {r["images"] for r in rows} == {"100 train / 207 test", "207 test"}
    assert all("2000" not in r["images"] for r in rows)
    assert any("2000" in r["images"] for r in D.attack_table(cfg))  # without sizes: the configured caps
