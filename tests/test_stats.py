"""Intervals: golden values, cross-checks with scipy, coverage of the true value, and bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from marginlab.stats import Estimate, bootstrap, bootstrap_paired, over_seeds, wilson


def test_estimate_formats_round_trips_and_scales():
    e = Estimate(0.9712, 0.9521, 0.9853, n=207)
    assert str(e) == "0.971 [0.952, 0.985]"
    assert str(e * 100) == "97.1 [95.2, 98.5]" and str(100 * e) == "97.1 [95.2, 98.5]"
    assert f"{e:.2f}" == "0.97 [0.95, 0.99]"
    assert str(Estimate(3.0, 3.0, 3.0, method="exact")) == "3.0 [3.0, 3.0]"
    neg = e.scaled(-1)
    assert (neg.low, neg.high) == pytest.approx((-0.9853, -0.9521))
    back = Estimate.from_dict(json.loads(json.dumps(e.to_dict())))
    assert back == e and e.contains(0.96) and not e.contains(0.99)


@pytest.mark.parametrize("kwargs, match", [
    (dict(value=1.0, low=2.0, high=1.0), "low"),
    (dict(value=math.nan, low=0.0, high=1.0), "numbers"),
    (dict(value=0.5, low=0.0, high=1.0, level=1.0), "level"),
    (dict(value=0.5, low=0.0, high=1.0, method="guess"), "method"),
])
def test_estimate_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Estimate(**kwargs)


def test_wilson_golden():
    # Wilson (1927) 95% interval for 8 of 10: the textbook (0.490, 0.943).
    e = wilson(8, 10)
    assert (e.value, e.low, e.high) == pytest.approx((0.8, 0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 20).low == 0.0 and wilson(20, 20).high == 1.0
    # Same as statsmodels' proportion_confint(method="wilson"), written out: centre ± half-width.
    z = sps.norm.ppf(0.975)
    p, n = 190 / 207, 207
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert (wilson(190, 207).low, wilson(190, 207).high) == pytest.approx((centre - half, centre + half))


def test_over_seeds_golden_t_interval():
    e = over_seeds([1.0, 2.0, 3.0])  # mean 2, s = 1, t_{0.975, 2} = 4.302653
    assert (e.value, e.low, e.high, e.n, e.method) == pytest.approx((2.0, 2 - 4.302653 / math.sqrt(3),
                                                                     2 + 4.302653 / math.sqrt(3), 3, "seeds"))
    with pytest.raises(ValueError, match="at least 3"):
        over_seeds([1.0, 2.0])


def test_bootstrap_matches_scipy_and_the_normal_approximation():
    x = (np.random.default_rng(1).random(207) < 0.9).astype(float)
    ours = bootstrap(x, n_boot=20000, seed=0)
    ref = sps.bootstrap((x,), np.mean, n_resamples=20000, method="percentile",
                        random_state=np.random.default_rng(0)).confidence_interval
    assert ours.value == pytest.approx(x.mean())
    # Both are Monte Carlo estimates of the same quantiles on the grid k/207: within a step or so.
    assert ours.low == pytest.approx(ref.low, abs=1.5 / 207) and ours.high == pytest.approx(ref.high, abs=1.5 / 207)
    se = math.sqrt(x.mean() * (1 - x.mean()) / 207)  # ±3 points at 207 examples, as issue 13 says
    assert ours.width == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_bootstrap_is_deterministic_and_takes_tensors_and_other_statistics():
    x = torch.arange(50, dtype=torch.float32) ** 1.5
    a, b = bootstrap(x, seed=3), bootstrap(x.numpy().tolist(), seed=3)
    assert a == b and a.n == 50
    med = bootstrap(x, statistic=np.median)
    assert med.value == pytest.approx(float(np.median(x.numpy()))) and med.low <= med.value <= med.high
    assert bootstrap(torch.tensor([True, False, True, True])).value == 0.75


@pytest.mark.parametrize("bad, match", [
    (np.ones((3, 2)), "1-D"), ([1.0], "at least 2"), ([1.0, math.nan], "NaN"), (["a", "b"], "numeric"),
])
def test_bootstrap_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        bootstrap(bad)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap([1.0, 2.0], n_boot=10)


def test_paired_difference_keeps_the_correlation():
    rng = np.random.default_rng(0)
    hard = rng.random(300) < 0.3
    a = (~hard | (rng.random(300) < 0.2)).astype(float)  # method A: also solves some hard examples
    b = (~hard).astype(float)
    d = bootstrap_paired(a, b)
    assert d.value == pytest.approx(a.mean() - b.mean()) and d.method == "bootstrap-paired"
    sep_a, sep_b = bootstrap(a), bootstrap(b)
    assert d.low > 0  # the paired interval excludes 0 ...
    assert sep_a.low < sep_b.high  # ... while the two separate intervals overlap
    with pytest.raises(ValueError, match="same examples"):
        bootstrap_paired(a, b[:-1])


def test_coverage_of_the_bootstrap_and_t_intervals():
    """Over many simulated test sets, the 95% intervals contain the true value about 95% of the time."""
    rng = np.random.default_rng(123)
    p, n, reps = 0.85, 207, 300
    hits = sum(bootstrap(rng.random(n) < p, n_boot=1000, seed=r).contains(p) for r in range(reps))
    assert 0.90 <= hits / reps <= 0.99
    hits = sum(over_seeds(rng.normal(5.0, 2.0, size=3)).contains(5.0) for _ in range(2000))
    assert 0.93 <= hits / 2000 <= 0.97
    hits = sum(wilson(int((rng.random(n) < p).sum()), n).contains(p) for _ in range(2000))
    assert 0.93 <= hits / 2000 <= 0.97


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=60),
       st.floats(-1e3, 1e3), st.sampled_from([0.5, 0.8, 0.95]))
def test_bootstrap_properties(values, shift, level):
    x = np.array(values)
    e = bootstrap(x, n_boot=200, level=level)
    # The mean of a resample lies between the smallest and the largest value.
    assert x.min() - 1e-9 <= e.low <= e.high <= x.max() + 1e-9
    # Shifting the data shifts the interval (same resamples).
    s = bootstrap(x + shift, n_boot=200, level=level)
    assert (s.low, s.high) == pytest.approx((e.low + shift, e.high + shift), abs=1e-6 * (1 + abs(shift)))
    # A higher level gives a nested, wider interval on the same resamples.
    w = bootstrap(x, n_boot=200, level=0.99)
    assert w.low <= e.low + 1e-12 and e.high <= w.high + 1e-12
    # A method compared with itself differs by exactly 0.
    d = bootstrap_paired(x, x, n_boot=200)
    assert d.low == d.high == d.value == 0.0
