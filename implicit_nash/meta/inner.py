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
from typing import Callable, List, Optional, Tuple

import torch

from .. import _collective
from ..implicit import graph_products
from ..linear_solve import (GMRES, LinearOperator, LinearSolveInfo, LinearSolver, _compiled_call,
                            _CompileUnavailable, as_operator, default_rtol)

__all__ = ["NewtonKrylov", "NewtonResult", "newton_krylov", "Coupling", "FixedSteps", "TaskCG"]


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
        message: what else to know (a compiled solve that ran eagerly, and why).
    """

    value: torch.Tensor
    status: str
    steps: int
    residual: float
    tolerance: float
    matvecs: int = 0
    evaluations: int = 0
    history: List[float] = field(default_factory=list)
    message: str = ""

    @property
    def converged(self) -> bool:
        return self.status in ("converged", "completed")


def _rows(v: torch.Tensor, blocks: int) -> torch.Tensor:
    return v.reshape(blocks, -1)


def _truncated_cg(matvec: Callable, b: torch.Tensor, max_steps: int, tol: torch.Tensor, blocks: int,
                  collective: bool = False):
    """CG on ``A x = b`` from 0, one independent CG per block (``A`` block diagonal when
    ``blocks > 1``), each stopped at its ``tol``, ``max_steps`` or non-positive curvature.

    A block that meets non-positive curvature on its first iteration returns its part of ``b`` (the
    steepest-descent direction of the merit); later, its iterate so far (Steihaug's rule). With
    ``collective`` (one block sharded by :mod:`implicit_nash.distributed`), the inner products are
    all-reduced.
    """
    B = _rows(b, blocks)
    x = torch.zeros_like(B)
    r = B.clone()
    p = r.clone()
    dot = (lambda u, v: torch.tensor([_collective.dot(u.reshape(-1), v.reshape(-1))], dtype=u.dtype,
                                     device=u.device)) if collective else (lambda u, v: (u * v).sum(1))
    rs = dot(r, r)
    active = rs.sqrt() > tol
    steps = 0
    while steps < max_steps and bool(active.any()):
        Ap = _rows(matvec(p.reshape(-1)), blocks)
        curv = dot(p, Ap)
        bad = active & ~(curv > 0)
        if bool(bad.any()):  # non-positive curvature: this block stops (Steihaug)
            if steps == 0:
                x = torch.where(bad[:, None], B, x)
            active = active & ~bad
        # inactive blocks: alpha = 0 leaves x and r as they are (p keeps moving; it is not used)
        alpha = torch.where(active, rs, torch.zeros_like(rs)) / torch.where(active, curv, torch.ones_like(curv))
        x = torch.addcmul(x, alpha[:, None], p)
        r = torch.addcmul(r, alpha[:, None], Ap, value=-1)
        rs_new = dot(r, r)
        p = torch.addcmul(r, (rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny))[:, None], p)
        rs = rs_new
        active = active & (rs.sqrt() > tol)
        steps += 1
    return x.reshape(-1), steps


def _cg_budget(matvec: Callable, b: torch.Tensor, steps: int, blocks: int) -> torch.Tensor:
    """:func:`_truncated_cg` with a zero tolerance (the budget mode), written without host
    synchronisation so that ``torch.compile`` traces it whole: the same iterates (a block that
    meets non-positive curvature stops there, Steihaug's rule; a block with a zero residual stays
    put), every block running all ``steps`` products with its updates masked."""
    B = _rows(b, blocks)
    x = torch.zeros_like(B)
    r = B.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    active = rs > 0
    tiny = torch.finfo(rs.dtype).tiny
    for k in range(steps):
        Ap = _rows(matvec(p.reshape(-1)), blocks)
        curv = (p * Ap).sum(1)
        bad = active & ~(curv > 0)
        if k == 0:
            x = torch.where(bad[:, None], B, x)
        active = active & ~bad
        alpha = torch.where(active, rs, torch.zeros_like(rs)) / torch.where(active, curv, torch.ones_like(curv))
        x = torch.addcmul(x, alpha[:, None], p)
        r = torch.addcmul(r, alpha[:, None], Ap, value=-1)
        rs_new = (r * r).sum(1)
        p = torch.addcmul(r, (rs_new / rs.clamp_min(tiny))[:, None], p)
        rs = rs_new
        active = active & (rs > 0)
    return x.reshape(-1)


def _cg_budget_products(fn, steps: int, b: torch.Tensor, blocks: int, *operands) -> torch.Tensor:
    """:func:`_cg_budget` with the product a pure function ``fn(v, *operands)``: the program that the
    compiled Newton steps run."""
    return _cg_budget(lambda v: fn(v, *operands), b, steps, blocks)


def _gmres_budget(matvec: Callable, b: torch.Tensor, steps: int, rows: int = 1):
    """:func:`_gmres` from 0 with no early stop, written without host synchronisation so that
    ``torch.compile`` traces it whole (one process, contiguous rows): each row's iterate of least
    residual over its Krylov space after ``steps`` products, and that residual (from the small
    least-squares problem). A row whose Krylov space is exhausted early keeps its exact solution
    (its later basis vectors are zero)."""
    B = b.reshape(rows, -1)
    beta = (B * B).sum(1).sqrt()
    tiny = torch.finfo(b.dtype).tiny

    def inverse(v, ref):
        return torch.where(v > 1e-14 * ref, 1.0 / v.clamp_min(tiny), torch.zeros_like(v))

    basis = [B * inverse(beta, beta)[:, None]]
    H = torch.zeros(rows, steps + 1, steps, dtype=torch.float64, device=b.device)
    for j in range(steps):
        W = matvec(basis[j].reshape(-1)).reshape(rows, -1)
        V = torch.stack(basis, 1)
        h = (V * W.unsqueeze(1)).sum(2)  # classical Gram-Schmidt, twice
        W = torch.baddbmm(W.unsqueeze(1), h.unsqueeze(1), V, alpha=-1).squeeze(1)
        h2 = (V * W.unsqueeze(1)).sum(2)
        W = torch.baddbmm(W.unsqueeze(1), h2.unsqueeze(1), V, alpha=-1).squeeze(1)
        hn = (W * W).sum(1).sqrt()
        H[:, : j + 1, j] = (h + h2).to(torch.float64)
        H[:, j + 1, j] = hn.to(torch.float64)
        basis.append(W * inverse(hn, beta)[:, None])
    e1 = torch.zeros(rows, steps + 1, 1, dtype=torch.float64, device=b.device)
    e1[:, 0, 0] = beta.to(torch.float64)
    y = torch.linalg.pinv(H) @ e1  # (lstsq's outputs have data-dependent shapes, which dynamo refuses)
    res = (e1 - H @ y).norm(dim=(1, 2))
    X = torch.bmm(y.transpose(1, 2).to(b.dtype), torch.stack(basis[:steps], 1)).squeeze(1)
    return X.reshape(-1), res.to(b.dtype)


def _gmres_budget_products(fn, steps: int, b: torch.Tensor, rows: int, *operands):
    """:func:`_gmres_budget` with the product a pure function ``fn(v, *operands)``."""
    return _gmres_budget(lambda v: fn(v, *operands), b, steps, rows)


def _hessian_product(objective: Callable, coupling: Optional["Coupling"]) -> Callable:
    """``(v, z) -> (d^2/dz^2 sum objective(z)) v`` (+ ``coupling.jvp(z, v)``) by forward-over-reverse
    ``torch.func``: a pure function of tensors, which ``torch.compile`` traces (the eager Newton steps
    take the same product as a reverse pass over the gradient's graph)."""
    from torch.func import grad, jvp

    def product(v, z):
        out = jvp(grad(lambda zz: objective(zz).sum()), (z,), (v,))[1]
        return out if coupling is None else out + coupling.jvp(z, v)
    return product


def _gmres(matvec: Callable, b: torch.Tensor, steps: int, x0: Optional[torch.Tensor] = None,
           rtol: float = 0.0, rows: int = 1, layout=None) -> Tuple[torch.Tensor, int, torch.Tensor, List[float]]:
    """GMRES(``steps``) without restart for small fixed budgets, on ``rows`` independent systems side
    by side (a block-diagonal operator; each row its own Krylov space; ``layout``: the functions
    ``(flat -> rows, rows -> flat)``, default contiguous rows): each row's iterate of least residual
    over its Krylov space from ``x0`` (or 0; a row whose start is no better than 0 starts at 0).
    With one row (the whole system) the inner products are all-reduced when sharded, and the
    iteration stops early when the residual falls to ``rtol`` times the first one. Classical
    Gram--Schmidt run twice (the basis stays orthogonal for these few steps); the small
    least-squares problems are solved at the end (at every step with ``rtol``). Returns the iterate,
    the products used, every row's residual norm from the recurrence (the true one in exact
    arithmetic, without the product that measuring it costs) and the total residual's history."""
    to_rows, to_flat = layout or ((lambda v: v.reshape(rows, -1)), (lambda m: m.reshape(-1)))

    def sq_norms(W):
        out = (W * W).sum(1)
        return _collective.allsum(out) if rows == 1 else out

    B = to_rows(b)
    bn = sq_norms(B).sqrt()
    X = torch.zeros_like(B)
    R, products = B, 0
    if x0 is not None:
        X = to_rows(x0)
        R = B - to_rows(matvec(x0))
        products = 1
        worse = ~(sq_norms(R).sqrt() < bn)  # a start no better than 0 is discarded
        X = torch.where(worse[:, None], torch.zeros_like(X), X)
        R = torch.where(worse[:, None], B, R)
    beta = sq_norms(R).sqrt()
    history = [float(beta.norm())]
    if not math.isfinite(history[0]) or history[0] == 0.0:
        return to_flat(X), products, beta, history
    tiny = torch.finfo(b.dtype).tiny

    def inverse(v, ref):  # 1 / v, 0 where v is negligible against ref (an exhausted Krylov space)
        return torch.where(v > 1e-14 * ref, 1.0 / v.clamp_min(tiny), torch.zeros_like(v))

    V = torch.empty((rows, steps + 1, B.shape[1]), dtype=b.dtype, device=b.device)  # the bases, row-major
    V[:, 0] = R * inverse(beta, beta)[:, None]
    cols = []
    for j in range(steps):
        W = to_rows(matvec(to_flat(V[:, j])))
        products += 1
        basis = V[:, : j + 1]
        h = (basis * W.unsqueeze(1)).sum(2)  # classical Gram-Schmidt, twice
        h = _collective.allsum(h) if rows == 1 else h
        W = torch.baddbmm(W.unsqueeze(1), h.unsqueeze(1), basis, alpha=-1).squeeze(1)
        h2 = (basis * W.unsqueeze(1)).sum(2)
        h2 = _collective.allsum(h2) if rows == 1 else h2
        W = torch.baddbmm(W.unsqueeze(1), h2.unsqueeze(1), basis, alpha=-1).squeeze(1)
        hn = sq_norms(W).sqrt()
        cols.append(torch.cat([h + h2, hn[:, None]], 1))
        if j + 1 < steps:
            V[:, j + 1] = W * inverse(hn, beta)[:, None]
        if rtol > 0:  # the residual so far (the whole system: one row)
            y, res = _least_squares(cols, beta)
            history.append(float(res.norm()))
            if history[-1] <= rtol * history[0]:
                break
    k = len(cols)
    if rtol <= 0:
        y, res = _least_squares(cols, beta)
        history.append(float(res.norm()))
    if not math.isfinite(history[-1]):
        return torch.full_like(b, math.nan), products, torch.full_like(beta, math.nan), history
    X = torch.baddbmm(X.unsqueeze(1), y.transpose(1, 2).to(b.dtype), V[:, :k]).squeeze(1)
    return to_flat(X), products, res.to(b.dtype), history


def _least_squares(cols: List[torch.Tensor], beta: torch.Tensor):
    """GMRES's small problem: ``y`` minimising ``|beta e1 - H y|`` per row, with ``H``'s columns
    ``cols`` (each ``(rows, j + 2)``), and that residual."""
    k = len(cols)
    H = torch.zeros(beta.shape[0], k + 1, k, dtype=torch.float64)
    for j, c in enumerate(cols):
        H[:, : j + 2, j] = c.to(torch.float64)
    e1 = torch.zeros(beta.shape[0], k + 1, 1, dtype=torch.float64)
    e1[:, 0, 0] = beta.to(torch.float64)
    # the minimum-norm solution: H loses rank when a Krylov space is exhausted (the answer is then
    # exact), where lstsq's full-rank driver fails
    y = torch.linalg.pinv(H) @ e1
    return y, (e1 - H @ y).norm(dim=(1, 2))


def _minres_products(fn, steps: int, B: torch.Tensor, *operands):
    """MINRES from 0 on contiguous rows, with the product given as a pure function
    ``fn(v, *operands)`` (the layer's functional form): the program that :class:`TaskCG` compiles."""
    n = B.shape[0]
    return _minres(lambda v: fn(v, *operands), B, steps, torch.zeros_like(B), lambda v: v.reshape(n, -1),
                   lambda m: m.reshape(-1), start_is_zero=True)


def _minres(op: Callable, B: torch.Tensor, steps: int, X: torch.Tensor, rows, flat, start_is_zero: bool = False):
    """MINRES (Paige and Saunders 1975) for ``steps`` iterations on independent symmetric systems
    (one per row of ``B``; ``rows``/``flat`` convert the operator's flat vectors), from ``X`` (a
    row whose start is no better than 0 starts at 0): the
    iterates of GMRES (least residual over each row's Krylov space) with a short recurrence,
    also for indefinite rows. Returns the iterate and each row's residual norm (recurrence)."""
    r1 = B.clone()
    if not start_is_zero and bool(X.any()):  # a row whose start is no better than 0 starts at 0 (as GMRES)
        r = B - rows(op(flat(X)))
        worse = ~(r.norm(dim=1) < B.norm(dim=1))
        X = torch.where(worse[:, None], torch.zeros_like(X), X)
        r1 = torch.where(worse[:, None], B, r)
    beta = r1.norm(dim=1)
    y, r2 = r1, r1
    zero = torch.zeros_like(beta)
    oldb, dbar, epsln, phibar = zero, zero, zero, beta
    cs, sn = torch.full_like(beta, -1.0), zero
    w = w2 = torch.zeros_like(B)
    tiny = torch.finfo(B.dtype).tiny
    for itn in range(steps):
        v = y * torch.where(beta > 0, 1.0 / beta.clamp_min(tiny), zero)[:, None]
        y = rows(op(flat(v)))
        if itn:
            y = torch.addcmul(y, (beta / oldb.clamp_min(tiny))[:, None], r1, value=-1)
        alfa = (v * y).sum(1)
        y = torch.addcmul(y, (alfa / beta.clamp_min(tiny))[:, None], r2, value=-1)
        r1, r2 = r2, y
        oldb, beta = beta, y.norm(dim=1)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.hypot(gbar, beta).clamp_min(tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps[:, None] * w1 - delta[:, None] * w2) / gamma[:, None]
        X = torch.addcmul(X, phi[:, None], w)
    return X, phibar


def _block_layout(n: int, sizes: Optional[Tuple[int, ...]]):
    """``(flat -> rows, rows -> flat)`` for ``n`` blocks: contiguous blocks (``sizes`` None or one
    leaf), or a pytree's leaves one after the other, each holding every block's part (leaf-major)."""
    if sizes is None or len(sizes) == 1:
        return (lambda v: _rows(v, n)), (lambda m: m.reshape(-1))
    cut = [n * s for s in sizes]

    def rows(v):
        return torch.cat([part.reshape(n, -1) for part in v.split(cut)], dim=1)

    def flat(m):
        return torch.cat([part.reshape(-1) for part in m.split(list(sizes), dim=1)])
    return rows, flat


def _matvec_on(Fz: torch.Tensor, z: torch.Tensor, symmetric: bool, counts: dict) -> Callable:
    """Products with :math:`P = \\partial_z F` on one graph of ``F`` (the layer's
    :func:`~implicit_nash.implicit.graph_products`; a symmetric ``P`` needs only the VJP), counted."""
    PT, P = graph_products(Fz, z)
    product = PT if symmetric else P

    def matvec(v):
        counts["matvecs"] += 1
        return product(v)

    return matvec


def _forcing(options: NewtonKrylov, r: float, r0: float) -> float:
    """The inexact Newton forcing term: loose far from the root, tight near it (superlinear
    convergence); 0 (the whole Krylov budget) in budget mode."""
    return 0.0 if options.budget else min(0.1, math.sqrt(r / max(r0, 1e-300)))


def _stop(options: NewtonKrylov, r: float, tol: float) -> Optional[str]:
    """Why to stop before a Newton step: a non-finite residual, or the tolerance met."""
    if not math.isfinite(r):
        return "diverged"
    return "converged" if not options.budget and r <= tol else None


def _stalled(history: List[float], r: float, tol: float) -> bool:
    """Four Newton steps without halving the best residual, far above the tolerance: a kink (ReLU),
    not a smooth root (near the tolerance, rounding may slow the last steps)."""
    return len(history) > 8 and r > 100 * tol and min(history[-4:]) > 0.5 * min(history[:-4])


def newton_krylov(F: Optional[Callable[[torch.Tensor], torch.Tensor]], z0: torch.Tensor, options: NewtonKrylov,
                  *, symmetric: bool, blocks: int = 1,
                  objective: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                  coupling: Optional[Coupling] = None, warm: int = 0, compiled: Optional[str] = None) -> NewtonResult:
    r"""Solve ``F(z) = 0`` from ``z0`` by globalised Newton--Krylov (see the module docstring).

    ``F`` maps a flat tensor to a flat tensor and must be differentiable by ``torch.autograd`` in
    its argument; its other inputs must not require grad. ``symmetric``: whether ``dF/dz`` is
    symmetric (then one VJP is one Jacobian-vector product, and CG is used).

    ``objective`` (uncoupled minimisations; ``F`` is then ignored and may be ``None``):
    ``z -> (blocks,)``, each block's objective, differentiable by ``torch.autograd``; block ``i``
    depends on the ``i``-th of ``blocks`` equal contiguous blocks of ``z`` only, and ``F`` is the
    gradient of the objectives' sum, computed from the same graph as their values (one evaluation
    gives both, and its graph gives the Hessian-vector products). Each block gets its own CG and
    its own Armijo line search on its own objective (a block whose Newton direction is not a
    descent direction takes :math:`-F`): a minimisation method, which does not stop at a
    non-convex region, and one block's kink or negative curvature does not hold back the others.

    ``coupling`` (with ``objective``): a :class:`Coupling` term in closed form added to the
    objectives' gradient (a Nash-GBML penalty): ``F`` is then the objectives' gradient plus
    ``coupling.gradient``, solved as one system whose products cost one Hessian-vector product of
    the objectives plus ``coupling.jvp`` (no graph of the coupling, no double-backward product for
    a non-symmetric ``F``). ``warm``: that many Newton steps on the uncoupled objectives first (a
    warm start, valid since the solution does not depend on the start; they do not count against
    ``options.max_steps``).
    """
    if objective is not None:
        if blocks < 1 or z0.numel() % blocks:
            raise ValueError(f"objective needs blocks dividing len(z0) = {z0.numel()}, got {blocks!r}")
        if isinstance(warm, bool) or not isinstance(warm, int) or warm < 0:
            raise ValueError(f"warm must be an integer >= 0, got {warm!r}")
        return _minimise_blocks(objective, z0, options, blocks, coupling, warm, compiled)
    if coupling is not None:
        raise ValueError("a coupling needs the block objectives (objective=)")
    if F is None:
        raise ValueError("newton_krylov needs F, or an objective whose gradient is F")
    if blocks != 1:
        raise ValueError("blocks > 1 needs an objective (uncoupled minimisations)")
    rtol = default_rtol(z0.dtype) if options.rtol is None else options.rtol
    counts = {"matvecs": 0, "evaluations": 0}

    def graph(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            Fz = F(z)
        counts["evaluations"] += 1
        return z, Fz

    z, Fz = graph(z0)
    r = _collective.norm(Fz.detach())
    r0 = r
    history = [r]
    tol = options.atol + 0.5 * rtol * _collective.norm(z.detach())
    status = "completed" if options.budget else "max_steps"
    steps = 0
    for steps in range(1, options.max_steps + 1):
        stop = _stop(options, r, tol)
        if stop:
            status, steps = stop, steps - (stop == "converged")
            break
        matvec = _matvec_on(Fz, z, symmetric, counts)
        b = -Fz.detach()
        eta = _forcing(options, r, r0)
        if symmetric:
            p, _ = _truncated_cg(matvec, b, options.krylov_steps, torch.tensor([eta * r], dtype=b.dtype), 1,
                                 collective=True)
        else:
            p, _ = GMRES(max_steps=options.krylov_steps, rtol=max(eta, 1e-30)).solve(LinearOperator(matvec), b)
        # backtracking: halve the step until the residual decreases (the trial's graph is kept)
        base, t, found = z.detach(), 1.0, False
        for _ in range(10):
            z_new, F_new = graph(base + t * p)
            r_new = _collective.norm(F_new.detach())
            if math.isfinite(r_new) and r_new <= (1 - 1e-4 * t) * r:
                found = True
                break
            t *= 0.5
        if not found:
            if not options.budget:
                status, steps = "stalled", steps - 1
                break
            continue  # budget mode: keep the point, spend the step
        z, Fz, r = z_new, F_new, r_new
        history.append(r)
        if not options.budget and _stalled(history, r, tol):
            status = "stalled"
            break
        tol = options.atol + 0.5 * rtol * _collective.norm(z.detach())
    else:
        if not options.budget and r <= tol:
            status = "converged"
    return NewtonResult(z.detach(), status, steps, r, tol, counts["matvecs"], counts["evaluations"], history)


@dataclass(frozen=True)
class Coupling:
    """A term that couples uncoupled block objectives, in closed form (the Nash-GBML penalty of
    Nash-iMAML), for :func:`newton_krylov`.

    ``gradient(z)``: its pseudo-gradient at the flat point ``z`` (every block's partial gradient);
    ``jvp(z, v)``: the product of that pseudo-gradient's Jacobian with ``v``; ``value(z)``: a
    potential whose gradient is ``gradient`` (a potential game, as with the centroid penalty:
    the solve is then one minimisation), or ``None`` (a game without a potential, as with the
    robust penalty: the line search is on the residual norm). All three take no graph and cost
    O(size of z), so a product of the coupled system costs one Hessian-vector product of the block
    objectives plus O(size of z).
    """

    gradient: Callable[[torch.Tensor], torch.Tensor]
    jvp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    value: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def _minimise_blocks(objective: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, options: NewtonKrylov,
                     blocks: int, coupling: Optional[Coupling] = None, warm: int = 0,
                     compiled: Optional[str] = None) -> NewtonResult:
    """Newton--Krylov on block objectives, uncoupled or coupled by a closed-form term (see
    newton_krylov).

    Uncoupled (no ``coupling``, or its first ``warm`` steps): Newton--CG with a per-block Armijo
    line search on each block's objective. Coupled: one Krylov solve on the whole system, whose
    products are the block objectives' Hessian-vector product plus ``coupling.jvp`` (CG when the
    coupling has a potential, GMRES otherwise), and one line search on the potential (the block
    objectives' sum plus ``coupling.value``) or on the merit :math:`\\frac12\\|F\\|^2`.

    Costs per Newton step: one evaluation of the objectives with the graph of their gradient, at
    the full step (when every block accepts it, the usual case near the solution, that graph is the
    next step's gradient and Hessian), the Krylov products on that graph, and one trial without a
    graph per shortening (to the quadratic interpolant's minimiser; at most 2 in budget mode, 9
    otherwise; a value of the objectives, or their gradient for the merit), plus one evaluation
    with a graph when some block shortened. The last step of the budget mode builds no graph at
    all: its residual is not evaluated (``residual`` is NaN).

    ``compiled`` (a ``torch.compile`` backend; budget mode): each step's CG (or, on the merit,
    GMRES) runs as one compiled program with forward-over-reverse Hessian-vector products
    (:func:`_hessian_product`), so the objectives are evaluated without the gradient's graph. The
    iterates are the eager method's (up to rounding). A program that fails to compile hands over to
    the eager steps, which the result's ``message`` says.
    """
    rtol = default_rtol(z0.dtype) if options.rtol is None else options.rtol
    counts = {"matvecs": 0, "evaluations": 0}
    notes = []

    def compiles():
        """Whether the next direction comes from the compiled program (then no graph is needed)."""
        return compiled is not None and options.budget

    def evaluate(z, coupled, graph=True):
        """(z, the gradient's graph, the full gradient, the line search's objective per row, the
        residual per row); rows: the blocks, or one when coupled."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            f = objective(z)
            (g,) = torch.autograd.grad(f.sum(), z, create_graph=graph)
        counts["evaluations"] += 1
        return (z, g, *measure(z.detach(), g.detach(), f.detach(), coupled))

    def measure(z, G, f, coupled):
        if not coupled:
            return G, f, _rows(G, blocks).norm(dim=1)
        G = G + coupling.gradient(z)
        r = G.norm().reshape(1)
        f = 0.5 * r * r if coupling.value is None else (f.sum() + coupling.value(z)).reshape(1)
        return G, f, r

    def value(z, coupled):
        if coupled and coupling.value is None:  # the merit needs the gradient
            return evaluate(z, True, graph=False)[3]
        with torch.no_grad():
            f = objective(z)
            f = (f.sum() + coupling.value(z)).reshape(1) if coupled else f
        counts["evaluations"] += 1
        return f

    warm = 0 if coupling is None else warm
    coupled = coupling is not None and warm == 0
    z, g, G, f, rb = evaluate(z0, coupled, graph=not compiles())
    r = float(rb.norm())
    r0 = r
    history = [r]
    tol = options.atol + 0.5 * rtol * float(z.detach().norm())
    status = "completed" if options.budget else "max_steps"
    steps = 0
    first = 0
    total = options.max_steps + warm
    for steps in range(1, total + 1):
        if coupling is not None and not coupled and steps > warm:  # the warm steps are done
            coupled = True
            G, f, rb = measure(z.detach(), g.detach(), f, True)
            r = float(rb.norm())
            first = len(history)  # the stall test looks at the coupled steps only
            history.append(r)
        warming = coupling is not None and not coupled  # a warm step: no tolerance test
        stop = (None if math.isfinite(r) else "diverged") if warming else _stop(options, r, tol)
        if stop:
            status, steps = stop, steps - (stop == "converged")
            break
        rows = 1 if coupled else blocks
        Zd = z.detach()
        eta = _forcing(options, r, r0)
        Gr = _rows(G, rows)
        merit = coupled and coupling.value is None  # not a potential game: GMRES, line search on the merit
        P = None
        if compiles():  # the same Krylov iterations as one compiled program (budget mode)
            product = _hessian_product(objective, coupling if coupled else None)
            out, why = _try_compiled(_gmres_budget_products if merit else _cg_budget_products, compiled,
                                     product, options.krylov_steps, -G, rows, Zd)
            if out is None:
                notes.append(f"ran eagerly: the compiled Newton step failed ({why})")
                compiled = None
                z, g, G, f, rb = evaluate(Zd, coupled)  # the graph the eager products need
            else:
                counts["matvecs"] += options.krylov_steps
                P, res = out if merit else (out, None)
        if P is None:
            hvp = _matvec_on(g, z, True, counts)
            matvec = (lambda v: hvp(v) + coupling.jvp(Zd, v)) if coupled else hvp
            if merit:
                P, _, res, _ = _gmres(matvec, -G, options.krylov_steps, rtol=eta)
            else:
                P, _ = _truncated_cg(matvec, -G, options.krylov_steps, eta * rb, rows)
        P = _rows(P, rows)
        if merit:
            # d/dt 1/2 |F(z + t p)|^2 at 0 is F^T (P p) = -|F|^2 + F^T (P p + F) <= -|F| (|F| - |P p + F|)
            slope = -rb * (rb - torch.minimum(res, rb)).nan_to_num(0.0)
        else:
            slope = (Gr * P).sum(1)
        ascent = ~(slope < 0)  # not a descent direction (negative curvature met early): steepest descent
        P = torch.where(ascent[:, None], -Gr, P)
        slope = torch.where(ascent, -rb * rb, slope)
        base = _rows(z.detach(), rows)
        z, g = z.detach(), None  # the line search needs no graph at z: at most one graph is alive
        last = options.budget and steps == total  # nothing needs this step's gradient

        def point(t):
            return (base + t[:, None] * P).reshape(-1)

        t = torch.ones_like(rb)
        full = None  # the residual at the full step, when known
        if last and not (coupled and coupling.value is None):
            trial, f_new = None, value(point(t), coupled)
        else:  # (the merit's last trial: its gradient without a graph, which gives the residual too)
            trial = evaluate(point(t), coupled, graph=not last and not compiles())
            f_new, full = trial[3], trial[4]
            trial = None if last else trial
        done = torch.isfinite(f_new) & (f_new <= f + 1e-4 * slope)
        t_full_ok = None if full is None else torch.isfinite(full) & (full <= (1 - 1e-4) * rb)
        if t_full_ok is not None:
            # near a root the objective's change falls below its rounding, where Armijo's test is
            # noise: the full step is taken if the residual decreases and the objective does not rise
            done = done | (t_full_ok & (f_new <= f + 100 * torch.finfo(f.dtype).eps * f.abs()))
        reuse = bool(done.all())  # every block takes the full step: the trial's graph is the next step's
        if not reuse:
            # shorten the steps of the blocks without Armijo's decrease: to the minimiser of the
            # quadratic through f, the slope and the trial value, kept within [t/10, t/2]
            for _ in range(2 if options.budget else 9):
                curv = (f_new - f - t * slope) / (t * t)
                shorter = torch.where(torch.isfinite(curv) & (curv > 0), -slope / (2 * curv), 0.5 * t)
                t = torch.where(done, t, torch.minimum(torch.maximum(shorter, 0.1 * t), 0.5 * t))
                f_new = value(point(t), coupled)
                done = done | (torch.isfinite(f_new) & (f_new <= f + 1e-4 * t * slope))
                if bool(done.all()):
                    break
            if not bool(done.all()):
                # near a root the objective's decrease falls below its rounding: a block without
                # Armijo's decrease keeps the full step if its residual decreases; the others stay
                if t_full_ok is None:
                    full = evaluate(point(torch.ones_like(t)), coupled, graph=False)[4]
                    t_full_ok = torch.isfinite(full) & (full <= (1 - 1e-4) * rb)
                rescued = ~done & t_full_ok
                if not bool((done | rescued).any()):
                    if not options.budget:
                        status, steps = "stalled", steps - 1
                        break
                    if not last:  # budget mode: keep the point (its graph rebuilt), spend the step
                        z, g, G, f, rb = evaluate(z, coupled, graph=not compiles())
                    continue
                t = torch.where(done, t, torch.where(rescued, torch.ones_like(t), torch.zeros_like(t)))
                reuse = trial is not None and bool((t == 1).all())
        if last:
            z, g, rb = point(t), None, torch.full_like(rb, math.nan)
        elif reuse:
            z, g, G, f, rb = trial
        else:
            trial = None  # freed before the next graph is built
            z, g, G, f, rb = evaluate(point(t), coupled, graph=not compiles())
        r = float(rb.norm())
        history.append(r)
        if not options.budget and not warming and _stalled(history[first:], r, tol):
            status = "stalled"
            break
        tol = options.atol + 0.5 * rtol * float(z.detach().norm())
    else:
        if not options.budget and r <= tol:
            status = "converged"
    return NewtonResult(z.detach(), status, steps, r, tol, counts["matvecs"], counts["evaluations"], history,
                        "; ".join(notes))


def _try_compiled(program, backend: str, *args):
    """``(program(*args) compiled with backend, "")``, or ``(None, "<error type>: <its first
    line>")`` when tracing or compiling fails (the caller then runs the eager method)."""
    try:
        return _compiled_call(program, backend, *args), ""
    except _CompileUnavailable as err:  # the backend cannot compile (remembered: no second attempt)
        return None, err.reason
    except Exception as err:  # noqa: BLE001 - any tracing or compiler failure
        line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        return None, f"{type(err).__name__}: {line}"


def _run_compiled(program, op, backend: str, x0, leafwise: bool, *args):
    """``program(fn, *args, *operands)`` traced by ``torch.compile`` (``backend``) with the
    operator's functional form ``(fn, operands)``: ``(output, "")``, or ``(None, why)`` when it
    cannot run compiled (no functional form, a warm start, a leaf-by-leaf layout, sharded over ranks,
    or a failed compilation); the caller then runs the eager method (the same iterates)."""
    if op.functional is None:
        return None, "the operator has no functional form"
    if x0 is not None or leafwise or _collective.active():
        return None, ("a warm start" if x0 is not None else "sharded over ranks" if _collective.active()
                      else "blocks laid out leaf by leaf")
    fn, operands = op.functional
    out, why = _try_compiled(program, backend, fn, *args, *operands)
    return out, (f"the compiled program failed ({why})" if why else "")


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
    compiled: bool = False
    backend: str = "inductor"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"FixedSteps.steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.compiled, bool):
            raise TypeError(f"FixedSteps.compiled must be True or False, got {self.compiled!r}")

    def solve(self, A, b, *, groups: int = 1, x0: Optional[torch.Tensor] = None):
        base = GMRES() if self.solver is None else self.solver
        why = ""
        if self.compiled:
            if type(base) is not GMRES or self.steps > base.restart:
                why = "only GMRES(steps) runs compiled"
            else:
                out, why = _run_compiled(_gmres_budget_products, as_operator(A), self.backend, x0, False,
                                         self.steps, b, groups)
                if out is not None:
                    x, res = out
                    residual = float(res.norm())
                    info = LinearSolveInfo(True, self.steps, self.steps, residual, math.nan,
                                           [_collective.norm(b), residual], "", "converged")
                    return self._done(x, b, info, " (compiled)")
        if type(base) is GMRES and self.steps <= base.restart:
            # GMRES(steps) itself (each of the ``groups`` stacked systems its own), without the core
            # loop's true-residual product at the end
            x, products, res, history = _gmres(as_operator(A), b, self.steps, x0, rows=groups)
            info = LinearSolveInfo(True, products - (x0 is not None), products, float(res.norm()), math.nan,
                                   history, "", "converged",
                                   warm=int(x0 is not None and history[0] < _collective.norm(b)))
        else:
            inner = dataclasses.replace(base, max_steps=self.steps, rtol=0.0, atol=0.0)
            x, info = inner.solve(A, b, groups=groups, **({} if x0 is None else {"x0": x0}))
        return self._done(x, b, info, f" (ran eagerly: {why})" if why else "")

    def _done(self, x, b, info, note: str):
        if not bool(torch.isfinite(x).all()):  # a real failure, not the budget: report it as it is
            if info.converged:
                info = LinearSolveInfo(False, self.steps, info.matvecs, math.nan, math.nan, info.history,
                                       "a product returned NaN or inf", "non_finite")
            return x, info
        out = dataclasses.replace(info, converged=True, status="converged",
                                  message=f"fixed budget of {self.steps} steps: relative residual "
                                          f"{info.residual / max(_collective.norm(b), 1e-300):.3g}{note}")
        return x, out


@dataclass(frozen=True, kw_only=True)
class TaskCG(LinearSolver):
    """Conjugate gradients run for a fixed number of iterations on each of ``blocks`` independent
    symmetric systems at once (iMAML's backward: one CG, or MINRES, per task on :math:`(H_i + \\lambda I)
    u_i = v_i`, its budget of 5 iterations).

    The operator must be block diagonal in the ``blocks`` (uncoupled tasks; their layout in the
    vectors is given by ``sizes``), so that one product of the whole operator is one product of
    every block; each block then gets its own Krylov space, as in a per-task loop. The solve is
    reported done (``converged=True``) whatever the residual: the budget is the contract (see
    :class:`FixedSteps`); the residual its recurrence reached is kept in the info (``history``: at
    the start and the end). A block whose curvature :math:`p^\\top A p` falls to
    ``min_curvature`` :math:`\\|p\\|^2` or below (default: non-positive curvature, an indefinite
    block: a ReLU network's Hessian below :math:`-\\lambda`) stops there and keeps its iterate
    (Steihaug's rule): past that point CG's iterates can grow without bound along a near-singular
    direction (measured on the sinusoid preset: a meta-gradient error of 22 instead of 0.11). A
    non-finite product makes the output non-finite, which is reported as a failure (status
    ``"non_finite"``).

    Args:
        blocks: the number of independent systems (tasks).
        steps: CG iterations (products).
        sizes: the layout of the vectors: ``None``, each block contiguous; else a pytree's leaves one
            after the other, each holding every block's part (``blocks x sizes[k]`` entries, block
            first), as the layer flattens a pytree with a leading task dimension.
        min_curvature: a block stops when :math:`p^\\top A p \\le` ``min_curvature`` :math:`\\|p\\|^2`.
        method: ``"cg"``; ``"gmres"``: GMRES(``steps``) per block instead (the iterate of least
            residual in each block's Krylov space, no curvature test); ``"minres"``: the same
            iterates for symmetric blocks (indefinite ones too) by MINRES's short recurrence, at
            about CG's cost. The budgeted iMAML backward uses MINRES: with 5 iterations per task, CG
            trained worse on the sinusoid preset (500 iterations, test MSE 3.45 and 3.19 for seeds 0
            and 1, against 2.71 and 2.82 with the least-residual iterates), since CG's iterates are
            not bounded by the residual along the near-singular directions of
            :math:`H_i + \\lambda I`.
    """

    blocks: int = 1
    steps: int = 5
    sizes: Optional[Tuple[int, ...]] = None
    min_curvature: float = 0.0
    method: str = "cg"
    compiled: bool = False
    backend: str = "inductor"

    def __post_init__(self):
        super().__post_init__()
        for name in ("blocks", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TaskCG.{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.min_curvature, bool) or not isinstance(self.min_curvature, (int, float)) \
                or not math.isfinite(self.min_curvature):
            raise ValueError(f"TaskCG.min_curvature must be a finite number, got {self.min_curvature!r}")
        if self.method not in ("cg", "gmres", "minres"):
            raise ValueError(f"TaskCG.method must be 'cg', 'gmres' or 'minres', got {self.method!r}")
        if not isinstance(self.compiled, bool):
            raise TypeError(f"TaskCG.compiled must be True or False, got {self.compiled!r}")
        if self.compiled and self.method != "minres":
            raise ValueError(f"TaskCG(compiled=True) runs MINRES only, got method={self.method!r}")

    def solve(self, A, b, *, groups: int = 1, x0: Optional[torch.Tensor] = None):
        """``groups`` more systems per block layout (the layer's stacked problems: with ``blocks=1``
        and ``sizes=None``, the ``groups`` blocks are the tasks); ``x0``: a starting guess (a warm
        start: one more product, for its residual)."""
        op = as_operator(A)
        n = self.blocks * groups
        if b.numel() % n or (self.sizes is not None and n * sum(self.sizes) != b.numel()):
            raise ValueError(f"TaskCG: {n} blocks of {self.sizes} do not make the system's size {b.numel()}")
        rows, flat = _block_layout(n, self.sizes)
        if self.method == "gmres":
            x, matvecs, res, history = _gmres(op, b, self.steps, x0, rows=n, layout=(rows, flat))
            residual = float(res.norm())
            history = [history[0], residual]
            name = "GMRES"
        elif self.method == "minres":
            rhs = rows(b)
            X, why = (None, "") if not self.compiled else _run_compiled(
                _minres_products, op, self.backend, x0, self.sizes is not None and len(self.sizes) > 1,
                self.steps, rhs)
            if X is None:
                start = torch.zeros_like(rhs) if x0 is None else rows(x0)
                X, res = _minres(op, rhs, self.steps, start, rows, flat)
            else:
                X, res = X
            x, residual = flat(X), float(res.norm())
            history = [float(rhs.norm()), residual]
            matvecs = self.steps + (x0 is not None)  # (a warm start always runs eagerly)
            name = "MINRES" + (f" (ran eagerly: {why})" if why else " (compiled)" if self.compiled else "")
        else:
            x, residual, history = self._cg(op, rows, flat, b, x0)
            matvecs, name = self.steps + (x0 is not None), "CG"
        if not bool(torch.isfinite(x).all()):
            return x, LinearSolveInfo(False, self.steps, matvecs, math.nan, math.nan, history,
                                      "a product returned NaN or inf", "non_finite")
        return x, LinearSolveInfo(True, self.steps, matvecs, residual, math.nan, history,
                                  f"fixed budget of {self.steps} {name} steps per task: relative residual "
                                  f"(recurrence) {residual / max(history[0], 1e-300):.3g}", "converged")

    def _cg(self, op, rows, flat, b, x0):
        rhs = rows(b)
        rs0 = (rhs * rhs).sum(1)
        if x0 is None:
            x, r = torch.zeros_like(rhs), rhs.clone()
        else:
            x = rows(x0)
            r = rhs - rows(op(x0))
        p = r.clone()
        rs = (r * r).sum(1)
        tiny = torch.finfo(rs.dtype).tiny
        ok = torch.ones_like(rs, dtype=torch.bool)  # the blocks still iterating
        for _ in range(self.steps):
            Ap = rows(op(flat(p)))
            curv = (p * Ap).sum(1)
            floor = self.min_curvature * (p * p).sum(1) if self.min_curvature else 0.0
            ok = ok & ~(curv <= floor)  # NaN stays: the output is NaN, reported as a failure
            alpha = torch.where(ok, rs, torch.zeros_like(rs)) / torch.where(ok, curv, torch.ones_like(curv))
            x = torch.addcmul(x, alpha[:, None], p)
            r = torch.addcmul(r, alpha[:, None], Ap, value=-1)
            rs_new = (r * r).sum(1)
            p = torch.addcmul(r, (ok * rs_new / rs.clamp_min(tiny))[:, None], p)
            rs = rs_new
        history = [float(rs0.sum().sqrt()), float(rs.sum().sqrt())]
        return flat(x), history[-1], history
