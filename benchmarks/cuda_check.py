"""CUDA correctness check of the core layer (run on a GPU machine; not part of the test suite).

Usage: ``python benchmarks/cuda_check.py [--out DIR]``.  Runs, on ``cuda`` in float64, the same
identities the CPU tests check (equilibrium against the closed form, implicit Jacobian against
-A^{-1}C, constrained games, the O(B) aggregative pseudo-gradient against the O(B^2) fallback,
unrolled against implicit) and checks every tensor stays on the GPU.  Writes
``cuda_check.json`` and ``cuda_check.md`` into ``--out`` (default ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import implicit_nash as inn  # noqa: E402
from zoo import matrix_game_2x2, matrix_game_2x2_solution, quadratic_game  # noqa: E402


def to(game, device):
    for name in ("A", "C", "b"):
        setattr(game, name, getattr(game, name).to(device))
    return game


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--device", default="cuda", help="'cpu' dry-runs the script itself")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        return 1
    dev = torch.device(args.device)
    torch.set_default_dtype(torch.float64)
    gen = torch.Generator().manual_seed(0)
    checks = []

    def record(name, value, limit):
        ok = bool(value <= limit)
        checks.append({"check": name, "value": value, "limit": limit, "ok": ok})
        print(f"{'ok ' if ok else 'BAD'} {name}: {value:.3e} (limit {limit:g})")

    tight = inn.PRGD(rtol=1e-13)
    for coupling in (0.0, 1.0):
        game = to(quadratic_game(B=6, d=4, p=3, cond=50.0, coupling=coupling, gen=gen), dev)
        theta = torch.randn(3, generator=gen).to(dev)
        sol = inn.nash_solution(game.costs, torch.zeros(6, 4, device=dev), theta, solver=tight)
        assert sol.value.device.type == dev.type
        record(f"equilibrium vs closed form (coupling {coupling})", rel(sol.value, game.solution(theta)), 1e-10)
        J = torch.autograd.functional.jacobian(
            lambda t: inn.nash_equilibrium(game.costs, torch.zeros(6, 4, device=dev), t, solver=tight), theta)
        assert J.device.type == dev.type
        record(f"implicit Jacobian vs -A^-1 C (coupling {coupling})", rel(J, game.jacobian()), 1e-8)
        for ls in (inn.BiCGSTAB(rtol=1e-12), inn.NormalCG(rtol=1e-12), inn.Dense()):
            Jl = torch.autograd.functional.jacobian(
                lambda t: inn.nash_equilibrium(game.costs, torch.zeros(6, 4, device=dev), t, solver=tight,
                                               adjoint=inn.Implicit(linear_solver=ls)), theta)
            record(f"Jacobian with {type(ls).__name__} (coupling {coupling})", rel(Jl, game.jacobian()), 1e-8)

    game = to(quadratic_game(B=3, d=3, p=2, cond=10.0, coupling=1.0, gen=gen), dev)
    theta = torch.randn(2, generator=gen).to(dev)
    box = inn.Box(-0.3, 0.3)
    phi = inn.nash_equilibrium(game.costs, torch.zeros(3, 3, device=dev), theta, solver=tight, constraint=box)
    x = phi.reshape(-1)
    free = x.abs() < 0.3 - 1e-9
    J_ref = torch.zeros(9, 2, device=dev)
    J_ref[free] = -torch.linalg.solve(game.A[free][:, free], game.C[free])
    J = torch.autograd.functional.jacobian(
        lambda t: inn.nash_equilibrium(game.costs, torch.zeros(3, 3, device=dev), t, solver=tight, constraint=box),
        theta).reshape(9, 2)
    record(f"box game Jacobian with {int((~free).sum())} active of 9", rel(J, J_ref), 1e-8)

    th = torch.tensor([3.0, -1.0, -2.0, 1.0], device=dev)
    Jm = torch.autograd.functional.jacobian(
        lambda t: inn.nash_equilibrium(matrix_game_2x2(t), torch.full((2, 2), 0.5, device=dev), t, solver=tight,
                                       constraint=inn.Simplex()), th)
    record("matrix game on simplices, Jacobian", rel(Jm, torch.autograd.functional.jacobian(matrix_game_2x2_solution, th)), 1e-8)

    B, d = 16, 5
    data = torch.randn(B, d, generator=gen).to(dev)
    agg = inn.AggregativeGame(
        local=lambda p, t, y: 0.5 * ((p - y) ** 2).sum() + 0.5 * ((p - t) ** 2).sum(),
        contribution=lambda p, t: ((p - t) ** 2).sum(),
        coupling=lambda p, t, s, y: 0.1 * B * ((p - t) ** 2).sum() / (1e-3 + s), data=(data,))
    phi = torch.randn(B, d, generator=gen).to(dev)
    t = torch.randn(d, generator=gen).to(dev)
    record("aggregative vs CostGame pseudo-gradient",
           rel(agg.pseudo_gradient(phi, t), inn.CostGame(agg.costs).pseudo_gradient(phi, t)), 1e-12)

    game = to(quadratic_game(B=3, d=2, p=2, cond=5.0, coupling=0.5, gen=gen), dev)
    theta = torch.randn(2, generator=gen).to(dev).requires_grad_(True)
    solver = inn.SimultaneousGradient(step_size=game.mu / game.L ** 2, num_steps=3000)
    gu = torch.autograd.grad(inn.nash_equilibrium(game.costs, torch.zeros(3, 2, device=dev), theta, solver=solver,
                                                  adjoint=inn.Unrolled()).sum(), theta)[0]
    gi = torch.autograd.grad(inn.nash_equilibrium(game.costs, torch.zeros(3, 2, device=dev), theta,
                                                  solver=solver).sum(), theta)[0]
    record("unrolled vs implicit on a long contraction", rel(gu, gi), 1e-8)

    # float32 on CUDA
    game32 = to(quadratic_game(B=4, d=3, p=2, cond=10.0, coupling=1.0, gen=gen, dtype=torch.float32), dev)
    th32 = torch.randn(2, generator=gen).float().to(dev)
    J32 = torch.autograd.functional.jacobian(
        lambda t: inn.nash_equilibrium(game32.costs, torch.zeros(4, 3, device=dev, dtype=torch.float32), t), th32)
    record("float32 Jacobian vs closed form", rel(J32, game32.jacobian()), 1e-3)

    t0 = time.perf_counter()
    ok = all(c["ok"] for c in checks)
    os.makedirs(args.out, exist_ok=True)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    env = {"torch": torch.__version__, "device": name, "python": sys.version.split()[0]}
    stem = "cuda_check" if dev.type == "cuda" else "cuda_check_dryrun_cpu"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"environment": env, "checks": checks, "all_ok": ok}, f, indent=2)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write("# CUDA correctness check of the core layer\n\n")
        f.write("Command: `python benchmarks/cuda_check.py`\n\n")
        f.write(f"Environment: torch {env['torch']}, {env['device']}, Python {env['python']}, float64 "
                f"unless stated\n\n| check | measured | limit | verdict |\n|---|---|---|---|\n")
        for c in checks:
            f.write(f"| {c['check']} | {c['value']:.2e} | {c['limit']:g} | {'ok' if c['ok'] else 'FAILED'} |\n")
        f.write(f"\nAll checks pass: {ok}\n")
    print("all ok" if ok else "SOME CHECKS FAILED", f"({time.perf_counter() - t0:.1f}s to write)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
