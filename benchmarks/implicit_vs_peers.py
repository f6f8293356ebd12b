"""Wall time of one implicit hypergradient: implicit_nash vs torchopt vs JAXopt (jax.jit).

Problem (identical for every library, float64, fixed seed)::

    z*(theta) = argmin_z 1/2 z'Hz - theta'z        i.e.  H z* = theta
    loss      = 1/2 ||z*(theta) - target||^2
    dloss/dtheta = H^{-1} (z* - target)

with ``H = Q diag(lambda) Q'`` symmetric positive definite, ``lambda`` evenly spaced in
``[1, cond]`` (condition number ``cond``, default 100), ``d = 1000``.  Every library solves the
forward system with conjugate gradients to relative tolerance 1e-10 and differentiates it
implicitly with a second CG solve to 1e-10 (the transposed system ``H'u = v``).

Methods timed (one call = forward solve + implicit backward = one hypergradient):

* ``implicit_nash``: forward ``implicit_nash.CG(rtol=1e-10).solve(H, theta)``; the implicit
  backward is attached by :func:`implicit_nash.solve_vi` started *at* that solution (its PRGD
  loop accepts the start after one step, checked below) with
  ``adjoint=Implicit(linear_solver=CG(rtol=1e-10))`` and ``symmetric=True``.
* ``implicit_nash (PRGD forward)``: the plain ``solve_vi`` call from ``z0 = 0`` with the
  library's first-order forward solver ``PRGD(rtol=1e-10)``; reported separately because its
  forward does different (and more) work than a CG solve.
* ``torchopt``: ``torchopt.diff.implicit.custom_root`` with
  ``solve=torchopt.linear_solve.solve_cg(rtol=1e-10)`` around ``torchopt.linalg.cg``.
* ``jaxopt (jit)``: ``jaxopt.implicit_diff.custom_root`` with
  ``solve=partial(jaxopt.linear_solve.solve_cg, tol=1e-10)`` around
  ``jax.scipy.sparse.linalg.cg``; the whole ``jax.grad`` is ``jax.jit``-compiled ahead of time
  (compile time reported separately) and timed with ``block_until_ready``.

Forward-only solves of each library are timed too, so that the backward share can be read off.
All methods are timed in the same process, interleaved in a shuffled order each repetition, after
warm-up calls; the tables report medians.

Usage (from the repository root; peers from benchmarks/requirements-peers.txt)::

    python benchmarks/implicit_vs_peers.py     # writes benchmarks/results/implicit_vs_peers.{json,md}
    python benchmarks/implicit_vs_peers.py --reps 5 --prgd-reps 2 --no-write   # quick look
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

import torch  # noqa: E402

import implicit_nash as inn  # noqa: E402
from _common import package_version  # noqa: E402

try:
    # JAX must be switched to float64 before any array is created.
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import jaxopt

    with warnings.catch_warnings():  # torchopt imports the deprecated `functorch` package
        warnings.simplefilter("ignore")
        import torchopt
except ImportError as err:  # the peers are benchmark-only dependencies
    sys.exit(f"{err}; install the peers first: "
             f"pip install -c constraints-cpu.txt -r benchmarks/requirements-peers.txt")

TOL = 1e-10        # relative tolerance of every CG solve, forward and backward
MAX_ITER = 1000    # CG iteration cap, the same for all (implicit_nash's CG default)


# --------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------

def make_problem(d: int, cond: float, seed: int) -> Dict[str, np.ndarray]:
    """H = Q diag(lambda) Q' with lambda evenly spaced in [1, cond]; theta, target ~ N(0, I)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    eigenvalues = np.linspace(1.0, cond, d)
    H = (Q * eigenvalues) @ Q.T
    H = 0.5 * (H + H.T)  # exactly symmetric in floating point
    theta = rng.standard_normal(d)
    target = rng.standard_normal(d)
    z_star = np.linalg.solve(H, theta)
    hypergrad = np.linalg.solve(H, z_star - target)  # the dense reference answer
    return {"H": H, "theta": theta, "target": target, "hypergrad": hypergrad,
            "eigenvalues": eigenvalues}


def rel_err(x, ref: np.ndarray) -> float:
    x = np.asarray(x.detach() if isinstance(x, torch.Tensor) else x)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


# --------------------------------------------------------------------------------------------
# The methods.  Each `make_*` returns a zero-argument callable that computes one hypergradient
# and returns (gradient, phases) where phases maps a phase name to its wall time in seconds
# (torch methods only; JAX runs as one compiled program).
# --------------------------------------------------------------------------------------------

def make_implicit_nash_cg(H: torch.Tensor, theta: torch.Tensor, target: torch.Tensor, info: dict):
    """CG forward, then solve_vi started at z* to attach the implicit backward.

    solve_vi's tolerance bounds the error in z (``atol + rtol * |z|``), checked through an error
    estimate.  The CG answer meets the backward-stable rule ``|Hz - theta| <= TOL (|H| |z| + |theta|)``,
    so its error can reach ``TOL (|H| |z| + |theta|) / lambda_min``; ``atol`` is set to that bound
    (with ``|z| <= |theta| / lambda_min``), which the start satisfies.
    """
    forward_cg = inn.CG(rtol=TOL, max_steps=MAX_ITER)
    eig = torch.linalg.eigvalsh(H)
    lo, hi = float(eig[0]), float(eig[-1])
    th_norm = float(torch.linalg.vector_norm(theta.detach()))
    attach = inn.PRGD(rtol=TOL, atol=TOL * (hi * th_norm / lo + th_norm) / lo)
    adjoint = inn.Implicit(linear_solver=inn.CG(rtol=TOL, max_steps=MAX_ITER))

    def operator(z, th):
        return H @ z - th

    def hypergradient():
        t0 = time.perf_counter()
        z_star, fwd = forward_cg.solve(H, theta.detach())
        t1 = time.perf_counter()
        sol = inn.vi_solution(operator, z_star, theta, solver=attach, adjoint=adjoint, symmetric=True)
        t2 = time.perf_counter()
        loss = 0.5 * (sol.value - target).square().sum()
        (grad,) = torch.autograd.grad(loss, theta)
        t3 = time.perf_counter()
        info.update(forward_cg_steps=fwd.steps, forward_matvecs=fwd.matvecs,
                    forward_converged=fwd.converged, attach_steps=sol.steps, attach_status=sol.status,
                    attach_operator_evaluations=sol.stats["evaluations"],
                    attach_shift=float(torch.linalg.vector_norm(sol.value.detach() - z_star)
                                       / torch.linalg.vector_norm(z_star)),
                    backward_cg_steps=sol.backward[-1].steps,
                    backward_matvecs=sol.backward[-1].matvecs)
        return grad, {"forward": t1 - t0, "attach": t2 - t1, "backward": t3 - t2}

    return hypergradient


@dataclass(frozen=True, kw_only=True)
class _Logged(inn.LinearSolver):
    """A linear solver that keeps the info of every solve (for the product counts)."""

    inner: inn.LinearSolver
    log: list

    def solve(self, A, b, *, groups=1, x0=None):
        x, info = self.inner.solve(A, b, groups=groups, x0=x0)
        self.log.append(info)
        return x, info


#: the issue-16 routes: name -> (label, mixed precision, compiled CG)
ROUTES = {
    "implicit_nash_root": ("`custom_root(..., CG(rtol=1e-10), check=False)` around `CG(rtol=1e-10)`", False, False),
    "implicit_nash_mixed": ("the same with `Refined(solver=CG(), rtol=1e-10)` both ways (float32 products, "
                            "float64 residuals)", True, False),
    "implicit_nash_compiled": ("the same as the first with `CG(compiled=True)` both ways", False, True),
    "implicit_nash_mixed_compiled": ("`Refined(solver=CG(compiled=True))` both ways", True, True),
}


def make_implicit_nash_root(H: torch.Tensor, theta: torch.Tensor, target: torch.Tensor, info: dict,
                            mixed: bool = False, compiled: int = 0):
    """The route of the other libraries: ``custom_root`` around a CG forward (issue 16).

    ``mixed``: both solves by :class:`implicit_nash.Refined` (products in float32, residuals and the
    stopping rule in float64, the same tolerance).  ``compiled``: CG(compiled=True, chunk=compiled)
    (the iteration and its products as one compiled program per chunk).  H then travels in theta (as data: no gradient is
    computed for it) so that the backward's float32 graph casts it; the casts are paid every call.
    """
    cg = inn.CG(compiled=True, chunk=compiled) if compiled else inn.CG()
    linear = (inn.Refined(solver=cg, rtol=TOL, max_steps=MAX_ITER) if mixed
              else dataclasses.replace(cg, rtol=TOL, max_steps=MAX_ITER))
    z0 = torch.zeros_like(theta.detach())
    fwd_info = {}
    log: List = []
    backward_solver = _Logged(inner=linear, log=log)

    def forward(z_init, args):
        th, H_ = args
        z, fwd = linear.solve(H_, th, x0=None)
        fwd_info["fwd"] = fwd
        return z

    solve = inn.custom_root(lambda z, args: args[1] @ z - args[0], linear_solver=backward_solver,
                            symmetric=True, check=False)(forward)

    def hypergradient():
        t0 = time.perf_counter()
        z = solve(z0, (theta, H))
        t1 = time.perf_counter()
        loss = 0.5 * (z - target).square().sum()
        (grad,) = torch.autograd.grad(loss, theta)
        t2 = time.perf_counter()
        fwd, bwd = fwd_info["fwd"], log[-1]
        log.clear()
        info.update(forward_matvecs=fwd.matvecs, forward_message=fwd.message, backward_matvecs=bwd.matvecs,
                    backward_message=bwd.message)
        return grad, {"forward": t1 - t0, "backward": t2 - t1}

    return hypergradient


def make_implicit_nash_prgd(H: torch.Tensor, theta: torch.Tensor, target: torch.Tensor, info: dict):
    """The plain solve_vi call: PRGD forward from z0 = 0, CG implicit backward."""
    solver = inn.PRGD(rtol=TOL)
    adjoint = inn.Implicit(linear_solver=inn.CG(rtol=TOL, max_steps=MAX_ITER))
    z0 = torch.zeros_like(theta.detach())

    def operator(z, th):
        return H @ z - th

    def hypergradient():
        t0 = time.perf_counter()
        sol = inn.vi_solution(operator, z0, theta, solver=solver, adjoint=adjoint, symmetric=True)
        t1 = time.perf_counter()
        loss = 0.5 * (sol.value - target).square().sum()
        (grad,) = torch.autograd.grad(loss, theta)
        t2 = time.perf_counter()
        info.update(forward_prgd_steps=sol.steps, forward_operator_evaluations=sol.stats["evaluations"],
                    forward_status=sol.status,
                    backward_cg_steps=sol.backward[-1].steps,
                    backward_matvecs=sol.backward[-1].matvecs)
        return grad, {"forward": t1 - t0, "backward": t2 - t1}

    return hypergradient


def make_torchopt(H: torch.Tensor, theta: torch.Tensor, target: torch.Tensor, info: dict,
                  count: bool = False):
    """torchopt.diff.implicit.custom_root around torchopt's own CG.

    With ``count=True`` the products with H (forward) and with the optimality Jacobian
    (backward) are counted; that instance is used for the diagnostics only, never timed.
    """
    counts = {"forward": 0, "backward": 0}

    def matvec(v):
        if count:
            counts["forward"] += 1
        return H @ v

    def optimality(z, th):
        return H @ z - th

    solve = torchopt.linear_solve.solve_cg(rtol=TOL, maxiter=MAX_ITER)
    if count:
        def solve(A, b, _solve=solve):  # noqa: F811 - the counting variant wraps the real solver
            def counted(u):
                counts["backward"] += 1
                return A(u)
            return _solve(counted, b)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def inner(z0, th):
        return torchopt.linalg.cg(matvec, th, x0=z0, rtol=TOL, maxiter=MAX_ITER)

    z0 = torch.zeros_like(theta.detach())

    def hypergradient():
        t0 = time.perf_counter()
        z = inner(z0, theta)
        t1 = time.perf_counter()
        loss = 0.5 * (z - target).square().sum()
        (grad,) = torch.autograd.grad(loss, theta)
        t2 = time.perf_counter()
        if count:
            info.update(forward_matvecs=counts["forward"], backward_matvecs=counts["backward"])
            counts.update(forward=0, backward=0)
        return grad, {"forward": t1 - t0, "backward": t2 - t1}

    return hypergradient


def jax_hypergradient(theta, H, target):
    """dloss/dtheta with JAXopt's implicit custom_root around jax.scipy's CG (to be jitted)."""

    def optimality(z, th):
        return H @ z - th

    @jaxopt.implicit_diff.custom_root(
        optimality, solve=partial(jaxopt.linear_solve.solve_cg, tol=TOL, maxiter=MAX_ITER))
    def inner(z0, th):
        z, _ = jax.scipy.sparse.linalg.cg(lambda v: H @ v, th, x0=z0, tol=TOL, maxiter=MAX_ITER)
        return z

    def loss(th):
        z = inner(jnp.zeros_like(th), th)
        return 0.5 * jnp.sum((z - target) ** 2)

    return jax.grad(loss)(theta)


def jax_forward(theta, H):
    z, _ = jax.scipy.sparse.linalg.cg(lambda v: H @ v, theta, tol=TOL, maxiter=MAX_ITER)
    return z


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def summarize(samples: List[float]) -> Dict[str, float]:
    q = np.percentile(samples, [25, 50, 75])
    return {"median_ms": 1e3 * float(q[1]), "p25_ms": 1e3 * float(q[0]), "p75_ms": 1e3 * float(q[2]),
            "min_ms": 1e3 * min(samples), "n": len(samples)}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=1000, help="dimension (default 1000)")
    parser.add_argument("--cond", type=float, default=100.0, help="condition number of H (default 100)")
    parser.add_argument("--reps", type=int, default=40, help="timed repetitions per method (default 40)")
    parser.add_argument("--prgd-reps", type=int, default=10,
                        help="repetitions of the slow PRGD-forward variant, within the first ones (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per method first (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--no-write", action="store_true", help="print only, write no result files")
    parser.add_argument("--compiled-chunk", type=int, default=5,
                        help="chunk of the CG(compiled=True) routes (default 5; 0: leave them out)")
    args = parser.parse_args(argv)
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    started = _dt.datetime.now().astimezone()
    load_start = os.getloadavg()

    # One-off cost: the first torch.func transform in a process imports torch._dynamo; whichever
    # torch method runs first would otherwise pay it inside its first (warm-up) call.
    t0 = time.perf_counter()
    torch.func.vjp(lambda x: 2 * x, torch.zeros(1))[1](torch.ones(1))
    torch_func_first_use_s = time.perf_counter() - t0

    P = make_problem(args.d, args.cond, args.seed)
    H_t = torch.from_numpy(P["H"])
    theta_t = torch.from_numpy(P["theta"]).clone().requires_grad_(True)
    target_t = torch.from_numpy(P["target"])
    H_j, theta_j, target_j = (jnp.asarray(P[k]) for k in ("H", "theta", "target"))

    # Ahead-of-time compilation of the JAX programs (timed separately).
    t0 = time.perf_counter()
    jax_grad_c = jax.jit(jax_hypergradient).lower(theta_j, H_j, target_j).compile()
    jax_compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax_fwd_c = jax.jit(jax_forward).lower(theta_j, H_j).compile()
    jax_fwd_compile_s = time.perf_counter() - t0

    info = {"implicit_nash": {}, "implicit_nash_prgd": {}, "torchopt": {}, **{n: {} for n in ROUTES}}
    inn_cg = make_implicit_nash_cg(H_t, theta_t, target_t, info["implicit_nash"])
    routes = {n: make_implicit_nash_root(H_t, theta_t, target_t, info[n], mixed=mixed,
                                         compiled=args.compiled_chunk if compiled else 0)
              for n, (_, mixed, compiled) in ROUTES.items() if args.compiled_chunk or not compiled}
    inn_prgd = make_implicit_nash_prgd(H_t, theta_t, target_t, info["implicit_nash_prgd"])
    topt = make_torchopt(H_t, theta_t, target_t, info["torchopt"])
    inn_fwd_cg = inn.CG(rtol=TOL, max_steps=MAX_ITER)
    theta_d = theta_t.detach()

    # Everything timed: name -> callable returning (result, phases).
    def jax_total():
        return jax_grad_c(theta_j, H_j, target_j).block_until_ready(), {}

    def jax_fwd():
        return jax_fwd_c(theta_j, H_j).block_until_ready(), {}

    def inn_forward_only():
        return inn_fwd_cg.solve(H_t, theta_d)[0], {}

    def topt_forward_only():
        return torchopt.linalg.cg(lambda v: H_t @ v, theta_d, rtol=TOL, maxiter=MAX_ITER), {}

    methods: Dict[str, Callable] = {
        "implicit_nash": inn_cg,
        "torchopt": topt,
        "jaxopt_jit": jax_total,
        "implicit_nash_prgd": inn_prgd,
        **routes,
        "fwd:implicit_nash": inn_forward_only,
        "fwd:torchopt": topt_forward_only,
        "fwd:jax_jit": jax_fwd,
    }

    # Correctness first (also the warm-up): every hypergradient against the dense answer.
    errors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchopt's functorch deprecation warnings
        first_call = {}
        for name, fn in methods.items():
            t0 = time.perf_counter()
            out, _ = fn()
            first_call[name] = time.perf_counter() - t0  # torch.compile's tracing and code generation
            for _ in range(max(1, args.warmup) - 1):
                out, _ = fn()
            if not name.startswith("fwd:"):
                errors[name] = rel_err(out, P["hypergrad"])
        # Counts of products for torchopt, from an instrumented copy (never timed).
        make_torchopt(H_t, theta_t, target_t, info["torchopt"], count=True)()

    ok = info["implicit_nash"]["attach_steps"] == 1 and info["implicit_nash"]["attach_status"] == "converged"
    print(f"d={args.d} cond={args.cond:g} float64, CG tol {TOL:g}; torch threads {torch.get_num_threads()}")
    print(f"solve_vi started at the CG solution: {info['implicit_nash']['attach_status']} after "
          f"{info['implicit_nash']['attach_steps']} step(s), moved z* by a relative "
          f"{info['implicit_nash']['attach_shift']:.1e}" + ("" if ok else "  <-- NOT ONE STEP"))
    for name, e in errors.items():
        print(f"relative error vs dense H^-1(z*-target): {name:20s} {e:.2e}")
    bad = {k: v for k, v in errors.items() if not v < 1e-6}
    if bad:
        print(f"ERROR: inaccurate hypergradients {bad}", file=sys.stderr)
        return 1

    # A floor for the torch methods, timed with the others: as many bare products with H as
    # implicit_nash's pipeline performs: forward CG, solve_vi's check of F at z0 (+1) and its
    # PRGD step, the two evaluations of G that build the backward's vjps (+2), the backward CG.
    ci = info["implicit_nash"]
    n_mv = ci["forward_matvecs"] + 1 + ci["attach_operator_evaluations"] + 2 + ci["backward_matvecs"]

    def matvec_floor():
        for _ in range(n_mv):
            out = torch.mv(H_t, theta_d)
        return out, {}

    methods["ref:matvec_floor"] = matvec_floor

    # Timed runs: every repetition runs every method once, in a fresh random order.
    rng = np.random.default_rng(args.seed)
    names = list(methods)
    totals: Dict[str, List[float]] = {n: [] for n in names}
    phases: Dict[str, Dict[str, List[float]]] = {n: {} for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rep in range(args.reps):
            for i in rng.permutation(len(names)):
                name = names[i]
                if name == "implicit_nash_prgd" and rep >= args.prgd_reps:
                    continue  # ~15x slower than the rest: fewer repetitions keep the run short
                t0 = time.perf_counter()
                _, ph = methods[name]()
                totals[name].append(time.perf_counter() - t0)
                for k, v in ph.items():
                    phases[name].setdefault(k, []).append(v)
            print(f"  rep {rep + 1}/{args.reps} done", flush=True)

    timing = {n: summarize(s) for n, s in totals.items()}
    phase_ms = {n: {k: 1e3 * statistics.median(v) for k, v in ph.items()} for n, ph in phases.items()}
    med = {n: t["median_ms"] for n, t in timing.items()}
    # Backward share: measured inside the call for torch; for JAX (one compiled program) it is
    # the difference of the medians of the jitted hypergradient and the jitted forward.
    backward_ms = {"implicit_nash": phase_ms["implicit_nash"]["backward"],
                   "torchopt": phase_ms["torchopt"]["backward"],
                   "jaxopt_jit": med["jaxopt_jit"] - med["fwd:jax_jit"],
                   "implicit_nash_prgd": phase_ms["implicit_nash_prgd"]["backward"]}
    ratios = {
        "implicit_nash / jaxopt_jit (total)": med["implicit_nash"] / med["jaxopt_jit"],
        "torchopt / implicit_nash (total)": med["torchopt"] / med["implicit_nash"],
        "implicit_nash / jaxopt_jit (backward)": backward_ms["implicit_nash"] / backward_ms["jaxopt_jit"],
        "torchopt / implicit_nash (backward)": backward_ms["torchopt"] / backward_ms["implicit_nash"],
        "implicit_nash_prgd / implicit_nash (total)": med["implicit_nash_prgd"] / med["implicit_nash"],
    }
    # Paired ratios: the two methods ran within the same repetition, close in time, so the median
    # of the per-repetition ratios is less exposed to load that drifts over the run.
    paired = {
        "implicit_nash / jaxopt_jit (total)": statistics.median(
            a / b for a, b in zip(totals["implicit_nash"], totals["jaxopt_jit"])),
        "torchopt / implicit_nash (total)": statistics.median(
            a / b for a, b in zip(totals["torchopt"], totals["implicit_nash"])),
        "torchopt / implicit_nash (backward)": statistics.median(
            a / b for a, b in zip(phases["torchopt"]["backward"], phases["implicit_nash"]["backward"])),
    }
    for name in routes:
        ratios[f"{name} / jaxopt_jit (total)"] = med[name] / med["jaxopt_jit"]
        ratios[f"torchopt / {name} (total)"] = med["torchopt"] / med[name]
        paired[f"{name} / jaxopt_jit (total)"] = statistics.median(
            a / b for a, b in zip(totals[name], totals["jaxopt_jit"]))
        paired[f"torchopt / {name} (total)"] = statistics.median(
            a / b for a, b in zip(totals["torchopt"], totals[name]))
    best = min(routes, key=lambda n: med[n])
    r_best_jax, r_best_topt = med[best] / med["jaxopt_jit"], med["torchopt"] / med[best]
    targets_16 = {
        f"issue 16: {best} no slower than jaxopt_jit": {
            "met": r_best_jax <= 1.0, "ratio": r_best_jax,
            "verdict": f"{'met' if r_best_jax <= 1.0 else 'NOT met'}: {med[best]:.1f} ms vs {med['jaxopt_jit']:.1f} ms "
                       f"({r_best_jax:.2f}x)"},
        f"issue 16: {best} at least 2x faster than torchopt": {
            "met": r_best_topt >= 2.0, "ratio": r_best_topt,
            "verdict": f"{'met' if r_best_topt >= 2.0 else 'NOT met'}: torchopt takes {r_best_topt:.2f}x its time"},
    }
    r_jax = ratios["implicit_nash / jaxopt_jit (total)"]
    r_topt = ratios["torchopt / implicit_nash (total)"]
    targets = {
        "implicit_nash no slower than jaxopt_jit": {
            "met": r_jax <= 1.0, "ratio": r_jax,
            "verdict": (f"met: implicit_nash takes {r_jax:.2f}x JAXopt-jit's time" if r_jax <= 1.0 else
                        f"NOT met: implicit_nash is {r_jax:.2f}x slower than JAXopt-jit "
                        f"({med['implicit_nash']:.1f} ms vs {med['jaxopt_jit']:.1f} ms; per-repetition "
                        f"ratio {paired['implicit_nash / jaxopt_jit (total)']:.2f})")},
        **targets_16,
        "implicit_nash at least 3x faster than torchopt": {
            "met": r_topt >= 3.0, "ratio": r_topt,
            "verdict": (f"met: torchopt takes {r_topt:.2f}x implicit_nash's time" if r_topt >= 3.0 else
                        f"NOT met: torchopt takes {r_topt:.2f}x implicit_nash's time "
                        f"({med['torchopt']:.1f} ms vs {med['implicit_nash']:.1f} ms; per-repetition ratio "
                        f"{paired['torchopt / implicit_nash (total)']:.2f}), short of 3x by a factor "
                        f"{3.0 / r_topt:.2f}")},
    }

    env = {
        "command": command, "date": started.isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "torchopt": package_version("torchopt"), "jax": jax.__version__, "jaxlib": package_version("jaxlib"),
        "jaxopt": package_version("jaxopt"), "numpy": np.__version__, "implicit_nash": inn.__version__,
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "jax_devices": [str(dv) for dv in jax.devices()],
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
    }
    result = {
        "env": env,
        "problem": {"d": args.d, "cond": args.cond, "dtype": "float64", "seed": args.seed,
                    "eigenvalues": "evenly spaced in [1, cond]", "cg_tol": TOL, "cg_maxiter": MAX_ITER,
                    "reps": args.reps, "prgd_reps": min(args.prgd_reps, args.reps), "warmup": args.warmup},
        "relative_error_vs_dense": errors,
        "timing_ms": timing,
        "phase_median_ms": phase_ms,
        "backward_median_ms": backward_ms,
        "ratios": ratios,
        "paired_ratios": paired,
        "targets": targets,
        "one_off_s": {"jax_compile_hypergradient": jax_compile_s, "jax_compile_forward": jax_fwd_compile_s,
                      "torch_func_first_use": torch_func_first_use_s,
                      "compiled_first_call": {n: first_call[n] for n in routes if ROUTES[n][2]}},
        "counts": info,
        "torch_matvec_floor": {"matvecs": n_mv, "median_ms": med["ref:matvec_floor"]},
        "samples_ms": {n: [1e3 * s for s in v] for n, v in totals.items()},
    }

    md = render_markdown(result)
    print(md)
    if not args.no_write:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "implicit_vs_peers.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "implicit_vs_peers.md").write_text(md)
        print(f"wrote {out / 'implicit_vs_peers.json'} and {out / 'implicit_vs_peers.md'}")
    return 0


def render_markdown(r: dict) -> str:
    env, prob, t, ph = r["env"], r["problem"], r["timing_ms"], r["phase_median_ms"]
    bw, err, c = r["backward_median_ms"], r["relative_error_vs_dense"], r["counts"]
    one = r["one_off_s"]

    def row(label, name, fwd, bwd, fwd_work, bwd_work, e):
        s = t[name]
        return (f"| {label} | {s['median_ms']:.1f} | {s['p25_ms']:.1f}–{s['p75_ms']:.1f} | {fwd} | {bwd} "
                f"| {fwd_work} | {bwd_work} | {e} |")

    ci, cp, ct = c["implicit_nash"], c["implicit_nash_prgd"], c["torchopt"]
    floor_us = 1e3 * r["torch_matvec_floor"]["median_ms"] / r["torch_matvec_floor"]["matvecs"]
    lines = [
        "# One implicit hypergradient: implicit_nash vs torchopt vs JAXopt (jit)",
        "",
        f"Command: `{env['command']}`  ",
        f"Date: {env['date']}  ",
        f"Versions: torch {env['torch']}, torchopt {env['torchopt']}, jax {env['jax']} "
        f"(jaxlib {env['jaxlib']}), jaxopt {env['jaxopt']}, implicit_nash {env['implicit_nash']}, "
        f"numpy {env['numpy']}, Python {env['python']}  ",
        f"CPU: {env['cpu']}, {env['cpu_count']} logical cores; torch threads {env['torch_threads']}; "
        f"JAX devices {', '.join(env['jax_devices'])}; load average at start/end "
        f"{env['loadavg_start'][0]:.2f} / {env['loadavg_end'][0]:.2f}  ",
        f"Repetitions: {prob['reps']} timed per method ({prob['prgd_reps']} for the slow PRGD-forward variant), "
        f"after {prob['warmup']} warm-up calls, interleaved in a shuffled order each repetition; medians and "
        f"interquartile ranges.",
        "",
        f"Problem: d = {prob['d']}, float64, H SPD with eigenvalues evenly spaced in [1, {prob['cond']:g}] "
        f"(seed {prob['seed']}); z* = H⁻¹θ, loss ½‖z* − target‖², hypergradient H⁻¹(z* − target). "
        f"Every CG solve, forward and backward: relative tolerance {prob['cg_tol']:g}, at most "
        f"{prob['cg_maxiter']} iterations.",
        "",
        "| method (one hypergradient) | median ms | IQR ms | forward ms | backward ms | forward work "
        "| backward work | rel. error vs dense |",
        "|---|---:|---:|---:|---:|---|---|---:|",
        row("implicit_nash (CG forward + solve_vi at z*)", "implicit_nash",
            f"{ph['implicit_nash']['forward']:.1f} + {ph['implicit_nash']['attach']:.1f} attach",
            f"{bw['implicit_nash']:.1f}",
            f"CG {ci['forward_cg_steps']} it / {ci['forward_matvecs']} mv; attach {ci['attach_steps']} "
            f"PRGD step / {ci['attach_operator_evaluations']} F",
            f"CG {ci['backward_cg_steps']} it / {ci['backward_matvecs']} vjp", f"{err['implicit_nash']:.1e}"),
        row("torchopt custom_root + solve_cg", "torchopt", f"{ph['torchopt']['forward']:.1f}",
            f"{bw['torchopt']:.1f}", f"CG {ct['forward_matvecs']} mv", f"CG {ct['backward_matvecs']} vjp",
            f"{err['torchopt']:.1e}"),
        row("JAXopt custom_root + solve_cg, jax.jit", "jaxopt_jit", f"{t['fwd:jax_jit']['median_ms']:.1f}†",
            f"{bw['jaxopt_jit']:.1f}†", "CG (count not exposed)", "CG (count not exposed)",
            f"{err['jaxopt_jit']:.1e}"),
        "",
        "| forward solve alone (no grad) | median ms | IQR ms |",
        "|---|---:|---:|",
        *(f"| {label} | {t[n]['median_ms']:.1f} | {t[n]['p25_ms']:.1f}–{t[n]['p75_ms']:.1f} |"
          for label, n in (("implicit_nash.CG", "fwd:implicit_nash"), ("torchopt.linalg.cg", "fwd:torchopt"),
                           ("jax.scipy.sparse.linalg.cg, jit", "fwd:jax_jit"))),
        "",
        "| issue 16 routes: custom_root around our own CG | median ms | IQR ms | forward ms | backward ms "
        "| forward products | backward products | rel. error vs dense |",
        "|---|---:|---:|---:|---:|---|---|---:|",
        *(row(label, n, f"{ph[n]['forward']:.1f}", f"{ph[n]['backward']:.1f}", f"{c[n]['forward_matvecs']}",
              f"{c[n]['backward_matvecs']}", f"{err[n]:.1e}")
          for n, (label, _, _) in ROUTES.items() if c.get(n)),
        "",
        f"Refined's own account: forward {c['implicit_nash_mixed'].get('forward_message', '')}; backward "
        f"{c['implicit_nash_mixed'].get('backward_message', '')}.",
        "",
        "| separate: the plain solve_vi call, PRGD forward | median ms | IQR ms | forward ms | backward ms "
        "| forward work | backward work | rel. error |",
        "|---|---:|---:|---:|---:|---|---|---:|",
        (f"| implicit_nash `solve_vi(..., solver=PRGD(rtol=1e-10))` | {t['implicit_nash_prgd']['median_ms']:.1f} "
         f"| {t['implicit_nash_prgd']['p25_ms']:.1f}–{t['implicit_nash_prgd']['p75_ms']:.1f} "
         f"| {ph['implicit_nash_prgd']['forward']:.1f} | {bw['implicit_nash_prgd']:.1f} "
         f"| PRGD {cp['forward_prgd_steps']} steps / {cp['forward_operator_evaluations']} F "
         f"| CG {cp['backward_cg_steps']} it / {cp['backward_matvecs']} vjp | {err['implicit_nash_prgd']:.1e} |"),
        "",
        "† JAX runs as one compiled program: its forward is the jitted forward-only solve, its backward the "
        "difference of the two medians. Torch phases are timed inside each call (medians per phase).",
        "",
        "## Ratios (medians) and targets",
        "",
        "| ratio | of the medians | median of per-repetition ratios |",
        "|---|---:|---:|",
        *(f"| {k} | {v:.2f} | {r['paired_ratios'][k]:.2f} |" if k in r["paired_ratios"] else
          f"| {k} | {v:.2f} | |" for k, v in r["ratios"].items()),
        "",
        *(f"- **{k}**: {v['verdict']}." for k, v in r["targets"].items()),
        "",
        "## Where the time goes (torch methods, medians)",
        "",
        f"- Floor: {r['torch_matvec_floor']['matvecs']} bare `torch.mv(H, v)` calls in a Python loop (as many "
        f"products with H as implicit_nash's whole pipeline performs; timed interleaved with the methods) take "
        f"{r['torch_matvec_floor']['median_ms']:.1f} ms, {floor_us:.0f} µs per product: "
        f"{r['torch_matvec_floor']['median_ms'] / t['jaxopt_jit']['median_ms']:.2f}x JAXopt-jit's whole "
        f"hypergradient, and {r['torch_matvec_floor']['median_ms'] / t['implicit_nash']['median_ms']:.2f}x "
        f"implicit_nash's.",
        f"- implicit_nash: forward CG {1e3 * ph['implicit_nash']['forward'] / ci['forward_matvecs']:.0f} µs per "
        f"product with H; backward CG {1e3 * bw['implicit_nash'] / (ci['backward_matvecs'] + 2):.0f} µs per "
        f"product with the Jacobian (a `torch.func.vjp` call, plus the two evaluations of G that build the vjps).",
        f"- torchopt: forward CG {1e3 * ph['torchopt']['forward'] / ct['forward_matvecs']:.0f} µs per product; "
        f"backward CG {1e3 * bw['torchopt'] / (ct['backward_matvecs'] + 2):.0f} µs per product.",
        "",
        "## One-off costs (not in the table)",
        "",
        f"- JAX ahead-of-time compilation (`jax.jit(...).lower(...).compile()`): hypergradient "
        f"{one['jax_compile_hypergradient']:.2f} s, forward alone {one['jax_compile_forward']:.2f} s.",
        f"- First `torch.func` transform in the process (imports `torch._dynamo`; paid once by whichever of "
        f"implicit_nash / torchopt differentiates first): {one['torch_func_first_use']:.2f} s.",
        "- First call of the `CG(compiled=True)` routes (torch.compile's tracing and inductor's code generation, "
        "once per process and shape): " + (", ".join(f"{n} {v:.1f} s" for n, v in one.get("compiled_first_call", {}).items())
                                           or "none run") + ".",
        "",
        "## Setup",
        "",
        "- **Same forward for all.** Each library solves H z = θ with its own conjugate gradients and the "
        "same stopping rule, ‖Hz − θ‖ ≤ 1e-10 ‖θ‖ (implicit_nash `CG(rtol=1e-10)`, "
        "`torchopt.linalg.cg(rtol=1e-10)`, `jax.scipy.sparse.linalg.cg(tol=1e-10)`).",
        "- **implicit_nash's backward.** The implicit backward of implicit_nash is only reachable through "
        "`solve_vi`/`nash_equilibrium`, whose forward solvers are first-order. To give it the CG forward, "
        "`solve_vi(lambda z, th: H @ z - th, z_star, theta, solver=PRGD(rtol=1e-10, atol=1e-10*‖θ‖), "
        "adjoint=Implicit(linear_solver=CG(rtol=1e-10)), symmetric=True)` is called with `z0 = z*` from "
        "`CG(rtol=1e-10).solve(H, theta)`. PRGD accepts the start after one step "
        f"(checked every call: {ci['attach_steps']} step, status {ci['attach_status']}, "
        f"{ci['attach_operator_evaluations']} operator evaluations, z* moved by a relative "
        f"{ci['attach_shift']:.0e}); its cost is the 'attach' column and is counted in the total. "
        "`atol` is needed because solve_vi's tolerance is `atol + rtol·r0` with `r0` the residual at "
        "the start: from a converged start an rtol-only rule asks for ‖F‖ ≈ 1e-20 and never stops.",
        "- **torchopt.** `@torchopt.diff.implicit.custom_root(lambda z, th: H @ z - th, argnums=1, "
        "solve=torchopt.linear_solve.solve_cg(rtol=1e-10, maxiter=1000))` on a solver that runs "
        "`torchopt.linalg.cg`.",
        "- **JAXopt.** `@jaxopt.implicit_diff.custom_root(optimality, solve=partial(jaxopt.linear_solve."
        "solve_cg, tol=1e-10, maxiter=1000))` on `jax.scipy.sparse.linalg.cg`, x64 enabled, the whole "
        "`jax.grad` compiled with `jax.jit` ahead of time (H passed as an argument, not baked in as a "
        "constant), timed with `block_until_ready()`.",
        "- Every hypergradient is checked against the dense `numpy.linalg.solve` answer before timing.",
        "- Timings are wall-clock on a possibly shared machine (see the load average above): compare the "
        "ratios within one run rather than absolute times across runs. torch (OpenMP) and XLA (its own "
        "thread pool) run in the same process with their default thread counts.",
        "- Peers installed (benchmark-only, not package requirements): "
        "`pip install -c constraints-cpu.txt -r benchmarks/requirements-peers.txt` "
        "(the constraint file keeps the on-disk torch 2.13.0 CPU build).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
