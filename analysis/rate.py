r"""Check 1: PRGD's linear rate (Theorem C.3, eq. 39) and Malitsky's step-size condition.

On mu-strongly monotone, L-Lipschitz affine games with a strong rotational part, PRGD with a
constant step ``a < (sqrt(2) - 1)/L`` should satisfy
:math:`\|z_k - z^*\|^2 \le \gamma^k D^2`, :math:`\gamma = (1 - 2a\mu + \sqrt{1 + 4a^2\mu^2})/2`,
:math:`D = \|z_0 - z^*\|`. We run the library's own PRGD update, record the squared error of every
iterate, and report the largest ratio of the error to the bound and the fitted rate.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from implicit_nash import PRGD

from ._common import HOLDS, VIOLATED, Record, figure, quadratic_game, save, trajectory


def gamma(a: float, mu: float) -> float:
    return (1 - 2 * a * mu + math.sqrt(1 + 4 * a * a * mu * mu)) / 2


def _run(game, a, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(game.C.shape[1], generator=g, dtype=torch.float64)
    z_star = game.solution(theta).reshape(-1)
    z0 = z_star + torch.randn(z_star.shape, generator=g, dtype=torch.float64)
    zs = trajectory(PRGD(step_size=a, num_steps=steps), game.operator, z0.reshape(game.B, game.d), theta, steps)
    err = torch.stack([torch.sum((z - z_star) ** 2) for z in zs])
    return err, float(err[0])


def _fit_rate(err):
    k = torch.arange(err.numel(), dtype=torch.float64)
    keep = err > 1e-24 * err[0]  # above float64 round-off
    k, le = k[keep], torch.log(err[keep])
    tail = k >= k.max() / 3  # the asymptotic part
    k, le = k[tail], le[tail]
    slope = float(((k - k.mean()) * (le - le.mean())).sum() / ((k - k.mean()) ** 2).sum())
    return math.exp(slope)


def run(out: Path, quick: bool = False) -> Record:
    t0 = time.time()
    conds = [10.0, 100.0] if quick else [10.0, 100.0, 1000.0]
    fig, axes = figure(ncols=len(conds))
    rows = []
    worst_ratio = 0.0
    for j, cond in enumerate(conds):
        game = quadratic_game(B=4, d=5, cond=cond, skew=2.0, seed=j)
        a_max = (math.sqrt(2) - 1) / game.L
        for frac in (0.5, 0.9, 1.5):
            a = frac * a_max
            gam = gamma(a, game.mu)
            steps = int(min(60000, max(200, 2.2 * math.log(1e24) / -math.log(gam)))) if frac < 1 else 3000
            if quick:
                steps = min(steps, 20000)
            err, D2 = _run(game, a, steps)
            k = torch.arange(err.numel(), dtype=torch.float64)
            bound = D2 * gam ** k
            valid = err > 1e-26 * D2
            ratio = float((err[valid] / bound[valid]).max())
            fitted = _fit_rate(err) if bool(torch.isfinite(err).all()) and float(err[-1]) < float(err[0]) else float("nan")
            row = {"kappa": game.L / game.mu, "step_fraction_of_malitsky_bound": frac, "a": a, "gamma": gam,
                   "fitted_rate": fitted, "max_error_over_bound": ratio, "steps": steps,
                   "final_error_sq": float(err[-1]), "within_condition": frac < 1}
            rows.append(row)
            if frac < 1:
                worst_ratio = max(worst_ratio, ratio)
            ax = axes[0][j]
            ax.semilogy(k.numpy(), err.clamp_min(1e-300).numpy(), label=f"a = {frac:g} (√2−1)/L")
            if frac < 1:
                ax.semilogy(k.numpy(), bound.clamp_min(1e-300).numpy(), "--", lw=0.8,
                            label=f"γ^k D² (a = {frac:g} ·)")
        axes[0][j].set_title(f"κ = L/μ = {game.L / game.mu:.0f}", fontsize=9)
        axes[0][j].set_xlabel("iteration k")
        axes[0][j].set_ylabel("‖z_k − z*‖²")
        axes[0][j].set_ylim(1e-30, 1e4)
        axes[0][j].legend(fontsize=6)
    fig_name = save(fig, out, "prgd_rate")
    inside = [r for r in rows if r["within_condition"]]
    verdict = HOLDS if worst_ratio <= 1.0 + 1e-9 else VIOLATED
    faster = all(r["fitted_rate"] <= r["gamma"] for r in inside)
    outside = [r for r in rows if not r["within_condition"]]
    ratios = ", ".join(f"{r['fitted_rate'] / r['gamma']:.3f}" for r in inside)
    finals = ", ".join(f"{r['final_error_sq']:.2g}" for r in outside)
    expl = (f"Within Malitsky's condition a < (√2−1)/L, the largest ratio ‖z_k−z*‖²/(γ^k D²) over all iterates "
            f"and problems is {worst_ratio:.3g} ({'≤ 1: eq. 39 holds' if verdict == HOLDS else '> 1: eq. 39 is violated'}); "
            f"the fitted asymptotic rates are {'all' if faster else 'not all'} at most γ "
            f"(fitted/γ: {ratios}). "
            f"At 1.5× the step bound (outside the condition) the final squared errors are "
            f"{finals} after {outside[0]['steps']} steps "
            f"(the condition is sufficient, not necessary, when these are small).")
    return Record("prgd_rate", "PRGD linear rate (Theorem C.3, eq. 39)",
                  "‖z_k − z*‖² ≤ γ^k D², γ = (1 − 2aμ + √(1 + 4a²μ²))/2, for a < (√2 − 1)/L",
                  {"gamma": [r["gamma"] for r in inside]},
                  {"max_error_over_bound": worst_ratio, "rows": rows},
                  verdict, expl, {"problems": "affine games B=4, d=5, skew=2", "quick": quick},
                  fig_name, time.time() - t0)
