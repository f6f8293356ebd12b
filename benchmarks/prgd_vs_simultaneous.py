"""PRGD vs simultaneous gradient play vs extragradient on rotational strongly monotone games.

The games are affine variational inequalities ``F(z) = A z + c`` in ``n = 200`` dimensions with
``A = S + K``: ``S`` symmetric positive definite with eigenvalues log-spaced in ``[1, kappa]`` and
``K`` skew-symmetric with ``||K||_2 = skew_ratio * ||S||_2`` (strong rotational, bilinear-like
coupling).  The symmetric part of ``A`` is ``S``, so ``F`` is ``mu``-strongly monotone with
``mu = 1``, and ``L = ||A||_2``.

Compared, all through ``implicit_nash.solve_vi`` from ``z0 = 0`` with ``rtol = 1e-8`` and a step cap
(the library stops when the natural residual is at most ``rtol * max(r0, ||z_k||)``, ``r0`` the
initial residual; the report gives ``||z*|| / r0`` so that one can see which term applies, and
re-measures the residual at the returned point relative to ``r0``):

* ``PRGD()``: projected reflected gradient with the adaptive (linesearch) step, the default;
* ``PRGD(step_size=0.9 (sqrt 2 - 1) / L)``: constant step inside Malitsky's bound;
* ``SimultaneousGradient(step_size=mu / L^2)``: the largest step for which the classical
  contraction bound of simultaneous gradient play holds;
* ``SimultaneousGradient(step_size=1 / L)``: a natural but unsafe step (rotation makes it diverge);
* ``Extragradient(step_size=0.9 / L)``.

Reported: status, steps, evaluations of ``F``, wall time (median over repetitions), the residual
verified independently at the returned point, and the error to the exact solution; a PNG plots
the residual histories.

Usage::

    python benchmarks/prgd_vs_simultaneous.py [--quick]
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from typing import Any, Dict, List

import _common
from _common import fmt, median

_common.ensure_importable()

import torch  # noqa: E402

import implicit_nash  # noqa: E402

NAME = "prgd_vs_simultaneous"
BASELINE = "PRGD() adaptive"


def make_game(n: int, kappa: float, skew_ratio: float, generator: torch.Generator) -> Dict[str, Any]:
    """An affine strongly monotone VI ``F(z) = A z + c`` with ``A = S + K``.

    Args:
        n: dimension.
        kappa: condition number of the symmetric part ``S`` (eigenvalues log-spaced in [1, kappa]).
        skew_ratio: ``||K||_2 / ||S||_2`` for the skew-symmetric part ``K``.
        generator: random generator (seeded by the caller).

    Returns:
        ``A``, ``c``, the exact solution ``z_star``, ``mu`` (strong monotonicity modulus, the
        smallest eigenvalue of the symmetric part) and ``L = ||A||_2``.
    """
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0.0, math.log10(kappa), n, dtype=torch.float64)
    s = q @ torch.diag(eigenvalues) @ q.T
    s = 0.5 * (s + s.T)
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    k = g - g.T
    k = k * (skew_ratio * float(torch.linalg.matrix_norm(s, ord=2)) / float(torch.linalg.matrix_norm(k, ord=2)))
    a = s + k
    c = torch.randn(n, generator=generator, dtype=torch.float64)
    mu = float(torch.linalg.eigvalsh(0.5 * (a + a.T)).min())
    lipschitz = float(torch.linalg.matrix_norm(a, ord=2))
    z_star = torch.linalg.solve(a, -c)
    return {"A": a, "c": c, "z_star": z_star, "mu": mu, "L": lipschitz,
            "z_star_over_r0": float(torch.linalg.vector_norm(z_star) / torch.linalg.vector_norm(c)),
            "skew_norm": float(torch.linalg.matrix_norm(k, ord=2)),
            "sym_norm": float(torch.linalg.matrix_norm(s, ord=2))}


def solvers_for(mu: float, lipschitz: float, rtol: float, max_steps: int) -> Dict[str, Any]:
    """The five solver configurations, keyed by a display name."""
    common = dict(rtol=rtol, max_steps=max_steps)
    return {
        BASELINE: implicit_nash.PRGD(**common),
        "PRGD const 0.9(sqrt2-1)/L": implicit_nash.PRGD(step_size=0.9 * (math.sqrt(2) - 1) / lipschitz, **common),
        "SimGD mu/L^2": implicit_nash.SimultaneousGradient(step_size=mu / lipschitz ** 2, **common),
        "SimGD 1/L": implicit_nash.SimultaneousGradient(step_size=1.0 / lipschitz, **common),
        "Extragradient 0.9/L": implicit_nash.Extragradient(step_size=0.9 / lipschitz, **common),
    }


def run_solver(game: Dict[str, Any], solver) -> Dict[str, Any]:
    """Solve once with ``vi_solution(..., throw=False)`` and time it."""
    a, c = game["A"], game["c"]
    z0 = torch.zeros_like(c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", implicit_nash.ConvergenceWarning)
        t0 = time.perf_counter()
        sol = implicit_nash.vi_solution(lambda z, th: a @ z + th, z0, c, solver=solver, throw=False)
        seconds = time.perf_counter() - t0
    return {"solution": sol, "seconds": seconds}


def downsample(history: List[float], points: int = 400) -> Dict[str, List[float]]:
    """Log-spaced subsample of a residual history (for the JSON file)."""
    if not history:
        return {"step": [], "residual": []}
    idx = sorted({min(len(history) - 1, int(round(v))) for v in
                  torch.logspace(0, math.log10(len(history)), points).tolist()} | {0, len(history) - 1})
    return {"step": [i + 1 for i in idx], "residual": [history[i] for i in idx]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="kappa = 10 only, 3 repetitions, cap 20000")
    parser.add_argument("--reps", type=int, default=None, help="timed solves per configuration (default 5)")
    parser.add_argument("--n", type=int, default=200, help="dimension")
    parser.add_argument("--kappas", type=float, nargs="+", default=None, help="default 10 100")
    parser.add_argument("--skew-ratio", type=float, default=20.0, help="||K||_2 / ||S||_2")
    parser.add_argument("--rtol", type=float, default=1e-8, help="relative natural-residual target")
    parser.add_argument("--max-steps", type=int, default=None, help="step cap (default 200000)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reps = args.reps if args.reps is not None else (3 if args.quick else 5)
    kappas = args.kappas if args.kappas is not None else ([10.0] if args.quick else [10.0, 100.0])
    max_steps = args.max_steps if args.max_steps is not None else (20_000 if args.quick else 200_000)

    _common.configure_torch(args.threads, args.seed)
    start = time.perf_counter()
    env = _common.environment(repetitions=reps, threads=args.threads)

    # Warm-up: a few steps of every solver type, so that first-call costs are not timed.
    warm = make_game(args.n, 10.0, args.skew_ratio, torch.Generator().manual_seed(args.seed + 999))
    for solver in solvers_for(warm["mu"], warm["L"], args.rtol, 50).values():
        run_solver(warm, solver)

    games: Dict[float, Dict[str, Any]] = {}
    results: List[Dict[str, Any]] = []
    histories: Dict[float, Dict[str, List[float]]] = {}
    for kappa in kappas:
        game = make_game(args.n, kappa, args.skew_ratio, torch.Generator().manual_seed(args.seed + int(kappa)))
        games[kappa] = game
        histories[kappa] = {}
        print(f"kappa = {kappa:g}: mu = {game['mu']:.4g}, L = {game['L']:.4g}, "
              f"||K||/||S|| = {game['skew_norm'] / game['sym_norm']:.1f}", flush=True)
        r0_exact = float(torch.linalg.vector_norm(game["c"]))  # ||F(z0)|| with z0 = 0
        z_star_norm = float(torch.linalg.vector_norm(game["z_star"]))
        # Round-robin repetitions (every solver once per round), so that load changes on a shared
        # machine affect all solvers alike.
        solvers = solvers_for(game["mu"], game["L"], args.rtol, max_steps)
        all_runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in solvers}
        for _ in range(reps):
            for name, solver in solvers.items():
                all_runs[name].append(run_solver(game, solver))
        for name, solver in solvers.items():
            runs = all_runs[name]
            sol = runs[0]["solution"]
            same = all(r["solution"].steps == sol.steps for r in runs)
            z = sol.value
            finite = bool(torch.isfinite(z).all())
            verified = (float(torch.linalg.vector_norm(game["A"] @ z + game["c"])) / r0_exact
                        if finite else float("nan"))
            error = (float(torch.linalg.vector_norm(z - game["z_star"])) / z_star_norm
                     if finite else float("nan"))
            history = sol.history
            r0 = history[0] if history else float("nan")
            entry = {
                "kappa": kappa, "solver": name, "step_size": sol.stats.get("step_size"),
                "configured_step_size": getattr(solver, "step_size", None),
                "status": sol.status, "steps": sol.steps, "evaluations": sol.stats["evaluations"],
                "seconds": median(r["seconds"] for r in runs), "seconds_all": [r["seconds"] for r in runs],
                "us_per_step": median(r["seconds"] for r in runs) / max(sol.steps, 1) * 1e6,
                "solver_residual": sol.residual, "relative_residual_solver": sol.residual / r0 if r0 else None,
                "relative_residual_verified": verified, "relative_error": error,
                "deterministic_across_reps": same, "history": downsample(history),
            }
            # For a run stopped by the cap: the measured average contraction per step, and the steps
            # it would need at that rate to reach the target (an extrapolation from measured data).
            if sol.status == "max_steps" and history and history[-1] > 0 and r0 > 0:
                rate = math.log(history[-1] / r0) / len(history)
                entry["measured_log_rate_per_step"] = rate
                entry["extrapolated_steps_to_target"] = (math.log(args.rtol) / rate) if rate < 0 else float("inf")
            histories[kappa][name] = history
            results.append(entry)
            print(f"  {name:28s} {sol.status:9s} steps {sol.steps:7d}  evals {entry['evaluations']:7d}  "
                  f"{entry['seconds']:8.3f} s  verified rel. residual {fmt(verified, '.2e')}", flush=True)

    for entry in results:
        base = next(e for e in results if e["kappa"] == entry["kappa"] and e["solver"] == BASELINE)
        entry["time_vs_baseline"] = entry["seconds"] / base["seconds"]
        entry["evals_vs_baseline"] = entry["evaluations"] / base["evaluations"]

    headers = ["kappa", "solver", "step size", "status", "steps", "F evals", "evals x PRGD()", "wall s (median)",
               "time x PRGD()", "us / step", "verified rel. residual", "rel. error ||z - z*||/||z*||"]
    rows = []
    for e in results:
        status = e["status"]
        if "extrapolated_steps_to_target" in e:
            status += f" (~{e['extrapolated_steps_to_target']:.2g} steps needed at measured rate)"
        rows.append([f"{e['kappa']:g}", e["solver"], fmt(e["step_size"], ".3g"), status, e["steps"],
                     e["evaluations"], f"{e['evals_vs_baseline']:.2f}", f"{e['seconds']:.3f}",
                     f"{e['time_vs_baseline']:.2f}", f"{e['us_per_step']:.0f}",
                     fmt(e["relative_residual_verified"], ".2e"), fmt(e["relative_error"], ".2e")])
    print()
    _common.print_table(headers, rows)

    paths = _common.result_paths(NAME, args.quick)
    plot_ok = plot_histories(histories, games, args, paths["png"])
    elapsed = time.perf_counter() - start
    _common.finish_environment(env)

    md = _common.report_head(
        "PRGD vs simultaneous gradient play on rotational strongly monotone games", env,
        f"{reps} timed solves per configuration, run round-robin over the solvers (median wall time; steps "
        f"and evaluations are deterministic"
        f" and identical across repetitions: {all(e['deterministic_across_reps'] for e in results)})",
        [f"Games: F(z) = A z + c, n = {args.n}, A = S + K, S SPD with eigenvalues log-spaced in [1, kappa], "
         f"K skew-symmetric with ||K||_2 = {args.skew_ratio:g} ||S||_2; z0 = 0; float64; seed {args.seed}",
         "Per kappa: " + "; ".join(f"kappa = {k:g}: mu = {g['mu']:.4g}, L = ||A||_2 = {g['L']:.4g}, "
                                   f"L/mu = {g['L'] / g['mu']:.3g}, ||z*|| / r0 = {g['z_star_over_r0']:.3g}"
                                   for k, g in games.items()),
         f"Stopping: `vi_solution(..., throw=False)`, solver rtol = {args.rtol:g}, atol = 0, "
         f"max_steps = {max_steps}; the library stops when the natural residual is at most "
         f"rtol x max(r0, ||z_k||) (r0 = initial residual), which is rtol x r0 here whenever ||z*|| / r0 < 1"],
        elapsed, headers, rows)
    md += [
        "",
        "*step size* = final step (the adaptive PRGD's last accepted step); *evals x PRGD()* and *time x PRGD()*",
        "are ratios to the adaptive `PRGD()` on the same game in this run; *verified rel. residual* =",
        "||A z + c|| / ||A z0 + c|| recomputed at the returned point (the solvers stop on the residual they",
        "measured at their own evaluation point, which for PRGD is the reflected point); *rel. error* uses the",
        "exact solution from `torch.linalg.solve`. For a run stopped by the step cap, the status also gives the",
        "number of steps the run would need at its measured average contraction rate (an extrapolation).",
        "",
        "## Summary",
        "",
    ]
    for kappa in kappas:
        sub = {e["solver"]: e for e in results if e["kappa"] == kappa}
        converged = [e for e in sub.values() if e["status"] == "converged"]
        fastest = min(converged, key=lambda e: e["seconds"]) if converged else None
        fewest = min(converged, key=lambda e: e["evaluations"]) if converged else None
        md.append(f"- kappa = {kappa:g}: " + ", ".join(f"{n}: {e['status']}" for n, e in sub.items()) + "."
                  + (f" Fewest F-evaluations: {fewest['solver']} ({fewest['evaluations']});"
                     f" fastest: {fastest['solver']} ({fastest['seconds']:.3f} s)." if converged else ""))
    md += [
        "",
        f"![residual histories]({paths['png'].name})" if plot_ok else "(matplotlib unavailable: no plot)",
        "",
        "## Reproduce",
        "",
        f"`{env['command']}` (add `--quick` for a smoke test; it writes `{NAME}_quick.*`).",
    ]
    payload = {"environment": env, "settings": vars(args), "max_steps": max_steps,
               "games": {str(k): {kk: v for kk, v in g.items() if kk in ("mu", "L", "skew_norm", "sym_norm", "z_star_over_r0")}
                         for k, g in games.items()},
               "results": results, "plot": str(paths["png"]) if plot_ok else None, "elapsed_s": elapsed}
    _common.write_results(NAME, args.quick, payload, md)
    print(f"\nwrote {paths['json']}, {paths['md']}" + (f" and {paths['png']}" if plot_ok else "")
          + f" ({elapsed:.0f} s)")


def plot_histories(histories, games, args, path) -> bool:
    """Plot residual / initial residual against the iteration for every solver (log-log)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kappas = list(histories)
    fig, axes = plt.subplots(1, len(kappas), figsize=(6.5 * len(kappas), 4.8), squeeze=False)
    for ax, kappa in zip(axes[0], kappas):
        for name, history in histories[kappa].items():
            if not history:
                continue
            r0 = history[0]
            values = [h / r0 if math.isfinite(h) else float("nan") for h in history]
            ax.plot(range(1, len(values) + 1), values, label=name, linewidth=1.2)
        ax.axhline(args.rtol, color="k", linestyle=":", linewidth=1, label=f"target {args.rtol:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(1e-11, 1e7)
        ax.set_xlabel("iteration")
        ax.set_ylabel("natural residual / initial residual")
        g = games[kappa]
        ax.set_title(f"n = {args.n}, kappa = {kappa:g}, ||K|| = {args.skew_ratio:g}||S||, L/mu = {g['L'] / g['mu']:.0f}")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
