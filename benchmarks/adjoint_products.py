"""Products per meta-iteration of the implicit backward: warm starts and per-task Krylov spaces.

Issue 16 asks for warm-started adjoints in the trainer's implicit mode, measured as products (Jacobian-
or Hessian-vector products of the backward linear solves) per meta-iteration, with the meta-gradient
unchanged to the tolerance.  This script measures four ways of solving the same backward systems:

* ``before``: one Krylov space over the whole stack of tasks, every solve from zero (main before
  issue 16);
* ``warm``: the same, each solve started from the previous meta-iteration's solution
  (:class:`implicit_nash.WarmStart`; a start no better than zero is dropped after one product);
* ``blocks``: plain iMAML's tasks declared independent (``custom_root(blocks=B)``), so that CG and
  GMRES build one Krylov space per task and each task stops on its own tolerance;
* ``blocks + warm``: both.

Two task streams: ``fresh`` (a new batch of B = 25 sinusoid tasks every iteration, as in
meta-training) and ``fixed`` (the same 25 tasks every iteration, as in bilevel problems with a fixed
data set, where the adjoint moves little between outer steps).  iMAML (lam = 10, tanh 1-40-40-1
network, 10 support and 10 query points, float64, Newton-Krylov inner solve to tolerance, backward
to rtol 1e-10), plain and with p_C(0.1) and p_R(0.01, 1); Adam(1e-3) outer steps.  Each variant
replays the same seed, so the meta-gradients are compared iteration by iteration with ``before``.

Usage::

    python benchmarks/adjoint_products.py                 # writes benchmarks/results/adjoint_products.{json,md}
    python benchmarks/adjoint_products.py --quick         # 3 iterations, plain iMAML only
"""
from __future__ import annotations

import argparse
import time
import warnings

from _common import (configure_torch, ensure_importable, environment, finish_environment, print_table,
                     report_head, write_results)

ensure_importable()

import torch  # noqa: E402

import implicit_nash as inn  # noqa: E402
import implicit_nash.implicit as _implicit  # noqa: E402
import implicit_nash.meta.imaml as _imaml  # noqa: E402
from implicit_nash.meta import IMAML  # noqa: E402
from implicit_nash.tasks.networks import mlp  # noqa: E402
from implicit_nash.tasks.sinusoid import SinusoidTasks  # noqa: E402

VARIANTS = {"before": (False, False), "warm": (False, True), "blocks": (True, False), "blocks + warm": (True, True)}
_custom_root = _imaml.custom_root


class Counter:
    """Counts the products of every implicit linear solve (read from the solves' own reports)."""

    def __init__(self):
        self.products = 0
        self.solves = 0
        self._orig = _implicit.Problem.linear_solve
        counter = self

        def counted(problem, b, z, params, transpose):
            x = counter._orig(problem, b, z, params, transpose)
            counter.products += problem.record.backward[-1].matvecs
            counter.solves += 1
            return x

        _implicit.Problem.linear_solve = counted

    def close(self):
        _implicit.Problem.linear_solve = self._orig


def run(variant, penalty, solver, stream, iterations, seed):
    blocks, warm = VARIANTS[variant]
    # 'before' and 'warm' force one Krylov space over the stack (blocks=1), as main did before issue 16
    _imaml.custom_root = _custom_root if blocks else (lambda *a, **k: _custom_root(*a, **{**k, "blocks": 1}))
    torch.manual_seed(seed)
    tasks = SinusoidTasks(shots=10, query_shots=10)
    model = mlp([1, 40, 40, 1], "tanh")
    # throw=False: an inner Newton solve that stalls short of its tolerance (it happens on a few batches)
    # is counted and reported instead of ending the run; it is the same in every variant
    alg = IMAML(inner_lr=0.01, lam=10.0, penalty=penalty, linear_solver=solver, warm_start=warm, throw=False)
    theta = alg.init(model)
    opt = torch.optim.Adam(list(theta["params"].values()), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    fixed = tasks.sample(25, gen, dtype=torch.float64)
    counter = Counter()
    grads, t0, stalled = [], time.perf_counter(), 0
    try:
        for _ in range(iterations):
            batch = fixed if stream == "fixed" else tasks.sample(25, gen, dtype=torch.float64)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss = alg.task_losses(model, theta, batch).mean()
                opt.zero_grad()
                loss.backward()
            stalled += sum(issubclass(w.category, inn.ConvergenceWarning) for w in caught)
            grads.append(torch.cat([p.grad.flatten() for p in theta["params"].values()]).clone())
            opt.step()
    finally:
        counter.close()
        _imaml.custom_root = _custom_root
    return {"products": counter.products / iterations, "solves": counter.solves / iterations,
            "seconds": (time.perf_counter() - t0) / iterations, "grads": grads, "warnings": stalled}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    configure_torch(args.threads, args.seed)
    iterations = 3 if args.quick else args.iterations
    env = environment(iterations=iterations, seed=args.seed)
    penalties = {"iMAML": None, "iMAML + p_C(0.1)": inn.CentroidPenalty(weight=0.1, num_tasks=100, inner_lr=0.01),
                 "iMAML + p_R(0.01, 1)": inn.RobustPenalty(weight=0.01, robustness=1.0, C=1e-8)}
    if args.quick:
        penalties = {"iMAML": None}
    rows, records, start = [], [], time.perf_counter()
    for stream in ("fresh", "fixed"):
        for name, penalty in penalties.items():
            solvers = {"GMRES": inn.GMRES(rtol=1e-10)}
            if penalty is None or penalty.symmetric:
                solvers["CG"] = inn.CG(rtol=1e-10)
            for sname, solver in solvers.items():
                base = None
                for variant in VARIANTS:
                    if variant.startswith("blocks") and penalty is not None and penalty.coupled:
                        continue  # coupled tasks: the Jacobian is not block-diagonal
                    out = run(variant, penalty, solver, stream, iterations, args.seed)
                    base = base or out
                    diff = max(float((a - b).norm() / b.norm()) for a, b in zip(out["grads"], base["grads"]))
                    rec = {"stream": stream, "algorithm": name, "solver": sname, "variant": variant,
                           "products_per_iteration": out["products"], "solves_per_iteration": out["solves"],
                           "fewer_products_than_before": base["products"] / out["products"],
                           "max_relative_meta_gradient_difference": diff, "seconds_per_iteration": out["seconds"],
                           "convergence_warnings": out["warnings"]}
                    records.append(rec)
                    rows.append([stream, name, sname, variant, f"{out['products']:.1f}",
                                 f"{rec['fewer_products_than_before']:.2f}x", f"{diff:.1e}", out["warnings"],
                                 f"{out['seconds']:.2f}"])
                    print(*rows[-1], sep=" | ", flush=True)
    finish_environment(env)
    headers = ["tasks", "algorithm", "backward solver", "variant", "products / meta-iteration",
               "fewer than before", "max rel. meta-gradient difference", "convergence warnings",
               "s / iteration (informative)"]
    print_table(headers, rows)
    notes = [f"{iterations} meta-iterations per row, seed {args.seed}; B = 25 tasks; backward solves to rtol 1e-10",
             "products: Hessian-vector products of the backward linear solves, from their own reports",
             "fewer than before: products of 'before' / products of the row (same algorithm, solver and tasks)",
             "the meta-gradient difference is against 'before', iteration by iteration (same seed)",
             "convergence warnings: inner Newton solves that stalled short of their tolerance (throw=False), "
             "the same batches in every variant",
             "s / iteration was measured on a shared machine and is not a benchmark of speed"]
    md = report_head("Implicit backward: products per meta-iteration (warm starts, per-task Krylov spaces)", env,
                     f"{iterations} iterations x 1 seed per row", notes, time.perf_counter() - start, headers, rows)
    paths = write_results("adjoint_products", args.quick, {"env": env, "records": records}, md)
    print(f"wrote {paths['md']}")


if __name__ == "__main__":
    main()
