"""Benchmark: marginlab.attacks.pgd vs foolbox 3 LinfPGD on the same model, batch and steps (DESIGN §7).

Run: MARGINLAB_DATA=/work/shared/data python benchmarks/bench_attacks.py [--n 256] [--steps 40] [--repeats 3]
Prints the best-of-repeats wall time of each and the ratio ours/foolbox (goal: <= 1). Uses real MNIST
test images when MARGINLAB_DATA is set (an untrained model otherwise: the cost does not depend on it).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn


class SmallCNN(nn.Module):
    """A small MNIST CNN (conv 32 -> conv 64 -> fc 128 -> 10), the size of the book's CPU-profile models."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import foolbox as fb

    from marginlab import attacks

    torch.manual_seed(0)
    dev = torch.device(args.device)
    if os.environ.get("MARGINLAB_DATA"):
        from marginlab import data

        x, y = data.load("mnist", "test")
        x, y = x[: args.n], y[: args.n]
    else:
        x, y = torch.rand(args.n, 1, 28, 28), torch.randint(0, 10, (args.n,))
    x, y = x.to(dev), y.to(dev)
    model = SmallCNN().to(dev).eval()
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=dev)
    rel = 2.5 / args.steps
    fb_attack = fb.attacks.LinfPGD(steps=args.steps, rel_stepsize=rel, random_start=True)

    def ours_full() -> None:  # same work as foolbox: every example, every step
        attacks.pgd(model, x, y, args.eps, args.steps, step_size=rel * args.eps, early_stop=False)

    def ours_default() -> None:  # the default: per-example early stop
        attacks.pgd(model, x, y, args.eps, args.steps, step_size=rel * args.eps)

    def theirs() -> None:
        fb_attack(fmodel, x, y, epsilons=[args.eps])

    ours_full(), theirs()  # warm-up
    t_fb = best_time(theirs, args.repeats)
    t_ours = best_time(ours_full, args.repeats)
    t_default = best_time(ours_default, args.repeats)
    print(f"PGD-Linf, {args.n} MNIST images, {args.steps} steps, eps={args.eps}, device={dev}, "
          f"threads={torch.get_num_threads()}, best of {args.repeats}")
    print(f"  foolbox LinfPGD:               {t_fb:8.3f} s")
    print(f"  marginlab pgd (no early stop): {t_ours:8.3f} s   ratio ours/foolbox = {t_ours / t_fb:.3f}")
    print(f"  marginlab pgd (early stop):    {t_default:8.3f} s   ratio ours/foolbox = {t_default / t_fb:.3f}")


if __name__ == "__main__":
    main()
