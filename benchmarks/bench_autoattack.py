"""Benchmark: marginlab.attacks.auto_attack vs torchattacks' AutoAttack on the same model and images (DESIGN §7).

Run: MARGINLAB_DATA=/work/shared/data python benchmarks/bench_autoattack.py [--n 100] [--eps 0.15] [--device cpu]

The model is a small MNIST CNN adversarially trained for a few seconds (robust points are what
AutoAttack spends its time on: an undefended model is broken by the first attack). Prints, in one
run, wall time and robust accuracy of

1. ours, standard budget (APGD-CE 100 it., APGD-T 9 x 100, FAB-T 9 x 100, Square 5,000 queries), vs
   torchattacks MultiAttack built with that same reference budget -> ratio ours/theirs (goal <= 1);
2. ours with torchattacks' own ``AutoAttack(version="standard")`` budget vs that -> ratio (goal <= 1).
   Note: torchattacks 3.5.1's AutoAttack runs APGD, APGD-T and FAB with their default 10 steps (not
   the reference's 100) and Square with a rescaled schedule, so its "standard" is a reduced budget.

Needs torchattacks (a test-time peer: ``pip install --no-deps torchattacks==3.5.1``); exits 0 with a
message if it is missing.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.ReLU(), nn.Conv2d(16, 32, 5, stride=2, padding=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--eps", type=float, default=0.15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import torchattacks as ta
    except ImportError:
        print("torchattacks is not installed (pip install --no-deps torchattacks==3.5.1): skipped")
        return
    from marginlab import attacks

    dev = torch.device(args.device)
    torch.manual_seed(0)
    if os.environ.get("MARGINLAB_DATA"):
        from marginlab import data

        xtr, ytr = data.load("mnist", "train")
        xte, yte = data.load("mnist", "test")
    else:
        xtr, ytr = torch.rand(1200, 1, 28, 28), torch.randint(0, 10, (1200,))
        xte, yte = torch.rand(args.n, 1, 28, 28), torch.randint(0, 10, (args.n,))
    xtr, ytr = xtr[:1200].to(dev), ytr[:1200].to(dev)
    model = small_cnn().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    for _ in range(4):  # brief PGD adversarial training, so that robust accuracy is not 0
        for idx in torch.randperm(len(xtr), device=dev).split(64):
            xb = attacks.pgd(model, xtr[idx], ytr[idx], args.eps, 4, step_size=args.eps / 2)
            model.train()
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), ytr[idx]).backward()
            opt.step()
    model.eval()
    x, y = xte[: args.n].to(dev), yte[: args.n].to(dev)
    print(f"AutoAttack Linf eps={args.eps}, {args.n} MNIST test images, device={dev}, threads={torch.get_num_threads()}"
          f" (model trained in {time.perf_counter() - t0:.0f} s)")

    def acc(xa: torch.Tensor) -> float:
        return float(attacks.correct(model, xa, y).float().mean())

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    ref_budget = ta.MultiAttack([
        ta.APGD(model, norm="Linf", eps=args.eps, steps=100, n_restarts=1, loss="ce", seed=0),
        ta.APGDT(model, norm="Linf", eps=args.eps, steps=100, n_restarts=1, n_classes=10, seed=0),
        ta.FAB(model, norm="Linf", eps=args.eps, steps=100, n_restarts=1, multi_targeted=True, n_classes=10,
               seed=0),
        ta.Square(model, norm="Linf", eps=args.eps, n_queries=5000, n_restarts=1, p_init=0.8,
                  resc_schedule=False, seed=0),
    ])
    their_aa = ta.AutoAttack(model, norm="Linf", eps=args.eps, version="standard", n_classes=10, seed=0)
    ours_std = attacks.AutoAttack(args.eps, "linf", version="standard")
    # torchattacks' AutoAttack budget: 10 steps for APGD, APGD-T and FAB; Square 5,000 queries, rescaled schedule
    ours_ta = attacks.AutoAttack(args.eps, "linf", n_iter=10)
    ours_ta.attacks["square"].rescale_schedule = True

    report, t_ours = timed(lambda: ours_std.run(model, x, y))
    theirs, t_theirs = timed(lambda: ref_budget(x, y))
    print("1. reference standard budget (APGD-CE 100, APGD-T 9x100, FAB-T 9x100, Square 5000)")
    print(f"   torchattacks MultiAttack: {t_theirs:8.1f} s  robust accuracy {acc(theirs):.3f}")
    print(f"   marginlab auto_attack:    {t_ours:8.1f} s  robust accuracy {report.robust_accuracy:.3f}   "
          f"ratio ours/torchattacks = {t_ours / t_theirs:.3f}")
    print(f"   ({report.summary()})")
    report2, t_ours2 = timed(lambda: ours_ta.run(model, x, y))
    theirs2, t_theirs2 = timed(lambda: their_aa(x, y))
    print("2. torchattacks' AutoAttack(version='standard') budget (10 steps; Square 5000, rescaled)")
    print(f"   torchattacks AutoAttack:  {t_theirs2:8.1f} s  robust accuracy {acc(theirs2):.3f}")
    print(f"   marginlab, same budget:   {t_ours2:8.1f} s  robust accuracy {report2.robust_accuracy:.3f}   "
          f"ratio ours/torchattacks = {t_ours2 / t_theirs2:.3f}")


if __name__ == "__main__":
    main()
