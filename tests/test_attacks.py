"""marginlab.attacks: DESIGN §2 conventions and §6 sanity rules on a small trained MNIST model."""
from __future__ import annotations

import functools
import math
import os

import pytest
import torch
from torch import nn

from marginlab import attacks

N = 200


def _synthetic(n: int, seed: int = 0):
    """Fallback data: 4 classes of noisy 12x12 templates (used when MARGINLAB_DATA is unset)."""
    templates = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(1234))  # shared by all splits
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = (0.6 * templates[y] + 0.4 * torch.rand(n, 1, 12, 12, generator=g)).clamp(0, 1)
    return x, y


class SmallCNN(nn.Module):
    """conv-BN-ReLU -> conv-ReLU -> linear: BatchNorm makes the eval()/train() convention observable."""

    def __init__(self, channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.head = nn.Linear(16 * 16, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def setup(one_thread):
    torch.manual_seed(0)
    if os.environ.get("MARGINLAB_DATA"):
        from marginlab import data

        xtr, ytr = data.load("mnist", "train")
        xte, yte = data.load("mnist", "test")
        k, epochs = 10, 2
    else:  # documented fallback: the §6 rules do not depend on the data set
        xtr, ytr = _synthetic(2000, 0)
        xte, yte = _synthetic(N, 1)
        k, epochs = 4, 6
    model = SmallCNN(num_classes=k)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    x, y = xte[:N].clone(), yte[:N].clone()
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    assert clean > 0.7, f"test model too weak ({clean:.2f})"
    return model, x, y, clean


LINF = [0.0, 0.02, 0.05, 0.1, 0.2]
L2 = [0.0, 0.5, 1.0, 2.0, 3.0]
STEPS = 10


def _attack(norm, **kw):
    return functools.partial(attacks.pgd, steps=STEPS, norm=norm, **kw)


@pytest.mark.parametrize("norm,eps", [("linf", LINF), ("l2", L2)])
def test_section6_rules(setup, norm, eps):
    model, x, y, clean = setup
    # raw curves (every example attacked afresh at every eps): their monotonicity tests the attack
    acc = attacks.robust_accuracy(model, x, y, _attack(norm), eps, nested=False)
    fgsm = attacks.robust_accuracy(model, x, y, functools.partial(attacks.fgsm, norm=norm), eps, nested=False)
    more_steps = attacks.robust_accuracy(model, x, y, functools.partial(attacks.pgd, steps=3 * STEPS, norm=norm), eps,
                                         nested=False)
    restarts = attacks.robust_accuracy(model, x, y, _attack(norm, restarts=3), eps, nested=False)
    nested = attacks.robust_accuracy(model, x, y, _attack(norm), eps)
    # not exactly stronger: the random starts differ when only the survivors are attacked
    assert all(b <= a + 0.02 for a, b in zip(acc, nested)), ("nested evaluation must not be weaker", acc, nested)
    assert all(b2 <= b1 for b1, b2 in zip(nested, nested[1:])), "nested curves are monotone by construction"
    unbounded_eps = 1.0 if norm == "linf" else math.sqrt(x[0].numel())
    xu = attacks.pgd(model, x, y, unbounded_eps, 50, norm=norm, loss="margin")
    unbounded = attacks.worst_case_accuracy(model, x, y, [xu])
    median = float(attacks.perturbation_norms(x, xu, norm).median())
    report = attacks.assert_sanity(eps, acc, clean=clean, unbounded=unbounded, median_distortion=median,
                                   stronger=[more_steps], single_step=fgsm, label=f"PGD-{norm}")
    assert report["ok"] and set(report) >= {"monotone", "eps0_is_clean", "unbounded_zero", "more_effort_not_higher",
                                            "iterative_beats_single_step"}
    assert acc[0] == pytest.approx(clean)
    # restarts keep the per-example worst case and restart 0 is the single run: never higher, exactly
    assert all(r <= a + 1e-12 for r, a in zip(restarts, acc)), (restarts, acc)
    assert acc[-1] < clean  # the attack does something


def test_sanity_report_flags_violations():
    eps = [0, 0.1, 0.2]
    bad = attacks.sanity_report(eps, [0.9, 0.5, 0.7], clean=0.8, unbounded=0.1, stronger=[[0.9, 0.6, 0.7]],
                                single_step=[0.9, 0.4, 0.3], transfer=[0.9, 0.4, 0.6])
    assert not bad["ok"]
    assert bad["monotone"] is False and bad["eps0_is_clean"] is False and bad["unbounded_zero"] is False
    assert bad["more_effort_not_higher"] is False and bad["iterative_beats_single_step"] is False
    assert bad["whitebox_beats_transfer"] is False
    with pytest.raises(AssertionError, match="monotone|rises"):
        attacks.assert_sanity(eps, [0.9, 0.5, 0.7])
    good = attacks.check_sanity(eps, [0.9, 0.5, 0.2], clean=0.9, transfer=[0.9, 0.6, 0.5])
    assert good["ok"] and "OK" in good["message"]
    assert attacks.check_sanity(eps, [0.9, 0.5, 0.7], strict=False)["ok"] is False


ALL = [
    ("fgsm", lambda m, x, y, e, n: attacks.fgsm(m, x, y, e, norm=n)),
    ("pgd", lambda m, x, y, e, n: attacks.pgd(m, x, y, e, 5, norm=n, restarts=2)),
    ("pgd-margin-nostop", lambda m, x, y, e, n: attacks.pgd(m, x, y, e, 5, norm=n, loss="margin", early_stop=False)),
    ("pgd-bigstep", lambda m, x, y, e, n: attacks.pgd(m, x, y, e, 3, step_size=10 * e, norm=n)),
    ("multi_target", lambda m, x, y, e, n: attacks.multi_target(m, x, y, e, 3, norm=n, num_targets=3)),
]


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
@pytest.mark.parametrize("name,fn", ALL, ids=[a[0] for a in ALL])
def test_in_ball_and_box_and_untouched(setup, name, fn, norm, eps):
    model, x, y, _ = setup
    xs, ys = x[:64], y[:64]
    x_copy, y_copy = xs.clone(), ys.clone()
    xa = fn(model, xs, ys, eps, norm)
    assert torch.equal(xs, x_copy) and torch.equal(ys, y_copy)
    assert xa.shape == xs.shape and xa.dtype == xs.dtype and xa.device == xs.device
    assert float(xa.min()) >= 0 and float(xa.max()) <= 1
    d = attacks.perturbation_norms(xs, xa, norm)
    assert float(d.max()) <= eps * (1 + 1e-5) + 1e-6, float(d.max())
    attacks.assert_in_ball(xs, xa, eps, norm)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_minimal_attacks_box_and_success(setup, norm):
    model, x, y, _ = setup
    xs, ys = x[:64], y[:64]
    x_copy = xs.clone()
    xd = attacks.deepfool(model, xs, ys, norm=norm)
    assert torch.equal(xs, x_copy) and float(xd.min()) >= 0 and float(xd.max()) <= 1
    with torch.no_grad():
        assert float((model(xd).argmax(1) != ys).float().mean()) > 0.9
    dist, pts = attacks.minimal_perturbation(model, xs, ys, norm=norm, methods=("deepfool",), return_points=True)
    with torch.no_grad():
        wrong = model(xs).argmax(1) != ys
        fooled = model(pts).argmax(1) != ys
    assert torch.all(dist[wrong] == 0)
    assert torch.all(fooled | torch.isinf(dist))
    assert torch.allclose(dist[torch.isfinite(dist)], attacks.perturbation_norms(xs, pts, norm)[torch.isfinite(dist)])


def test_cw_minimal_and_unchanged_where_not_found(setup):
    model, x, y, _ = setup
    xs, ys = x[:32], y[:32]
    xc = attacks.cw_l2(model, xs, ys, steps=100, lr=0.05, binary_search_steps=4, initial_const=1.0)
    assert float(xc.min()) >= 0 and float(xc.max()) <= 1
    with torch.no_grad():
        fooled = model(xc).argmax(1) != ys
        wrong = model(xs).argmax(1) != ys
    assert torch.equal(xc[~fooled], xs[~fooled])  # nothing found: returned unchanged
    assert torch.equal(xc[wrong], xs[wrong])  # already misclassified: distance 0
    assert float(fooled.float().mean()) > 0.5
    # CW (an L2 optimiser) is not much worse than DeepFool where both succeed
    xd = attacks.deepfool(model, xs, ys)
    with torch.no_grad():
        both = fooled & (model(xd).argmax(1) != ys) & ~wrong
    dc = attacks.perturbation_norms(xs[both], xc[both]).median()
    dd = attacks.perturbation_norms(xs[both], xd[both]).median()
    assert dc <= 1.5 * dd
    # accuracy at distances: distance 0 counts as wrong, inf as robust
    d = attacks.minimal_perturbation(model, xs, ys, cw=dict(steps=50, binary_search_steps=3, initial_const=1.0))
    curve = attacks.accuracy_at_distances(d, [0.0, 0.5, 1.0, 100.0])
    assert curve[0] == pytest.approx(float((~wrong).float().mean()))
    assert curve == sorted(curve, reverse=True)
    assert attacks.accuracy_at_distances([0.0, 1.0, float("inf")], [0, 2]) == [2 / 3, 1 / 3]


def test_mode_params_and_batchnorm_restored(setup):
    model, x, y, _ = setup
    model.train()
    model.body[1].eval()  # a mixed-mode model must come back exactly as it was
    model.head.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        attacks.pgd(model, x[:32], y[:32], 0.1, 3)
        attacks.deepfool(model, x[:16], y[:16], steps=3)
        attacks.cw_l2(model, x[:8], y[:8], steps=5, binary_search_steps=1)
        attacks.multi_target(model, x[:8], y[:8], 0.1, 2, num_targets=2)
        attacks.robust_accuracy(model, x[:16], y[:16], _attack("linf"), [0, 0.1])
        assert model.training and model.body[0].training and not model.body[1].training
        assert model.head.weight.requires_grad is False and model.head.bias.requires_grad is True
        assert all(p.grad is None for p in model.parameters())
        for k, v in model.state_dict().items():  # BatchNorm running stats and counters untouched
            assert torch.equal(v, state[k]), k
    finally:
        model.eval()
        model.head.weight.requires_grad_(True)


def test_eps_zero_and_determinism(setup):
    model, x, y, _ = setup
    xs, ys = x[:32], y[:32]
    x0 = attacks.pgd(model, xs, ys, 0.0, 5)
    assert torch.equal(x0, xs) and x0.data_ptr() != xs.data_ptr()
    for norm, eps in (("linf", 0.05), ("l2", 1.0)):
        a = attacks.pgd(model, xs, ys, eps, 4, norm=norm, seed=3, restarts=2)
        b = attacks.pgd(model, xs, ys, eps, 4, norm=norm, seed=3, restarts=2)
        c = attacks.pgd(model, xs, ys, eps, 4, norm=norm, seed=4, restarts=2, early_stop=False)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    assert torch.equal(attacks.multi_target(model, xs, ys, 0.05, 2, num_targets=2, seed=1),
                       attacks.multi_target(model, xs, ys, 0.05, 2, num_targets=2, seed=1))


def test_targeted_and_early_stop(setup):
    model, x, y, _ = setup
    xs, ys = x[:64], y[:64]
    k = model(xs[:1]).shape[1]
    target = (ys + 1) % k
    xa = attacks.pgd(model, xs, ys, 0.3, 20, targeted=target, loss="margin")
    with torch.no_grad():
        hit = model(xa).argmax(1) == target
    assert float(hit.float().mean()) > 0.5
    # early stop keeps the first adversarial iterate: never fewer successes than the final iterate
    kw = dict(steps=10, random_start=False)
    with torch.no_grad():
        es = model(attacks.pgd(model, xs, ys, 0.05, **kw)).argmax(1) != ys
        fi = model(attacks.pgd(model, xs, ys, 0.05, early_stop=False, **kw)).argmax(1) != ys
    assert torch.all(es | ~fi)


def test_clear_errors(setup):
    model, x, y, _ = setup
    xs, ys = x[:4], y[:4]
    with pytest.raises(ValueError, match="eps"):
        attacks.pgd(model, xs, ys, -0.1, 3)
    with pytest.raises(ValueError, match="NaN"):
        attacks.fgsm(model, xs, ys, float("nan"))
    with pytest.raises(ValueError, match="norm"):
        attacks.pgd(model, xs, ys, 0.1, 3, norm="l1")
    with pytest.raises(ValueError, match="loss"):
        attacks.pgd(model, xs, ys, 0.1, 3, loss="hinge")
    with pytest.raises(ValueError, match="shape"):
        attacks.pgd(model, xs, ys[:3], 0.1, 3)
    with pytest.raises(ValueError, match="labels"):
        attacks.pgd(model, xs, torch.full((4,), 99), 0.1, 3)
    with pytest.raises(ValueError, match="labels"):
        attacks.deepfool(model, xs, torch.full((4,), -1))
    with pytest.raises(ValueError, match="integer"):
        attacks.cw_l2(model, xs, ys.float(), steps=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attacks.pgd(model, xs * 2 - 1, ys, 0.1, 3)
    with pytest.raises(ValueError, match="steps"):
        attacks.pgd(model, xs, ys, 0.1, -1)
    with pytest.raises(ValueError, match="eps"):
        attacks.robust_accuracy(model, xs, ys, _attack("linf"), [0.1, -1])
    with pytest.raises(ValueError, match="logits"):
        attacks.pgd(lambda t: t.flatten(1)[:, 0], xs, ys, 0.1, 2)
    with pytest.raises(ValueError, match="CW"):
        attacks.minimal_perturbation(model, xs, ys, norm="linf")
    with pytest.raises(AssertionError, match="ball"):  # an attack that cheats is caught
        attacks.robust_accuracy(model, xs, ys, lambda m, a, b, e: (a + 2 * e).clamp(0, 1), [0.1])


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
def test_pgd_per_example_eps(setup, norm, eps):
    model, x, y, _ = setup
    xs, ys = x[:48], y[:48]
    radii = eps * torch.linspace(0.0, 1.0, len(xs))  # includes a zero radius
    for kw in (dict(restarts=2), dict(early_stop=False, loss="margin")):
        xa = attacks.pgd(model, xs, ys, radii, 8, norm=norm, seed=2, **kw)
        d = attacks.perturbation_norms(xs, xa, norm)
        assert torch.all(d <= radii.double() * (1 + 1e-5) + 1e-6), "left its own ball"
        assert float(xa.min()) >= 0 and float(xa.max()) <= 1
        assert float(d[0]) == 0.0  # eps_i = 0: the clean point
        # equal radii reproduce the scalar attack (float noise aside)
        a = attacks.pgd(model, xs, ys, torch.full((len(xs),), eps), 8, norm=norm, seed=2, **kw)
        b = attacks.pgd(model, xs, ys, eps, 8, norm=norm, seed=2, **kw)
        assert torch.allclose(a, b, atol=1e-5)
    # per-example budgets are not all the same strength: bigger radii fool at least as often overall
    big = attacks.pgd(model, xs, ys, torch.full((len(xs),), eps), 8, norm=norm, seed=2)
    with torch.no_grad():
        fooled_big = float((model(big).argmax(1) != ys).float().mean())
        fooled_mix = float((model(attacks.pgd(model, xs, ys, radii, 8, norm=norm, seed=2)).argmax(1) != ys)
                           .float().mean())
    assert fooled_mix <= fooled_big + 0.05


def test_pgd_per_example_eps_errors(setup):
    model, x, y, _ = setup
    xs, ys = x[:4], y[:4]
    with pytest.raises(ValueError, match="shape"):
        attacks.pgd(model, xs, ys, torch.full((3,), 0.1), 3)
    with pytest.raises(ValueError, match=">= 0"):
        attacks.pgd(model, xs, ys, torch.tensor([0.1, -0.1, 0.1, 0.1]), 3)
    with pytest.raises(ValueError, match="NaN"):
        attacks.pgd(model, xs, ys, torch.tensor([0.1, float("nan"), 0.1, 0.1]), 3)
    with pytest.raises(ValueError, match="finite"):
        attacks.pgd(model, xs, ys, torch.tensor([0.1, float("inf"), 0.1, 0.1]), 3)
    assert torch.equal(attacks.pgd(model, xs, ys, torch.zeros(4), 3), xs)


def test_margin_gap_and_correct(setup):
    z = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    assert torch.allclose(attacks.margin_gap(z, torch.tensor([0, 0])), torch.tensor([-1.0, 3.0]))
    with pytest.raises(ValueError):
        attacks.margin_gap(z, torch.tensor([0]))
    model, x, y, clean = setup
    model.train()
    ok = attacks.correct(model, x, y, batch_size=64)
    assert model.training and all(m.training for m in model.modules())  # mode restored
    model.eval()
    assert ok.dtype == torch.bool and ok.shape == y.shape
    assert float(ok.float().mean()) == pytest.approx(clean)
    with torch.no_grad():
        assert torch.equal(ok, attacks.margin_gap(model(x), y) < 0)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError):
        attacks.correct(model, x, y[:3])


def test_attack_objects_chunks_and_device_boundary(setup):
    model, x, y, _ = setup
    xs, ys = x[:48], y[:48]
    # the functional API is a thin wrapper over the class
    assert torch.equal(attacks.PGD(0.1, 5, seed=2)(model, xs, ys), attacks.pgd(model, xs, ys, 0.1, 5, seed=2))
    res = attacks.PGD(0.1, 5, seed=2).run(model, xs, ys)
    assert torch.equal(res.success, ~attacks.correct(model, res.x_adv, ys))
    # chunks are independent: chunk 0 of a chunked run is the unchunked run of those rows
    chunked = attacks.PGD(0.1, 5, seed=2, batch_size=16)(model, xs, ys)
    assert torch.equal(chunked[:16], attacks.PGD(0.1, 5, seed=2)(model, xs[:16], ys[:16]))
    attacks.assert_in_ball(xs, chunked, 0.1)
    # minimisation attacks: outputs in the box, success = misclassified
    df = attacks.DeepFool(steps=10).run(model, xs, ys)
    assert torch.equal(df.success, ~attacks.correct(model, df.x_adv, ys))
    # an explicit device other than the model's is refused (the model is not moved behind the caller's back)
    with pytest.raises(ValueError, match="device"):
        attacks.pgd(model, xs, ys, 0.1, 2, device="meta")
    with pytest.raises(ValueError, match="batch_size"):
        attacks.PGD(0.1, 2, batch_size=0)
