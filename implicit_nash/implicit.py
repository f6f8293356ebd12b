r"""How gradients flow through a solve: the implicit adjoint and the unrolled adjoint.

Implicit (Lemma B.4, generalised).  At a solution the residual :math:`G(z^*, p) = 0`, with
:math:`G = F` without constraints and :math:`G(z, p) = z - \Pi_\Omega(z - \eta F(z;\theta))` (the
fixed-point form, with the forward's step :math:`\eta = 1/\hat L`, which leaves the root and the
derivative unchanged and keeps :math:`A` of norm about 1 whatever the scale of :math:`F`) with them; :math:`p` collects ``theta`` and the tensors that define the
set :math:`\Omega`.  The implicit function theorem gives :math:`dz^*/dp = -A^{-1}\partial_p G` with
:math:`A = \partial_z G`, which for :math:`G = F` is the paper's :math:`-P^{-1}Q`.

Two autograd Functions carry it, each differentiable again, so derivatives of any order are
implicit too (nothing is unrolled):

* :class:`EquilibriumFn` maps :math:`p \mapsto z^*`.  Reverse mode: solve :math:`A^\top u = v`
  (with :class:`LinearSolveFn`), return :math:`-(\partial_p G)^\top u`.  Forward mode: solve
  :math:`A\,\dot z = -\partial_p G\,\dot p`.
* :class:`LinearSolveFn` maps :math:`(b, z, p) \mapsto A(z,p)^{-1} b` or :math:`A^{-\top} b`.  Its own
  derivative is another linear solve with the transposed system plus a second-order product of
  :math:`G`: for :math:`x = A^{-\top}b` and a cotangent :math:`w`, with :math:`y = A^{-1}w`,
  :math:`\bar b = y` and :math:`\overline{(z,p)} = -\partial_{(z,p)}\langle x, A(z,p)\,y\rangle`.

Every product is a ``torch.func`` transform of ``G`` (``vjp``; :math:`Av` as the VJP of the linear
map :math:`w \mapsto A^\top w`; ``jvp`` only for forward-over-forward derivatives), so the layer
composes with ``torch.func.grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``hessian`` and ``vmap``.  Under
``vmap`` both Functions solve the batch together: the problems are stacked into one block-diagonal
problem whose blocks each stop on their own tolerance (``groups``).  No Jacobian is materialised and
no forward iterate is stored, so memory does not grow with the number of forward steps.

With constraints, the Jacobian of the projection is that of the torch operations that compute it,
which is exact wherever the active set is locally constant (strict complementarity); at a degenerate
point it is one element of the generalised Jacobian.

Unrolled.  Back-propagation through every forward iteration (what the paper's experiments do);
memory grows linearly with the number of steps, and the gradient is that of the truncated
iteration, not of the exact equilibrium.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.func import jvp, vjp, vmap

from ._compat import forward_mode_levels, functorch_active
from ._tree import all_finite
from .errors import ConvergenceError, ConvergenceWarning
from .linear_solve import GMRES, LinearOperator, LinearSolveInfo, LinearSolver
from .solvers import FlatProblem, Solution, Solver, iterate

__all__ = ["Adjoint", "Implicit", "Unrolled", "WarmStart"]


class Adjoint:
    """Base class of the ways to differentiate a solve."""


@dataclass(frozen=True)
class Unrolled(Adjoint):
    """Differentiate by back-propagating through the forward iterations (first and higher order,
    through autograd; does not compose with ``torch.func.vmap``)."""


class WarmStart:
    """Warm starts for the implicit linear solves: each solve starts from the solution of the last
    converged solve of the same kind (the same system orientation, size, dtype, device and batch).

    A warm start changes how many products a solve makes, never its answer: the stopping rule does not
    depend on the start, and a start whose residual is not below :math:`\\|b\\|` is discarded (the
    solve then starts from zero, having spent one product to find out).  It pays when consecutive
    calls solve nearby systems, e.g. the same data as the outer parameter moves a little (bilevel
    optimisation with a fixed data set), or a repeated solve of the same problem.  It does nothing
    under ``torch.func`` transforms, whose tensors cannot be kept between calls.

    Hold one and pass it to every call that should share it: ``Implicit(warm_start=ws)``,
    ``custom_root(..., warm_start=ws)``; ``warm_start=True`` there creates one for that adjoint.
    ``solves``, ``warm`` and ``products`` count the solves seen, those that started warm and the
    products they made; ``clear()`` forgets the solutions.
    """

    def __init__(self):
        self._last = {}
        self.solves = 0
        self.warm = 0
        self.products = 0

    def clear(self) -> None:
        self._last.clear()

    @staticmethod
    def _key(transpose: bool, b: torch.Tensor, groups: int):
        return (transpose, b.numel(), b.dtype, b.device, groups)

    def start(self, transpose: bool, b: torch.Tensor, groups: int) -> Optional[torch.Tensor]:
        return self._last.get(self._key(transpose, b, groups))

    def remember(self, transpose: bool, x: torch.Tensor, groups: int, info: LinearSolveInfo) -> None:
        self.solves += 1
        self.warm += bool(info.warm)
        self.products += info.matvecs
        if info.converged:
            self._last[self._key(transpose, x, groups)] = x.detach()

    def __repr__(self) -> str:
        return (f"WarmStart(solves={self.solves}, warm={self.warm}, products={self.products}, "
                f"kept={len(self._last)})")


@dataclass(frozen=True, kw_only=True)
class Implicit(Adjoint):
    """Differentiate the equilibrium conditions (implicit function theorem), to any order.

    Args:
        linear_solver: solves :math:`(\\partial_z G)^\\top u = v` (and the transposed systems of
            higher-order and forward-mode derivatives); default :class:`GMRES`, valid for the
            non-symmetric Jacobians of general games.
        symmetric: deprecated; declare symmetry once, on the game (``Game.symmetric``) or with
            ``solve_vi(..., symmetric=...)``.  Still honoured when the game does not declare it,
            and an error when it contradicts the game's declaration.
        warm_start: a :class:`WarmStart` shared by the calls that use this adjoint, ``True`` for a
            new one, or ``None`` (every solve starts from zero).
    """

    linear_solver: LinearSolver = field(default_factory=GMRES)
    symmetric: Optional[bool] = None
    warm_start: Optional[WarmStart] = field(default=None, compare=False)

    def __post_init__(self):
        if not isinstance(self.linear_solver, LinearSolver):
            raise TypeError(f"linear_solver must be a LinearSolver (CG, GMRES, ...), got "
                            f"{type(self.linear_solver).__name__}")
        object.__setattr__(self, "warm_start", _as_warm_start(self.warm_start))
        if self.symmetric is not None:
            warnings.warn("Implicit(symmetric=...) is deprecated: declare symmetry once, on the game "
                          "(Game.symmetric) or with solve_vi(..., symmetric=...)", DeprecationWarning, stacklevel=3)


def _as_warm_start(value) -> Optional[WarmStart]:
    if value is None or value is False:
        return None
    if value is True:
        return WarmStart()
    if isinstance(value, WarmStart):
        return value
    raise TypeError(f"warm_start must be a WarmStart, True or None, got {type(value).__name__}")


def _fmt_reason(status: str) -> str:
    return {"max_steps": "the iteration budget ran out",
            "diverged": "the iterates diverged (the game may not be monotone, or the step size is too large)",
            "inaccurate": "the estimated error stays above the tolerance, which rounding in this dtype does not let "
                          "the solver meet (the problem is too ill-conditioned for it: use float64 or a looser rtol)",
            "breakdown": "the Krylov recurrence broke down",
            "singular": "the Jacobian is singular to working precision (the equilibrium may be degenerate, "
                        "or the game not strongly monotone)",
            "non_finite": "a product returned NaN or inf",
            "not_a_root": "the forward solver's output does not satisfy the optimality condition"}.get(status, status)


class Problem:
    """What both Functions need besides tensors: the residual ``G``, the forward solve, the linear
    solver, the failure policy, and the :class:`Solution` that collects the diagnostics.

    ``params`` (a list of tensors) is ``theta``'s leaves followed by the set's tensors; ``n_theta``
    says where the split is.  ``F(z, theta_leaves)`` and ``project(v, set_leaves)`` act on flat
    vectors of one problem (``groups`` problems when batched).
    """

    def __init__(self, *, F: Callable, project: Callable, unconstrained: bool, n_theta: int, players: int,
                 block: int, linear_solver: LinearSolver, symmetric: Optional[bool], throw: bool,
                 record: Solution, solver: Optional[Solver] = None, forward: Optional[Callable] = None,
                 check_root: Optional[Callable] = None, name: str = "", z_name: str = "", groups: int = 1,
                 warm_start: Optional[WarmStart] = None, member_groups: Optional[int] = None,
                 batch_shape: Tuple[int, ...] = ()):
        self.F = F
        self.project = project
        self.unconstrained = unconstrained
        self.n_theta = n_theta
        self.players = players
        self.block = block
        self.linear_solver = linear_solver
        self.symmetric = symmetric if unconstrained else None
        self.throw = throw
        self.record = record
        self.solver = solver
        self.user_forward = forward
        self.check_root = check_root
        self.name = name
        self.z_name = z_name
        self.groups = groups
        self.member_groups = groups if member_groups is None else member_groups  # groups of one vmap member
        self.batch_shape = batch_shape  # the sizes of the vmapped batches stacked here, outermost first
        self.warm_start = warm_start
        self.shared: Optional[_SharedGraph] = None  # set during a first-order backward only
        self.step = None  # the forward's residual step 1/L (a number, or one per entry), set by solve()

    # ------------------------------------------------------------------ functions of (z, params)
    def G(self, z: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
        th, sp = list(params[: self.n_theta]), list(params[self.n_theta:])
        Fz = self.F(z, th)
        if self.unconstrained:
            return Fz
        if self.step is not None:
            # the forward's step 1/L: the same root and the same derivative -A^-1 dG/dp as the unit
            # step, but A = (I - D) + D dF/dz / L stays of norm about 1 whatever the scale of F
            Fz = Fz * self.step
        return z - self.project(z - Fz, sp)

    def batched(self, nb: int, param_dims: Sequence[Optional[int]]) -> "Problem":
        """The problem of a batch of ``nb`` problems stacked along a leading dimension (``vmap``)."""
        F1, P1, k = self.F, self.project, self.n_theta
        th_dims, sp_dims = list(param_dims[:k]), list(param_dims[k:])

        def F(z, th):
            return vmap(F1, in_dims=(0, th_dims))(z.reshape(nb, -1), list(th)).reshape(-1)

        def project(v, sp):
            return vmap(P1, in_dims=(0, sp_dims))(v.reshape(nb, -1), list(sp)).reshape(-1)

        forward = None
        if self.user_forward is not None:
            one = self.user_forward

            def forward(start, th):  # a black-box forward solver runs once per problem
                starts = start.reshape(nb, -1)
                outs = [one(starts[i], [t[i] if d is not None else t for t, d in zip(th, th_dims)])
                        for i in range(nb)]
                return torch.stack(outs).reshape(-1)
        out = Problem(F=F, project=project, unconstrained=self.unconstrained, n_theta=k, players=self.players,
                      block=self.block, linear_solver=self.linear_solver, symmetric=self.symmetric,
                      throw=self.throw, record=self.record, solver=self.solver, forward=forward,
                      check_root=self.check_root, name=self.name, z_name=self.z_name,
                      groups=self.groups * nb, warm_start=self.warm_start, member_groups=self.member_groups,
                      batch_shape=(nb, *self.batch_shape))
        # the same natural map for every member: the step of the solve it differentiates (the linear
        # solve and the product with dG/dp must use one G)
        out.step = self.step.repeat(nb) if isinstance(self.step, torch.Tensor) else self.step
        return out

    def _name_groups(self, bad: Sequence[int]) -> str:
        """Names the groups ``bad`` for a message: members of a vmapped batch, or blocks."""
        if self.groups == 1:
            return ""
        if not self.batch_shape:
            return f" (block{'s' if len(bad) > 1 else ''} {_fmt_list(bad)})"
        members = sorted({g // self.member_groups for g in bad})
        s = "s" if len(members) > 1 else ""
        levels = [k for k, n in enumerate(self.batch_shape) if n > 1]  # a batch of one names nothing
        if len(levels) > 1:
            index = []
            for m in members:
                idx = []
                for size in reversed(self.batch_shape):
                    m, i = divmod(m, size)
                    idx.append(i)
                idx.reverse()
                index.append(tuple(idx[k] for k in levels))
            sizes = " x ".join(str(self.batch_shape[k]) for k in levels)
            return f" (member{s} {_fmt_list(index)} of the nested vmapped batches of sizes {sizes}, outermost first)"
        return f" (member{s} {_fmt_list(members)} of the vmapped batch)"

    # ------------------------------------------------------------------ the forward solve
    def solve(self, start: torch.Tensor, params: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The solution and, per group, 1 where the forward solve succeeded and 0 where it failed
        (``throw=False``): the derivative through a failed group is zero."""
        params = [p.detach() for p in params]
        start = start.detach()
        th, sp = params[: self.n_theta], params[self.n_theta:]
        for i, t in enumerate(params):
            if not all_finite(t):
                name = "theta" if i < self.n_theta else "a parameter of the strategy set"
                raise ValueError(f"{name} contains NaN or inf")
        problem = FlatProblem(lambda v: self.F(v, th), lambda v: self.project(v, sp), self.players * self.groups,
                              self.block, self.unconstrained, groups=self.groups)
        problem.name = self.z_name
        problem.check_closure = True
        if not all_finite(start):
            raise ValueError(f"{self.z_name or 'the initial point'} contains NaN or inf")
        if not self.unconstrained:
            with torch.enable_grad():
                hidden = self.project(start, sp).requires_grad
            if hidden:
                raise ValueError("the strategy set holds a tensor that requires grad but is not among its "
                                 "parameters(): the implicit adjoint would drop its gradient; override "
                                 "StrategySet.parameters() and with_parameters() to expose it")
        if self.user_forward is not None:
            # the user's forward may differentiate internally (torch.autograd.grad): it runs with grad
            # enabled on the detached inputs, and its output is detached
            with torch.enable_grad():
                z = self.user_forward(start, th)
            z = z.detach()
            with torch.no_grad():
                sol = self.check_root(problem, start, z)
        else:
            with torch.no_grad():
                sol = iterate(self.solver, problem, problem.project(start))
            self.step = problem.step
        self._report_forward(sol)
        return sol.value, self.succeeded(sol, sol.value)

    def succeeded(self, sol: Solution, z: torch.Tensor) -> torch.Tensor:
        """Per group, 1 where the forward solve converged (or completed its steps), 0 where it failed."""
        ok = ([s in ("converged", "completed") for s in sol.statuses] if len(sol.statuses) == self.groups
              else [sol.converged] * self.groups)
        return torch.tensor(ok, dtype=z.dtype, device=z.device)

    def _report_forward(self, sol: Solution, implicit: bool = True) -> None:
        rec = self.record
        rec.status, rec.steps, rec.residual, rec.history = sol.status, sol.steps, sol.residual, sol.history
        rec.stats.update(sol.stats)
        rec.statuses, rec.residuals = sol.statuses, sol.residuals
        rec.error, rec.errors = sol.error, sol.errors
        if not sol.converged:
            where = ""
            if sol.statuses:
                where = self._name_groups([i for i, s in enumerate(sol.statuses)
                                           if s not in ("converged", "completed")])
            msg = (f"{self.name} stopped with status '{sol.status}' after {sol.steps} steps{where}: "
                   f"residual {sol.residual:.3g}, estimated error {sol.error:.3g}, tolerance "
                   f"{sol.stats.get('tolerance', float('nan')):.3g} (in the units of z); {_fmt_reason(sol.status)}")
            if sol.stats.get("estimate"):
                msg += f" ({sol.stats['estimate']})"
            if self.throw:
                raise ConvergenceError(msg, status=sol.status, steps=sol.steps, residual=sol.residual,
                                       history=sol.history, stage="forward")
            warnings.warn(msg + "; throw=False: the last iterate is returned and the derivative through it is "
                          "set to zero", ConvergenceWarning, stacklevel=5)
        elif implicit and sol.status == "completed" and sol.residual > sol.stats["tolerance"]:
            # A fixed step count (num_steps) is a valid forward pass, but the implicit function
            # theorem holds at an equilibrium only: say so rather than differentiate silently.
            warnings.warn(f"{self.name} ran its num_steps={sol.steps} steps and stopped at natural residual "
                          f"{sol.residual:.3g} (tolerance {sol.stats['tolerance']:.3g}): the implicit gradient "
                          f"assumes an equilibrium and is only approximate here; use more steps, a "
                          f"tolerance-based stop (num_steps=None) or adjoint=Unrolled()", ConvergenceWarning,
                          stacklevel=5)

    # ------------------------------------------------------------------ products and linear solves
    def operator(self, z: torch.Tensor, params: Sequence[torch.Tensor], transpose: bool) -> LinearOperator:
        """:math:`A^\\top` (``transpose``) or :math:`A` as a matrix-free operator at ``(z, params)``."""
        params = list(params)
        if not functorch_active():
            return self._autograd_operator(z, params, transpose)
        _, vjp_fn = vjp(lambda zz: self.G(zz, params), z)

        def AT(u):
            return vjp_fn(u)[0]

        lazy = []

        def A(u):  # the VJP of the linear map w -> A^T w (reverse mode only, built once)
            if not lazy:
                lazy.append(vjp(AT, torch.zeros_like(z))[1])
            return lazy[0](u)[0]

        return LinearOperator(AT if transpose else A, A if transpose else AT, self.symmetric)

    def _autograd_operator(self, z: torch.Tensor, params: List[torch.Tensor], transpose: bool,
                           precision: Optional[torch.dtype] = None) -> Optional[LinearOperator]:
        """The same products through plain autograd on one cached graph of ``G`` (no torch.func
        transform is active: the products inside a linear solve's forward need no derivative of
        their own), which saves torch.func's per-call overhead on every Krylov product.  The graph
        is built at the first product; the operator's functional form (``_product_fn``, for a
        compiled solve) needs none.

        ``precision``: the graph built at ``(z, params)`` cast to that dtype (:class:`Refined`'s
        lower-precision products); ``None`` if ``G`` does not run in it: a residual that closes over
        tensors of a higher precision fails on mixed dtypes or promotes back (pass such tensors in
        ``theta`` so that they are cast too)."""
        if precision is None:  # the graph is built at the first eager product (a compiled solve needs none)
            zz = z.detach().requires_grad_(True)
            built = []
            shared = self.shared if self.shared is not None and self.shared.serves(z, params) else None

            def products():
                if shared is not None:  # the backward's one graph of G, which theta_vjp uses too
                    return shared.products()
                if not built:
                    with torch.enable_grad():
                        G = self.G(zz, [p.detach() for p in params])
                    built.append(graph_products(G, zz) if G.requires_grad else (torch.zeros_like, torch.zeros_like))
                return built[0]

            def AT(u):
                return products()[0](u)

            def A(u):
                return products()[1](u)

            def lowered(dtype):
                return self._autograd_operator(z, params, transpose, dtype)

            return LinearOperator(AT if transpose else A, A if transpose else AT, self.symmetric, lowered=lowered,
                                  functional=(self._product_fn(transpose), (zz.detach(), *[p.detach() for p in params])))
        # lowered: built now, since a residual that closes over tensors of a higher precision either
        # fails on mixed dtypes or promotes back, and then has no lowered form
        zz = z.detach().to(precision).requires_grad_(True)
        low = [p.detach().to(precision) if p.is_floating_point() else p.detach() for p in params]
        with torch.enable_grad():
            try:
                G = self.G(zz, low)
            except (RuntimeError, TypeError):
                return None
        if G.dtype != precision:
            return None
        if not G.requires_grad:  # G does not depend on z: A = 0
            return LinearOperator(torch.zeros_like, torch.zeros_like, self.symmetric)
        AT, A = graph_products(G, zz)
        operands = (zz.detach(), *low)
        return LinearOperator(AT if transpose else A, A if transpose else AT, self.symmetric,
                              functional=(self._product_fn(transpose), operands))

    def _product_fn(self, transpose: bool) -> Callable:
        """``(v, z, *params) -> A^T v`` (``transpose``) or ``A v``: the products as a pure function of
        tensors (torch.func transforms of ``G``), which a compiled linear solve traces whole.  A
        symmetric operator uses forward mode (``jvp``, forward-over-reverse for a gradient residual,
        usually the cheapest); otherwise ``A^T v`` is a ``vjp`` and ``A v`` a ``jvp``."""
        G = self.G
        if transpose and self.symmetric is not True:
            def product(v, z, *params):
                return vjp(lambda zz: G(zz, list(params)), z)[1](v)[0]
        else:
            def product(v, z, *params):
                return jvp(lambda zz: G(zz, list(params)), (z,), (v,))[1]
        return product

    def linear_solve(self, b: torch.Tensor, z: torch.Tensor, params: Sequence[torch.Tensor],
                     transpose: bool) -> torch.Tensor:
        """The solution of the system; zero in every group whose solve failed (``throw=False``): under
        ``vmap`` a failed member does not take the others' derivatives with it."""
        g = self.groups
        with torch.no_grad():
            finite = [True] * g
            if not all_finite(b) or not all_finite(z):  # which groups (one reduction when all are finite)
                finite = (torch.isfinite(b.reshape(g, -1)).all(1) & torch.isfinite(z.reshape(g, -1)).all(1)).tolist()
        if not any(finite):
            info = LinearSolveInfo(False, 0, 0, math.nan, math.nan, [], "the right-hand side or the solution "
                                   "is not finite", "non_finite")
            x = torch.zeros_like(b)
        else:
            if not all(finite):  # the finite groups are solved; the others get a zero derivative
                keep = _per_group(torch.tensor(finite, device=b.device), b)
                b, z = torch.where(keep, b, 0.0), torch.where(keep, z, 0.0)
            warm = self.warm_start if not functorch_active() else None
            x0 = None if warm is None else warm.start(transpose, b, self.groups)
            kw = {} if x0 is None else {"x0": x0}
            x, info = self.linear_solver.solve(self.operator(z, params, transpose), b, groups=self.groups, **kw)
            if warm is not None:
                warm.remember(transpose, x, self.groups, info)
        self.record.backward.append(info)
        if info.converged and all(finite):
            return x
        statuses = (info.group_statuses if len(info.group_statuses) == g and any(finite)
                    else [info.status] * g)
        bad = [i for i in range(g) if not finite[i] or statuses[i] != "converged"] or list(range(g))
        if info.converged:  # only the non-finite groups failed
            status, detail = "non_finite", "the right-hand side or the solution is not finite"
        else:
            status, detail = info.status, info.message
        msg = (f"the implicit {'backward' if transpose else 'forward-mode'} linear solve "
               f"({type(self.linear_solver).__name__}) failed{self._name_groups(bad)} with status '{status}': "
               + (f"estimated error {info.error:.3g} (residual {info.residual:.3g})" if status == "inaccurate"
                  else f"residual {info.residual:.3g} > tolerance {info.tolerance:.3g}")
               + f" after {info.steps} steps ({detail}); {_fmt_reason(status)}")
        if status == "max_steps":
            msg += "; raise max_steps or use another linear solver"
        if self.throw:
            raise ConvergenceError(msg, status=status, steps=info.steps, residual=info.residual,
                                   history=info.history, stage="backward")
        if len(bad) == g:
            warnings.warn(msg + ". throw=False: this derivative is set to zero (nothing unverified is "
                          "returned)", ConvergenceWarning, stacklevel=5)
            return torch.zeros_like(b)
        warnings.warn(msg + ". throw=False: this derivative is set to zero there and kept for the others "
                      "(nothing unverified is returned)", ConvergenceWarning, stacklevel=5)
        failed = torch.zeros(g, dtype=torch.bool, device=x.device)
        failed[bad] = True
        return torch.where(_per_group(failed, x), 0.0, x)

    def pairing_grad(self, a: torch.Tensor, c: torch.Tensor, z: torch.Tensor,
                     params: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """:math:`-\\partial_{(z,p)} \\langle a, A(z,p)\\,c \\rangle`, a second-order product of ``G``."""
        floats = _Floating(params)

        def pairing(zz, *values):
            pp = floats.fill(values)
            _, f = vjp(lambda z_: self.G(z_, pp), zz)
            return (f(a)[0] * c).sum()

        _, f = vjp(pairing, z, *floats.values)
        found = f(torch.ones((), dtype=z.dtype, device=z.device).neg())
        return (found[0], *floats.scatter(found[1:]))

    def theta_vjp(self, u: torch.Tensor, z: torch.Tensor, params: Sequence[torch.Tensor],
                  needed: Optional[Sequence[bool]] = None) -> Tuple[torch.Tensor, ...]:
        """:math:`-(\\partial_p G)^\\top u`; ``needed`` (optional, per entry of ``params``) skips the
        entries whose gradient nobody asked for (data that travels in ``theta``)."""
        floats = _Floating(params, needed)
        if not floats.idx:
            return floats.scatter(())
        if self.shared is not None and self.shared.serves(z, params) and not torch.is_grad_enabled() \
                and not functorch_active():
            return self.shared.theta_vjp(u)
        if not torch.is_grad_enabled() and not functorch_active():
            # a first-order backward: plain autograd on detached copies (torch.func's wrapping costs more)
            with torch.enable_grad():
                leaves = [v.detach().requires_grad_(True) for v in floats.values]
                out = self.G(z.detach(), floats.fill(leaves, detach_rest=True))
                found = (torch.autograd.grad(out, leaves, -u, allow_unused=True) if out.requires_grad
                         else [None] * len(leaves))
        else:
            _, f = vjp(lambda *values: self.G(z, floats.fill(values)), *floats.values)
            found = f(-u)
        return floats.scatter([torch.zeros_like(v) if g is None else g for v, g in zip(floats.values, found)])

    def theta_jvp(self, tangents: Sequence[torch.Tensor], z: torch.Tensor,
                  params: Sequence[torch.Tensor]) -> torch.Tensor:
        """:math:`\\partial_p G\\,\\dot p` as the VJP of the linear map :math:`w \\mapsto (\\partial_p G)^\\top w`."""
        floats = _Floating(params)
        _, f = vjp(lambda *values: self.G(z, floats.fill(values)), *floats.values)
        _, g = vjp(lambda w: f(w), torch.zeros_like(z))
        return g(tuple(tangents[i] for i in floats.idx))[0]


def graph_products(G: torch.Tensor, z: torch.Tensor, unused: bool = False) -> Tuple[Callable, Callable]:
    """``(u -> A^T u, u -> A u)`` for :math:`A = \\partial G / \\partial z` on one autograd graph of
    ``G(z)`` (kept): :math:`A^\\top u` is a VJP; :math:`A u` is the VJP of the linear map
    :math:`w \\mapsto A^\\top w`, whose graph is built at the first call and reused. ``unused``: the
    graph may not reach ``z`` (it was built for other inputs too), and then :math:`A = 0`."""
    def AT(u):
        (g,) = torch.autograd.grad(G, z, u, retain_graph=True, allow_unused=unused)
        return torch.zeros_like(z) if g is None else g

    lazy = []

    def A(u):
        if not lazy:
            with torch.enable_grad():
                w = torch.zeros_like(G, requires_grad=True)
                (gw,) = torch.autograd.grad(G, z, w, retain_graph=True, create_graph=True, allow_unused=unused)
            lazy.append((w, gw))
        w, gw = lazy[0]
        if gw is None:  # G does not reach z
            return torch.zeros_like(G)
        return torch.autograd.grad(gw, w, u, retain_graph=True)[0]

    return AT, A


class _SharedGraph:
    """One autograd graph of :math:`G(z, p)` for a first-order backward, with both ``z`` and the
    parameters that need a gradient as inputs: the linear solve's products with :math:`A^\\top`
    (VJPs in ``z``) and the final :math:`-(\\partial_p G)^\\top u` (a VJP in ``p``) both run on it,
    so the backward evaluates ``G`` with its graph once instead of twice. Built at the first use (a
    compiled linear solve takes no eager product, and then only ``theta_vjp`` builds it)."""

    def __init__(self, problem: "Problem", z: torch.Tensor, params: Sequence[torch.Tensor],
                 needed: Optional[Sequence[bool]]):
        self.problem, self.z, self.params = problem, z, list(params)
        self.floats = _Floating(params, needed)
        self.built = None

    def serves(self, z: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
        """Whether ``(z, params)`` are the tensors this graph is built at (the same objects)."""
        return z is self.z and len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def _build(self):
        if self.built is None:
            with torch.enable_grad():
                zz = self.z.detach().requires_grad_(True)
                leaves = [v.detach().requires_grad_(True) for v in self.floats.values]
                G = self.problem.G(zz, self.floats.fill(leaves, detach_rest=True))
            products = graph_products(G, zz, unused=True) if G.requires_grad else (torch.zeros_like, torch.zeros_like)
            self.built = (G, leaves, products)
        return self.built

    def products(self) -> Tuple[Callable, Callable]:
        return self._build()[2]

    def theta_vjp(self, u: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        if not self.floats.idx:
            return self.floats.scatter(())
        G, leaves, _ = self._build()
        found = (torch.autograd.grad(G, leaves, -u, allow_unused=True) if G.requires_grad
                 else [None] * len(leaves))
        self.built = None  # the last use: the graph is freed
        return self.floats.scatter([torch.zeros_like(v) if g is None else g
                                    for v, g in zip(self.floats.values, found)])


class _Floating:
    """The floating-point entries of ``params`` (integer leaves are data, with no derivative; so are
    the entries ``needed`` marks False): their
    indices and values, ``fill`` to put replacements back in the full list, ``scatter`` to place
    per-entry results (``None`` for the integer entries)."""

    def __init__(self, params: Sequence[torch.Tensor], needed: Optional[Sequence[bool]] = None):
        self.params = list(params)
        self.idx = [i for i, p in enumerate(self.params) if p.is_floating_point() and (needed is None or needed[i])]
        self.values = [self.params[i] for i in self.idx]

    def fill(self, values: Sequence[torch.Tensor], detach_rest: bool = False) -> List[torch.Tensor]:
        out = [p.detach() for p in self.params] if detach_rest else list(self.params)
        for i, v in zip(self.idx, values):
            out[i] = v
        return out

    def scatter(self, results: Sequence[Optional[torch.Tensor]]) -> Tuple[Optional[torch.Tensor], ...]:
        out: List[Optional[torch.Tensor]] = [None] * len(self.params)
        for i, r in zip(self.idx, results):
            out[i] = r
        return tuple(out)


def _fmt_list(items: Sequence[int]) -> str:
    return ", ".join(str(i) for i in items[:10]) + (", ..." if len(items) > 10 else "")


def _per_group(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A per-group boolean ``mask`` (one entry per group) spread over ``t``, the flat vector of those groups."""
    g = mask.shape[0]
    return mask.unsqueeze(-1).expand(g, t.shape[0] // g).reshape(-1)


def _failed_groups_finite(z: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``z`` with the non-finite entries of its failed groups replaced by zero, so that products at it
    stay finite (those groups' derivatives are zero anyway)."""
    return torch.where(ok | torch.isfinite(z), z, 0.0)


def _move(t: torch.Tensor, dim: Optional[int], nb: int) -> torch.Tensor:
    return t.movedim(dim, 0) if dim is not None else t


def _moved_dims(dims: Sequence[Optional[int]]) -> List[Optional[int]]:
    """The batch dimensions of parameters after :func:`_move`: 0 for every batched one."""
    return [None if d is None else 0 for d in dims]


def _flatten_batch(t: torch.Tensor, dim: Optional[int], nb: int) -> torch.Tensor:
    """A flat per-problem vector, batched or not, as the flat vector of the batched problem."""
    t = t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(nb, *t.shape)
    return t.reshape(-1)


_FORWARD_OVER_FORWARD = (
    "forward-over-forward (jacfwd of jacfwd / nested jvp) through the implicit layer is not supported by "
    "PyTorch's custom Function forward-mode rule; use jacrev(jacrev(...)), jacfwd(jacrev(...)) or "
    "jacrev(jacfwd(...))")


def _refuse_forward_over_forward() -> None:
    """A forward-mode rule runs with forward-mode AD off: a second forward-mode transform around it
    would see its tangent as a constant and return a wrong (often zero) derivative."""
    if forward_mode_levels() > 1:
        raise ValueError(_FORWARD_OVER_FORWARD)


def _note_hypergradient_error(info: LinearSolveInfo, u: torch.Tensor, grads: Sequence[Optional[torch.Tensor]]) -> None:
    """The linear solve's share of the hypergradient's error (the epsilon of Theorem D.3): the
    adjoint's estimated error :math:`\\|u - u^*\\|` carried through :math:`-Q^\\top`, with
    :math:`\\|Q\\|` estimated by :math:`\\|Q^\\top u\\|/\\|u\\|` (a lower estimate)."""
    with torch.no_grad():
        un = float(torch.linalg.vector_norm(u.detach().to(torch.float64)))
        gn = math.sqrt(sum(float((g.detach().to(torch.float64) ** 2).sum()) for g in grads
                           if g is not None and g.is_floating_point()))
    info.hypergradient_error = info.error * gn / un if un > 0 else (0.0 if info.error == 0 else math.nan)


class EquilibriumFn(torch.autograd.Function):
    """``params -> (z*, ok)``: the forward solve, with the implicit derivative in both modes.  ``ok``
    (not differentiable) holds, per group, 1 where the forward solve succeeded and 0 where it failed
    (``throw=False``); the derivative through a failed group is zero."""

    @staticmethod
    def forward(problem: Problem, start: torch.Tensor, *params: torch.Tensor):
        return problem.solve(start, params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, _, *params = inputs
        z, ok = output
        ctx.problem = problem
        ctx.mark_non_differentiable(ok)
        ctx.save_for_backward(z, ok, *params)
        ctx.save_for_forward(z, ok, *params)

    @staticmethod
    def backward(ctx, v, _ok_v):
        z, ok, *params = ctx.saved_tensors
        problem: Problem = ctx.problem
        needed = ctx.needs_input_grad[2:]
        if not any(needed):
            return (None, None) + (None,) * len(params)
        plain = not functorch_active()  # outside torch.func, ok's values can be read
        if plain and not bool(ok.any()):  # a failed forward solve: its derivative is zero
            return (None, None, *[torch.zeros_like(p) if need else None for p, need in zip(params, needed)])
        mask = None
        if not plain or not bool(ok.all()):
            mask = _per_group(ok > 0, z)
            v = torch.where(mask, v, 0.0)
            z = _failed_groups_finite(z, mask)
        first_order = not torch.is_grad_enabled() and plain
        if first_order:  # one graph of G serves the linear solve and the product with dG/dp
            problem.shared = _SharedGraph(problem, z, params, needed)
        try:
            u = LinearSolveFn.apply(problem, True, v, z, *params)
            if mask is not None:
                u = torch.where(mask, u, 0.0)
            grads = problem.theta_vjp(u, z, params, needed)
        finally:
            problem.shared = None
        if plain and problem.record.backward:
            _note_hypergradient_error(problem.record.backward[-1], u, grads)
        return (None, None, *[g if need else None for g, need in zip(grads, needed)])

    @staticmethod
    def jvp(ctx, _problem_t, _start_t, *tangents):
        _refuse_forward_over_forward()
        z, ok, *params = ctx.saved_tensors
        problem: Problem = ctx.problem
        mask = _per_group(ok > 0, z)
        z = _failed_groups_finite(z, mask)
        tangents = [torch.zeros_like(p) if t is None else t for p, t in zip(params, tangents)]
        q = torch.where(mask, problem.theta_jvp(tangents, z, params), 0.0)
        return torch.where(mask, LinearSolveFn.apply(problem, False, q, z, *params).neg(), 0.0), None

    @staticmethod
    def vmap(info, in_dims, problem: Problem, start, *params):
        nb = info.batch_size
        start_dim, pdims = in_dims[1], in_dims[2:]
        moved = [_move(p, d, nb) for p, d in zip(params, pdims)]
        batched = problem.batched(nb, _moved_dims(pdims))
        out, ok = EquilibriumFn.apply(batched, _flatten_batch(start, start_dim, nb), *moved)
        return (out.reshape(nb, -1), ok.reshape(nb, -1)), (0, 0)


class LinearSolveFn(torch.autograd.Function):
    """``(b, z, params) -> A^{-T} b`` (``transpose``) or ``A^{-1} b``, with ``A = dG/dz`` at ``(z, params)``."""

    @staticmethod
    def forward(problem: Problem, transpose: bool, b, z, *params):
        return problem.linear_solve(b, z, params, transpose)

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, transpose, b, z, *params = inputs
        ctx.problem, ctx.transpose = problem, transpose
        ctx.save_for_backward(output, z, *params)
        ctx.save_for_forward(output, z, *params)

    @staticmethod
    def backward(ctx, w):
        x, z, *params = ctx.saved_tensors
        problem: Problem = ctx.problem
        y = LinearSolveFn.apply(problem, not ctx.transpose, w, z, *params)
        a, c = (x, y) if ctx.transpose else (y, x)
        rest = problem.pairing_grad(a, c, z, params) if any(ctx.needs_input_grad[3:]) else (None,) * (1 + len(params))
        return (None, None, y, *rest)

    @staticmethod
    def jvp(ctx, _p, _t, b_t, z_t, *p_t):
        _refuse_forward_over_forward()
        x, z, *params = ctx.saved_tensors
        problem: Problem = ctx.problem
        b_t = torch.zeros_like(x) if b_t is None else b_t
        z_t = torch.zeros_like(z) if z_t is None else z_t
        p_t = [torch.zeros_like(p) if t is None else t for p, t in zip(params, p_t)]

        def product(zz, *pp):  # A(z, p) x or A(z, p)^T x
            if ctx.transpose:
                return vjp(lambda z_: problem.G(z_, pp), zz)[1](x)[0]
            return torch.func.jvp(lambda z_: problem.G(z_, pp), (zz,), (x,))[1]

        _, dAx = torch.func.jvp(product, (z, *params), (z_t, *p_t))
        return LinearSolveFn.apply(problem, ctx.transpose, b_t - dAx, z, *params)

    @staticmethod
    def vmap(info, in_dims, problem: Problem, transpose: bool, b, z, *params):
        nb = info.batch_size
        _, _, b_dim, z_dim, *pdims = in_dims
        moved = [_move(p, d, nb) for p, d in zip(params, pdims)]
        batched = problem.batched(nb, _moved_dims(pdims))
        out = LinearSolveFn.apply(batched, transpose, _flatten_batch(b, b_dim, nb), _flatten_batch(z, z_dim, nb),
                                  *moved)
        return out.reshape(nb, -1), 0
