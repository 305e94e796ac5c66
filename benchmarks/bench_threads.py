"""CPU thread policies, idle vs beside one busy process (issue 15).

On a 2-core machine, one other CPU-bound process (a browser tab, a second CI job) made chapter 4's
quick profile 14x slower with torch's default threads: the OpenMP workers of every parallel region
spin-wait for a partner the scheduler has handed to the other process. This benchmark measures,
for each thread policy, representative workloads of the book alone ("idle") and beside one
``python -c "while True: pass"`` child ("busy"), interleaved, and prints per workload

    busy / idle      how much the policy collapses when the machine is shared (goal: <= 2)
    idle / default   what the policy costs when the machine is free (goal: <= 1.1)

Each measurement runs in a fresh interpreter (OpenMP reads its environment once, when torch is
first imported) and records the 1-minute load average when it starts: on a shared machine "idle"
is only as idle as the other users leave it, so repeat, read the medians, and quote the loads.

    python benchmarks/bench_threads.py                        # workloads, every policy, 3 rounds
    python benchmarks/bench_threads.py --rounds 5 --policies torch marginlab
    python benchmarks/bench_threads.py --chapters 04 05       # chapters' quick profiles via nbval
    python benchmarks/bench_threads.py --chapters all --policies marginlab

Workloads: ``lenet`` (two epochs of the LeNet on the CIFAR-10 airplane/horse subset through
``marginlab.train.fit``, chapters 3-4), ``pgd`` (PGD-Linf, 10 steps, on 128 MNIST images and a
Carlini-Wagner CNN, chapters 4-6), ``mlp`` (chapter 6's one-hidden-layer MLP of 1024 units, an
epoch of SGD on 3,678 MNIST images, batch 64). Chapters: ``python -m pytest --nbval-lax`` on the
chapter, with a fresh model cache each time so that training is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each policy is the environment its interpreter starts with, and whether torch is imported before
# marginlab (a reader's notebook that did ``import torch`` first).
POLICIES: dict[str, dict] = {
    "torch": dict(env={"MARGINLAB_THREADS": "off"}, note="torch's defaults, untouched"),
    "passive": dict(env={"MARGINLAB_THREADS": "off", "OMP_WAIT_POLICY": "PASSIVE"},
                    note="OMP_WAIT_POLICY=PASSIVE, torch's thread count"),
    "spin10k": dict(env={"MARGINLAB_THREADS": "off", "GOMP_SPINCOUNT": "10000"},
                    note="GOMP_SPINCOUNT=10000 (libgomp's default is 300,000), torch's thread count"),
    "spin1k": dict(env={"MARGINLAB_THREADS": "off", "GOMP_SPINCOUNT": "1000"},
                   note="GOMP_SPINCOUNT=1000, torch's thread count"),
    "spin100": dict(env={"MARGINLAB_THREADS": "off", "GOMP_SPINCOUNT": "100"},
                    note="GOMP_SPINCOUNT=100, torch's thread count"),
    "passive-spin1k": dict(env={"MARGINLAB_THREADS": "off", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"},
                           note="OMP_WAIT_POLICY=PASSIVE with GOMP_SPINCOUNT=1000, torch's thread count"),
    "one": dict(env={"MARGINLAB_THREADS": "1"}, note="one intra-op thread"),
    "marginlab": dict(env={}, note="the package's policy (import marginlab first)"),
    "marginlab-fixed": dict(env={"MARGINLAB_THREADS": "fixed"},
                            note="the package's policy without the balancer (threads fixed at import)"),
    "marginlab-late": dict(env={}, torch_first=True, note="the package's policy, torch imported first"),
}
WORKLOADS = ("lenet", "pgd", "mlp")
_SCRUB = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MARGINLAB_THREADS")


def _load() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------------------------------------- worker side
def _worker(workloads: list[str], torch_first: bool) -> None:
    """Run in a fresh interpreter: time each workload once after a warm-up, print one JSON line."""
    if torch_first:
        import torch  # noqa: F401  (a notebook that imported torch before marginlab)
    import marginlab  # applies the package's thread policy first, unless MARGINLAB_THREADS=off
    import torch

    from marginlab import attacks, data, lowrank, models, train

    results: dict[str, float] = {}
    for name in workloads:
        if name == "lenet":
            xc, yc = lowrank.binary_cifar("train")

            def lenet(epochs: int, x=xc, y=yc) -> None:
                torch.manual_seed(0)
                model = models.LeNet(in_channels=3, num_classes=2)
                train.fit(model, x, y, epochs=epochs, batch_size=64, optimizer="adam", lr=1e-3, device="cpu",
                          progress=False)

            lenet(1)  # warm-up: allocator, oneDNN kernels
            t0 = time.perf_counter()
            lenet(2)
        elif name == "pgd":
            xm, ym = data.load("mnist", split="test")
            torch.manual_seed(0)
            cnn = models.CWNet("mnist", num_classes=10, batchnorm=False).eval()

            def pgd(model=cnn, x=xm[:128], y=ym[:128]) -> None:
                attacks.pgd(model, x, y, eps=0.3, steps=10, early_stop=False, device="cpu")

            pgd()
            t0 = time.perf_counter()
            pgd()
        elif name == "mlp":
            xt, yt = data.load("mnist", split="train")

            def mlp(x=xt, y=yt) -> None:
                torch.manual_seed(0)
                model = models.MLP((1, 28, 28), hidden=(1024,), num_classes=10)
                train.fit(model, x, y, epochs=1, batch_size=64, optimizer="sgd", lr=0.01, device="cpu",
                          progress=False)

            mlp()
            t0 = time.perf_counter()
            mlp()
        else:
            raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")
        results[name] = time.perf_counter() - t0
    print(json.dumps({"seconds": results, "threads": torch.get_num_threads(),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))


# ---------------------------------------------------------------------------------------------- parent side
class Busy:
    """One CPU-bound child process for the duration of a ``with`` block (``n=0``: none)."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self) -> Busy:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        if self.procs:
            time.sleep(0.5)  # let it reach the run queue
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def _env(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(POLICIES[policy]["env"])
    env.setdefault("MARGINLAB_DATA", str(ROOT.parent / "shared" / "data"))
    env["MARGINLAB_PROFILE"] = "quick"
    return env


def _run_workloads(policy: str, workloads: list[str], busy: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *workloads]
    if POLICIES[policy].get("torch_first"):
        cmd.append("--torch-first")
    load = _load()
    with Busy(busy):
        proc = subprocess.run(cmd, env=_env(policy), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({policy}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load"] = load
    return out


def _chapter_path(name: str) -> Path:
    matches = sorted((ROOT / "chapters").glob(f"{name}*.md")) if name != "all" else []
    if len(matches) != 1:
        raise SystemExit(f"--chapters: {name!r} matches {len(matches)} chapters in chapters/")
    return matches[0]


def _run_chapter(policy: str, chapter: Path, busy: int, timeout: float) -> dict:
    """Time one chapter's quick profile; a run past ``timeout`` is stopped and recorded as ``inf``."""
    env = _env(policy)
    load = _load()
    with tempfile.TemporaryDirectory() as cache, Busy(busy):
        env["MARGINLAB_CACHE"] = cache
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                                   str(chapter)], env=env, capture_output=True, text=True, timeout=timeout,
                                  cwd=ROOT, check=False)
        except subprocess.TimeoutExpired:
            # A policy that collapses beside a busy process should cost the benchmark a bounded time, not
            # abort it: "did not finish within the limit" is the measurement.
            return {"seconds": {chapter.stem: float("inf")}, "load": load, "timeout": timeout}
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{chapter.name} failed ({policy}):\n{proc.stdout[-3000:]}")
    return {"seconds": {chapter.stem: seconds}, "load": load}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--torch-first", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--chapters", nargs="+", default=None,
                    help="chapter prefixes (e.g. 04 05) or 'all': time the chapters' quick profiles instead")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (medians are reported)")
    ap.add_argument("--busy", type=int, default=1, help="CPU-bound processes beside the busy measurement")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed for one measurement")
    ap.add_argument("--busy-limit", type=float, default=None,
                    help="chapters: stop a busy run after this many times the policy's idle time (e.g. 3)")
    ap.add_argument("--json", default=None, help="also write every measurement to this file, as they come")
    a = ap.parse_args(argv)
    if a.worker:
        _worker(a.worker, a.torch_first)
        return 0

    if a.chapters:
        names = ([p.stem[:2] for p in sorted((ROOT / "chapters").glob("[0-9][0-9]_*.md"))]
                 if a.chapters == ["all"] else a.chapters)
        chapters = [_chapter_path(n) for n in names]
        items = [c.stem for c in chapters]

        def measure(pol: str, busy: int) -> dict:
            merged: dict = {"seconds": {}, "load": _load()}
            for ch in chapters:
                timeout = a.timeout
                idle = [r["seconds"][ch.stem] for r in rows if r["policy"] == pol and not r["busy"]]
                if busy and a.busy_limit and idle:
                    # Past busy_limit x idle the verdict is known (the goal is 2x): stop there, not at --timeout.
                    timeout = min(timeout, a.busy_limit * statistics.median(idle))
                merged["seconds"].update(_run_chapter(pol, ch, busy, timeout)["seconds"])
                print(f"  {pol} {'busy' if busy else 'idle'} {ch.stem}: {merged['seconds'][ch.stem]:.1f} s "
                      f"(limit {timeout:.0f} s)", flush=True)
            return merged
    else:
        items = list(a.workloads)

        def measure(pol: str, busy: int) -> dict:
            return _run_workloads(pol, items, busy, a.timeout)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"# thread policies, {cpus} CPUs, idle vs beside {a.busy} busy process(es), {a.rounds} rounds, "
          f"interleaved; load = 1-minute load average when each measurement started")
    rows: list[dict] = []
    for r in range(a.rounds):
        order = a.policies[r % len(a.policies):] + a.policies[:r % len(a.policies)]  # rotate: no fixed slot
        for pol in order:
            for busy in ((0, a.busy) if r % 2 == 0 else (a.busy, 0)):
                m = measure(pol, busy)
                m.update(policy=pol, busy=busy, round=r)
                rows.append(m)
                if a.json:  # written after every measurement: a long run cut off keeps what it measured
                    Path(a.json).write_text(json.dumps(rows, indent=1))
                secs = " ".join(f"{k}={v:.2f}s" for k, v in m["seconds"].items())
                print(f"round {r} {pol:15s} {'busy' if busy else 'idle'} load {m['load']:.2f} "
                      f"threads {m.get('threads', '-')}: {secs}", flush=True)

    def med(pol: str, busy: int, item: str) -> float:
        return statistics.median(r["seconds"][item] for r in rows if r["policy"] == pol and r["busy"] == busy)

    def one(pol: str, busy: int, rnd: int) -> dict:
        return next(r for r in rows if r["policy"] == pol and r["busy"] == busy and r["round"] == rnd)

    # Ratios within a round pair measurements taken minutes apart, under about the same background load;
    # medians across rounds mix loads, which on a shared machine swing more than the policies differ.
    ref = "torch" if "torch" in a.policies else a.policies[0]
    print(f"\nratios within each round (busy/idle; idle/{ref} idle), load = mean of the round's loads")
    paired: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for rnd in range(a.rounds):
        load = statistics.mean(r["load"] for r in rows if r["round"] == rnd)
        cells = []
        for pol in a.policies:
            for item in items:
                idle, busy = one(pol, 0, rnd)["seconds"][item], one(pol, a.busy, rnd)["seconds"][item]
                vs_ref = idle / one(ref, 0, rnd)["seconds"][item]
                paired.setdefault((pol, item), []).append((busy / idle, vs_ref))
                cells.append(f"{pol}/{item} {busy / idle:.2f};{vs_ref:.2f}")
        print(f"round {rnd} load {load:5.2f}: " + "  ".join(cells))
    print(f"\n{'policy':15s} {'item':28s} {'median busy/idle':>17s} {'median idle/' + ref:>18s}")
    for (pol, item), pairs in paired.items():
        print(f"{pol:15s} {item:28s} {statistics.median(p[0] for p in pairs):17.2f} "
              f"{statistics.median(p[1] for p in pairs):18.2f}")

    loads = {b: [r["load"] for r in rows if r["busy"] == b] for b in (0, a.busy)}
    print(f"\nmedian seconds; load averages at start: idle runs {min(loads[0]):.2f}-{max(loads[0]):.2f}, "
          f"busy runs {min(loads[a.busy]):.2f}-{max(loads[a.busy]):.2f}")
    print(f"{'policy':15s} {'item':28s} {'idle s':>8s} {'busy s':>8s} {'busy/idle':>10s} {'idle/' + ref:>12s}")
    for pol in a.policies:
        for item in items:
            idle, busy = med(pol, 0, item), med(pol, a.busy, item)
            print(f"{pol:15s} {item:28s} {idle:8.2f} {busy:8.2f} {busy / idle:10.2f} "
                  f"{idle / med(ref, 0, item):12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
