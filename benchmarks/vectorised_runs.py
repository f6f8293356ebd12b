"""Training several seeds together (vmap over runs) against one after another.

For each algorithm of Table 2, one meta-iteration of R = 5 runs (the trainer's ``Run`` with
``seeds=[0..4]``, vectorised over runs with ``torch.func.vmap`` and one elementwise Adam) against
five single-seed ``Run`` objects stepped one after another, on the paper's sinusoid settings
(meta-batch 25, 3 inner steps, 1-40-40-1). Methods interleave in a shuffled order each repetition;
medians of the per-repetition times.

Usage: ``python benchmarks/vectorised_runs.py [--reps 15] [--quick]``; writes
``benchmarks/results/vectorised_runs.{md,json}`` (``_quick`` with ``--quick``).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import environment, interleaved_steps, step_timing_args  # noqa: E402

from implicit_nash.meta.config import resolve  # noqa: E402
from implicit_nash.meta.trainer import Run  # noqa: E402

ROWS = [("MAML", {"algorithm": "maml"}),
        ("MAML + p_C(0.1)", {"algorithm": "maml", "penalty": "centroid", "weight": 0.1}),
        ("MAML + p_R(0.01, 2)", {"algorithm": "maml", "penalty": "robust", "weight": 0.01, "robustness": 2.0}),
        ("Meta-SGD", {"algorithm": "metasgd"}),
        ("CAVIA", {"algorithm": "cavia"}),
        ("TR-MAML", {"algorithm": "trmaml"})]


def main() -> int:
    args, reps = step_timing_args(15)
    seeds = [0, 1, 2, 3, 4]
    load0 = os.getloadavg()
    t_start = time.time()
    rows = []
    for label, opts in ROWS:
        together = Run(resolve({**opts, "seeds": seeds}))
        alone = [Run(resolve({**opts, "seed": s})) for s in seeds]
        times = interleaved_steps({"together": [together], "one after another": alone}, reps, args.steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        paired = statistics.median(a / b for a, b in zip(times["one after another"], times["together"]))
        rows.append({"row": label, "together_ms": 1e3 * med["together"],
                     "one_after_another_ms": 1e3 * med["one after another"],
                     "speedup": med["one after another"] / med["together"], "paired_speedup": paired,
                     "vectorised": together.vectorised})
    env = environment()
    suffix = "_quick" if args.quick else ""
    out = HERE / "results"
    (out / f"vectorised_runs{suffix}.json").write_text(json.dumps({"rows": rows, "env": env, "reps": reps}, indent=2))
    lines = ["# Five seeds trained together (vmap over runs) vs one after another", "",
             "Command: `" + " ".join(["python benchmarks/vectorised_runs.py", *sys.argv[1:]]) + "`", "",
             f"- Date (UTC): {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; torch {torch.__version__}; "
             f"{os.cpu_count()} cores, 1 torch thread",
             f"- Load average at start / end: {load0[0]:.2f} / {os.getloadavg()[0]:.2f} (above 1: the machine was shared)",
             f"- Sinusoid, meta-batch 25, 3 inner steps, 1-40-40-1, float32; {reps} repetitions of {args.steps} "
             f"meta-iterations per method, shuffled order; medians", f"- Total wall time {time.time() - t_start:.0f} s",
             "", "| row | 5 seeds together (ms / meta-iteration) | 5 runs one after another (ms) | speed-up | paired speed-up |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['together_ms']:.1f} | {r['one_after_another_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['paired_speedup']:.2f}x |")
    (out / f"vectorised_runs{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
