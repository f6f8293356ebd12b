"""Meta-training with a compiled implicit backward (issue 16): ms per meta-iteration of iMAML's
implicit mode with ``CG(compiled=True)`` against the same CG eager, the default GMRES and MAML, in one
run, on the sinusoid preset with the tanh network (where the inner problem has a root and iMAML runs
to tolerance).

Every configuration is the trainer's own ``Run.step`` (sampling new tasks, the Newton-Krylov inner
solve, the implicit backward, Adam), with the algorithm's ``linear_solver`` replaced; steps are timed
in interleaved blocks in a shuffled order (``_common.interleaved_steps``), median over blocks.  The
compiled run's first step (the compilation) is timed separately, and torch.compile's graph count is
read before and after the timed steps: new tasks every iteration must not recompile.  The same seed
gives the same tasks to every run, so the parameters after the timed steps differ only by how the
backward solved its systems (to its tolerance): their relative distance is reported.

Usage (from the repository root)::

    python benchmarks/compiled_training.py --reps 5 --steps 4
    python benchmarks/compiled_training.py --quick          # 3 repetitions, no result files
"""
from __future__ import annotations

import dataclasses
import json
import time

import _common as C

C.ensure_importable()

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import implicit_nash as inn  # noqa: E402
from implicit_nash.meta.config import resolve  # noqa: E402
from implicit_nash.meta.trainer import Run  # noqa: E402

BASE = {"task": "sinusoid", "activation": "tanh", "inner_lr": 0.01, "iterations": 10 ** 6, "seed": 0,
        "hypergrad_check_every": 0}
SOLVERS = {
    "iMAML, GMRES per task (the default)": None,
    "iMAML, CG per task, eager": inn.CG(),
    "iMAML, CG per task, compiled": inn.CG(compiled=True),
}


def make_run(solver):
    run = Run(resolve({**BASE, "algorithm": "imaml"}))
    if solver is not None:
        run.algorithm = dataclasses.replace(run.algorithm, linear_solver=solver)
    return run


def flat_theta(run) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in torch.utils._pytree.tree_leaves(run.theta)])


def main() -> None:
    args, reps = C.step_timing_args(default_reps=5)
    start = time.perf_counter()
    env = C.environment(threads=1)
    runs = {name: [make_run(s)] for name, s in SOLVERS.items()}
    runs["MAML (3 unrolled steps)"] = [Run(resolve({**BASE, "algorithm": "maml"}))]
    compiled = runs["iMAML, CG per task, compiled"][0]
    t0 = time.perf_counter()
    compiled.step()  # the first step compiles
    first_step_s = time.perf_counter() - t0
    runs["iMAML, CG per task, eager"][0].step()  # the same number of steps as the compiled run
    graphs_before = counters["stats"]["unique_graphs"]
    times = C.interleaved_steps(runs, reps, args.steps)
    graphs_during = counters["stats"]["unique_graphs"] - graphs_before
    ms = {n: 1e3 * C.median(t) for n, t in times.items()}
    maml = ms["MAML (3 unrolled steps)"]
    eager = runs["iMAML, CG per task, eager"][0]
    gap = None
    if eager.iteration == compiled.iteration:
        a, b = flat_theta(eager), flat_theta(compiled)
        gap = float((a - b).norm() / a.norm())
    steps_note = f"iterations: eager CG run {eager.iteration}, compiled run {compiled.iteration}"
    rows = [[n, f"{ms[n]:.1f}", f"{ms[n] / maml:.2f}", f"{ms['iMAML, CG per task, eager'] / ms[n]:.2f}x",
             f"{min(times[n]) * 1e3:.1f}-{max(times[n]) * 1e3:.1f}"] for n in times]
    C.finish_environment(env)
    notes = ["sinusoid preset, tanh 1-40-40-1, meta-batch 25, float32, inner lr 0.01, lam 10, iMAML to tolerance",
             f"compiled run's first step (compilation): {first_step_s:.1f} s; graphs compiled during the timed "
             f"steps (new tasks every iteration): {graphs_during}",
             f"relative distance of the parameters, CG eager vs compiled, after the same steps: "
             f"{'n/a (' + steps_note + ')' if gap is None else f'{gap:.1e}'}"]
    lines = C.report_head("Meta-training with a compiled implicit backward (iMAML, sinusoid, tanh)", env,
                          f"{reps} interleaved blocks x {args.steps} meta-iterations per configuration, median",
                          notes, time.perf_counter() - start,
                          ["configuration", "ms / meta-iteration", "ratio to MAML", "speed vs eager CG",
                           "range"], rows)
    print("\n".join(lines))
    if not args.quick:
        C.write_results("compiled_training", False, {"env": env, "times_s": times, "first_step_s": first_step_s,
                                                     "graphs_during_timed_steps": graphs_during,
                                                     "theta_gap": gap}, lines)


if __name__ == "__main__":
    main()
