"""Bad input gets one clear error that names the argument or the file, and leaves nothing half-written.

One table over the public functions of ``data``, ``train``, ``attacks``, ``margins``, ``linear`` and
``scorecard``: each row calls a function with one thing wrong and states the exception type and a
pattern its message must match (the argument's or the file's name). Rows that are not errors by
design (a model left in training mode is evaluated in ``eval()`` and restored; a corrupt cache file
is ignored with a warning naming it and retrained) are checked for exactly that behaviour.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from marginlab import attacks, data, linear, margins, scorecard, train

DATA = Path(os.environ.get("MARGINLAB_DATA", "")) if os.environ.get("MARGINLAB_DATA") else None


def _net(k: int = 3, d: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, k)).eval()


X = torch.rand(6, 4)
Y = torch.tensor([0, 1, 2, 0, 1, 2])
X_NAN = X.clone()
X_NAN[0, 0] = math.nan
X_BIG = X.clone()
X_BIG[0, 0] = 1.5
Y_OUT = torch.tensor([0, 1, 2, 0, 1, 7])
Y_SHORT = Y[:5]


def _fit(x, y, **kw):
    return train.fit(_net(), x, y, epochs=1, batch_size=3, progress=False, **kw)


# (id, call, exception, pattern the message must match)
CASES: list[tuple[str, Callable[[], object], type[BaseException], str]] = [
    # data
    ("data.load unknown name", lambda: data.load("mnsit"), ValueError, "mnsit"),
    ("data.load unknown split", lambda: data.load("mnist", split="val"), ValueError, "split"),
    ("data.binary_subset unknown class", lambda: data.binary_subset(X, Y, "airplane", "unicorn"), ValueError,
     "unicorn"),
    ("data.subsample n too large", lambda: data.subsample(X, Y, 100), ValueError, "n"),
    # train
    ("train.fit length mismatch", lambda: _fit(X, Y_SHORT), ValueError, "y|length|rows"),
    ("train.fit labels out of range", lambda: _fit(X, Y_OUT), ValueError, "label|class|y"),
    ("train.fit NaN images", lambda: _fit(X_NAN, Y), ValueError, "x|NaN|finite"),
    ("train.fit epochs < 0", lambda: train.fit(_net(), X, Y, epochs=-1, progress=False), ValueError, "epochs"),
    ("train.fit unknown optimiser", lambda: _fit(X, Y, optimizer="adamm"), ValueError, "optimizer|adamm"),
    ("train.accuracy length mismatch", lambda: train.accuracy(_net(), X, Y_SHORT), ValueError, "y|length|rows"),
    # attacks
    ("attacks.pgd eps < 0", lambda: attacks.pgd(_net(), X, Y, eps=-0.1, steps=2), ValueError, "eps"),
    ("attacks.pgd eps NaN", lambda: attacks.pgd(_net(), X, Y, eps=math.nan, steps=2), ValueError, "eps"),
    ("attacks.pgd NaN images", lambda: attacks.pgd(_net(), X_NAN, Y, eps=0.1, steps=2), ValueError, "x"),
    ("attacks.pgd images outside [0,1]", lambda: attacks.pgd(_net(), X_BIG, Y, eps=0.1, steps=2), ValueError,
     r"x|\[0, 1\]"),
    ("attacks.pgd labels out of range", lambda: attacks.pgd(_net(), X, Y_OUT, eps=0.1, steps=2), ValueError,
     "label|y"),
    ("attacks.pgd length mismatch", lambda: attacks.pgd(_net(), X, Y_SHORT, eps=0.1, steps=2), ValueError, "y"),
    ("attacks.pgd unknown norm", lambda: attacks.pgd(_net(), X, Y, eps=0.1, steps=2, norm="l3"), ValueError,
     "norm"),
    ("attacks.pgd steps < 0", lambda: attacks.pgd(_net(), X, Y, eps=0.1, steps=-1), ValueError, "steps"),
    ("attacks.auto_attack eps < 0", lambda: attacks.auto_attack(_net(), X, Y, eps=-1.0), ValueError, "eps"),
    ("attacks.robust_accuracy eps < 0",
     lambda: attacks.robust_accuracy(_net(), X, Y, lambda m, x, y, e: x, [0.1, -0.2]), ValueError, "eps"),
    # margins
    ("margins.lipschitz r < 0", lambda: margins.lipschitz_lower_bound(_net(), X, Y, r=-1.0, n_samples=4),
     ValueError, "r"),
    ("margins.lipschitz n_samples < 1", lambda: margins.lipschitz_lower_bound(_net(), X, Y, r=1.0, n_samples=0),
     ValueError, "n_samples"),
    ("margins.lipschitz labels out of range",
     lambda: margins.lipschitz_lower_bound(_net(), X, Y_OUT, r=1.0, n_samples=4), ValueError, "label|y"),
    ("margins.linear_margins shape mismatch",
     lambda: margins.linear_margins(np.ones(3), 0.0, np.ones((5, 4)), np.ones(5)), ValueError, "w|x|shape|dim"),
    # linear
    ("linear.svm labels not ±1", lambda: linear.svm(np.eye(2), np.array([0, 1])), ValueError, "y|±1|-1"),
    ("linear.svm not separable",
     lambda: linear.svm(np.array([[0.0], [1.0], [2.0]]), np.array([1, -1, 1])), ValueError, "separable"),
    ("linear.svm shape mismatch", lambda: linear.svm(np.eye(3), np.array([1, -1])), ValueError, "y|X|shape|rows"),
    ("linear.logistic_gd steps < 0",
     lambda: linear.logistic_gd(np.eye(2), np.array([1, -1]), steps=-1, lr=0.1), ValueError, "steps"),
    # scorecard
    ("scorecard bad chapter", lambda: scorecard.Scorecard("a/b"), ValueError, "chapter"),
    ("scorecard within negative tol", lambda: scorecard.within(1.0, -0.1), ValueError, "tol"),
]


@pytest.mark.parametrize(("call", "exc", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_error(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# ----------------------------------------------------------------------------------- files
@pytest.fixture
def mnist_copy(tmp_path) -> Path:
    if DATA is None or not (DATA / "MNIST" / "raw").is_dir() and not any(DATA.glob("**/t10k-images-idx3-ubyte.gz")):
        pytest.skip("MARGINLAB_DATA with MNIST is not set")
    src = next(DATA.glob("**/t10k-images-idx3-ubyte.gz")).parent
    dest = tmp_path / src.relative_to(DATA)
    shutil.copytree(src, dest)
    return tmp_path


def test_missing_file_names_the_file(mnist_copy):
    victim = next(mnist_copy.glob("**/t10k-labels-idx1-ubyte.gz"))
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        data.load("mnist", "test", root=mnist_copy, download=False)
    assert not victim.exists()


def test_truncated_file_names_the_file_and_is_kept(mnist_copy):
    victim = next(mnist_copy.glob("**/t10k-labels-idx1-ubyte.gz"))
    raw = gzip.decompress(victim.read_bytes())
    victim.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    size = victim.stat().st_size
    with pytest.raises((ValueError, OSError, EOFError), match="t10k-labels-idx1-ubyte"):
        data.load("mnist", "test", root=mnist_copy, download=False)
    assert victim.stat().st_size == size  # the reader never rewrites what it could not read


# ----------------------------------------------------------------------------------- behaviours
def test_model_in_training_mode_is_attacked_in_eval_and_restored():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    train.fit(net, X, Y, epochs=2, batch_size=3, progress=False)
    net.train()
    x_adv = attacks.pgd(net, X, Y, eps=0.1, steps=3, random_start=False)
    assert net.training and all(m.training for m in net.modules())
    net.eval()
    assert torch.equal(x_adv, attacks.pgd(net, X, Y, eps=0.1, steps=3, random_start=False))


def test_corrupt_cache_file_is_named_ignored_and_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINLAB_CACHE", str(tmp_path))
    first = _fit(X, Y, cache="bad-input")
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and not first.cached
    files[0].write_bytes(files[0].read_bytes()[:100])
    with pytest.warns(UserWarning, match=files[0].name):
        again = _fit(X, Y, cache="bad-input")
    assert not again.cached
    assert sorted(p.name for p in tmp_path.iterdir()) == [files[0].name]  # replaced whole, no temp files
    assert _fit(X, Y, cache="bad-input").cached


def test_results_file_written_whole_or_not_at_all(tmp_path, monkeypatch):
    sc = scorecard.Scorecard("99_bad_input", profile="quick")
    sc.claim("c", "a claim", 1.0, 1.0, scorecard.at_least(0.5))
    path = sc.save(tmp_path)
    before = path.read_text()

    class Unserialisable:
        pass

    sc.record("bad", Unserialisable())
    with pytest.raises((TypeError, ValueError)):
        sc.save(tmp_path)
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    json.loads(before)
