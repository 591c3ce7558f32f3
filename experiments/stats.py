"""Summaries over seeds: mean, sample std, n, and t-intervals of paired differences.

A study runs every cell with the same seeds; a seed fixes the initialization and the data order,
so the per-seed difference between two methods removes what the seeds share. For n paired
values the interval is `mean(diff) +- t_{0.975, n-1} * std(diff, ddof=1) / sqrt(n)`.
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
