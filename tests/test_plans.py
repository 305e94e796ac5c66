"""Chapter job plans (``training_jobs()`` of the chapter modules): the plan and the notebook build the same models,
so a chapter run after its plan trains nothing; ``MARGINLAB_FORBID_TRAINING`` turns a cache miss into an error."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from marginlab import angular, avgmargin, differential, jobs, lowrank, train
from marginlab.models import MLP

ROOT = Path(__file__).resolve().parents[1]
PLANNED = ("03", "04", "05", "06")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("MARGINLAB_CACHE", str(d))
    monkeypatch.delenv("MARGINLAB_FORBID_TRAINING", raising=False)
    return d


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setenv("MARGINLAB_PROFILE", "quick")
    monkeypatch.delenv("MARGINLAB_SMOKE", raising=False)


# ---------------------------------------------------------------------------------------------- forbid training


def test_forbidden_training_raises_on_a_cache_miss_only(cache, monkeypatch):
    x, y = torch.rand(32, 1, 4, 4), torch.arange(32) % 3

    def net():
        torch.manual_seed(0)
        return MLP([1, 4, 4], hidden=[8], num_classes=3)

    monkeypatch.setenv("MARGINLAB_FORBID_TRAINING", "1")
    with pytest.raises(RuntimeError, match="MARGINLAB_FORBID_TRAINING.*'plans-a'"):
        train.fit(net(), x, y, epochs=1, batch_size=16, cache="plans-a", progress=False)
    assert not cache.exists() or not any(cache.glob("*.pt"))
    assert len(train.fit(net(), x, y, epochs=1, batch_size=16, progress=False).rows) == 2  # no tag: trains
    monkeypatch.setenv("MARGINLAB_FORBID_TRAINING", "0")
    trained = train.fit(net(), x, y, epochs=1, batch_size=16, cache="plans-a", progress=False)
    monkeypatch.setenv("MARGINLAB_FORBID_TRAINING", "1")
    again = train.fit(net(), x, y, epochs=1, batch_size=16, cache="plans-a", progress=False)
    assert not trained.cached and again.cached and again.meta["key"] == trained.meta["key"]


# ---------------------------------------------------------------------------------------------- names kept in keys


def _outer(scale):
    def cb(epoch, model):
        return {"v": [scale * epoch for _ in range(2)]}  # a comprehension: nested code with its own qualname

    return cb


def _factory(scale):
    def cb(epoch, model):
        return {"v": [scale * epoch for _ in range(2)]}

    return cb


def test_keep_cache_name_reproduces_the_fingerprint_of_the_original_closure():
    before = train._fingerprint(_outer(2.0))
    assert train._fingerprint(_factory(2.0)) != before  # the qualified name is part of a cache key
    moved = jobs.keep_cache_name(_factory(2.0), "_outer.<locals>.cb")
    assert train._fingerprint(moved) == before
    assert moved(3, None) == {"v": [6.0, 6.0]}
    assert train._fingerprint(jobs.keep_cache_name(_factory(3.0), "_outer.<locals>.cb")) != before


# ---------------------------------------------------------------------------------------------- plans


@pytest.mark.parametrize("chapter", PLANNED)
@pytest.mark.parametrize("profile", ["quick", "smoke"])
def test_plan_lists_distinct_cached_units(chapter, profile, monkeypatch, cache):
    if profile == "smoke":
        monkeypatch.setenv("MARGINLAB_PROFILE", "full")
        monkeypatch.setenv("MARGINLAB_SMOKE", "1")
    else:
        monkeypatch.setenv("MARGINLAB_PROFILE", profile)
        monkeypatch.delenv("MARGINLAB_SMOKE", raising=False)
    planned = jobs.plan(jobs.chapter_jobs(chapter), cost=False)
    assert planned, f"chapter {chapter} plans no training"
    assert all(j.chapter == chapter and j.fit["cache"].startswith(f"ch{chapter}-") for j in planned)
    assert len({j.key for j in planned}) == len(planned)
    assert all(jobs._cached_ok(cache / f"{j.key}.pt", j.key) is False for j in planned)  # listing trains nothing


def test_chapter_3_plan_has_every_variant_and_its_long_run(quick):
    names = [j.name for j in lowrank.training_jobs()]
    assert names == ["SGD-momentum", "Adam", "SGD-BatchNorm", "momentum-long"]
    with jobs._profile("standard"):
        names = [j.name for j in lowrank.training_jobs()]
        assert names[3:6] == ["momentum-long", "Adam-long", "SGD-BatchNorm-long"]
        # the further seeds of the runs to zero training error (the interval over seeds on the counts)
        assert names[6:] == [f"{n}-seed{s}" for s in (1, 2) for n in ("SGD-momentum", "Adam", "SGD-BatchNorm")]
        jobs_by_name = {j.name: j for j in lowrank.training_jobs()}
        assert jobs_by_name["Adam-seed2"].fit["seed"] == 2 and jobs_by_name["Adam-seed2"].model.kwargs["seed"] == 2
    with pytest.raises(ValueError, match="zero training error only"):
        lowrank.variant_tag("Adam", long=True, seed=1)


def test_chapter_3_key_is_that_of_the_pre_plan_notebook(quick):
    """The notebook before the plan: data from binary_cifar, LeNet after seed_everything, rank_callback on tensors."""
    from marginlab import config
    from marginlab.models import LeNet

    x, y = lowrank.binary_cifar("train")
    xt, yt = lowrank.binary_cifar("test")
    config.seed_everything(0)
    net = LeNet(in_channels=3, num_classes=2, batchnorm=False)
    cb = lowrank.rank_callback({"train": (x, y), "test": (xt, yt)}, level=0.99)
    key = train.cache_key(net, x, y, epochs=40, batch_size=32, seed=0, callbacks=[cb], cache="ch03-SGD-momentum",
                          until_zero_error=True, optimizer="momentum", lr=0.01, momentum=0.9)
    assert jobs.job_key(lowrank.variant_job("SGD + momentum")) == key


def test_chapter_4_follow_up_job_appears_once_eq7_is_cached(quick, cache, monkeypatch):
    cfg = differential.CifarConfig(n_train=64, n_test=32, epochs=3, batch_size=32, match_zero_error=True)
    monkeypatch.setattr(differential, "cifar_config", lambda: cfg)
    assert [j.name for j in differential.training_jobs()] == ["ce", "eq7"]
    eq7 = differential.train_cifar_job("eq7", cfg)
    monkeypatch.setattr(differential, "zero_error_epoch", lambda history: 1)  # as if eq7 separated after epoch 1
    [report] = jobs.run_jobs(jobs.plan([eq7], cost=False))
    assert report.status == "trained"
    names = [j.name for j in differential.training_jobs()]
    assert names == ["ce", "eq7", "eq7-matched-1ep"]
    matched = differential.training_jobs()[2]
    assert matched.fit["epochs"] == 1 and matched.fit["cache"] == "ch04-eq7"


def test_chapter_6_table_jobs_key_what_compare_training_fits(quick):
    x, y = avgmargin.train_set("mnist")
    losses_ = avgmargin.training_methods(avgmargin.PAPER_TAU[("mnist", "mlp")])
    for method in ("Std", "LCR", "AMR"):
        key = train.cache_key(avgmargin.make_model("mlp", "mnist", seed=0), x, y, loss_fn=losses_[method], epochs=15,
                              seed=0, cache=f"ch06-t1-mnist-mlp-{method}", **avgmargin.FIT_003)
        assert jobs.job_key(avgmargin.table_job("mnist", "mlp", method)) == key, method


def test_chapter_6_curve_job_keys_what_margin_curves_fits(quick):
    x, y = avgmargin.train_set("mnist")
    pts = avgmargin.margin_points("mnist")
    st = avgmargin.chapter_settings()
    ep, track = avgmargin.curve_epochs("lr")
    model = avgmargin.make_model("lr", "mnist", seed=0)
    cb = avgmargin.margins_callback(pts, track, r=5.0, n_samples=st["n_samples"], upper_methods=st["upper"],
                                    upper_options=st["upper_options"])
    key = train.cache_key(model, x, y, epochs=ep, callbacks=(cb,), cache="ch06-curves-mnist-lr", seed=0,
                          **avgmargin.FIT_003)
    assert jobs.job_key(avgmargin.curve_job("mnist", "lr")) == key


def test_chapter_5_method_jobs_key_what_train_method_fits(quick):
    cfg = angular.default_config("mnist")
    x, y, _, _ = angular.load_data(cfg)
    for method in angular.METHODS:
        model = angular.make_model(method, cfg)
        epochs = cfg.at_epochs if method == "AT" and cfg.at_epochs is not None else cfg.epochs
        key = train.cache_key(model, x, y, loss_fn=angular.loss_for(method, cfg), optimizer="adam", lr=cfg.lr,
                              epochs=epochs, batch_size=cfg.batch_size, seed=cfg.seed, lr_schedule=cfg.lr_schedule,
                              cache=f"ch05-{method}")
        assert jobs.job_key(angular.method_job(method, "mnist")) == key, method


def test_chapter_5_ablation_grid_is_the_one_run_ablation_walks(quick):
    cfg = angular.default_config("mnist")
    grid = angular.ablation_grid(cfg, **angular.ablation_settings())
    assert [(g, p) for g, p, _ in grid] == [("alpha_s", (0.0, 0.1)), ("alpha_s", (100.0, 0.1)),
                                           ("activation", ("relu", 0.1)), ("activation", ("tanh", 0.1))]
    assert grid[3][2] == ("alpha_s", (100.0, 0.1))  # tanh at alpha = 100 is the grid's model
    assert angular.is_base_point(cfg, grid[1][2]) and not angular.is_base_point(cfg, grid[0][2])
    names = [j.name for j in angular.training_jobs()]
    assert names == ["mnist-CE", "mnist-AT", "mnist-MMC", "mnist-Ours", "ablation-alpha0.0-s0.1",
                     "ablation-feature_activationrelu-s0.1"]
    kw = grid[2][2]
    job = angular.training_jobs()[-1]
    model = angular.make_model("Ours", cfg, feature_activation="relu")
    x, y, _, _ = angular.load_data(cfg)
    key = train.cache_key(model, x, y, loss_fn=angular.loss_for("Ours", cfg, s=0.1), optimizer="adam", lr=cfg.lr,
                          epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, lr_schedule=cfg.lr_schedule,
                          cache=f"{angular.ablation_tag(kw)}-Ours")
    assert jobs.job_key(job) == key


# ---------------------------------------------------------------------------------------------- end to end


def _env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARGINLAB_") or k in ("MARGINLAB_DATA",
                                                                                         "MARGINLAB_THREADS")}
    env.update({"MARGINLAB_CACHE": str(cache_dir), "MARGINLAB_PROFILE": "quick", **extra})
    return env


@pytest.mark.slow
def test_chapter_4_runs_on_its_plan_without_training(tmp_path):
    """Chapter 4's plan trained by ``jobs --run``, then the chapter with training forbidden: it must find every
    model it trains in the cache (a miss raises), and add nothing to it. At the full profile's smoke size (the
    full profile's plan and code paths, toy sizes: 17 s instead of the quick profile's 94 s)."""
    cache_dir = tmp_path / "cache"
    smoke = {"MARGINLAB_PROFILE": "full", "MARGINLAB_SMOKE": "1", "MARGINLAB_RESULTS": str(tmp_path / "results")}
    run = subprocess.run([sys.executable, "-m", "marginlab", "jobs", "4", "--run", "--no-cost"], cwd=ROOT,
                         env=_env(cache_dir, **smoke), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 trained" in run.stdout
    before = sorted(p.name for p in cache_dir.iterdir())
    chapter = subprocess.run([sys.executable, "-m", "marginlab", "run", "04"], cwd=ROOT,
                             env=_env(cache_dir, MARGINLAB_FORBID_TRAINING="1", **smoke), capture_output=True,
                             text=True, timeout=900)
    assert chapter.returncode == 0, chapter.stdout[-3000:] + chapter.stderr[-3000:]
    assert sorted(p.name for p in cache_dir.iterdir()) == before  # nothing trained, nothing written
