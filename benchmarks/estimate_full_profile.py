"""Estimate the full profile's GPU time and memory per chapter: training (job plan) and evaluation (attacks,
margin estimates). Nothing is trained or attacked; every number printed is an ESTIMATE.

    python benchmarks/estimate_full_profile.py [CHAPTER ...] [--attack-batch 256] [--no-training] [--no-eval]

Training (``marginlab.jobs``): the full data sets need not be on this machine: ``data.load`` is replaced by
random images of the official sizes (MNIST 60,000/10,000, CIFAR-10 and CIFAR-100 50,000/10,000), because
steps, FLOPs and memory depend only on the sizes and the models (the printed cache keys are therefore not the
real ones). Per job, ``marginlab.jobs`` runs one training step on two images on the CPU, counts its FLOPs and
the operators it dispatches (GPU time under the assumptions of ``jobs.ASSUMED_GPU``) and the bytes autograd
saves for the backward pass (memory).

Evaluation (not in the job plan; chapters 4, 5, 6 run it after training), how:

1. settings: the chapters' own config functions evaluated with ``MARGINLAB_PROFILE=full`` (chapter 4
   ``differential.cifar_config`` / ``attack_specs``; chapter 5 ``angular.default_config`` per table,
   ``ablation_grid``, the audit's budgets; chapter 6 ``avgmargin.chapter_settings`` and
   ``avgmargin.table_settings``), test-set sizes from ``data.FULL_SIZES``;
2. per model (built with the modules' own factories): one forward and one forward + backward w.r.t. the
   input (parameters frozen, ``eval()``, as the attacks run) on 2 examples under ``jobs._StepCounter``:
   FLOPs per example (matrix products and convolutions, torch's formulas) and ATen operators per pass (the
   launch count of one chunk, which does not depend on the chunk's size), and the bytes autograd saves per
   example (``saved_tensors_hooks``);
3. per attack, the WORST CASE: every example survives every attack and every eps (nothing is dropped early),
   so each runs its whole budget: PGD steps × restarts, MTA steps × targets, DeepFool steps × classes
   linearised (one forward, one backward per class), C&W steps × binary-search steps, AutoAttack APGD-CE
   (iterations + 1) × restarts, APGD-T (iterations + 1) × targets, FAB-T iterations × targets (one gradient
   of the targeted logit difference and one forward each, as the reference counts it), Square queries
   (forward only); the Lipschitz lower bound n_samples × (one forward, K backward passes) per point; the
   upper bound its DeepFool and C&W;
4. GPU seconds of a phase = Σ over its chunks of iterations × max(chunk FLOPs / (utilisation × peak),
   operators × seconds per operator) with ``jobs.ASSUMED_GPU`` (30% of 67 TFLOP/s, 10 µs per operator);
   the attacks' own element-wise bookkeeping (projections, Adam, APGD's step-size logic) is not counted:
   it adds operators (launch floor) for the small models and is negligible in FLOPs for the large ones;
5. memory of a phase = weights + resident test set + chunk × (saved activations per example + 8
   input-sized buffers of attack state + one per extra backward kept), at the chunk size the full profile
   uses (the attacks' default 256, chapter 5's ``eval_batch_size``, the Lipschitz bound's 4,096 sample rows).

Independent models and attacks can run on separate GPUs; within a model the eps values are nested (later
eps attack the survivors of earlier ones), so one attack's eps grid is sequential.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from marginlab import config, data, jobs

SIZES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
#: input-sized tensors an attack keeps per example besides the model's activations (x, x_adv, best point,
#: gradient, momentum / Adam moments, ...): an assumption of the memory estimate
STATE_BUFFERS = 8


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


def full_profile():
    """The full profile's settings (not its smoke run)."""
    return config.environ({"MARGINLAB_PROFILE": "full", "MARGINLAB_SMOKE": None})


def estimate(chapter: str, attack_batch: int) -> dict:
    """The training estimate of ``chapter`` (its job plan)."""
    # the jobs' data and model specs are resolved when planned: under the full profile too (its sizes)
    with official_size_standins(), full_profile():
        plan = jobs.plan(jobs.chapter_jobs(chapter, "full"), measure_cpu=False)
    costs = [j.cost for j in plan if j.cost is not None]
    if not costs:
        return {"chapter": chapter, "jobs": 0, "gpu_hours": 0.0, "gpu_hours_without_wrn": 0.0, "longest": ("-", 0.0), "train_peak_gib": ("-", 0.0),
                "attack_gib": 0.0, "wall_hours": {n: 0.0 for n in (1, 2, 4, 8)}}
    seconds = [c.gpu_seconds for c in costs]
    longest = max(plan, key=lambda j: j.cost.gpu_seconds if j.cost else 0)
    biggest = max(plan, key=lambda j: j.cost.peak_bytes if j.cost else 0)
    attack = max(c.attack_bytes(attack_batch) for c in costs)
    small = [j.cost.gpu_seconds for j in plan if j.cost is not None and "wrn" not in j.label.lower()]
    return {
        "chapter": chapter, "jobs": len(plan), "gpu_hours": sum(seconds) / 3600,
        "gpu_hours_without_wrn": sum(small) / 3600,
        "longest": (longest.label, longest.cost.gpu_seconds / 3600),
        "train_peak_gib": (biggest.label, biggest.cost.peak_bytes / 2**30),
        "attack_gib": attack / 2**30,
        "wall_hours": {n: jobs.makespan(seconds, n) / 3600 for n in (1, 2, 4, 8)},
    }


# ------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class ModelCost:
    """Per-example cost of one model as the attacks use it (eval mode, parameters frozen): FLOPs of a forward
    and of a forward + backward w.r.t. the input, ATen operators per pass (per chunk, independent of its size),
    bytes autograd saves per example, weights and input size. An estimate (see the module docstring)."""

    fwd_flops: float
    grad_flops: float
    fwd_ops: int
    grad_ops: int
    saved_bytes: int
    param_bytes: int
    input_bytes: int
    num_classes: int

    @property
    def bwd_flops(self) -> float:
        """FLOPs of one further backward pass through a retained graph."""
        return max(self.grad_flops - self.fwd_flops, 0.0)

    @property
    def bwd_ops(self) -> int:
        return max(self.grad_ops - self.fwd_ops, 0)


def model_cost(model: nn.Module, shape: Sequence[int], probe: int = 2) -> ModelCost:
    """Count :class:`ModelCost` of ``model`` on ``probe`` random inputs of ``shape`` (C, H, W), on the CPU."""
    if probe < 1:
        raise ValueError(f"probe must be >= 1, got {probe}")
    model = model.cpu().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((probe, *shape), generator=gen)
    with torch.no_grad():
        fwd = jobs._StepCounter()
        with fwd:
            z = model(x)
    num_classes = int(z.shape[1])
    y = torch.zeros(probe, dtype=torch.long)
    xg = x.clone().requires_grad_(True)
    grad = jobs._StepCounter()
    saved = jobs._SavedBytes(model.parameters())
    with torch.enable_grad(), grad, saved.hooks():
        z = model(xg)
        obj = z.gather(1, y[:, None]).sum()  # a logit gap's gradient: the losses' own ops are a handful
        torch.autograd.grad(obj, xg)
    params = list(model.parameters()) + list(model.buffers())
    return ModelCost(fwd_flops=fwd.flops / probe, grad_flops=grad.flops / probe, fwd_ops=fwd.ops, grad_ops=grad.ops,
                     saved_bytes=saved.bytes // probe, param_bytes=sum(t.numel() * t.element_size() for t in params),
                     input_bytes=x[0].numel() * 4, num_classes=num_classes)


class NeverFooled(nn.Module):
    """``base`` plus a large constant on class 0's logit: with labels 0 no attack within a moderate radius
    succeeds, so every attack runs its whole budget (the worst case of the estimate). Counts the rows of its
    forward passes with and without a graph to the input, and the rows of the backward passes through them."""

    def __init__(self, base: nn.Module, lead: float = 1e4):
        super().__init__()
        self.base, self.lead = base, lead
        self.rows = {"grad": 0, "forward": 0, "backward": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base(x)
        z = z + torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long, device=x.device),
                                            z.shape[1]).to(z.dtype) * self.lead
        if z.requires_grad:
            self.rows["grad"] += len(x)
            z.register_hook(self._backward)
        else:
            self.rows["forward"] += len(x)
        return z

    def _backward(self, g: torch.Tensor) -> None:
        self.rows["backward"] += len(g)


def tiny_model(shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> NeverFooled:
    torch.manual_seed(0)
    return NeverFooled(nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), num_classes)))


def _attack_runs(budget: int) -> dict:
    """One callable per attack kind at ``budget`` iterations (queries, samples chunks) on a never-fooled model."""
    from marginlab import attacks, margins

    eps = 8 / 255
    return {
        "pgd": lambda m, x, y: attacks.pgd(m, x, y, eps, budget, loss="margin", seed=0),
        "apgd": lambda m, x, y: attacks.APGD(eps, n_iter=budget)(m, x, y),
        "apgd-t": lambda m, x, y: attacks.APGDT(eps, n_target_classes=1, n_iter=budget)(m, x, y),
        "fab-t": lambda m, x, y: attacks.FAB(eps, targeted=True, n_target_classes=1, n_iter=budget)(m, x, y),
        "square": lambda m, x, y: attacks.Square(eps, n_queries=budget)(m, x, y),
        "deepfool": lambda m, x, y: attacks.DeepFool(budget, candidates=10)(m, x, y),
        "cw": lambda m, x, y: attacks.CarliniWagnerL2(budget, binary_search_steps=1, abort_early=False)(m, x, y),
        "lipschitz": lambda m, x, y: margins.lipschitz_lower_bound(m, x[:1], y[:1], r=5.0, n_samples=4 * budget,
                                                                   batch_size=4),
    }


#: per phase kind, the passes of the model per chunk and iteration (grad, extra backward, forward) in the
#: worst case, for the tiny model of :func:`attack_overhead_ops` (K = 10, one target)
_PASSES = {"pgd": (1, 0, 0), "apgd": (1, 0, 0), "apgd-t": (1, 0, 0), "fab-t": (1, 0, 1), "square": (0, 0, 1),
           "deepfool": (1, 8, 0), "cw": (1, 0, 0), "lipschitz": (1, 9, 0)}


def attack_overhead_ops(budgets: tuple[int, int] = (10, 20)) -> dict[str, float]:
    """Measured ATen operators each attack dispatches per iteration besides the model's passes (projections,
    losses, Adam, step-size logic, sampling), on the CPU: the operator count of the real attack at two budgets
    on a never-fooled linear model, differenced, minus the model's own operators per iteration. Counts, not
    times; the same code dispatches the same operators on a GPU."""
    x = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    y = torch.zeros(2, dtype=torch.long)
    mc = model_cost(tiny_model(), (3, 32, 32))
    counts = {}
    for b in budgets:
        for kind, run in _attack_runs(b).items():
            step = jobs._StepCounter()
            with step:
                run(tiny_model(), x, y)
            counts.setdefault(kind, []).append(step.ops)
    out = {}
    for kind, (lo, hi) in counts.items():
        g, bwd, f = _PASSES[kind]
        per_iter = (hi - lo) / (budgets[1] - budgets[0])
        out[kind] = max(per_iter - (g * mc.grad_ops + bwd * mc.bwd_ops + f * mc.fwd_ops), 0.0)
    return out


#: filled by :func:`main` (or a caller) with :func:`attack_overhead_ops`; empty: only the model's operators
OVERHEAD_OPS: dict[str, float] = {}


@dataclass(frozen=True)
class Phase:
    """One attack (or estimator) run on ``examples`` rows in chunks of ``chunk``, worst case: ``iters``
    sequential iterations per chunk, each with ``grads`` forward + backward evaluations, ``extra_backward``
    further backward passes through the same forward, and ``forwards`` forward-only evaluations per row.
    ``groups``: the rows are chunked in that many separate groups (the Lipschitz bound chunks each point's
    samples on their own)."""

    what: str
    examples: int
    iters: int
    grads: int = 1
    extra_backward: int = 0
    forwards: int = 0
    chunk: int = 256
    groups: int = 1
    kind: str = ""  # the attack's kind in :func:`attack_overhead_ops` ("" = none counted)

    def __post_init__(self):
        for name in ("examples", "iters", "grads", "extra_backward", "forwards", "chunk", "groups"):
            if getattr(self, name) < (1 if name in ("chunk", "groups") else 0):
                raise ValueError(f"{name} must be non-negative (chunk, groups >= 1), got {getattr(self, name)}")

    def chunk_sizes(self) -> list[tuple[int, int]]:
        """(rows, how many chunks of that size)."""
        per = math.ceil(self.examples / self.groups)
        full, rest = divmod(per, self.chunk)
        out = [(self.chunk, full * self.groups)] if full else []
        return out + ([(rest, self.groups)] if rest else [])

    def evaluations(self) -> dict[str, int]:
        """Gradient evaluations, extra backward passes and forwards over all rows (the worst-case count)."""
        return {"grad": self.examples * self.iters * self.grads,
                "backward": self.examples * self.iters * self.extra_backward,
                "forward": self.examples * self.iters * self.forwards}

    def flops(self, mc: ModelCost) -> float:
        return self.examples * self.iters * (self.grads * mc.grad_flops + self.extra_backward * mc.bwd_flops
                                             + self.forwards * mc.fwd_flops)

    def ops(self, mc: ModelCost, overhead: dict[str, float] | None = None) -> float:
        """Operators per chunk and iteration: the model's passes plus the attack's own (measured) bookkeeping."""
        own = (overhead or {}).get(self.kind, 0.0)
        return self.grads * mc.grad_ops + self.extra_backward * mc.bwd_ops + self.forwards * mc.fwd_ops + own

    def seconds(self, mc: ModelCost, gpu: dict | None = None, overhead: dict[str, float] | None = None) -> float:
        """Estimated GPU seconds: per chunk and iteration the larger of FLOP time and launch floor."""
        gpu = {**jobs.ASSUMED_GPU, **(gpu or {})}
        sustained = gpu["peak_flops"] * gpu["utilization"]
        per_row = self.grads * mc.grad_flops + self.extra_backward * mc.bwd_flops + self.forwards * mc.fwd_flops
        ops = self.ops(mc, OVERHEAD_OPS if overhead is None else overhead)
        return sum(count * self.iters * max(rows * per_row / sustained, ops * gpu["seconds_per_op"])
                   for rows, count in self.chunk_sizes())

    def peak_bytes(self, mc: ModelCost, data_bytes: int = 0) -> int:
        """Weights + resident data + one chunk's activations and attack state (an estimate)."""
        rows = min(self.chunk, math.ceil(self.examples / self.groups))
        per_row = (mc.saved_bytes if self.grads or self.extra_backward else 0) \
            + (STATE_BUFFERS + self.extra_backward) * mc.input_bytes
        return mc.param_bytes + data_bytes + rows * per_row


def _checks(what: str, n: int, forwards: int, chunk: int) -> Phase:
    """The forward passes around an attack call (clean prediction, success check, a restart's or target's
    final evaluation): at most ``forwards`` per row."""
    return Phase(f"{what} (checks)", n, forwards, grads=0, forwards=1, chunk=chunk)


def pgd(what: str, n: int, steps: int, restarts: int = 1, chunk: int = 256, eps_count: int = 1) -> list[Phase]:
    """PGD / FGSM: steps × restarts gradient evaluations per eps."""
    return [Phase(what, n, eps_count * steps * restarts, chunk=chunk, kind="pgd"),
            _checks(what, n, eps_count * (3 + restarts), chunk)]


def multi_target(what: str, n: int, steps: int, targets: int, chunk: int) -> list[Phase]:
    """Multi-target PGD: steps gradient evaluations per target."""
    return [Phase(what, n, steps * targets, chunk=chunk, kind="pgd"), _checks(what, n, 3 + targets, chunk)]


def deepfool(what: str, n: int, steps: int, num_classes: int, candidates: int | None = 10, chunk: int = 256
             ) -> list[Phase]:
    """Per step one forward and one backward per linearised class (min(candidates, K) - 1 of them)."""
    nc = min(num_classes if candidates is None else candidates, num_classes)
    return [Phase(what, n, steps, grads=1, extra_backward=max(nc - 2, 0), chunk=chunk, kind="deepfool"),
            _checks(what, n, 3, chunk)]


def cw(what: str, n: int, steps: int, search: int, chunk: int = 256) -> list[Phase]:
    """C&W L2: steps Adam steps (one gradient each) per binary-search step, no early abort (worst case)."""
    return [Phase(what, n, steps * search, chunk=chunk, kind="cw"), _checks(what, n, 3, chunk)]


def autoattack(what: str, n: int, num_classes: int, *, n_iter: int = 100, targets: int = 9, queries: int = 5000,
               restarts: int = 1, chunk: int = 256, eps_count: int = 1) -> list[Phase]:
    """AutoAttack (Croce & Hein 2020) worst case per eps: APGD-CE (n_iter + 1) × restarts, APGD-T (n_iter + 1) ×
    targets, FAB-T n_iter × targets (a gradient and a forward each), Square ``queries`` forwards."""
    t = min(targets, num_classes - 1)
    return [Phase(f"{what}: APGD-CE", n, eps_count * (n_iter + 1) * restarts, chunk=chunk, kind="apgd"),
            Phase(f"{what}: APGD-T", n, eps_count * (n_iter + 1) * t, chunk=chunk, kind="apgd-t"),
            Phase(f"{what}: FAB-T", n, eps_count * n_iter * t, forwards=1, chunk=chunk, kind="fab-t"),
            Phase(f"{what}: Square", n, eps_count * queries, grads=0, forwards=1, chunk=chunk, kind="square"),
            _checks(what, n, eps_count * (4 * 3 + 2), chunk)]


def lipschitz(what: str, points: int, n_samples: int, num_classes: int, chunk: int) -> list[Phase]:
    """``margins.lipschitz_lower_bound``: per sample one forward and K backward passes; a point's samples
    are chunked on their own when they exceed the chunk (several points share a chunk otherwise)."""
    centres = _checks(what, points, 1, chunk)
    if n_samples > chunk:
        return [Phase(what, points * n_samples, 1, grads=1, extra_backward=num_classes - 1, chunk=chunk,
                      groups=points, kind="lipschitz"), centres]
    return [Phase(what, points * n_samples, 1, grads=1, extra_backward=num_classes - 1,
                  chunk=(chunk // n_samples) * n_samples, kind="lipschitz"), centres]


def upper_bound(what: str, points: int, num_classes: int, methods: Sequence[str], options: dict) -> list[Phase]:
    """``margins.upper_bound``: DeepFool (50 steps, 10 candidates) and C&W (1,000 × 9) by default."""
    out = []
    if "deepfool" in methods:
        o = options.get("deepfool", {})
        out += deepfool(f"{what} DeepFool", points, o.get("steps", 50), num_classes, o.get("candidates", 10))
    if "cw" in methods:
        o = options.get("cw", {})
        out += cw(f"{what} C&W", points, o.get("steps", 1000), o.get("binary_search_steps", 9))
    return out


@dataclass
class ModelEval:
    """The evaluation of one trained model: its cost and its phases (seconds with :data:`OVERHEAD_OPS`)."""

    label: str
    cost: ModelCost
    phases: list[Phase]
    data_bytes: int = 0

    def seconds(self) -> float:
        return sum(p.seconds(self.cost) for p in self.phases)

    def peak_bytes(self) -> int:
        return max(p.peak_bytes(self.cost, self.data_bytes) for p in self.phases)


@dataclass
class ChapterEval:
    chapter: str
    models: list[ModelEval] = field(default_factory=list)
    note: str = ""

    def seconds(self) -> float:
        return sum(m.seconds() for m in self.models)

    def peak_bytes(self) -> int:
        return max((m.peak_bytes() for m in self.models), default=0)

    def by_what(self) -> dict[str, float]:
        """GPU seconds summed over models per phase name (model label stripped)."""
        out: dict[str, float] = {}
        for m in self.models:
            for p in m.phases:
                out[p.what] = out.get(p.what, 0.0) + p.seconds(m.cost)
        return out


def _test_bytes(dataset: str) -> int:
    return data.FULL_SIZES[dataset]["test"] * (math.prod(SIZES[dataset]) * 4 + 8)


def chapter4_eval() -> ChapterEval:
    """Chapter 4 (``differential.cifar_experiment``): for CE and eq. 7, robustness masks on the training and
    test images over the eps grid (every attack of ``attack_specs`` at every eps > 0), the unbounded check,
    and CW + DeepFool minimal L2 distances."""
    from marginlab import differential as D

    with full_profile():
        cfg = D.cifar_config()
    shape = SIZES["cifar10"]
    n_eps = sum(1 for e in cfg.epsilons if e > 0)
    out = ChapterEval("4", note=f"2 models (CE, eq. 7), {n_eps} eps, {cfg.n_attack_train} train / "
                      f"{cfg.n_attack_test} test images")
    for kind in ("ce", "eq7"):
        mc = model_cost(D.cifar_model(cfg.seed), shape)
        k = mc.num_classes
        phases: list[Phase] = []
        for split, n in (("train", cfg.n_attack_train), ("test", cfg.n_attack_test)):
            phases.append(Phase(f"clean ({split})", n, 1, grads=0, forwards=1, chunk=cfg.eval_batch_size))
            for s in D.attack_specs(cfg):
                p = s.params
                if s.fn == "pgd":
                    phases += pgd(s.name, n, p["steps"], p.get("restarts", 1), eps_count=n_eps)
                elif s.fn == "fgsm":
                    phases += pgd(s.name, n, 1, eps_count=n_eps)
                else:
                    from marginlab import attacks

                    aa = attacks.AutoAttack(8 / 255, **p)
                    phases += autoattack("AutoAttack", n, k, n_iter=aa.n_iter, targets=aa.n_target_classes,
                                         queries=aa.n_queries, eps_count=n_eps)
            phases += pgd("PGD-unbounded", n, cfg.unbounded_steps)
        phases += deepfool("DeepFool (min L2)", cfg.n_cw, cfg.deepfool_steps, k)
        phases += cw("C&W (min L2)", cfg.n_cw, cfg.cw_steps, cfg.cw_search)
        out.models.append(ModelEval(kind, mc, phases, (cfg.n_train + cfg.n_test) * (math.prod(shape) * 4 + 8)))
    return out


def _suite_phases(specs, n_test: int, k: int, chunk: int) -> list[Phase]:
    """Chapter 5's Table-1 suite (``angular.evaluate``) on ``n_test`` images."""
    phases: list[Phase] = [Phase("clean", n_test, 1, grads=0, forwards=1, chunk=chunk)]
    for s in specs:
        n = n_test if s.n_examples is None else min(s.n_examples, n_test)
        a = s.build()
        if s.kind == "pgd":
            phases += pgd(s.name, n, a.steps, a.restarts, chunk)
        elif s.kind == "mta":
            t = min(k - 1 if a.num_targets is None else a.num_targets, k - 1)
            phases += multi_target(s.name, n, a.steps, t, chunk)
        elif s.kind == "deepfool":
            phases += deepfool(s.name, n, a.steps, k, a.candidates, chunk)
        elif s.kind == "cw":
            phases += cw(s.name, n, a.steps, a.binary_search_steps, chunk)
        else:
            phases += autoattack(s.name, n, k, n_iter=a.n_iter, targets=a.n_target_classes, queries=a.n_queries,
                                 chunk=chunk)
    return phases


def chapter5_eval(include_wrn: bool = True) -> ChapterEval:
    """Chapter 5: each table's methods under the suite (``run_table``), the audit of Ours / MMC / AT on MNIST
    (``angular.audit``, grid 2), the ablation grid's PGD evaluation (``run_ablation``); the WRN-34-10 tables
    (``include_wrn``) are listed as their own models. The 32-image loss slices are negligible and left out."""
    from marginlab import angular as A

    with full_profile():
        runs = A.table_runs()
        cfgs = {(d, mod): A.default_config(d, mod) for d, mod, _, _ in runs}
        settings = A.ablation_settings()
        audited = ("Ours", "MMC", "AT")  # the chapter's config.pick(full=...) for the audit
    out = ChapterEval("5", note="Tables 4/5 (4 methods each), audit of 3 MNIST models, ablation grid"
                      + (", WRN-34-10 Tables 2/3" if include_wrn else ""))
    for d, mod, methods, _ in runs:
        if mod == "wrn" and not include_wrn:
            continue
        cfg = cfgs[(d, mod)]
        n_test = min(cfg.n_test, data.FULL_SIZES[d]["test"])
        for m in methods:
            mc = model_cost(A.make_model(m, cfg), SIZES[d])
            phases = _suite_phases(cfg.attacks, n_test, mc.num_classes, cfg.eval_batch_size)
            if d == "mnist" and mod == "cwnet" and m in audited:
                n_a = n_test if cfg.audit_n is None else min(cfg.audit_n, n_test)
                steps, r, grid = cfg.audit_steps, cfg.audit_restarts, 2
                phases += pgd("audit PGD-CE", n_a, max(steps // 2, 1), eps_count=grid)
                phases += pgd("audit FGSM", n_a, 1, eps_count=grid)
                phases += pgd("audit stronger (margin + CE)", n_a, steps, r, eps_count=2 * grid)
                phases += pgd("audit transfer (on CE)", n_a, steps, eps_count=grid)
                phases += pgd("audit unbounded", n_a, max(steps, 20), r)
                phases += pgd("audit unbounded bisection", n_a, max(steps // 4, 5), eps_count=5)
            label = f"{'WRN-34-10 ' if mod == 'wrn' else ''}{d} {m}"
            out.models.append(ModelEval(label, mc, phases, _test_bytes(d)))
    cfg = cfgs[("mnist", "cwnet")]
    with full_profile():
        grid = [how for _, _, how in A.ablation_grid(cfg, **settings) if isinstance(how, dict)]
    first = cfg.attacks[0].build()
    for kw in grid:
        mc = model_cost(A.make_model("Ours", cfg, feature_activation=kw.get("feature_activation")), SIZES["mnist"])
        phases = [Phase("ablation clean", cfg.n_test, 1, grads=0, forwards=1, chunk=cfg.eval_batch_size)]
        phases += pgd(f"ablation {cfg.attacks[0].name}", cfg.n_test, first.steps, first.restarts, cfg.eval_batch_size)
        out.models.append(ModelEval("ablation " + A.ablation_tag(kw, "mnist"), mc, phases, _test_bytes("mnist")))
    return out


def chapter6_eval() -> ChapterEval:
    """Chapter 6: margins of the curve models at every tracked epoch on the train and test point sets (Lipschitz
    lower bound + DeepFool/C&W upper bound; they run inside training as a callback), and Table 1
    (``evaluate_robustness``) for each model × Std / LCR / AMR."""
    from marginlab import avgmargin as am
    from marginlab import margins

    with full_profile():
        st, t = am.chapter_settings(), am.table_settings()
        epochs = {kind: len(am.curve_epochs(kind)[1]) for kind in ("lr", "mlp", "cnn")}
    out = ChapterEval("6", note=f"{len(st['curve_models'])} curve models × {st['n_points']} train + "
                      f"{st['n_points']} test points × {st['n_samples']} samples at the tracked epochs; Table 1: "
                      f"{len(st['table_models'])} models × 3 methods")
    chunk = margins.GPU_BATCH_SIZE
    for d, kind in st["curve_models"]:
        mc = model_cost(am.make_model(kind, d), SIZES[d])
        k, ne = mc.num_classes, epochs[kind]
        pts = 2 * st["n_points"] * ne
        phases = lipschitz(f"curves Lipschitz bound ({ne} epochs)", pts, st["n_samples"], k, chunk)
        phases += upper_bound("curves upper bound", pts, k, st["upper"], st["upper_options"])
        out.models.append(ModelEval(f"curves {d} {kind}", mc, phases, 0))
    for d, kind in st["table_models"]:
        mc = model_cost(am.make_model(kind, d), SIZES[d])
        k = mc.num_classes
        n = data.FULL_SIZES[d]["test"] if t["n_test"] is None else t["n_test"]
        n_eps = len(am.PAPER_EPS[d])
        for method in ("Std", "LCR", "AMR"):
            phases = pgd("Table 1 L2-PGD", n, t["steps"], eps_count=n_eps)
            phases += autoattack("Table 1 AutoAttack (L2)", n, k, eps_count=n_eps)
            phases += pgd("Table 1 stronger PGD", n, t["stronger"], eps_count=n_eps)
            phases += pgd("Table 1 unbounded PGD", n, max(t["steps"], 100))
            phases += lipschitz("Table 1 Lipschitz bound", t["n_margin"], st["n_samples"], k, chunk)
            phases += upper_bound("Table 1 upper bound", t["n_margin"], k, ("deepfool", "cw"), st["upper_options"])
            out.models.append(ModelEval(f"Table 1 {d} {kind} {method}", mc, phases, _test_bytes(d)))
    return out


EVALUATIONS = {"4": chapter4_eval, "5": chapter5_eval, "6": chapter6_eval}


def _h(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def _dominant(models: Sequence[ModelEval], top: int) -> str:
    parts: dict[str, float] = {}
    for m in models:
        for p in m.phases:
            parts[p.what] = parts.get(p.what, 0.0) + p.seconds(m.cost)
    total = sum(parts.values()) or 1.0
    best = sorted(parts.items(), key=lambda kv: -kv[1])[:top]
    return "; ".join(f"{w} {_h(s_)} ({100 * s_ / total:.0f}%)" for w, s_ in best)


def print_eval(ev: ChapterEval, top: int = 4, detail: bool = False) -> None:
    """Print the chapter's evaluation estimate: total, peak memory, what dominates, the WRN tables apart, and
    the wall time with the models spread over 1/2/4/8 GPUs (one model per GPU, longest first)."""
    total = ev.seconds()
    wrn = [m for m in ev.models if m.label.startswith("WRN")]
    rest = [m for m in ev.models if not m.label.startswith("WRN")]
    longest = max(ev.models, key=lambda m: m.seconds())
    walls = ", ".join(f"{n} GPU {_h(jobs.makespan([m.seconds() for m in ev.models], n))}" for n in (1, 2, 4, 8))
    print(f"  evaluation (ESTIMATE, worst case: every example survives every attack): {_h(total)} GPU "
          f"on {len(ev.models)} models; peak memory {ev.peak_bytes() / 2**30:.1f} GiB; longest model "
          f"{longest.label}: {_h(longest.seconds())}; wall, one model per GPU: {walls} ({ev.note})")
    print(f"    dominated by: {_dominant(ev.models, top)}")
    if wrn:
        print(f"    without the WRN tables: {_h(sum(m.seconds() for m in rest))}, peak "
              f"{max(m.peak_bytes() for m in rest) / 2**30:.1f} GiB, dominated by {_dominant(rest, top)}")
        print("    WRN-34-10 tables: " + ", ".join(f"{m.label} {_h(m.seconds())} ({m.peak_bytes() / 2**30:.1f} GiB)"
                                              for m in wrn))
    if detail:
        for m in sorted(ev.models, key=lambda m: -m.seconds()):
            print(f"      {m.label}: {_h(m.seconds())}, {m.peak_bytes() / 2**30:.2f} GiB; "
                  f"{m.cost.grad_flops / 1e6:.1f} MFLOP per example forward+backward, {m.cost.grad_ops} ops")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("chapters", nargs="*", default=["3", "4", "5", "6"])
    p.add_argument("--attack-batch", type=int, default=256, help="examples per attack chunk (attacks' batch_size)")
    p.add_argument("--no-training", action="store_true", help="skip the job plans (training estimate)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation estimate")
    p.add_argument("--detail", action="store_true", help="one line per evaluated model")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print("ESTIMATES (no GPU run): assumed", jobs.ASSUMED_GPU)
    if not args.no_eval:
        OVERHEAD_OPS.update(attack_overhead_ops())
        print("attacks' own operators per chunk and iteration (measured on the CPU): "
              + ", ".join(f"{k} {v:.0f}" for k, v in OVERHEAD_OPS.items()))
    for ch in args.chapters:
        num = jobs.resolve_chapter(ch).lstrip("0")
        train_h = None
        print(f"chapter {num}:")
        if not args.no_training:
            r = estimate(ch, args.attack_batch)
            train_h = r["gpu_hours"]
            walls = ", ".join(f"{n} GPU {h:.2f} h" for n, h in r["wall_hours"].items())
            print(f"  training: {r['jobs']} jobs, {r['gpu_hours']:.2f} GPU-hours "
                  f"(longest {r['longest'][0]}: {r['longest'][1]:.2f} h); training memory "
                  f"{r['train_peak_gib'][1]:.2f} GiB ({r['train_peak_gib'][0]}); attacks at batch "
                  f"{args.attack_batch}: {r['attack_gib']:.2f} GiB; wall: {walls}", flush=True)
        ev = None
        if not args.no_eval:
            if num in EVALUATIONS:
                ev = EVALUATIONS[num]()
                print_eval(ev, detail=args.detail)
            else:
                print("  evaluation: no attacks or margin estimates after training")
        if train_h is not None:
            eval_h = ev.seconds() / 3600 if ev else 0.0
            peak = max(r["train_peak_gib"][1], ev.peak_bytes() / 2**30 if ev else 0.0)
            print(f"  combined (ESTIMATE): {train_h + eval_h:.2f} GPU-hours "
                  f"(training {train_h:.2f} + evaluation {eval_h:.2f}), peak {peak:.1f} GiB", flush=True)
            small = [m for m in ev.models if not m.label.startswith("WRN")] if ev else []
            if ev and len(small) < len(ev.models):
                small_h = r["gpu_hours_without_wrn"] + sum(m.seconds() for m in small) / 3600
                print(f"  combined without the WRN tables (ESTIMATE): {small_h:.2f} GPU-hours (training "
                      f"{r['gpu_hours_without_wrn']:.2f} + evaluation {sum(m.seconds() for m in small) / 3600:.2f})",
                      flush=True)
    print(f"(estimated in {time.perf_counter() - t0:.0f} s on this machine's CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
