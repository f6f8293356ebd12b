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
from ..penalties import CentroidPenalty, ProximalPenalty, RobustPenalty, _pow
from .base import Algorithm
from .inner import Coupling, FixedSteps, NewtonKrylov, TaskCG, newton_krylov

__all__ = ["IMAML", "closed_form_coupling"]


def closed_form_coupling(penalty, anchor: torch.Tensor, B: int) -> Coupling:
    r"""The centroid or robust penalty as a :class:`~implicit_nash.meta.inner.Coupling` on flat
    task-major points (``B`` rows of ``anchor.numel()`` entries; ``anchor`` flat): its
    pseudo-gradient, the product of that pseudo-gradient's Jacobian with a vector, and for
    :math:`p_C` its potential :math:`c\,\|a - \bar\phi\|^2` (its gradient is every task's
    :math:`p_C`-gradient: :math:`p_C` makes a potential game). All in O(B d), no graph.

    :math:`p_C`: the gradient is :math:`\frac{2c}{B}(\bar\phi - a)` for every task and the
    Jacobian :math:`\frac{2c}{B^2}\mathbf{1}\mathbf{1}^\top \otimes I`, whose product is the
    mean of the vector's rows, broadcast. :math:`p_R` (:math:`d_i = \phi_i - a`,
    :math:`q_i = \|d_i\|^2`, :math:`a_i = q_i^r`, :math:`S = C + \sum_k a_k`): the gradient is
    :math:`\kappa_i d_i` with :math:`\kappa_i = 2 s w B r (S - a_i) q_i^{r-1} / S^2`, and the
    product :math:`(Jv)_i = \kappa_i v_i + (d\kappa_i \cdot v)\, d_i`, with the derivative of
    :math:`\kappa_i` through :math:`q_i` and :math:`S` (:math:`dq_i = 2 d_i^\top v_i`).
    """
    if isinstance(penalty, CentroidPenalty):
        c0 = penalty.scale(B)
        c = 2.0 * c0 / B

        def gradient(z):
            return (c * (z.reshape(B, -1).mean(0) - anchor)).expand(B, -1).reshape(-1)

        def jvp(z, v):
            return (c * v.reshape(B, -1).mean(0)).expand(B, -1).reshape(-1)

        def value(z):
            return c0 * ((z.reshape(B, -1).mean(0) - anchor) ** 2).sum()
        return Coupling(gradient, jvp, value)
    if not isinstance(penalty, RobustPenalty):
        raise TypeError(f"closed_form_coupling: no closed form for {type(penalty).__name__}")
    r = float(penalty.robustness)
    k = 2.0 * penalty.scale * penalty.weight * B * r

    def parts(z):
        D = z.reshape(B, -1) - anchor
        q = (D * D).sum(1)
        m = torch.ones_like(q) if r == 1 else q if r == 2 else _pow(q, r - 1)
        a = q * m
        S = penalty.C + a.sum()
        return D, q, m, a, S

    def gradient(z):
        D, q, m, a, S = parts(z)
        return ((k / S ** 2) * (S - a) * m)[:, None].mul(D).reshape(-1)

    def jvp(z, v):
        D, q, m, a, S = parts(z)
        V = v.reshape(B, -1)
        dq = 2.0 * (D * V).sum(1)
        da = r * m * dq
        dS = da.sum()
        if r == 1:
            dm = torch.zeros_like(q)
        elif r == 2:
            dm = dq
        else:  # (r - 1) q^(r - 2) dq, 0 at q = 0 (where dq = 0 too)
            pos = q > 0
            dm = torch.where(pos, (r - 1) * torch.where(pos, q, torch.ones_like(q)) ** (r - 2) * dq,
                             torch.zeros_like(q))
        coef = (k / S ** 2) * (S - a) * m
        dcoef = (k / S ** 2) * ((dS - da) * m + (S - a) * dm - 2.0 * (S - a) * m * dS / S)
        return (coef[:, None] * V + dcoef[:, None] * D).reshape(-1)
    return Coupling(gradient, jvp)


_NOTED = set()


def _note_once(message: str) -> None:
    """A compiled inner solve that ran eagerly (the same iterates, slower): said once per reason."""
    if message not in _NOTED:
        _NOTED.add(message)
        warnings.warn(f"iMAML(compiled=True): {message}", RuntimeWarning, stacklevel=4)


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
        compiled: in budget mode, while a meta-gradient is recorded, run each Newton step's fixed
            Krylov iterations (forward-over-reverse Hessian-vector products) and the backward's
            budgeted solve as programs compiled by ``torch.compile`` with ``backend``: the same
            iterates, about 1.5 times faster per meta-iteration on the sinusoid preset, after a
            compilation in the first iterations. What cannot compile runs eagerly and says so.
        backend: the ``torch.compile`` backend (default ``"inductor"``, which needs a C++ compiler).

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
    compiled: bool = False
    backend: str = "inductor"
    name = "imaml"

    def __post_init__(self):
        super().__post_init__()
        ProximalPenalty(lam=self.lam)  # validates lam
        if not isinstance(self.newton, NewtonKrylov):
            raise TypeError(f"newton must be a NewtonKrylov, got {type(self.newton).__name__}")
        if not isinstance(self.compiled, bool):
            raise TypeError(f"compiled must be True or False, got {self.compiled!r}")
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"backend must be the name of a torch.compile backend, got {self.backend!r}")
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
        """The tolerance mode's ``linear_solver``; with ``cg_budget``, one MINRES per task for uncoupled
        tasks (iMAML's practice: each task's system has its own Krylov space), else ``linear_solver``
        run for ``cg_budget`` iterations on the whole coupled system. The layer hands the tasks over
        as its blocks (``layer_blocks = B``), or, when sharded over ranks (where the layer takes no
        blocks), as one vector laid out leaf after leaf (``sizes``)."""
        if self.cg_budget is None:
            return self.linear_solver
        if uncoupled:  # MINRES per task (see TaskCG's method: CG per task trained worse)
            return TaskCG(steps=self.cg_budget, method="minres", compiled=self.compiled,
                          backend=self.backend) if layer_blocks > 1 else \
                TaskCG(blocks=B, steps=self.cg_budget, sizes=tuple(sizes), method="minres")
        return FixedSteps(solver=self.linear_solver, steps=self.cg_budget, compiled=self.compiled, backend=self.backend)

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

    def _coupling(self, B):
        """``(flat, theta) -> Coupling``: the Nash penalty in closed form for the coupled Newton
        solve (:func:`closed_form_coupling`), or ``None`` for other penalties, under torch.func
        transforms, or when sharded over ranks (then F and its double-backward products are used)."""
        nash = self.penalty
        if not (self.fast_penalty and isinstance(nash, (CentroidPenalty, RobustPenalty))) \
                or functorch_active() or _collective.active():
            return None

        def make(flat, theta):
            return closed_form_coupling(nash, flat.flatten(self._start(theta, B)).reshape(B, -1)[0], B)
        return make

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
        coupling = None if uncoupled else self._coupling(B)
        # compiled Newton steps when a meta-gradient is recorded (training), not at evaluation: each
        # new shape of the task batch is a compilation
        backend = self.backend if self.compiled and options.budget and torch.is_grad_enabled() \
            and not functorch_active() else None

        def forward(phi0, th):
            """Newton-Krylov on the inner game (no graph); the layer differentiates its output."""
            def F(v):
                return flat.flatten(residual(flat.unflatten(v), th))

            z0 = flat.flatten(phi0).detach()
            if coupling is not None:
                # Nash-iMAML: the tasks' own proximal objectives by autograd, the Nash penalty in
                # closed form (a product: one Hessian-vector product plus O(B d) work). p_R first
                # takes Newton steps on the tasks' own proximal problems: its Jacobian at
                # phi = theta is of order w B / C (C = 1e-8: 5e7 for the sinusoid preset), a stiff
                # start for any method, and the equilibrium does not depend on the starting point. In
                # budget mode the warm steps are part of the budget (p_R(0.01) is a small perturbation
                # of the tasks' own problems: budget 2 = 1 warm step + 1 coupled step).
                warm, coupled = 0 if symmetric else 3, options
                if options.budget and warm:  # the warm steps are part of the budget: at most budget - 1
                    warm = min(warm, options.max_steps - 1)
                    coupled = dataclasses.replace(options, max_steps=options.max_steps - warm)
                res = newton_krylov(None, z0, coupled, symmetric=symmetric, blocks=B, warm=warm,
                                    objective=self._objective(build(self.own_penalty()), flat, th),
                                    coupling=coupling(flat, th), compiled=backend)
            else:
                if penalty is not None and penalty.coupled and not penalty.symmetric:
                    # p_R without the closed form: the same warm start, then Newton-GMRES on F
                    plain = build(self.own_penalty())
                    z0 = newton_krylov(None, z0, dataclasses.replace(options, max_steps=min(options.max_steps, 3)),
                                       symmetric=True, blocks=B, objective=self._objective(plain, flat, th)).value
                # uncoupled tasks (plain iMAML): each task minimises its own cost, with its own CG and
                # line search; F is then the gradient of the costs' sum, taken by plain autograd on
                # their graph
                res = newton_krylov(F, z0, options, symmetric=symmetric, blocks=B if uncoupled else 1,
                                    objective=self._objective(game, flat, th) if uncoupled else None,
                                    compiled=backend if uncoupled else None)
            if res.message:
                _note_once(res.message)
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
