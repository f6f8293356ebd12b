"""Peak memory and time of evaluation against the number of test episodes (MiniImageNet-shaped).

Fixture: a synthetic MiniImageNet in the Ravi-Larochelle CSV layout (``train.csv``, ``val.csv``,
``test.csv`` and ``images/`` of 84×84 RGB PNGs of uniform noise; ``--classes`` classes per split
with 20 images each), written once to a temporary folder. Evaluation is the trainer's
(``Run(config).evaluate("test")``) at the ``train miniimagenet`` defaults: MAML, conv-4 with 32
filters, 5-way 5-shot with 15 query images per class, 5 inner steps, float32, one thread.

Every setting runs in a fresh subprocess, which reports its peak resident set size
(``ru_maxrss``) and the evaluation's wall time; the RSS before evaluation (after imports and
building the run) is recorded too. Two sweeps:

* episodes: ``--episodes`` (default 4 40 150 600) at the default ``eval_batch``; the goal is a
  peak RSS flat within 1.2× from the fewest to the most episodes;
* chunk size: ``--chunks`` (default 1 2 5 10 25) at ``--chunk-episodes`` episodes (default 25):
  seconds per episode and peak RSS, from which the default ``eval_batch`` was chosen.

Usage (from the repository root)::

    python benchmarks/eval_memory.py             # writes benchmarks/results/eval_memory.{json,md}
    python benchmarks/eval_memory.py --quick     # 4 and 12 episodes, chunks 1 and 4
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C


def make_fixture(root: Path, classes: int, per_class: int = 20, size: int = 84) -> None:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for split in ("train", "val", "test"):
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for c in range(classes):
                for j in range(per_class):
                    name = f"{split}{c:02d}_{j:02d}.png"
                    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "images" / name)
                    w.writerow([name, f"n{split}{c:03d}"])


def child(root: str, episodes: int, eval_batch) -> None:
    import resource
    import time
    C.ensure_importable()
    import torch
    torch.set_num_threads(1)
    from implicit_nash.meta.config import resolve
    from implicit_nash.meta.trainer import Run
    opts = {"task": "miniimagenet", "data_root": root, "test_tasks": episodes}
    if eval_batch is not None:
        opts["eval_batch"] = eval_batch
    config = resolve(opts)
    run = Run(config)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = run.evaluate("test")[0]
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"episodes": episodes, "eval_batch": config["eval_batch"], "rss_before_mb": before / 1024,
                      "peak_rss_mb": peak / 1024, "seconds": seconds, "sec_per_episode": seconds / episodes,
                      "accuracy_mean": result["accuracy_mean"]}))


def measure(root: Path, episodes: int, eval_batch=None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(root), "--n", str(episodes)]
    if eval_batch is not None:
        cmd += ["--eval-batch", str(eval_batch)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**__import__("os").environ,
                                                                                 "OMP_NUM_THREADS": "1"})
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  episodes {row['episodes']:4d}  eval_batch {row['eval_batch']:3d}  peak RSS {row['peak_rss_mb']:8.1f} MB "
          f"(before evaluation {row['rss_before_mb']:.1f})  {row['sec_per_episode']:.3f} s/episode", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, nargs="+", default=[4, 40, 150, 600])
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 5, 10, 25])
    p.add_argument("--chunk-episodes", type=int, default=25)
    p.add_argument("--classes", type=int, default=10, help="classes per split of the fixture")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child")
    p.add_argument("--n", type=int)
    p.add_argument("--eval-batch", type=int)
    args = p.parse_args()
    if args.child:
        child(args.child, args.n, args.eval_batch)
        return
    if args.quick:
        args.episodes, args.chunks, args.chunk_episodes = [4, 12], [1, 4], 8
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mini"
        make_fixture(root, args.classes)
        print("chunk size sweep")
        chunks = [measure(root, args.chunk_episodes, e) for e in args.chunks]
        print("episodes sweep (default eval_batch)")
        rows = [measure(root, n) for n in args.episodes]
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    env = C.environment(threads=1)
    data = {"env": env, "chunks": chunks, "episodes": rows, "peak_ratio_last_first": ratio}
    lines = [f"# Evaluation memory against test episodes (synthetic MiniImageNet, conv-4, 5-way 5-shot)", "",
             f"Command: `{env['command']}`", "", f"Date: {env['date']}; torch {env['torch']}; CPU {env['cpu_model']}; "
             "1 thread; each setting in a fresh subprocess (peak RSS = ru_maxrss).", "",
             "## Peak RSS against the number of test episodes (default eval_batch)", "",
             "| episodes | eval_batch | RSS before evaluation (MB) | peak RSS (MB) | s / episode |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['episodes']} | {r['eval_batch']} | {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['sec_per_episode']:.3f} |")
    lines += ["", f"Peak RSS at {rows[-1]['episodes']} episodes / at {rows[0]['episodes']}: **{ratio:.2f}×** "
              f"(goal: at most 1.2×).", "", f"## Chunk size (eval_batch) at {args.chunk_episodes} episodes", "",
              "| eval_batch | peak RSS (MB) | s / episode |", "|---|---|---|"]
    for r in chunks:
        lines.append(f"| {r['eval_batch']} | {r['peak_rss_mb']:.0f} | {r['sec_per_episode']:.3f} |")
    paths = C.write_results("eval_memory", args.quick, data, lines)
    print(f"peak ratio {ratio:.2f}; wrote {paths['md']}")


if __name__ == "__main__":
    main()
