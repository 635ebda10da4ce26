"""Statistics across runs: the mean, Student's t interval, and the paired difference of two arms.

Pure Python (no scipy): the t quantile is found by bisection on the t distribution's CDF, written with the
regularised incomplete beta function (a Lentz continued fraction, Numerical Recipes 6.4). It matches the
printed tables to their 3 decimals for every degree of freedom (tests/test_experiment.py).

Runs of an experiment are few (3-10 seeds), so the interval of a mean is the t interval,
mean +- t_{(1+c)/2, n-1} * sd / sqrt(n), and two arms that share their random draws (same seed: same noises,
times and data order) are compared *paired*: the interval is that of the per-seed differences, which removes
the variation the arms share.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Interval", "t_cdf", "t_quantile", "t_interval", "paired_differences", "paired_interval"]

_EPS = 1e-15
_TINY = 1e-300


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converging fast for x < (a + 1) / (a + b + 2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if not (a > 0 and b > 0) or not 0.0 <= x <= 1.0:
        raise ValueError(f"I_x(a, b) needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` > 0 degrees of freedom."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p quantile of Student's t with `df` degrees of freedom (t_quantile(0.975, 4) = 2.776...)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:  # bracket the root; the CDF is increasing
        low, high = high, high * 2.0
    for _ in range(200):  # bisection to double precision
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided t interval over n values; low/high are None below 2 values, mean below 1."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    sd: float | None
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self, digits: int = 3) -> str:
        """"0.720 [0.691, 0.750]" (n >= 2), "0.720" (n = 1), "-" (no value)."""
        if self.mean is None:
            return "-"
        fmt = f"{{:.{digits}f}}"
        if self.low is None:
            return fmt.format(self.mean)
        return f"{fmt.format(self.mean)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


def _clean(values: Iterable[float | None]) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"non-finite value {v} in a t interval; drop the run or fix its metric")
        out.append(v)
    return out


def t_interval(values: Iterable[float | None], confidence: float = 0.95) -> Interval:
    """Mean and two-sided `confidence` t interval of the values (None entries are left out)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    xs = _clean(values)
    n = len(xs)
    if n == 0:
        return Interval(None, None, None, 0, None, confidence)
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(mean, None, None, 1, None, confidence)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd, confidence)


def paired_differences(a: Mapping[Any, float | None], b: Mapping[Any, float | None]) -> dict[Any, float]:
    """a[k] - b[k] for every key (e.g. seed) present, with a value, in both; in sorted key order."""
    return {k: float(a[k]) - float(b[k]) for k in sorted(set(a) & set(b)) if a[k] is not None and b[k] is not None}


def paired_interval(a: Mapping[Any, float | None], b: Mapping[Any, float | None], confidence: float = 0.95
                    ) -> tuple[dict[Any, float], Interval]:
    """The per-key differences a - b and the t interval of their mean (the paired comparison)."""
    diffs = paired_differences(a, b)
    return diffs, t_interval(diffs.values(), confidence)
