"""benchmarks/estimate_full_profile.py: the evaluation estimate's counts and arithmetic (cheap: tiny models)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from marginlab import jobs

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "estimate_full_profile.py"
_spec = importlib.util.spec_from_file_location("estimate_full_profile", _PATH)
E = importlib.util.module_from_spec(_spec)
sys.modules.setdefault(_spec.name, E)  # dataclasses look their module up
_spec.loader.exec_module(E)


def test_model_cost_of_a_linear_layer_is_its_matrix_products():
    d, k = 3 * 8 * 8, 7
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, k))
    mc = E.model_cost(model, (3, 8, 8))
    assert mc.fwd_flops == 2 * d * k  # one (1, d) x (d, k) product per example
    assert mc.grad_flops == 4 * d * k  # + the input gradient (1, k) x (k, d); weights frozen: no weight gradient
    assert mc.num_classes == k and mc.input_bytes == d * 4
    assert mc.param_bytes == (d * k + k) * 4
    assert 0 < mc.fwd_ops < mc.grad_ops


def _mc(**kw) -> E.ModelCost:
    base = {"fwd_flops": 1e9, "grad_flops": 3e9, "fwd_ops": 10, "grad_ops": 30, "saved_bytes": 1000, "param_bytes": 500,
                "input_bytes": 100, "num_classes": 10}
    return E.ModelCost(**{**base, **kw})


def test_phase_seconds_take_the_larger_of_flops_and_launch_floor_per_chunk():
    gpu = {"peak_flops": 1e12, "utilization": 0.5, "seconds_per_op": 1e-3}
    mc = _mc()
    # 600 rows in chunks of 256: 256, 256, 88; 5 iterations; 1 grad + 2 extra backward + 1 forward per row
    p = E.Phase("x", 600, 5, grads=1, extra_backward=2, forwards=1, chunk=256)
    per_row = 3e9 + 2 * 2e9 + 1e9
    ops = 30 + 2 * 20 + 10
    want = 5 * (2 * max(256 * per_row / 5e11, ops * 1e-3) + max(88 * per_row / 5e11, ops * 1e-3))
    assert p.seconds(mc, gpu, overhead={}) == pytest.approx(want)
    # launch-bound: tiny FLOPs, the operators (plus the attack's own) set the time
    tiny = _mc(fwd_flops=1.0, grad_flops=2.0)
    q = E.Phase("y", 600, 5, chunk=256, kind="pgd")
    assert q.seconds(tiny, gpu, overhead={"pgd": 12.0}) == pytest.approx(3 * 5 * (30 + 12) * 1e-3)
    # groups: each group is chunked on its own (the Lipschitz bound's points)
    g = E.Phase("z", 2 * 300, 1, chunk=256, groups=2)
    assert g.chunk_sizes() == [(256, 2), (44, 2)]
    assert p.peak_bytes(mc, data_bytes=7) == 500 + 7 + 256 * (1000 + (E.STATE_BUFFERS + 2) * 100)


@pytest.mark.parametrize("bad", [{"examples": -1}, {"chunk": 0}, {"groups": 0}])
def test_phase_rejects_bad_sizes(bad):
    with pytest.raises(ValueError):
        E.Phase(**{"what": "x", "examples": 10, "iters": 1, **bad})


def test_worst_case_counts_match_the_attacks_run_on_a_never_fooled_model():
    """The analytic counts equal the real attacks' gradient and backward passes when nothing is fooled, and
    bound their forward passes."""
    b, n = 5, 2
    x = torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    y = torch.zeros(n, dtype=torch.long)
    aa = E.autoattack("AA", n, 10, n_iter=b, targets=1, queries=b)
    checks = aa[-1].evaluations()["forward"]
    expected = {
        "pgd": E.pgd("pgd", n, b),
        "apgd": [aa[0], aa[-1]],
        "apgd-t": [aa[1], aa[-1]],
        "fab-t": [aa[2], aa[-1]],
        "square": [aa[3], aa[-1]],
        "deepfool": E.deepfool("df", n, b, 10, 10),
        "cw": E.cw("cw", n, b, 1),
        "lipschitz": E.lipschitz("lip", 1, 4 * b, 10, 4),
    }
    assert checks > 0
    for kind, run in E._attack_runs(b).items():
        model = E.tiny_model()
        with torch.no_grad():
            assert bool((model(x).argmax(1) == y).all())
        model.rows = dict.fromkeys(model.rows, 0)
        run(model, x, y)
        ev = {k: sum(p.evaluations()[k] for p in expected[kind]) for k in ("grad", "backward", "forward")}
        assert model.rows["grad"] == ev["grad"], kind
        assert model.rows["backward"] == ev["grad"] + ev["backward"], kind
        assert model.rows["forward"] <= ev["forward"], kind


def test_attack_overhead_ops_are_counted_per_iteration():
    ops = E.attack_overhead_ops((3, 6))
    assert set(ops) == set(E._PASSES)
    assert all(v >= 0 for v in ops.values())
    assert ops["pgd"] > 0 and ops["fab-t"] > ops["pgd"]  # FAB's hyperplane projection sorts and scatters


def test_chapter4_plan_uses_the_full_profile_budgets():
    from marginlab import differential as D

    with E.full_profile():
        cfg = D.cifar_config()
    ev = E.chapter4_eval()
    assert [m.label for m in ev.models] == ["ce", "eq7"]
    n_eps = sum(e > 0 for e in cfg.epsilons)
    per_eps = cfg.pgd_steps * 2 + cfg.strong_steps * cfg.strong_restarts + 1 + (101 + 101 + 100)  # K = 2: 1 target
    n = cfg.n_attack_train + cfg.n_attack_test
    want = n * n_eps * per_eps + n * cfg.unbounded_steps + cfg.n_cw * (cfg.deepfool_steps + cfg.cw_steps * cfg.cw_search)
    for m in ev.models:
        assert sum(p.evaluations()["grad"] for p in m.phases) == want
        assert m.cost.num_classes == 2
        assert m.seconds() > 0 and m.peak_bytes() > m.cost.param_bytes
    assert jobs.ASSUMED_GPU["seconds_per_op"] > 0


def test_lipschitz_chunks_each_points_samples_apart():
    p, _ = E.lipschitz("lip", 3, 10_000, 10, 4096)
    assert p.chunk_sizes() == [(4096, 6), (10_000 - 2 * 4096, 3)]
    assert p.evaluations() == {"grad": 30_000, "backward": 9 * 30_000, "forward": 0}
    q, _ = E.lipschitz("lip", 100, 256, 10, 4096)  # small sample counts: 16 points share a chunk
    assert q.chunk == 4096 and math.ceil(100 * 256 / q.chunk) == 7
