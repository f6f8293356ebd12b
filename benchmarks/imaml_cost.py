"""Milliseconds per meta-iteration of iMAML and Nash-iMAML against MAML, in one run (issue 17).

The sinusoid preset (meta-batch 25, 5 shots, 1-40-40-1 ReLU network, float32, one thread), the
trainer's own ``Run.step`` for every configuration of ours (sampling, inner solve, implicit
backward, Adam), and torchopt's implicit iMAML (``custom_root`` with CG) on the same network and
tasks: an inner loop of plain gradient steps per task, as in torchopt's iMAML example.

The ``--compiled`` rows run the budgeted mode's Krylov iterations as compiled programs
(torch.compile, inductor); their compilation happens in the warm-up iteration, whose time the
table gives (``first iteration``), and is not part of the per-iteration medians.

Configurations are timed in interleaved rounds (each round times every configuration once over
``--steps`` iterations); the table gives the median over rounds and the ratio to MAML's median.

A second table splits the default budgeted iMAML iteration into its parts (the Newton forward, the
layer's backward linear solve with the graph it builds, the backward's product with d F / d theta,
the rest: sampling, query loss, Adam), timed by wrapping those functions in the same process, and
gives the unit costs its floor is made of (one gradient of the 25 tasks' costs with its graph, one
Hessian-vector product on it, one cost evaluation without a graph).
"""
from __future__ import annotations

import argparse
import json
import time

from _common import RESULTS_DIR, ensure_importable, environment, median, report_head, table

ensure_importable()

import torch  # noqa: E402

from implicit_nash.meta.config import resolve  # noqa: E402
from implicit_nash.meta.trainer import Run  # noqa: E402

# the ReLU preset's default (inner_mode auto = budgeted: 2 Newton x 3 CG forward, 5 MINRES per task back)
DEFAULT = {"algorithm": "imaml", "hypergrad_check_every": 0}
CONFIGS = {
    "MAML (3 unrolled steps)": {"algorithm": "maml"},
    "iMAML budgeted, default (2 Newton x 3 CG, 5 MINRES per task back)": DEFAULT,
    "iMAML budgeted, 2 Newton x 5 CG, 5 MINRES per task back": {**DEFAULT, "inner_budget": 2, "krylov_steps": 5,
                                                           "cg_budget": 5},
    "iMAML budgeted, 1 Newton x 5 CG, 5 MINRES per task back": {**DEFAULT, "inner_budget": 1, "krylov_steps": 5,
                                                           "cg_budget": 5},
    "Nash-iMAML + p_C(0.1), budgeted (default: 2 Newton x 3 CG on the coupled system, 5 GMRES back)": {**DEFAULT, "penalty": "centroid", "weight": 0.1},
    "Nash-iMAML + p_R(0.01, 1), budgeted (default: 1 own + 1 coupled Newton step x 3, 5 GMRES back)": {**DEFAULT, "penalty": "robust", "weight": 0.01},
    "iMAML budgeted, default budget, --compiled": {**DEFAULT, "compiled": True},
    "Nash-iMAML + p_C(0.1), budgeted, --compiled": {**DEFAULT, "penalty": "centroid", "weight": 0.1, "compiled": True},
    "Nash-iMAML + p_R(0.01, 1), budgeted, --compiled": {**DEFAULT, "penalty": "robust", "weight": 0.01, "compiled": True},
    "iMAML to tolerance (--inner-mode tolerance; ReLU: stops on kinks)": {**DEFAULT, "inner_mode": "tolerance"},
    "MAML, tanh network": {"algorithm": "maml", "activation": "tanh"},
    "iMAML to tolerance, tanh network (default there; converges)": {**DEFAULT, "activation": "tanh"},
}
BREAKDOWN = "iMAML budgeted, default (2 Newton x 3 CG, 5 MINRES per task back)"


def breakdown(run, maml, steps: int):
    """ms per part of ``run``'s meta-iteration (median over ``steps`` iterations), MAML's in the same
    loop, and the unit costs of the inner problem at the run's current theta."""
    import implicit_nash.implicit as layer
    import implicit_nash.meta.imaml as imaml
    from implicit_nash._tree import Flattener

    parts = {"Newton forward": (imaml, "newton_krylov"),
             "backward linear solve (with its graph of F)": (layer.Problem, "linear_solve"),
             "backward product with dF/dtheta": (layer.Problem, "theta_vjp")}
    acc = {k: 0.0 for k in parts}
    saved = {k: getattr(obj, name) for k, (obj, name) in parts.items()}

    def wrapped(key, f):
        def g(*a, **kw):
            t0 = time.perf_counter()
            out = f(*a, **kw)
            acc[key] += time.perf_counter() - t0
            return out
        return g

    per = {k: [] for k in (*parts, "rest (sampling, query loss, Adam, layer glue)", "total", "MAML total")}
    try:
        for k, (obj, name) in parts.items():
            setattr(obj, name, wrapped(k, saved[k]))
        for _ in range(steps):
            t0 = time.perf_counter()
            maml.step()
            per["MAML total"].append(time.perf_counter() - t0)
            for k in acc:
                acc[k] = 0.0
            t0 = time.perf_counter()
            run.step()
            total = time.perf_counter() - t0
            for k in parts:
                per[k].append(acc[k])
            per["rest (sampling, query loss, Adam, layer glue)"].append(total - sum(acc.values()))
            per["total"].append(total)
    finally:
        for k, (obj, name) in parts.items():
            setattr(obj, name, saved[k])
    ms = {k: median(v) * 1e3 for k, v in per.items()}

    # unit costs at the current theta, on one batch
    algo, model = run.algorithm, run.model
    b = {k: v[0] for k, v in run._batch().items()}
    theta = torch.utils._pytree.tree_map(lambda t: t.detach(), run.theta_of(0))
    B = b["x_support"].shape[0]
    game = algo._game(model, b["x_support"], b["y_support"], algo.inner_penalty(True))
    flat = Flattener(algo._start(theta, B), B, "phi")
    z0 = flat.flatten(algo._start(theta, B)).detach()

    def costs(v):
        return game.costs(flat.unflatten(v), theta)

    def gradient_graph():
        with torch.enable_grad():
            z = z0.clone().requires_grad_(True)
            return z, torch.autograd.grad(costs(z).sum(), z, create_graph=True)[0]

    z, g = gradient_graph()
    v = torch.randn_like(z0)

    def timed(f, n=max(4 * steps, 20)):
        f()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
        return median(out) * 1e3

    units = {"gradient of the 25 tasks' costs, with its graph": timed(gradient_graph),
             "Hessian-vector product on that graph": timed(lambda: torch.autograd.grad(g, z, v, retain_graph=True)),
             "costs without a graph (a line-search trial)": timed(lambda: torch.no_grad()(costs)(z0))}
    return ms, units


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
    first = {}
    for name, fn in timers.items():  # warm-up (the compiled rows compile here)
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    for _ in range(args.rounds):
        for name, fn in timers.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    parts, units = breakdown(runs[BREAKDOWN], runs["MAML (3 unrolled steps)"], max(args.rounds * args.steps, 10))
    maml = median(times["MAML (3 unrolled steps)"])
    rows = [[name, f"{median(t):.1f}", f"{median(t) / maml:.2f}", f"{min(t):.1f}-{max(t):.1f}",
             str(runs[name].warnings) if name in runs else "-", f"{first[name]:.1f}"] for name, t in times.items()]
    env["load_average_at_end"] = list(__import__("os").getloadavg())
    lines = report_head("iMAML cost per meta-iteration against MAML (sinusoid preset)", env,
                        f"{args.rounds} interleaved rounds x {args.steps} meta-iterations per configuration",
                        ["sinusoid preset: meta-batch 25, 5 shots, 1-40-40-1 ReLU, float32, inner lr 0.01, lam 10",
                         "ours: the trainer's Run.step (sampling, inner solve, backward, Adam)"],
                        time.perf_counter() - start, ["configuration", "ms / meta-iteration (median)",
                                                      "ratio to MAML", "range over rounds",
                                                      "unconverged solves (all rounds)",
                                                      "first iteration (s; compiles)"], rows)
    lines += ["", f"## Where the time of '{BREAKDOWN}' goes", "",
              "Each part's median over the iterations of a separate loop (MAML timed in the same loop); "
              "the parts' medians need not add up to the total's.", ""]
    lines += table(["part", "ms (median)", "in units of MAML's iteration"],
                   [[k, f"{v:.2f}", f"{v / parts['MAML total']:.2f}"] for k, v in parts.items()])
    lines += ["", "Unit costs (median, same process):", ""]
    lines += table(["operation", "ms"], [[k, f"{v:.2f}"] for k, v in units.items()])
    (RESULTS_DIR / "imaml_cost.md").write_text("\n".join(lines) + "\n")
    (RESULTS_DIR / "imaml_cost.json").write_text(json.dumps({"environment": env, "times_ms": times,
                                                             "first_iteration_s": first,
                                                             "breakdown_ms": parts, "unit_costs_ms": units}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
