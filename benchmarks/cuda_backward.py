"""The implicit backward on CUDA (issue 16): the iMAML hypergradient, checked against a dense float64
answer, then timed for each route of the layer's backward.

A prepared script for one short GPU session (a few minutes on one H200; not part of the test suite).

Problem: the iMAML-style hypergradient of ``hypergrad_workloads.py`` (B = 25 sinusoid tasks, the
tanh 1-40-40-1 MLP as a flat vector of 1761 parameters, lam = 20, 10 support and 10 query points per
task): ``F_i(phi, theta) = grad L_i(phi_i) + lam (phi_i - theta)``, root by Newton-CG on the device,
hypergradient of the mean query loss through ``implicit_nash.custom_root`` (CG, rtol 1e-10).

1. **Correctness** (float64): every route's hypergradient against a dense reference (the 25 blocks
   ``H_i + lam I`` materialised with ``torch.func.hessian`` and solved by ``torch.linalg.solve``).
   Limit ``1e3 * rtol`` relative.
2. **Cost**: milliseconds per hypergradient (``torch.cuda.synchronize`` around each call, median over
   ``--reps`` calls in a shuffled order after warm-up), products per call, and the first call's time
   (compilation for the compiled route), in float64 and float32, for: CG on the stacked system
   (eager), ``custom_root(blocks=25)`` (a Krylov space per task), the same with
   ``CG(compiled=True)`` (chunks of ``--chunk``, inductor; CUDA graphs are not used), ``Refined``
   (float32 products, float64 only), and torchopt's ``custom_root`` with ``solve_cg`` when it imports.
   JAXopt is timed when ``import jax`` finds a GPU device (it is not installed on a bare machine).

Usage (from the repository root)::

    python benchmarks/cuda_backward.py --out "$OUT"
    python benchmarks/cuda_backward.py --device cpu --reps 3 --out /tmp/cuda_backward_dry   # dry run

Writes ``cuda_backward.json`` and ``cuda_backward.md`` into ``--out`` (default ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import _common as C

C.ensure_importable()

import torch  # noqa: E402
from torch.func import grad, hessian, vmap  # noqa: E402

import implicit_nash as inn  # noqa: E402
from _sinusoid import NUM_PARAMS, mse  # noqa: E402

B, POINTS, LAM = 25, 10, 20.0
#: CG's relative tolerance per dtype (float32 cannot reach float64's)
RTOLS = {torch.float64: 1e-10, torch.float32: 1e-5}
RTOL = RTOLS[torch.float64]


def make_problem(device, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(B, POINTS, generator=gen) * 2 - 1) * 5
    amp = torch.rand(B, 1, generator=gen) * 4.9 + 0.1
    phase = torch.rand(B, 1, generator=gen) * 3.14
    xq = (torch.rand(B, POINTS, generator=gen) * 2 - 1) * 5
    theta = torch.randn(NUM_PARAMS, generator=gen) * 0.1
    to = dict(device=device, dtype=dtype)
    data = {"x": x.to(**to), "y": (amp * torch.sin(x + phase)).to(**to), "xq": xq.to(**to),
            "yq": (amp * torch.sin(xq + phase)).to(**to), "theta": theta.to(**to)}
    task_grad = vmap(grad(lambda p, xi, yi: mse(p, xi, yi, "tanh")))

    def F(phi, th):
        return task_grad(phi, data["x"], data["y"]) + LAM * (phi - th)

    def meta_loss(phi):
        return vmap(lambda p, xi, yi: mse(p, xi, yi, "tanh"))(phi, data["xq"], data["yq"]).mean()

    phi = data["theta"].expand(B, -1).clone()
    for _ in range(12):  # Newton-CG, per task
        r = F(phi, data["theta"])
        if float(r.norm()) <= 1e-12 * float(phi.norm()):
            break
        hvp = (lambda v, p=phi: torch.func.jvp(lambda q: F(q, data["theta"]), (p,), (v.reshape(B, -1),))[1]
               .reshape(-1))
        d, _ = inn.CG(rtol=1e-13, max_steps=2000).solve(hvp, -r.reshape(-1), groups=B)
        phi = phi + d.reshape(B, -1)
    return data, F, meta_loss, phi.detach()


def dense_reference(data, F, meta_loss, phi):
    """-(dF/dtheta)^T (H + lam I)^{-1} dL/dphi, block by block, in float64 on the CPU."""
    cpu = {k: v.detach().cpu().double() for k, v in data.items()}
    phi = phi.detach().cpu().double()
    H = vmap(hessian(lambda p, xi, yi: mse(p, xi, yi, "tanh")))(phi, cpu["x"], cpu["y"])
    H = H + LAM * torch.eye(NUM_PARAMS, dtype=torch.float64)
    phi_q = phi.clone().requires_grad_(True)
    gq = torch.autograd.grad(vmap(lambda p, xi, yi: mse(p, xi, yi, "tanh"))(phi_q, cpu["xq"], cpu["yq"]).mean(),
                             phi_q)[0]
    u = torch.linalg.solve(H, gq.unsqueeze(-1)).squeeze(-1)
    return LAM * u.sum(0)  # dF_i/dtheta = -lam I: the hypergradient is lam * sum_i u_i


def routes(dtype):
    rtol = RTOLS[dtype]
    cg = inn.CG(rtol=rtol, max_steps=2000)
    out = {"CG, stacked (eager)": (cg, 1), f"CG, blocks={B} (eager)": (cg, B),
           f"CG(compiled=True), blocks={B}": (inn.CG(rtol=rtol, max_steps=2000, compiled=True), B)}
    if dtype == torch.float64:
        out[f"Refined(CG), blocks={B}"] = (inn.Refined(solver=inn.CG(), rtol=RTOL, max_steps=2000), B)
    return out


def make_ours(solver, blocks, F, meta_loss, phi, theta, log):
    class Logged(type(solver)):
        def solve(self, *a, **k):
            x, info = super().solve(*a, **k)
            log.append(info)
            return x, info

    logged = Logged(**{f: getattr(solver, f) for f in solver.__dataclass_fields__})
    solve = inn.custom_root(F, linear_solver=logged, symmetric=True, check=False, blocks=blocks)(lambda z0, th: phi)

    def call():
        th = theta.clone().requires_grad_(True)
        return torch.autograd.grad(meta_loss(solve(phi, th)), th)[0]
    return call


def make_torchopt(F, meta_loss, phi, theta, rtol):
    try:
        import torchopt
    except ImportError:
        return None
    solve = torchopt.linear_solve.solve_cg(rtol=rtol, maxiter=2000)

    @torchopt.diff.implicit.custom_root(F, argnums=1, solve=solve)
    def inner(z0, th):
        return z0

    def call():
        th = theta.clone().requires_grad_(True)
        return torch.autograd.grad(meta_loss(inner(phi, th)), th)[0]
    return call


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(device, dtype, reps, chunk):
    torch.manual_seed(0)
    data, F, meta_loss, phi = make_problem(device, dtype)
    ref = dense_reference(data, F, meta_loss, phi) if dtype == torch.float64 else None
    methods, logs = {}, {}
    for name, (solver, blocks) in routes(dtype).items():
        if getattr(solver, "compiled", False):
            solver = inn.CG(rtol=RTOLS[dtype], max_steps=2000, compiled=True, chunk=chunk)
        logs[name] = []
        methods[name] = make_ours(solver, blocks, F, meta_loss, phi, data["theta"], logs[name])
    topt = make_torchopt(F, meta_loss, phi, data["theta"], RTOLS[dtype])
    if topt is not None:
        methods["torchopt custom_root, solve_cg"] = topt
    rows = {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        g = fn()
        sync(device)
        first = time.perf_counter() - t0
        fn()
        err = float((g.detach().cpu().double() - ref).norm() / ref.norm()) if ref is not None else None
        info = logs.get(name, [None])[-1]
        rows[name] = {"first_call_s": first, "rel_error": err, "samples_ms": [],
                      "products": None if info is None else info.matvecs,
                      "message": None if info is None else info.message}
        print(f"- {name:36s} first call {first:6.1f} s  rel. error {err}", flush=True)
    names = list(methods)
    for _ in range(reps):
        random.shuffle(names)
        for name in names:
            sync(device)
            t0 = time.perf_counter()
            methods[name]()
            sync(device)
            rows[name]["samples_ms"].append(1e3 * (time.perf_counter() - t0))
    for r in rows.values():
        r["median_ms"] = statistics.median(r["samples_ms"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here; use --device cpu for a dry run")
    env = C.environment(reps=args.reps, chunk=args.chunk, device=str(device))
    t_start = time.perf_counter()
    results = {}
    for dtype in (torch.float64, torch.float32):
        print(f"== {dtype}", flush=True)
        results[str(dtype)] = run(device, dtype, args.reps, args.chunk)
    C.finish_environment(env)
    bad = {f"{d}: {n}": r["rel_error"] for d, rows in results.items() for n, r in rows.items()
           if r["rel_error"] is not None and not r["rel_error"] <= 1e3 * RTOL}
    lines = C.header_md("The implicit backward on CUDA: the iMAML hypergradient", env,
                        f"{args.reps} calls per method, shuffled, median",
                        [f"B = {B} tasks, tanh 1-40-40-1 MLP ({NUM_PARAMS} parameters), lam = {LAM:g}, "
                         f"CG rtol {RTOLS[torch.float64]:g} in float64, {RTOLS[torch.float32]:g} in float32 "
                         f"(errors against the dense float64 answer: float64 only); compiled chunks of {args.chunk}",
                         "inaccurate: " + (json.dumps(bad) if bad else "none"),
                         f"Total wall time of this run: {time.perf_counter() - t_start:.0f} s"])
    for d, rows in results.items():
        base = rows[f"CG, blocks={B} (eager)"]["median_ms"]
        lines += ["", f"## {d}", ""]
        lines += C.table(["route", "ms / hypergradient", "vs blocks eager", "products", "first call s",
                          "rel. error vs dense"],
                         [[n, f"{r['median_ms']:.2f}", f"{base / r['median_ms']:.2f}x", r["products"] or "n/a",
                           f"{r['first_call_s']:.1f}", C.fmt(r["rel_error"], ".1e")] for n, r in rows.items()])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_backward.json").write_text(json.dumps({"env": env, "results": results}, indent=1, default=str))
    (out / "cuda_backward.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
