r"""A Newton--Krylov solver for the inner game of implicit meta-learning, and a fixed-budget mode.

The inner level of iMAML (and of Nash-iMAML) is the unconstrained game :math:`F(\phi;\theta) = 0`,
with :math:`F` the pseudo-gradient of eq. 12.  Its Jacobian :math:`P = \partial_\phi F` is the
Hessian of the task losses plus :math:`\lambda I` plus the penalty's Jacobian: symmetric for the
plain and centroid-penalty games (potential games), not for :math:`p_R`.  Newton's method on the
root :math:`F = 0` uses it directly:

.. math:: P(\phi_k)\, p_k = -F(\phi_k), \qquad \phi_{k+1} = \phi_k + t_k p_k,

with :math:`p_k` from a truncated Krylov solve (conjugate gradients when :math:`P` is symmetric,
stopped at non-positive curvature; GMRES otherwise) whose matrix-vector products are
vector-Jacobian products of one graph of :math:`F` per Newton step (for a symmetric :math:`P`,
:math:`P v = P^\top v` is one reverse pass), and :math:`t_k` halved until the residual norm
:math:`\|F\|` decreases (a globalised Newton method on the merit :math:`\|F\|^2`; it needs no
potential, so it is valid for non-potential games too).  For a :math:`\mu`-strongly monotone,
smooth :math:`F` it converges quadratically near the solution; gradient-type methods (PRGD)
converge at the rate :math:`1 - c\,\mu/L` per step instead.

Why the inner solves of iMAML with a ReLU network do not converge, whatever the method: the
support loss of a ReLU network is piecewise smooth, and its minimiser typically lies *on* a kink,
where a hidden unit's pre-activation at a support input is exactly zero.  There the loss has a
V-shaped profile across the kink, no gradient vanishes, and the natural residual :math:`\|F\|`
has a floor of the size of the gradient's jump.  Measured on the sinusoid preset (float64,
:math:`\lambda = 10`): L-BFGS and 3,000 gradient steps at :math:`1/L` both stall at
:math:`\|F_i\| \approx 0.03\text{--}0.2` per task, with one to three pre-activations at
:math:`10^{-9}`; the loss is :math:`\lambda`-strongly convex at :math:`\theta` (Hessian spectrum in
:math:`[2.8, 42]`), so neither the step control nor negative curvature is the cause.  With a smooth
activation (``tanh``) the minimiser is a root of :math:`F` and Newton's method reaches the
tolerance in a few steps.  For a ReLU network the implicit meta-gradient is therefore an
approximation whatever the inner budget; the fixed-budget mode (``budget=n``) says so and its
error is measured against a tighter solve (:func:`hypergradient_error`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from .. import _collective
from ..linear_solve import GMRES, LinearOperator, LinearSolver, default_rtol

__all__ = ["NewtonKrylov", "NewtonResult", "newton_krylov", "FixedSteps"]


@dataclass(frozen=True, kw_only=True)
class NewtonKrylov:
    """Hyperparameters of the Newton--Krylov inner solver (see the module docstring).

    Args:
        max_steps: Newton steps at most (tolerance mode), or exactly (``budget`` mode).
        krylov_steps: Krylov iterations per Newton step at most.
        rtol, atol: stop when :math:`\\|F\\| \\le \\text{atol} + \\frac12\\text{rtol}\\,\\|\\phi\\|`
            (``rtol=None``: :func:`~implicit_nash.linear_solve.default_rtol` of the dtype). Half
            the core loop's tolerance, so that the layer that takes the solution over
            (:func:`~implicit_nash.solve_vi`) accepts it at once.
        budget: ``True``: run exactly ``max_steps`` Newton steps of exactly ``krylov_steps``
            Krylov iterations each, with no tolerance test (iMAML's fixed-budget practice).
    """

    max_steps: int = 30
    krylov_steps: int = 20
    rtol: Optional[float] = None
    atol: float = 0.0
    budget: bool = False

    def __post_init__(self):
        for name in ("max_steps", "krylov_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"NewtonKrylov.{name} must be an integer >= 1, got {v!r}")
        if self.rtol is not None and not (isinstance(self.rtol, (int, float)) and 0 < self.rtol < 1):
            raise ValueError(f"NewtonKrylov.rtol must lie in (0, 1), got {self.rtol!r}")
        if isinstance(self.atol, bool) or not isinstance(self.atol, (int, float)) or not 0 <= self.atol < math.inf:
            raise ValueError(f"NewtonKrylov.atol must be a finite number >= 0, got {self.atol!r}")


@dataclass
class NewtonResult:
    """What a Newton--Krylov solve did.

    Attributes:
        value: the flat solution.
        status: ``"converged"``, ``"completed"`` (budget mode), ``"stalled"`` (the line search found
            no decrease, or four Newton steps did not halve the best residual: a kink of a ReLU
            network, see the module docstring) or ``"max_steps"``.
        steps: Newton steps taken.
        residual: :math:`\\|F\\|` at ``value``.
        tolerance: the threshold of the tolerance mode.
        matvecs: Jacobian-vector products.
        evaluations: evaluations of ``F``.
        history: :math:`\\|F\\|` before every Newton step and at the end.
    """

    value: torch.Tensor
    status: str
    steps: int
    residual: float
    tolerance: float
    matvecs: int = 0
    evaluations: int = 0
    history: List[float] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return self.status in ("converged", "completed")


def _rows(v: torch.Tensor, blocks: int) -> torch.Tensor:
    return v.reshape(blocks, -1)


def _truncated_cg(matvec: Callable, b: torch.Tensor, max_steps: int, tol: torch.Tensor, blocks: int):
    """CG on ``A x = b`` from 0, one independent CG per block (``A`` block diagonal when
    ``blocks > 1``), each stopped at its ``tol``, ``max_steps`` or non-positive curvature.

    A block that meets non-positive curvature on its first iteration returns its part of ``b`` (the
    steepest-descent direction of the merit); later, its iterate so far (Steihaug's rule). With one
    block and :mod:`implicit_nash.distributed` sharding, the inner products are all-reduced.
    """
    B = _rows(b, blocks)
    x = torch.zeros_like(B)
    r = B.clone()
    p = r.clone()
    dot = (lambda u, v: torch.tensor([_collective.dot(u.reshape(-1), v.reshape(-1))], dtype=u.dtype,
                                     device=u.device)) if blocks == 1 else (lambda u, v: (u * v).sum(1))
    rs = dot(r, r)
    active = rs.sqrt() > tol
    first = torch.ones_like(active)
    steps = 0
    while steps < max_steps and bool(active.any()):
        Ap = _rows(matvec(p.reshape(-1)), blocks)
        curv = dot(p, Ap)
        bad = active & ~(curv > 0)
        x = torch.where((bad & first)[:, None], B, x)
        active = active & ~bad
        alpha = torch.where(active, rs / torch.where(active, curv, torch.ones_like(curv)), torch.zeros_like(rs))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * Ap
        rs_new = dot(r, r)
        beta = torch.where(active, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = torch.where(active[:, None], r + beta[:, None] * p, p)
        rs = torch.where(active, rs_new, rs)
        first = first & ~active
        active = active & (rs.sqrt() > tol)
        steps += 1
    return x.reshape(-1), steps


def newton_krylov(F: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, options: NewtonKrylov, *,
                  symmetric: bool, blocks: int = 1,
                  objective: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> NewtonResult:
    r"""Solve ``F(z) = 0`` from ``z0`` by globalised Newton--Krylov (see the module docstring).

    ``F`` maps a flat tensor to a flat tensor and must be differentiable by ``torch.autograd`` in
    its argument; its other inputs must not require grad. ``symmetric``: whether ``dF/dz`` is
    symmetric (then one VJP is one Jacobian-vector product, and CG is used). ``blocks > 1``: ``F``
    is separable into that many equal contiguous blocks (uncoupled tasks: block ``i`` of ``F``
    depends on block ``i`` of ``z`` only); each block then gets its own CG and its own line search,
    so that one task's negative curvature or kink does not hold back the others.

    ``objective`` (with ``blocks > 1``): each block's objective, ``z -> (blocks,)``, of which ``F``
    is the gradient (uncoupled minimisations). The line search then asks for Armijo's decrease of
    the objective instead of a decrease of :math:`\|F\|` (which an indefinite Hessian can refuse
    along every direction), and a block whose direction is not a descent direction takes
    :math:`-F` instead: a minimisation method, which does not stop at a non-convex region.
    """
    if blocks > 1 and (not symmetric or z0.numel() % blocks):
        raise ValueError("blocks > 1 needs a symmetric, block-separable F with equal blocks")
    rtol = default_rtol(z0.dtype) if options.rtol is None else options.rtol
    counts = {"matvecs": 0, "evaluations": 0}

    def graph(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            Fz = F(z)
        counts["evaluations"] += 1
        return z, Fz

    def block_norms(v):
        if blocks == 1:
            return torch.tensor([_collective.norm(v.detach())], dtype=v.dtype, device=v.device)
        return _rows(v.detach(), blocks).norm(dim=1)

    z, Fz = graph(z0)
    rb = block_norms(Fz)
    r = float(rb.norm())
    r0 = r
    history = [r]
    tol = options.atol + 0.5 * rtol * _collective.norm(z.detach())
    status = "completed" if options.budget else "max_steps"
    steps = 0
    for steps in range(1, options.max_steps + 1):
        if not math.isfinite(r):
            status = "diverged"
            break
        if not options.budget and r <= tol:
            status, steps = "converged", steps - 1
            break
        double: list = []

        def matvec(v):
            counts["matvecs"] += 1
            if symmetric:  # P v = P^T v: one reverse pass through the graph of F
                (g,) = torch.autograd.grad(Fz, z, v, retain_graph=True)
                return g
            if not double:  # P v as the VJP of the linear map w -> P^T w
                with torch.enable_grad():
                    w = torch.zeros_like(Fz, requires_grad=True)
                    (gw,) = torch.autograd.grad(Fz, z, w, retain_graph=True, create_graph=True)
                double.append((w, gw))
            w, gw = double[0]
            (g,) = torch.autograd.grad(gw, w, v, retain_graph=True)
            return g

        b = -Fz.detach()
        # forcing term: loose far from the root, tight near it (superlinear convergence)
        eta = 0.0 if options.budget else min(0.1, math.sqrt(r / max(r0, 1e-300)))
        if symmetric:
            p, _ = _truncated_cg(matvec, b, options.krylov_steps, eta * rb, blocks)
        else:
            solver = GMRES(max_steps=options.krylov_steps, rtol=max(eta, 1e-30))
            p, _ = solver.solve(LinearOperator(matvec), b)
        # backtracking (per block): halve a block's step until its residual (or objective) decreases
        t = torch.ones_like(rb)
        done = torch.zeros_like(rb, dtype=torch.bool)
        base = z.detach()
        if objective is not None:
            slope = (_rows(Fz.detach(), blocks) * _rows(p, blocks)).sum(1)
            ascent = ~(slope < 0)
            p = torch.where(ascent[:, None], -_rows(Fz.detach(), blocks), _rows(p, blocks)).reshape(-1)
            slope = torch.where(ascent, -rb * rb, slope)
            f0 = objective(base)
            counts["evaluations"] += 1
        for _ in range(10):
            trial = (_rows(base, blocks) + t[:, None] * _rows(p, blocks)).reshape(-1)
            if objective is not None:
                f_new = objective(trial)
                counts["evaluations"] += 1
                ok = torch.isfinite(f_new) & (f_new <= f0 + 1e-4 * t * slope) & (t * slope < 0)
            else:
                z_new, F_new = graph(trial)
                rb_new = block_norms(F_new)
                ok = torch.isfinite(rb_new) & (rb_new <= (1 - 1e-4 * t) * rb)
            done = done | ok
            if bool(done.all()):
                break
            t = torch.where(done, t, 0.5 * t)
        if objective is not None:
            # near a root the objective's decrease falls below its rounding: a block without
            # Armijo's decrease keeps the full step if its residual decreases
            t = torch.where(done, t, torch.ones_like(t))
            z_new, F_new = graph((_rows(base, blocks) + t[:, None] * _rows(p, blocks)).reshape(-1))
            rb_new = block_norms(F_new)
            rescued = ~done & torch.isfinite(rb_new) & (rb_new <= (1 - 1e-4) * rb)
            stay = ~done & ~rescued
            done = done | rescued
            if bool(done.any()) and bool(stay.any()):  # the others stay where they were
                t = torch.where(stay, torch.zeros_like(t), t)
                z_new, F_new = graph((_rows(base, blocks) + t[:, None] * _rows(p, blocks)).reshape(-1))
                rb_new = block_norms(F_new)
            if bool(done.any()):
                done = torch.ones_like(done)
        if not bool(done.any()):
            if not options.budget:
                status, steps = "stalled", steps - 1
                break
            continue  # budget mode: keep the point, spend the step
        if not bool(done.all()):  # blocks without a decrease stay where they were
            t = torch.where(done, t, torch.zeros_like(t))
            z_new, F_new = graph((_rows(base, blocks) + t[:, None] * _rows(p, blocks)).reshape(-1))
            rb_new = block_norms(F_new)
        z, Fz, rb = z_new, F_new, rb_new
        r = float(rb.norm())
        history.append(r)
        if (not options.budget and len(history) > 8 and r > 100 * tol
                and min(history[-4:]) > 0.5 * min(history[:-4])):
            # four Newton steps without halving the best residual, far above the tolerance: a kink
            # (ReLU), not a smooth root (near the tolerance, rounding may slow the last steps)
            status = "stalled"
            break
        tol = options.atol + 0.5 * rtol * _collective.norm(z.detach())
    else:
        if not options.budget and r <= tol:
            status = "converged"
    return NewtonResult(z.detach(), status, steps, r, tol, counts["matvecs"], counts["evaluations"], history)


@dataclass(frozen=True, kw_only=True)
class FixedSteps(LinearSolver):
    """A linear solver run for a fixed number of iterations (iMAML's fixed CG budget).

    It runs ``solver`` with ``max_steps=steps`` and no tolerance of its own and reports the solve as
    done (``converged=True``) whatever its residual: like ``num_steps`` of the forward solvers, a
    fixed budget is the contract, not a failure. The residual it reached is kept in the returned
    info (``residual``, ``message``), and the error this budget causes in the meta-gradient is
    measured by the trainer's hypergradient check.

    Args:
        solver: the Krylov solver (default :class:`~implicit_nash.GMRES`).
        steps: iterations.
    """

    solver: Optional[LinearSolver] = None
    steps: int = 5

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"FixedSteps.steps must be an integer >= 1, got {self.steps!r}")

    def solve(self, A, b, *, groups: int = 1):
        base = GMRES() if self.solver is None else self.solver
        inner = dataclasses.replace(base, max_steps=self.steps, rtol=0.0, atol=0.0)
        x, info = inner.solve(A, b, groups=groups)
        if not bool(torch.isfinite(x).all()):  # a real failure, not the budget: report it as it is
            return x, info
        out = dataclasses.replace(info, converged=True, status="converged",
                                  message=f"fixed budget of {self.steps} steps: relative residual "
                                          f"{info.residual / max(_collective.norm(b), 1e-300):.3g}")
        return x, out
