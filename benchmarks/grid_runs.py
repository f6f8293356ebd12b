"""A grid of configurations trained in one vmap (``implicit_nash.meta.grid``) against separate runs.

Each case is a set of configurations that differ only in scalar hyperparameters, every one with
5 seeds (the trainer already trains the seeds of one configuration together):

* the Table 2 rows of one algorithm: plain, + p_C and + p_R at their Table 2 weights (one grid of
  15 runs, penalty weights as per-run tensors, p_C + p_R summed with zero weights where unused);
* the step-size study's alpha in {1e-4, 1e-3, 1e-2} for one row (inner_lr as a per-run tensor);
* Meta-SGD in its stable setting (three inner steps, learned step sizes clamped to [0, 0.1]): its
  Table 2 rows, and the step-size study's grid (alpha initialises the learned step sizes).

"grid" steps one :class:`GridRun`; "separate" steps the members' own :class:`Run` objects one after
another (what ``reproduce --jobs 1`` does). Sinusoid, meta-batch 25, 3 inner steps, 1-40-40-1,
float32, one torch thread. The two methods alternate in a shuffled order in every repetition; the
medians of the per-repetition times and the median of the per-repetition ratios are reported.

Usage: ``python benchmarks/grid_runs.py [--reps 9] [--steps 5] [--quick] [--algorithms A ...]``; writes
``benchmarks/results/grid_runs.{md,json}`` (``_quick`` with ``--quick``; with ``--algorithms``, only
those algorithms' cases, into ``grid_runs_<algorithms>.{md,json}``).
"""
from __future__ import annotations

import statistics
import time

from _common import (ensure_importable, environment, finish_environment, interleaved_steps, report_head,
                     step_timing_args, write_results)

ensure_importable()

import torch  # noqa: E402

from implicit_nash.meta.config import resolve  # noqa: E402
from implicit_nash.meta.grid import GridRun  # noqa: E402
from implicit_nash.meta.trainer import Run  # noqa: E402
from implicit_nash.reproduce import STABLE_SETTINGS, _rows  # noqa: E402

SEEDS = [0, 1, 2, 3, 4]


ALGORITHMS = ("maml", "cavia", "trmaml", "metasgd")


def cases(quick: bool, algorithms=ALGORITHMS):
    out = []
    for algo in (["maml"] if quick else algorithms):
        rows = _rows("table2", [algo])
        stable = STABLE_SETTINGS.get(algo, {})
        name = rows[0]["group"] + (" (stable setting)" if stable else "")
        out.append((f"{name}: plain, {', '.join(r['label'].split(' + ')[1] for r in rows[1:])}",
                    [{"algorithm": algo, **r["options"], **stable} for r in rows]))
    if not quick and "maml" in algorithms:
        out.append(("MAML plain: alpha in {1e-4, 1e-3, 1e-2}",
                    [{"algorithm": "maml", "inner_lr": a} for a in (1e-4, 1e-3, 1e-2)]))
        rows = _rows("table2", ["maml"])
        out.append(("MAML, 3 rows x 3 alphas (9 members)",
                    [{"algorithm": "maml", **r["options"], "inner_lr": a} for a in (1e-4, 1e-3, 1e-2) for r in rows]))
    if not quick and "metasgd" in algorithms:
        rows = _rows("table2", ["metasgd"])
        stable = STABLE_SETTINGS["metasgd"]
        out.append(("Meta-SGD (stable setting), 3 rows x 5 alphas (15 members, the step-size study)",
                    [{"algorithm": "metasgd", **r["options"], **stable, "inner_lr": a}
                     for a in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2) for r in rows]))
    return out


def main() -> int:
    args, reps = step_timing_args(9, extra=lambda p: p.add_argument(
        "--algorithms", nargs="+", choices=ALGORITHMS, help="only these algorithms' cases"))
    env = environment(threads=1)
    t_start = time.time()
    results, table_rows = [], []
    for label, opts in cases(args.quick, tuple(args.algorithms or ALGORITHMS)):
        configs = [resolve({**o, "seeds": SEEDS}) for o in opts]
        separate = [Run(c) for c in configs]
        grid = GridRun([Run(c) for c in configs])
        times = interleaved_steps({"grid": [grid], "separate": separate}, reps, args.steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = statistics.median(s / g for s, g in zip(times["separate"], times["grid"]))
        results.append({"case": label, "members": len(configs), "runs": grid.runs, "grid_ms": 1e3 * med["grid"],
                        "separate_ms": 1e3 * med["separate"], "speedup": med["separate"] / med["grid"],
                        "paired_speedup": ratio, "times": times})
        table_rows.append([label, len(configs), grid.runs, f"{1e3 * med['grid']:.1f}", f"{1e3 * med['separate']:.1f}",
                           f"{med['separate'] / med['grid']:.2f}x", f"{ratio:.2f}x"])
        print(table_rows[-1], flush=True)
    finish_environment(env)
    notes = ["Sinusoid, meta-batch 25, 3 inner steps, 1-40-40-1, float32, 5 seeds per member; "
             f"{args.steps} meta-iterations per timed block, methods in shuffled order per repetition",
             "grid: one GridRun (members x seeds runs in one vmap); separate: each member's Run (its 5 seeds "
             "vmapped) stepped one after another"]
    lines = report_head("A grid of configurations in one vmap vs separate runs", env,
                        f"{reps} x {args.steps} meta-iterations per method and case", notes, time.time() - t_start,
                        ["case", "members", "runs", "grid (ms / meta-iteration)", "separate (ms)", "speed-up",
                         "paired speed-up (median of ratios)"], table_rows)
    name = "grid_runs" + ("_" + "_".join(args.algorithms) if args.algorithms else "")
    write_results(name, args.quick, {"results": results, "env": env, "reps": reps, "steps": args.steps}, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
