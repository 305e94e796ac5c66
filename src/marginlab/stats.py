"""Intervals for the numbers that carry a verdict.

207 CIFAR-10 test images give an accuracy with about ±3 points of sampling noise, so
a verdict compares intervals, not points. An :class:`Estimate` is a value with a
two-sided interval; it is made by

* :func:`bootstrap` — percentile bootstrap over test examples (Efron & Tibshirani 1993,
  ch. 13): resample the examples with replacement, recompute the statistic, take the
  ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles;
* :func:`bootstrap_paired` — the same for the difference of two methods evaluated on the
  same examples (one resample of indices serves both, so their correlation is kept);
* :func:`over_seeds` — Student-t interval over independent training seeds (≥ 3);
* :func:`wilson` — Wilson (1927) score interval for a proportion ``k / n``.

The scorecard's rules (:mod:`marginlab.scorecard`) accept an :class:`Estimate` wherever
they accept a number.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Estimate", "bootstrap", "bootstrap_paired", "over_seeds", "wilson"]

METHODS = ("bootstrap", "bootstrap-paired", "seeds", "wilson", "exact")
# Resampled values held at once by the vectorised bootstrap (float64: 8 bytes each).
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Estimate:
    """A value with a two-sided interval ``[low, high]`` at confidence ``level``.

    ``method`` names how the interval was made (one of ``METHODS``) and ``n`` how many
    examples (bootstrap, wilson) or seeds (seeds) it rests on.
    """

    value: float
    low: float
    high: float
    level: float = 0.95
    method: str = "bootstrap"
    n: int | None = None

    def __post_init__(self) -> None:
        for name in ("value", "low", "high", "level"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.n is not None:
            object.__setattr__(self, "n", int(self.n))
        if any(math.isnan(v) for v in (self.value, self.low, self.high)):
            raise ValueError(f"Estimate needs numbers, got value={self.value}, low={self.low}, high={self.high}")
        if self.low > self.high:
            raise ValueError(f"Estimate low={self.low} is above high={self.high}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    @property
    def width(self) -> float:
        return self.high - self.low

    def contains(self, x: float) -> bool:
        """Whether ``x`` lies in the closed interval."""
        return self.low <= x <= self.high

    def scaled(self, factor: float) -> Estimate:
        """The same estimate in other units, e.g. ``acc.scaled(100)`` for percent."""
        lo, hi = self.low * factor, self.high * factor
        return Estimate(self.value * factor, min(lo, hi), max(lo, hi), self.level, self.method, self.n)

    def __mul__(self, factor: float) -> Estimate:
        if not isinstance(factor, (int, float, np.integer, np.floating)) or isinstance(factor, bool):
            return NotImplemented
        return self.scaled(float(factor))

    __rmul__ = __mul__

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Estimate:
        return cls(**{k: d[k] for k in ("value", "low", "high", "level", "method", "n") if k in d})

    @staticmethod
    def is_estimate_dict(d: Any) -> bool:
        """Whether ``d`` is the stored form of an estimate (as written by :meth:`to_dict`)."""
        return isinstance(d, dict) and {"value", "low", "high"} <= set(d)

    def __format__(self, spec: str) -> str:
        if spec:
            return f"{format(self.value, spec)} [{format(self.low, spec)}, {format(self.high, spec)}]"
        return str(self)

    def __str__(self) -> str:
        """``"97.1 [95.2, 98.5]"``: decimals chosen to show two significant digits of the width."""
        return f"{self:.{_decimals(self)}f}"


def _decimals(e: Estimate) -> int:
    scale = e.width if e.width > 0 else abs(e.value)
    if scale == 0 or not math.isfinite(scale):
        return 0
    return int(min(6, max(0, 1 - math.floor(math.log10(scale)))))


def _as_1d(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype == bool:
        arr = arr.astype(np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one value per example (1-D), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 100:
        raise ValueError(f"n_boot must be an int >= 100, got {n_boot!r}")


def _resampled(arrays: Sequence[np.ndarray], statistic: Callable[..., Any], n_boot: int,
               seed: int) -> np.ndarray:
    """``statistic`` of each array on ``n_boot`` shared resamples of the example indices."""
    n = arrays[0].shape[0]
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)
    out = []
    for start in range(0, n_boot, rows):
        idx = rng.integers(0, n, size=(min(rows, n_boot - start), n))
        stats = [np.asarray(statistic(a[idx], axis=-1), dtype=np.float64) for a in arrays]
        out.append(stats[0] if len(stats) == 1 else stats[0] - stats[1])
    return np.concatenate(out)


def _percentile(boot: np.ndarray, value: float, level: float, method: str, n: int) -> Estimate:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return Estimate(value, float(low), float(high), level, method, n)


def bootstrap(per_example: Any, statistic: Callable[..., Any] = np.mean, n_boot: int = 2000,
              level: float = 0.95, seed: int = 0) -> Estimate:
    """Percentile-bootstrap interval of ``statistic`` over examples (Efron & Tibshirani 1993).

    ``per_example``: one number per test example (e.g. 1.0 where the attack failed),
    a numpy array, torch tensor or list. ``statistic(values, axis=-1)`` must reduce the
    last axis, as ``np.mean`` and ``np.median`` do. The value is the statistic of the
    sample itself; the same ``seed`` gives the same interval.
    """
    x = _as_1d(per_example, "per_example")
    if x.shape[0] < 2:
        raise ValueError(f"per_example needs at least 2 examples, got {x.shape[0]}")
    _check(level, n_boot)
    boot = _resampled([x], statistic, int(n_boot), seed)
    return _percentile(boot, float(statistic(x, axis=-1)), level, "bootstrap", x.shape[0])


def bootstrap_paired(a: Any, b: Any, statistic: Callable[..., Any] = np.mean, n_boot: int = 2000,
                     level: float = 0.95, seed: int = 0) -> Estimate:
    """Interval of ``statistic(a) - statistic(b)`` for two methods scored on the same examples.

    Each resample draws one set of example indices for both, so an example that is hard
    for both methods stays hard for both: the interval of the difference is narrower than
    the two separate intervals suggest when the methods agree on most examples.
    """
    xa, xb = _as_1d(a, "a"), _as_1d(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must score the same examples, got lengths {xa.shape[0]} and {xb.shape[0]}")
    if xa.shape[0] < 2:
        raise ValueError(f"a and b need at least 2 examples, got {xa.shape[0]}")
    _check(level, n_boot)
    boot = _resampled([xa, xb], statistic, int(n_boot), seed)
    value = float(statistic(xa, axis=-1)) - float(statistic(xb, axis=-1))
    return _percentile(boot, value, level, "bootstrap-paired", xa.shape[0])


def over_seeds(values: Any, level: float = 0.95) -> Estimate:
    """Student-t interval of the mean over independent seeds: mean ± t_{(1+level)/2, k-1} s / √k.

    Needs at least 3 values: with two the t quantile (12.7 at 95%) makes the interval
    meaningless, and with one there is no spread at all.
    """
    from scipy import stats as sps

    x = _as_1d(values, "values")
    if x.shape[0] < 3:
        raise ValueError(f"over_seeds needs values from at least 3 seeds, got {x.shape[0]}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    k = x.shape[0]
    mean = float(x.mean())
    half = float(sps.t.ppf((1.0 + level) / 2.0, k - 1) * x.std(ddof=1) / math.sqrt(k))
    return Estimate(mean, mean - half, mean + half, level, "seeds", k)


def wilson(k: int, n: int, level: float = 0.95) -> Estimate:
    """Wilson (1927) score interval for a proportion ``k / n`` (good near 0 and 1, unlike Wald)."""
    from scipy import stats as sps

    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(k, (int, np.integer)) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, n={n}], got {k!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    z = float(sps.norm.ppf((1.0 + level) / 2.0))
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), level, "wilson", int(n))
