"""Summaries over seeds: mean, sample std, n, t-intervals and t-tests of paired differences.

A study runs every cell with the same seeds; a seed fixes the initialization and the data order,
so the per-seed difference between two methods removes what the seeds share. For n paired
values the interval is `mean(diff) +- t_{0.975, n-1} * std(diff, ddof=1) / sqrt(n)`, and the
paired t-test's statistic `mean(diff) / (std(diff, ddof=1) / sqrt(n))` with n - 1 degrees of
freedom gives a two-sided p-value. Several comparisons are adjusted together with Holm's
step-down method (Holm 1979), which keeps the chance of any false "significant" among them
below the level.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from scipy import stats as scipy_stats


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof=1; nan for n < 2) and count of some values."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.2f} +- {self.std:.2f} (n={self.n})"


@dataclasses.dataclass(frozen=True)
class Difference:
    """The mean of paired differences `a - b` with its two-sided t-interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0."""
        return self.low > 0 or self.high < 0

    def columns(self, metric: str) -> dict[str, float | int | bool]:
        """The report's columns for `metric`: its mean, interval, significance and `n`."""
        return {
            metric: self.mean,
            f"{metric}_low": self.low,
            f"{metric}_high": self.high,
            f"{metric}_significant": self.significant,
            "n": self.n,
        }

    def __str__(self) -> str:
        mark = " *" if self.significant else ""
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]{mark}"


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("summarize needs at least one value")
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return Summary(mean, std, n)


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student-t critical value, e.g. 4.303 for 95% and 2 degrees of freedom."""
    return float(scipy_stats.t.ppf(0.5 + confidence / 2, dof))


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95
) -> Difference | None:
    """`a - b` over the seeds both have, or None when fewer than two seeds are shared."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    summary = summarize(diffs)
    half = t_quantile(confidence, summary.n - 1) * summary.std / math.sqrt(summary.n)
    return Difference(summary.mean, summary.mean - half, summary.mean + half, summary.n, confidence)


@dataclasses.dataclass(frozen=True)
class TTest:
    """A two-sided paired t-test of `a - b` against 0."""

    mean: float
    t: float
    p: float
    n: int


def paired_t_test(a: Mapping[int, float], b: Mapping[int, float]) -> TTest | None:
    """The paired t-test of `a - b` over the seeds both have; None for fewer than two.

    Differences that are all equal have no spread: p is 0 when they are not 0, and 1 when
    they are.
    """
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    summary = summarize([a[s] - b[s] for s in seeds])
    if summary.std == 0:
        t = math.copysign(math.inf, summary.mean) if summary.mean else 0.0
        return TTest(summary.mean, t, 0.0 if summary.mean else 1.0, summary.n)
    t = summary.mean / (summary.std / math.sqrt(summary.n))
    p = 2 * float(scipy_stats.t.sf(abs(t), summary.n - 1))
    return TTest(summary.mean, t, p, summary.n)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given.

    With the m p-values sorted increasingly, `p_(1) <= ... <= p_(m)`, the k-th adjusted value
    is `max_{j <= k} min(1, (m - j + 1) p_(j))`; a comparison is significant at level alpha
    when its adjusted p-value is below alpha.
    """
    m = len(p_values)
    for p in p_values:
        if not 0 <= p <= 1:
            raise ValueError(f"holm: p-values must lie in [0, 1], got {p}")
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
