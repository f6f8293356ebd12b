"""The public layer: :func:`solve_vi`, :func:`nash_equilibrium`, :class:`NashLayer`, the
:class:`~implicit_nash.Solution`-returning :func:`vi_solution` and :func:`nash_solution`, and
:func:`custom_root` / :func:`custom_fixed_point` for a forward solver of the user's own."""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ._compat import is_batched, tree_map, tree_unflatten
from ._tree import Flattener, check_finite, check_supported, leaves_of
from .errors import ConvergenceError, ConvergenceWarning
from .games import CostGame, Game
from .implicit import Adjoint, EquilibriumFn, Implicit, Problem, Unrolled
from .linear_solve import GMRES, LinearSolver
from .sets import Reals, StrategySet
from .solvers import FLOOR, PRGD, FlatProblem, Solution, Solver, _lipschitz_estimate, error_estimate, iterate

__all__ = ["solve_vi", "nash_equilibrium", "NashLayer", "vi_solution", "nash_solution", "custom_root",
           "custom_fixed_point"]


def _symmetry(declared: Optional[bool], adjoint: Adjoint) -> Optional[bool]:
    """The one symmetry declaration of the operator: the game's (or solve_vi's); Implicit's
    deprecated flag only where that is silent, and an error where the two disagree."""
    legacy = getattr(adjoint, "symmetric", None)
    if legacy is not None and declared is not None and legacy != declared:
        raise ValueError(f"Implicit(symmetric={legacy}) contradicts the operator's declaration "
                         f"symmetric={declared}; declare symmetry once, on the game or in solve_vi")
    return declared if declared is not None else legacy


def _solve(operator: Callable, z0: Any, theta: Any, *, players: Optional[int], symmetric: Optional[bool],
           solver: Optional[Solver], adjoint: Optional[Adjoint], constraint: Optional[StrategySet],
           throw: bool, z_name: str, forward: Optional[Callable] = None, root_tol=None, blocks: int = 1) -> Solution:
    solver = PRGD() if solver is None else solver
    adjoint = Implicit() if adjoint is None else adjoint
    constraint = Reals() if constraint is None else constraint
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a Solver (PRGD, SimultaneousGradient, ...), got {type(solver).__name__}")
    if not isinstance(adjoint, Adjoint):
        raise TypeError(f"adjoint must be Implicit(...) or Unrolled(), got {type(adjoint).__name__}")
    if not isinstance(constraint, StrategySet):
        raise TypeError(f"constraint must be a StrategySet (Box, Ball, ...), got {type(constraint).__name__}")
    if not isinstance(throw, bool):
        raise TypeError(f"throw must be True or False, got {throw!r}")
    check_supported((z0, z_name), (theta, "theta"))
    symmetric = _symmetry(symmetric, adjoint)

    flat = Flattener(z0, players, z_name)
    z_leaves, _ = leaves_of(z0, z_name)
    theta_leaves, theta_def = leaves_of(theta, "theta")
    set_names = list(constraint.parameters())
    set_leaves = [constraint.parameters()[k] for k in set_names]
    batch_dims = 0 if players is None else 1
    name = type(solver).__name__ if forward is None else "the custom forward solver"

    def project(v: torch.Tensor, sp) -> torch.Tensor:
        if constraint.unconstrained:
            return v
        c = constraint.with_parameters(dict(zip(set_names, sp))) if set_names else constraint
        return flat.flatten(tree_map(lambda x: c.project(x, batch_dims), flat.unflatten(v)))

    F = _flat_call(operator, flat, theta_def, f"the operator must return a pytree shaped like {z_name}")

    record = Solution(None, "", 0, math.nan, [], {"adjoint": type(adjoint).__name__})
    params = theta_leaves + set_leaves
    if isinstance(adjoint, Unrolled):
        if any(is_batched(t) for t in params + z_leaves):
            raise ValueError("adjoint=Unrolled() does not compose with torch.func.vmap (its loop stops on "
                             "data-dependent residuals); use the default Implicit() adjoint")
        if forward is not None:
            raise ValueError("custom_root differentiates implicitly; it takes no Unrolled adjoint")
        check_finite(z_leaves, z_name)
        check_finite(theta_leaves, "theta")
        # The unrolled gradient depends on the initial point (MAML starts at phi_i = theta, and that
        # path is part of its gradient), so the start is not detached.
        start = project(flat.flatten(z0), set_leaves)
        problem = FlatProblem(lambda v: F(v, theta_leaves), lambda v: project(v, set_leaves), flat.players,
                              flat.block, constraint.unconstrained)
        problem.name = z_name
        sol = iterate(solver, problem, start)
        holder = Problem(F=F, project=project, unconstrained=constraint.unconstrained, n_theta=len(theta_leaves),
                         players=flat.players, block=flat.block, linear_solver=GMRES(), symmetric=symmetric,
                         throw=throw, record=record, name=name)
        holder._report_forward(sol, implicit=False)
        # a failed forward (throw=False) returns its last iterate with a zero derivative
        z = sol.value if sol.converged else torch.where(torch.zeros((), dtype=torch.bool), sol.value,
                                                        sol.value.detach())
    else:
        problem = Problem(F=F, project=project, unconstrained=constraint.unconstrained, n_theta=len(theta_leaves),
                          players=flat.players // blocks, block=flat.block, linear_solver=adjoint.linear_solver,
                          symmetric=symmetric, throw=throw, record=record, solver=solver, name=name, z_name=z_name,
                          warm_start=adjoint.warm_start, groups=blocks,
                          forward=None if forward is None else _flat_call(
                              forward, flat, theta_def, "the forward solver must return a pytree shaped like the "
                              "initial point"),
                          check_root=None if forward is None else _root_check(root_tol, z_name))
        # The implicit gradient does not depend on the initial point: the start is detached.
        start = flat.flatten(tree_map(torch.Tensor.detach, z0))
        z, _ = EquilibriumFn.apply(problem, start, *params)
    record.value = flat.unflatten(z)
    return record


def _flat_call(fn: Callable, flat: Flattener, theta_def, what: str) -> Callable:
    """``fn(z, theta)`` on pytrees as a function of a flat ``z`` and theta's leaves, returning flat."""
    def call(v: torch.Tensor, th) -> torch.Tensor:
        out = fn(flat.unflatten(v), tree_unflatten(list(th), theta_def))
        try:
            return flat.flatten(out)
        except (ValueError, AttributeError, TypeError) as err:
            raise ValueError(f"{what}: {err}") from None
    return call


def _root_check(tol, z_name: str) -> Callable:
    rtol, atol, enabled = tol

    def check(problem: FlatProblem, start: torch.Tensor, z: torch.Tensor) -> Solution:
        """The forward's output measured as the forward solvers' answers are: the step-scaled
        residual and the estimated error against ``atol + rtol * ||z||`` (the initial point, which the
        forward may ignore, plays no part)."""
        problem.name = z_name
        if not enabled:
            return Solution(z, "converged", 0, math.nan, [], {"tolerance": math.nan, "root_check": False})
        g = problem.groups
        with torch.no_grad():
            finite = torch.isfinite(z.reshape(g, -1)).all(1)
            if not bool(finite.any()):
                return Solution(z, "non_finite", 0, math.nan, [], {"tolerance": math.nan})
            finite = finite.tolist()
            # a block that is not finite fails alone; the others are checked at a finite point
            zc = z if all(finite) else torch.where(
                torch.tensor(finite, device=z.device).unsqueeze(1), z.reshape(g, -1), start.reshape(g, -1)).reshape(-1)
            with torch.enable_grad():
                Fz = problem.F(zc)
            if Fz.requires_grad:
                raise ValueError("the residual depends on tensors that require grad but are not in theta (a "
                                 "closure over parameters?); their gradient would be dropped: pass them in theta")
            if not bool(torch.isfinite(Fz).all()):
                return Solution(z, "non_finite", 0, math.nan, [], {"tolerance": math.nan})
            L = _lipschitz_estimate(problem, zc, Fz)
            problem.set_step(L, zc)
            r = [x if f else math.nan for x, f in zip(problem.residual_norm(zc, Fz), finite)]
            eps = torch.finfo(z.dtype).eps
            rt = max(math.sqrt(eps) if rtol is None else float(rtol), FLOOR * eps)
            znorm = problem.norms(zc)
            scale = [max(zn, fn / l if l > 0 else fn) for zn, fn, l in zip(znorm, problem.norms(Fz), L)]
            tol = [float(atol) + rt * zn + eps ** 2 * s for zn, s in zip(znorm, scale)]
        errors, note = error_estimate(problem, zc)
        statuses = ["non_finite" if not f else ("converged" if x <= t and e <= t else "not_a_root")
                    for x, e, t, f in zip(r, errors, tol, finite)]
        status = ("non_finite" if "non_finite" in statuses else
                  "converged" if all(s == "converged" for s in statuses) else "not_a_root")
        stats = {"tolerance": min(tol), "lipschitz": max(L), "evaluations": problem.evaluations, "rtol": rt}
        if note:
            stats["estimate"] = note
        sol = Solution(z, status, 0, max(r), [max(r)], stats)
        sol.error = max(e if f else math.nan for e, f in zip(errors, finite))
        if problem.groups > 1:
            sol.statuses, sol.residuals, sol.errors = statuses, r, errors
        return sol
    return check


_COMMON_ARGS = """
        solver: forward solver, default :class:`~implicit_nash.PRGD` with adaptive step.
        adjoint: :class:`~implicit_nash.Implicit` (default; derivatives of any order, ``torch.func``
            transforms and ``vmap``) or :class:`~implicit_nash.Unrolled`.
        constraint: the set Ω, default the whole space.  Its tensors (bounds, centre, radius...)
            may require grad: they get their gradients like ``theta``.
        throw: raise :class:`~implicit_nash.ConvergenceError` when a forward or backward solve
            fails; with ``False``, warn (:class:`~implicit_nash.ConvergenceWarning`) and return the
            last iterate: a failed forward solve's derivative is zero (reverse and forward mode,
            every order), and so is any derivative whose linear solve failed.  Under
            ``torch.func.vmap`` this holds per member: a failed member's derivative is zero, the
            others keep theirs."""


def _legacy(sol: Solution, return_info: bool):
    if return_info:
        warnings.warn("return_info=True is deprecated: vi_solution(...) and nash_solution(...) always return "
                      "a Solution, and solve_vi/nash_equilibrium always return the value", DeprecationWarning,
                      stacklevel=3)
        return sol
    return sol.value


def vi_solution(operator: Callable[[Any, Any], Any], z0: Any, theta: Any, *, solver: Optional[Solver] = None,
                adjoint: Optional[Adjoint] = None, constraint: Optional[StrategySet] = None,
                throw: bool = True, symmetric: Optional[bool] = None) -> Solution:
    r"""As :func:`solve_vi`, but returns the :class:`~implicit_nash.Solution`: the value (differentiable
    like :func:`solve_vi`'s), status, steps, residual history and, once a backward pass has run
    through it, that pass's linear-solve diagnostics in ``Solution.backward``.

    Example:
        >>> import torch
        >>> from implicit_nash import vi_solution
        >>> theta = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> sol = vi_solution(lambda z, th: 2 * z - th, torch.zeros(2, dtype=torch.float64), theta)
        >>> sol.status, sol.backward
        ('converged', [])
        >>> sol.value.sum().backward()
        >>> sol.backward[0].status, [round(g, 12) for g in theta.grad.tolist()]
        ('converged', [0.5, 0.5])
    """
    return _solve(operator, z0, theta, players=None, symmetric=symmetric, solver=solver, adjoint=adjoint,
                  constraint=constraint, throw=throw, z_name="z0")


def solve_vi(operator: Callable[[Any, Any], Any], z0: Any, theta: Any, *, solver: Optional[Solver] = None,
             adjoint: Optional[Adjoint] = None, constraint: Optional[StrategySet] = None,
             throw: bool = True, return_info: bool = False, symmetric: Optional[bool] = None):
    r"""Solve the variational inequality :math:`z^* = \Pi_\Omega(z^* - F(z^*;\theta))`.

    Args:
        operator: ``operator(z, theta)`` returns :math:`F(z;\theta)`, a pytree shaped like ``z``,
            written with torch operations (it is transformed with ``torch.func``).  Every tensor it
            should differentiate with respect to must be inside ``theta``.
        z0: initial point (tensor or pytree of tensors); projected onto the set first.
        theta: parameters (tensor or pytree of tensors).
        symmetric: the operator's symmetry tag: whether :math:`\partial_z F` is symmetric (lets
            :class:`~implicit_nash.CG` run unchecked), if known.  Declared here once.
        return_info: deprecated; use :func:`vi_solution`.
{common}

    Returns:
        :math:`z^*`, differentiable with respect to ``theta`` (and the set's tensors).

    Example:
        >>> import torch
        >>> from implicit_nash import solve_vi
        >>> A = torch.tensor([[2.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)  # monotone, non-symmetric
        >>> theta = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> z = solve_vi(lambda z, th: A @ z - th, torch.zeros(2, dtype=torch.float64), theta)
        >>> torch.allclose(z, torch.linalg.solve(A, theta))
        True
        >>> z.sum().backward()
        >>> torch.allclose(theta.grad, torch.linalg.solve(A.T, torch.ones(2, dtype=torch.float64)))
        True
    """
    return _legacy(vi_solution(operator, z0, theta, solver=solver, adjoint=adjoint, constraint=constraint,
                               throw=throw, symmetric=symmetric), return_info)


solve_vi.__doc__ = solve_vi.__doc__.replace("{common}", _COMMON_ARGS)


def _as_game(costs: Union[Game, Callable]) -> Game:
    return costs if isinstance(costs, Game) else CostGame(costs)


def _players(phi0: Any) -> int:
    from ._compat import tree_flatten
    leaves, _ = tree_flatten(phi0)
    if not leaves or not isinstance(leaves[0], torch.Tensor) or leaves[0].dim() == 0:
        raise ValueError("phi0 must be a tensor (or pytree of tensors) whose leading dimension indexes "
                         "the players")
    return leaves[0].shape[0]


def nash_solution(costs: Union[Game, Callable[[Any, Any], torch.Tensor]], phi0: Any, theta: Any, *,
                  solver: Optional[Solver] = None, adjoint: Optional[Adjoint] = None,
                  constraint: Optional[StrategySet] = None, throw: bool = True) -> Solution:
    """As :func:`nash_equilibrium`, but returns the :class:`~implicit_nash.Solution` (see
    :func:`vi_solution`)."""
    game = _as_game(costs)
    B = _players(phi0)
    if isinstance(game, CostGame):
        game = game.expecting(B)
    return _solve(game.pseudo_gradient, phi0, theta, players=B, symmetric=game.symmetric, solver=solver,
                  adjoint=adjoint, constraint=constraint, throw=throw, z_name="phi0")


def nash_equilibrium(costs: Union[Game, Callable[[Any, Any], torch.Tensor]], phi0: Any, theta: Any, *,
                     solver: Optional[Solver] = None, adjoint: Optional[Adjoint] = None,
                     constraint: Optional[StrategySet] = None, throw: bool = True,
                     return_info: bool = False):
    r"""The Nash equilibrium :math:`\phi^*(\theta)` of a B-player game, differentiable in ``theta``.

    Each player ``i`` minimises :math:`f_i(\phi_i, \phi_{-i}; \theta)` over its strategy set; the
    equilibrium solves the VI of the pseudo-gradient :math:`F_i = \partial f_i/\partial\phi_i`
    (Lemma B.2) and its derivative is :math:`-P^{-1}Q` (Lemma B.4).

    Args:
        costs: ``costs(phi, theta)`` returning a tensor of shape ``(B,)`` (player ``i``'s cost in
            entry ``i``; pseudo-gradient in :math:`O(B^2)`), or a :class:`~implicit_nash.Game` such
            as :class:`~implicit_nash.AggregativeGame` (:math:`O(B)`).  The game declares its
            symmetry (``Game.symmetric``).
        phi0: initial strategies, leading dimension ``B`` on every leaf.
        theta: the leader's parameter (tensor or pytree).
        constraint: applies to every player.
        return_info: deprecated; use :func:`nash_solution`.
{common}

    Returns:
        :math:`\phi^*` shaped like ``phi0``.

    Example:
        >>> import torch
        >>> from implicit_nash import nash_equilibrium
        >>> theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> def costs(phi, th):  # two players: f_1 = (p1 - th)^2/2 + p1 p2,  f_2 = p2^2/2 - p1 p2
        ...     p1, p2 = phi[0, 0], phi[1, 0]
        ...     return torch.stack([0.5 * (p1 - th) ** 2 + p1 * p2, 0.5 * p2 ** 2 - p1 * p2])
        >>> phi = nash_equilibrium(costs, torch.zeros(2, 1, dtype=torch.float64), theta)
        >>> [round(v, 6) for v in phi.flatten().tolist()]  # p1 = th/2, p2 = th/2
        [0.5, 0.5]
    """
    return _legacy(nash_solution(costs, phi0, theta, solver=solver, adjoint=adjoint, constraint=constraint,
                                 throw=throw), return_info)


nash_equilibrium.__doc__ = nash_equilibrium.__doc__.replace("{common}", _COMMON_ARGS)


def custom_root(residual: Callable[[Any, Any], Any], *, linear_solver: Optional[LinearSolver] = None,
                symmetric: Optional[bool] = None, throw: bool = True, rtol: Optional[float] = None,
                atol: float = 0.0, check: bool = True, warm_start=None,
                blocks: int = 1) -> Callable[[Callable], Callable]:
    r"""Give any forward solver an implicit backward: a decorator.

    ``custom_root(residual)(forward)`` returns ``solve(z0, theta) -> z*`` that runs
    ``forward(z0, theta)`` (any code: SciPy, a closed form, a loop of your own; it need not be
    differentiable and runs without a graph) and differentiates its output implicitly through
    :math:`\text{residual}(z^*, \theta) = 0`, with the same machinery as the layer: derivatives of
    any order, ``torch.func`` transforms, ``vmap`` (the forward then runs once per problem), the same
    :class:`~implicit_nash.LinearSolver` choices and failure contract.

    The output is checked to be a root first, in the units of ``z``: both the step-scaled residual
    :math:`\|r(z^*)\|/\hat L` (:math:`\hat L` a finite-difference estimate of the residual's
    Lipschitz constant at :math:`z^*`) and the estimated error :math:`\|(\partial_z r)^{-1} r(z^*)\|`
    (a Newton correction, :func:`~implicit_nash.solvers.error_estimate`) must be at most
    :math:`\text{atol} + \text{rtol}\,\|z^*\|`, ``rtol`` defaulting to :math:`\sqrt{\varepsilon}`; the
    initial point plays no part.  A point that fails is a :class:`~implicit_nash.ConvergenceError`
    with status ``"not_a_root"`` (a warning with ``throw=False``), since its implicit gradient would
    be wrong.

    Args:
        residual: ``residual(z, theta)``, a pytree shaped like ``z``, zero at the solution; written
            with torch operations.  Its Jacobian in ``z`` must be invertible there.
        linear_solver: for the implicit systems, default :class:`~implicit_nash.GMRES`.
        symmetric: the symmetry tag of :math:`\partial_z r`, if known.
        throw, rtol, atol: as above.
        check: ``False`` skips the root check (a few evaluations of the residual and a small
            linear solve per call): you
            vouch that ``forward`` returns a root, as JAXopt's ``custom_root`` assumes.
        warm_start: a :class:`~implicit_nash.WarmStart` (or ``True`` for one owned by this solve):
            each implicit linear solve starts from the previous call's solution.
        blocks: ``k > 1`` declares ``z`` a stack of ``k`` independent problems: every leaf of ``z``
            has leading dimension ``k``, and block ``i`` of the residual depends on block ``i`` of
            ``z`` only (e.g. tasks that do not interact).  The Jacobian is then block-diagonal:
            every block gets its own tolerance, and :class:`~implicit_nash.CG` and
            :class:`~implicit_nash.GMRES` their own Krylov space, so each converges at its own rate.
            Declaring blocks that the residual couples gives wrong derivatives.

    Example:
        >>> import torch
        >>> import implicit_nash as inn
        >>> @inn.custom_root(lambda z, th: z ** 3 - th)          # z* = th^(1/3)
        ... def cube_root(z0, th):
        ...     return th.sign() * th.abs() ** (1 / 3)              # a closed form, no graph needed
        >>> th = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
        >>> z = cube_root(torch.ones((), dtype=torch.float64), th)
        >>> (g,) = torch.autograd.grad(z, th)
        >>> round(z.item(), 12), round(g.item(), 12)                # dz/dth = 1 / (3 z^2) = 1/12
        (2.0, 0.083333333333)
    """
    if not callable(residual):
        raise TypeError(f"residual must be callable, got {type(residual).__name__}")
    if not isinstance(check, bool):
        raise TypeError(f"check must be True or False, got {check!r}")
    linear_solver = GMRES() if linear_solver is None else linear_solver
    from .linear_solve import _check_nonneg, _plain
    _check_nonneg("rtol", rtol, allow_none=True)
    _check_nonneg("atol", atol)
    rtol, atol = _plain(rtol), _plain(atol)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks must be a positive integer, got {blocks!r}")
    adjoint = Implicit(linear_solver=linear_solver, warm_start=warm_start)

    def decorate(forward: Callable) -> Callable:
        if not callable(forward):
            raise TypeError(f"custom_root decorates a forward solver forward(z0, theta); got {type(forward).__name__}")

        def solve(z0: Any, theta: Any) -> Any:
            return _solve(residual, z0, theta, players=blocks if blocks > 1 else None, symmetric=symmetric, solver=None, adjoint=adjoint,
                          constraint=None, throw=throw, z_name="z0", forward=forward, root_tol=(rtol, atol, check),
                          blocks=blocks).value

        solve.__name__ = getattr(forward, "__name__", "solve")
        solve.__doc__ = getattr(forward, "__doc__", None)
        return solve

    return decorate


def custom_fixed_point(T: Callable[[Any, Any], Any], **kwargs) -> Callable[[Callable], Callable]:
    r""":func:`custom_root` for a fixed point :math:`z^* = T(z^*, \theta)` (residual :math:`z - T(z, \theta)`).

    Example:
        >>> import torch
        >>> import implicit_nash as inn
        >>> T = lambda z, th: 0.5 * torch.cos(z) + th               # a contraction
        >>> @inn.custom_fixed_point(T)
        ... def fixed_point(z0, th):
        ...     z = z0
        ...     for _ in range(200):
        ...         z = T(z, th)
        ...     return z
        >>> th = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        >>> z = fixed_point(torch.zeros((), dtype=torch.float64), th)
        >>> (g,) = torch.autograd.grad(z, th)
        >>> bool(torch.isclose(g, 1 / (1 + 0.5 * torch.sin(z.detach()))))
        True
    """
    return custom_root(lambda z, th: tree_map(lambda a, b: a - b, z, T(z, th)), **kwargs)


class NashLayer(nn.Module):
    """A Nash equilibrium as a layer: ``NashLayer(costs)(phi0, theta) -> phi*``.

    If ``costs`` is an :class:`torch.nn.Module`, it is registered as a sub-module and its parameters
    are passed to the solver as part of the differentiable parameters (through
    ``torch.func.functional_call``), so they receive gradients from the implicit backward too.

    Args:
        costs: ``costs(phi, theta) -> (B,)`` (callable or module) or a :class:`Game`.
        solver, adjoint, constraint, throw: as in :func:`nash_equilibrium`.

    Attributes:
        last_solution: the :class:`Solution` of the latest forward call (status, steps, history,
            and the backward diagnostics once a backward pass has run).
    """

    def __init__(self, costs, *, solver: Optional[Solver] = None, adjoint: Optional[Adjoint] = None,
                 constraint: Optional[StrategySet] = None, throw: bool = True):
        super().__init__()
        self.costs = costs
        self.solver = solver
        self.adjoint = adjoint
        self.constraint = constraint
        self.throw = throw
        self.last_solution: Optional[Solution] = None

    def forward(self, phi0: Any, theta: Any) -> Any:
        kwargs = dict(solver=self.solver, adjoint=self.adjoint, constraint=self.constraint, throw=self.throw)
        if isinstance(self.costs, nn.Module):
            module = self.costs
            params = dict(module.named_parameters())

            def costs(phi, packed):
                th, p = packed
                return torch.func.functional_call(module, p, (phi, th))

            sol = nash_solution(costs, phi0, (theta, params), **kwargs)
        else:
            sol = nash_solution(self.costs, phi0, theta, **kwargs)
        self.last_solution = sol
        return sol.value

    def __getstate__(self):
        """The state for ``copy.deepcopy`` and ``pickle``: ``last_solution`` is kept with its value
        detached (its autograd graph cannot be copied and belongs to the original's forward call)."""
        state = dict(super().__getstate__())
        sol = state.get("last_solution")
        if isinstance(sol, Solution):
            kept = copy.copy(sol)
            kept.value = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, sol.value)
            kept.backward = list(sol.backward)
            kept.stats = dict(sol.stats)
            state["last_solution"] = kept
        return state
