"""Trainer throughput: LeNet on CIFAR-10-sized inputs, batch 128, on the CPU (or ``--device``).

Uses the real CIFAR-10 airplane-vs-horse subset when ``$MARGINLAB_DATA`` is set (and readable), otherwise
random 3×32×32 images. Prints the images/s of :func:`marginlab.train.fit` and, measured in the same run, of a
bare PyTorch loop doing the same work, so the trainer's overhead shows as a ratio.

    python benchmarks/bench_train.py [--epochs 3] [--n 2048] [--threads N] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from marginlab import models, train


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if os.environ.get("MARGINLAB_DATA"):
        try:
            from marginlab import data

            x, y = data.load("cifar10", "train")
            x, y = data.binary_subset(x, y, positive=0, negative=7)
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            return x, (y > 0).long(), f"CIFAR-10 airplane vs horse ({len(x)} images)"
        except Exception as err:  # a benchmark still runs without the data
            print(f"(real data unavailable: {err}; using random images)")
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 2, (n,), generator=g), f"random ({n} images)"


def _bare_loop(model, x, y, epochs, batch_size, dev) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = x.to(dev), y.to(dev)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            idx = idx.to(dev)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n", type=int, default=2048, help="number of random images (without real data)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    x, y, what = _data(args.n)
    print(f"data: {what}; device {dev}; threads {torch.get_num_threads()}; batch {args.batch_size}; "
          f"epochs {args.epochs}")

    torch.manual_seed(0)
    model = models.LeNet(in_channels=3, num_classes=2)
    # warm-up: the first optimiser step imports torch._dynamo (seconds); keep it out of the timing
    train.fit(model, x[:256], y[:256], optimizer="momentum", epochs=1, batch_size=args.batch_size, device=dev,
              progress=False)

    torch.manual_seed(0)
    model = models.LeNet(in_channels=3, num_classes=2)
    t = time.perf_counter()
    h = train.fit(model, x, y, optimizer="momentum", lr=0.01, epochs=args.epochs, batch_size=args.batch_size,
                  device=dev, progress=False)
    fit_s = time.perf_counter() - t
    seen = len(x) * args.epochs

    torch.manual_seed(0)
    bare = models.LeNet(in_channels=3, num_classes=2)
    t = time.perf_counter()
    _bare_loop(bare, x, y, args.epochs, args.batch_size, dev)
    bare_s = time.perf_counter() - t

    print(f"LeNet CIFAR train: {seen / fit_s:,.0f} images/s")
    print(f"bare PyTorch loop: {seen / bare_s:,.0f} images/s (trainer / bare time ratio {fit_s / bare_s:.2f}; "
          f"final loss {h.last['loss']:.4f}, train acc {h.last['train_acc']:.3f})")


if __name__ == "__main__":
    main()
