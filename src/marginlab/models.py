"""The networks of the book. Every model exposes ``.features(x)`` (the penultimate representation)
and ``.head`` (the final linear layer), and ``forward(x) == head(features(x))``, so that losses on
features (Xu et al. 2020's angular penalty, Nar et al. 2019a's low-rank analysis) and attacks on logits use one object.

* :class:`LeNet` — the 4-layer CNN of Nar et al. 2019a, §3 / Fig. 2 (conv 6 → conv 16 → fc 120 → fc 84 → output,
  He initialisation), 84-d features.
* :class:`CWNet` — the small CNNs of Carlini & Wagner (2017) used by Xu et al. 2020 (Tables 4-5):
  MNIST 32-32-64-64 → 200 → 200, CIFAR 64-64-128-128 → 256 → 256, 3×3 convolutions.
* :class:`MLP`, :class:`TwoLayerNet`, :class:`LinearModel` — Wu & Yu 2019, §5 (LR, 1-hidden-layer MLP) and the
  2-D experiments of Nar et al. 2019a, Fig. 3.
* :class:`WideResNet` — WRN-d-k of Zagoruyko & Komodakis (2016); :func:`wrn34_10` is the WRN-34-10 of
  Madry et al. (2018), TRADES and Xu et al. 2020's Table 2 (CIFAR), 640-d features.
* :class:`BinaryLogits` — wraps a one-score model ``s(x)`` into two logits ``[0, s]`` (class 1 ⇔ s > 0),
  the attack convention of DESIGN §2.

Models validate their input (channels, spatial size, flattened size) and raise a ``ValueError``
naming the expected shape; the checks are on shapes only (no host synchronisation).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("relu", "prelu", "leaky_relu", "tanh", "identity")

__all__ = [
    "ACTIVATIONS", "Net", "LeNet", "CWNet", "MLP", "TwoLayerNet", "LinearModel", "BinaryLogits",
    "WideResNet", "wrn34_10", "Normalize", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "make_activation", "num_parameters",
]

#: Per-channel mean and standard deviation of the training images (inputs in [0, 1]), for :class:`Normalize`.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def make_activation(name: str | None) -> nn.Module:
    """An activation module by name: relu | prelu (one learnable slope) | leaky_relu (0.01) | tanh | identity."""
    if name is None or name == "identity":
        return nn.Identity()
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01)
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")


def _init_weights(module: nn.Module, activation: str = "relu") -> None:
    """He (kaiming-normal, fan_in) init for ReLU-family nets, Xavier for tanh/identity; zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if activation in ("relu", "prelu", "leaky_relu"):
                nonlin = "leaky_relu" if activation == "leaky_relu" else "relu"
                nn.init.kaiming_normal_(m.weight, a=0.01 if nonlin == "leaky_relu" else 0.0,
                                        mode="fan_in", nonlinearity=nonlin)
            else:
                gain = nn.init.calculate_gain("tanh" if activation == "tanh" else "linear")
                nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Net(nn.Module):
    """Base class: ``forward(x) = head(features(x))``; subclasses define ``features`` and ``head``."""

    head: nn.Module
    feature_dim: int

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _check_image(x: torch.Tensor, name: str, channels: int, sizes: Sequence[int]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} expects a batch of images (N, {channels}, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{name} was built for {channels}-channel inputs but got {x.shape[1]} channels "
            f"(input shape {tuple(x.shape)}); build it with the matching in_channels / dataset"
        )
    if x.shape[2] != x.shape[3] or x.shape[2] not in sizes:
        allowed = " or ".join(f"{s}x{s}" for s in sizes)
        raise ValueError(f"{name} expects {allowed} images, got {x.shape[2]}x{x.shape[3]}")


def _conv_block(c_in: int, c_out: int, k: int, batchnorm: bool, act: str) -> list[nn.Module]:
    # the conv bias is redundant in front of BatchNorm
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(make_activation(act))
    return layers


def _fc_block(d_in: int, d_out: int, batchnorm: bool, act: str | None) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(d_in, d_out, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(d_out))
    layers.append(make_activation(act))
    return layers


class LeNet(Net):
    """LeNet-style 4-layer CNN of Nar et al. 2019a, §3 (Fig. 2) and §5 (Fig. 4-5).

    conv(6, 5×5) → ReLU → maxpool 2 → conv(16, 5×5) → ReLU → maxpool 2 → fc 120 → ReLU → fc 84 → ReLU
    (= ``features``, 84-d) → ``head`` = Linear(84, num_classes). He init. With ``batchnorm=True`` a
    BatchNorm follows every conv and hidden fc layer (before the ReLU). Inputs are 32×32; 28×28
    inputs (MNIST) are zero-padded by 2 pixels on each side, as in LeCun et al. (1998).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, batchnorm: bool = False):
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        self.in_channels, self.num_classes, self.batchnorm = in_channels, num_classes, batchnorm
        self.conv = nn.Sequential(
            *_conv_block(in_channels, 6, 5, batchnorm, "relu"), nn.MaxPool2d(2),
            *_conv_block(6, 16, 5, batchnorm, "relu"), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(*_fc_block(16 * 5 * 5, 120, batchnorm, "relu"), *_fc_block(120, 84, batchnorm, "relu"))
        self.feature_dim = 84
        self.head = nn.Linear(84, num_classes)
        _init_weights(self, "relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "LeNet", self.in_channels, (28, 32))
        if x.shape[-1] == 28:
            x = F.pad(x, (2, 2, 2, 2))
        return self.fc(self.conv(x).flatten(1))


class CWNet(Net):
    """The small CNNs of Carlini & Wagner (2017), the architectures of Xu et al. 2020's Tables 4 (MNIST) and 5 (CIFAR-10).

    MNIST (1×28×28): conv32-conv32-pool-conv64-conv64-pool-fc200-fc200; CIFAR (3×32×32):
    conv64-conv64-pool-conv128-conv128-pool-fc256-fc256; 3×3 unpadded convolutions, 2×2 max pools.
    ``batchnorm`` adds BatchNorm after every conv/fc (Xu et al. 2020 adds BN). ``activation`` is used in the hidden
    layers; ``feature_activation`` is applied to the last hidden layer, whose output is ``features``
    (Xu et al. 2020, §4 uses tanh there so that the angular penalty sees bounded features). ``head_bias=False``
    gives Xu et al. 2020's bias-free last layer. ``dropout`` (C&W used 0.5) follows the first fc layer only.
    """

    SPECS = {
        "mnist": dict(in_channels=1, size=28, convs=(32, 32, 64, 64), fcs=(200, 200)),
        "cifar": dict(in_channels=3, size=32, convs=(64, 64, 128, 128), fcs=(256, 256)),
    }

    def __init__(self, dataset: str = "mnist", num_classes: int = 10, batchnorm: bool = True,
                 activation: str = "relu", feature_activation: str | None = "relu", head_bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        key = {"cifar10": "cifar", "cifar100": "cifar", "cifar-10": "cifar", "cifar-100": "cifar"}.get(dataset, dataset)
        if key not in self.SPECS:
            raise ValueError(f"CWNet dataset must be 'mnist' or 'cifar', got {dataset!r}")
        for a in (activation, feature_activation):
            if a is not None and a not in ACTIVATIONS:
                raise ValueError(f"unknown activation {a!r}; choose one of {ACTIVATIONS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        spec = self.SPECS[key]
        self.dataset, self.num_classes = key, num_classes
        self.in_channels, self.size = spec["in_channels"], spec["size"]
        c1, c2, c3, c4 = spec["convs"]
        f1, f2 = spec["fcs"]
        self.conv = nn.Sequential(
            *_conv_block(self.in_channels, c1, 3, batchnorm, activation),
            *_conv_block(c1, c2, 3, batchnorm, activation), nn.MaxPool2d(2),
            *_conv_block(c2, c3, 3, batchnorm, activation),
            *_conv_block(c3, c4, 3, batchnorm, activation), nn.MaxPool2d(2),
        )
        side = ((self.size - 4) // 2 - 4) // 2  # 28 -> 4, 32 -> 5
        fc: list[nn.Module] = _fc_block(c4 * side * side, f1, batchnorm, activation)
        if dropout > 0:
            fc.append(nn.Dropout(dropout))
        fc += _fc_block(f1, f2, batchnorm, feature_activation)
        self.fc = nn.Sequential(*fc)
        self.feature_dim = f2
        self.head = nn.Linear(f2, num_classes, bias=head_bias)
        _init_weights(self, activation)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, f"CWNet({self.dataset!r})", self.in_channels, (self.size,))
        return self.fc(self.conv(x).flatten(1))


class Normalize(nn.Module):
    """(x - mean) / std per channel, inside the model: attacks and margins see inputs in [0, 1] (DESIGN §2)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean_t.dim() != 1 or mean_t.shape != std_t.shape:
            raise ValueError(f"mean and std must be per-channel vectors of one length, got {tuple(mean_t.shape)} "
                             f"and {tuple(std_t.shape)}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be > 0, got {std}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={tuple(round(v, 4) for v in self.mean.flatten().tolist())}, " \
               f"std={tuple(round(v, 4) for v in self.std.flatten().tolist())}"


class _WideBasic(nn.Module):
    """Pre-activation basic block of Zagoruyko & Komodakis (2016): BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3,
    plus the identity, or a 1×1 convolution of the pre-activated input where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(c_in), nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(c_out), nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.equal = c_in == c_out and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(a)))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(Net):
    """WRN-depth-k (Zagoruyko & Komodakis 2016) for 32×32 images: conv3×3(16) → 3 groups of (depth-4)/6
    pre-activation basic blocks of widths 16k, 32k, 64k (strides 1, 2, 2) → BN → ReLU → 8×8 average pool
    = ``features`` (64k-d; 640 for k = 10) → ``head`` = Linear(64k, num_classes).

    The layout of the WRN-34-10 used by Madry et al. 2018, TRADES (Zhang et al. 2019), MART and Xu et al. 2020, §4.1
    (Table 2; 46.2 M parameters for 10 classes). He init (fan_out) for the convolutions as in the original
    code, BN weight 1 / bias 0, zero head bias. ``normalize=(mean, std)`` puts a :class:`Normalize` first (Xu et al. 2020
    normalises its inputs; the model still takes [0, 1]). ``feature_activation`` is applied to the pooled
    features (Xu et al. 2020 uses tanh before its bias-free last layer: ``head_bias=False``).
    """

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0, normalize: tuple[Sequence[float], Sequence[float]] | None = None,
                 feature_activation: str | None = None, head_bias: bool = True):
        super().__init__()
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), got {depth!r}")
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive int, got {widen_factor!r}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if feature_activation is not None and feature_activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {feature_activation!r}; choose one of {ACTIVATIONS}")
        self.depth, self.widen_factor = depth, widen_factor
        self.in_channels, self.num_classes = in_channels, num_classes
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.normalize = Normalize(*normalize) if normalize is not None else nn.Identity()
        self.conv = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        groups: list[nn.Module] = []
        c_in = widths[0]
        for c_out, stride in zip(widths[1:], (1, 2, 2)):
            groups.append(nn.Sequential(*[_WideBasic(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1,
                                                     dropout) for i in range(n)]))
            c_in = c_out
        self.groups = nn.Sequential(*groups)
        self.bn, self.relu = nn.BatchNorm2d(c_in), nn.ReLU()
        self.feature_act = make_activation(feature_activation)
        self.feature_dim = c_in
        self.head = nn.Linear(c_in, num_classes, bias=head_bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if head_bias:
            nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, f"WideResNet-{self.depth}-{self.widen_factor}", self.in_channels, (32,))
        h = self.relu(self.bn(self.groups(self.conv(self.normalize(x)))))
        return self.feature_act(F.adaptive_avg_pool2d(h, 1).flatten(1))


def wrn34_10(num_classes: int = 10, **kw) -> WideResNet:
    """WRN-34-10 (Zagoruyko & Komodakis 2016), the network of Xu et al. 2020's Tables 2-3 (CIFAR-10, CIFAR-100)."""
    return WideResNet(depth=34, widen_factor=10, num_classes=num_classes, **kw)


def _flat_dim(in_dim: int | Sequence[int]) -> int:
    d = in_dim if isinstance(in_dim, int) else math.prod(in_dim)
    if d < 1:
        raise ValueError(f"in_dim must be >= 1, got {in_dim}")
    return int(d)


def _flatten(x: torch.Tensor, d: int, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} expects a batch (N, ...), got a scalar")
    if x.dim() == 1:  # a batch of scalars for in_dim == 1
        x = x[:, None]
    flat = x.flatten(1)
    if flat.shape[1] != d:
        raise ValueError(f"{name} expects inputs with {d} features per example, got shape {tuple(x.shape)}")
    return flat


class MLP(Net):
    """Fully connected net (Wu & Yu 2019, §5: one hidden layer of 1024). Flattens its input; ``features`` is the last
    hidden layer's output (the flattened input when ``hidden=()``)."""

    def __init__(self, in_dim: int | Sequence[int], hidden: int | Sequence[int] = (1024,), num_classes: int = 10,
                 activation: str = "relu"):
        super().__init__()
        self.in_dim = _flat_dim(in_dim)
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        layers: list[nn.Module] = []
        d = self.in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), make_activation(activation)]
            d = h
        self.body = nn.Sequential(*layers)
        self.feature_dim = d
        self.head = nn.Linear(d, num_classes)
        _init_weights(self, activation)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(_flatten(x, self.in_dim, "MLP"))


class TwoLayerNet(Net):
    """x ↦ head(act(W₁x + b₁)): the two-layer net of Nar et al. 2019a, §4 (Fig. 3) in 2-D. Output (N, out_dim)."""

    def __init__(self, in_dim: int = 2, hidden: int = 64, out_dim: int = 1, activation: str = "relu"):
        super().__init__()
        self.in_dim = _flat_dim(in_dim)
        self.hidden_layer = nn.Linear(self.in_dim, hidden)
        self.act = make_activation(activation)
        self.feature_dim = hidden
        self.head = nn.Linear(hidden, out_dim)
        _init_weights(self, activation)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.hidden_layer(_flatten(x, self.in_dim, "TwoLayerNet")))


class LinearModel(Net):
    """A linear classifier on flattened inputs (Wu & Yu 2019, §4: logistic regression). ``features`` = flatten.
    ``num_classes=1`` gives a single score; ``zero_init=True`` starts from w = 0, b = 0 (GD from zero, Nar et al. 2019b; Wu & Yu 2019)."""

    def __init__(self, in_dim: int | Sequence[int], num_classes: int = 10, bias: bool = True, zero_init: bool = False):
        super().__init__()
        self.in_dim = _flat_dim(in_dim)
        self.feature_dim = self.in_dim
        self.head = nn.Linear(self.in_dim, num_classes, bias=bias)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            if bias:
                nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _flatten(x, self.in_dim, "LinearModel")


class _TwoLogitHead(nn.Module):
    """h ↦ [0, score_head(h)]: the head of :class:`BinaryLogits`.

    The score head is stored unregistered: its parameters belong to the score model only."""

    def __init__(self, score_head: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "score_head", score_head)  # avoid registering a second owner of the parameters

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _two_logits(self.score_head(h))


def _two_logits(s: torch.Tensor) -> torch.Tensor:
    if s.dim() == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.dim() != 1:
        raise ValueError(f"BinaryLogits needs a score model with one output per example, got shape {tuple(s.shape)}")
    return torch.stack([torch.zeros_like(s), s], dim=1)


class BinaryLogits(nn.Module):
    """Wrap a one-score model s(x) (shape (N,) or (N, 1)) as two logits [0, s]: class index 1 ⇔ s > 0.

    Softmax cross-entropy on these logits equals the logistic loss log(1 + exp(-ỹ s)) with ỹ = ±1, so
    attacks written for K-class logits apply unchanged to binary score models (DESIGN §2).
    ``features`` is the score model's; ``head`` maps those features to the two logits.
    """

    def __init__(self, score_model: nn.Module):
        super().__init__()
        self.score_model = score_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _two_logits(self.score_model(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self.score_model, "features"):
            raise AttributeError(f"{type(self.score_model).__name__} has no .features(x)")
        return self.score_model.features(x)

    @property
    def head(self) -> nn.Module:
        if not hasattr(self.score_model, "head"):
            raise AttributeError(f"{type(self.score_model).__name__} has no .head")
        return _TwoLogitHead(self.score_model.head)

    @property
    def feature_dim(self) -> int:
        return self.score_model.feature_dim
