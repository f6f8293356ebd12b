"""Milliseconds per meta-iteration of ``train`` against torch's intra-op thread count, on a quiet and
on a loaded machine: the measurement behind the trainer's default thread policy.

Runs (the trainer's ``Run``, float32, the task's preset): ``sinusoid`` MAML (the paper's 1-40-40-1,
meta-batch 25, 3 inner steps) and ``digits`` MAML (conv-4 with 32 filters, meta-batch 4, 5 inner
steps, 8x8 images). Thread counts: 1 and ``os.cpu_count()`` (torch's default). Conditions: ``as is``
(whatever else the machine runs) and ``one core busy`` (this script starts a spinning process for the
block, as another user's job would). Each repetition times a block of iterations per setting, the
settings in a shuffled order; the table gives the median ms/iteration over repetitions and the
ratio default/1 thread measured in the same repetitions.

Usage: ``python benchmarks/threads.py [--reps 5] [--quick]``; writes ``benchmarks/results/threads.{md,json}``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import ensure_importable, environment, finish_environment, report_head, write_results  # noqa: E402

ensure_importable()
from implicit_nash.meta.config import resolve  # noqa: E402
from implicit_nash.meta.trainer import Run  # noqa: E402


def _spin(stop):  # one busy core
    while not stop.is_set():
        sum(i * i for i in range(10000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    reps = 2 if args.quick else args.reps
    t_start = time.time()
    torch.set_default_dtype(torch.float32)
    env = environment()
    cores = os.cpu_count() or 1
    threads = sorted({1, cores})
    tasks = {"sinusoid": (resolve({"task": "sinusoid", "algorithm": "maml"}), 10 if args.quick else 40)}
    try:
        tasks["digits"] = (resolve({"task": "digits", "algorithm": "maml"}), 3 if args.quick else 10)
    except Exception:  # pragma: no cover - scikit-learn missing
        pass
    runs = {name: Run(cfg) for name, (cfg, _) in tasks.items()}
    for name, run in runs.items():  # warm-up (first-call costs, allocator)
        for t in threads:
            torch.set_num_threads(t)
            for _ in range(3):
                run.step()
    times = {(cond, name, t): [] for cond in ("as is", "one core busy") for name in tasks for t in threads}
    rng = random.Random(0)
    for cond in ("as is", "one core busy"):
        stop, spinner = None, None
        if cond == "one core busy":
            stop = mp.Event()
            spinner = mp.Process(target=_spin, args=(stop,), daemon=True)
            spinner.start()
        try:
            for _ in range(reps):
                order = [(name, t) for name in tasks for t in threads]
                rng.shuffle(order)
                for name, t in order:
                    torch.set_num_threads(t)
                    n = tasks[name][1]
                    t0 = time.perf_counter()
                    for _ in range(n):
                        runs[name].step()
                    times[(cond, name, t)].append((time.perf_counter() - t0) / n * 1e3)
        finally:
            if spinner is not None:
                stop.set()
                spinner.join()
    rows, payload = [], {"env": env, "reps": reps, "cores": cores, "results": []}
    for cond in ("as is", "one core busy"):
        for name in tasks:
            med = {t: statistics.median(times[(cond, name, t)]) for t in threads}
            ratios = [d / o for d, o in zip(times[(cond, name, cores)], times[(cond, name, 1)])]
            ratio = statistics.median(ratios)
            rows.append([cond, name] + [f"{med[t]:.1f}" for t in threads] + [f"{ratio:.2f}"])
            payload["results"].append({"condition": cond, "task": name, "median_ms": {str(t): med[t] for t in threads},
                                       "per_rep_ms": {str(t): times[(cond, name, t)] for t in threads},
                                       "ratio_default_over_1": ratio})
    finish_environment(env)
    headers = ["condition", "task"] + [f"ms/it, {t} thread{'s' if t > 1 else ''}" for t in threads] + \
        [f"{cores} threads / 1 thread (median of per-repetition ratios)"]
    lines = report_head("train: milliseconds per meta-iteration against torch threads", env,
                        f"{reps} blocks per setting, shuffled", [f"blocks of {tasks[n][1]} iterations ({n})"
                                                                  for n in tasks], time.time() - t_start,
                        headers, rows)
    paths = write_results("threads", args.quick, payload, lines)
    print("\n".join(lines))
    print(f"wrote {paths['md']}")


if __name__ == "__main__":
    main()
