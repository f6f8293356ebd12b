"""The floor of one Jacobian-vector product of the iMAML inner residual: eager against compiled.

Issue 16 asks for the floor of the best route tried.  Every solver-side route ends at the cost of one
product with the Jacobian of the inner residual.  This script times one such product on the realistic
workload of ``hypergrad_workloads.py``: 25 sinusoid tasks, a tanh 1-40-40-1 network per task,
``F(phi) = grad MSE(phi) + lam (phi - theta)``, so that ``dF/dphi u`` is a Hessian-vector product plus
``lam u``.  Four ways, each checked against the first:

* ``autograd, cached graph``: ``torch.autograd.grad`` through one graph of F built once (what the
  layer does today outside torch.func transforms);
* ``torch.func.jvp``: forward-over-reverse, eager, a fresh trace per product;
* ``torch.func.jvp, compiled``: the same function under ``torch.compile`` (inductor, CPU), with
  ``phi``, ``theta`` and ``u`` as inputs, so one compilation serves every product of that shape;
* ``torch.func.linearize``: the JVP traced once at ``phi`` and replayed.

Usage::

    python benchmarks/compiled_product.py            # writes benchmarks/results/compiled_product.{json,md}
"""
from __future__ import annotations

import argparse
import time

from _common import (configure_torch, ensure_importable, environment, finish_environment, median, print_table,
                     report_head, write_results)

ensure_importable()

import torch  # noqa: E402
from torch.func import grad, jvp, linearize, vmap  # noqa: E402

from _sinusoid import NUM_PARAMS, mse  # noqa: E402

B, LAM, POINTS = 25, 20.0, 10


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="rounds (median taken)")
    parser.add_argument("--calls", type=int, default=50, help="products per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    configure_torch(args.threads, 0)
    reps, calls = (2, 5) if args.quick else (args.reps, args.calls)
    env = environment(reps=reps, calls=calls)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(B, POINTS, generator=gen) * 2 - 1) * 5
    y = (torch.rand(B, 1, generator=gen) * 4.9 + 0.1) * torch.sin(x + torch.rand(B, 1, generator=gen) * 3.14)
    theta = torch.randn(NUM_PARAMS, generator=gen) * 0.1
    phi = theta + 0.01 * torch.randn(B, NUM_PARAMS, generator=gen)
    u = torch.randn(B, NUM_PARAMS, generator=gen)
    task_grad = vmap(grad(lambda p, xi, yi: mse(p, xi, yi, "tanh")))

    def F(p, th):
        return task_grad(p, x, y) + LAM * (p - th)

    # 1. the layer's route today: one graph of F, autograd.grad per product (F is symmetric in phi)
    z = phi.clone().requires_grad_(True)
    with torch.enable_grad():
        G = F(z, theta)

    def cached(v):
        return torch.autograd.grad(G, z, v, retain_graph=True)[0]

    def fresh_jvp(p, th, v):
        return jvp(lambda q: F(q, th), (p,), (v,))[1]

    compiled = torch.compile(fresh_jvp, dynamic=False)
    t0 = time.perf_counter()
    ref = cached(u)
    out_c = compiled(phi, theta, u)
    compile_s = time.perf_counter() - t0
    _, lin = linearize(lambda q: F(q, theta), phi)
    methods = {
        "autograd, cached graph (the layer today)": lambda: cached(u),
        "torch.func.jvp, eager": lambda: fresh_jvp(phi, theta, u),
        "torch.func.jvp, torch.compile (inductor)": lambda: compiled(phi, theta, u),
        "torch.func.linearize, replayed": lambda: lin(u),
    }
    errors = {name: float((fn() - ref).norm() / ref.norm()) for name, fn in methods.items()}
    assert errors["torch.func.jvp, torch.compile (inductor)"] < 1e-10, errors
    times = {name: [] for name in methods}
    start = time.perf_counter()
    for _ in range(reps):
        for name, fn in methods.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t) / calls * 1e3)
    base = median(times["autograd, cached graph (the layer today)"])
    rows, records = [], []
    for name in methods:
        m = median(times[name])
        rows.append([name, f"{m:.3f}", f"{base / m:.2f}x", f"{errors[name]:.1e}"])
        records.append({"method": name, "ms_per_product": m, "speedup_vs_layer": base / m,
                        "relative_difference": errors[name], "samples_ms": times[name]})
    finish_environment(env)
    headers = ["product", "ms / product (median)", "faster than the layer's", "rel. difference"]
    print_table(headers, rows)
    notes = [f"B = {B} tasks x {NUM_PARAMS} parameters, tanh 1-40-40-1, {POINTS} points per task, lam = {LAM}, "
             "float64",
             f"{reps} rounds of {calls} products per method, interleaved; median of the rounds",
             f"one-off: the first compiled call (compilation) took {compile_s:.1f} s"]
    md = report_head("One product of the iMAML residual's Jacobian: eager against compiled", env,
                     f"{reps} x {calls}", notes, time.perf_counter() - start, headers, rows)
    paths = write_results("compiled_product", args.quick, {"env": env, "records": records,
                                                           "compile_seconds": compile_s}, md)
    print(f"wrote {paths['md']}")


if __name__ == "__main__":
    main()
