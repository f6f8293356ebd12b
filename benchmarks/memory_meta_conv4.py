"""Peak memory of one meta-gradient at the conv-4 image scale against the number of inner steps:
iMAML's implicit meta-gradient against MAML's unrolled one (issue 17).

The network is the conv-4 of Finn et al. (``implicit_nash.tasks.networks.Conv4``: 4 blocks of 32
3x3 filters, batch norm, ReLU, 2x2 pooling), 5-way 5-shot with 5 query images per class on random
3x``--image-size`` images, meta-batch 2, float32. One meta-gradient = ``task_losses`` of the
algorithm on one batch, then ``backward()`` of their mean:

* ``unrolled``: MAML with ``inner_steps = N`` (second order, back-propagated through every step);
* ``implicit``: iMAML (``lam = 1``) whose inner game runs exactly ``N`` steps of the core layer's
  ``SimultaneousGradient`` (the same step as MAML's) and is differentiated implicitly, with GMRES
  capped at 10 iterations (``FixedSteps``): the forward keeps no graph, whatever N;
* ``newton``: iMAML with the Newton-Krylov inner solver budgeted at ``N / 5`` Newton steps of 5 CG
  iterations (so about N Hessian-vector products), and 10 CG iterations per task backward
  (``TaskCG``).

Every ``(mode, N)`` runs in a fresh subprocess, which warms up once, then records the increase of
its peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``) over one
meta-gradient, and the bytes the autograd graph of the meta-loss holds between forward and
backward (the graph walk of ``memory_hypergradient.py``). Repeated ``--reps`` times; medians.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import RESULTS_DIR, ensure_importable, environment, median, report_head

ensure_importable()

import torch  # noqa: E402


MODES = ("implicit", "newton", "unrolled")


def worker(mode: str, steps: int, image_size: int, reps: int) -> dict:
    import warnings
    from memory_hypergradient import graph_saved_bytes, peak_rss_bytes, release_free_memory, reset_peak_rss
    from implicit_nash import SimultaneousGradient
    from implicit_nash.meta import IMAML, MAML
    from implicit_nash.meta.inner import FixedSteps, NewtonKrylov
    from implicit_nash.tasks.networks import Conv4
    import implicit_nash as inn

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    ways, shots, queries, B = 5, 5, 5, 2
    model = Conv4(filters=32, ways=ways, image_size=image_size)
    lr = 0.01
    backward = FixedSteps(solver=inn.GMRES(), steps=10)

    def make(n):
        if mode == "unrolled":
            return MAML(inner_steps=n, inner_lr=lr, loss="cross_entropy")
        if mode == "implicit":
            return IMAML(lam=1.0, loss="cross_entropy", throw=False, linear_solver=backward,
                         solver=SimultaneousGradient(step_size=lr, num_steps=n))
        return IMAML(lam=1.0, loss="cross_entropy", throw=False, budget=max(1, n // 5), cg_budget=10,
                     newton=NewtonKrylov(krylov_steps=5))

    g = torch.Generator().manual_seed(1)
    batch = {"x_support": torch.randn(B, ways * shots, 3, image_size, image_size, generator=g),
             "y_support": torch.arange(ways).repeat(shots).expand(B, -1).clone(),
             "x_query": torch.randn(B, ways * queries, 3, image_size, image_size, generator=g),
             "y_query": torch.arange(ways).repeat(queries).expand(B, -1).clone()}
    algo = make(steps)
    theta = algo.init(model)
    warm = make(2)
    warm.task_losses(model, theta, batch).mean().backward()
    peaks, graph = [], None
    for r in range(reps):
        for t in theta["params"].values():
            t.grad = None
        release_free_memory()
        reset_peak_rss()
        before, counter = peak_rss_bytes()
        loss = algo.task_losses(model, theta, batch).mean()
        if r == 0:
            exclude = list(theta["params"].values()) + list(batch.values())
            graph = graph_saved_bytes(loss, exclude)["bytes"]
        loss.backward()
        after, _ = peak_rss_bytes()
        peaks.append(after - before)
        del loss
    return {"mode": mode, "steps": steps, "peak_increase_bytes": peaks, "graph_bytes": graph, "counter": counter}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 20, 50, 100])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "STEPS"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.image_size, args.reps)))
        return
    start = time.perf_counter()
    env = environment(threads=1)
    results = {}
    for mode in args.modes:
        for n in args.steps:
            out = subprocess.run([sys.executable, __file__, "--worker", mode, str(n), "--image-size",
                                  str(args.image_size), "--reps", str(args.reps)],
                                 capture_output=True, text=True, check=True)
            results[(mode, n)] = json.loads(out.stdout.strip().splitlines()[-1])
            print(mode, n, results[(mode, n)]["graph_bytes"], median(results[(mode, n)]["peak_increase_bytes"]),
                  flush=True)
    rows = []
    lo, hi = min(args.steps), max(args.steps)
    for mode in args.modes:
        peak = {n: median(results[(mode, n)]["peak_increase_bytes"]) for n in args.steps}
        graph = {n: results[(mode, n)]["graph_bytes"] for n in args.steps}
        rows.append([mode] + [f"{peak[n] / 2**20:.1f} / {graph[n] / 2**20:.1f}" for n in args.steps]
                    + [f"{peak[hi] / max(peak[lo], 1):.2f}", f"{graph[hi] / max(graph[lo], 1):.2f}"])
    env["load_average_at_end"] = list(__import__("os").getloadavg())
    lines = report_head(
        "Peak memory of one meta-gradient against inner steps, conv-4 (5-way 5-shot, meta-batch 2)", env,
        f"{args.reps} per configuration, each configuration in a fresh process (medians)",
        [f"images 3x{args.image_size}x{args.image_size}, 32 filters, float32; cells: peak RSS increase MiB / "
         "autograd graph MiB", "newton: N/5 Newton steps of 5 CG (about N Hessian-vector products)"],
        time.perf_counter() - start,
        ["mode"] + [f"N = {n}" for n in args.steps] + [f"peak ratio N={hi}/N={lo}", f"graph ratio N={hi}/N={lo}"],
        rows)
    (RESULTS_DIR / "memory_meta_conv4.md").write_text("\n".join(lines) + "\n")
    (RESULTS_DIR / "memory_meta_conv4.json").write_text(json.dumps(
        {"environment": env, "results": [v for v in results.values()]}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
