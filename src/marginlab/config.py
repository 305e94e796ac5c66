"""Profiles, devices, seeds and cache locations.

The profile decides how much work a chapter does:

* ``quick`` (CPU, minutes, small subsets) — a pipeline check, the default on any hardware,
  so that tests and book builds never start hours of training by surprise;
* ``standard`` (CPU, under 45 minutes a chapter) — the papers' optimisers, architectures and
  attack budgets on all locally available data, epochs cut where they do not fit;
* ``full`` (GPU) — the papers' settings.

It is read from ``MARGINLAB_PROFILE``. ``MARGINLAB_SMOKE=1`` (with ``full``) runs the full
profile's code paths at toy sizes and writes ``results/smoke/`` instead of ``results/full/``.

CPU threads (:func:`apply_thread_policy`, run by ``import marginlab``): OpenMP workers that
spin-wait for a partner the scheduler gave to another process make the book's small models many
times slower on a shared CPU, so the package asks OpenMP to wait passively (after a short spin), sizes torch's
intra-op pool from the CPUs this process may really use, and while it runs takes a thread off for
every CPU another process keeps busy (:mod:`marginlab.threads`). ``MARGINLAB_THREADS=off`` leaves torch
alone; ``MARGINLAB_THREADS=N`` asks for ``N`` threads; ``MARGINLAB_THREADS=fixed`` keeps the count
chosen at import (bitwise-repeatable CPU runs: float sums depend on the thread count).
"""
from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

THREADS_ENV = "MARGINLAB_THREADS"
# Variables by which a user has already decided how OpenMP waits or how many threads it runs.
_OPENMP_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
_COUNT_CHOICES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


#: libgomp's busy-wait before a waiting worker sleeps: long enough to catch the next parallel region of
#: a small model on an idle machine, far too short to burn a time slice a descheduled partner needs
#: (measured in benchmarks/bench_threads.py: passive waits alone cost 1.1-1.8x on an idle machine)
SPIN_COUNT = 1000


def openmp_environment(environ: Mapping[str, str], torch_loaded: bool) -> dict[str, str]:
    """The OpenMP variables ``import marginlab`` sets: ``OMP_WAIT_POLICY=PASSIVE``, so that a worker
    waiting at the end of a parallel region sleeps instead of spinning on a core another process
    needs (libgomp otherwise spins ~300,000 iterations per wait), and for libgomp (Linux wheels of
    torch) ``GOMP_SPINCOUNT`` = :data:`SPIN_COUNT`, a short spin before it sleeps, which an explicit
    spin count makes libgomp use instead of the passive policy's zero. Nothing when torch is already
    loaded (OpenMP read its environment then), when the user chose a wait policy or spin count,
    or with ``MARGINLAB_THREADS=off``. A pure function of its inputs."""
    if torch_loaded or _threads_setting(environ) == "off":
        return {}
    if any(environ.get(k) for k in _OPENMP_CHOICES):
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": str(SPIN_COUNT)}


def _threads_setting(environ: Mapping[str, str]) -> str | int:
    raw = environ.get(THREADS_ENV, "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("off", "torch", "0"):
        return "off"
    if raw == "fixed":
        return "fixed"
    if raw.isdigit():
        return int(raw)
    raise ValueError(f"{THREADS_ENV}={raw!r}: use auto, fixed, off, or a number of threads")


# OpenMP reads its environment once, when torch first loads libgomp: set it before importing torch.
_TORCH_LOADED_BEFORE_US = "torch" in sys.modules
_OPENMP_SET = openmp_environment(os.environ, _TORCH_LOADED_BEFORE_US)
os.environ.update(_OPENMP_SET)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import threads  # noqa: E402

PROFILES = ("quick", "standard", "full")
T = TypeVar("T")


class _AsFull:
    """Sentinel of :func:`pick`: "the same value as ``full``"."""

    def __repr__(self) -> str:
        return "AS_FULL"


AS_FULL: Any = _AsFull()


def profile() -> str:
    """The active profile: ``$MARGINLAB_PROFILE``, else ``quick`` (on any hardware)."""
    name = os.environ.get("MARGINLAB_PROFILE", "").strip().lower()
    if not name:
        return "quick"
    if name not in PROFILES:
        raise ValueError(
            f"MARGINLAB_PROFILE={name!r} is not a profile; choose one of {PROFILES}."
        )
    return name


def smoke() -> bool:
    """Whether ``$MARGINLAB_SMOKE`` asks for the full profile's code paths at toy sizes."""
    raw = os.environ.get("MARGINLAB_SMOKE", "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw not in ("1", "true", "yes"):
        raise ValueError(f"MARGINLAB_SMOKE={raw!r}: use 1 (on) or 0 (off).")
    if profile() != "full":
        raise ValueError(
            "MARGINLAB_SMOKE=1 shrinks the full profile; set MARGINLAB_PROFILE=full with it "
            f"(it is {profile()!r})."
        )
    return True


def run_name() -> str:
    """Where this run's results go under ``results/``: the profile, or ``smoke``."""
    return "smoke" if smoke() else profile()


def pick(quick: T, full: T, *, standard: T = AS_FULL, smoke: T = AS_FULL) -> T:
    """The value for the active run.

    ``standard`` and ``smoke`` default to ``full``: the standard profile keeps the papers'
    optimisers and attack budgets, and the smoke run executes the full profile's code paths;
    give them explicitly for sizes (epochs, images, steps) that must shrink.
    """
    name = run_name()
    if name == "quick":
        return quick
    if name == "standard":
        return full if standard is AS_FULL else standard
    if name == "smoke":
        return full if smoke is AS_FULL else smoke
    return full


def device(name: str | torch.device | None = None) -> torch.device:
    """The compute device: ``name`` if given, else ``$MARGINLAB_DEVICE``, else CUDA if present, else CPU."""
    if name is not None:
        return torch.device(name)
    env = os.environ.get("MARGINLAB_DEVICE")
    if env:
        return torch.device(env)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (CPU and CUDA); return a CPU generator seeded the same way."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


@contextmanager
def environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, remove) environment variables for the block, then restore them.

    Child processes started in the block (a chapter's Jupyter kernel, Ray workers) inherit them."""
    before = {k: os.environ.get(k) for k in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(before)


def _set_environ(values: Mapping[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextmanager
def cpu_threads(n: int = 1, device: str | torch.device | None = None) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads, then restore the caller's count.

    For the book's small models a second thread mostly adds synchronisation, which costs
    many times the work on a shared CPU; results agree up to float summation order. On a
    CUDA ``device`` this does nothing.
    """
    if device is not None and torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- CPU threads


@dataclass(frozen=True)
class CpuBudget:
    """What this process may use: CPUs in its affinity mask, the cgroup's CPU quota (in CPUs; None when
    unlimited) and the 1-minute load average of the machine."""

    affinity: int
    quota: float | None
    load: float


def cgroup_cpu_quota(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (cgroup v2 ``cpu.max``, else v1
    ``cpu.cfs_quota_us / cpu.cfs_period_us``), or None when unlimited or unreadable. A container
    limited to 2 CPUs on a 64-core host sees 64 CPUs everywhere else."""
    base = Path(root)
    try:
        quota, period = (base / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for sub in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        try:
            quota_us = int((base / sub / "cpu.cfs_quota_us").read_text())
            period_us = int((base / sub / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def cpu_budget() -> CpuBudget:
    """The :class:`CpuBudget` of this process now."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    return CpuBudget(affinity, cgroup_cpu_quota(), load)


def choose_threads(cpus: int, quota: float | None = None, load: float = 0.0, *, passive: bool = True) -> int:
    """Intra-op threads for the book's models on a CPU: the CPUs this process may use,
    ``min(cpus, floor(quota))``, at least 1.

    With passive OpenMP waiting (``passive``, what ``import marginlab`` arranges when it comes before
    torch) that is all at import: a worker whose partner is descheduled sleeps instead of burning its
    time slice, and a neighbour that turns up later is handled at run time by the
    :class:`~marginlab.threads.ThreadBalancer`. With spinning workers (torch imported first: too late to change how
    OpenMP waits), every CPU another process keeps busy — the 1-minute ``load``, rounded — is taken
    off, because a spinning worker whose partner is descheduled burns the time slice the partner needs.
    A pure function of its inputs (see ``benchmarks/bench_threads.py`` for the measurements behind it).
    """
    if not isinstance(cpus, int) or cpus < 1:
        raise ValueError(f"cpus must be a positive int, got {cpus!r}")
    if quota is not None and not quota > 0:
        raise ValueError(f"quota must be > 0 CPUs or None (unlimited), got {quota!r}")
    if not load >= 0:
        raise ValueError(f"load must be >= 0, got {load!r}")
    usable = cpus if quota is None else max(1, min(cpus, math.floor(quota)))
    if passive:
        return usable
    return threads.threads_beside(load, usable, usable)  # the busy CPUs off, at least one


@dataclass(frozen=True)
class ThreadPolicy:
    """What :func:`apply_thread_policy` decided and why (``describe()`` records it with results)."""

    threads: int | None  # intra-op threads set, None when torch's were left alone
    passive: bool  # whether OpenMP waits passively (set by us or by the user)
    openmp_set: dict[str, str]  # the variables we set before torch loaded
    budget: CpuBudget | None
    reason: str
    balanced: bool = False  # whether threads.balance() follows other processes' use of the CPUs


_POLICY: ThreadPolicy | None = None


def _is_passive(environ: Mapping[str, str]) -> bool:
    if environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        return True
    spin = environ.get("GOMP_SPINCOUNT", "").strip()
    return spin.isdigit() and int(spin) <= 10_000


def apply_thread_policy(environ: Mapping[str, str] | None = None, budget: CpuBudget | None = None) -> ThreadPolicy:
    """Size torch's intra-op thread pool by :func:`choose_threads` for this process (run by
    ``import marginlab``, so a reader's notebook gets it too). Leaves torch alone with
    ``MARGINLAB_THREADS=off`` or when ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` is set; never raises
    the count above what torch has now (its default is the physical cores, or the caller's choice);
    ``MARGINLAB_THREADS=N`` sets ``N``. By default (``auto``) the count then follows the machine: a
    :class:`~marginlab.threads.ThreadBalancer` takes a thread off for every CPU another process keeps
    busy, as long as it does; ``MARGINLAB_THREADS=fixed`` keeps the count chosen here.
    Returns the decision (also kept for :func:`thread_policy`)."""
    global _POLICY
    env = os.environ if environ is None else environ
    setting = _threads_setting(env)
    threads.install(None)
    passive = bool(_OPENMP_SET) or _is_passive(env)  # we set it, or the user did (read by OpenMP at torch's load)
    if setting == "off":
        _POLICY = ThreadPolicy(None, passive, dict(_OPENMP_SET), None, f"{THREADS_ENV}=off")
    elif isinstance(setting, int):
        torch.set_num_threads(setting)
        _POLICY = ThreadPolicy(setting, passive, dict(_OPENMP_SET), None, f"{THREADS_ENV}={setting}")
    elif any(env.get(k) for k in _COUNT_CHOICES):
        _POLICY = ThreadPolicy(None, passive, dict(_OPENMP_SET), None, "OMP_NUM_THREADS/MKL_NUM_THREADS set")
    else:
        budget = cpu_budget() if budget is None else budget
        n = min(torch.get_num_threads(), choose_threads(budget.affinity, budget.quota, budget.load, passive=passive))
        torch.set_num_threads(n)
        why = "passive OpenMP waits" if passive else "spinning OpenMP waits (torch was imported first)"
        # Under a CPU quota the CPUs in the mask are shared with the whole host: their use by others says
        # nothing about this process's share, so the count stays fixed there.
        if setting == "auto" and hasattr(os, "sched_getaffinity") and (
                budget.quota is None or budget.quota >= budget.affinity):
            threads.install(threads.ThreadBalancer(n, os.sched_getaffinity(0)))
        balanced = threads.balancer() is not None
        _POLICY = ThreadPolicy(n, passive, dict(_OPENMP_SET), budget, why + (", balanced" if balanced else ""),
                               balanced)
    return _POLICY


def thread_policy() -> ThreadPolicy | None:
    """The decision of the last :func:`apply_thread_policy` (None before it ran)."""
    return _POLICY


def _user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "marginlab"


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """Where datasets live: ``root``, else ``$MARGINLAB_DATA``, else ``~/.cache/marginlab/data``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("MARGINLAB_DATA")
    return Path(env) if env else _user_cache_root() / "data"


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """Where trained models are cached: ``root``, else ``$MARGINLAB_CACHE``, else ``~/.cache/marginlab/models``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("MARGINLAB_CACHE")
    return Path(env) if env else _user_cache_root() / "models"


def results_dir(root: str | os.PathLike | None = None) -> Path:
    """Where chapter results are written: ``root``, else ``$MARGINLAB_RESULTS``, else ``<repo>/results``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("MARGINLAB_RESULTS")
    if env:
        return Path(env)
    return project_root() / "results"


def project_root() -> Path:
    """The book's root: the nearest parent of the working directory holding ``_toc.yml``, else the CWD."""
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "_toc.yml").is_file():
            return candidate
    return here


def describe() -> dict[str, Any]:
    """A short provenance record of the runtime (for results files)."""
    dev = device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {
        "profile": profile(),
        "smoke": smoke(),
        "device": str(dev),
        "device_name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "thread_policy": None if _POLICY is None else {k: v for k, v in asdict(_POLICY).items() if k != "budget"},
        # how often the balancer changed the count during the run (float sums depend on it in the last bits)
        "thread_changes": None if threads.balancer() is None else threads.balancer().changes,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"
