"""Cross-check of marginlab.attacks against foolbox 3 (Rauber et al. 2017) on the same trained model and batch.

PGD (Linf, L2): robust accuracy within 2 points at several eps (same steps, matched relative step
size, random start, no early stop — foolbox has none). CW-L2 and DeepFool: median L2 distortion
within 15% on the examples both libraries fool.
"""
from __future__ import annotations

import os

import pytest
import torch

fb = pytest.importorskip("foolbox", reason="foolbox is a dev dependency (pip install -e '.[dev]')")

from marginlab import attacks  # noqa: E402

pytestmark = pytest.mark.skipif(
    not os.environ.get("MARGINLAB_DATA"), reason="MARGINLAB_DATA is unset: the MNIST subset is needed"
)

N = 400  # correctly classified test images attacked by both libraries


@pytest.fixture(scope="module")
def setup(one_thread):
    from marginlab import data, models, train

    torch.manual_seed(0)
    xtr, ytr = data.load("mnist", "train")
    xte, yte = data.load("mnist", "test")
    # a small MLP keeps the module fast on 2 shared CPU cores; the attacks see it only as a black box of logits
    model = models.MLP(784, hidden=(128,), num_classes=10)
    train.fit(model, xtr, ytr, optimizer="adam", lr=1e-3, epochs=3, batch_size=64, seed=0, device="cpu",
              progress=False)
    model.eval()
    with torch.no_grad():
        ok = model(xte[:600]).argmax(1) == yte[:600]
    x, y = xte[:600][ok][:N], yte[:600][ok][:N]
    assert len(x) == N, "the test model should classify most of 600 MNIST test images correctly"
    return model, x, y, fb.PyTorchModel(model, bounds=(0, 1))


def _fb_accuracy(fmodel, attack, x, y, eps):
    _, clipped, success = attack(fmodel, x, y, epsilons=eps)
    return [1.0 - float(s.float().mean()) for s in success], clipped


@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize(
    "norm,epsilons,fb_attack",
    [("linf", [0.03, 0.06, 0.1], "LinfPGD"), ("l2", [0.5, 1.0, 1.5], "L2PGD")],
)
def test_pgd_matches_foolbox(setup, norm, epsilons, fb_attack, random_start):
    model, x, y, fmodel = setup
    steps, rel = 20, 2.5 / 20  # Madry's step 2.5 eps / steps = foolbox's rel_stepsize * eps
    ours = []
    for eps in epsilons:
        xa = attacks.pgd(model, x, y, eps, steps, step_size=rel * eps, norm=norm, early_stop=False, seed=0,
                         random_start=random_start)
        attacks.assert_in_ball(x, xa, eps, norm)
        with torch.no_grad():
            ours.append(float((model(xa).argmax(1) == y).float().mean()))
    torch.manual_seed(0)
    theirs, clipped = _fb_accuracy(fmodel, getattr(fb.attacks, fb_attack)(steps=steps, rel_stepsize=rel,
                                                                             random_start=random_start), x, y,
                                   epsilons)
    for eps, a, b in zip(epsilons, ours, theirs):
        assert abs(a - b) <= 0.02 + 1e-9, f"{norm} PGD eps={eps}: ours {a:.3f} vs foolbox {b:.3f}"
    if random_start:
        return
    # the early-stopping default can only be stronger than the final-iterate attack foolbox runs
    # (identical trajectories until an example is frozen, so this holds exactly)
    early = attacks.robust_accuracy(
        model, x, y,
        lambda m, xb, yb, e: attacks.pgd(m, xb, yb, e, steps, step_size=rel * e, norm=norm, random_start=False),
        epsilons, norm=norm, nested=False)
    assert all(e <= a + 1e-6 for e, a in zip(early, ours)), (early, ours)


def _median_on_common(x, ours, theirs, y, model, min_common=0.9):
    with torch.no_grad():
        ok_ours = model(ours).argmax(1) != y
        # foolbox's CW returns an all-zero image where it found nothing: that is not a success
        ok_theirs = (model(theirs).argmax(1) != y) & (theirs.flatten(1).abs().sum(1) > 0)
    both = ok_ours & ok_theirs
    assert both.float().mean() >= min_common, (
        f"both attacks should fool most examples (ours {ok_ours.float().mean()}, foolbox {ok_theirs.float().mean()})")
    d_ours = attacks.perturbation_norms(x[both], ours[both], "l2")
    d_theirs = attacks.perturbation_norms(x[both], theirs[both], "l2")
    return float(d_ours.median()), float(d_theirs.median())


def test_deepfool_matches_foolbox(setup):
    model, x, y, fmodel = setup
    ours = attacks.deepfool(model, x, y, steps=50, overshoot=0.02, norm="l2", candidates=10)
    _, theirs, _ = fb.attacks.L2DeepFoolAttack(steps=50, candidates=10, overshoot=0.02)(fmodel, x, y, epsilons=None)
    a, b = _median_on_common(x, ours, theirs, y, model)
    assert abs(a - b) <= 0.15 * b, f"DeepFool median L2: ours {a:.4f} vs foolbox {b:.4f}"


def test_cw_matches_foolbox(setup):
    model, x, y, fmodel = setup
    # a short budget (tanh-saturated MNIST pixels need many Adam steps; the comparison only needs equal budgets)
    x, y = x[:200], y[:200]
    kw = dict(steps=200, binary_search_steps=4, initial_const=1.0, confidence=0.0, abort_early=True)
    ours = attacks.cw_l2(model, x, y, lr=0.05, **kw)
    attack = fb.attacks.L2CarliniWagnerAttack(stepsize=0.05, **kw)
    _, theirs, _ = attack(fmodel, x, y, epsilons=None)
    with torch.no_grad():
        rate_ours = float((model(ours).argmax(1) != y).float().mean())
        rate_theirs = float(((model(theirs).argmax(1) != y) & (theirs.flatten(1).abs().sum(1) > 0)).float().mean())
    assert abs(rate_ours - rate_theirs) <= 0.05, (rate_ours, rate_theirs)
    a, b = _median_on_common(x, ours, theirs, y, model, min_common=0.5)
    assert abs(a - b) <= 0.15 * b, f"CW-L2 median: ours {a:.4f} vs foolbox {b:.4f}"
    # and CW (an optimiser of the distance) should not be far worse than DeepFool
    df = attacks.deepfool(model, x, y)
    assert a <= 1.5 * float(attacks.perturbation_norms(x, df, "l2").median())
