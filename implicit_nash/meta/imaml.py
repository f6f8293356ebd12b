"""iMAML (Rajeswaran et al., 2019) and its Nash-GBML variant.

The inner problem is proximal, :math:`\\min_{\\phi_i} \\mathcal{L}(\\phi_i; \\mathcal{D}_i^{tr}) +
\\frac{\\lambda}{2}\\|\\phi_i - \\theta\\|^2` (plus the Nash-GBML penalty), solved to equilibrium; the
meta-gradient is implicit, :math:`-P^{-1}Q`, which for the proximal problem alone is iMAML's
:math:`(I + H/\\lambda)^{-1}` applied to the query gradient (Lemma B.4 with
:math:`P = H + \\lambda I`, :math:`Q = -\\lambda I`).

The inner game is solved by Newton--Krylov (:mod:`implicit_nash.meta.inner`) and its solution is
handed to the core layer through :func:`~implicit_nash.custom_root`, which differentiates it
implicitly through :math:`F(\\phi^*;\\theta) = 0`. Two modes:

* tolerance (``budget=None``): Newton steps until :math:`\\|F\\|` meets the tolerance; a solve that
  does not is a :class:`~implicit_nash.ConvergenceWarning` (a ReLU network's inner minimiser sits on
  a kink, where no gradient vanishes: see :mod:`implicit_nash.meta.inner`);
* budgeted (``budget=n``): exactly ``n`` Newton steps of ``newton.krylov_steps`` Krylov iterations,
  and ``cg_budget`` Krylov iterations in the backward, as in iMAML's practice. No warnings: the
  trainer measures the meta-gradient's error against a tight solve instead (``hypergrad_check_every``).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .. import _collective
from .._compat import functorch_active, tree_flatten, tree_map, tree_unflatten
from .._tree import Flattener
from ..equilibrium import custom_root
from ..errors import ConvergenceError, ConvergenceWarning
from ..penalties import ProximalPenalty
from .base import Algorithm
from .inner import FixedSteps, NewtonKrylov, TaskCG, newton_krylov

__all__ = ["IMAML"]


@dataclass(frozen=True, kw_only=True)
class IMAML(Algorithm):
    """Implicit MAML with proximal weight ``lam``; ``meta_gradient="implicit"`` by default.

    The implicit meta-gradient is exact only at an equilibrium of a strongly monotone game: ``lam``
    must exceed minus the smallest eigenvalue of the task losses' Hessians. With a ReLU network the
    inner minimiser lies on a kink of the support loss, where no gradient vanishes (measured on the
    sinusoid preset: every method stalls at a per-task residual of 0.03-0.2, with pre-activations at
    1e-9); a smooth activation (``tanh``) has a root, which Newton's method finds in a few steps.

    Args:
        lam: the proximal weight :math:`\\lambda`.
        newton: the Newton--Krylov options (``max_steps``, ``krylov_steps``, tolerance).
        budget: ``None`` (solve to tolerance) or the fixed number of Newton steps.
        cg_budget: ``None`` (the backward's linear solve to tolerance) or its fixed number of Krylov
            iterations.
        solver: a core forward solver (``PRGD(...)``) instead of Newton--Krylov (the previous
            behaviour; slower).

    The backward's linear solver stays GMRES by default even for the symmetric games (plain iMAML,
    p_C): with a ReLU network the Hessian of a large-amplitude sinusoid task has eigenvalues below
    ``-lam`` (measured at initialisation: -27 for amplitude 5 with ``lam=10``), so :math:`P` can be
    indefinite and CG would break down.
    """

    lam: float = 10.0
    meta_gradient: str = "implicit"
    newton: NewtonKrylov = dataclasses.field(default_factory=NewtonKrylov)
    budget: Optional[int] = None
    cg_budget: Optional[int] = None
    name = "imaml"

    def __post_init__(self):
        super().__post_init__()
        ProximalPenalty(lam=self.lam)  # validates lam
        if not isinstance(self.newton, NewtonKrylov):
            raise TypeError(f"newton must be a NewtonKrylov, got {type(self.newton).__name__}")
        for name in ("budget", "cg_budget"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {v!r}")

    def own_penalty(self):
        return ProximalPenalty(lam=self.lam)

    @property
    def budgeted(self) -> bool:
        """Whether the meta-gradient is computed with a fixed budget (an approximation)."""
        return self.budget is not None or self.cg_budget is not None

    def reference(self) -> "IMAML":
        """The same algorithm solved to tolerance (the hypergradient check's reference)."""
        return dataclasses.replace(self, budget=None, cg_budget=None, throw=False,
                                   newton=dataclasses.replace(self.newton, budget=False,
                                                              max_steps=max(self.newton.max_steps, 50),
                                                              krylov_steps=max(self.newton.krylov_steps, 20)))

    def _backward_solver(self, uncoupled: bool, layer_blocks: int, B: int, sizes):
        """The tolerance mode's ``linear_solver``; with ``cg_budget``, one CG per task for uncoupled
        tasks (iMAML's practice: each task's system has its own Krylov space), else ``linear_solver``
        run for ``cg_budget`` iterations on the whole coupled system. The layer hands the tasks over
        as its blocks (``layer_blocks = B``), or, when sharded over ranks (where the layer takes no
        blocks), as one vector laid out leaf after leaf (``sizes``)."""
        if self.cg_budget is None:
            return self.linear_solver
        if uncoupled:
            return TaskCG(steps=self.cg_budget) if layer_blocks > 1 else \
                TaskCG(blocks=B, steps=self.cg_budget, sizes=tuple(sizes))
        return FixedSteps(solver=self.linear_solver, steps=self.cg_budget)

    @staticmethod
    def _objective(game, flat, theta):
        """Each task's own cost on flat points (its objective when the game is uncoupled)."""
        def objective(v):
            return game.costs(flat.unflatten(v), theta)
        return objective

    def _residual(self, game, losses, penalty, B):
        """The inner game's pseudo-gradient for the layer and the coupled Newton solves: the task
        losses' gradient by plain autograd plus the penalty's closed-form pseudo-gradient (the same
        values as ``game.pseudo_gradient``, without torch.func's per-operation wrapping: its graph is
        cheaper to build and to differentiate). ``game.pseudo_gradient`` itself under a torch.func
        transform (derivatives of higher order), or for a penalty without a closed form."""
        fast = self.fast_penalty and penalty is not None and penalty.has_pseudo_gradient
        total = _collective.total(B)

        def residual(phi, theta):
            if not fast or functorch_active():
                return game.pseudo_gradient(phi, theta)
            create = torch.is_grad_enabled()
            leaves, spec = tree_flatten(phi)
            with torch.enable_grad():
                leaves = [x if x.requires_grad else x.detach().requires_grad_(True) for x in leaves]
                costs = losses.costs(tree_unflatten(leaves, spec), theta)
                grads = torch.autograd.grad(costs.sum(), leaves, create_graph=create, materialize_grads=True)
            extra = penalty.pseudo_gradient(tree_unflatten(leaves, spec), self.anchor(theta), total)
            return tree_map(torch.add, tree_unflatten(list(grads), spec), extra)
        return residual

    def _implicit(self, game, theta, B, penalty, build=None):
        if self.solver is not None or build is None:
            return super()._implicit(game, theta, B, penalty, build)
        symmetric = penalty is None or bool(penalty.symmetric)
        start = self._start(theta, B)
        flat = Flattener(start, B, "phi")
        uncoupled = penalty is None or not penalty.coupled  # plain iMAML: the tasks do not interact
        residual = self._residual(game, build(None), penalty, B)
        options = self.newton if self.budget is None else dataclasses.replace(
            self.newton, max_steps=self.budget, budget=True)

        def forward(phi0, th):
            """Newton-Krylov on the inner game (no graph); the layer differentiates its output."""
            def F(v):
                return flat.flatten(residual(flat.unflatten(v), th))

            z0 = flat.flatten(phi0).detach()
            if penalty is not None and penalty.coupled and not penalty.symmetric:
                # p_R: its Jacobian at phi = theta is of order w B / C (C = 1e-8: 5e7 for the
                # sinusoid preset), a stiff start for any method. Warm start (valid: the equilibrium
                # does not depend on the starting point) from the tasks' own proximal problems,
                # where the distances to theta are far above C^(1/2r).
                plain = build(self.own_penalty())
                z0 = newton_krylov(None, z0, dataclasses.replace(options, max_steps=min(options.max_steps, 3)),
                                   symmetric=True, blocks=B, objective=self._objective(plain, flat, th)).value
            # uncoupled tasks (plain iMAML): each task minimises its own cost, with its own CG and line
            # search; F is then the gradient of the costs' sum, taken by plain autograd on their graph
            res = newton_krylov(F, z0, options, symmetric=symmetric, blocks=B if uncoupled else 1,
                                objective=self._objective(game, flat, th) if uncoupled else None)
            if not res.converged:
                msg = (f"Newton-Krylov stopped with status '{res.status}' after {res.steps} steps: residual "
                       f"{res.residual:.3g}, tolerance {res.tolerance:.3g}")
                if res.status == "stalled":
                    msg += " (no descent: with a ReLU network the inner minimiser sits on a kink)"
                if self.throw:
                    raise ConvergenceError(msg, status=res.status, steps=res.steps, residual=res.residual,
                                           history=res.history)
                warnings.warn(msg, ConvergenceWarning, stacklevel=4)
            return flat.unflatten(res.value)

        # The core layer differentiates the solution through F(phi*; theta) = 0 (Lemma B.4). Its
        # root check is skipped (check=False, three evaluations of F saved): the solve above tests
        # its own tolerance and reports, and a budgeted solve is not a root by design (the trainer
        # measures the error it causes instead).
        # uncoupled tasks are the layer's blocks (a Krylov space per task), except when sharded over
        # ranks, where the layer's stacked systems cannot be (its products are all-reduced)
        layer_blocks = B if uncoupled and not _collective.active() else 1
        solve = custom_root(residual, linear_solver=self._backward_solver(uncoupled, layer_blocks, B, flat.sizes),
                            symmetric=True if symmetric else None, throw=self.throw, check=False,
                            warm_start=self.implicit_adjoint().warm_start, blocks=layer_blocks)(forward)
        return solve(start, theta)
