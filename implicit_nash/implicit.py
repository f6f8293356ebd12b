r"""How gradients flow through a solve: the implicit adjoint and the unrolled adjoint.

Implicit (Lemma B.4, generalised).  At a solution the residual
:math:`G(z^*, \theta) = 0`, with :math:`G = F` without constraints and
:math:`G(z,\theta) = z - \Pi_\Omega(z - F(z;\theta))` (the fixed-point form, unit step) with them.
The implicit function theorem gives :math:`dz^*/d\theta = -(\partial_z G)^{-1}\partial_\theta G`,
which for :math:`G = F` is the paper's :math:`-P^{-1}Q`.  In reverse mode, for a cotangent
:math:`v = \partial \ell/\partial z^*`:

.. math:: (\partial_z G)^\top u = v, \qquad \partial\ell/\partial\theta = -(\partial_\theta G)^\top u.

Both products are vector-Jacobian products of ``G`` (``torch.func.vjp``); no Jacobian is
materialised and none of the forward iterations is stored, so memory does not grow with the number
of forward steps.  With constraints, the Jacobian of the projection is that of the torch operations
that compute it, which is exact wherever the active set is locally constant (strict
complementarity); at a degenerate point it is one element of the generalised Jacobian.

Unrolled.  Back-propagation through every forward iteration (what the paper's experiments do);
memory grows linearly with the number of steps, and the gradient is that of the truncated
iteration, not of the exact equilibrium.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from .errors import ConvergenceError, ConvergenceWarning
from .linear_solve import GMRES, LinearOperator, LinearSolver

__all__ = ["Adjoint", "Implicit", "Unrolled"]


class Adjoint:
    """Base class of the ways to differentiate a solve."""


@dataclass(frozen=True)
class Unrolled(Adjoint):
    """Differentiate by back-propagating through the forward iterations."""


@dataclass(frozen=True, kw_only=True)
class Implicit(Adjoint):
    """Differentiate the equilibrium conditions (implicit function theorem).

    Args:
        linear_solver: solves :math:`(\\partial_z G)^\\top u = v`; default :class:`GMRES`, valid for
            the non-symmetric Jacobians of general games.
        symmetric: declare :math:`\\partial_z G` symmetric (``True``) or not (``False``); ``None``
            takes the game's own declaration.  :class:`~implicit_nash.CG` needs ``True`` or a
            passing symmetry test.
    """

    linear_solver: LinearSolver = field(default_factory=GMRES)
    symmetric: Optional[bool] = None

    def __post_init__(self):
        if not isinstance(self.linear_solver, LinearSolver):
            raise TypeError(f"linear_solver must be a LinearSolver (CG, GMRES, ...), got "
                            f"{type(self.linear_solver).__name__}")


class ImplicitSpec:
    """Everything the backward pass needs besides tensors (held by the autograd context)."""

    def __init__(self, residual: Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor],
                 linear_solver: LinearSolver, symmetric: Optional[bool], throw: bool):
        self.residual = residual
        self.linear_solver = linear_solver
        self.symmetric = symmetric
        self.throw = throw
        self.last_info = None

    def backward(self, z: torch.Tensor, theta: List[torch.Tensor], v: torch.Tensor,
                 needs: Sequence[bool]) -> List[Optional[torch.Tensor]]:
        wanted = [i for i, n in enumerate(needs) if n]
        # One graph of G at (z*, theta), reused by every product of the Krylov solve
        # (retain_graph) and by the final theta-VJP; cheaper than a torch.func.vjp per product.
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            theta = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(theta)]
            G = self.residual(z, theta)
        double = []

        def vjp(u):  # (dG/dz)^T u
            (g,) = torch.autograd.grad(G, z, u, retain_graph=True)
            return g

        def jvp(u):  # (dG/dz) u: the VJP of the linear map w -> (dG/dz)^T w (reverse mode only)
            if not double:
                with torch.enable_grad():
                    w = torch.zeros_like(G, requires_grad=True)
                    (gw,) = torch.autograd.grad(G, z, w, retain_graph=True, create_graph=True)
                double.append((w, gw))
            w, gw = double[0]
            (g,) = torch.autograd.grad(gw, w, u, retain_graph=True)
            return g

        u, info = self.linear_solver.solve(LinearOperator(vjp, jvp, self.symmetric), v.reshape(-1))
        self.last_info = info
        if not info.converged:
            msg = (f"the implicit backward's linear solve ({type(self.linear_solver).__name__}) did not "
                   f"converge: residual {info.residual:.3g} > tolerance {info.tolerance:.3g} after "
                   f"{info.steps} steps ({info.message}); the equilibrium may be degenerate or the "
                   f"game not strongly monotone, or raise max_steps")
            if self.throw:
                raise ConvergenceError(msg, status="linear_solve", steps=info.steps,
                                       residual=info.residual, history=info.history)
            warnings.warn(msg, ConvergenceWarning, stacklevel=3)
        grads: List[Optional[torch.Tensor]] = [None] * len(theta)
        if wanted:
            found = torch.autograd.grad(G, [theta[i] for i in wanted], -u, allow_unused=True)
            for i, g in zip(wanted, found):
                grads[i] = torch.zeros_like(theta[i]) if g is None else g
        return grads


class ImplicitSolution(torch.autograd.Function):
    """Identity on the (detached) solution in the forward pass; the implicit backward in reverse."""

    @staticmethod
    def forward(spec, z_star, *theta):
        return z_star.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, z_star, *theta = inputs
        ctx.spec = spec
        ctx.save_for_backward(z_star, *theta)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z):
        z_star, *theta = ctx.saved_tensors
        grads = ctx.spec.backward(z_star, theta, grad_z, ctx.needs_input_grad[2:])
        return (None, None, *grads)
