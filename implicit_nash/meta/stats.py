"""Small statistics for reports: means with Student-t 95% confidence intervals over seeds, and paired
comparisons of two rows (per seed, per test group) with Holm's rule across a table."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["t_critical_95", "mean_ci95", "paired_seeds", "paired_groups", "holm"]

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


# --- paired comparisons of two rows trained on the same seeds and tested on the same groups -------
#
# Every row of a reproduction trains seed s from the same initialisation and task stream
# (``torch.manual_seed(seed)``, task generator ``seed + 1``) and is tested on the same groups of test
# tasks, so a Nash-GBML row and its plain row form pairs twice: per seed and per test group.

def paired_seeds(a: Sequence[float], b: Sequence[float]) -> Dict[str, Any]:
    """Per-seed paired difference ``a - b`` (seeds in the same order in both).

    Returns the mean difference ``difference``, the half-width ``ci`` of its paired 95% Student-t
    interval, the paired t-test's two-sided ``p_t`` (``scipy.stats.ttest_rel``), and the exact
    sign-flip permutation test's two-sided ``p_sign_flip`` over all :math:`2^n` sign patterns of the
    differences (``scipy.stats.permutation_test``; exact, so valid at 5 seeds without normality, but its
    smallest possible value is :math:`2/2^n`, 0.0625 at 5 seeds), and ``n``.
    """
    import numpy as np
    from scipy import stats

    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_.shape != b_.shape or a_.ndim != 1:
        raise ValueError(f"paired values need two 1-d sequences of one length, got {a_.shape} and {b_.shape}")
    n = len(a_)
    if n < 2:
        raise ValueError(f"a paired comparison needs at least 2 pairs, got {n}")
    d = a_ - b_
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:  # identical differences: t is undefined (scipy warns); decide it by hand
        p_t = 1.0 if mean == 0.0 else 0.0
    else:
        p_t = float(stats.ttest_rel(a_, b_).pvalue)
    flip = stats.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), vectorized=True,
                                  permutation_type="samples", n_resamples=np.inf, alternative="two-sided")
    return {"difference": mean, "ci": float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n), "p_t": p_t,
            "p_sign_flip": float(flip.pvalue), "n": n}


def paired_groups(a, b, *, tail: Optional[float] = None, resamples: int = 10000, seed: int = 0) -> Dict[str, Any]:
    """Paired difference over test groups, pooled over seeds, with a bootstrap interval over groups.

    ``a`` and ``b`` are (seeds, groups) arrays of per-group test values of two rows. Each group's
    difference is averaged over seeds, ``d_g = mean_s (a[s, g] - b[s, g])``; the result is the mean of
    ``d_g`` over groups with a 95% BCa bootstrap interval (``scipy.stats.bootstrap``, ``resamples``
    resamples of the groups, a fixed ``seed``). The interval is over the test groups for these trained
    models: it measures how surely the difference holds across tasks, not across training runs (the
    per-seed comparison, :func:`paired_seeds`, does that).

    With ``tail`` (a fraction), only the ``ceil(tail * groups)`` groups with the largest value averaged
    over both rows and all seeds enter: the hardest tasks, a stable stand-in for the worst case (a
    maximum has no useful bootstrap). Ranking by both rows together favours neither.
    """
    import numpy as np
    from scipy import stats

    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_.shape != b_.shape or a_.ndim != 2:
        raise ValueError(f"per-group values need two (seeds, groups) arrays of one shape, got {a_.shape} and {b_.shape}")
    d = (a_ - b_).mean(axis=0)
    if tail is not None:
        if not 0 < tail <= 1:
            raise ValueError(f"tail must be a fraction in (0, 1], got {tail}")
        k = math.ceil(tail * d.size)
        hardest = np.argsort((a_ + b_).mean(axis=0), kind="stable")[-k:]
        d = d[hardest]
    mean = float(d.mean())
    if d.size < 2 or np.all(d == d[0]):  # no spread: the bootstrap distribution is a point
        low = high = mean
    else:
        res = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=resamples, method="BCa",
                              rng=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"difference": mean, "low": low, "high": high, "groups": int(d.size), "tail": tail}


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjustment of p-values for a family of tests (controls the family-wise error).

    The i-th smallest of m p-values becomes :math:`\\max_{j \\le i} \\min(1, (m - j + 1) p_{(j)})`;
    a test is rejected at level 0.05 when its adjusted value is below 0.05. NaN stays NaN (not tested)
    and does not count in m.
    """
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out
