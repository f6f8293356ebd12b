r"""Games: costs :math:`f_i(\phi_i, \phi_{-i}; \theta)` and their pseudo-gradient.

The pseudo-gradient (the operator of the variational inequality) stacks every player's partial
gradient of its own cost, :math:`F_i(\phi;\theta) = \partial f_i / \partial \phi_i` (eq. 12 and
Appendix B of the paper).  Players are the leading dimension of every leaf of ``phi``.

Two ways to describe a game:

* :class:`CostGame` takes any ``costs(phi, theta) -> (B,)``.  Its pseudo-gradient is the
  block diagonal of the Jacobian of the costs: ``B`` reverse passes, each through all ``B``
  costs, i.e. :math:`O(B^2)` work.  The generic fallback.
* :class:`AggregativeGame` describes the usual structure of meta-learning games, a separable
  per-player term plus a coupling through an aggregate
  :math:`s = \sum_k a(\phi_k, \theta)`,

  .. math:: f_i = \ell_i(\phi_i;\theta) + h_i(\phi_i, \theta, s),

  and computes the pseudo-gradient in :math:`O(B)` with one reverse pass: it differentiates
  :math:`\sum_i \ell_i(x_i) + h_i(x_i, \theta, s - a(\phi_i) + a(x_i))` with respect to
  :math:`x` at :math:`x = \phi`.  Each term depends on its own :math:`x_i` only, so the gradient's
  block ``i`` is :math:`\partial f_i/\partial\phi_i` including the player's own contribution to
  the aggregate, and the result stays a differentiable function of :math:`(\phi, \theta)`
  (nothing is detached), which the implicit backward needs.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch.func import grad, vjp, vmap

from . import _collective
from ._compat import tree_map
from .sets import StrategySet

__all__ = ["Game", "CostGame", "AggregativeGame", "residual"]


def residual(operator: Callable, z: Any, theta: Any, constraint: Optional[StrategySet] = None,
             batch_dims: int = 0) -> Any:
    r"""The natural map :math:`z - \Pi_\Omega(z - F(z;\theta))` with a unit step.

    Zero exactly at solutions of the variational inequality; independent of any solver's step size
    or state.  ``batch_dims=1`` for games (the player dimension).
    """
    Fz = operator(z, theta)
    if constraint is None or constraint.unconstrained:
        return Fz
    return tree_map(lambda zi, fi: zi - constraint.project(zi - fi, batch_dims), z, Fz)


class Game:
    """Base class: a game knows its pseudo-gradient.

    Attributes:
        symmetric: ``True`` when the Jacobian of the pseudo-gradient is symmetric (a potential
            game), ``False`` when it is known not to be, ``None`` when unknown.
    """

    symmetric: Optional[bool] = None

    def costs(self, phi: Any, theta: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def pseudo_gradient(self, phi: Any, theta: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def residual(self, phi: Any, theta: Any, constraint: Optional[StrategySet] = None) -> Any:
        """Natural residual of the equilibrium conditions (see :func:`residual`)."""
        return residual(self.pseudo_gradient, phi, theta, constraint, batch_dims=1)


class CostGame(Game):
    """A game given by ``costs(phi, theta) -> tensor of shape (B,)``; :math:`O(B^2)` pseudo-gradient.

    Args:
        costs: entry ``i`` of the output is player ``i``'s cost. Written with torch operations
            (``torch.func`` transforms it).
        symmetric: declare the Jacobian symmetric (potential game) or not, if known.
    """

    def __init__(self, costs: Callable[[Any, Any], torch.Tensor], symmetric: Optional[bool] = None):
        if not callable(costs):
            raise TypeError(f"costs must be callable, got {type(costs).__name__}")
        self._costs = costs
        self.symmetric = symmetric

        self.players: Optional[int] = None

    def expecting(self, players: int) -> "CostGame":
        """This game, checking that ``costs`` returns ``players`` costs (at no extra cost: the
        check reads the shape of the costs that the pseudo-gradient computes anyway)."""
        game = CostGame(self._costs, self.symmetric)
        game.players = players
        return game

    def costs(self, phi, theta):
        return self._costs(phi, theta)

    def pseudo_gradient(self, phi, theta):
        values, pullback = vjp(lambda p: self._costs(p, theta), phi)
        B = self.players
        if not isinstance(values, torch.Tensor) or values.dim() != 1 or (B is not None and values.shape[0] != B):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"costs(phi, theta) must return a tensor of shape (B,) = ({B},), one cost per "
                             f"player; got {shape}")
        n = values.shape[0]
        eye = torch.eye(n, dtype=values.dtype, device=values.device)
        (jac,) = vmap(pullback)(eye)  # row i: the gradient of player i's cost

        def diagonal(leaf):
            idx = torch.arange(leaf.shape[0], device=leaf.device)
            return leaf[idx, idx]

        return tree_map(diagonal, jac)


class AggregativeGame(Game):
    r"""A game with costs :math:`f_i = \ell(\phi_i, \theta, d_i) + h(\phi_i, \theta, s, d_i)`,
    :math:`s = \sum_k a(\phi_k, \theta)`; its pseudo-gradient costs :math:`O(B)`.

    Args:
        local: ``local(phi_i, theta, *data_i) -> scalar``, the separable part (e.g. a task's
            training loss), vmapped over players; ``None`` for none.
        contribution: ``contribution(phi_i, theta) -> pytree``, one player's share of the
            aggregate ``s``; ``None`` when there is no coupling.
        coupling: ``coupling(phi_i, theta, s, *data_i) -> scalar``; ``None`` for none.
        data: per-player data passed to ``local`` and ``coupling``, a tuple of pytrees with
            leading dimension B.
        symmetric: whether the pseudo-gradient's Jacobian is symmetric, if known.
        coupling_gradient: optional closed form of every player's partial gradient of its
            coupling term, ``coupling_gradient(phi, theta) -> pytree shaped like phi`` (batched
            over players), built from torch operations so that it stays differentiable. When
            given, ``pseudo_gradient`` uses it instead of differentiating ``coupling`` (the built-in
            penalties' fast path: a few batched operations instead of a reverse pass through
            per-player vmaps); ``costs`` still uses ``coupling``. Tests check the two agree.

    Example:
        >>> import torch
        >>> from implicit_nash import AggregativeGame, nash_equilibrium
        >>> targets = torch.tensor([[0.0], [2.0], [4.0]], dtype=torch.float64)
        >>> game = AggregativeGame(  # f_i = |phi_i - t_i|^2/2 + |phi_i - mean(phi)|^2/2
        ...     local=lambda p, th, t: 0.5 * ((p - t) ** 2).sum(),
        ...     contribution=lambda p, th: p / 3,
        ...     coupling=lambda p, th, s, t: 0.5 * ((p - s) ** 2).sum(),
        ...     data=(targets,))
        >>> phi = nash_equilibrium(game, torch.zeros(3, 1, dtype=torch.float64), torch.zeros(()))
        >>> [round(v, 4) for v in phi.flatten().tolist()]
        [0.8, 2.0, 3.2]
    """

    def __init__(self, local: Optional[Callable] = None, contribution: Optional[Callable] = None,
                 coupling: Optional[Callable] = None, data: Sequence[Any] = (),
                 symmetric: Optional[bool] = None, coupling_gradient: Optional[Callable] = None):
        if local is None and coupling is None:
            raise ValueError("an AggregativeGame needs a local term, a coupling, or both")
        if (coupling is None) != (contribution is None):
            raise ValueError("coupling and contribution go together: give both or neither")
        self.local = local
        self.contribution = contribution
        self.coupling = coupling
        self.data = tuple(data)
        self.symmetric = symmetric
        if coupling_gradient is not None and coupling is None:
            raise ValueError("coupling_gradient is the closed-form gradient of a coupling: give the coupling too")
        self.coupling_gradient = coupling_gradient

    def aggregate(self, phi, theta):
        """:math:`s = \\sum_k a(\\phi_k, \\theta)` (over every rank's players when sharded)."""
        parts = vmap(self.contribution, in_dims=(0, None))(phi, theta)
        return _collective.differentiable_sum_tree(tree_map(lambda p: p.sum(0), parts))

    def _local(self, phi, theta):
        in_dims = (0, None) + (0,) * len(self.data)
        return vmap(self.local, in_dims=in_dims)(phi, theta, *self.data)

    def costs(self, phi, theta):
        total = 0.0
        if self.local is not None:
            total = total + self._local(phi, theta)
        if self.coupling is not None:
            s = self.aggregate(phi, theta)
            in_dims = (0, None, None) + (0,) * len(self.data)
            total = total + vmap(self.coupling, in_dims=in_dims)(phi, theta, s, *self.data)
        return total

    def pseudo_gradient(self, phi, theta):
        if self.coupling_gradient is not None:
            extra = self.coupling_gradient(phi, theta)
            if self.local is None:
                return extra
            local = grad(lambda x: self._local(x, theta).sum())(phi)
            return tree_map(torch.add, local, extra)
        return self._pseudo_gradient_by_autograd(phi, theta)

    def _pseudo_gradient_by_autograd(self, phi, theta):
        s = own = None  # bound in every case: torch.compile cannot trace a closure over unbound cells
        if self.coupling is not None:
            own = vmap(self.contribution, in_dims=(0, None))(phi, theta)
            s = _collective.differentiable_sum_tree(tree_map(lambda o: o.sum(0), own))

        def own_costs(x):
            total = 0.0
            if self.local is not None:
                total = total + self._local(x, theta).sum()
            if self.coupling is not None:
                mine = vmap(self.contribution, in_dims=(0, None))(x, theta)
                # s_i = s - a(phi_i) + a(x_i): player i moves its own share of the aggregate only.
                s_i = tree_map(lambda S, o, m: S.unsqueeze(0) - o + m, s, own, mine)
                in_dims = (0, None, 0) + (0,) * len(self.data)
                total = total + vmap(self.coupling, in_dims=in_dims)(x, theta, s_i, *self.data).sum()
            return total

        return grad(own_costs)(phi)
