"""Explained variance, components_for, effective rank and feature extraction (000 Fig. 2 measurements)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marginlab import features, models


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_rank_two_data_needs_two_components():
    r = _rng()
    F = r.normal(size=(200, 2)) @ r.normal(size=(2, 84)) + 5.0  # an offset must not count (centred PCA)
    cum = features.explained_variance(F)
    assert cum.shape == (84,)
    assert cum[0] < 0.999 and cum[1] == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.diff(cum) >= -1e-15) and cum[-1] == pytest.approx(1.0)
    assert features.components_for(F, 1.0) == 2
    assert features.components_for(cum, 0.999999) == 2
    assert features.components_for(torch.as_tensor(F), 0.01) == 1


def test_explained_variance_golden_values():
    # axis-aligned data with variances 9 : 4 : 1 along three axes
    r = _rng(1)
    Z = r.normal(size=(4000, 3))
    Z = (Z - Z.mean(0)) / Z.std(0)
    Q, _ = np.linalg.qr(r.normal(size=(3, 3)))
    Z, _ = np.linalg.qr(Z)  # orthonormal columns: exact variances
    F = (Z * np.array([3.0, 2.0, 1.0])) @ Q.T
    F = F - F.mean(0)
    cum = features.explained_variance(F)
    # (centring the orthonormal Z perturbs it slightly; tolerance covers that)
    np.testing.assert_allclose(cum, [9 / 14, 13 / 14, 1.0], atol=2e-3)
    assert features.components_for(cum, 0.9) == 2 and features.components_for(cum, 0.95) == 3


def test_effective_rank_isotropic_and_rank_one():
    r = _rng(2)
    iso = r.normal(size=(20000, 16))
    assert features.effective_rank(iso) == pytest.approx(16, rel=0.01)
    one = r.normal(size=(500, 1)) @ r.normal(size=(1, 16)) + r.normal(size=(1, 16))
    assert features.effective_rank(one) == pytest.approx(1.0, abs=1e-6)
    # uncentred, the common offset is a second direction
    assert features.effective_rank(one, centered=False) > 1.05


def test_effective_rank_golden_value():
    # singular values proportional to (2, 1, 1): p = (1/2, 1/4, 1/4), H = 1.5 log 2, erank = 2^1.5
    F = np.diag([2.0, 1.0, 1.0])
    assert features.effective_rank(F, centered=False) == pytest.approx(2 ** 1.5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(5, 40), d=st.integers(1, 12), k=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_properties_on_random_low_rank_data(n, d, k, seed):
    r = _rng(seed)
    F = r.normal(size=(n, k)) @ r.normal(size=(k, d))
    rank = min(k, d, n - 1)
    cum = features.explained_variance(F)
    assert cum.shape == (min(n, d),)
    assert np.all(np.diff(cum) >= -1e-12) and 0 <= cum[0] <= cum[-1] == pytest.approx(1.0)
    assert features.components_for(cum, 1.0) <= rank
    er = features.effective_rank(F)
    assert 1.0 - 1e-9 <= er <= rank + 1e-6


def test_bad_inputs():
    with pytest.raises(ValueError, match="matrix"):
        features.explained_variance(np.zeros(5))
    with pytest.raises(ValueError, match="zero variance"):
        features.explained_variance(np.ones((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        features.effective_rank(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="level"):
        features.components_for(np.array([0.5, 1.0]), 1.5)
    with pytest.raises(ValueError, match="cumulative"):
        features.components_for(np.array([0.9, 0.5]), 0.8)
    with pytest.raises(ValueError, match="at least 2"):
        features.effective_rank(np.ones((1, 3)))


def test_extract_features_matches_model_features_and_restores_mode():
    torch.manual_seed(0)
    model = models.LeNet(in_channels=1, num_classes=10, batchnorm=True)
    model.train()
    x = torch.rand(37, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    stats = model.conv[1].running_mean.clone()
    F = features.extract_features(model, x, batch_size=10)
    assert F.shape == (37, 84) and F.device.type == "cpu" and not F.requires_grad
    assert model.training and torch.equal(model.conv[1].running_mean, stats)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(F, model.features(x))
    assert 1.0 <= features.effective_rank(F) <= 36


def test_extract_features_on_a_device_model_returns_on_the_callers_device(monkeypatch):
    import device_strict as ds

    from marginlab import features, models

    torch.manual_seed(0)
    model = models.LeNet(in_channels=1, num_classes=3)
    x = torch.rand(9, 1, 28, 28)
    ref = features.extract_features(model, x)
    with ds.strict_device() as dev:
        model.to(dev)
        out = features.extract_features(model, x, batch_size=4)
        assert out.device.type == "cpu" and not ds.is_device_tensor(out)
        on_dev = features.extract_features(model, x.to(dev))
        assert on_dev.device.type == "meta"
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(on_dev.cpu(), ref)
        assert features.effective_rank(out) > 1
