"""Chapter trainings as jobs: plan them, estimate their cost, run them locally or on a Ray cluster.

Every model a chapter trains goes through :func:`marginlab.train.fit` with ``cache=...``, i.e. it is a cached
unit keyed by the hash of its configuration (:func:`marginlab.train.cache_key`). A :class:`Job` describes one
such training without holding tensors or modules: *specs* (:class:`Spec`, "call ``module:function`` with these
keyword arguments") for the model, the training data and any non-literal ``fit`` argument (loss, callbacks), plus
the literal ``fit`` keyword arguments. A job therefore pickles small, ships to a worker, and is rebuilt there from
``$MARGINLAB_DATA``; the worker trains it into the shared cache ``$MARGINLAB_CACHE``, and the chapter's notebook
later finds every model there (a cache hit).

* :func:`plan` fills in each job's cache key (computed by ``train.cache_key`` on the rebuilt arguments, so it is the
  key the chapter's own ``fit`` call computes) and its :class:`Cost` estimate.
* :func:`run_jobs` runs a plan with ``executor="local"`` (this process, one job after another) or ``"ray"`` (one Ray
  task per job, ``num_gpus`` per task on a GPU cluster): jobs already in the cache are skipped, a failing job is
  reported with its configuration while the others go on, and what a dead worker left half-written is removed.
* :func:`main` is ``python -m marginlab jobs CHAPTER [--profile P] [--run] [--executor local|ray]``.

A chapter module publishes its plan as ``training_jobs() -> list[Job]`` for the active profile
(:data:`CHAPTER_MODULES` says which module serves which chapter).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import glob
import heapq
import importlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from . import config

__all__ = [
    "ASSUMED_GPU", "CHAPTER_MODULES", "STATUSES", "WORKER_ENV", "Built", "Cost", "Job", "JobReport", "Spec", "build",
    "cached_history", "call", "chapter_jobs", "dataset", "estimate", "execute", "format_plan", "job_key",
    "keep_cache_name", "main", "makespan", "model", "plan", "resolve_chapter", "run_jobs",
]

#: The chapter modules that publish ``training_jobs()`` (chapters 1 and 2 train no network).
CHAPTER_MODULES = {
    "03": "marginlab.lowrank",
    "04": "marginlab.differential",
    "05": "marginlab.angular",
    "06": "marginlab.avgmargin",
}
#: Environment handed to every worker: where data and cache live, and which profile is active.
WORKER_ENV = ("MARGINLAB_DATA", "MARGINLAB_CACHE", "MARGINLAB_PROFILE", "MARGINLAB_SMOKE", "MARGINLAB_DEVICE")
STATUSES = ("trained", "cached", "failed", "duplicate")
#: Rounds of ``jobs --run``: jobs planned from the outcome of earlier rounds' trainings run in a later round.
MAX_ROUNDS = 4

#: Assumptions behind the GPU-time estimate (an estimate, not a measurement): an H100 SXM's FP32 peak of
#: 67 TFLOP/s (non-tensor-core; our models train in float32), of which 30 % is sustained by these small nets, and an
#: eager-mode floor of 10 µs per dispatched ATen operator (kernel launch + Python/dispatcher overhead) that bounds
#: a step from below when the model is too small to fill the GPU.
ASSUMED_GPU = {"name": "H100-class (assumed)", "peak_flops": 67e12, "utilization": 0.30, "seconds_per_op": 10e-6}

_FIT_ONLY_AT_RUN_TIME = ("device", "progress")


# ---------------------------------------------------------------------------------------------- specs


def _target_name(target: str | Callable[..., Any]) -> str:
    if isinstance(target, str):
        module, sep, qualname = target.partition(":")
        if not sep or not module or not qualname:
            raise ValueError(f"target must read 'package.module:function', got {target!r}")
        return target
    if not callable(target):
        raise TypeError(f"target must be a 'module:function' string or a module-level callable, got {target!r}")
    qualname = getattr(target, "__qualname__", "")
    module = getattr(target, "__module__", None)
    if not module or not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(f"target {target!r} is not a module-level function; a worker could not import it")
    return f"{module}:{qualname}"


def _import_target(name: str) -> Callable[..., Any]:
    module, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{name} is not callable")
    return obj


@dataclass(frozen=True)
class Spec:
    """A call to make where the job runs: ``target(*args, **kwargs)`` with any :class:`Spec` among the arguments
    (nested, in lists, tuples and dicts) resolved first. ``target`` is ``"package.module:function"`` (also
    ``"module:Class.method"``), so a spec pickles as a few strings and numbers and rebuilds on any machine that has
    the package installed."""

    target: str
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "target", _target_name(self.target))
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    def resolve(self) -> Any:
        """Import the target and call it with the resolved arguments."""
        fn = _import_target(self.target)
        return fn(*_resolve(self.args), **_resolve(self.kwargs))

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description (for plans and failure reports)."""
        out: dict[str, Any] = {"call": self.target}
        if self.args:
            out["args"] = _describe(self.args)
        if self.kwargs:
            out["kwargs"] = _describe(self.kwargs)
        return out


def call(target: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Spec:
    """``Spec(target, args, kwargs)``; ``target`` may be given as the module-level function itself."""
    return Spec(_target_name(target), args, kwargs)


def _resolve(value: Any) -> Any:
    if isinstance(value, Spec):
        return value.resolve()
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    return value


def _describe(value: Any) -> Any:
    if isinstance(value, Spec):
        return value.describe()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if _is_named_function(value):
        return {"function": _target_name(value)}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    return repr(value)


def _short(value: Any) -> str:
    if isinstance(value, Spec):
        name = value.target.rsplit(":", 1)[1]
        inner = [_short(a) for a in value.args] + [f"{k}={_short(v)}" for k, v in value.kwargs.items()]
        return f"{name}({', '.join(inner)})"
    if isinstance(value, (list, tuple)):
        body = ", ".join(_short(v) for v in value)
        return f"[{body}]" if isinstance(value, list) else f"({body}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}"
    if _is_named_function(value):
        return value.__qualname__
    return repr(value)


def _is_named_function(value: Any) -> bool:
    """A module-level function (pickled by reference, shown by name)."""
    qualname = getattr(value, "__qualname__", "")
    return (callable(value) and not isinstance(value, type) and bool(getattr(value, "__module__", None))
            and bool(qualname) and "<locals>" not in qualname and "<lambda>" not in qualname
            and hasattr(value, "__code__"))


def _contains(value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, kinds):
        return True
    if isinstance(value, Spec):
        return _contains(value.args, kinds) or _contains(value.kwargs, kinds)
    if isinstance(value, (list, tuple)):
        return any(_contains(v, kinds) for v in value)
    if isinstance(value, dict):
        return any(_contains(v, kinds) for v in value.values())
    return False


# ---------------------------------------------------------------------------------------------- generic factories


def model(cls: str, seed: int, **kwargs: Any) -> nn.Module:
    """``torch.manual_seed(seed)`` then ``cls(**kwargs)`` (``cls`` as ``"package.module:Class"``): a model factory
    for a :class:`Job` whose model is one constructor call."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    factory = _import_target(_target_name(cls))
    torch.manual_seed(seed)
    return factory(**kwargs)


def dataset(name: str, split: str = "train", *, n: int | None = None, start: int = 0,
            positive: int | str | None = None, negative: int | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A data factory for a :class:`Job`: ``data.load(name, split)`` (from ``$MARGINLAB_DATA``), optionally the
    binary subset ``positive`` (+1) vs ``negative`` (-1), then rows ``start : start + n`` (``n=None``: to the end)."""
    from . import data

    if (positive is None) != (negative is None):
        raise ValueError("give both positive and negative (a binary subset) or neither")
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be None or a positive int, got {n!r}")
    x, y = data.load(name, split)
    if positive is not None:
        x, y = data.binary_subset(x, y, positive=positive, negative=negative)
        x, y = torch.as_tensor(x), torch.as_tensor(y)
    stop = None if n is None else start + n
    if stop is not None and stop > len(y):
        raise ValueError(f"{name}/{split} has {len(y)} rows (after subsetting); rows {start}:{stop} requested")
    return x[start:stop], y[start:stop]


# ---------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Cost:
    """Estimated cost of one training (an estimate, see :data:`ASSUMED_GPU`).

    ``steps``: optimiser steps (an upper bound when the job stops at zero training error); ``flops_per_step``:
    forward + backward FLOPs of one batch by the formulas of ``torch.utils.flop_counter`` (matrix products and
    convolutions; element-wise work and callbacks are not counted); ``eval_flops``: the per-epoch training-set
    evaluations of ``until_zero_error``; ``ops_per_step``: ATen operators dispatched by one step (with the optimiser);
    ``gpu_seconds``: ``steps × max(flops_per_step / sustained FLOP/s, ops_per_step × seconds_per_op)`` + evaluations;
    ``cpu_seconds``: ``steps ×`` the measured time of one step on this machine's CPU (one thread; None when not
    measured). Memory (bytes, float32 as trained): ``state_bytes`` = parameters + gradients + optimiser state;
    ``activation_bytes_per_example``: tensors autograd saves for the backward pass of one example (measured with
    ``saved_tensors_hooks`` on the probe rows, parameters excluded); ``data_bytes``: the training set, resident on
    the device; ``peak_bytes`` = state + data + activations of one full batch — a lower bound on a GPU's peak
    (the allocator's fragmentation and cuDNN workspaces come on top)."""

    steps: int
    flops_per_step: float
    eval_flops: float
    ops_per_step: int
    gpu_seconds: float
    cpu_seconds: float | None
    state_bytes: int = 0
    activation_bytes_per_example: int = 0
    data_bytes: int = 0
    batch_size: int = 0

    @property
    def peak_bytes(self) -> int:
        return self.state_bytes + self.data_bytes + self.activation_bytes_per_example * self.batch_size

    def attack_bytes(self, batch_size: int) -> int:
        """Estimated memory of attacking ``batch_size`` examples at once (activations saved for the input
        gradient, plus the weights)."""
        return self.activation_bytes_per_example * batch_size + self.state_bytes // 4

    @property
    def flops(self) -> float:
        return self.steps * self.flops_per_step + self.eval_flops


@dataclass(frozen=True)
class Job:
    """One training of a chapter: ``train.fit(model, x, y, **fit)`` with

    * ``model``: a :class:`Spec` returning the initialised ``nn.Module`` (the factory seeds its own initialisation,
      e.g. :func:`model`), resolved last, right before training;
    * ``data``: a :class:`Spec` returning ``(x, y)``, loaded where the job runs (e.g. :func:`dataset`);
    * ``fit``: ``train.fit``'s keyword arguments, including the ``cache`` tag; values that are not literals
      (``loss_fn``, ``callbacks``, ``lr_schedule``) are :class:`Spec` s. ``device`` and ``progress`` are chosen
      by the worker and must not be given.

    ``key`` and ``cost`` are filled in by :func:`plan`.
    """

    chapter: str
    name: str
    model: Spec
    data: Spec
    fit: Mapping[str, Any] = field(default_factory=dict)
    key: str | None = None
    cost: Cost | None = None

    def __post_init__(self):
        if not isinstance(self.chapter, str) or not self.chapter or not isinstance(self.name, str) or not self.name:
            raise ValueError(f"chapter and name must be non-empty strings, got {self.chapter!r}, {self.name!r}")
        if not isinstance(self.model, Spec) or not isinstance(self.data, Spec):
            raise TypeError("model and data must be Spec objects (see marginlab.jobs.call)")
        fit = dict(self.fit)
        if not isinstance(fit.get("cache"), str) or not fit["cache"]:
            raise ValueError(f"job {self.name!r}: fit must carry a non-empty cache tag (fit={{'cache': ...}})")
        for k in _FIT_ONLY_AT_RUN_TIME:
            if k in fit:
                raise ValueError(f"job {self.name!r}: fit[{k!r}] is chosen where the job runs; leave it out")
        if _contains(fit, (torch.Tensor, nn.Module)):
            raise ValueError(f"job {self.name!r}: fit holds a tensor or module; describe it with a Spec instead")
        object.__setattr__(self, "fit", fit)

    @property
    def label(self) -> str:
        return f"{self.chapter}/{self.name}"

    def summary(self) -> str:
        """The configuration on one line: model, data, fit arguments."""
        fit = ", ".join(f"{k}={_short(v)}" for k, v in self.fit.items())
        return f"{_short(self.model)} on {_short(self.data)}; {fit}"

    def describe(self) -> dict[str, Any]:
        """The job's configuration as JSON-friendly data (what a plan lists and a failure report carries)."""
        out = {"chapter": self.chapter, "name": self.name, "key": self.key, "model": self.model.describe(),
               "data": self.data.describe(), "fit": _describe(self.fit)}
        if self.cost is not None:
            out["cost"] = dataclasses.asdict(self.cost)
        return out


@dataclass
class Built:
    """A job's arguments rebuilt: ``train.fit(model, x, y, **fit)``."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    fit: dict[str, Any]


def build(job: Job) -> Built:
    """Resolve the job's specs: data first, then the fit arguments, the model last (its factory seeds it)."""
    xy = job.data.resolve()
    if not (isinstance(xy, (tuple, list)) and len(xy) == 2):
        raise TypeError(f"job {job.label}: the data spec must return (x, y), got {type(xy).__name__}")
    x, y = xy
    fit = _resolve(job.fit)
    m = job.model.resolve()
    if not isinstance(m, nn.Module):
        raise TypeError(f"job {job.label}: the model spec must return an nn.Module, got {type(m).__name__}")
    return Built(m, x, y, fit)


def cached_history(job: Job, cache_dir: str | os.PathLike | None = None) -> Any | None:
    """The :class:`~marginlab.train.History` of ``job`` if its model is in the cache, else None; nothing is trained.
    For plans whose later jobs depend on an earlier training's outcome (chapter 4 re-runs eq. 7 up to the epoch at
    which it first reached zero training error)."""
    from . import train

    key = job.key or job_key(job)
    path = config.cache_dir(cache_dir) / f"{key}.pt"
    if not _cached_ok(path, key):
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return train.History(rows=train._from_storable(blob["rows"]), meta=train._from_storable(blob["meta"]))


def keep_cache_name(fn: Callable[..., Any], qualname: str) -> Callable[..., Any]:
    """``fn`` (a function just defined by a factory) renamed to ``qualname``: its ``__qualname__`` and its code's
    ``co_qualname``, nested code objects included. Returns ``fn``.

    A cache key hashes a loss's or callback's qualified name with its bytecode (``train._fingerprint``). A callback
    first written inside a chapter's training function and later moved into a module-level factory (so that a
    :class:`Spec` can name it) keeps, under its old name, the keys of every model already trained with it."""
    old = fn.__qualname__

    def rename(code: Any) -> Any:
        consts = tuple(rename(c) if isinstance(c, type(code)) else c for c in code.co_consts)
        changes: dict[str, Any] = {"co_consts": consts}
        inner = getattr(code, "co_qualname", None)  # Python >= 3.11
        if inner is not None and inner.startswith(old):
            changes["co_qualname"] = qualname + inner[len(old):]
        return code.replace(**changes)

    fn.__code__ = rename(fn.__code__)
    fn.__qualname__ = qualname
    return fn


def _key_of(b: Built) -> str:
    from . import train

    return train.cache_key(b.model, b.x, b.y, **b.fit)


def job_key(job: Job) -> str:
    """The cache key ``train.fit`` computes for this job (the job is rebuilt to compute it)."""
    return _key_of(build(job))


# ---------------------------------------------------------------------------------------------- cost


class _SavedBytes:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""

    def __init__(self, params: Iterable[torch.Tensor]):
        self._skip = {p.untyped_storage().data_ptr() for p in params}
        self._seen: set[int] = set()
        self.bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._skip and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


class _StepCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched (≈ kernel launches on a GPU) and their FLOPs, with the FLOP formulas of
    ``torch.utils.flop_counter`` (the table ``FlopCounterMode`` uses: matrix products, convolutions, attention).
    ``FlopCounterMode`` itself cannot be used: its module tracker fails on losses that call ``torch.autograd.grad``
    (the PGD inside adversarial training)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        return out


def _n_steps(n: int, y: torch.Tensor, fit: Mapping[str, Any]) -> int:
    batch_size = int(fit.get("batch_size", 128))
    epochs = int(fit.get("epochs", 10))
    if fit.get("sampler", "shuffle") == "balanced":
        counts = torch.unique(torch.as_tensor(y), return_counts=True)[1]
        per_epoch = math.ceil(int(counts.max()) / max(batch_size // 2, 1))
    else:
        per_epoch = math.ceil(n / batch_size)
        if per_epoch > 1 and n % batch_size == 1:  # fit drops a trailing batch of one example
            per_epoch -= 1
    steps = epochs * per_epoch
    if fit.get("max_steps") is not None:
        steps = min(steps, int(fit["max_steps"]))
    return steps


def _probe_indices(y: torch.Tensor, size: int, balanced: bool) -> torch.Tensor:
    y = torch.as_tensor(y)
    if not balanced:
        return torch.arange(min(size, len(y)))
    values = torch.unique(y)
    half = max(size // 2, 1)
    return torch.cat([torch.nonzero(y == v).view(-1)[:half] for v in values])


def _one_step(b: Built, idx: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    from . import train

    xb = torch.as_tensor(b.x)[idx].to(dtype=train._model_dtype(b.model))
    yb = torch.as_tensor(b.y)[idx].long()
    loss_fn = b.fit.get("loss_fn")
    if train._is_default_ce(loss_fn):
        loss = torch.nn.functional.cross_entropy(b.model(xb), train.class_indices(yb))
    else:
        out = loss_fn(b.model, xb, yb)
        loss = out[0] if isinstance(out, (tuple, list)) else out
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _estimate_built(b: Built, *, probe: int = 2, measure_cpu: bool | None = None,
                    gpu: Mapping[str, float] | None = None) -> Cost:
    from . import train

    gpu = {**ASSUMED_GPU, **(gpu or {})}
    fit = b.fit
    n = len(b.y)
    batch_size = int(fit.get("batch_size", 128))
    balanced = fit.get("sampler", "shuffle") == "balanced"
    steps = _n_steps(n, b.y, fit)
    full_batch = min(batch_size, n)
    model_ = copy.deepcopy(b.model).cpu().train()
    b = Built(model_, b.x, b.y, fit)
    opt = train._make_optimizer(fit.get("optimizer", "sgd"), [p for p in model_.parameters() if p.requires_grad],
                                float(fit.get("lr", 0.01)), float(fit.get("momentum", 0.9)),
                                float(fit.get("weight_decay", 0.0)))
    for group in opt.param_groups:  # count the multi-tensor update a GPU runs, not the CPU's per-tensor loop
        if "foreach" in group:
            group["foreach"] = True
    # FLOPs of matrix products and convolutions are linear in the batch: count a few rows and scale
    idx = _probe_indices(b.y, max(probe, 2), balanced)
    seed = int(fit.get("seed", 0))
    with config.cpu_threads(1), torch.random.fork_rng():
        torch.manual_seed(seed)
        step = _StepCounter()
        saved = _SavedBytes(model_.parameters())
        with step, saved.hooks():
            _one_step(b, idx, opt)
        flops_per_step = step.flops * full_batch / len(idx)
        state_bytes = sum(2 * p.numel() * p.element_size() for p in model_.parameters() if p.requires_grad)
        state_bytes += sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                           if isinstance(v, torch.Tensor))
        x_all = torch.as_tensor(b.x)
        data_bytes = x_all.numel() * 4 + len(b.y) * 8
        eval_flops = 0.0
        if fit.get("until_zero_error"):
            fwd = _StepCounter()
            with fwd, torch.no_grad():
                model_.eval()
                model_(torch.as_tensor(b.x)[idx].to(dtype=train._model_dtype(model_)))
                model_.train()
            eval_flops = fwd.flops / len(idx) * n * int(fit.get("epochs", 10))
        cpu_seconds = None
        if measure_cpu is None:
            measure_cpu = flops_per_step < 2e10  # about a second of one CPU core at most
        if measure_cpu:
            full_idx = _probe_indices(b.y, full_batch, balanced)
            _one_step(b, full_idx, opt)  # warm-up
            t0 = time.perf_counter()
            _one_step(b, full_idx, opt)
            cpu_seconds = steps * (time.perf_counter() - t0)
    sustained = gpu["peak_flops"] * gpu["utilization"]
    step_s = max(flops_per_step / sustained, step.ops * gpu["seconds_per_op"])
    gpu_seconds = steps * step_s + eval_flops / sustained
    return Cost(steps=steps, flops_per_step=float(flops_per_step), eval_flops=float(eval_flops),
                ops_per_step=int(step.ops), gpu_seconds=float(gpu_seconds), cpu_seconds=cpu_seconds,
                state_bytes=int(state_bytes), activation_bytes_per_example=int(saved.bytes // len(idx)),
                data_bytes=int(data_bytes), batch_size=int(full_batch))


def estimate(job: Job, **kwargs: Any) -> Cost:
    """The :class:`Cost` of ``job`` (rebuilds it; runs one probe step on the CPU, plus one timed full batch when
    cheap). Keyword arguments: ``probe`` (rows counted), ``measure_cpu``, ``gpu`` (overrides of
    :data:`ASSUMED_GPU`)."""
    return _estimate_built(build(job), **kwargs)


_env = config.environ


def plan(jobs: Iterable[Job], *, cost: bool = True, **estimate_kwargs: Any) -> list[Job]:
    """The jobs with ``key`` (and, with ``cost``, ``cost``) filled in. Nothing is trained.

    Raises ``ValueError`` when two jobs share a name, which would make reports ambiguous."""
    jobs = list(jobs)
    names = collections.Counter(j.label for j in jobs)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise ValueError(f"job names must be unique within a plan; repeated: {dup}")
    out = []
    for j in jobs:
        try:
            b = build(j)
            key = _key_of(b)
        except Exception as err:
            raise type(err)(f"job {j.label} cannot be built ({err}); configuration: {j.summary()}") from err
        out.append(dataclasses.replace(j, key=key, cost=_estimate_built(b, **estimate_kwargs) if cost else j.cost))
    return out


def makespan(seconds: Sequence[float], workers: int) -> float:
    """Wall time of running tasks of the given durations on ``workers`` identical workers, longest first (LPT
    list scheduling, how :func:`run_jobs` orders a Ray submission): within 4/3 of the optimum (Graham 1969)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    loads = [0.0] * workers
    for s in sorted(seconds, reverse=True):
        heapq.heapreplace(loads, loads[0] + s)
    return max(loads)


# ---------------------------------------------------------------------------------------------- running


@dataclass
class JobReport:
    """What happened to one job: ``status`` in :data:`STATUSES` (``duplicate``: same key as ``duplicate_of``, which
    ran instead), wall ``seconds`` where it ran, ``where`` (host and device), and for a failure the ``error``, the
    ``traceback`` and the job's ``config``."""

    job: str
    key: str | None
    status: str
    seconds: float = 0.0
    where: str = ""
    error: str | None = None
    traceback: str | None = None
    config: dict[str, Any] | None = None
    duplicate_of: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _cached_ok(path: Path, key: str) -> bool:
    """Whether ``path`` is a complete cache entry for ``key`` (as ``train.fit`` would accept it)."""
    if not path.is_file():
        return False
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated or foreign: fit will retrain and overwrite it
        return False
    return isinstance(blob, dict) and blob.get("key") == key and "state_dict" in blob


def _where() -> str:
    import socket

    dev = config.device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return f"{socket.gethostname()} {dev} ({name})"


def execute(job: Job, env: Mapping[str, str | None] | None = None, threads: int = 1) -> JobReport:
    """Run one job here: rebuild it, check its key against the planned one, ``train.fit`` it into the cache.

    Exceptions become a ``failed`` report (with the job's configuration and the traceback); ``env`` is set for the
    duration (the worker side of :func:`run_jobs`); ``threads`` intra-op CPU threads when training on the CPU."""
    from . import train

    t0 = time.perf_counter()
    with _env(env or {}):
        try:
            b = build(job)
            key = _key_of(b)
            if job.key is not None and key != job.key:
                raise RuntimeError(
                    f"job {job.label}: the key rebuilt here ({key[:12]}…) differs from the planned key "
                    f"({job.key[:12]}…); the job's specs are not deterministic or depend on the machine "
                    "(a callback capturing the device, data that differ between nodes)")
            with config.cpu_threads(threads, config.device()):
                hist = train.fit(b.model, b.x, b.y, progress=False, **b.fit)
            status = "cached" if hist.meta.get("cached") else "trained"
            meta = {k: hist.meta.get(k) for k in ("steps", "stopped", "seconds", "device", "cache_file")
                    if k in hist.meta}
            return JobReport(job.label, key, status, time.perf_counter() - t0, _where(), meta=meta)
        except Exception as err:
            return JobReport(job.label, job.key, "failed", time.perf_counter() - t0, _where(),
                             error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(),
                             config=job.describe())


def _remove_partial_files(key: str | None, cache_dir: Path) -> list[str]:
    """Temporary files ``train`` left for ``key`` (a worker killed while writing). Only called once the key's
    job has ended, and a plan runs each key once, so no live writer of this run owns them."""
    if not key:
        return []
    removed = []
    for p in glob.glob(str(cache_dir / f".{key}.*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
            removed.append(p)
    return removed


def _worker_env(cache_dir: Path) -> dict[str, str | None]:
    env = {k: os.environ.get(k) for k in WORKER_ENV}
    env["MARGINLAB_CACHE"] = str(cache_dir)
    if env.get("MARGINLAB_DATA"):
        env["MARGINLAB_DATA"] = str(Path(env["MARGINLAB_DATA"]).resolve())
    return env


def run_jobs(jobs: Sequence[Job], executor: str = "local", *, cache_dir: str | os.PathLike | None = None,
             cpus_per_job: int = 1, gpus_per_job: float | None = None, retries: int = 0,
             ray_address: str | None = None, ray_init: Mapping[str, Any] | None = None,
             on_report: Callable[[JobReport], None] | None = None) -> list[JobReport]:
    """Run ``jobs`` (planned or not) and return one :class:`JobReport` per job, in the jobs' order.

    Jobs whose planned key is already a complete cache entry are reported ``cached`` without being dispatched; jobs
    sharing a key run once (the others are ``duplicate``); a failing job does not stop the others.

    Args:
        executor: "local" (this process, one job after another) or "ray" (one Ray task per job, submitted longest
            first). Ray connects to ``ray_address`` / ``$RAY_ADDRESS`` when set, else starts a local instance
            (``ray_init`` extra arguments, e.g. ``num_cpus``); an already initialised Ray is reused.
        cache_dir: the shared cache (default ``config.cache_dir()``); on a cluster, a path every node sees (NFS).
        cpus_per_job: CPU threads per job (and Ray ``num_cpus`` per task).
        gpus_per_job: Ray ``num_gpus`` per task; default 1 when the cluster has GPUs, else 0. A fraction packs
            several small models on one GPU.
        retries: Ray ``max_retries`` for a task whose worker died (a lost node); exceptions are never retried.
        on_report: called with each report as it arrives (progress output).
    """
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    if not isinstance(cpus_per_job, int) or cpus_per_job < 1:
        raise ValueError(f"cpus_per_job must be a positive int, got {cpus_per_job!r}")
    if gpus_per_job is not None and gpus_per_job < 0:
        raise ValueError(f"gpus_per_job must be >= 0, got {gpus_per_job}")
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a non-negative int, got {retries!r}")
    jobs = list(jobs)
    labels = collections.Counter(j.label for j in jobs)
    if any(c > 1 for c in labels.values()):
        raise ValueError(f"job names must be unique; repeated: {[n for n, c in labels.items() if c > 1]}")
    root = Path(config.cache_dir(cache_dir)).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = _worker_env(root)
    notify = on_report or (lambda r: None)
    reports: dict[str, JobReport] = {}
    todo: list[Job] = []
    first_with_key: dict[str, str] = {}
    for j in jobs:
        if j.key is not None and j.key in first_with_key:
            reports[j.label] = JobReport(j.label, j.key, "duplicate", duplicate_of=first_with_key[j.key])
            continue
        if j.key is not None:
            first_with_key[j.key] = j.label
            path = root / f"{j.key}.pt"
            if _cached_ok(path, j.key):
                reports[j.label] = JobReport(j.label, j.key, "cached", meta={"cache_file": str(path)})
                notify(reports[j.label])
                continue
        todo.append(j)
    # longest first: Ray schedules in submission order, so this is LPT list scheduling (see makespan)
    todo.sort(key=lambda j: -(j.cost.gpu_seconds if j.cost is not None else 0.0))
    if executor == "local":
        for j in todo:
            r = execute(j, env, cpus_per_job)
            if r.status == "failed":
                _remove_partial_files(j.key, root)
            reports[j.label] = r
            notify(r)
    else:
        for r in _run_ray(todo, env, root, cpus_per_job, gpus_per_job, retries, ray_address, ray_init, notify):
            reports[r.job] = r
    for j in jobs:  # a duplicate inherits the outcome of the job that ran its key
        r = reports[j.label]
        if r.status == "duplicate":
            r.meta = {"outcome": reports[r.duplicate_of].status}
            notify(r)
    return [reports[j.label] for j in jobs]


def _ray_task(job: Job, env: Mapping[str, str | None], threads: int) -> JobReport:
    return execute(job, env, threads)


def _run_ray(todo, env, root, cpus_per_job, gpus_per_job, retries, address, init_kwargs, notify
             ) -> Iterator[JobReport]:
    try:
        import ray
    except ImportError as err:
        raise ImportError("the Ray executor needs Ray: pip install -e '.[cluster]' (or pip install 'ray>=2.9')"
                          ) from err
    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        kwargs = {"include_dashboard": False, "log_to_driver": True, **(init_kwargs or {})}
        if address:
            kwargs.pop("num_cpus", None)
            kwargs.pop("num_gpus", None)
        ray.init(address=address, **kwargs)
        started = True
    try:
        if not todo:
            return
        if gpus_per_job is None:
            gpus_per_job = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        remote = ray.remote(_ray_task)
        pending = {}
        for j in todo:
            ref = remote.options(num_cpus=cpus_per_job, num_gpus=gpus_per_job, max_retries=retries,
                                 retry_exceptions=False, name=j.label).remote(j, env, cpus_per_job)
            pending[ref] = j
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                j = pending.pop(ref)
                try:
                    r = ray.get(ref)
                except Exception as err:  # the worker died (os._exit, OOM kill, lost node): no report came back
                    r = JobReport(j.label, j.key, "failed", where="ray worker",
                                  error=f"{type(err).__name__}: {_first_line(err)}", config=j.describe())
                if r.status == "failed":
                    removed = _remove_partial_files(j.key, root)
                    if removed:
                        r.meta["removed_partial_files"] = removed
                notify(r)
                yield r
    finally:
        if started:
            ray.shutdown()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


# ---------------------------------------------------------------------------------------------- chapters


def resolve_chapter(chapter: str) -> str:
    """The two-digit chapter number for "5", "05", "ch05", "05_angular_margin_penalty(.md)", "angular", ..."""
    text = Path(str(chapter)).stem.lower()
    text = text.removeprefix("ch")
    head = text.split("_", 1)[0]
    if head.isdigit():
        return f"{int(head):02d}"
    for num, module in CHAPTER_MODULES.items():
        if module.rsplit(".", 1)[1] == text:
            return num
    raise ValueError(f"unknown chapter {chapter!r}; chapters with training jobs: "
                     + ", ".join(f"{k} ({v.rsplit('.', 1)[1]})" for k, v in CHAPTER_MODULES.items()))


def chapter_jobs(chapter: str, profile: str | None = None) -> list[Job]:
    """The unplanned jobs of ``chapter`` under ``profile`` (default: the active one)."""
    num = resolve_chapter(chapter)
    if num not in CHAPTER_MODULES:
        return []  # chapters 1-2 train no network with train.fit
    module = importlib.import_module(CHAPTER_MODULES[num])
    fn = getattr(module, "training_jobs", None)
    if fn is None:
        raise NotImplementedError(f"chapter {num} ({CHAPTER_MODULES[num]}) does not publish training_jobs() yet")
    with _profile(profile):
        return list(fn())


@contextlib.contextmanager
def _profile(profile: str | None) -> Iterator[None]:
    if profile is None:
        yield
        return
    if profile not in config.PROFILES:
        raise ValueError(f"profile must be one of {config.PROFILES}, got {profile!r}")
    with _env({"MARGINLAB_PROFILE": profile}):
        yield


# ---------------------------------------------------------------------------------------------- CLI


def _fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 10:
        return f"{s:.2g} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def format_plan(jobs: Sequence[Job], cache_dir: str | os.PathLike | None = None) -> str:
    """The plan as a text table plus the estimated wall time on 1, 2, 4, 8 GPUs."""
    root = config.cache_dir(cache_dir)
    rows = [("job", "key", "cached", "steps", "GFLOP/step", "est. GPU", "est. CPU (1 thread)", "est. GiB")]
    for j in jobs:
        c = j.cost
        cached = "yes" if j.key and (root / f"{j.key}.pt").is_file() else "no"
        rows.append((j.label, (j.key or "")[:12], cached, str(c.steps) if c else "-",
                     f"{c.flops_per_step / 1e9:.3g}" if c else "-", _fmt_seconds(c.gpu_seconds) if c else "-",
                     _fmt_seconds(c.cpu_seconds) if c else "-", f"{c.peak_bytes / 2**30:.2g}" if c else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines += ["", "configurations:"] + [f"  {j.label}: {j.summary()}" for j in jobs]
    costs = [j.cost.gpu_seconds for j in jobs if j.cost is not None]
    if costs:
        lines.append("")
        lines.append(f"{len(jobs)} jobs, {sum(costs) / 3600:.2f} GPU-hours estimated "
                     f"({ASSUMED_GPU['name']}: {ASSUMED_GPU['utilization']:.0%} of "
                     f"{ASSUMED_GPU['peak_flops'] / 1e12:.0f} TFLOP/s, >= {ASSUMED_GPU['seconds_per_op'] * 1e6:.0f} µs "
                     "per operator; callbacks and evaluation outside training not counted)")
        peak = max(j.cost.peak_bytes for j in jobs if j.cost is not None)
        lines.append(f"largest training's memory: {peak / 2**30:.2g} GiB estimated (weights, gradients, optimiser "
                     "state, training set and one batch's saved activations; allocator overhead not counted)")
        lines.append("estimated wall time: " + ", ".join(
            f"{n} GPU{'s' if n > 1 else ''} {_fmt_seconds(makespan(costs, n))}" for n in (1, 2, 4, 8)))
    return "\n".join(lines)


def _print_report(r: JobReport) -> None:
    extra = f" (duplicate of {r.duplicate_of})" if r.duplicate_of else ""
    print(f"[{r.status:9s}] {r.job}{extra}  {_fmt_seconds(r.seconds) if r.seconds else ''}  {r.where}".rstrip(),
          flush=True)
    if r.status == "failed":
        print(f"    error: {r.error}", flush=True)
        print("    config: " + json.dumps(r.config, default=repr), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m marginlab jobs CHAPTER [--profile P] [--list | --run] [--executor local|ray] ...``"""
    p = argparse.ArgumentParser(prog="python -m marginlab jobs",
                                description="List (default) or run the model trainings of a chapter.")
    p.add_argument("chapter", help="chapter number or name, e.g. 5, 05, 05_angular_margin_penalty, angular")
    p.add_argument("--profile", choices=config.PROFILES, default=None,
                   help="profile to plan (default: $MARGINLAB_PROFILE, else quick)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="list the plan, train nothing (default)")
    mode.add_argument("--run", action="store_true", help="train every job not yet in the cache")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS; none: local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    p.add_argument("--cache-dir", default=None, help="shared model cache (default $MARGINLAB_CACHE)")
    p.add_argument("--cpus-per-job", type=int, default=1)
    p.add_argument("--gpus-per-job", type=float, default=None,
                   help="GPUs per Ray task (default 1 on a GPU cluster; a fraction packs small models)")
    p.add_argument("--retries", type=int, default=0, help="Ray retries of a job whose worker died")
    p.add_argument("--no-cost", action="store_true", help="skip the cost estimate (keys only)")
    p.add_argument("--json", default=None, help="write the plan (and reports) to this JSON file")
    args = p.parse_args(argv)

    if args.cache_dir:
        os.environ["MARGINLAB_CACHE"] = str(Path(args.cache_dir).resolve())
    if args.profile:
        os.environ["MARGINLAB_PROFILE"] = args.profile  # workers inherit it with the rest of WORKER_ENV
    try:
        todo = plan(chapter_jobs(args.chapter), cost=not args.no_cost)
    except (ValueError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"chapter {resolve_chapter(args.chapter)}, profile {config.run_name()}, cache {config.cache_dir()}")
    print(format_plan(todo) if todo else "no training jobs")
    out: dict[str, Any] = {"chapter": resolve_chapter(args.chapter), "profile": config.run_name(),
                           "assumed_gpu": ASSUMED_GPU, "jobs": [j.describe() for j in todo]}
    status = 0
    if args.run and todo:
        print()
        ray_init = {"num_cpus": args.num_cpus} if args.num_cpus else None
        run = functools.partial(run_jobs, executor=args.executor, cpus_per_job=args.cpus_per_job,
                                gpus_per_job=args.gpus_per_job, retries=args.retries, ray_address=args.address,
                                ray_init=ray_init, on_report=_print_report)
        reports = run(todo)
        # a plan may hold jobs that depend on trainings of this run (chapter 4 re-runs eq. 7 up to the epoch of its
        # first zero training error): plan again until no new job appears
        seen = {j.key for j in todo}
        for _ in range(MAX_ROUNDS - 1):
            if any(r.status == "failed" for r in reports):
                break
            more = [j for j in plan(chapter_jobs(args.chapter), cost=not args.no_cost) if j.key not in seen]
            if not more:
                break
            print("\nfollow-up jobs (they depend on the trainings above):\n" + format_plan(more) + "\n")
            out["jobs"] += [j.describe() for j in more]
            seen |= {j.key for j in more}
            reports += run(more)
        counts = collections.Counter(r.status for r in reports)
        print("\n" + ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]))
        out["reports"] = [r.as_dict() for r in reports]
        status = 1 if counts["failed"] else 0
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=repr))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
