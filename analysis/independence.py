r"""Check 5: order and initial-point independence (Theorem 3.3, Theorem D.10).

On a strongly monotone game the equilibrium is unique (Lemma B.3), so Jacobi (simultaneous),
Gauss-Seidel in cyclic, reverse and random player orders, PRGD and extragradient, each from several
random initial points, must reach the same equilibrium and the same hypergradient; and the outer
loop (Algorithm 1, gradient descent on a strongly convex meta-objective) must reach the same
meta-solution from different initial meta-parameters whichever inner solver it uses.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

import implicit_nash as inn

from ._common import HOLDS, VIOLATED, Record, figure, quadratic_game, save

TOL = 1e-8


def run(out: Path, quick: bool = False) -> Record:
    t0 = time.time()
    game = quadratic_game(B=4, d=3, p=2, cond=4.0, skew=0.5, seed=5)
    safe = game.mu / game.L ** 2
    solvers = {"Jacobi (simultaneous)": inn.SimultaneousGradient(step_size=safe, rtol=1e-12, max_steps=200000),
               "Gauss-Seidel cyclic": inn.GaussSeidel(step_size=safe, order="cyclic", rtol=1e-12, max_steps=200000),
               "Gauss-Seidel reverse": inn.GaussSeidel(step_size=safe, order="reverse", rtol=1e-12, max_steps=200000),
               "Gauss-Seidel random": inn.GaussSeidel(step_size=safe, order="random", seed=3, rtol=1e-12,
                                                      max_steps=200000),
               "PRGD": inn.PRGD(rtol=1e-12), "Extragradient": inn.Extragradient(step_size=0.5 / game.L, rtol=1e-12)}
    starts = 2 if quick else 5
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(2, generator=gen, dtype=torch.float64)
    target = torch.randn(game.B, game.d, generator=gen, dtype=torch.float64)
    z_star = game.solution(theta)
    sols, grads, rows = [], [], []
    for (name, solver), s in itertools.product(solvers.items(), range(starts)):
        z0 = 3 * torch.randn(game.B, game.d, generator=gen, dtype=torch.float64)
        th = theta.clone().requires_grad_(True)
        z = inn.solve_vi(game.operator, z0, th, solver=solver)
        (g,) = torch.autograd.grad(0.5 * ((z - target) ** 2).sum(), th)
        sols.append(z.detach())
        grads.append(g)
        rows.append({"solver": name, "start": s, "error_to_closed_form": float(torch.linalg.vector_norm(z.detach() - z_star))})
    spread_z = max(float(torch.linalg.vector_norm(a - b)) for a, b in itertools.combinations(sols, 2))
    spread_g = max(float(torch.linalg.vector_norm(a - b)) for a, b in itertools.combinations(grads, 2))
    # the outer level: meta-objective 1/2|z*(theta) - t|^2 + rho/2 |theta|^2, gradient descent from
    # several theta0 with different inner solvers; closed-form minimiser for reference
    rho = 0.1
    J = game.jacobian()
    zbar = game.solution(torch.zeros(2)).reshape(-1)
    H = J.T @ J + rho * torch.eye(2)
    theta_star = torch.linalg.solve(H, J.T @ (target.reshape(-1) - zbar))
    beta = 1.0 / float(torch.linalg.eigvalsh(H).max())
    outer_iters = 150 if quick else 400
    finals = []
    fig, axes = figure(ncols=2)
    for name in (["PRGD", "Gauss-Seidel random"] if quick else ["PRGD", "Gauss-Seidel random", "Jacobi (simultaneous)"]):
        for s in range(1 if quick else 2):
            th = 5 * torch.randn(2, generator=gen, dtype=torch.float64)
            errs = []
            z = torch.zeros(game.B, game.d)
            for _ in range(outer_iters):
                th = th.detach().requires_grad_(True)
                # warm start from the previous equilibrium (the implicit gradient does not depend on it)
                z = inn.solve_vi(game.operator, z.detach(), th, solver=solvers[name])
                loss = 0.5 * ((z - target) ** 2).sum() + 0.5 * rho * (th ** 2).sum()
                (g,) = torch.autograd.grad(loss, th)
                th = th - beta * g
                errs.append(float(torch.linalg.vector_norm(th.detach() - theta_star)))
            finals.append(th.detach())
            axes[0][1].semilogy(errs, lw=1, label=f"{name}, θ0 #{s}")
    spread_theta = max(float(torch.linalg.vector_norm(a - b)) for a, b in itertools.combinations(finals, 2))
    err_theta = max(float(torch.linalg.vector_norm(f - theta_star)) for f in finals)
    axes[0][0].bar(range(len(rows)), [max(r["error_to_closed_form"], 1e-17) for r in rows])
    axes[0][0].set_yscale("log")
    axes[0][0].set_xlabel("solver × initial point")
    axes[0][0].set_ylabel("‖φ̂ − φ*‖ (closed form)")
    axes[0][1].set_xlabel("outer iteration (Algorithm 1, β = 1/L_outer)")
    axes[0][1].set_ylabel("‖θ_t − θ*‖")
    axes[0][1].legend(fontsize=6)
    fig_name = save(fig, out, "order_independence")
    ok = spread_z <= TOL and spread_g <= TOL and spread_theta <= 1e-6 and err_theta <= 1e-6
    expl = (f"{len(sols)} solves ({len(solvers)} solvers/orders × {starts} random initial points): largest distance "
            f"between two equilibria {spread_z:.2g}, between two hypergradients {spread_g:.2g}. Outer loop from "
            f"{len(finals)} initial meta-parameters: largest distance between final meta-parameters "
            f"{spread_theta:.2g}, largest distance to the closed-form minimiser {err_theta:.2g}.")
    return Record("order_independence", "Order and initial-point independence (Theorem 3.3)",
                  "every player order and initial point reaches the same equilibrium and meta-solution",
                  {"spread_at_most": TOL}, {"equilibrium_spread": spread_z, "hypergradient_spread": spread_g,
                                           "meta_solution_spread": spread_theta, "meta_solution_error": err_theta,
                                           "rows": rows},
                  HOLDS if ok else VIOLATED, expl, {"quick": quick}, fig_name, time.time() - t0)
