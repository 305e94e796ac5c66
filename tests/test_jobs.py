"""Job plans and executors (marginlab.jobs): keys equal train.fit's, cost counts, local and Ray runs agree bitwise,
second runs train nothing, failures are reported while the others finish, dead workers leave no partial files."""
from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from marginlab import jobs, train
from marginlab.models import MLP

MNIST_SHAPE = [1, 28, 28]


def mlp_job(name: str, hidden: int = 16, seed: int = 0, num_classes: int = 10, n: int = 192, **fit) -> jobs.Job:
    fit = {"cache": f"test-{name}", "epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 1e-3, **fit}
    return jobs.Job("99", name,
                    model=jobs.call(jobs.model, "marginlab.models:MLP", seed, in_dim=MNIST_SHAPE, hidden=[hidden],
                                    num_classes=num_classes),
                    data=jobs.call(jobs.dataset, "mnist", "train", n=n),
                    fit=fit)


def tiny_plan() -> list[jobs.Job]:
    return [mlp_job("a", hidden=16), mlp_job("b", hidden=8, seed=1), mlp_job("c", hidden=16, weight_decay=1e-3)]


def training_jobs() -> list[jobs.Job]:
    """Stands in for a chapter module's plan in the CLI test."""
    return tiny_plan()[:2]


def weights(cache_dir: Path, key: str) -> dict[str, torch.Tensor]:
    return torch.load(cache_dir / f"{key}.pt", map_location="cpu", weights_only=True)["state_dict"]


def leftovers(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("MARGINLAB_CACHE", str(d))
    return d


# ---------------------------------------------------------------------------------------------- specs and keys


def test_spec_pickles_and_rebuilds():
    spec = jobs.call(jobs.model, "marginlab.models:MLP", 3, in_dim=4, hidden=[5], num_classes=2)
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and again.target == "marginlab.jobs:model"
    a, b = spec.resolve(), again.resolve()
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))


def test_spec_rejects_what_a_worker_cannot_import():
    with pytest.raises(ValueError, match="module-level"):
        jobs.call(lambda: 0)
    with pytest.raises(ValueError, match="module:function"):
        jobs.Spec("marginlab.models.MLP")


def test_job_validation():
    base = mlp_job("x")
    with pytest.raises(ValueError, match="cache tag"):
        jobs.Job("99", "x", base.model, base.data, fit={"epochs": 1})
    with pytest.raises(ValueError, match="device"):
        jobs.Job("99", "x", base.model, base.data, fit={"cache": "t", "device": "cpu"})
    with pytest.raises(ValueError, match="tensor or module"):
        jobs.Job("99", "x", base.model, base.data, fit={"cache": "t", "callbacks": (torch.zeros(1),)})
    with pytest.raises(ValueError, match="unique"):
        jobs.plan([base, base], cost=False)


def test_planned_key_is_the_key_of_the_notebooks_fit_call(cache):
    """The notebook's way: seed, build, load, fit(cache=...) — the same key as the plan's, and a cache hit after
    the plan ran."""
    [job] = jobs.plan([mlp_job("a")], cost=False)
    torch.manual_seed(0)
    net = MLP(MNIST_SHAPE, hidden=[16], num_classes=10)
    x, y = jobs.dataset("mnist", "train", n=192)
    kw = dict(cache="test-a", epochs=2, batch_size=64, optimizer="adam", lr=1e-3)
    assert train.cache_key(net, x, y, **kw) == job.key
    [report] = jobs.run_jobs([job])
    assert report.status == "trained" and report.key == job.key
    hist = train.fit(net, x, y, progress=False, **kw)
    assert hist.cached and hist.meta["key"] == job.key


def test_key_changes_with_the_configuration():
    keys = [j.key for j in jobs.plan(tiny_plan(), cost=False)]
    assert len(set(keys)) == 3


# ---------------------------------------------------------------------------------------------- cost


def test_flops_per_step_match_the_matrix_products():
    """MLP 784-16-10, batch 64: forward 2B(784·16 + 16·10); backward: both weight gradients (= forward) and the
    hidden layer's input gradient 2B·16·10 (the input itself needs none)."""
    [job] = jobs.plan([mlp_job("a", n=150)])
    B = 64
    forward = 2 * B * (784 * 16 + 16 * 10)
    assert job.cost.flops_per_step == 2 * forward + 2 * B * 16 * 10
    # 150 rows in batches of 64: 64, 64, 22 -> 3 steps per epoch, 2 epochs
    assert job.cost.steps == 6
    assert job.cost.cpu_seconds is not None and job.cost.cpu_seconds > 0
    floor = job.cost.ops_per_step * jobs.ASSUMED_GPU["seconds_per_op"] * job.cost.steps
    assert job.cost.gpu_seconds == pytest.approx(floor)  # a small net is launch-bound, not FLOP-bound


def test_memory_estimate_counts_state_data_and_saved_activations():
    """MLP 784-16-10 with Adam: weights + gradients + two moments = 4 copies of the parameters; per example the
    backward pass keeps at least the input, the hidden activation and the log-probabilities (floats)."""
    [job] = jobs.plan([mlp_job("a", n=150)])
    c = job.cost
    params = 784 * 16 + 16 + 16 * 10 + 10
    assert 4 * params * 4 <= c.state_bytes <= 4 * params * 4 + 64
    floats = 784 + 16 + 10
    assert floats * 4 <= c.activation_bytes_per_example <= 2 * floats * 4 + 64
    assert c.data_bytes == 150 * 784 * 4 + 150 * 8
    assert c.peak_bytes == c.state_bytes + c.data_bytes + 64 * c.activation_bytes_per_example
    [wide] = jobs.plan([mlp_job("w", hidden=64, n=150)])
    assert wide.cost.activation_bytes_per_example > c.activation_bytes_per_example


def test_flop_count_agrees_with_torch_flop_counter_mode():
    """A CNN with Adam: the job's count equals FlopCounterMode's on the same step (cross-check)."""
    from torch.utils.flop_counter import FlopCounterMode

    from marginlab.models import LeNet

    job = jobs.Job("99", "lenet", model=jobs.call(jobs.model, "marginlab.models:LeNet", 0, in_channels=1,
                                                  num_classes=10),
                   data=jobs.call(jobs.dataset, "mnist", "train", n=64),
                   fit={"cache": "t", "batch_size": 8, "optimizer": "adam"})
    ours = jobs.plan([job], probe=8)[0].cost.flops_per_step
    torch.manual_seed(0)
    net = LeNet(in_channels=1, num_classes=10)
    x, y = jobs.dataset("mnist", "train", n=8)
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(net(x), y).backward()
    assert ours == counter.get_total_flops() > 0


def test_adversarial_training_counts_the_inner_attack():
    """PGD-k inside the loss: each of the k attack steps is a forward pass plus the input gradient, 2F for the MLP
    (F = forward FLOPs); the count must hold at least those k·2F on top of the plain step."""
    plain = mlp_job("a")
    adv = jobs.Job("99", "at", plain.model, plain.data,
                   fit={**plain.fit, "loss_fn": jobs.call("marginlab.losses:pgd_adversarial_loss", 0.3, 4, 0.1)})
    a, b = jobs.plan([plain, adv], measure_cpu=False)
    forward = 2 * 64 * (784 * 16 + 16 * 10)
    extra = b.cost.flops_per_step - a.cost.flops_per_step
    assert 4 * 2 * forward <= extra <= 8 * 2 * forward
    assert b.cost.ops_per_step > 3 * a.cost.ops_per_step


def test_steps_follow_the_trainers_batching():
    # a trailing batch of one example is dropped by fit; max_steps caps; balanced batches cycle the smaller class
    assert jobs.plan([mlp_job("a", n=129, batch_size=64)])[0].cost.steps == 2 * 2
    assert jobs.plan([mlp_job("a", n=192, max_steps=5)])[0].cost.steps == 5
    job = jobs.Job("99", "bal", model=mlp_job("a").model,
                   data=jobs.call(jobs.dataset, "mnist", "train", n=100, positive=0, negative=1),
                   fit={"cache": "t", "epochs": 3, "batch_size": 20, "sampler": "balanced"})
    _, y = jobs.dataset("mnist", "train", n=100, positive=0, negative=1)
    larger = max(int((y == 1).sum()), int((y == -1).sum()))
    assert jobs.plan([job])[0].cost.steps == 3 * math.ceil(larger / 10)


def test_makespan():
    assert jobs.makespan([3, 3, 2, 2, 2], 2) == 7  # LPT: {3,2,2} {3,2}
    assert jobs.makespan([5, 1], 4) == 5
    assert jobs.makespan([1.0] * 8, 1) == 8.0
    with pytest.raises(ValueError, match="workers"):
        jobs.makespan([1.0], 0)


# ---------------------------------------------------------------------------------------------- local executor


def test_local_run_then_second_run_trains_nothing(cache):
    plan = jobs.plan(tiny_plan(), cost=False)
    first = jobs.run_jobs(plan)
    assert [r.status for r in first] == ["trained"] * 3
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{j.key}.pt" for j in plan)
    second = jobs.run_jobs(plan)
    assert [r.status for r in second] == ["cached"] * 3
    assert leftovers(cache) == []


def test_failing_job_is_reported_and_the_others_finish(cache):
    bad = mlp_job("bad", num_classes=2)  # ten-class labels for a two-class head: fit refuses them
    plan = jobs.plan([mlp_job("a"), bad, mlp_job("b", hidden=8)], cost=False)
    reports = {r.job: r for r in jobs.run_jobs(plan)}
    assert reports["99/a"].status == reports["99/b"].status == "trained"
    failed = reports["99/bad"]
    assert failed.status == "failed" and "ValueError: labels y" in failed.error and "Traceback" in failed.traceback
    assert failed.config["fit"]["cache"] == "test-bad" and failed.config["model"]["kwargs"]["num_classes"] == 2
    assert not (cache / f"{plan[1].key}.pt").exists() and leftovers(cache) == []


def test_jobs_sharing_a_key_run_once(cache):
    plan = jobs.plan([mlp_job("a"), dataclass_renamed(mlp_job("a"), "a-again")], cost=False)
    assert plan[0].key == plan[1].key
    reports = jobs.run_jobs(plan)
    assert [r.status for r in reports] == ["trained", "duplicate"]
    assert reports[1].duplicate_of == "99/a" and reports[1].meta["outcome"] == "trained"


def dataclass_renamed(job: jobs.Job, name: str) -> jobs.Job:
    import dataclasses

    return dataclasses.replace(job, name=name)


def test_a_rebuilt_key_that_differs_from_the_plan_fails_the_job(cache):
    import dataclasses

    [job] = jobs.plan([mlp_job("a")], cost=False)
    [r] = jobs.run_jobs([dataclasses.replace(job, key="0" * 64)])
    assert r.status == "failed" and "differs from the planned key" in r.error


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_lists_without_training_then_runs(cache, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(jobs.CHAPTER_MODULES, "98", __name__)
    out_json = tmp_path / "plan.json"
    assert jobs.main(["98", "--profile", "quick", "--json", str(out_json)]) == 0
    listing = capsys.readouterr().out
    planned = json.loads(out_json.read_text())["jobs"]
    assert [j["name"] for j in planned] == ["a", "b"]
    assert all(j["key"][:12] in listing for j in planned) and "estimated wall time" in listing
    assert not cache.exists() or not any(cache.iterdir())  # listing trains nothing
    assert jobs.main(["98", "--run", "--no-cost"]) == 0
    assert "2 trained" in capsys.readouterr().out
    assert jobs.main(["98", "--run", "--no-cost"]) == 0
    assert "2 cached" in capsys.readouterr().out


def test_resolve_chapter():
    assert jobs.resolve_chapter("5") == jobs.resolve_chapter("ch05") == "05"
    assert jobs.resolve_chapter("chapters/05_angular_margin_penalty.md") == "05"
    assert jobs.resolve_chapter("angular") == "05"
    with pytest.raises(ValueError, match="unknown chapter"):
        jobs.resolve_chapter("nonsense")
    assert jobs.chapter_jobs("1") == []


# ---------------------------------------------------------------------------------------------- Ray executor


def die_while_saving(driver_pid: int, **model_kwargs) -> torch.nn.Module:
    """A model factory that, on a Ray worker (not in the driver, where the plan is made), makes the worker die in
    the middle of writing the cache file: half a file written, then the process exits."""
    if os.getpid() != driver_pid:
        def torn_save(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 half a checkpoint")
            f.flush()
            os._exit(17)

        torch.save = torn_save
    return jobs.model("marginlab.models:MLP", 0, **model_kwargs)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    old = os.environ.get("PYTHONPATH")
    # the workers import this module (die_while_saving) and the package from the same interpreter
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), old]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def test_ray_matches_local_bitwise_and_second_run_trains_nothing(ray_local, tmp_path):
    plan = jobs.plan(tiny_plan(), cost=False)
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    local = jobs.run_jobs(plan, "local", cache_dir=local_dir)
    remote = jobs.run_jobs(plan, "ray", cache_dir=ray_dir)
    assert [r.status for r in local] == [r.status for r in remote] == ["trained"] * 3
    assert [r.key for r in remote] == [j.key for j in plan] == [r.key for r in local]
    assert all(r.where and "cpu" in r.where for r in remote)
    for j in plan:
        a, b = weights(local_dir, j.key), weights(ray_dir, j.key)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = jobs.run_jobs(plan, "ray", cache_dir=ray_dir)
    assert [r.status for r in again] == ["cached"] * 3
    assert leftovers(ray_dir) == []


def test_ray_worker_death_is_reported_and_leaves_no_partial_file(ray_local, tmp_path):
    good = tiny_plan()[:2]
    doomed = jobs.Job("99", "doomed",
                      model=jobs.call(die_while_saving, os.getpid(), in_dim=MNIST_SHAPE, hidden=[4], num_classes=10),
                      data=jobs.call(jobs.dataset, "mnist", "train", n=128),
                      fit={"cache": "test-doomed", "epochs": 1, "batch_size": 64})
    plan = jobs.plan([good[0], doomed, good[1]], cost=False)
    cache_dir = tmp_path / "ray"
    reports = {r.job: r for r in jobs.run_jobs(plan, "ray", cache_dir=cache_dir)}
    assert reports["99/a"].status == reports["99/b"].status == "trained"
    dead = reports["99/doomed"]
    assert dead.status == "failed" and dead.config["model"]["call"].endswith(":die_while_saving")
    assert len(dead.meta.get("removed_partial_files", [])) == 1  # the worker did die mid-write
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(f"{j.key}.pt" for j in plan if j.name != "doomed")
