"""Profiles, devices, seeds and cache locations.

The profile decides how much work a chapter does:

* ``quick`` (CPU, minutes, small subsets) — a pipeline check, the default on any hardware,
  so that tests and book builds never start hours of training by surprise;
* ``standard`` (CPU, under 45 minutes a chapter) — the papers' optimisers, architectures and
  attack budgets on all locally available data, epochs cut where they do not fit;
* ``full`` (GPU) — the papers' settings.

It is read from ``MARGINLAB_PROFILE``. ``MARGINLAB_SMOKE=1`` (with ``full``) runs the full
profile's code paths at toy sizes and writes ``results/smoke/`` instead of ``results/full/``.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

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
