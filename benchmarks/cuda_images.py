"""Conv-4 MAML and Nash-MAML on CUDA: checked against the CPU in float64, then timed against learn2learn.

A prepared script for one short GPU session (about 5 minutes on one H200; not part of the test suite).

1. **Correctness** (float64, a small case: conv-4 with 8 filters, 16×16 images, 5-way 2-shot with 3
   query images per class, meta-batch 3, 2 inner steps): the meta-gradient of MAML and of Nash-MAML
   (``CentroidPenalty``) on the device (``task_vectorisation="auto"``, i.e. vmapped tasks on CUDA)
   against the CPU's, both of its paths (vmapped tasks and the per-task loop). Limit 1e-9 relative.
   It also checks that the losses and gradients stay on the device.
2. **Cost** (float32, the benchmark problem of ``meta_images_vs_peers.py``: conv-4 with 32 filters,
   84×84, 5-way 5-shot with 15 query images per class, 5 inner steps, second order, Adam): seconds
   per meta-iteration (``torch.cuda.synchronize`` around ``--iters`` iterations, median over
   ``--reps`` repetitions in a shuffled order, one warm-up) and peak CUDA memory
   (``torch.cuda.max_memory_allocated`` from a reset before each method's first iteration), at
   meta-batch 2 and ``--meta-batch-large`` (default 16), for: our MAML with vmapped tasks (the default
   on CUDA), our MAML with the per-task loop, our Nash-MAML + p_C (vmapped), and learn2learn's MAML
   when it can be imported (``--l2l-path``: the unpacked learn2learn 0.2.0 sdist, see
   ``requirements-meta-peers.txt``; carry it to the GPU machine as an ignored folder such as
   ``.peers/learn2learn-0.2.0``, git-ignored: ``mkdir -p .peers && cp -r /tmp/l2l_src/learn2learn-0.2.0
   .peers/`` here, then ``run(carry=[".peers"], ...)``). Ratios are against learn2learn when present, else
   against our loop.

Usage (from the repository root)::

    python benchmarks/cuda_images.py --l2l-path .peers/learn2learn-0.2.0 --out "$OUT"
    python benchmarks/cuda_images.py --device cpu --tiny --out /tmp/cuda_dry   # dry run of the script

Writes ``cuda_images.json`` and ``cuda_images.md`` into ``--out`` (default ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import _common as C

C.ensure_importable()

import torch  # noqa: E402

import meta_images_vs_peers as P  # noqa: E402
from implicit_nash._compat import tree_leaves  # noqa: E402
from implicit_nash.meta import MAML  # noqa: E402
from implicit_nash.penalties import CentroidPenalty  # noqa: E402
from implicit_nash.tasks import Conv4  # noqa: E402


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def _algorithm(kind: str, steps: int, tv: str = "auto"):
    penalty = CentroidPenalty(weight=0.1, num_tasks=1000, inner_lr=P.INNER_LR) if kind == "nash" else None
    return MAML(inner_steps=steps, inner_lr=P.INNER_LR, loss="cross_entropy", penalty=penalty, task_vectorisation=tv)


def check(device, tiny: bool):
    """Float64 meta-gradients on ``device`` against the CPU's (both task paths)."""
    size, ways, shots, query, B = (8, 3, 2, 2, 2) if tiny else (16, 5, 2, 3, 3)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways)
    batch = {"x_support": torch.rand(B, ways * shots, 3, size, size, generator=g, dtype=torch.float64),
             "y_support": labels.repeat_interleave(shots).expand(B, -1).clone(),
             "x_query": torch.rand(B, ways * query, 3, size, size, generator=g, dtype=torch.float64),
             "y_query": labels.repeat_interleave(query).expand(B, -1).clone()}
    rows = []
    for kind in ("maml", "nash"):
        grads = {}
        for where, tv in (("cpu-vmap", "vmap"), ("cpu-loop", "loop"), ("device", "auto")):
            dev = torch.device("cpu") if where.startswith("cpu") else device
            torch.manual_seed(1)
            model = Conv4(3, 8, ways, size).to(torch.float64).to(dev)
            algo = _algorithm(kind, 2, tv)
            theta = algo.init(model)
            losses = algo.task_losses(model, theta, _to(batch, dev))
            leaves = tree_leaves(theta)
            found = torch.autograd.grad(losses.mean(), leaves)
            on_device = losses.device.type == dev.type and all(t.device.type == dev.type for t in found)
            grads[where] = (torch.cat([t.reshape(-1) for t in found]).cpu(), on_device)
        ref = grads["cpu-vmap"][0]
        for where in ("cpu-loop", "device"):
            rel = float((grads[where][0] - ref).norm() / ref.norm())
            ok = rel <= 1e-9 and grads[where][1]
            rows.append({"algorithm": "MAML" if kind == "maml" else "Nash-MAML + p_C", "path": where,
                         "relative_difference": rel, "on_device": grads[where][1], "ok": ok})
            print(f"{'ok ' if ok else 'BAD'} {rows[-1]['algorithm']:16s} {where:9s} vs cpu-vmap: {rel:.2e}"
                  f"{'' if grads[where][1] else ' (left the device)'}", flush=True)
    return rows


def build(name: str, device, size: int, steps: int, l2l):
    model = P.make_model(torch.float32, size).to(device)
    if name == "l2l":
        return P.Learn2Learn(l2l, model)
    kind, tv = {"maml-vmap": ("maml", "vmap"), "maml-loop": ("maml", "loop"),
                "nash-maml-vmap": ("nash", "vmap")}[name]
    return P.Ours(model, _algorithm(kind, steps, tv))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(device, names, size, steps, meta_batch, reps, iters, l2l):
    P.META_BATCH = meta_batch  # the batch helpers and the learn2learn loop read it
    methods = {n: build(n, device, size, steps, l2l) for n in names}
    init = {n: {k: v.detach().clone() for k, v in m.params.items()} for n, m in methods.items()}
    times = {n: [] for n in names}
    peak = {n: None for n in names}
    rng = random.Random(0)
    for rep in range(reps + 1):
        batch = _to(P.make_batch(rep, torch.float32, size), device)
        order = list(names)
        rng.shuffle(order)
        for n in order:
            if device.type == "cuda" and rep == 0:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            seconds = P.restart_and_time(methods[n], init[n], batch, iters, sync=lambda: _sync(device))
            if rep:
                times[n].append(seconds)
            elif device.type == "cuda":
                peak[n] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"  meta-batch {meta_batch}: " + ", ".join(f"{n} {med[n] * 1e3:.1f} ms" +
                                                     (f" / {peak[n]:.0f} MB" if peak[n] is not None else "")
                                                     for n in names), flush=True)
    return {"meta_batch": meta_batch, "times": times, "median": med, "peak_mb": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="'cpu' dry-runs the script itself")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU dry run)")
    p.add_argument("--l2l-path", help="folder holding the learn2learn package (the unpacked 0.2.0 sdist)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--meta-batch-large", type=int, default=16)
    p.add_argument("--out", default=str(C.RESULTS_DIR))
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; nothing to run (use --device cpu --tiny for a dry run)")
        return 1
    device = torch.device(args.device)
    t_start = time.perf_counter()
    rows = check(device, args.tiny)
    l2l, how = None, "not used (no --l2l-path)"
    if args.l2l_path:
        try:
            l2l, how = P.import_l2l(args.l2l_path)
        except Exception as exc:  # report and carry on without the peer
            how = f"could not be imported: {type(exc).__name__}: {exc}"
    print(f"learn2learn: {how}", flush=True)
    size, steps = (16, 2) if args.tiny else (P.SIZE, P.INNER_STEPS)
    reps, iters = (1, 1) if args.tiny else (args.reps, args.iters)
    names = ["maml-vmap", "maml-loop", "nash-maml-vmap"] + (["l2l"] if l2l is not None else [])
    cost = [time_methods(device, names, size, steps, mb, reps, iters, l2l)
            for mb in (2, 2 if args.tiny else args.meta_batch_large)]
    base = "l2l" if l2l is not None else "maml-loop"
    env = C.environment(device=str(device), reps=reps, iters=iters, tiny=args.tiny,
                        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                        elapsed_s=time.perf_counter() - t_start)
    data = {"env": env, "checks": rows, "peer_import": how, "cost": cost, "baseline": base}
    labels = {"maml-vmap": "MAML, vmapped tasks (default on CUDA)", "maml-loop": "MAML, per-task loop",
              "nash-maml-vmap": "Nash-MAML + p_C, vmapped", "l2l": "learn2learn 0.2.0 MAML"}
    lines = ["# Conv-4 MAML and Nash-MAML on CUDA", "", f"Command: `{env['command']}`", "",
             f"Date: {env['date']}; torch {env['torch']}; device {env['gpu'] or device}; "
             f"cudnn.allow_tf32 {env['cudnn_allow_tf32']}; {reps} repetitions of {iters} meta-iterations (median).", "",
             "## Float64 meta-gradients against the CPU (small case)", "",
             "| algorithm | path | relative difference to the CPU's vmapped path | stays on device | ok |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['algorithm']} | {r['path']} | {r['relative_difference']:.1e} | {r['on_device']} | {r['ok']} |"
              for r in rows]
    lines += ["", f"learn2learn: {how}.", "", f"## Cost ({size}×{size}, 5-way 5-shot, {steps} inner steps, "
              "second order, float32)", "",
              "| meta-batch | method | ms / meta-iteration (median) | peak CUDA memory (MB) | speed vs "
              f"{labels[base]} | memory vs it |", "|---|---|---|---|---|---|"]
    for c in cost:
        for n in names:
            pk, pb = c["peak_mb"][n], c["peak_mb"][base]
            lines.append(f"| {c['meta_batch']} | {labels[n]} | {c['median'][n] * 1e3:.1f} | "
                         f"{'-' if pk is None else f'{pk:.0f}'} | {c['median'][base] / c['median'][n]:.2f}× | "
                         f"{'-' if pk is None or not pb else f'{pk / pb:.2f}×'} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_images.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "cuda_images.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'cuda_images.md'} ({time.perf_counter() - t_start:.0f} s)")
    return 0 if all(r["ok"] for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
