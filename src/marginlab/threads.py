"""Intra-op threads that follow the machine: one fewer for every CPU another process keeps busy.

Two threads that share the work of every operator run at the pace of the slower one. When another
process takes one of two cores, one of our threads gets half a core and the other waits for it:
chapter 5's quick profile took 2.3x its idle time beside one busy process with two (passively
waiting) threads, while chapter 6, which runs on one thread, took 1.05x (``benchmarks/bench_threads.py``).
:class:`ThreadBalancer` measures, at most once per ``interval``, how many of this process's CPUs
other processes used since the last look — the machine's non-idle time on those CPUs
(``/proc/stat``) minus this process's own CPU time — and sets torch's intra-op threads to the CPUs
left, at least one, never above the count chosen at import. The loops of the trainer and the
attacks call :func:`balance` once per step; between samples that costs one clock read.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class CpuSample:
    """One look at the CPUs: wall clock, their non-idle CPU-seconds since boot, this process's CPU-seconds."""

    wall: float
    busy: float
    own: float


def read_busy_seconds(cpus: Iterable[int], stat: Path = PROC_STAT) -> float | None:
    """Non-idle CPU-seconds since boot of the CPUs ``cpus`` (``cpuN`` lines of ``/proc/stat``: every field
    but idle and iowait; guest time is already inside user time), or None when ``stat`` is unreadable
    or lists none of them (not Linux)."""
    wanted = {f"cpu{c}" for c in cpus}
    ticks = 0
    found = False
    try:
        with open(stat) as f:
            for line in f:
                name, *fields = line.split()
                if name not in wanted:
                    continue
                values = [int(v) for v in fields[:8]]
                user, nice, system, _idle, _iowait, irq, softirq, steal = values + [0] * (8 - len(values))
                ticks += user + nice + system + irq + softirq + steal  # steal: taken by the hypervisor
                found = True
    except (OSError, ValueError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK") if found else None


def others_busy(before: CpuSample, after: CpuSample) -> float:
    """CPUs other processes kept busy between two samples: (Δ non-idle − Δ own) / Δ wall, at least 0."""
    wall = after.wall - before.wall
    if not wall > 0:
        raise ValueError(f"samples must be taken in order, got Δwall={wall}")
    return max(0.0, ((after.busy - before.busy) - (after.own - before.own)) / wall)


def threads_beside(others: float, cpus: int, ceiling: int) -> int:
    """Threads for ``cpus`` CPUs of which other processes keep ``others`` busy (rounded half up): the CPUs
    left, at least 1 and at most ``ceiling``. A pure function of its inputs."""
    if not others >= 0:
        raise ValueError(f"others must be >= 0 CPUs, got {others!r}")
    if cpus < 1 or ceiling < 1:
        raise ValueError(f"cpus and ceiling must be >= 1, got {cpus} and {ceiling}")
    return max(1, min(ceiling, cpus - math.floor(others + 0.5)))


class ThreadBalancer:
    """Keeps torch's intra-op threads at :func:`threads_beside` of what other processes use of ``cpus``.

    It stands aside while the thread count is not the one it set last — a ``config.cpu_threads`` block,
    or a caller's own ``torch.set_num_threads`` — and resumes when the count is back.
    """

    def __init__(self, ceiling: int, cpus: Iterable[int], interval: float = 1.0, stat: Path = PROC_STAT):
        if ceiling < 1:
            raise ValueError(f"ceiling must be >= 1, got {ceiling}")
        if not interval > 0:
            raise ValueError(f"interval must be > 0 s, got {interval}")
        self.ceiling, self.cpus, self.interval, self.stat = ceiling, sorted(cpus), interval, stat
        self.threads = ceiling
        self.changes = 0
        self._last = self._sample()

    def _sample(self) -> CpuSample | None:
        busy = read_busy_seconds(self.cpus, self.stat)
        return None if busy is None else CpuSample(time.monotonic(), busy, time.process_time())

    @property
    def active(self) -> bool:
        """Whether the CPUs can be read at all (Linux)."""
        return self._last is not None

    def poll(self) -> int:
        """Look again if ``interval`` has passed; returns the thread count in force."""
        if self._last is None or time.monotonic() - self._last.wall < self.interval:
            return self.threads
        now = self._sample()
        if now is None:
            return self.threads
        others = others_busy(self._last, now)
        self._last = now
        if torch.get_num_threads() != self.threads:
            return self.threads  # someone else set the count: stand aside
        target = threads_beside(others, len(self.cpus), self.ceiling)
        if target != self.threads:
            torch.set_num_threads(target)
            self.threads = target
            self.changes += 1
        return self.threads


_BALANCER: ThreadBalancer | None = None


def install(balancer: ThreadBalancer | None) -> None:
    """Make ``balancer`` the one :func:`balance` drives (None: none)."""
    global _BALANCER
    _BALANCER = balancer if balancer is None or balancer.active else None


def balancer() -> ThreadBalancer | None:
    """The balancer :func:`balance` drives, if any."""
    return _BALANCER


def balance() -> None:
    """Called once per step by the package's loops: adjust the threads if the look is due (cheap otherwise)."""
    if _BALANCER is not None:
        _BALANCER.poll()
