"""Two realistic hypergradient workloads: implicit_nash vs torchopt vs JAXopt (jax.jit).

Both workloads are meta-learning hypergradients on the sinusoid tasks of the paper's Section 4.1
(``implicit_nash.tasks.SinusoidTasks``, B = 25 tasks of 10 support and 10 query points, float64,
fixed seed), with the 1-40-40-1 MLP (1,761 numbers per task, 44,025 in the inner problem) and
the *tanh* activation, so that the inner problem has a root (with ReLU the inner minimiser sits on
a kink of the support loss where no gradient vanishes; see ``implicit_nash.meta.inner``: the
implicit gradient is then an approximation whatever the solver, and no dense reference exists).

1. ``imaml``: iMAML.  Task ``i``'s inner problem is
   ``min_phi  MSE_i(phi) + lam/2 ||phi - theta||^2``; the residual is
   ``F_i = grad MSE_i(phi_i) + lam (phi_i - theta)`` and the backward solves
   ``(H_i + lam I) u_i = g_i`` (iMAML's ``(I + H/lam) x = g`` up to the factor ``lam``) by
   conjugate gradients.  ``lam = 20``: with ``lam = 10`` the support-loss Hessians of this batch
   have eigenvalues down to -13 at theta (the large-amplitude tasks), so ``H + 10 I`` is indefinite
   and neither the root nor CG is well defined; the script checks the smallest eigenvalue of every
   ``H_i + lam I`` at the solution.
2. ``nash_pr``: the Nash-GBML inner game with the robust penalty p_R (eq. 14) in implicit mode, as
   ``implicit_nash.meta.IMAML(lam=20, penalty=RobustPenalty(weight=0.01, robustness=2))`` builds it
   (the paper's MAML + p_R(0.01, 2) weights of Table 2, C = 1e-8; a proximal term is needed for
   the game to have an isolated equilibrium with an MLP): player ``i`` minimises
   ``MSE_i(phi_i) + lam/2 ||phi_i - theta||^2 + p_R(theta, phi_i, phi_-i)``.  Its Jacobian is not
   symmetric (p_R couples the tasks), so the backward uses GMRES where the library has one
   (implicit_nash ``GMRES`` at its default restart 50, ``jaxopt.linear_solve.solve_gmres`` at jax's
   default restart 20 with ``solve_method="incremental"``, JAX's best setting here, see
   ``JAX_GMRES_NOTE``); torchopt has
   no GMRES, so it runs ``torchopt.linear_solve.solve_normal_cg`` (CG on the normal equations), and
   for a like-for-like view all three libraries are also run with normal-equation CG and the two
   that have one with BiCGSTAB.

Same problem for every library: the residual is written once in torch (used by implicit_nash and
torchopt, checked against ``implicit_nash.meta``'s game) and once in jax.numpy.  Same forward for
every library: the root ``phi*`` is computed once by Newton--Krylov (``implicit_nash.meta.inner``) to
a residual ~1e-13 and every library's decorated solver returns its start, which is ``phi*``; so
every timed call is the implicit backward plus the library's wrapping (the Newton--Krylov forward
time is reported separately).  implicit_nash is called through its public ``custom_root`` on the
stacked problem (one flat system of 44,025 unknowns, one stopping rule), like the peers;
``check=False`` as JAXopt and torchopt do not check the root either.  For iMAML one more row calls
it on one task's problem under ``torch.func.vmap`` over the 25 tasks (one block-diagonal solve
whose blocks each stop on their own tolerance).

Checked before timing: every hypergradient against a dense float64 reference, ``torch.linalg.solve``
on the materialised Jacobian (``imaml``: the 25 blocks ``H_i + lam I``; ``nash_pr``: the 25 diagonal
blocks plus the rank-one coupling of p_R, solved by the Sherman--Morrison formula, the structured
Jacobian first checked against ``torch.func.jvp`` of the residual), the hypergradient then being
``-(dF/dtheta)^T u`` by one exact vector-Jacobian product.

Timing: every method once per repetition in a shuffled order, after warm-up calls; medians.  Products
with the Jacobian: implicit_nash reads them from its linear solver's report (a thin subclass that
records each ``LinearSolveInfo``), torchopt and JAXopt from counting wrappers around their solve's
``matvec`` (separate, untimed instances; JAXopt's by a ``jax.debug.callback``).  Peak memory: each
method in a fresh subprocess (``--memory-probe``), peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` after setup and one warm-up call) minus the RSS before the calls.

Usage (from the repository root; peers from benchmarks/requirements-peers.txt)::

    nice -n 5 python benchmarks/hypergrad_workloads.py --reps 10
    python benchmarks/hypergrad_workloads.py --workload imaml --reps 2 --no-write --no-memory   # smoke
    python benchmarks/hypergrad_workloads.py --ours-options '{"linear_solver": {"max_steps": 2000}}'

``--ours-options`` (JSON) passes extra keyword options to implicit_nash: ``"linear_solver"`` to every
linear solver it builds, ``"CG"``/``"GMRES"``/``"BiCGSTAB"``/``"NormalCG"`` to that class only,
``"custom_root"`` to ``implicit_nash.custom_root``; the same keys under ``"imaml"`` or ``"nash_pr"``
apply to that workload only, e.g. ``'{"imaml": {"custom_root": {"warm_start": true}}}'``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

# single-threaded torch and XLA: the machine is shared, and the comparison is per core
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np  # noqa: E402

from _common import (command_line, cpu_model, ensure_importable, finish_environment, fmt_bytes,  # noqa: E402
                     package_version, table, write_results)

ensure_importable()

import torch  # noqa: E402
from torch.func import grad as tgrad, vmap as tvmap  # noqa: E402

import implicit_nash as inn  # noqa: E402
import implicit_nash.meta  # noqa: E402,F401
import implicit_nash.tasks  # noqa: E402,F401
from _sinusoid import init_theta, mse  # noqa: E402
from implicit_nash.meta.inner import NewtonKrylov, newton_krylov  # noqa: E402

try:
    import jax

    jax.config.update("jax_enable_x64", True)  # before any array is created
    import jax.numpy as jnp
    import jaxopt

    with warnings.catch_warnings():  # torchopt imports the deprecated `functorch` package
        warnings.simplefilter("ignore")
        import torchopt
except ImportError as err:  # the peers are benchmark-only dependencies
    sys.exit(f"{err}; install the peers first: "
             f"pip install -c constraints-cpu.txt -r benchmarks/requirements-peers.txt")

B, SHOTS, QUERIES = 25, 10, 10
LAM = 20.0
PR_WEIGHT, PR_ROBUSTNESS, PR_C = 0.01, 2, 1e-8
MAX_ITER = 5000        # product cap of every Krylov solve (generous: no solve should reach it)
RESTART = 50           # implicit_nash's GMRES restart (its default)
JAX_RESTART = 20       # JAXopt's GMRES restart (jax.scipy's default)
JAX_GMRES_NOTE = (
    "JAXopt GMRES runs jax.scipy's default restart 20 with `solve_method='incremental'` (Givens rotations, may "
    "stop inside a cycle, as implicit_nash's GMRES does), its best setting measured on this problem (smoke run at "
    "load ~8, min of 3 calls, relative error vs a tight solve): incremental/20 66 ms (1.1e-10), batched/20 168 ms "
    "(1.1e-10), batched/30 390 ms, batched/50 1,333 ms (the batched method always completes a cycle of `restart` "
    "products), incremental/30 and /50 4,962 and 6,964 ms, stagnating at 3.8e-9 (above the 1e-7 acceptance "
    "bound, but short of rtol 1e-10 after 400 products). implicit_nash keeps its default restart 50 (it "
    "converges within the first cycle).")
LAYERS = [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]  # as _sinusoid.LAYER_SHAPES
ACT = "tanh"
#: whether this implicit_nash has custom_root(blocks=...) (a stack of independent problems)
HAS_BLOCKS = "blocks" in inspect.signature(inn.custom_root).parameters
#: chunk length of the compiled rows (None: the solver's default; 0: no compiled rows); --compiled-chunk
COMPILED_CHUNK = None


# --------------------------------------------------------------------------------------------
# The problem: data, residuals in torch and jax, the shared root
# --------------------------------------------------------------------------------------------

def make_data(seed: int) -> Dict[str, torch.Tensor]:
    tasks = inn.tasks.SinusoidTasks(shots=SHOTS, query_shots=QUERIES)
    batch = tasks.sample(B, torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta = init_theta(torch.Generator().manual_seed(seed + 1))
    return {"x": batch["x_support"][..., 0], "y": batch["y_support"][..., 0],
            "xq": batch["x_query"][..., 0], "yq": batch["y_query"][..., 0], "theta": theta,
            "amplitude": batch["amplitude"]}


def torch_residual(data: Dict[str, torch.Tensor], workload: str, activation: str = ACT) -> Callable:
    """``F(phi, theta)`` on ``phi`` of shape (B, 1761): the pseudo-gradient of the inner game."""
    x, y = data["x"], data["y"]
    task_grad = tvmap(tgrad(lambda p, xi, yi: mse(p, xi, yi, activation)))
    k = 2.0 * PR_WEIGHT * B * PR_ROBUSTNESS

    def F(phi, theta):
        d = phi - theta
        out = task_grad(phi, x, y) + LAM * d
        if workload == "nash_pr":  # grad_i p_R = k (C + S - a_i) / (C + S)^2 q_i^(r-1) d_i, a = q^r
            q = (d * d).sum(1)
            a = q ** PR_ROBUSTNESS
            total = PR_C + a.sum()
            out = out + ((total - a) * k / total ** 2 * q ** (PR_ROBUSTNESS - 1))[:, None] * d
        return out

    return F


def torch_meta_loss(data):
    query = tvmap(lambda p, xi, yi: mse(p, xi, yi, ACT))
    return lambda phi: query(phi, data["xq"], data["yq"]).mean()


def jax_mlp(flat, x):
    params, o = [], 0
    for shape in LAYERS:
        n = int(np.prod(shape))
        params.append(flat[o:o + n].reshape(shape))
        o += n
    w1, b1, w2, b2, w3, b3 = params
    h = jnp.tanh(x[:, None] @ w1.T + b1)
    h = jnp.tanh(h @ w2.T + b2)
    return (h @ w3.T + b3)[:, 0]


def jax_mse(flat, x, y):
    return jnp.mean((jax_mlp(flat, x) - y) ** 2)


def jax_residual(workload: str) -> Callable:
    k = 2.0 * PR_WEIGHT * B * PR_ROBUSTNESS
    task_grad = jax.vmap(jax.grad(jax_mse))

    def F(phi, theta, x, y):
        d = phi - theta
        out = task_grad(phi, x, y) + LAM * d
        if workload == "nash_pr":
            q = jnp.sum(d * d, axis=1)
            a = q ** PR_ROBUSTNESS
            total = PR_C + jnp.sum(a)
            out = out + ((total - a) * k / total ** 2 * q ** (PR_ROBUSTNESS - 1))[:, None] * d
        return out

    return F


def check_against_library(data, workload: str, phi: torch.Tensor) -> float:
    """Relative gap between our flat residual and implicit_nash.meta's game (the same game), at a
    point near ``phi`` (at the root both are ~0 and their relative gap means nothing)."""
    phi = phi + 0.01 * torch.randn(phi.shape, generator=torch.Generator().manual_seed(3), dtype=phi.dtype)
    model = inn.tasks.networks.mlp([1, 40, 40, 1], ACT).double()
    names = [n for n, _ in model.named_parameters()]
    sizes = [int(np.prod(s)) for s in LAYERS]

    def as_dict(v, lead=()):
        return {n: t.reshape(*lead, *s) for n, t, s in zip(names, v.split(sizes, -1), LAYERS)}

    penalty = inn.RobustPenalty(weight=PR_WEIGHT, robustness=PR_ROBUSTNESS, C=PR_C) if workload == "nash_pr" else None
    algo = inn.meta.IMAML(lam=LAM, penalty=penalty)
    theta = {"params": as_dict(data["theta"])}
    game = algo.game(model, theta, data["x"][..., None], data["y"][..., None])
    with torch.no_grad():
        ref = game.pseudo_gradient(as_dict(phi, (B,)), theta)
    ref = torch.cat([ref[n].reshape(B, -1) for n in names], 1)
    ours = torch_residual(data, workload)(phi, data["theta"])
    return float((ours - ref).norm() / ref.norm())


def solve_root(data, workload: str, activation: str = ACT) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """phi* by Newton--Krylov from phi_i = theta (nash_pr: warm-started from the iMAML root)."""
    theta = data["theta"]
    t0 = time.perf_counter()
    z0 = theta.expand(B, -1).reshape(-1).clone()
    opts = NewtonKrylov(max_steps=60, krylov_steps=100, rtol=1e-14)
    steps = 0
    for w in (["imaml"] if workload == "imaml" else ["imaml", "nash_pr"]):
        F = torch_residual(data, w, activation)
        # one Newton-Krylov run over the stacked tasks (newton_krylov's per-task mode needs the tasks'
        # objectives; the root is the same)
        res = newton_krylov(lambda v: F(v.reshape(B, -1), theta).reshape(-1), z0, opts, symmetric=w == "imaml")
        z0, steps = res.value, steps + res.steps
    seconds = time.perf_counter() - t0
    phi = z0.reshape(B, -1)
    resid = float(torch_residual(data, workload, activation)(phi, theta).norm())
    return phi, {"newton_steps": steps, "status": res.status, "residual": resid,
                 "relative_residual": resid / float(phi.norm()), "seconds": seconds}


# --------------------------------------------------------------------------------------------
# Dense reference
# --------------------------------------------------------------------------------------------

def dense_reference(data, workload: str, phi: torch.Tensor) -> Dict[str, Any]:
    """The hypergradient from materialised float64 Jacobians and torch.linalg.solve."""
    theta = data["theta"]
    F = torch_residual(data, workload)
    hess = torch.func.hessian(lambda p, xi, yi: mse(p, xi, yi, ACT))
    H = torch.func.vmap(hess)(phi, data["x"], data["y"])  # (B, D, D)
    D = phi.shape[1]
    eye = torch.eye(D, dtype=phi.dtype)
    A = H + LAM * eye
    u_vec = v_vec = None
    if workload == "nash_pr":
        d = phi - theta
        q = (d * d).sum(1)
        k = 2.0 * PR_WEIGHT * B * PR_ROBUSTNESS
        r = PR_ROBUSTNESS

        def coef(qi, S):
            return k * (PR_C + S - qi ** r) / (PR_C + S) ** 2 * qi ** (r - 1)

        S = (q ** r).sum()
        c = coef(q, S)
        dq, dS = torch.func.vmap(torch.func.grad(coef, argnums=(0, 1)), in_dims=(0, None))(q, S)
        # dF_i/dphi_k = delta_ik [H_i + (lam + c_i) I + 2 dc_i/dq_i d_i d_i'] + (dc_i/dS d_i)(r q_k^(r-1) 2 d_k)'
        A = A + c[:, None, None] * eye + 2 * dq[:, None, None] * d[:, :, None] * d[:, None, :]
        u_vec = dS[:, None] * d
        v_vec = (r * q ** (r - 1) * 2)[:, None] * d

    def J(w):  # the structured Jacobian times w, to be checked against autograd
        out = (A @ w[..., None])[..., 0]
        if u_vec is not None:
            out = out + u_vec * (v_vec * w).sum()
        return out

    w = torch.randn(phi.shape, generator=torch.Generator().manual_seed(5), dtype=phi.dtype)
    _, jw = torch.func.jvp(lambda p: F(p, theta), (phi,), (w,))
    structure_gap = float((J(w) - jw).norm() / jw.norm())

    loss = torch_meta_loss(data)
    g = torch.func.grad(loss)(phi)
    # J^T x = g with J^T = blockdiag(A) + v u^T (A symmetric): Sherman--Morrison
    rhs = g[..., None] if u_vec is None else torch.stack([g, v_vec], -1)
    sol = torch.linalg.solve(A, rhs)
    if u_vec is None:
        x = sol[..., 0]
    else:
        Ag, Av = sol[..., 0], sol[..., 1]
        x = Ag - Av * (u_vec * Ag).sum() / (1 + (u_vec * Av).sum())
    _, vjp_theta = torch.func.vjp(lambda th: F(phi, th), theta)
    (hg,) = vjp_theta(-x)
    eig = torch.linalg.eigvalsh(0.5 * (A + A.transpose(1, 2)))
    return {"hypergradient": hg, "structure_gap": structure_gap,
            "min_eig_block": float(eig.min()), "max_eig_block": float(eig.max()),
            "min_eig_hessian_plus_lam": float(torch.linalg.eigvalsh(H).min()) + LAM}


# --------------------------------------------------------------------------------------------
# The methods.  Each builder returns (callable, counts) where the callable computes one
# hypergradient and returns (grad, {"forward": s, "backward": s}) (torch) or (grad, {}) (jax).
# --------------------------------------------------------------------------------------------

SOLVERS = {"cg": "CG", "gmres": "GMRES", "bicgstab": "BiCGSTAB", "normal_cg": "NormalCG"}


def ours_linear_solver(kind: str, tol: float, options: Dict[str, Any], log: List) -> inn.LinearSolver:
    """implicit_nash's solver ``kind`` at ``tol``, with the --ours-options, recording each solve's info."""
    name = SOLVERS[kind]
    base = getattr(inn, name)
    kwargs = {"rtol": tol, "max_steps": MAX_ITER}
    if kind == "gmres":
        kwargs["restart"] = RESTART
    kwargs.update(options.get("linear_solver", {}))
    kwargs.update(options.get(name, {}))

    class Recorded(base):  # the same solver; solve() also keeps its LinearSolveInfo
        def solve(self, *args, **kw):
            x, info = super().solve(*args, **kw)
            log.append(info)
            return x, info

    Recorded.__name__ = Recorded.__qualname__ = name
    return Recorded(**kwargs)


def _timed_ours(forward, theta, loss, log, info):
    """One hypergradient of ours: ``forward()`` (the decorated solve), then the meta-loss's gradient;
    the linear solves' products, steps and statuses from ``log`` go into ``info``."""
    def hypergradient():
        log.clear()
        t0 = time.perf_counter()
        phi = forward()
        t1 = time.perf_counter()
        (g,) = torch.autograd.grad(loss(phi), theta)
        t2 = time.perf_counter()
        info["products"] = [i.matvecs for i in log]
        info["steps"] = [i.steps for i in log]
        info["status"] = [i.status for i in log]
        return g, {"forward": t1 - t0, "backward": t2 - t1}

    return hypergradient


def make_ours(data, phi_star, workload, kind, tol, options, info, blocks=False):
    """implicit_nash's custom_root on the stacked problem; ``blocks``: declare the B tasks independent
    blocks (``custom_root(blocks=B)``: a Krylov space per block; iMAML only, its tasks are uncoupled)."""
    F = torch_residual(data, workload)
    loss = torch_meta_loss(data)
    log: List = []
    solver = ours_linear_solver(kind, tol, options, log)
    root_kw = {"linear_solver": solver, "symmetric": True if workload == "imaml" else False, "check": False}
    if blocks:
        if workload != "imaml":
            raise ValueError("blocks=B declares the tasks independent: the p_R game couples them")
        root_kw["blocks"] = B
    root_kw.update(options.get("custom_root", {}))
    solve = inn.custom_root(F, **root_kw)(lambda z0, th: z0)
    theta = data["theta"].clone().requires_grad_(True)
    start = phi_star.clone()

    return _timed_ours(lambda: solve(start, theta), theta, loss, log, info)


def make_ours_vmap(data, phi_star, workload, kind, tol, options, info):
    """iMAML only: custom_root of ONE task's problem, torch.func.vmap-ped over the tasks (the layer then
    solves the 25 systems as one block-diagonal system whose blocks each stop on their own tolerance)."""
    if workload != "imaml":
        raise ValueError("the vmapped variant is for the uncoupled iMAML problem only")
    loss = torch_meta_loss(data)
    log: List = []
    solver = ours_linear_solver(kind, tol, options, log)

    def F1(z, args):
        th, x, y = args
        return tgrad(lambda p: mse(p, x, y, ACT))(z) + LAM * (z - th)

    root_kw = {"linear_solver": solver, "symmetric": True, "check": False}
    root_kw.update(options.get("custom_root", {}))
    solve = torch.func.vmap(inn.custom_root(F1, **root_kw)(lambda z0, a: z0), in_dims=(0, (None, 0, 0)))
    theta = data["theta"].clone().requires_grad_(True)
    start = phi_star.clone()

    return _timed_ours(lambda: solve(start, (theta, data["x"], data["y"])), theta, loss, log, info)


def make_torchopt(data, phi_star, workload, kind, tol, info, count=False):
    F = torch_residual(data, workload)
    loss = torch_meta_loss(data)
    counter = [0]
    factory = {"cg": torchopt.linear_solve.solve_cg, "normal_cg": torchopt.linear_solve.solve_normal_cg}[kind]
    solve = factory(rtol=tol, maxiter=MAX_ITER)
    if count:
        def solve(A, b, _solve=solve, **kw):  # noqa: F811 - the counting variant wraps the real solver
            def counted(u):
                counter[0] += 1
                return A(u)
            return _solve(counted, b, **kw)

    @torchopt.diff.implicit.custom_root(F, argnums=1, solve=solve)
    def inner(z0, th):
        return z0

    theta = data["theta"].clone().requires_grad_(True)
    start = phi_star.clone()

    def hypergradient():
        counter[0] = 0
        t0 = time.perf_counter()
        phi = inner(start, theta)
        t1 = time.perf_counter()
        (g,) = torch.autograd.grad(loss(phi), theta)
        t2 = time.perf_counter()
        if count:
            info["products"] = counter[0]
        return g, {"forward": t1 - t0, "backward": t2 - t1}

    return hypergradient


def jax_solver(kind: str, tol: float, counter=None) -> Callable:
    base = {"cg": jaxopt.linear_solve.solve_cg, "gmres": jaxopt.linear_solve.solve_gmres,
            "bicgstab": jaxopt.linear_solve.solve_bicgstab,
            "normal_cg": jaxopt.linear_solve.solve_normal_cg}[kind]
    kw = {"tol": tol, "maxiter": MAX_ITER}
    if kind == "gmres":
        # JAX's own default restart (20) and its faster solve_method on this problem (see JAX_GMRES_NOTE);
        # jax's maxiter counts restarts
        kw.update(restart=JAX_RESTART, maxiter=MAX_ITER // JAX_RESTART, solve_method="incremental")
    if counter is None:
        return partial(base, **kw)

    def bump():
        counter[0] += 1

    def solve(matvec, b, **extra):
        def counted(u):  # a runtime callback: counts executions, not traces
            jax.debug.callback(bump, ordered=True)
            return matvec(u)
        return base(counted, b, **kw, **extra)

    return solve


def jax_program(workload: str, kind: str, tol: float, counter=None) -> Callable:
    F = jax_residual(workload)

    def inner(z0, theta, x, y):
        return z0

    inner = jaxopt.implicit_diff.custom_root(F, solve=jax_solver(kind, tol, counter))(inner)

    def meta_loss(theta, z0, x, y, xq, yq):
        phi = inner(z0, theta, x, y)
        return jnp.mean(jax.vmap(jax_mse)(phi, xq, yq))

    return jax.grad(meta_loss)


def jax_args(data, phi_star):
    return tuple(jnp.asarray(t.numpy()) for t in
                 (data["theta"], phi_star, data["x"], data["y"], data["xq"], data["yq"]))


def make_jax(data, phi_star, workload, kind, tol, info):
    args = jax_args(data, phi_star)
    t0 = time.perf_counter()
    compiled = jax.jit(jax_program(workload, kind, tol)).lower(*args).compile()
    info["compile_s"] = time.perf_counter() - t0

    def hypergradient():
        return compiled(*args).block_until_ready(), {}

    return hypergradient


def count_jax_products(data, phi_star, workload, kind, tol) -> int:
    counter = [0]
    args = jax_args(data, phi_star)
    jax.block_until_ready(jax.jit(jax_program(workload, kind, tol, counter))(*args))
    jax.effects_barrier()
    return counter[0]


def method_table(workload: str, loose: bool) -> List[Tuple[str, str, str, float]]:
    """(name, library, linear solver, tolerance) of every method of a workload."""
    if workload == "imaml":
        rows = [(lib, "cg", 1e-10) for lib in ("ours", "torchopt", "jaxopt", "ours_vmap")]
        if HAS_BLOCKS:
            rows.append(("ours_blocks", "cg", 1e-10))
        if COMPILED_CHUNK != 0:  # CG(compiled=True): the Krylov iteration and its products as one compiled program
            rows += [("ours_compiled", "cg", 1e-10), ("ours_blocks_compiled", "cg", 1e-10)]
        if loose:
            rows += [(lib, "cg", 1e-6) for lib in ("ours", "torchopt", "jaxopt")]
    else:
        rows = [("ours", "gmres", 1e-10), ("jaxopt", "gmres", 1e-10), ("torchopt", "normal_cg", 1e-10),
                ("ours", "normal_cg", 1e-10), ("jaxopt", "normal_cg", 1e-10),
                ("ours", "bicgstab", 1e-10), ("jaxopt", "bicgstab", 1e-10)]
        if COMPILED_CHUNK != 0:
            rows.append(("ours_compiled", "bicgstab", 1e-10))
    return [(f"{lib}:{kind}:{tol:g}", lib, kind, tol) for lib, kind, tol in rows]


def build(name: str, data, phi_star, workload, options, info):
    lib, kind, tol = name.split(":")
    tol = float(tol)
    if lib.endswith("_compiled"):
        cls = SOLVERS[kind]
        options = {**options, cls: {**options.get(cls, {}), "compiled": True, "chunk": COMPILED_CHUNK}}  # None: default
        lib = lib[: -len("_compiled")]
    if lib == "ours_blocks":
        return make_ours(data, phi_star, workload, kind, tol, options, info, blocks=True)
    if lib == "ours_vmap":
        return make_ours_vmap(data, phi_star, workload, kind, tol, options, info)
    if lib == "ours":
        return make_ours(data, phi_star, workload, kind, tol, options, info)
    if lib == "torchopt":
        return make_torchopt(data, phi_star, workload, kind, tol, info)
    return make_jax(data, phi_star, workload, kind, tol, info)


# --------------------------------------------------------------------------------------------
# Memory probe: one method in a fresh process
# --------------------------------------------------------------------------------------------

def memory_probe(args) -> int:
    from memory_hypergradient import peak_rss_bytes, release_free_memory, reset_peak_rss
    warnings.simplefilter("ignore")
    torch.set_default_dtype(torch.float64)
    saved = torch.load(args.problem_file)
    data, phi_star, workload = saved["data"], saved["phi_star"], saved["workload"]
    info: Dict[str, Any] = {}
    fn = build(args.memory_probe, data, phi_star, workload, json.loads(args.ours_options), info)
    fn()  # warm-up (and JAX's first run)
    release_free_memory()
    reset_ok = reset_peak_rss()
    before, counter = peak_rss_bytes()
    for _ in range(2):
        fn()
    peak, _ = peak_rss_bytes()
    print(json.dumps({"method": args.memory_probe, "rss_before_bytes": before, "peak_increase_bytes": peak - before,
                      "counter": counter, "reset": reset_ok}))
    return 0


def measure_memory(name: str, problem_file: str, ours_options: str) -> Dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name, "--problem-file", problem_file,
           "--ours-options", ours_options] + ([] if COMPILED_CHUNK is None else ["--compiled-chunk", str(COMPILED_CHUNK)])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# One workload
# --------------------------------------------------------------------------------------------

def rel_err(x, ref: torch.Tensor) -> float:
    x = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x.detach()
    return float((x - ref).norm() / ref.norm())


def options_for(options: Dict[str, Any], workload: str) -> Dict[str, Any]:
    """The --ours-options of one workload: the common entries, updated by those under its name."""
    merged = {k: dict(v) for k, v in options.items() if k not in ("imaml", "nash_pr")}
    for k, v in options.get(workload, {}).items():
        merged[k] = {**merged.get(k, {}), **v}
    return merged


def run_workload(workload: str, args, options: Dict[str, Any]) -> Dict[str, Any]:
    print(f"== {workload}", flush=True)
    options = options_for(options, workload)
    data = make_data(args.seed)
    phi_star, forward = solve_root(data, workload)
    print(f"  root: {forward}", flush=True)
    relu = None
    if workload == "imaml":  # ReLU's situation, for the record: no root to differentiate at
        _, relu = solve_root(data, workload, "relu")
        print(f"  the same with ReLU: {relu}", flush=True)
    library_gap = check_against_library(data, workload, phi_star)
    t0 = time.perf_counter()
    ref = dense_reference(data, workload, phi_star)
    ref_s = time.perf_counter() - t0
    print(f"  dense reference in {ref_s:.0f} s: structure gap {ref['structure_gap']:.1e}, residual vs "
          f"implicit_nash.meta game {library_gap:.1e}, eigenvalues of the symmetric part of the diagonal blocks in "
          f"[{ref['min_eig_block']:.3g}, {ref['max_eig_block']:.3g}]", flush=True)
    methods = method_table(workload, loose=not args.no_loose)
    infos: Dict[str, Dict[str, Any]] = {n: {} for n, *_ in methods}
    fns = {n: build(n, data, phi_star, workload, options, infos[n]) for n, *_ in methods}

    # correctness first (also the warm-up)
    errors, bounds = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, lib, kind, tol in methods:
            t_first = time.perf_counter()
            out, _ = fns[name]()
            infos[name]["first_call_s"] = time.perf_counter() - t_first   # compilation, for the compiled rows
            for _ in range(max(1, args.warmup) - 1):
                out, _ = fns[name]()
            errors[name] = rel_err(out, ref["hypergradient"])
            bounds[name] = 1e3 * tol
            if lib == "torchopt":
                make_torchopt(data, phi_star, workload, kind, tol, infos[name], count=True)()
            elif lib == "jaxopt":
                infos[name]["products"] = count_jax_products(data, phi_star, workload, kind, tol)
            if lib in ("torchopt", "jaxopt") and kind == "normal_cg":
                # the counted matvec runs once per normal product A^T A x; A^T is its vjp (not counted)
                infos[name]["normal_products"] = infos[name]["products"]
                infos[name]["products"] = 2 * infos[name]["products"]
            print(f"  {name:28s} rel. error {errors[name]:.2e}  products {infos[name].get('products')}", flush=True)
    main_names = [n for n, *_ in methods][:3 if workload == "imaml" else 2]
    bad = {n: e for n, e in errors.items() if not e <= bounds[n]}
    if any(n in bad for n in main_names):
        raise SystemExit(f"inaccurate hypergradients: {bad}")

    # A floor for the torch methods, timed with them: as many bare products as ours' main row makes,
    # each one torch.autograd.grad through one cached graph of F (no Krylov arithmetic, no wrapping)
    n_floor = sum(infos[main_names[0]]["products"])
    with torch.enable_grad():
        z_floor = phi_star.clone().requires_grad_(True)
        G_floor = torch_residual(data, workload)(z_floor, data["theta"])
    u_floor = torch.randn(phi_star.shape, generator=torch.Generator().manual_seed(7), dtype=phi_star.dtype)

    def product_floor():
        out = u_floor
        for _ in range(n_floor):
            out = torch.autograd.grad(G_floor, z_floor, u_floor, retain_graph=True)[0]
        return out, {}

    fns["floor"] = product_floor

    # timed runs, interleaved in a shuffled order
    rng = np.random.default_rng(args.seed)
    names = [n for n, *_ in methods] + ["floor"]
    totals: Dict[str, List[float]] = {n: [] for n in names}
    phases: Dict[str, Dict[str, List[float]]] = {n: {} for n in names}
    ours_products: Dict[str, List[Any]] = {n: [] for n in names if n.startswith("ours")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rep in range(args.reps):
            for i in rng.permutation(len(names)):
                name = names[i]
                t0 = time.perf_counter()
                _, ph = fns[name]()
                totals[name].append(time.perf_counter() - t0)
                for k, v in ph.items():
                    phases[name].setdefault(k, []).append(v)
                if name in ours_products:
                    ours_products[name].append(list(infos[name]["products"]))
            print(f"  rep {rep + 1}/{args.reps}", flush=True)
    med = {n: 1e3 * float(np.median(v)) for n, v in totals.items()}
    iqr = {n: [1e3 * float(q) for q in np.percentile(v, [25, 75])] for n, v in totals.items()}
    phase_ms = {n: {k: 1e3 * float(np.median(v)) for k, v in ph.items()} for n, ph in phases.items()}

    memory = {}
    if not args.no_memory:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "problem.pt")
            torch.save({"data": data, "phi_star": phi_star, "workload": workload}, path)
            for n in names[:-1]:
                memory[n] = measure_memory(n, path, json.dumps(options))
                print(f"  memory {n:28s} +{fmt_bytes(memory[n]['peak_increase_bytes'])}", flush=True)

    def ratio(a, b):
        return med[a] / med[b]

    def paired(a, b):
        return float(np.median([x / y for x, y in zip(totals[a], totals[b])]))

    tol_groups = sorted({tol for *_, tol in methods}, reverse=True)
    ratios = {}
    for tol in tol_groups:
        by_lib = {lib: n for n, lib, kind, t in methods if t == tol and lib in ("ours", "torchopt", "jaxopt")}
        if workload == "nash_pr":
            by_lib = {"ours": f"ours:gmres:{tol:g}", "jaxopt": f"jaxopt:gmres:{tol:g}",
                      "torchopt": f"torchopt:normal_cg:{tol:g}"}
        o, j, t = by_lib["ours"], by_lib["jaxopt"], by_lib["torchopt"]
        ratios[f"tol {tol:g}"] = {
            "ours/jaxopt": ratio(o, j), "ours/jaxopt paired": paired(o, j),
            "torchopt/ours": ratio(t, o), "torchopt/ours paired": paired(t, o),
            "goal ours/jaxopt <= 1": ratio(o, j) <= 1.0, "goal torchopt/ours >= 2": ratio(t, o) >= 2.0,
            "methods": by_lib}
        for variant in ("ours_blocks", "ours_compiled", "ours_blocks_compiled"):
            ob = f"{variant}:cg:{tol:g}"
            if ob in med:
                ratios[f"tol {tol:g}, {LABEL[variant]}"] = {
                    "ours/jaxopt": ratio(ob, j), "ours/jaxopt paired": paired(ob, j),
                    "torchopt/ours": ratio(t, ob), "torchopt/ours paired": paired(t, ob),
                    "goal ours/jaxopt <= 1": ratio(ob, j) <= 1.0, "goal torchopt/ours >= 2": ratio(t, ob) >= 2.0,
                    "methods": {"ours": ob, "jaxopt": j, "torchopt": t}}
        if workload == "nash_pr":
            o3 = min((n for n in (f"ours:gmres:{tol:g}", f"ours:bicgstab:{tol:g}", f"ours_compiled:bicgstab:{tol:g}")
                      if n in med), key=med.get)
            j3 = min((f"jaxopt:{k}:{tol:g}" for k in ("gmres", "bicgstab")), key=med.get)
            ratios[f"tol {tol:g}, each library's fastest non-symmetric solver (torchopt: normal CG only)"] = {
                "ours/jaxopt": ratio(o3, j3), "ours/jaxopt paired": paired(o3, j3),
                "torchopt/ours": ratio(t, o3), "torchopt/ours paired": paired(t, o3),
                "goal ours/jaxopt <= 1": ratio(o3, j3) <= 1.0, "goal torchopt/ours >= 2": ratio(t, o3) >= 2.0,
                "methods": {"ours": o3, "jaxopt": j3, "torchopt": t}}
            o2, j2, t2 = f"ours:normal_cg:{tol:g}", f"jaxopt:normal_cg:{tol:g}", f"torchopt:normal_cg:{tol:g}"
            ratios[f"tol {tol:g}, all normal-equation CG"] = {
                "ours/jaxopt": ratio(o2, j2), "ours/jaxopt paired": paired(o2, j2),
                "torchopt/ours": ratio(t2, o2), "torchopt/ours paired": paired(t2, o2),
                "methods": {"ours": o2, "jaxopt": j2, "torchopt": t2}}
    floor = {"products": n_floor, "median_ms": med["floor"], "ms_per_product": med["floor"] / n_floor,
             "method": "torch.autograd.grad(F(z), z, u, retain_graph=True) on one cached graph, in a Python loop"}
    return {"workload": workload, "forward": forward, "relu_forward": relu, "dense_reference_s": ref_s,
            "torch_product_floor": floor,
            "residual_gap_vs_implicit_nash_meta": library_gap,
            "reference": {k: v for k, v in ref.items() if k != "hypergradient"},
            "methods": {n: {"library": lib, "solver": kind, "tol": tol, "rel_error": errors[n],
                            "error_bound": bounds[n], "accurate": n not in bad, "median_ms": med[n],
                            "iqr_ms": iqr[n], "phase_median_ms": phase_ms[n], "info": infos[n],
                            "memory": memory.get(n), "products_per_timed_call": ours_products.get(n)}
                        for n, lib, kind, tol in methods},
            "ratios": ratios, "samples_ms": {n: [1e3 * s for s in v] for n, v in totals.items()}}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

LABEL = {"ours": "implicit_nash custom_root", "ours_vmap": "implicit_nash custom_root, vmapped over tasks",
         "ours_blocks": f"implicit_nash custom_root(blocks={B})", "torchopt": "torchopt custom_root",
         "jaxopt": "JAXopt custom_root, jit",
         "ours_compiled": "implicit_nash custom_root, compiled (CG or BiCGSTAB with compiled=True)",
         "ours_blocks_compiled": f"implicit_nash custom_root(blocks={B}), CG(compiled=True)"}


def products_cell(m: Dict[str, Any]) -> str:
    p = m["info"].get("products")
    if m["library"].startswith("ours"):
        per_call = m["products_per_timed_call"] or []
        distinct = sorted({tuple(c) for c in per_call})
        note = "" if len(distinct) <= 1 else f" (varied over timed calls: {[list(c) for c in distinct]})"
        return f"{sum(p) if p else p}{note}"
    return str(p)


def per_product(m: Dict[str, Any]) -> str:
    """The whole call's median divided by its products (an upper bound on the cost of one product)."""
    p = m["info"].get("products")
    n = sum(p) if isinstance(p, list) else p
    return f"{m['median_ms'] / n:.2f}" if n else "n/a"


def render(result: Dict[str, Any]) -> List[str]:
    env = result["env"]
    lines = [
        "# Realistic hypergradient workloads: implicit_nash vs torchopt vs JAXopt (jit)",
        "",
        f"Command: `{env['command']}`",
        "",
        f"- Date (UTC): {env['date']}",
        f"- Versions: torch {env['torch']}, torchopt {env['torchopt']}, jax {env['jax']} (jaxlib {env['jaxlib']}), "
        f"jaxopt {env['jaxopt']}, implicit_nash {env['implicit_nash']}, numpy {env['numpy']}",
        f"- CPU: {env['cpu']}, {env['cpu_count']} logical cores shared with other jobs; torch threads "
        f"{env['torch_threads']}, XLA_FLAGS `{env['xla_flags']}`",
        f"- Load average (1, 5, 15 min) at start: {', '.join(f'{v:.2f}' for v in env['load_average_at_start'])}; "
        f"at end: {', '.join(f'{v:.2f}' for v in env['load_average_at_end'])}",
        f"- Repetitions: {env['reps']} timed calls per method after {env['warmup']} warm-up calls, interleaved in a "
        f"shuffled order each repetition; medians (IQR in the JSON)",
        f"- implicit_nash options (--ours-options): `{env['ours_options']}`",
        "",
    ]
    for w in result["workloads"]:
        fw, ref = w["forward"], w["reference"]
        title = {"imaml": f"iMAML, tanh 1-40-40-1 MLP, B = {B}, lam = {LAM:g}",
                 "nash_pr": f"Nash-GBML inner game with p_R(w = {PR_WEIGHT}, r = {PR_ROBUSTNESS}, C = {PR_C:g}) "
                            f"+ iMAML proximal lam = {LAM:g}, tanh 1-40-40-1 MLP, B = {B}"}[w["workload"]]
        lines += [f"## {title}", "",
                  f"Forward (shared by all, not timed below): Newton--Krylov (implicit_nash.meta.inner) from "
                  f"phi_i = theta{' (then from the iMAML root)' if w['workload'] == 'nash_pr' else ''}, "
                  f"{fw['newton_steps']} Newton steps, {fw['seconds']:.2f} s, final ||F|| = {fw['residual']:.1e} "
                  f"(relative to ||phi*||: {fw['relative_residual']:.1e}). Diagonal Jacobian blocks' symmetric parts "
                  f"have eigenvalues in [{ref['min_eig_block']:.3g}, {ref['max_eig_block']:.3g}] at phi* "
                  f"(H_i + lam I: smallest {ref['min_eig_hessian_plus_lam']:.3g}). Dense reference: "
                  f"{w['dense_reference_s']:.0f} s; structured Jacobian vs torch.func.jvp of F: "
                  f"{ref['structure_gap']:.1e}; our torch residual vs implicit_nash.meta's game: "
                  f"{w['residual_gap_vs_implicit_nash_meta']:.1e}.", ""]
        if w.get("relu_forward"):
            rl = w["relu_forward"]
            lines += [f"With ReLU instead of tanh (same tasks, same theta, same Newton--Krylov options) the inner "
                      f"solve ends with status '{rl['status']}' at ||F|| = {rl['residual']:.2g} after "
                      f"{rl['newton_steps']} Newton steps: the minimiser sits on a kink of the support loss, no root "
                      f"exists, and an implicit hypergradient has no exact value to be checked against; the "
                      f"workloads therefore use tanh.", ""]
        rows = []
        for n, m in w["methods"].items():
            ph = m["phase_median_ms"]
            mem = m["memory"]
            rows.append([
                LABEL[m["library"]], m["solver"], f"{m['tol']:g}", f"{m['median_ms']:.1f}",
                f"{ph['forward']:.1f}" if "forward" in ph else "(one program)",
                f"{ph['backward']:.1f}" if "backward" in ph else "(one program)",
                products_cell(m), per_product(m), fmt_bytes(mem["peak_increase_bytes"]) if mem else "n/a",
                f"{m['rel_error']:.1e}" + ("" if m["accurate"] else f" ✗ (> {m['error_bound']:.0e})")])
        lines += table(["method", "linear solver", "rtol", "ms / hypergradient", "fwd ms", "bwd ms",
                        "products", "ms / product", "peak RSS +", "rel. error vs dense"], rows)
        fl = w["torch_product_floor"]
        lines += ["", f"Floor of eager torch products (timed interleaved with the methods): {fl['products']} bare "
                  f"products (as many as implicit_nash's main row makes), each `torch.autograd.grad` through one "
                  f"cached graph of F, take {fl['median_ms']:.1f} ms, {fl['ms_per_product']:.2f} ms per product."]
        lines += ["", "| comparison | ours / JAXopt-jit | (paired) | torchopt / ours | (paired) | goals |",
                  "|---|---:|---:|---:|---:|---|"]
        for k, r in w["ratios"].items():
            goals = ""
            if "goal ours/jaxopt <= 1" in r:
                goals = (("met" if r["goal ours/jaxopt <= 1"] else "NOT met") + " (no slower than JAXopt); "
                         + ("met" if r["goal torchopt/ours >= 2"] else "NOT met") + " (2x faster than torchopt)")
            lines.append(f"| {k}: {', '.join(r['methods'].values())} | {r['ours/jaxopt']:.2f} | "
                         f"{r['ours/jaxopt paired']:.2f} | {r['torchopt/ours']:.2f} | {r['torchopt/ours paired']:.2f} "
                         f"| {goals} |")
        lines.append("")
    lines += [
        "## Notes",
        "",
        "- Every call runs the same forward (the solver returns its start, phi*), so *ms / hypergradient* is "
        "the implicit backward plus each library's wrapping: *fwd ms* is the decorated call, *bwd ms* "
        "`torch.autograd.grad` of the meta-loss (torch); JAX runs the whole `jax.grad` as one compiled program.",
        "- *products*: products with the Jacobian (or its transpose) inside the linear solve of one hypergradient. "
        "implicit_nash: `LinearSolveInfo.matvecs`; torchopt/JAXopt: counted wrappers around the `matvec` their "
        "custom_root hands to the solve (JAXopt's through `jax.debug.callback` in a separate jitted program). "
        "Normal-equation CG: implicit_nash counts A and A^T products; the peers apply A^T as the vjp of the counted "
        "matvec, so their column is twice the counted calls. Besides these, each library builds the vjp of F once "
        "and takes one vjp in theta.",
        "- " + JAX_GMRES_NOTE,
        "- Stopping rules differ at the same rtol: JAXopt/torchopt stop at ||r|| <= rtol ||b||, implicit_nash at "
        "||r|| <= rtol (Â ||x|| + ||b||) (Â a lower estimate of ||A||); the relative errors against the dense "
        "answer show what each reached.",
        "- *peak RSS +*: each method in a fresh subprocess: one warm-up call, peak-RSS counter reset "
        "(`/proc/self/clear_refs`), two calls, `VmHWM` minus the RSS before them (torch's allocator and XLA's "
        "buffers alike; tracemalloc does not see either).",
        "- The timed calls repeat the identical problem: a warm-started adjoint (reusing the previous call's "
        "solution) would be measured at its best case here; the products column lists per-call counts if they "
        "changed over the timed calls.",
        f"- JAX ahead-of-time compile times (s): "
        + ", ".join(f"{n} {m['info']['compile_s']:.1f}" for w in result["workloads"] for n, m in w["methods"].items()
                    if "compile_s" in m["info"]) + ".",
        "- First call of the CG(compiled=True) rows (torch.compile's tracing and inductor's code generation, "
        "once per process and problem shape; the compiled code is then reused) (s): "
        + (", ".join(f"{n} {m['info']['first_call_s']:.1f}" for w in result["workloads"]
                     for n, m in w["methods"].items() if "_compiled" in n) or "no compiled rows") + ".",
        "",
    ]
    return lines


def main(argv=None) -> int:
    global COMPILED_CHUNK
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=["imaml", "nash_pr", "all"], default="all")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per method (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per method first (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ours-options", default="{}",
                        help='JSON: {"linear_solver": {...}, "CG"|"GMRES"|...: {...}, "custom_root": {...}}')
    parser.add_argument("--no-loose", action="store_true", help="skip the iMAML rows at rtol 1e-6")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-write", action="store_true", help="print only, write no result files")
    parser.add_argument("--compiled-chunk", type=int, default=None,
                        help="rows with CG(compiled=True, chunk=N) (iMAML) and BiCGSTAB(compiled=True, chunk=N) "
                             "(p_R) (default: the solvers' own, 5 and 3; 0: no compiled rows)")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--problem-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.ours_options)
        if not isinstance(options, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        parser.error(f"--ours-options must be a JSON object: {err}")
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    torch.set_default_dtype(torch.float64)
    COMPILED_CHUNK = args.compiled_chunk
    if args.memory_probe:
        return memory_probe(args)

    env = {"command": command_line(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "torch": torch.__version__, "torchopt": package_version("torchopt"), "jax": jax.__version__,
           "jaxlib": package_version("jaxlib"), "jaxopt": package_version("jaxopt"), "numpy": np.__version__,
           "implicit_nash": inn.__version__, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "load_average_at_start": list(os.getloadavg()), "reps": args.reps, "warmup": args.warmup,
           "ours_options": args.ours_options, "ours_options_per_workload": {
               w: options_for(options, w) for w in ("imaml", "nash_pr")}}
    workloads = ["imaml", "nash_pr"] if args.workload == "all" else [args.workload]
    result = {"env": env, "workloads": [run_workload(w, args, options) for w in workloads]}
    finish_environment(env)
    md = render(result)
    print("\n".join(md))
    if not args.no_write:
        paths = write_results("hypergrad_workloads", False, result, md)
        print(f"wrote {paths['json']} and {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
