"""Paired statistics of the reproduction tables against hand-computed values and scipy's references."""
import itertools
import math

import numpy as np
import pytest
from scipy import stats

from implicit_nash.meta.stats import holm, paired_groups, paired_seeds


def test_paired_seeds_by_hand():
    # d = [1, 1, 1, 1, 1.5]: mean 1.1, sd sqrt(0.05), t = 1.1 / (sqrt(0.05) / sqrt(5)) = 11
    r = paired_seeds([1.0, 2.0, 3.0, 4.0, 5.5], [0.0, 1.0, 2.0, 3.0, 4.0])
    assert r["n"] == 5 and r["difference"] == pytest.approx(1.1)
    assert r["ci"] == pytest.approx(2.7764451 * math.sqrt(0.05) / math.sqrt(5), rel=1e-6)
    assert r["p_t"] == pytest.approx(2 * stats.t.sf(11.0, 4), rel=1e-9)
    # every difference positive: 2 of the 32 sign patterns are as extreme (all + and all -)
    assert r["p_sign_flip"] == pytest.approx(2 / 32)


def test_sign_flip_mixed_signs_by_hand():
    # |d| = 1, 2, 3 with sums over the 8 sign patterns 6, 4, 2, 0, 0, -2, -4, -6; observed sum 2
    r = paired_seeds([1.0, -2.0, 3.0], [0.0, 0.0, 0.0])
    assert r["p_sign_flip"] == pytest.approx(6 / 8)


def test_sign_flip_matches_enumeration():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=7), rng.normal(size=7)
    d = a - b
    flips = [abs(np.mean(np.array(s) * d)) for s in itertools.product((1, -1), repeat=7)]
    expected = np.mean([f >= abs(d.mean()) - 1e-12 for f in flips])
    r = paired_seeds(a, b)
    assert r["p_sign_flip"] == pytest.approx(expected)
    assert r["p_t"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)


def test_paired_seeds_degenerate_and_bad_input():
    assert paired_seeds([1.0, 2.0], [1.0, 2.0])["p_t"] == 1.0          # no difference at all
    assert paired_seeds([2.0, 3.0], [1.0, 2.0])["p_t"] == 0.0          # the same difference every time
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_seeds([1.0], [2.0])
    with pytest.raises(ValueError, match="one length"):
        paired_seeds([1.0, 2.0], [1.0, 2.0, 3.0])


def test_paired_groups_by_hand():
    a = np.array([[1.0, 5.0, 2.0, 9.0], [3.0, 5.0, 2.0, 7.0]])
    b = np.array([[0.0, 6.0, 2.0, 7.0], [0.0, 6.0, 2.0, 7.0]])
    # per-group differences averaged over seeds: [2, -1, 0, 1]
    r = paired_groups(a, b)
    assert r["difference"] == pytest.approx(0.5) and r["groups"] == 4
    assert r["low"] <= 0.5 <= r["high"]
    # the hardest half by both rows and both seeds: groups 3 (sum 30) and 1 (sum 22): d = [1, -1]
    t = paired_groups(a, b, tail=0.5)
    assert t["difference"] == pytest.approx(0.0) and t["groups"] == 2
    with pytest.raises(ValueError, match="tail"):
        paired_groups(a, b, tail=0.0)
    with pytest.raises(ValueError, match="one shape"):
        paired_groups(a, b[:, :3])


def test_paired_groups_interval_covers_like_the_normal_interval():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(5, 490))
    a = b + 0.2 + rng.normal(scale=0.5, size=(5, 490))
    d = (a - b).mean(axis=0)
    r = paired_groups(a, b)
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert r["difference"] == pytest.approx(d.mean())
    assert r["low"] == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert r["high"] == pytest.approx(d.mean() + half, abs=0.15 * half)
    # a fixed seed: the same interval twice
    assert paired_groups(a, b) == r


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): 4*0.005 = 0.02, 3*0.01 = 0.03, 2*0.03 = 0.06, max(0.06, 0.04)
    adj = holm([0.01, 0.04, 0.03, float("nan"), 0.005])
    assert adj[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adj[3]) and adj[4] == pytest.approx(0.02)
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_verdict_rule():
    from implicit_nash.reproduce import judge
    groups = lambda lo, hi: {"low": lo, "high": hi}  # noqa: E731
    assert judge({"difference": -1.0, "groups": groups(-2.0, -0.5)}, 0.01) == "better"
    assert judge({"difference": 1.0, "groups": groups(0.5, 2.0)}, 0.01) == "worse"
    # the groups' interval must exclude 0 on the same side as the seeds' difference
    assert judge({"difference": -1.0, "groups": groups(-2.0, 0.5)}, 0.01) == "no detectable difference"
    assert judge({"difference": -1.0, "groups": groups(0.1, 0.5)}, 0.01) == "no detectable difference"
    # the adjusted p-value decides first
    assert judge({"difference": -1.0, "groups": groups(-2.0, -0.5)}, 0.06) == "no detectable difference"
    # accuracy: higher is better
    assert judge({"difference": 1.0, "groups": groups(0.5, 2.0)}, 0.01, higher=True) == "better"
    # runs saved without per-group values: the seeds alone
    assert judge({"difference": -1.0}, 0.01) == "better"
