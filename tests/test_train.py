"""The trainer: learning, determinism, the cache, samplers, callbacks, evaluation helpers and input validation."""
from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from marginlab import losses, models, train


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MARGINLAB_DEVICE", raising=False)


_CALLS = {"n": 0}  # a module global, not a closure cell: closure values are part of the cache key


def _counting_ce(model, xb, yb):
    _CALLS["n"] += 1
    return nn.functional.cross_entropy(model(xb), yb)


def _toy(n: int = 120, seed: int = 0, pm: bool = False):
    """Linearly separable 2-D data with a margin (labels {0,1} or {-1,+1})."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    s = x[:, 0] + 0.5 * x[:, 1]
    keep = s.abs() > 0.3
    x, s = x[keep], s[keep]
    y = (s > 0).long()
    return x, (2 * y - 1 if pm else y)


def _net(seed: int = 0, out_dim: int = 2, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return models.TwoLayerNet(in_dim=2, hidden=16, out_dim=out_dim, **kw)


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


FAST = dict(optimizer="adam", lr=0.05, epochs=25, batch_size=32, progress=False)


def test_learns_separable_problem_to_zero_training_error():
    x, y = _toy()
    model = _net()
    h = train.fit(model, x, y, **FAST)
    assert train.accuracy(model, x, y) == 1.0
    assert h.last["train_acc"] > 0.95 and h.last["loss"] < h.rows[1]["loss"]
    assert h.column("epoch") == list(range(26))
    assert math.isnan(h.column("loss")[0])  # epoch 0 is before training
    assert h.meta["steps"] == 25 * math.ceil(len(x) / 32) and not h.cached


@pytest.mark.parametrize("optimizer", train.OPTIMIZERS)
def test_every_optimizer_reduces_the_loss(optimizer):
    x, y = _toy()
    lr = 0.02 if optimizer.startswith("adam") else 0.2
    h = train.fit(_net(), x, y, optimizer=optimizer, lr=lr, epochs=8, batch_size=32, weight_decay=1e-4, progress=False)
    assert h.last["loss"] < h.rows[1]["loss"]


def test_pm1_labels_default_loss_and_binary_logistic():
    x, y = _toy(pm=True)
    model = _net()
    train.fit(model, x, y, **FAST)
    assert train.accuracy(model, x, y) == 1.0
    score = _net(out_dim=1)
    h = train.fit(score, x, y, loss_fn=losses.binary_logistic, **FAST)
    assert train.accuracy(score, x, y) == 1.0
    assert h.last["train_acc"] > 0.95  # from the head's logits captured during the loss


def test_determinism_same_seed_same_weights_different_seed_different():
    x, y = _toy()
    kw = dict(optimizer="momentum", lr=0.1, epochs=3, batch_size=16, progress=False)
    a, b, c = _net(), _net(), _net()
    ha = train.fit(a, x, y, seed=1, **kw)
    hb = train.fit(b, x, y, seed=1, **kw)
    train.fit(c, x, y, seed=2, **kw)
    assert _same(a, b) and ha.column("loss") == pytest.approx(hb.column("loss"), nan_ok=True)
    assert not _same(a, c)


def test_dropout_is_reproducible_and_global_rng_untouched():
    x, y = _toy()
    kw = dict(optimizer="sgd", lr=0.1, epochs=2, batch_size=16, progress=False)

    def make():
        torch.manual_seed(0)
        return models.MLP(2, hidden=(16,), num_classes=2)

    a, b = make(), make()
    a.body.append(nn.Dropout(0.5))
    b.body.append(nn.Dropout(0.5))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    train.fit(a, x, y, **kw)
    assert torch.equal(torch.random.get_rng_state(), before)
    train.fit(b, x, y, **kw)
    assert _same(a, b)


def test_cache_hit_skips_training_and_restores_weights_and_history(tmp_path):
    x, y = _toy()
    calls = _CALLS
    calls["n"] = 0

    kw = dict(FAST, epochs=3, loss_fn=_counting_ce, cache="toy",
              callbacks=[lambda e, m: {"norm": float(sum(p.norm() for p in m.parameters()))}])
    a = _net()
    ha = train.fit(a, x, y, **kw)
    n_train = calls["n"]
    assert n_train == ha.meta["steps"] > 0
    files = list((tmp_path / "cache").glob("*.pt"))
    assert [f.name for f in files] == [f"{ha.meta['key']}.pt"]
    assert not list((tmp_path / "cache").glob("*.tmp"))

    b = _net()
    hb = train.fit(b, x, y, **kw)
    assert calls["n"] == n_train  # training skipped
    assert hb.cached and _same(a, b)
    assert hb.rows == ha.rows
    assert hb.meta["key"] == ha.meta["key"] == train.cache_key(_net(), x, y, **kw)


def test_cache_key_depends_on_everything_that_matters():
    x, y = _toy()
    base = dict(cache="t", optimizer="sgd", lr=0.1, epochs=2)
    k = train.cache_key(_net(), x, y, **base)
    assert k == train.cache_key(_net(), x.clone(), y.clone(), **base, progress=False, device="cpu")
    variants = [
        train.cache_key(_net(seed=1), x, y, **base),                      # initial weights
        train.cache_key(_net(activation="tanh"), x, y, **base),           # architecture
        train.cache_key(_net(), x + 1e-6, y, **base),                      # data
        train.cache_key(_net(), x, 1 - y, **base),                         # labels
        train.cache_key(_net(), x, y, **dict(base, lr=0.2)),               # hyperparameter
        train.cache_key(_net(), x, y, **dict(base, cache="u")),            # tag
        train.cache_key(_net(), x, y, **base, seed=1),
        train.cache_key(_net(), x, y, **base, loss_fn=losses.binary_logistic),
        train.cache_key(_net(), x, y, **base, loss_fn=functools.partial(_scaled_ce, scale=2.0)),
        train.cache_key(_net(), x, y, **base, loss_fn=_closure_ce(2.0)),
        train.cache_key(_net(), x, y, **base, lr_schedule="cosine"),
    ]
    assert len({k, *variants}) == len(variants) + 1
    # partial / closure arguments change the key; equal arguments give equal keys
    assert (train.cache_key(_net(), x, y, **base, loss_fn=functools.partial(_scaled_ce, scale=2.0))
            != train.cache_key(_net(), x, y, **base, loss_fn=functools.partial(_scaled_ce, scale=3.0)))
    assert (train.cache_key(_net(), x, y, **base, loss_fn=_closure_ce(2.0))
            == train.cache_key(_net(), x, y, **base, loss_fn=_closure_ce(2.0)))
    assert (train.cache_key(_net(), x, y, **base, loss_fn=_closure_ce(2.0))
            != train.cache_key(_net(), x, y, **base, loss_fn=_closure_ce(3.0)))
    # None and losses.cross_entropy are the same default loss
    assert k == train.cache_key(_net(), x, y, **base, loss_fn=losses.cross_entropy)


def _scaled_ce(model, xb, yb, scale=1.0):
    return scale * nn.functional.cross_entropy(model(xb), yb)


def _closure_ce(scale):
    def loss(model, xb, yb):
        return scale * nn.functional.cross_entropy(model(xb), yb)
    return loss


def test_corrupt_cache_file_retrains_and_overwrites(tmp_path):
    x, y = _toy()
    kw = dict(FAST, epochs=2, cache="c")
    a = _net()
    key = train.cache_key(a, x, y, **kw)
    path = train.cache_path(key)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        ha = train.fit(a, x, y, **kw)
    assert not ha.cached
    b = _net()
    assert train.fit(b, x, y, **kw).cached and _same(a, b)


def test_cache_round_trips_numpy_and_tensor_callback_values():
    x, y = _toy()
    cb = lambda e, m: {"arr": np.arange(3) * e, "t": torch.ones(2) * e, "pair": (e, 1.5)}  # noqa: E731
    kw = dict(FAST, epochs=2, cache="np", callbacks=[cb])
    ha = train.fit(_net(), x, y, **kw)
    hb = train.fit(_net(), x, y, **kw)
    assert hb.cached
    assert isinstance(hb.last["arr"], np.ndarray) and np.array_equal(hb.last["arr"], ha.last["arr"])
    assert torch.equal(hb.last["t"], ha.last["t"]) and hb.last["pair"] == (2, 1.5)


def test_callbacks_run_at_epoch_zero_and_after_each_epoch_in_eval_no_grad():
    x, y = _toy()
    seen = []

    def cb(epoch, model):
        seen.append((epoch, model.training, torch.is_grad_enabled()))
        return {"acc": train.accuracy(model, x, y)}

    model = _net()
    model.train()
    h = train.fit(model, x, y, callbacks=[cb, lambda e, m: None], **dict(FAST, epochs=3))
    assert seen == [(0, False, False), (1, False, False), (2, False, False), (3, False, False)]
    assert len(h.column("acc")) == 4 and h.column("acc")[-1] == h.last["acc"]
    assert model.training  # mode restored


def test_batchnorm_modes_and_eval_helpers_restore_modes():
    torch.manual_seed(0)
    model = models.LeNet(in_channels=1, num_classes=2, batchnorm=True)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 28, 28, generator=g)
    y = torch.randint(0, 2, (40,), generator=g)
    model.eval()
    bn = model.conv[1]
    before = bn.running_mean.clone()
    train.fit(model, x, y, optimizer="adam", lr=1e-3, epochs=1, batch_size=16, progress=False)
    assert not torch.equal(bn.running_mean, before)  # trained in train mode
    assert not model.training  # caller's mode restored
    model.train()
    stats = bn.running_mean.clone()
    logits = train.predict(model, x, batch_size=7)
    assert logits.shape == (40, 2) and model.training and torch.equal(bn.running_mean, stats)
    model.eval()
    torch.testing.assert_close(logits, model(x))
    assert 0.0 <= train.accuracy(model, x, y, batch_size=9) <= 1.0


def test_shuffle_drops_a_trailing_batch_of_one_for_batchnorm():
    torch.manual_seed(0)
    model = models.MLP(2, hidden=(8,), num_classes=2)
    model.body.insert(1, nn.BatchNorm1d(8))
    x, y = _toy(n=200)
    n = len(x)
    bs = n - 1  # last batch would hold one example
    h = train.fit(model, x, y, batch_size=bs, epochs=2, progress=False)
    assert h.meta["steps"] == 2


def test_balanced_sampler_batch_composition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, generator=g)
    y = torch.tensor([1] * 10 + [-1] * 40)
    batches = []

    def recording_loss(model, xb, yb):
        batches.append(yb.clone())
        s = model(xb)[:, 0]
        return nn.functional.softplus(-yb * s).mean()

    h = train.fit(_net(out_dim=1), x, y, loss_fn=recording_loss, sampler="balanced", batch_size=9, epochs=2,
                  progress=False)
    per_epoch = math.ceil(40 / 4)
    assert len(batches) == 2 * per_epoch == h.meta["steps"]
    for yb in batches:
        assert len(yb) == 8 and int((yb == 1).sum()) == 4 and int((yb == -1).sum()) == 4
    # the larger class is covered in every epoch
    idx_seen = set()
    train.fit(_net(out_dim=1), x, y, sampler="balanced", batch_size=8, epochs=1, progress=False,
              loss_fn=lambda m, xb, yb: (idx_seen.update(map(tuple, xb.tolist())), m(xb).sum() * 0)[1])
    assert {tuple(r) for r in x[y == -1].tolist()} <= idx_seen
    with pytest.raises(ValueError, match="two label values"):
        train.fit(_net(), x, torch.arange(50) % 3, sampler="balanced", progress=False)


def test_until_zero_error_and_max_steps():
    x, y = _toy()
    h = train.fit(_net(), x, y, until_zero_error=True, **dict(FAST, epochs=200))
    assert h.last["train_err"] == 0.0 and h.meta["stopped"] == "zero_error" and len(h) < 201
    h = train.fit(_net(), x, y, max_steps=5, **FAST)
    assert h.meta["steps"] == 5 and h.meta["stopped"] == "max_steps" and h.last["steps"] == 5


def test_lr_schedules():
    x, y = _toy()
    h = train.fit(_net(), x, y, lr=0.1, epochs=4, lr_schedule="cosine", progress=False)
    assert h.column("lr")[1:] == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    h = train.fit(_net(), x, y, lr=0.1, epochs=3, lr_schedule=lambda e: 0.5 ** e, progress=False)
    assert h.column("lr")[1:] == pytest.approx([0.1, 0.05, 0.025])


def test_custom_loss_may_return_logits_and_accuracy_is_nan_when_unavailable():
    x, y = _toy()

    def with_logits(model, xb, yb):
        z = model(xb)
        return nn.functional.cross_entropy(z, yb), z

    def twice(model, xb, yb):  # two forwards: the trainer cannot tell which logits are "the" logits
        return nn.functional.cross_entropy(model(xb), yb) + 0 * model(xb).sum()

    assert train.fit(_net(), x, y, loss_fn=with_logits, **FAST).last["train_acc"] > 0.95
    assert math.isnan(train.fit(_net(), x, y, loss_fn=twice, **dict(FAST, epochs=1)).last["train_acc"])


def test_numpy_inputs_and_float64_models():
    x, y = _toy()
    torch.manual_seed(0)
    model = models.TwoLayerNet(hidden=8, out_dim=2).double()
    train.fit(model, x.numpy().astype(np.float64), y.numpy(), **FAST)
    assert model.head.weight.dtype == torch.float64
    assert train.accuracy(model, x.numpy(), y.numpy()) == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(optimizer="rmsprop"), "optimizer"),
    (dict(sampler="stratified"), "sampler"),
    (dict(lr=-1.0), "lr"),
    (dict(epochs=-1), "epochs"),
    (dict(batch_size=0), "batch_size"),
    (dict(lr_schedule="step"), "lr_schedule"),
    (dict(cache=""), "cache"),
    (dict(seed=-3), "seed"),
])
def test_bad_hyperparameters(kwargs, match):
    x, y = _toy()
    with pytest.raises(ValueError, match=match):
        train.fit(_net(), x, y, progress=False, **kwargs)


def test_bad_data():
    x, y = _toy()
    with pytest.raises(ValueError, match="different lengths"):
        train.fit(_net(), x, y[:-1], progress=False)
    with pytest.raises(ValueError, match="integer"):
        train.fit(_net(), x, y.float(), progress=False)
    with pytest.raises(ValueError, match="integer"):
        train.accuracy(_net(), x, y.bool())
    with pytest.raises(ValueError, match="1-D"):
        train.fit(_net(), x, y[:, None], progress=False)
    with pytest.raises(ValueError, match="binary ±1"):
        train.fit(_net(), x, y - 1, progress=False)
    with pytest.raises(ValueError, match="floating"):
        train.fit(_net(), x.long(), y, progress=False)
    with pytest.raises(ValueError, match="scalar"):
        train.fit(_net(), x, y, loss_fn=lambda m, xb, yb: m(xb), progress=False)


def test_history_api():
    h = train.History(rows=[{"epoch": 0, "a": 1}, {"epoch": 1, "loss": 0.5}])
    assert h.column("loss")[1] == 0.5 and math.isnan(h.column("loss")[0])
    assert h.column("a", default=None) == [1, None]
    assert h.last == {"epoch": 1, "loss": 0.5} and len(h) == 2 and h.columns == ["epoch", "a", "loss"]
    with pytest.raises(KeyError):
        h.column("nope")


def test_progress_disabled_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "1")
    assert not train._progress_enabled(None)
    assert train._progress_enabled(True)
    monkeypatch.delenv("CI")
    assert not train._progress_enabled(False)


def test_cache_writes_are_atomic(tmp_path, monkeypatch):
    x, y = _toy()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(train.torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        train.fit(_net(), x, y, cache="atomic", **dict(FAST, epochs=1))
    assert not any(os.scandir(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------
# the device boundary (issue 12): the device-strict mode makes CUDA's device errors fail on a CPU

import device_strict as ds  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture
def strict(monkeypatch):
    monkeypatch.setenv("MARGINLAB_DEVICE", "meta")
    with ds.strict_device() as dev:
        yield dev


def test_until_zero_error_on_a_device_model_with_cpu_data(strict):
    """Regression: accuracy() compared CPU predictions with device labels, so training "until zero training
    error" crashed at epoch 1 on a GPU (chapters 3 and 4)."""
    x, y = _toy()
    model = _net()
    h = train.fit(model, x, y, until_zero_error=True, **dict(FAST, epochs=200))
    assert h.meta["stopped"] == "zero_error" and h.last["train_err"] == 0.0
    assert next(model.parameters()).device.type == "meta"
    assert train.accuracy(model, x, y) == 1.0  # CPU data, device model
    xd, yd = x.to(strict), y.to(strict)
    assert train.accuracy(model, xd, yd) == 1.0  # device data
    assert train.accuracy(model, x, yd) == 1.0  # labels on the device, inputs on the CPU
    out_cpu, out_dev = train.predict(model, x), train.predict(model, xd, batch_size=7)
    assert out_cpu.device.type == "cpu" and not ds.is_device_tensor(out_cpu)  # the caller's device
    assert out_dev.device.type == "meta"
    torch.testing.assert_close(out_dev.cpu(), out_cpu)


def test_augmented_training_on_the_device(strict):
    torch.manual_seed(0)
    x = torch.rand(40, 3, 8, 8)
    y = torch.randint(0, 3, (40,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    h = train.fit(model, x, y, augment="crop_flip", lr_schedule="step:2:0.5", **dict(FAST, epochs=3))
    assert h.column("lr")[1:] == [0.05, 0.05, 0.025]


class _SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts device-to-host reads (item(), float(t), bool(t), nonzero...): each one is a sync on a GPU."""

    SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                torch.ops.aten.unique_consecutive.default, torch.ops.aten._unique2.default}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNC_OPS:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("augment", [None, "crop_flip"])
def test_training_syncs_with_the_host_once_per_epoch_not_per_step(augment):
    """The number of host reads depends on the number of epochs, not on the number of steps."""
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 6, 6), torch.randint(0, 2, (64,))
    counts = {}
    for batch_size in (32, 4):  # 2 vs 16 steps per epoch
        model = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
        with _SyncCounter() as c:
            train.fit(model, x, y, epochs=3, batch_size=batch_size, progress=False, augment=augment)
        counts[batch_size] = c.n
    assert counts[32] == counts[4], counts
    assert counts[4] <= 3 * 3, counts  # a handful per epoch


def test_evaluation_helpers_chunk_without_changing_results():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)).train()
    x, y = torch.rand(50, 3, 2, 2), torch.randint(0, 5, (50,))
    full = train.predict(model, x)
    assert train.EVAL_BATCH_SIZE >= 256
    for bs in (1, 7, 50, 4096):
        torch.testing.assert_close(train.predict(model, x, batch_size=bs), full)
        assert train.accuracy(model, x, y, batch_size=bs) == pytest.approx(float((full.argmax(1) == y).float().mean()))
    assert model.training  # eval mode only inside the helpers
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            train.predict(model, x, batch_size=bad)


def test_crop_flip_is_a_padded_crop_or_its_mirror_and_is_seeded():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    out = train.crop_flip(x, torch.Generator().manual_seed(1))
    again = train.crop_flip(x, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and out.shape == x.shape
    assert not torch.equal(out, train.crop_flip(x, torch.Generator().manual_seed(2)))
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    flips = shifts = 0
    for i in range(64):  # brute force: each output is one of the 9 x 9 crops of the padded image, maybe mirrored
        found = None
        for dy in range(9):
            for dx in range(9):
                crop = padded[i, :, dy:dy + 8, dx:dx + 8]
                for flip in (False, True):
                    if torch.equal(out[i], crop.flip(-1) if flip else crop):
                        found = (dy, dx, flip)
        assert found is not None, i
        flips += found[2]
        shifts += (found[0], found[1]) != (4, 4)
    assert 15 < flips < 49 and shifts > 50  # both coins land, most crops are shifted
    assert torch.equal(train.crop_flip(x, torch.Generator().manual_seed(1), padding=0).flip(-1).flip(-1),
                       train.crop_flip(x, torch.Generator().manual_seed(1), padding=0))
    with pytest.raises(ValueError, match="images"):
        train.crop_flip(torch.rand(4, 8))


def test_step_schedule_is_the_papers_decay_and_a_named_schedule():
    s = train.step_schedule(60, 0.9)
    assert [s(e) for e in (0, 59, 60, 119, 120, 399)] == pytest.approx([1, 1, 0.9, 0.9, 0.81, 0.9 ** 6])
    x, y = _toy()
    h = train.fit(_net(), x, y, lr_schedule="step:2:0.5", **dict(FAST, epochs=5))
    assert h.column("lr")[1:] == pytest.approx([0.05, 0.05, 0.025, 0.025, 0.0125])
    kw = dict(cache="t", **{k: v for k, v in FAST.items() if k != "progress"})
    model = _net()
    assert train.cache_key(model, x, y, lr_schedule="step:2:0.5", **kw) == \
        train.cache_key(model, x, y, lr_schedule=train.StepSchedule(2, 0.5), **kw)
    assert train.cache_key(model, x, y, lr_schedule="step:2:0.5", **kw) != \
        train.cache_key(model, x, y, lr_schedule="step:3:0.5", **kw)
    for bad in ("step:0:0.5", "step:2", "step:a:b", "linear"):
        with pytest.raises(ValueError, match="lr_schedule|every|gamma"):
            train.fit(_net(), x, y, lr_schedule=bad, **FAST)


def test_augmentation_is_part_of_the_cache_key_and_reproducible(tmp_path):
    torch.manual_seed(0)
    x, y = torch.rand(48, 3, 8, 8), torch.randint(0, 2, (48,))

    def make():
        torch.manual_seed(3)
        return nn.Sequential(nn.Flatten(), nn.Linear(192, 2))

    kw = dict(optimizer="adam", lr=0.01, epochs=2, batch_size=16, cache="aug")
    keys = {a: train.cache_key(make(), x, y, augment=a, **kw) for a in (None, "crop_flip")}
    assert keys[None] != keys["crop_flip"]
    assert keys[None] == train.cache_key(make(), x, y, **kw)  # runs without augmentation keep their keys
    a, b, plain = make(), make(), make()
    ha = train.fit(a, x, y, augment="crop_flip", progress=False, **kw)
    train.fit(b, x, y, augment="crop_flip", progress=False, **dict(kw, cache=None))
    train.fit(plain, x, y, progress=False, **dict(kw, cache=None))
    assert _same(a, b) and not _same(a, plain)  # seeded augmentation; and it does change the training
    assert ha.meta["key"] == keys["crop_flip"]
    with pytest.raises(ValueError, match="augment"):
        train.fit(make(), x, y, augment="mixup", progress=False, **kw)
    with pytest.raises(ValueError, match="augment must return"):
        train.fit(make(), x, y, augment=lambda xb, g: xb[:, :, :4], progress=False, **dict(kw, cache=None))
