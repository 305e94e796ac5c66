"""Shapes, the features/head contract and input validation of marginlab.models."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from marginlab import losses, models
from marginlab.models import num_parameters


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


CASES = [
    ("lenet-cifar", lambda: models.LeNet(in_channels=3, num_classes=2), (5, 3, 32, 32), 2, 84),
    ("lenet-mnist28", lambda: models.LeNet(in_channels=1, num_classes=10), (5, 1, 28, 28), 10, 84),
    ("lenet-mnist32-bn", lambda: models.LeNet(in_channels=1, num_classes=10, batchnorm=True), (5, 1, 32, 32), 10, 84),
    ("cw-mnist", lambda: models.CWNet("mnist"), (5, 1, 28, 28), 10, 200),
    ("cw-cifar", lambda: models.CWNet("cifar", num_classes=100, batchnorm=False), (5, 3, 32, 32), 100, 256),
    ("cw-002", lambda: models.CWNet("cifar10", activation="prelu", feature_activation="tanh", head_bias=False,
                                    dropout=0.5), (5, 3, 32, 32), 10, 256),
    ("cw-leaky", lambda: models.CWNet("mnist", activation="leaky_relu", feature_activation="tanh"),
     (5, 1, 28, 28), 10, 200),
    ("mlp", lambda: models.MLP(784, hidden=(32, 16), num_classes=10), (5, 1, 28, 28), 10, 16),
    ("mlp-shape", lambda: models.MLP((1, 28, 28), hidden=64, num_classes=2, activation="tanh"), (5, 1, 28, 28), 2, 64),
    ("mlp-linear", lambda: models.MLP(6, hidden=(), num_classes=3), (5, 6), 3, 6),
    ("two-layer", lambda: models.TwoLayerNet(), (5, 2), 1, 64),
    ("two-layer-2out", lambda: models.TwoLayerNet(in_dim=3, hidden=8, out_dim=2, activation="tanh"), (5, 3), 2, 8),
    ("linear", lambda: models.LinearModel(784, 10), (5, 1, 28, 28), 10, 784),
    ("linear-score", lambda: models.LinearModel(4, 1, zero_init=True), (5, 4), 1, 4),
]


@pytest.mark.parametrize("name,make,shape,k,d", CASES, ids=[c[0] for c in CASES])
def test_shapes_and_head_of_features(name, make, shape, k, d):
    torch.manual_seed(0)
    model = make().eval()
    x = _x(*shape)
    out = model(x)
    feats = model.features(x)
    assert out.shape == (shape[0], k)
    assert feats.shape == (shape[0], d)
    assert model.feature_dim == d
    assert isinstance(model.head, nn.Linear) and model.head.out_features == k
    torch.testing.assert_close(model.head(feats), out, rtol=0, atol=0)


def test_lenet_pads_28_to_32_identically():
    torch.manual_seed(0)
    model = models.LeNet(in_channels=1, num_classes=10).eval()
    x = _x(3, 1, 28, 28)
    torch.testing.assert_close(model(x), model(nn.functional.pad(x, (2, 2, 2, 2))))


def test_lenet_architecture_and_he_init():
    torch.manual_seed(0)
    m = models.LeNet(in_channels=3, num_classes=2)
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    fcs = [l for l in m.modules() if isinstance(l, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(3, 6, (5, 5)), (6, 16, (5, 5))]
    assert [(f.in_features, f.out_features) for f in fcs] == [(400, 120), (120, 84), (84, 2)]
    # He init: weight std ~ sqrt(2 / fan_in)
    w = fcs[0].weight
    assert abs(w.std().item() / (2 / 400) ** 0.5 - 1) < 0.1
    assert torch.all(fcs[0].bias == 0)
    bn = models.LeNet(batchnorm=True)
    assert sum(isinstance(l, (nn.BatchNorm1d, nn.BatchNorm2d)) for l in bn.modules()) == 4


def test_cwnet_architecture():
    m = models.CWNet("cifar", batchnorm=True)
    convs = [l.out_channels for l in m.modules() if isinstance(l, nn.Conv2d)]
    fcs = [l.out_features for l in m.modules() if isinstance(l, nn.Linear)]
    assert convs == [64, 64, 128, 128] and fcs == [256, 256, 10]
    assert all(l.kernel_size == (3, 3) for l in m.modules() if isinstance(l, nn.Conv2d))
    m = models.CWNet("mnist", head_bias=False, feature_activation="tanh")
    assert [l.out_channels for l in m.modules() if isinstance(l, nn.Conv2d)] == [32, 32, 64, 64]
    assert m.head.bias is None
    f = m.eval().features(_x(4, 1, 28, 28))
    assert f.abs().max() <= 1.0  # tanh features are bounded (002 §4)
    assert any(isinstance(l, nn.PReLU) for l in models.CWNet("mnist", activation="prelu").modules())


def test_cwnet_dropout_is_active_only_in_train_mode():
    torch.manual_seed(0)
    m = models.CWNet("mnist", batchnorm=False, dropout=0.5)
    x = _x(4, 1, 28, 28)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


def test_same_seed_same_init():
    torch.manual_seed(3)
    a = models.LeNet()
    torch.manual_seed(3)
    b = models.LeNet()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_binary_logits_wrapper():
    torch.manual_seed(0)
    score = models.TwoLayerNet(in_dim=2, hidden=8, out_dim=1)
    model = models.BinaryLogits(score).eval()
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(1))
    logits = model(x)
    s = score(x)[:, 0]
    assert logits.shape == (7, 2)
    torch.testing.assert_close(logits[:, 1] - logits[:, 0], s)
    assert torch.equal(logits.argmax(1), (s > 0).long())
    torch.testing.assert_close(model.head(model.features(x)), logits)
    # CE on [0, s] with -1 -> 0 equals the logistic loss with ±1 labels
    y = torch.tensor([1, -1, 1, 1, -1, -1, 1])
    ce = nn.functional.cross_entropy(logits, (y > 0).long())
    torch.testing.assert_close(ce, losses.binary_logistic(score, x, y))
    # parameters are not duplicated
    assert len(list(model.parameters())) == len(list(score.parameters()))
    with pytest.raises(ValueError, match="one output"):
        models.BinaryLogits(models.TwoLayerNet(out_dim=3))(x)


@pytest.mark.parametrize("make,bad", [
    (lambda: models.LeNet(in_channels=3), (2, 1, 32, 32)),
    (lambda: models.LeNet(in_channels=1), (2, 3, 28, 28)),
    (lambda: models.LeNet(in_channels=3), (2, 3, 30, 30)),
    (lambda: models.LeNet(in_channels=3), (3, 32, 32)),
    (lambda: models.CWNet("mnist"), (2, 3, 32, 32)),
    (lambda: models.CWNet("cifar"), (2, 3, 28, 28)),
    (lambda: models.MLP(784, hidden=8), (2, 3, 32, 32)),
    (lambda: models.LinearModel(4, 2), (2, 5)),
    (lambda: models.TwoLayerNet(in_dim=2), (2, 3)),
])
def test_bad_input_shape_is_a_clear_error(make, bad):
    with pytest.raises(ValueError, match="expects|built for"):
        make()(torch.zeros(*bad))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="dataset"):
        models.CWNet("svhn")
    with pytest.raises(ValueError, match="activation"):
        models.CWNet("mnist", activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        models.MLP(4, activation="swish")
    with pytest.raises(ValueError, match="dropout"):
        models.CWNet("mnist", dropout=1.0)
    with pytest.raises(ValueError):
        models.LeNet(in_channels=0)


def test_gradients_flow_to_inputs():
    torch.manual_seed(0)
    model = models.LeNet(in_channels=1, num_classes=10).eval()
    x = _x(2, 1, 28, 28).requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.abs().sum() > 0


def test_wide_resnet_layout_and_interface():
    """WRN-d-k of Zagoruyko & Komodakis (2016): (d - 4) / 6 pre-activation blocks per group, widths 16k/32k/64k.
    The WRN-34-10 count equals the TRADES / Madry et al. reference implementation's 46,160,474 parameters."""
    from marginlab.models import WideResNet, wrn34_10

    torch.manual_seed(0)
    big = wrn34_10()
    assert num_parameters(big) == 46_160_474 and big.feature_dim == 640
    assert len(big.groups) == 3 and all(len(g) == 5 for g in big.groups)
    assert num_parameters(wrn34_10(100)) == 46_160_474 + 90 * 641
    small = WideResNet(depth=10, widen_factor=2, num_classes=5, normalize=(models.CIFAR10_MEAN, models.CIFAR10_STD),
                       feature_activation="tanh", head_bias=False).eval()
    x = torch.rand(3, 3, 32, 32)
    f = small.features(x)
    assert f.shape == (3, 128) and bool((f.abs() <= 1).all())  # tanh features
    torch.testing.assert_close(small(x), small.head(f))
    assert small.head.bias is None
    # normalisation is inside the model: the same as a plain WRN fed normalised inputs
    plain = WideResNet(depth=10, widen_factor=2, num_classes=5, feature_activation="tanh", head_bias=False).eval()
    plain.load_state_dict({k: v for k, v in small.state_dict().items() if not k.startswith("normalize.")})
    mean = torch.tensor(models.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(models.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(plain((x - mean) / std), small(x))
    # a training step runs (BatchNorm in train mode, gradients reach the first conv)
    small.train()
    nn.functional.cross_entropy(small(x), torch.tensor([0, 1, 2])).backward()
    assert small.conv.weight.grad is not None and small.conv.weight.grad.abs().sum() > 0
    for bad in (dict(depth=33), dict(depth=4), dict(widen_factor=0), dict(dropout=1.0),
                dict(feature_activation="swish")):
        with pytest.raises(ValueError):
            WideResNet(**bad)
    with pytest.raises(ValueError, match="32x32"):
        small(torch.rand(2, 3, 28, 28))


def test_paper_recipes_train_a_wide_resnet():
    from marginlab import train
    from marginlab.models import WideResNet

    r = train.recipe("xu_li_yang_2020_wrn")
    assert r["optimizer"] == "adam" and r["lr"] == 0.01 and r["epochs"] == 400 and r["augment"] == "crop_flip"
    assert [r["lr_schedule"](e) for e in (0, 59, 60, 120)] == pytest.approx([1, 1, 0.9, 0.81])
    assert train.recipe("xu_li_yang_2020_wrn", epochs=2)["epochs"] == 2 and train.RECIPES["xu_li_yang_2020_wrn"]["epochs"] == 400
    with pytest.raises(ValueError, match="recipe"):
        train.recipe("nope")
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=1, num_classes=3)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 3, (16,))
    h = train.fit(model, x, y, progress=False, **train.recipe("xu_li_yang_2020_wrn", epochs=2, batch_size=8))
    assert len(h) == 3 and all(math.isfinite(v) for v in h.column("loss")[1:])
