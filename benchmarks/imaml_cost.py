"""Milliseconds per meta-iteration of iMAML and Nash-iMAML against MAML, in one run (issue 17).

The sinusoid preset (meta-batch 25, 5 shots, 1-40-40-1 ReLU network, float32, one thread), the
trainer's own ``Run.step`` for every configuration of ours (sampling, inner solve, implicit
backward, Adam), and torchopt's implicit iMAML (``custom_root`` with CG) on the same network and
tasks: an inner loop of plain gradient steps per task, as in torchopt's iMAML example.

Configurations are timed in interleaved rounds (each round times every configuration once over
``--steps`` iterations); the table gives the median over rounds and the ratio to MAML's median.
"""
from __future__ import annotations

import argparse
import json
import time

from _common import RESULTS_DIR, ensure_importable, environment, median, report_head

ensure_importable()

import torch  # noqa: E402

from implicit_nash.meta.config import resolve  # noqa: E402
from implicit_nash.meta.trainer import Run  # noqa: E402

BUDGET = {"inner_budget": 2, "krylov_steps": 5, "cg_budget": 5, "hypergrad_check_every": 0}
CONFIGS = {
    "MAML (3 unrolled steps)": {"algorithm": "maml"},
    "iMAML budgeted (2 Newton x 5 CG, 5 CG back)": {"algorithm": "imaml", **BUDGET},
    "Nash-iMAML + p_C(0.1), budgeted": {"algorithm": "imaml", "penalty": "centroid", "weight": 0.1, **BUDGET},
    "Nash-iMAML + p_R(0.01, 1), budgeted": {"algorithm": "imaml", "penalty": "robust", "weight": 0.01, **BUDGET},
    "iMAML to tolerance (Newton-Krylov; ReLU: stops on kinks)": {"algorithm": "imaml", "hypergrad_check_every": 0},
    "MAML, tanh network": {"algorithm": "maml", "activation": "tanh"},
    "iMAML to tolerance, tanh network (converges)": {"algorithm": "imaml", "activation": "tanh",
                                                     "hypergrad_check_every": 0},
}


def torchopt_step(run, inner_steps: int, inner_lr: float, cg_steps: int):
    """One meta-iteration of torchopt's implicit iMAML on the run's network, tasks and Adam."""
    import torchopt
    from torch.func import functional_call

    model, lam = run.model, run.config["lam"]
    names = list(run.theta["params"])
    meta = tuple(run.theta["params"][k][0] for k in names)

    def loss(params, x, y):
        return ((functional_call(model, dict(zip(names, params)), (x,)) - y) ** 2).mean()

    def optimality(params, meta_params, x, y):
        g = torch.func.grad(loss)(params, x, y)  # torchopt differentiates this with torch.func
        return tuple(gi + lam * (p - m) for gi, p, m in zip(g, params, meta_params))

    @torchopt.diff.implicit.custom_root(optimality, argnums=1,
                                        solve=torchopt.linear_solve.solve_cg(maxiter=cg_steps))
    def solve(params, meta_params, x, y):
        params = tuple(p.detach().requires_grad_(True) for p in params)
        with torch.enable_grad():  # torchopt runs the solver without a graph
            for _ in range(inner_steps):
                g = torch.autograd.grad(loss(params, x, y), params)
                params = tuple((p - inner_lr * (gi + lam * (p - m.detach()))).detach().requires_grad_(True)
                               for p, gi, m in zip(params, g, meta_params))
        return tuple(p.detach() for p in params)

    batch = run._batch()
    b = {k: v[0] for k, v in batch.items()}
    total = 0.0
    for i in range(b["x_support"].shape[0]):
        phi = solve(tuple(m.detach() for m in meta), meta, b["x_support"][i], b["y_support"][i])
        total = total + loss(phi, b["x_query"][i], b["y_query"][i])
    run.optimizer.zero_grad(set_to_none=True)
    (total / b["x_support"].shape[0]).backward()
    run.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="meta-iterations per configuration per round")
    parser.add_argument("--no-torchopt", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import warnings
    warnings.simplefilter("ignore", FutureWarning)  # torchopt's use of functorch.vjp
    start = time.perf_counter()
    env = environment(threads=1)
    base = {"task": "sinusoid", "inner_lr": 0.01, "iterations": 10 ** 6, "seed": 0}
    runs = {name: Run(resolve({**base, **cfg})) for name, cfg in CONFIGS.items()}
    timers = {name: (lambda r=r: r.step()) for name, r in runs.items()}
    if not args.no_torchopt:
        opt_run = Run(resolve({**base, "algorithm": "imaml"}))
        timers["torchopt implicit iMAML (10 GD steps, 5 CG)"] = lambda: torchopt_step(opt_run, 10, 0.02, 5)
    times = {name: [] for name in timers}
    for fn in timers.values():  # warm-up
        fn()
    for _ in range(args.rounds):
        for name, fn in timers.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    maml = median(times["MAML (3 unrolled steps)"])
    rows = [[name, f"{median(t):.1f}", f"{median(t) / maml:.2f}", f"{min(t):.1f}-{max(t):.1f}",
             str(runs[name].warnings) if name in runs else "-"] for name, t in times.items()]
    env["load_average_at_end"] = list(__import__("os").getloadavg())
    lines = report_head("iMAML cost per meta-iteration against MAML (sinusoid preset)", env,
                        f"{args.rounds} interleaved rounds x {args.steps} meta-iterations per configuration",
                        ["sinusoid preset: meta-batch 25, 5 shots, 1-40-40-1 ReLU, float32, inner lr 0.01, lam 10",
                         "ours: the trainer's Run.step (sampling, inner solve, backward, Adam)"],
                        time.perf_counter() - start, ["configuration", "ms / meta-iteration (median)",
                                                      "ratio to MAML", "range over rounds",
                                                      "unconverged solves (all rounds)"], rows)
    (RESULTS_DIR / "imaml_cost.md").write_text("\n".join(lines) + "\n")
    (RESULTS_DIR / "imaml_cost.json").write_text(json.dumps({"environment": env, "times_ms": times}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
