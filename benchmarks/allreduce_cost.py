"""Cost of the all-reduces of the sharded Nash-GBML inner game against its compute.

Two gloo processes on this machine share a meta-batch of 24 sinusoid tasks (1-40-40-1 network,
3 inner steps, second-order MAML) with the centroid or the robust penalty. Measured, in the same run:

* seconds per meta-iteration sharded over the 2 ranks, and in one process with the whole batch;
* how many differentiable all-reduces one meta-iteration issues in the forward pass (counted by
  wrapping ``implicit_nash._collective.differentiable_sum``; the backward issues as many again), plus
  one all-reduce per meta-parameter tensor for the DDP-style gradient sum;
* the latency of one all-reduce of the aggregate's size (1,761 numbers for the centroid's sum of
  parameters, 1 for the robust penalty's sum of distances) and of the gradients, timed alone.

Usage: ``python benchmarks/allreduce_cost.py [--reps 30] [--quick]``. Writes
``benchmarks/results/allreduce_cost.{md,json}`` (``_quick`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import environment  # noqa: E402

B, STEPS = 24, 3


def _algos():
    from implicit_nash.meta import MAML
    from implicit_nash.penalties import CentroidPenalty, RobustPenalty
    return {"centroid": MAML(inner_steps=STEPS, inner_lr=0.001,
                             penalty=CentroidPenalty(weight=0.1, num_tasks=100, inner_lr=0.001)),
            "robust": MAML(inner_steps=STEPS, inner_lr=0.001, penalty=RobustPenalty(weight=0.01, robustness=2.0))}


def _setup():
    from implicit_nash.tasks import SinusoidTasks, mlp
    torch.manual_seed(0)
    model = mlp([1, 40, 40, 1])
    batch = SinusoidTasks().sample(B, torch.Generator().manual_seed(0))
    return model, batch


def _step(algo, model, theta, batch, sharded: bool):
    from implicit_nash import distributed as D
    from implicit_nash._compat import tree_leaves
    leaves = tree_leaves(theta)
    for p in leaves:
        p.grad = None
    if sharded:
        w, r = dist.get_world_size(), dist.get_rank()
        mine = D.shard(batch, r, w)
        with D.sharded():
            loss = algo.outer_loss(algo.task_losses(model, theta, mine), mine, {}) / w
            loss.backward()
        D.allreduce_gradients(leaves)
    else:
        algo.outer_loss(algo.task_losses(model, theta, batch), batch, {}).backward()


def _worker(rank, world, init_file, reps, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from implicit_nash import _collective
    model, batch = _setup()
    results = {}
    for name, algo in _algos().items():
        theta = algo.init(model)
        calls = {"n": 0}
        original = _collective.differentiable_sum

        def counting(t, _orig=original):
            calls["n"] += 1
            return _orig(t)
        _collective.differentiable_sum = counting
        _step(algo, model, theta, batch, True)  # warm-up and count
        forward_calls = calls["n"]
        _collective.differentiable_sum = original
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            _step(algo, model, theta, batch, True)
            times.append(time.perf_counter() - t0)
        size = 1761 if name == "centroid" else 1
        lat = []
        x = torch.randn(size)
        for _ in range(reps * 5):
            t0 = time.perf_counter()
            dist.all_reduce(x)
            lat.append(time.perf_counter() - t0)
        grad_lat = []
        from implicit_nash.distributed import allreduce_gradients
        for p in theta["params"].values():
            p.grad = torch.zeros_like(p)
        for _ in range(reps):
            t0 = time.perf_counter()
            allreduce_gradients(theta["params"].values())  # one flat buffer
            grad_lat.append(time.perf_counter() - t0)
        results[name] = {"sharded_s": statistics.median(times), "forward_allreduces": forward_calls,
                         "allreduce_latency_s": statistics.median(lat), "aggregate_numel": size,
                         "gradient_allreduce_s": statistics.median(grad_lat)}
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps = 5 if args.quick else args.reps
    tmp = tempfile.mkdtemp()
    load0 = os.getloadavg()
    t_start = time.time()
    mp.start_processes(_worker, args=(2, os.path.join(tmp, "init"), reps, os.path.join(tmp, "out.json")),
                       nprocs=2, join=True, start_method="spawn")
    sharded = json.loads(Path(tmp, "out.json").read_text())
    torch.set_num_threads(1)
    model, batch = _setup()
    rows = []
    for name, algo in _algos().items():
        theta = algo.init(model)
        _step(algo, model, theta, batch, False)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            _step(algo, model, theta, batch, False)
            times.append(time.perf_counter() - t0)
        s = sharded[name]
        n_ar = 2 * s["forward_allreduces"]  # the backward all-reduces the same aggregates again
        comm = n_ar * s["allreduce_latency_s"] + s["gradient_allreduce_s"]
        rows.append({"penalty": name, "one_process_s": statistics.median(times), **s,
                     "allreduces_per_iteration": n_ar, "estimated_comm_s": comm,
                     "comm_share_of_sharded": comm / s["sharded_s"]})
    env = environment()
    suffix = "_quick" if args.quick else ""
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"allreduce_cost{suffix}.json").write_text(json.dumps({"rows": rows, "env": env, "reps": reps}, indent=2))
    lines = ["# All-reduce cost of the sharded inner game (2 gloo processes, one machine)", "",
             f"Command: `python benchmarks/allreduce_cost.py{' --quick' if args.quick else ''}`", "",
             f"- Date (UTC): {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; torch {torch.__version__}; "
             f"{os.cpu_count()} CPU cores; 1 torch thread per process",
             f"- Load average at start / end: {load0[0]:.2f} / {os.getloadavg()[0]:.2f} (the machine may be shared)",
             f"- Meta-batch {B} sinusoid tasks (12 per rank), 1-40-40-1 ReLU, {STEPS} inner steps, second-order "
             f"MAML; medians of {reps} meta-iterations (all-reduce latency: {5 * reps} calls)",
             f"- Total wall time {time.time() - t_start:.0f} s", "",
             "| penalty | one process, whole batch (ms) | 2 ranks, sharded (ms) | all-reduces per iteration "
             "(forward + backward) | one all-reduce (µs, numel) | gradient all-reduce (ms) | estimated "
             "communication (ms) | share of the sharded iteration |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['penalty']} | {r['one_process_s'] * 1e3:.1f} | {r['sharded_s'] * 1e3:.1f} | "
                     f"{r['allreduces_per_iteration']} | {r['allreduce_latency_s'] * 1e6:.0f} ({r['aggregate_numel']}) | "
                     f"{r['gradient_allreduce_s'] * 1e3:.2f} | {r['estimated_comm_s'] * 1e3:.2f} | "
                     f"{100 * r['comm_share_of_sharded']:.1f}% |")
    lines += ["", "The estimate counts the forward all-reduces (wrapped and counted; the pytree of an aggregate "
              "is coalesced into one call) twice, for the backward, at the latency measured alone, plus the "
              "gradient all-reduce. With 2 processes on 2 cores the sharded time also includes waiting for the "
              "slower rank, and on one machine sharding cannot beat one process (the same cores do the work); "
              "across machines the latency of the network replaces the loopback latency measured here."]
    (out / f"allreduce_cost{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
