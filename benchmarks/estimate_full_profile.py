"""Estimate the full profile's GPU time and memory per chapter from its job plan (nothing is trained).

    python benchmarks/estimate_full_profile.py [CHAPTER ...] [--attack-batch 256]

The full data sets need not be on this machine: ``data.load`` is replaced by random images of the
official sizes (MNIST 60,000/10,000, CIFAR-10 and CIFAR-100 50,000/10,000), because steps, FLOPs and
memory depend only on the sizes and the models (the printed cache keys are therefore not the real ones).
Per job, ``marginlab.jobs`` runs one training step on two images on the CPU, counts its FLOPs and the
operators it dispatches (GPU time under the assumptions of ``jobs.ASSUMED_GPU``) and the bytes autograd
saves for the backward pass (memory). Every number printed is an estimate.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

import torch

from marginlab import data, jobs

SIZES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


@contextlib.contextmanager
def official_size_standins() -> Iterator[None]:
    """``data.load`` returns random images of the official sizes; ``data.require`` passes."""
    load, require = data.load, data.require

    def fake_load(name, split="train", root=None, **_):
        n = data.FULL_SIZES[name][split]
        gen = torch.Generator().manual_seed(0)
        x = torch.rand((n, *SIZES[name]), generator=gen)
        y = torch.arange(n) % CLASSES[name]
        return x, y

    data.load, data.require = fake_load, lambda *a, **k: None
    try:
        yield
    finally:
        data.load, data.require = load, require


def estimate(chapter: str, attack_batch: int) -> dict:
    with official_size_standins():
        plan = jobs.plan(jobs.chapter_jobs(chapter, "full"), measure_cpu=False)
    costs = [j.cost for j in plan if j.cost is not None]
    seconds = [c.gpu_seconds for c in costs]
    longest = max(plan, key=lambda j: j.cost.gpu_seconds if j.cost else 0)
    biggest = max(plan, key=lambda j: j.cost.peak_bytes if j.cost else 0)
    attack = max(c.attack_bytes(attack_batch) for c in costs)
    return {
        "chapter": chapter, "jobs": len(plan), "gpu_hours": sum(seconds) / 3600,
        "longest": (longest.label, longest.cost.gpu_seconds / 3600),
        "train_peak_gib": (biggest.label, biggest.cost.peak_bytes / 2**30),
        "attack_gib": attack / 2**30,
        "wall_hours": {n: jobs.makespan(seconds, n) / 3600 for n in (1, 2, 4, 8)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("chapters", nargs="*", default=["3", "4", "5", "6"])
    p.add_argument("--attack-batch", type=int, default=256, help="examples per attack chunk (attacks' batch_size)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("ESTIMATES (no GPU run): assumed", jobs.ASSUMED_GPU)
    for ch in args.chapters:
        r = estimate(ch, args.attack_batch)
        walls = ", ".join(f"{n} GPU {h:.2f} h" for n, h in r["wall_hours"].items())
        print(f"chapter {r['chapter']}: {r['jobs']} jobs, {r['gpu_hours']:.2f} GPU-hours "
              f"(longest {r['longest'][0]}: {r['longest'][1]:.2f} h); training memory "
              f"{r['train_peak_gib'][1]:.2f} GiB ({r['train_peak_gib'][0]}); attacks at batch "
              f"{args.attack_batch}: {r['attack_gib']:.2f} GiB; wall: {walls}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
