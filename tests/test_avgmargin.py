"""Chapter 6 (003, Wu & Yu 2019): AMR and Parseval penalties, linear margin tracking, estimators."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from marginlab import avgmargin as am
from marginlab import config, losses, margins


class _Lin(nn.Module):
    def __init__(self, d: int, k: int, bias: bool = True):
        super().__init__()
        self.head = nn.Linear(d, k, bias=bias)

    def features(self, x):
        return x

    def forward(self, x):
        return self.head(x)


def _amr_reference(W, b, X, y, lam, tau, beta):
    """003 eq. 4 written out in numpy (mean over the batch)."""
    Z = X @ W.T + b
    ce = np.mean(np.log(np.exp(Z - Z.max(1, keepdims=True)).sum(1)) + Z.max(1) - Z[np.arange(len(y)), y])
    marg = np.array([min(Z[i, y[i]] - Z[i, k] for k in range(W.shape[0]) if k != y[i]) for i in range(len(y))])
    gram = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
    orth = ((gram - np.eye(gram.shape[0])) ** 2).sum()
    return ce - lam * np.minimum(marg, tau).mean() + beta * orth


@pytest.mark.parametrize("tau,beta", [(0.3, 0.0), (100.0, 0.0), (0.5, 1e-2)])
def test_amr_loss_matches_direct_formula(tau, beta):
    torch.manual_seed(0)
    m = _Lin(6, 4).double()
    X = torch.randn(32, 6, dtype=torch.float64) * 2
    y = torch.randint(0, 4, (32,))
    got = float(losses.amr_loss(lam=0.1, tau=tau, beta=beta)(m, X, y).detach())
    W, b = m.head.weight.detach().numpy(), m.head.bias.detach().numpy()
    want = _amr_reference(W, b, X.numpy(), y.numpy(), 0.1, tau, beta)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-10)


def test_truncation_stops_the_margin_gradient():
    """Points whose feature margin exceeds τ do not push further (003 §4.3: maximise the average only up to τ)."""
    m = _Lin(2, 2, bias=False).double()
    with torch.no_grad():
        m.head.weight.copy_(torch.tensor([[10.0, 0.0], [-10.0, 0.0]], dtype=torch.float64))
    X = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # margin z0 − z1 = 20
    y = torch.tensor([0])
    ce_only = losses.amr_loss(lam=0.0, tau=5.0, beta=0.0)
    for tau, expect_extra in ((5.0, False), (50.0, True)):
        m.zero_grad()
        losses.amr_loss(lam=0.1, tau=tau, beta=0.0)(m, X, y).backward()
        g = m.head.weight.grad.clone()
        m.zero_grad()
        ce_only(m, X, y).backward()
        differs = not torch.allclose(g, m.head.weight.grad)
        assert differs == expect_extra
    # the truncated value is −λτ on top of the cross-entropy
    val = float((losses.amr_loss(lam=0.1, tau=5.0, beta=0.0)(m, X, y) - ce_only(m, X, y)).detach())
    assert val == pytest.approx(-0.5)
    # misclassified points (negative margins) are never truncated
    Xw = torch.tensor([[-1.0, 0.0]], dtype=torch.float64)
    val = float((losses.amr_loss(lam=0.1, tau=5.0, beta=0.0)(m, Xw, y) - ce_only(m, Xw, y)).detach())
    assert val == pytest.approx(2.0)


def test_amr_normalized_uses_feature_distance():
    m = _Lin(3, 3, bias=False).double()
    with torch.no_grad():
        m.head.weight.copy_(torch.eye(3, dtype=torch.float64) * 2)
    X = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    plain = float(losses.amr_loss(lam=1.0, tau=100, beta=0.0)(m, X, y).detach())
    norm = float(losses.amr_loss(lam=1.0, tau=100, beta=0.0, normalize=True)(m, X, y).detach())
    ce = float(losses.amr_loss(lam=0.0, tau=100, beta=0.0)(m, X, y).detach())
    assert ce - plain == pytest.approx(2.0)              # z0 − z1 = 2
    assert ce - norm == pytest.approx(2.0 / np.sqrt(8))  # divided by ‖w0 − w1‖ = 2√2


@pytest.mark.parametrize("shape", [(4, 9), (9, 4), (5, 5)])
def test_parseval_penalty_zero_for_orthogonal(shape):
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(max(shape), min(shape), dtype=torch.float64))
    lin = nn.Linear(shape[1], shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(q if shape[0] >= shape[1] else q.T)
    assert float(losses.orthogonality_penalty(lin).detach()) == pytest.approx(0.0, abs=1e-20)
    with torch.no_grad():
        lin.weight.mul_(1.1)
    assert float(losses.orthogonality_penalty(lin).detach()) > 1e-3


def test_parseval_penalty_conv_and_retraction():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5))
    before = float(losses.orthogonality_penalty(net).detach())
    assert before > 0
    for _ in range(50):
        losses.parseval_retract(net, beta=0.1)
    after = float(losses.orthogonality_penalty(net).detach())
    assert after < 1e-3 * before  # the retraction converges to a Parseval-tight frame
    with pytest.raises(ValueError):
        losses.orthogonality_penalty(nn.ReLU())
    with pytest.raises(ValueError):
        losses.parseval_retract(net, beta=-1)
    x = torch.randn(4, 2, 4, 4)
    yb = torch.randint(0, 5, (4,))
    val = losses.parseval_loss(beta=0.5)(net, x, yb)
    ce = nn.functional.cross_entropy(net(x), yb)
    assert float(val.detach()) == pytest.approx(float((ce + 0.5 * losses.orthogonality_penalty(net)).detach()), rel=1e-6)


def test_loss_errors():
    m = _Lin(3, 3)
    with pytest.raises(ValueError):
        losses.amr_loss(tau=0.0)
    with pytest.raises(ValueError):
        losses.amr_loss(lam=-1)
    with pytest.raises(ValueError):
        losses.parseval_loss(beta=-1)
    with pytest.raises(ValueError, match="labels"):
        losses.amr_loss()(m, torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer"):
        losses.feature_margins(torch.randn(2, 3), torch.tensor([0.0, 1.0]))


def _toy():
    """A tiny separable 2-D set whose SVM margin (0.5·√2 ... ) is computed by cvxpy in the test."""
    rng = np.random.default_rng(0)
    pos = rng.normal([2.0, 2.0], 0.6, size=(20, 2))
    neg = rng.normal([-1.0, -0.5], 0.6, size=(20, 2))
    X = np.r_[pos, neg]
    y = np.r_[np.ones(20), -np.ones(20)]
    return X, y


def test_signed_margins_match_toolkit():
    X, y = _toy()
    w, b = np.array([0.3, -1.2]), 0.4
    np.testing.assert_allclose(am.signed_linear_margins(w, b, X, y), margins.linear_margins(w, b, X, y), rtol=1e-12)


def test_logistic_tracker_min_margin_rises_to_svm():
    X, y = _toy()
    svm = am.svm_margins(X, y)
    gamma = float(svm["train"].min())
    tr = am.logistic_sgd_margins(X, y, epochs=20000, lr=0.5, momentum=0.0, batch_size=None, track_every=1)
    ep = np.asarray(tr.epochs)
    mins = np.asarray(tr.train_min)
    means = np.asarray(tr.train_mean)
    # golden values (full-batch GD from w = 0; first epoch = one step): w ∝ mean of y_i x_i
    w1 = 0.5 * 0.5 * (y[:, None] * X).mean(0)
    b1 = 0.5 * 0.5 * y.mean()
    np.testing.assert_allclose(tr.train_min[0], am.signed_linear_margins(w1, b1, X, y).min(), rtol=1e-12)
    # minimum margin: non-decreasing along log-spaced checkpoints after separation, and → the SVM's
    checkpoints = [e for e in (10, 100, 1000, 10000, 20000)]
    seq = [mins[ep == e][0] for e in checkpoints]
    assert all(b_ >= a - 1e-9 for a, b_ in zip(seq, seq[1:])), seq
    assert seq[-1] <= gamma + 1e-9
    assert gamma - seq[-1] < 0.25 * gamma
    assert gamma - seq[-1] < gamma - seq[1]
    # the SVM's average margin is below the early average margin on this toy, as in 003 Fig 1
    assert svm["train"].mean() < means[ep == 10][0]
    assert tr.train_error[-1] == 0.0


def test_logistic_tracker_sgd_snapshots_and_test_set():
    X, y = _toy()
    tr = am.logistic_sgd_margins(X[:30], y[:30], X[30:], y[30:], epochs=5, batch_size=8, seed=3, snapshot_epochs=(2,))
    assert tr.epochs == [1, 2, 3, 4, 5]
    assert set(tr.snapshots[2]) == {"train", "test"} and tr.snapshots[2]["test"].shape == (10,)
    again = am.logistic_sgd_margins(X[:30], y[:30], X[30:], y[30:], epochs=5, batch_size=8, seed=3)
    assert again.train_mean == tr.train_mean  # same seed, same numbers


def test_tracker_errors():
    X, y = _toy()
    with pytest.raises(ValueError, match="-1, \\+1"):
        am.logistic_sgd_margins(X, (y > 0).astype(int), epochs=1)
    with pytest.raises(ValueError):
        am.logistic_sgd_margins(X, y, epochs=0)
    with pytest.raises(ValueError):
        am.logistic_sgd_margins(X, y, X[:, :1], y, epochs=1)
    with pytest.raises(ValueError, match="undefined"):
        am.signed_linear_margins(np.zeros(2), 0.0, X, y)
    Xn = np.r_[X, [[2.0, 2.0]]]
    with pytest.raises(ValueError, match="not linearly separable"):
        am.svm_margins(Xn, np.r_[y, -1])
    with pytest.raises(ValueError):
        am.make_model("resnet", "mnist")


def test_lipschitz_bound_is_exact_for_linear_model():
    """003 §4.1: the lower bound (3) is tight for linear f (when below r)."""
    torch.manual_seed(0)
    model = am.make_model("lr", "mnist")
    x = torch.rand(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))
    est = am.estimate_margins(model, x, y, r=50.0, n_samples=4, upper=False)
    np.testing.assert_allclose(est["lower"], est["exact"], rtol=1e-4, atol=1e-6)
    assert am.summarize(np.array([1.0, np.inf, -2.0])) == (-2.0, -0.5)


def test_cpu_threads_restores_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with config.cpu_threads(1, "cpu"):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), config.cpu_threads(1, "cpu"):
            raise RuntimeError("restored even on error")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---- device boundary and per-example results (issue 12) ----------------------------------------


def test_margin_curves_and_robustness_move_cpu_points_to_the_models_device():
    """Regression (issue 12 item 3): the margin-curve callback and the Table-1 evaluation handed CPU points to
    a model trained on the accelerator (chapter 6 died at epoch 1). Device-strict mode imitates the GPU."""
    device_strict = pytest.importorskip("device_strict")
    torch.manual_seed(0)
    x, y = torch.rand(24, 1, 28, 28), torch.randint(0, 10, (24,))
    with device_strict.strict_device() as dev:
        mc = am.margin_curves(am.make_model("mlp", "mnist", seed=0), x, y, {"test": (x[:4], y[:4])}, epochs=1,
                              track=(0, 1), n_samples=4, device=dev, batch_size=8)
        model = am.make_model("lr", "mnist", seed=0).to(dev)
        res = am.evaluate_robustness(model, x, y, epsilons=(0.5, 2.0), steps=3, n_margin=4, n_samples=4,
                                     unbounded_eps=100.0, batch_size=7, autoattack_budget=TOY_AA)
    assert mc.epochs == [0, 1] and np.isfinite(mc.margins["test"]["lower"][-1]).all()
    pe = res["per_example"]
    assert pe["clean"].device.type == "cpu" and not device_strict.is_device_tensor(pe["clean"])
    assert len(pe["worst"][2.0]) == 24 and res["worst"] == [float(pe["worst"][e].double().mean()) for e in (0.5, 2.0)]


def test_robust_masks_nested_and_extra_attacks_join_the_worst_case():
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    model = am.make_model("lr", "mnist", seed=0)
    m = am.robust_masks(model, x, y, am.l2_pgd(3), [0.0, 0.5, 1.0, 3.0], batch_size=5)
    assert m.shape == (4, 16) and bool((m[1:] <= m[:-1]).all())
    from marginlab import attacks

    fgm = lambda mdl, xb, yb, e: attacks.fgsm(mdl, xb, yb, e, norm="l2")  # noqa: E731
    res = am.evaluate_robustness(model, x, y, epsilons=(0.5, 3.0), steps=3, n_margin=2, n_samples=2,
                                 unbounded_eps=100.0, extra_attacks={"FGM": fgm}, autoattack_budget=TOY_AA)
    assert res["attack"]["ensemble"] == ["L2-PGD", "AutoAttack", "FGM"]
    assert all(w <= p + 1e-12 for w, p in zip(res["worst"], res["pgd"]))


TOY_AA = {"n_iter": 3, "n_target_classes": 2, "n_queries": 20}


def test_l2_autoattack_is_in_the_worst_case_on_the_images_it_attacked():
    """Issue 14: L2 AutoAttack joins every Table-1 evaluation; the record (worst case) rests on the images it
    attacked (the first ``autoattack_n``), PGD and clean accuracy on all of them."""
    from marginlab import attacks

    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    model = am.make_model("lr", "mnist", seed=0)
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct
    atk = am.l2_autoattack("quick", n_iter=3, n_queries=20)
    xa = atk(model, x, y, 0.5)
    attacks.assert_in_ball(x, xa, 0.5, "l2")
    res = am.evaluate_robustness(model, x, y, epsilons=(0.5, 3.0), steps=3, n_margin=2, n_samples=2,
                                 unbounded_eps=100.0, autoattack="quick", autoattack_budget=TOY_AA, autoattack_n=6)
    pe = res["per_example"]
    assert len(pe["AutoAttack"][3.0]) == 6 and len(pe["worst"][3.0]) == 6 and len(pe["L2-PGD"][3.0]) == 16
    for e in (0.5, 3.0):
        assert torch.equal(pe["worst"][e], pe["AutoAttack"][e] & pe["L2-PGD"][e][:6])
    assert res["n_worst"] == 6 and res["attack"]["autoattack_images"] == 6
    assert "version='quick'" in res["attack"]["autoattack"] and "n_iter=3" in res["attack"]["autoattack"]
    none = am.evaluate_robustness(model, x, y, epsilons=(0.5, 3.0), steps=3, n_margin=2, n_samples=2,
                                  unbounded_eps=100.0, autoattack=None)
    assert none["attack"]["ensemble"] == ["L2-PGD"] and none["worst"] == none["pgd"]


def test_stronger_pgd_keeps_the_step_size(monkeypatch):
    """Regression: with Table 1's fixed step (0.01), the 'more effort' PGD of the §6 sanity rule used
    2.5·eps/steps instead and covered less ground than the attack it checks (standard run: 55.7% vs 53.4%
    at eps 1.5). More effort means more steps at the same step size."""
    calls = []
    real = am.l2_pgd

    def spy(steps, step_size=None, seed=0):
        calls.append((steps, step_size))
        return real(steps, step_size, seed)

    monkeypatch.setattr(am, "l2_pgd", spy)
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    model = am.make_model("lr", "mnist", seed=0)
    am.evaluate_robustness(model, x, y, epsilons=(0.5,), steps=3, step_size=0.05, stronger_steps=6,
                           n_margin=2, n_samples=2, unbounded_eps=100.0, autoattack=None)
    assert (3, 0.05) in calls and (6, 0.05) in calls


def test_average_margin_trends_reads_from_epoch_1_and_from_the_papers_first_epoch_of_steps():
    curve = {"epochs": [1, 10, 20, 30], "train_lower_mean": [0.5, 0.9, 0.8, 0.7],
             "test_lower_mean": [0.4, 0.6, 0.6, float("nan")]}
    out = am.average_margin_trends(curve, n_train=3678)  # 29 steps an epoch: epoch 20 is the first with >= 469
    assert list(out) == ["epoch 1", "epoch 20"]
    assert out["epoch 1"]["train avg margin change"] == pytest.approx(0.2)
    assert out["epoch 20"]["train avg margin change"] == pytest.approx(-0.1)
    assert out["epoch 20"]["steps at start"] == 580
    assert math.isnan(out["epoch 20"]["test avg margin change"])  # one finite value after epoch 20: no trend
    assert list(am.average_margin_trends(curve, n_train=60_000)) == ["epoch 1"]  # the paper's own epochs
