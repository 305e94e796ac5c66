"""The CPU thread policy (issue 15): its decisions as a pure function, and that ``import marginlab`` applies it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from marginlab import config, threads
from marginlab.config import CpuBudget, choose_threads, openmp_environment


# ---- the decisions, from given inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("cpus, quota, load, passive, expected", [
    (2, None, 0.0, True, 2),     # an idle 2-core laptop: both cores
    (2, None, 1.0, True, 2),     # beside one busy process: passive waits degrade gracefully, keep both
    (2, None, 9.0, True, 2),
    (64, 2.0, 0.0, True, 2),     # a container limited to 2 CPUs on a 64-core host: 2, not 64
    (64, 1.5, 0.0, True, 1),     # a fractional quota rounds down
    (4, 0.5, 0.0, True, 1),      # and never below one thread
    (2, 8.0, 0.0, True, 2),      # a quota above the affinity mask changes nothing
    (2, None, 0.2, False, 2),    # spinning waits on an idle machine: both cores
    (2, None, 0.6, False, 1),    # spinning beside a busy process: the busy CPU is taken off
    (2, None, 1.0, False, 1),
    (8, None, 3.4, False, 5),
    (2, None, 10.0, False, 1),   # never below one thread
    (16, 4.0, 1.0, False, 3),    # quota first, then the load
])
def test_choose_threads(cpus, quota, load, passive, expected):
    assert choose_threads(cpus, quota, load, passive=passive) == expected


@pytest.mark.parametrize("kwargs, match", [
    (dict(cpus=0), "cpus"), (dict(cpus=2.0), "cpus"), (dict(cpus=2, quota=0.0), "quota"),
    (dict(cpus=2, load=-1.0), "load"), (dict(cpus=2, load=float("nan")), "load"),
])
def test_choose_threads_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose_threads(**kwargs)


@pytest.mark.parametrize("environ, torch_loaded, expected", [
    ({}, False, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}),
    ({"MARGINLAB_THREADS": "auto"}, False, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}),
    ({"MARGINLAB_THREADS": "2"}, False, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}),
    ({}, True, {}),                                  # too late: OpenMP read its environment with torch
    ({"OMP_WAIT_POLICY": "ACTIVE"}, False, {}),      # the user's choice stands
    ({"GOMP_SPINCOUNT": "5000"}, False, {}),
    ({"MARGINLAB_THREADS": "off"}, False, {}),       # opted out
])
def test_openmp_environment(environ, torch_loaded, expected):
    assert openmp_environment(environ, torch_loaded) == expected


def test_bad_threads_setting():
    with pytest.raises(ValueError, match="MARGINLAB_THREADS"):
        openmp_environment({"MARGINLAB_THREADS": "many"}, False)


def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert config.cgroup_cpu_quota(v2) == pytest.approx(1.5)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert config.cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert config.cgroup_cpu_quota(v1) == pytest.approx(2.0)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert config.cgroup_cpu_quota(v1) is None
    assert config.cgroup_cpu_quota(tmp_path / "missing") is None


def test_cpu_budget_is_sane():
    b = config.cpu_budget()
    assert 1 <= b.affinity <= (os.cpu_count() or 1)
    assert b.load >= 0 and (b.quota is None or b.quota > 0)


@pytest.fixture
def restore_threads():
    before, policy, balancer = torch.get_num_threads(), config.thread_policy(), threads.balancer()
    yield
    torch.set_num_threads(before)
    config._POLICY = policy
    threads.install(balancer)


@pytest.mark.parametrize("environ, budget, expected", [
    ({}, CpuBudget(affinity=1, quota=None, load=0.0), 1),          # the budget decides
    ({"MARGINLAB_THREADS": "1"}, None, 1),                          # an explicit count
    ({"MARGINLAB_THREADS": "off"}, CpuBudget(1, None, 0.0), None),   # torch left alone
    ({"OMP_NUM_THREADS": "2"}, CpuBudget(1, None, 0.0), None),       # the user's OpenMP count stands
])
def test_apply_thread_policy(restore_threads, environ, budget, expected):
    torch.set_num_threads(2)
    policy = config.apply_thread_policy(environ, budget)
    assert policy.threads == expected and config.thread_policy() is policy
    assert torch.get_num_threads() == (2 if expected is None else expected)


def test_apply_thread_policy_never_raises_the_count(restore_threads):
    torch.set_num_threads(1)  # the caller's (or torch's default) choice is the ceiling
    assert config.apply_thread_policy({}, CpuBudget(affinity=8, quota=None, load=0.0)).threads == 1
    assert torch.get_num_threads() == 1


def test_apply_thread_policy_balances_unless_fixed_or_under_a_quota(restore_threads):
    torch.set_num_threads(2)
    policy = config.apply_thread_policy({}, CpuBudget(affinity=2, quota=None, load=0.0))
    linux = os.path.exists("/proc/stat") and hasattr(os, "sched_getaffinity")
    assert policy.balanced is linux and (threads.balancer() is not None) is linux
    for environ, budget in [({"MARGINLAB_THREADS": "fixed"}, CpuBudget(2, None, 0.0)),
                            ({}, CpuBudget(64, 2.0, 0.0)),        # a quota: the host's CPUs say nothing
                            ({"MARGINLAB_THREADS": "2"}, None), ({"MARGINLAB_THREADS": "off"}, None)]:
        policy = config.apply_thread_policy(environ, budget)
        assert not policy.balanced and threads.balancer() is None, environ


# ---- the balancer: other processes' use of this process's CPUs, from /proc/stat ------------------------------

def _stat(path, ticks_per_cpu: dict[int, tuple[int, int]]) -> None:
    """A /proc/stat with the given (busy, idle) ticks per CPU (busy split over user and system)."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    for c, (busy, idle) in ticks_per_cpu.items():
        lines.append(f"cpu{c} {busy - busy // 3} 0 {busy // 3} {idle} 7 0 0 0 0 0")
    path.write_text("\n".join(lines + ["intr 1 2 3", "ctxt 42"]) + "\n")


def test_read_busy_seconds(tmp_path):
    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    _stat(stat, {0: (300, 1000), 1: (600, 50), 2: (10_000, 0)})
    assert threads.read_busy_seconds([0, 1], stat) == pytest.approx(900 / hz)  # cpu2 is not ours
    stat.write_text("cpu0 5 1 2 100 3 4 6 8 99 99\n")  # user nice system idle iowait irq softirq steal guest..
    assert threads.read_busy_seconds([0], stat) == pytest.approx((5 + 1 + 2 + 4 + 6 + 8) / hz)
    assert threads.read_busy_seconds([3], stat) is None
    assert threads.read_busy_seconds([0], tmp_path / "missing") is None


@pytest.mark.parametrize("others, cpus, ceiling, expected", [
    (0.0, 2, 2, 2), (0.4, 2, 2, 2), (0.5, 2, 2, 1), (1.0, 2, 2, 1), (7.0, 2, 2, 1),
    (0.0, 8, 4, 4), (3.0, 8, 8, 5), (0.0, 2, 1, 1),
])
def test_threads_beside(others, cpus, ceiling, expected):
    assert threads.threads_beside(others, cpus, ceiling) == expected


@pytest.mark.parametrize("args, match", [((-0.1, 2, 2), "others"), ((float("nan"), 2, 2), "others"),
                                         ((0.0, 0, 2), "cpus"), ((0.0, 2, 0), "ceiling")])
def test_threads_beside_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        threads.threads_beside(*args)


def test_others_busy():
    a = threads.CpuSample(wall=10.0, busy=100.0, own=5.0)
    assert threads.others_busy(a, threads.CpuSample(12.0, 104.0, 7.0)) == pytest.approx(1.0)
    assert threads.others_busy(a, threads.CpuSample(12.0, 103.0, 8.0)) == 0.0  # tick rounding: never < 0
    with pytest.raises(ValueError, match="order"):
        threads.others_busy(a, a)


class _Clock:
    def __init__(self):
        self.wall, self.own = 100.0, 1.0

    def monotonic(self):
        return self.wall

    def process_time(self):
        return self.own


def test_balancer_follows_a_busy_neighbour(tmp_path, monkeypatch, restore_threads):
    hz = os.sysconf("SC_CLK_TCK")
    clock, stat = _Clock(), tmp_path / "stat"
    monkeypatch.setattr(threads.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(threads.time, "process_time", clock.process_time)
    busy = {0: 0, 1: 0}

    def advance(seconds: float, own_cpus: float, other_cpus: float) -> None:
        """Both CPUs: this process used own_cpus, others other_cpus, for `seconds`."""
        clock.wall += seconds
        clock.own += own_cpus * seconds
        total = round((own_cpus + other_cpus) * seconds * hz)
        busy[0] += total // 2
        busy[1] += total - total // 2
        _stat(stat, {c: (b, 10_000) for c, b in busy.items()})

    _stat(stat, {0: (0, 10_000), 1: (0, 10_000)})
    torch.set_num_threads(2)
    b = threads.ThreadBalancer(2, [0, 1], interval=1.0, stat=stat)
    assert b.active and b.poll() == 2
    advance(2.0, own_cpus=2.0, other_cpus=0.0)
    assert b.poll() == 2 and torch.get_num_threads() == 2            # alone: both threads
    advance(2.0, own_cpus=1.33, other_cpus=0.67)
    assert b.poll() == 1 and torch.get_num_threads() == 1            # a neighbour took a CPU
    advance(0.5, own_cpus=1.0, other_cpus=0.0)
    assert b.poll() == 1 and b.changes == 1                          # too soon to look again
    advance(2.0, own_cpus=1.0, other_cpus=1.0)
    assert b.poll() == 1                                             # still there: stay at one
    advance(2.0, own_cpus=1.0, other_cpus=0.1)
    assert b.poll() == 2 and torch.get_num_threads() == 2 and b.changes == 2  # gone: both again
    with config.cpu_threads(1):                                      # someone else's count: stand aside
        advance(2.0, own_cpus=1.0, other_cpus=0.0)
        assert b.poll() == 2 and torch.get_num_threads() == 1
    advance(2.0, own_cpus=1.0, other_cpus=1.0)
    assert b.poll() == 1 and torch.get_num_threads() == 1           # back in charge after the block


def test_balancer_without_proc_stat(tmp_path, restore_threads):
    b = threads.ThreadBalancer(2, [0, 1], stat=tmp_path / "missing")
    assert not b.active and b.poll() == 2
    threads.install(b)
    assert threads.balancer() is None  # nothing to drive on this platform
    threads.balance()
    with pytest.raises(ValueError, match="interval"):
        threads.ThreadBalancer(2, [0], interval=0.0, stat=tmp_path / "missing")


# ---- import marginlab applies it (fresh interpreters) -------------------------------------------------------

_PROBE = ("{first}import marginlab, torch, json; p = marginlab.config.thread_policy(); "
          "print(json.dumps(dict(threads=torch.get_num_threads(), policy_threads=p.threads, passive=p.passive)))")


def _probe(env_extra: dict[str, str], torch_first: bool = False, cpus: set[int] | None = None) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                        "MARGINLAB_THREADS")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", **env_extra)  # libgomp prints its settings when torch loads it
    code = _PROBE.format(first="import torch; " if torch_first else "")
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=preexec)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _spincount(stderr: str) -> int:
    lines = [ln for ln in stderr.splitlines() if "GOMP_SPINCOUNT" in ln]
    if not lines:
        pytest.skip("this torch's OpenMP runtime does not report GOMP_SPINCOUNT (not libgomp)")
    return int(lines[0].split("=")[1].strip().strip("'"))


def test_import_marginlab_makes_openmp_wait_passively():
    out, err = _probe({})
    assert _spincount(err) == config.SPIN_COUNT  # reached OpenMP: a short spin, then sleep (not 300,000)
    assert out["passive"] and out["threads"] == out["policy_threads"] >= 1


def test_import_marginlab_threads_follow_the_affinity_mask():
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs at least two CPUs and sched_setaffinity")
    out, _ = _probe({}, cpus={min(os.sched_getaffinity(0))})
    assert out["threads"] == 1


def test_torch_imported_first_falls_back_to_the_load():
    """A notebook that imported torch first keeps libgomp's spinning; the policy then counts the load."""
    out, err = _probe({}, torch_first=True)
    assert _spincount(err) > 0 and not out["passive"]
    assert 1 <= out["threads"] <= len(os.sched_getaffinity(0))


def test_opting_out_and_the_users_choice():
    out, err = _probe({"MARGINLAB_THREADS": "off"})
    assert _spincount(err) > 0 and out["policy_threads"] is None
    out, err = _probe({"OMP_WAIT_POLICY": "ACTIVE"})
    assert _spincount(err) > 300_000  # ACTIVE spins (practically) forever; we did not override it
    out, _ = _probe({"MARGINLAB_THREADS": "1"})
    assert out["threads"] == 1


class _CountingBalancer:
    active = True
    changes = 0

    def __init__(self):
        self.polls = 0

    def poll(self) -> int:
        self.polls += 1
        return torch.get_num_threads()


def test_the_loops_look_once_per_step(restore_threads):
    """The trainer, the evaluation batches and an attack's steps each call threads.balance()."""
    from marginlab import attacks, models, train

    counter = _CountingBalancer()
    threads.install(counter)
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28), torch.arange(64) % 10
    model = models.MLP((1, 28, 28), hidden=(16,), num_classes=10)
    train.fit(model, x, y, epochs=2, batch_size=16, optimizer="sgd", lr=0.1, progress=False)
    assert counter.polls >= 2 * 4  # one per batch
    before = counter.polls
    train.accuracy(model.eval(), x, y, batch_size=16)
    assert counter.polls - before >= 4
    before = counter.polls
    attacks.pgd(model, x, y, eps=0.1, steps=5, early_stop=False)
    assert counter.polls - before >= 5
    assert config.describe()["thread_changes"] == 0
