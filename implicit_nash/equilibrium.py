"""The public layer: :func:`solve_vi`, :func:`nash_equilibrium` and :class:`NashLayer`."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ._compat import tree_map, tree_unflatten
from ._tree import Flattener, check_finite, leaves_of
from .errors import ConvergenceError, ConvergenceWarning
from .games import CostGame, Game
from .implicit import Adjoint, Implicit, ImplicitSolution, ImplicitSpec
from .sets import Reals, StrategySet
from .solvers import PRGD, FlatProblem, Solution, Solver, iterate

__all__ = ["solve_vi", "nash_equilibrium", "NashLayer"]


def _solve(operator: Callable, z0: Any, theta: Any, *, players: Optional[int], symmetric: Optional[bool],
           solver: Optional[Solver], adjoint: Optional[Adjoint], constraint: Optional[StrategySet],
           throw: bool, return_info: bool, z_name: str):
    solver = PRGD() if solver is None else solver
    adjoint = Implicit() if adjoint is None else adjoint
    constraint = Reals() if constraint is None else constraint
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a Solver (PRGD, SimultaneousGradient, ...), got {type(solver).__name__}")
    if not isinstance(adjoint, Adjoint):
        raise TypeError(f"adjoint must be Implicit(...) or Unrolled(), got {type(adjoint).__name__}")
    if not isinstance(constraint, StrategySet):
        raise TypeError(f"constraint must be a StrategySet (Box, Ball, ...), got {type(constraint).__name__}")

    flat = Flattener(z0, players, z_name)
    z_leaves, _ = leaves_of(z0, z_name)
    check_finite(z_leaves, z_name)
    theta_leaves, theta_def = leaves_of(theta, "theta")
    check_finite(theta_leaves, "theta")
    batch_dims = 0 if players is None else 1

    def project(v: torch.Tensor) -> torch.Tensor:
        if constraint.unconstrained:
            return v
        return flat.flatten(tree_map(lambda x: constraint.project(x, batch_dims), flat.unflatten(v)))

    def F(v: torch.Tensor, th) -> torch.Tensor:
        out = operator(flat.unflatten(v), tree_unflatten(list(th), theta_def))
        try:
            return flat.flatten(out)
        except (ValueError, AttributeError) as err:
            raise ValueError(f"the operator must return a pytree shaped like {z_name}: {err}") from None

    def G(v: torch.Tensor, th) -> torch.Tensor:
        Fv = F(v, th)
        return Fv if constraint.unconstrained else v - project(v - Fv)

    implicit = isinstance(adjoint, Implicit)
    # The implicit gradient does not depend on the initial point; the unrolled one does (MAML
    # starts at phi_i = theta, and that path is part of its gradient), so only Implicit detaches.
    start = project(flat.flatten(z0).detach() if implicit else flat.flatten(z0))
    detached = [t.detach() for t in theta_leaves]
    with torch.enable_grad():
        F0 = F(start.detach(), detached)
    if not bool(torch.isfinite(F0).all()):
        raise ValueError(f"the operator is NaN or inf at the initial point {z_name}")
    if implicit and F0.requires_grad:
        raise ValueError("the operator depends on tensors that require grad but are not in theta "
                         "(a closure over parameters?); the implicit adjoint would silently drop their "
                         "gradient: pass them inside theta, use NashLayer with an nn.Module, or use "
                         "adjoint=Unrolled()")

    if implicit:
        with torch.no_grad():
            problem = FlatProblem(lambda v: F(v, detached), project, flat.players, flat.block,
                                  constraint.unconstrained)
            sol = iterate(solver, problem, start)
    else:
        problem = FlatProblem(lambda v: F(v, theta_leaves), project, flat.players, flat.block,
                              constraint.unconstrained)
        sol = iterate(solver, problem, start)

    if not sol.converged:
        msg = (f"{type(solver).__name__} stopped with status '{sol.status}' after {sol.steps} steps: "
               f"residual {sol.residual:.3g}, tolerance {sol.stats['tolerance']:.3g}")
        if sol.status == "diverged":
            msg += " (the game may not be monotone, or the step size is too large)"
        if throw:
            raise ConvergenceError(msg, status=sol.status, steps=sol.steps, residual=sol.residual,
                                   history=sol.history)
        warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    elif implicit and sol.status == "completed" and sol.residual > sol.stats["tolerance"]:
        # A fixed step count (num_steps) is a valid forward pass, but the implicit function
        # theorem holds at an equilibrium only: say so rather than differentiate silently.
        warnings.warn(f"{type(solver).__name__} ran its num_steps={sol.steps} steps and stopped at natural "
                      f"residual {sol.residual:.3g} (tolerance {sol.stats['tolerance']:.3g}): the implicit "
                      f"gradient assumes an equilibrium and is only approximate here; use more steps, a "
                      f"tolerance-based stop (num_steps=None) or adjoint=Unrolled()", ConvergenceWarning,
                      stacklevel=3)

    z = sol.value
    spec = None
    if implicit and torch.is_grad_enabled() and any(t.requires_grad for t in theta_leaves):
        spec = ImplicitSpec(G, adjoint.linear_solver,
                            adjoint.symmetric if adjoint.symmetric is not None else
                            (symmetric if constraint.unconstrained else None), throw)
        z = ImplicitSolution.apply(spec, z, *theta_leaves)
    value = flat.unflatten(z)
    if return_info:
        stats = dict(sol.stats, adjoint=type(adjoint).__name__, implicit_spec=spec)
        return Solution(value, sol.status, sol.steps, sol.residual, sol.history, stats)
    return value


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
        solver: forward solver, default :class:`~implicit_nash.PRGD` with adaptive step.
        adjoint: :class:`~implicit_nash.Implicit` (default) or :class:`~implicit_nash.Unrolled`.
        constraint: the set Ω, default the whole space.
        throw: raise :class:`~implicit_nash.ConvergenceError` when the solver fails; with
            ``False``, warn (:class:`~implicit_nash.ConvergenceWarning`) and return the last iterate.
        return_info: return a :class:`~implicit_nash.Solution` instead of the bare value.
        symmetric: whether :math:`\partial_z F` is symmetric, if known (lets CG run unchecked).

    Returns:
        :math:`z^*`, differentiable with respect to ``theta`` (or a :class:`Solution`).

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
    return _solve(operator, z0, theta, players=None, symmetric=symmetric, solver=solver,
                  adjoint=adjoint, constraint=constraint, throw=throw, return_info=return_info,
                  z_name="z0")


def _as_game(costs: Union[Game, Callable]) -> Game:
    return costs if isinstance(costs, Game) else CostGame(costs)


def _players(phi0: Any) -> int:
    from ._compat import tree_flatten
    leaves, _ = tree_flatten(phi0)
    if not leaves or not isinstance(leaves[0], torch.Tensor) or leaves[0].dim() == 0:
        raise ValueError("phi0 must be a tensor (or pytree of tensors) whose leading dimension indexes "
                         "the players")
    return leaves[0].shape[0]


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
            as :class:`~implicit_nash.AggregativeGame` (:math:`O(B)`).
        phi0: initial strategies, leading dimension ``B`` on every leaf.
        theta: the leader's parameter (tensor or pytree).
        solver, adjoint, constraint, throw, return_info: as in :func:`solve_vi`; ``constraint``
            applies to every player.

    Returns:
        :math:`\phi^*` shaped like ``phi0`` (or a :class:`~implicit_nash.Solution`).

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
    game = _as_game(costs)
    B = _players(phi0)
    theta_leaves, _ = leaves_of(theta, "theta")
    check_finite(theta_leaves, "theta")
    with torch.no_grad():
        phi_leaves, _ = leaves_of(phi0, "phi0")
        check_finite(phi_leaves, "phi0")
        try:
            values = game.costs(phi0, theta)
        except NotImplementedError:
            values = None
    if values is not None:
        if not isinstance(values, torch.Tensor) or values.shape != (B,):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"costs(phi, theta) must return a tensor of shape (B,) = ({B},), one cost per "
                             f"player; got {shape}")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("costs(phi0, theta) contains NaN or inf")
    return _solve(game.pseudo_gradient, phi0, theta, players=B, symmetric=game.symmetric, solver=solver,
                  adjoint=adjoint, constraint=constraint, throw=throw, return_info=return_info,
                  z_name="phi0")


class NashLayer(nn.Module):
    """A Nash equilibrium as a layer: ``NashLayer(costs)(phi0, theta) -> phi*``.

    If ``costs`` is an :class:`torch.nn.Module`, it is registered as a sub-module and its parameters
    are passed to the solver as part of the differentiable parameters (through
    ``torch.func.functional_call``), so they receive gradients from the implicit backward too.

    Args:
        costs: ``costs(phi, theta) -> (B,)`` (callable or module) or a :class:`Game`.
        solver, adjoint, constraint, throw: as in :func:`nash_equilibrium`.

    Attributes:
        last_solution: the :class:`Solution` of the latest forward call (status, steps, history).
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
        kwargs = dict(solver=self.solver, adjoint=self.adjoint, constraint=self.constraint,
                      throw=self.throw, return_info=True)
        if isinstance(self.costs, nn.Module):
            module = self.costs
            params = dict(module.named_parameters())

            def costs(phi, packed):
                th, p = packed
                return torch.func.functional_call(module, p, (phi, th))

            sol = nash_equilibrium(costs, phi0, (theta, params), **kwargs)
        else:
            sol = nash_equilibrium(self.costs, phi0, theta, **kwargs)
        self.last_solution = sol
        return sol.value
