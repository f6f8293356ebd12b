"""The layer rewrite of issue 12, before and after: the same workloads timed on an earlier commit's
source and on this checkout, interleaved in one run.

Workloads (float32 meta-learning as in ``meta_vs_peers.py``, float64 for the layer):

* ``maml``, ``maml_pc``, ``maml_pr``: one second-order meta-iteration (forward, meta-gradient) of
  MAML and Nash-MAML + p_C / + p_R on the 5-shot sinusoid, meta-batch 25, 1-40-40-1 ReLU, 3 inner
  steps (the path of ``benchmarks/meta_vs_peers.py``, which the issue says may not regress by more
  than 5%);
* ``imaml_implicit``: one implicit meta-iteration of iMAML (lambda 10) on the same batch with tanh
  (the inner game solved by the layer's PRGD, the meta-gradient through the implicit backward);
* ``layer``: ``solve_vi`` plus one backward on a 200-dimensional strongly monotone non-symmetric
  quadratic VI (float64).

Every (tree, workload) pair runs in a fresh subprocess with ``PYTHONPATH`` pointing at that tree;
the two trees alternate in a random order within each repetition, and a repetition's ratio is
after / before. The report gives the medians and the median paired ratio with its range.

Usage (from the repository root)::

    python benchmarks/layer_before_after.py --before 882a43e --reps 5
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

WORKLOADS = ["maml", "maml_pc", "maml_pr", "imaml_implicit", "layer"]

WORKER = r'''
import json, sys, time, statistics
import torch
torch.set_num_threads(1)
import implicit_nash as inn
from implicit_nash.meta import MAML, IMAML
from implicit_nash.tasks import SinusoidTasks, mlp

name, iters = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
if name == "layer":
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)
    n = 200
    K = torch.randn(n, n, generator=g) / n ** 0.5
    A = (K - K.T) + torch.eye(n) * 2 + torch.diag(torch.rand(n, generator=g))
    theta = torch.randn(n, generator=g, requires_grad=True)
    def once():
        z = inn.solve_vi(lambda z, t: A @ z - t, torch.zeros(n), theta, solver=inn.PRGD(rtol=1e-10))
        z.sum().backward()
else:
    tasks = SinusoidTasks()
    gen = torch.Generator().manual_seed(1)
    batch = tasks.sample(25, gen, dtype=torch.float32)
    if name == "imaml_implicit":
        model = mlp([1, 40, 40, 1], activation="tanh")
        algo = IMAML(inner_lr=0.001, throw=False)
    else:
        model = mlp([1, 40, 40, 1])
        penalty = {"maml": None, "maml_pc": inn.CentroidPenalty(weight=0.1, num_tasks=100, inner_lr=0.001),
                   "maml_pr": inn.RobustPenalty(weight=0.01, robustness=2.0)}[name]
        algo = MAML(inner_steps=3, inner_lr=0.001, penalty=penalty)
    theta = algo.init(model)
    def once():
        losses = algo.task_losses(model, theta, batch)
        algo.outer_loss(losses, batch, {}).backward()
import warnings
warnings.simplefilter("ignore")
for _ in range(3):
    once()
times = []
for _ in range(iters):
    t0 = time.perf_counter(); once(); times.append(time.perf_counter() - t0)
print(json.dumps({"median_ms": 1e3 * statistics.median(times)}))
'''


def export_tree(rev: str, root: Path, dest: Path) -> None:
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "implicit_nash"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def run(tree: Path, workload: str, iters: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", WORKER, workload, str(iters)], env=env, cwd=str(tree),
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{workload} on {tree} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="882a43e", help="the earlier commit (default: main before issue 12)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20, help="timed calls per subprocess (median taken)")
    parser.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=WORKLOADS)
    args = parser.parse_args()
    env = _common.environment(before=args.before, reps=args.reps, iters=args.iters)
    start = time.time()
    rng = random.Random(0)
    results = {w: {"before": [], "after": []} for w in args.workloads}
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp)
        export_tree(args.before, _common.ROOT, before)
        trees = {"before": before, "after": _common.ROOT}
        for rep in range(args.reps):
            for w in args.workloads:
                order = ["before", "after"]
                rng.shuffle(order)
                for label in order:
                    results[w][label].append(run(trees[label], w, args.iters))
            print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{w} {results[w]['before'][-1]:.1f} -> {results[w]['after'][-1]:.1f} ms" for w in args.workloads),
                flush=True)
    _common.finish_environment(env)
    rows = []
    for w in args.workloads:
        b, a = results[w]["before"], results[w]["after"]
        ratios = sorted(x / y for x, y in zip(a, b))
        rows.append([w, f"{_common.median(b):.2f}", f"{_common.median(a):.2f}", f"{_common.median(ratios):.3f}",
                     f"{ratios[0]:.3f}-{ratios[-1]:.3f}"])
        results[w]["paired_ratio_median"] = _common.median(ratios)
    headers = ["workload", f"before ({args.before}) ms", "after ms", "after/before (median paired)", "range"]
    lines = _common.report_head("Layer rewrite (issue 12): before and after", env,
                                f"{args.reps} x {args.iters} calls per tree and workload, fresh subprocesses, 1 thread",
                                [], time.time() - start, headers, rows)
    _common.RESULTS_DIR.mkdir(exist_ok=True)
    (_common.RESULTS_DIR / "layer_before_after.md").write_text("\n".join(lines) + "\n")
    (_common.RESULTS_DIR / "layer_before_after.json").write_text(json.dumps({"env": env, "results": results},
                                                                            indent=2))
    _common.print_table(headers, rows)


if __name__ == "__main__":
    main()
