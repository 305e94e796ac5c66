"""Benchmark: one differential-training epoch (000 eq. 7, all |I_b|×|J_b| pairs of each balanced batch)
vs one cross-entropy epoch over the same number of images, LeNet on CIFAR-sized inputs, CPU.

Goal: ratio <= 1.5 — each image's score is computed once per batch, so the pairs cost only an
(B/2)×(B/2) broadcast on top of the usual forward/backward pass.

    python benchmarks/bench_differential.py [--n 2048] [--batch 128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import torch

from marginlab import losses
from marginlab.models import BinaryLogits, LeNet
from marginlab.train import fit


def _epoch_seconds(loss_fn, sampler: str, x, y, batch: int, repeats: int) -> float:
    best = float("inf")
    for r in range(repeats):
        torch.manual_seed(0)
        model = BinaryLogits(LeNet(3, num_classes=1))
        t0 = time.process_time()  # CPU time: robust to other jobs sharing the machine
        fit(model, x, y, loss_fn=loss_fn, optimizer="adam", lr=1e-3, epochs=1, batch_size=batch,
            sampler=sampler, seed=r, device="cpu", progress=False)
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048, help="images per epoch (half per class)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.n, 3, 32, 32, generator=g)
    y = torch.where(torch.arange(a.n) % 2 == 0, 1, -1)
    ce = _epoch_seconds(None, "shuffle", x, y, a.batch, a.repeats)
    dt = _epoch_seconds(losses.squared_differential_loss, "balanced", x, y, a.batch, a.repeats)
    pairs = (a.batch // 2) ** 2 * (a.n // a.batch)
    print(f"LeNet, {a.n} images, batch {a.batch}, {torch.get_num_threads()} threads (CPU seconds, best of {a.repeats})")
    print(f"cross-entropy epoch:          {ce:.3f} s")
    print(f"differential (eq. 7) epoch:   {dt:.3f} s   ({pairs} pair terms)")
    print(f"ratio differential / CE:      {dt / ce:.2f}x   (goal <= 1.5x)")


if __name__ == "__main__":
    main()
