"""Chapter 5 (paper 002): simplex geometry, Thm 1, the angular penalty, MMC centres and losses."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marginlab import angular as A
from marginlab import attacks
from marginlab import losses as L


# ---- simplex and Σ -----------------------------------------------------------------------------


@pytest.mark.parametrize("k,p,s", [(2, 1, 1.0), (3, 2, 0.1), (10, 200, 0.1), (10, 9, 2.0), (100, 256, 0.1)])
def test_simplex_gram_exact(k, p, s):
    w = A.simplex(k, p, s)
    assert w.shape == (k, p) and w.dtype == torch.float64
    sigma = L.simplex_gram(k, s, dtype=torch.float64)
    assert torch.allclose(w @ w.T, sigma, atol=1e-12 * max(1.0, s * s))
    assert sigma[0, 0] == pytest.approx(s * s) and sigma[0, 1] == pytest.approx(s * s / (1 - k))
    assert math.degrees(A.pairwise_angles(w).min()) == pytest.approx(math.degrees(A.simplex_angle(k)), abs=1e-9)
    # the vertices sum to zero (Pang et al.'s extra assumption holds automatically)
    assert torch.allclose(w.sum(0), torch.zeros(p, dtype=torch.float64), atol=1e-12)


def test_simplex_needs_k_le_p_plus_1():
    with pytest.raises(ValueError, match="P >= K-1"):
        A.simplex(4, 2)
    with pytest.raises(ValueError, match="P >= K-1"):
        A.mmc_centers(11, 9)
    with pytest.raises(ValueError):
        A.simplex(1, 3)
    with pytest.raises(ValueError):
        L.simplex_gram(3, s=0.0)


# ---- the penalty --------------------------------------------------------------------------------


def test_penalty_zero_at_simplex_positive_elsewhere():
    w = A.simplex(10, 200, 0.1)
    assert float(L.angular_penalty(w, 0.1)) < 1e-12
    # rotations keep the Gram matrix: still zero
    q, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert float(L.angular_penalty(w @ q, 0.1)) < 1e-12
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        assert float(L.angular_penalty(torch.randn(10, 200, dtype=torch.float64, generator=g) * 0.01, 0.1)) > 1e-3
    assert float(L.angular_penalty(w * 1.1, 0.1)) > 0  # wrong length
    assert float(L.angular_penalty(w, 0.2)) > 0  # wrong s


def test_penalty_is_frobenius_not_squared():
    w = torch.zeros(3, 4, dtype=torch.float64)
    sigma = L.simplex_gram(3, 0.1, dtype=torch.float64)
    assert float(L.angular_penalty(w, 0.1)) == pytest.approx(float(sigma.pow(2).sum().sqrt()))


def test_penalty_gradcheck():
    w = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: L.angular_penalty(m, 0.3), (w,))


def test_penalty_bad_shape():
    with pytest.raises(ValueError, match="matrix"):
        L.angular_penalty(torch.zeros(3), 0.1)
    with pytest.raises(ValueError):
        L.angular_penalty_loss(alpha=-1.0)


class _Tiny(torch.nn.Module):
    def __init__(self, k=3, p=4, bias=False):
        super().__init__()
        self.body = torch.nn.Linear(2, p)
        self.head = torch.nn.Linear(p, k, bias=bias)

    def features(self, x):
        return torch.tanh(self.body(x))

    def forward(self, x):
        return self.head(self.features(x))


def test_angular_penalty_loss_value():
    torch.manual_seed(0)
    m = _Tiny()
    x, y = torch.randn(8, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss = L.angular_penalty_loss(alpha=100.0, s=0.1)(m, x, y)
    ref = torch.nn.functional.cross_entropy(m(x), y) + 100.0 * L.angular_penalty(m.head.weight, 0.1)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    # training on the penalty alone drives W W^T to Σ
    opt = torch.optim.Adam(m.head.parameters(), lr=0.01)
    for _ in range(1500):
        opt.zero_grad()
        L.angular_penalty(m.head.weight, 0.1).backward()
        opt.step()
    assert float(L.angular_penalty(m.head.weight, 0.1)) < 1e-3


# ---- Theorem 1 ----------------------------------------------------------------------------------


@settings(max_examples=6, deadline=None)
@given(st.integers(2, 6).flatmap(lambda k: st.tuples(st.just(k), st.integers(k - 1, k + 3))), st.integers(0, 3))
def test_thm1_optimisation_reaches_simplex(kp, seed):
    k, p = kp
    res = A.max_min_angle(k, p, steps=600, seed=seed)
    assert res.gram_error is not None and res.gram_error < 1e-3
    assert res.min_angle == pytest.approx(A.simplex_angle(k), abs=1e-3)


def test_thm1_fails_beyond_p_plus_1():
    # K = 4 unit vectors in the plane: the best is 90°, below the simplex angle 109.47°
    res = A.max_min_angle(4, 2, steps=600)
    assert res.gram_error is None
    assert math.degrees(res.min_angle) == pytest.approx(90.0, abs=0.5)
    assert res.min_angle < A.simplex_angle(4) - 0.1


def test_relu_counterexample():
    r = A.relu_counterexample(n=5000)
    assert r["share_relu"][2] == 0.0  # class 3 unreachable with non-negative features
    assert (r["w3_minus_wj"] < 0).all()
    assert (r["share_tanh"] > 0.2).all()
    w = torch.tensor(r["w"])
    assert torch.allclose(w @ w.T, L.simplex_gram(3, 1.0, dtype=torch.float64), atol=1e-12)


# ---- MMC ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,p,c", [(2, 1, 1.0), (3, 2, 10.0), (10, 200, 10.0), (10, 9, 3.0), (100, 256, 10.0)])
def test_mmc_centres(k, p, c):
    mu = A.mmc_centers(k, p, c, dtype=torch.float64)
    assert torch.allclose(mu.norm(dim=1), torch.full((k,), c, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(mu @ mu.T, L.simplex_gram(k, c, dtype=torch.float64), atol=1e-8 * c * c)


def test_mmc_prediction_is_nearest_centre():
    torch.manual_seed(0)
    base = _Tiny(k=3, p=4, bias=True)
    net = A.MMCNet(base, num_classes=3, feature_dim=4, c_mm=2.0)
    x = torch.randn(64, 2)
    z = net.features(x)
    logits = net(x)
    assert torch.equal(logits.argmax(1), A.mmc_predict(z, net.head.centers))
    assert torch.allclose(-logits, torch.cdist(z, net.head.centers).pow(2), atol=1e-5)
    y = torch.randint(0, 3, (64,))
    ref = 0.5 * (z - net.head.centers[y]).pow(2).sum(1).mean()
    assert float(L.mmc_loss(net, x, y)) == pytest.approx(float(ref), rel=1e-6)
    with pytest.raises(ValueError, match="labels"):
        L.mmc_loss(net, x, torch.full((64,), 3))
    # centres are a buffer, not a parameter: training cannot move them
    assert all(p.data_ptr() != net.head.centers.data_ptr() for p in net.parameters())


def test_pgd_adversarial_loss_restores_mode_and_batchnorm():
    pytest.importorskip("marginlab.attacks")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8),
                              torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,))
    net.train()
    bn = net[2]
    before = bn.running_mean.clone()
    loss_fn = L.pgd_adversarial_loss(eps=0.1, steps=3)
    loss = loss_fn(net, x, y)
    assert net.training and bn.training
    assert all(p.grad is None for p in net.parameters())  # the attack does not touch parameter grads
    # only the training forward pass (one batch) updated the running statistics
    assert not torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 1
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError):
        L.pgd_adversarial_loss(eps=-0.1)


def test_margin_loss_and_direction():
    z = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(attacks.margin_gap(z, y), torch.tensor([-1.0, 3.0]))
    assert not hasattr(A, "margin_loss") and not hasattr(A, "correct_mask")  # one implementation, in attacks
    with pytest.raises(ValueError):
        A.loss_along_direction(torch.nn.Identity(), z, y, torch.zeros(1), direction="up")


def test_thm1_one_dimension_is_enumerated():
    # S^0 is disconnected (no gradient path): K=2, P=1 must still give the antipodal pair
    for seed in range(4):
        res = A.max_min_angle(2, 1, seed=seed)
        assert res.gram_error == 0.0 and res.min_angle == pytest.approx(math.pi)
    assert A.max_min_angle(3, 1).min_angle == 0.0


# ---- device boundary, chunking and the profiles (issue 12) ------------------------------------


def _tiny_cfg(**kw):
    import dataclasses

    cfg = dataclasses.replace(A.default_config("mnist"), audit_steps=3, audit_restarts=1, audit_n=None,
                              attacks=A.paper_attacks("mnist", scale=0.0, cw_binary_search=1, cw_steps=3,
                                                      mta_targets=2, autoattack_budget=A.SMOKE_AUTOATTACK))
    return dataclasses.replace(cfg, **kw)


def test_evaluation_entry_points_move_cpu_data_to_the_models_device():
    """Regression (issue 12 item 2): a model left on the accelerator by ``fit`` got CPU test images.
    Under the device-strict mode (the CPU imitating an accelerator) mixing devices raises as on CUDA."""
    device_strict = pytest.importorskip("device_strict")
    torch.manual_seed(0)
    x, y = torch.rand(12, 1, 28, 28), torch.randint(0, 10, (12,))
    cfg = _tiny_cfg()
    with device_strict.strict_device() as dev:
        model = A.make_model("Ours", cfg).to(dev).eval()
        source = A.make_model("CE", cfg).to(dev).eval()
        ev = A.evaluate(model, x, y, cfg.attacks, batch_size=5)
        au = A.audit(model, x, y, cfg, source=source, batch_size=5, label="strict")
        sl = A.loss_along_direction(model, x, y, torch.linspace(0, 0.3, 3), direction="gradient")
        unb = A.unbounded_attack(model, x, y, steps=3, batch_size=5)
        geo = A.weight_geometry(model)
    for t in [*ev.per_example().values(), *au.evaluation.per_example().values(), sl["ce"], sl["margin"],
              unb["linf_distortion"]]:
        assert t.device.type == "cpu" and not device_strict.is_device_tensor(t)
    assert len(ev.clean) == 12 and math.isfinite(geo["min_angle_deg"])


def test_evaluate_in_chunks_equals_one_batch():
    """Issue 12 item 5: chunking bounds memory and does not change deterministic attacks' results."""
    torch.manual_seed(0)
    x, y = torch.rand(10, 1, 28, 28), torch.randint(0, 10, (10,))
    cfg = _tiny_cfg()
    model = A.make_model("CE", cfg).eval()
    specs = tuple(s for s in cfg.attacks if s.kind in ("deepfool", "cw"))  # no random start
    whole = A.evaluate(model, x, y, specs, batch_size=100)
    chunked = A.evaluate(model, x, y, specs, batch_size=3)
    for k, v in whole.per_example().items():
        assert torch.equal(v, chunked.per_example()[k]), k
    with pytest.raises(ValueError, match="batch_size"):
        A.evaluate(model, x, y, specs, batch_size=0)


def test_attack_on_first_images_and_worst_case_on_the_common_part():
    clean = torch.tensor([True, True, False, True])
    ev = A.Evaluation(clean, {"a": torch.tensor([True, False, False, True]), "b": torch.tensor([True, True])})
    assert ev.counts() == {"Clean": 4, "a": 4, "b": 2, "worst case": 2}
    assert ev.worst_case().tolist() == [True, False]
    assert ev.accuracy()["b"] == 1.0 and ev.accuracy()["worst case"] == 0.5


def test_evaluate_respects_n_examples():
    import dataclasses

    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    cfg = _tiny_cfg()
    spec = dataclasses.replace(cfg.attacks[0], n_examples=3)
    ev = A.evaluate(A.make_model("CE", cfg).eval(), x, y, (spec,))
    assert len(ev.robust[spec.name]) == 3 and len(ev.clean) == 8


@pytest.mark.parametrize("profile,smoke", [("quick", "0"), ("standard", "0"), ("full", "0"), ("full", "1")])
def test_default_config_profiles(monkeypatch, profile, smoke):
    monkeypatch.setenv("MARGINLAB_PROFILE", profile)
    monkeypatch.setenv("MARGINLAB_SMOKE", smoke)
    paper = {s.name: s for s in A.paper_attacks("mnist")}
    cfg = A.default_config("mnist")
    if profile == "full" and smoke == "0":
        assert cfg.epochs == 400 and cfg.n_test == 10000 and cfg.attacks == tuple(paper.values())
    if profile in ("standard", "full") and smoke == "0":  # AutoAttack at Croce & Hein's standard budgets, at the paper's eps
        aa = [s.build() for s in cfg.attacks if s.kind == "autoattack"]
        assert len(aa) == 1 and (aa[0].n_iter, aa[0].n_target_classes, aa[0].n_queries) == (100, 9, 5000)
    if profile == "standard":
        # the paper's attack budgets exactly; only which test images the costly attacks see is cut
        for s in cfg.attacks:
            p = paper[s.name]
            assert (s.steps, s.step_size, s.eps, s.binary_search_steps, s.num_targets) == \
                   (p.steps, p.step_size, p.eps, p.binary_search_steps, p.num_targets)
        assert cfg.n_train is None and cfg.n_test >= 1000 and cfg.lr == 0.01 and cfg.batch_size == 128
        assert cfg.at_steps == 40 and cfg.at_step_size == 0.01
    if smoke == "1":
        assert cfg.n_train <= 256 and cfg.n_test <= 128 and cfg.epochs == 1
        assert all(s.steps <= 3 for s in cfg.attacks)
        assert all(s.binary_search_steps <= 1 for s in cfg.attacks if s.kind == "cw")
        aa = [s.build() for s in cfg.attacks if s.kind == "autoattack"]
        assert len(aa) == 1 and aa[0].n_iter <= 3 and aa[0].n_queries <= 20  # toy AutoAttack, standard code path
        assert cfg.audit_steps <= 3 and cfg.audit_restarts == 1
        wrn = A.default_config("cifar100", model="wrn")
        assert wrn.model == "wrn" and wrn.augment == "crop_flip" and wrn.lr_schedule == "step:60:0.9"
    if profile == "quick":
        aa = [s for s in cfg.attacks if s.kind == "autoattack"]
        assert len(aa) == 1 and aa[0].version == "quick" and aa[0].eps == 0.3


# ---- AutoAttack in the suite, which attack broke what, the gradient-masking flag (issue 14) ----------------


def test_attack_spec_names_every_hyperparameter_and_builds_the_package_attacks():
    specs = {s.kind: s for s in A.paper_attacks("mnist")}
    assert set(specs) == set(A.ATTACK_KINDS)
    built = {k: s.build(seed=3, batch_size=7) for k, s in specs.items()}
    assert isinstance(built["pgd"], attacks.PGD) and built["pgd"].step_size == 0.01 and built["pgd"].steps == 200
    assert isinstance(built["deepfool"], attacks.DeepFool) and built["deepfool"].overshoot == 0.02
    assert isinstance(built["cw"], attacks.CarliniWagnerL2) and built["cw"].lr == 0.01
    assert built["cw"].binary_search_steps == 9 and built["cw"].initial_const == 1e-3
    assert isinstance(built["mta"], attacks.MultiTargetPGD) and built["mta"].loss == "margin"
    aa = built["autoattack"]
    assert isinstance(aa, attacks.AutoAttack) and aa.eps == 0.3 and aa.norm == "linf"
    assert (aa.n_iter, aa.n_target_classes, aa.n_queries) == (100, 9, 5000)
    hp = specs["cw"].hyperparameters()
    assert hp["lr"] == 0.01 and hp["binary_search_steps"] == 9 and "overshoot" not in hp
    assert A.paper_attacks("mnist", autoattack=None)[-1].kind == "mta"
    with pytest.raises(ValueError, match="kind"):
        A.AttackSpec("x", "bogus", 0.3)


def test_breakdown_and_black_box_only_flag():
    clean = torch.tensor([True, True, True, True])
    ev = A.Evaluation(clean, {"PGD": torch.tensor([True, False, True, False]),
                              "AutoAttack": torch.tensor([False, False, True, False])},
                      records={"AutoAttack": {"broken_by": ["square", "apgd-ce", None, "square"],
                                              "accuracy": {"clean": 1.0, "apgd-ce": 0.75, "apgd-t": 0.75,
                                                           "fab-t": 0.75, "square": 0.25}}})
    # image 0: only Square broke it (flag); image 3: Square too, but PGD broke it as well (no flag)
    assert A.black_box_only(ev).tolist() == [True, False, False, False]
    # an audit attack that breaks image 0 removes the flag
    audit = A.Evaluation(clean, {"margin PGD": torch.tensor([False, True, True, True])})
    assert A.black_box_only(ev, audit).tolist() == [False, False, False, False]
    rows = {r["attack"]: r for r in ev.breakdown()}
    assert rows["AutoAttack/square"]["broke"] == 2 and rows["AutoAttack/square"]["broke alone"] == 1
    assert rows["PGD"]["broke"] == 2 and rows["PGD"]["broke alone"] == 0
    assert rows["AutoAttack"]["broke"] == 3 and rows["AutoAttack/apgd-t"]["broke"] == 0
    with pytest.raises(ValueError, match="AutoAttack"):
        A.black_box_only(A.Evaluation(clean, {}))


def test_evaluate_keeps_the_autoattack_record_in_the_worst_case():
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    model = A.make_model("CE", cfg).eval()
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image clean-correct, so the attacks have work to do
    spec = next(s for s in cfg.attacks if s.kind == "autoattack")
    ev = A.evaluate(model, x, y, (spec,), batch_size=5)
    rec = ev.records["AutoAttack"]
    assert list(rec["accuracy"]) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert len(rec["broken_by"]) == 16
    robust = torch.tensor([b is None for b in rec["broken_by"]])
    assert torch.equal(ev.robust["AutoAttack"], robust) and torch.equal(ev.worst_case(), robust)
    assert ev.accuracy()["AutoAttack"] == pytest.approx(rec["accuracy"]["square"])
