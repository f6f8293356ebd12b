"""Small statistics for reports: means with Student-t 95% confidence intervals over seeds."""
from __future__ import annotations

import math
from typing import Dict, Sequence

__all__ = ["t_critical_95", "mean_ci95"]

# Two-sided 95% quantiles t_{0.975, df} of Student's t distribution, df = 1..30 (standard tables).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_critical_95(df: int) -> float:
    """:math:`t_{0.975, df}`; the normal 1.960 beyond df = 30 would understate it by < 4%, so we
    use the df = 30 value there (conservative)."""
    if df < 1:
        raise ValueError(f"a confidence interval needs at least 2 values (df >= 1), got df = {df}")
    return _T975[min(df, 30) - 1]


def mean_ci95(values: Sequence[float]) -> Dict[str, float]:
    """Mean and the half-width of its 95% t-interval (``ci`` is NaN for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci": float("nan"), "n": n}
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"mean": mean, "ci": t_critical_95(n - 1) * math.sqrt(var / n), "n": n}
