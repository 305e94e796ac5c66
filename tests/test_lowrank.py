"""Chapter 3: 000 Prop. 1 (rank ≤ 1 from W(0) = 0) as a property, the App. B decay API, and feature spectra."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marginlab import lowrank as L


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(3, 25),
    d=st.integers(1, 8),
    width=st.integers(2, 16),
    features=st.integers(2, 8),
    activation=st.sampled_from(["relu", "tanh", "identity"]),
    loss=st.sampled_from(["logistic", "softmax"]),
    optimizer=st.sampled_from(["gd", "momentum"]),
    train_h=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_prop1_rank_at_most_one(n, d, width, features, activation, loss, optimizer, train_h, seed):
    """000 Prop. 1: φ = W h(x), W(0) = 0, GD (or momentum) on binary cross-entropy ⇒ rank ≤ 1 at every step."""
    X, y = L.random_feature_problem(n, d, seed=seed)
    labels = L.signed_labels(y) if loss == "logistic" else y
    tr = L.feature_rank_dynamics(X, labels, width=width, features=features, activation=activation, loss=loss,
                                 optimizer=optimizer, lr=0.2, steps=25, train_h=train_h, seed=seed)
    assert L.check_prop1(tr) <= 1e-10
    assert tr.singular_values[0].max() == 0.0  # Φ(0) = 0
    assert tr.singular_values[-1, 0] > 0  # and it did move


@settings(max_examples=10, deadline=None)
@given(k=st.integers(3, 5), seed=st.integers(0, 1000))
def test_softmax_rank_at_most_k_minus_one(k, seed):
    """Our extension: a K-class soft-max head keeps rank{φ} ≤ K − 1 (and reaches it here)."""
    X, y = L.random_feature_problem(12 * k, 6, num_classes=k, seed=seed)
    tr = L.feature_rank_dynamics(X, y, width=20, features=10, loss="softmax", steps=20, seed=seed)
    assert tr.settings["num_classes"] == k
    assert L.check_prop1(tr) <= 1e-10
    assert L.prop1_rank_bound("softmax", k) == k - 1


def test_nonzero_init_or_adam_break_the_exact_bound():
    """Prop. 1 needs W(0) = 0 and (momentum-)GD: a random W(0), or Adam from W(0) = 0, give full rank."""
    X, y = L.random_feature_problem(30, 8, seed=1)
    s = L.signed_labels(y)
    tr = L.feature_rank_dynamics(X, s, init="normal", steps=5)
    assert L.max_excess_ratio(tr, 1) > 1e-3
    adam = L.feature_rank_dynamics(X, s, optimizer="adam", lr=0.01, steps=30)
    assert L.max_excess_ratio(adam, 1) > 1e-3
    with pytest.raises(ValueError):
        L.check_prop1(adam)


def test_decay_summary_golden():
    """App. B: tanh before W, random W(0): a fixed small instance whose σ2/σ1 falls while σ1 grows
    (a regression check of this instance, not a theorem)."""
    X, y = L.random_feature_problem(40, 10, seed=0)
    tr = L.feature_rank_dynamics(X, L.signed_labels(y), activation="tanh", init="normal", lr=0.5,
                                 steps=400, record=L.log_steps(400, 20), seed=0)
    assert tr.steps[0] == 0 and tr.steps[-1] == 400
    assert tr.singular_values.shape == (len(tr.steps), 8)
    s = L.decay_summary(tr)
    assert s["final_train_error"] == 0.0
    assert s["ratio_end"] < 0.8 * s["ratio_start"]
    assert s["sigma1_growth"] > s["sigma2_growth"]
    assert s["ratio_start"] == pytest.approx(0.5757, abs=2e-3)  # same seed, same numbers


def test_bad_input():
    X, y = L.random_feature_problem(10, 3, seed=0)
    with pytest.raises(ValueError, match="-1, \\+1"):
        L.feature_rank_dynamics(X, y, loss="logistic")  # {0,1} labels
    with pytest.raises(ValueError, match="class indices"):
        L.feature_rank_dynamics(X, L.signed_labels(y), loss="softmax")
    with pytest.raises(ValueError):
        L.feature_rank_dynamics(X, L.signed_labels(y), optimizer="lbfgs")
    with pytest.raises(ValueError):
        L.feature_rank_dynamics(X[:5], L.signed_labels(y))
    with pytest.raises(ValueError):
        L.signed_labels(torch.tensor([0, 2]))


def test_spectrum_of_exact_low_rank():
    g = np.random.default_rng(0)
    F = g.normal(size=(200, 2)) @ g.normal(size=(2, 84)) + 3.0  # rank 2 after centring
    sp = L.spectrum(F)
    assert sp["components"] == {0.9: sp["components"][0.9], 0.99: sp["components"][0.99], 0.999: 2}
    assert 1.0 <= sp["effective_rank"] <= 2.0
    assert sp["cumulative"][1] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_lenet():
    """A LeNet trained 2 epochs on 64 random 'images' of two shifted classes."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=g)
    y = torch.arange(64) % 2
    x[y == 1] = (x[y == 1] * 0.5 + 0.5)
    cb = L.rank_callback({"train": (x, y)})
    model, hist = L.train_variant("Adam", x, y, epochs=3, batch_size=16, callbacks=[cb])
    return model, hist, x, y


def test_components_and_effective_rank_of_lenet_features(tiny_lenet):
    model, hist, x, y = tiny_lenet
    F = L.penultimate(model, x)
    assert F.shape == (64, 84) and F.dtype == torch.float64
    sp = L.spectrum(F)
    c = sp["components"]
    assert 1 <= c[0.9] <= c[0.99] <= c[0.999] <= 63  # at most n - 1 after centring
    assert 1.0 <= sp["effective_rank"] <= 63
    assert len(hist.rows) == 4
    assert hist.column("train_components")[-1] == c[0.99]
    assert hist.column("train_eff_rank")[-1] == pytest.approx(sp["effective_rank"])
    assert len(hist.last["train_cumulative"]) == len(sp["cumulative"])


def test_head_margin_never_exceeds_svm(tiny_lenet):
    model, _, x, y = tiny_lenet
    m = L.head_vs_svm_margin(model, x, y)
    assert m["feature_scale"] > 0
    if m["ratio"] is not None:
        assert 0 < m["ratio"] <= 1 + 1e-4
        assert 0 <= m["angle_deg"] <= 180


def test_head_direction_two_logits():
    head = torch.nn.Linear(4, 2)
    w, b = L.head_direction(head)
    phi = torch.randn(7, 4)
    logits = head(phi).detach()
    s = phi.double().numpy() @ w + b
    np.testing.assert_allclose(s, (logits[:, 1] - logits[:, 0]).double().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        L.head_direction(torch.nn.Linear(4, 3))
