r"""What every gradient-based meta-learning algorithm shares: the inner game and its meta-gradient.

An algorithm is a frozen dataclass of hyperparameters (STYLE.md §5). All of them have the same
methods and the same signature:

* ``init(model) -> theta``: the meta-parameters, a dict of tensors (``theta["params"]`` holds the
  network's weights; Meta-SGD adds ``theta["lr"]``);
* ``task_losses(model, theta, batch) -> (B,)``: each task's query loss after adaptation,
  differentiable in ``theta`` according to ``meta_gradient``;
* ``outer_loss(losses, batch, state) -> scalar``: the meta-loss :math:`F` of Algorithm 1 (the mean
  over tasks; TR-MAML's worst-case weighting overrides it);
* ``adapt(model, theta, x, y) -> phi``: the task-specific parameters of a batch of tasks.

The inner level of Algorithm 1 is the B-player game of eq. 12: player ``i`` minimises its support
loss plus the penalty, :math:`f_i = \mathcal{L}(\phi_i; \mathcal{D}_i^{tr}) + p(\theta, \phi_i,
\phi_{-i})`. It is built as an :class:`~implicit_nash.AggregativeGame` (tasks are a vmapped leading
dimension; the penalty couples them through an aggregate), so one pseudo-gradient costs O(B).

Meta-gradient modes:

* ``"unrolled"``: Algorithm 2 literally (``inner_steps`` simultaneous gradient steps from
  :math:`\phi_i = \theta`), back-propagated through every step, second order (what the paper's
  experiments do);
* ``"first_order"``: the same forward without its graph; the meta-gradient treats
  :math:`d\phi_i/d\phi_0` as the identity (FOMAML);
* ``"implicit"``: the inner game solved to equilibrium by the core layer and differentiated by
  Lemma B.4. It needs a strongly monotone game (e.g. iMAML's proximal term); the equilibrium does
  not depend on the inner step sizes, so Meta-SGD's learned rates get no gradient in this mode.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as nnf
from torch.func import functional_call, vmap

from .. import _collective
from .._compat import tree_map
from ..equilibrium import vi_solution
from ..games import AggregativeGame
from ..implicit import Implicit, WarmStart
from ..linear_solve import GMRES, LinearSolver
from ..penalties import Penalty
from ..solvers import PRGD, Solver

__all__ = ["Algorithm", "META_GRADIENTS", "LOSSES"]

META_GRADIENTS = ("unrolled", "first_order", "implicit")
LOSSES = ("mse", "cross_entropy")


def _task_loss(kind: str, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "mse":
        return ((pred - y) ** 2).mean()
    return nnf.cross_entropy(pred, y)


@dataclass(frozen=True, kw_only=True)
class Algorithm:
    """Base class of the GBML family (see the module docstring for the shared signature).

    Args:
        inner_steps: number of inner gradient steps ``n`` of Algorithm 2 (unrolled and
            first-order modes; also the steps used to adapt at evaluation).
        inner_lr: inner learning rate :math:`\\alpha`.
        penalty: the Nash-GBML penalty coupling the tasks (``None``: the plain GBML algorithm).
        meta_gradient: ``"unrolled"``, ``"first_order"`` or ``"implicit"``.
        solver: forward solver of the implicit mode (default ``PRGD(max_steps=1000)``).
        linear_solver: linear solver of the implicit backward (default GMRES: the game Jacobian is
            not symmetric with the robust penalty).
        loss: ``"mse"`` (regression) or ``"cross_entropy"`` (classification).
        fast_penalty: use the penalty's closed-form pseudo-gradient when it has one (``False``:
            autograd through its ``contribution`` and ``value``; the two agree, see the tests).
        throw: in implicit mode, raise :class:`~implicit_nash.ConvergenceError` when the inner
            solve or the backward's linear solve does not converge (``False``: a
            :class:`~implicit_nash.ConvergenceWarning`, which the trainer counts and reports).
        warm_start: in implicit mode, start each meta-iteration's backward linear solve from the
            previous one's solution (:class:`~implicit_nash.WarmStart`; the answer is unchanged, only
            the number of products differs).  ``warm.solves``/``warm.warm``/``warm.products`` count.
    """

    inner_steps: int = 3
    inner_lr: float = 0.001
    penalty: Optional[Penalty] = None
    meta_gradient: str = "unrolled"
    solver: Optional[Solver] = None
    linear_solver: LinearSolver = dataclasses.field(default_factory=GMRES)
    loss: str = "mse"
    throw: bool = True
    fast_penalty: bool = True
    warm_start: bool = False

    name = "base"

    def __post_init__(self):
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {self.inner_steps!r}")
        if not isinstance(self.inner_lr, (int, float)) or not self.inner_lr > 0 or self.inner_lr == float("inf"):
            raise ValueError(f"inner_lr must be a finite positive number, got {self.inner_lr!r}")
        if self.penalty is not None and not isinstance(self.penalty, Penalty):
            raise TypeError(f"penalty must be an implicit_nash Penalty or None, got {type(self.penalty).__name__}")
        if self.meta_gradient not in META_GRADIENTS:
            raise ValueError(f"meta_gradient must be one of {META_GRADIENTS}, got {self.meta_gradient!r}")
        if self.solver is not None and not isinstance(self.solver, Solver):
            raise TypeError(f"solver must be an implicit_nash Solver, got {type(self.solver).__name__}")
        if not isinstance(self.linear_solver, LinearSolver):
            raise TypeError(f"linear_solver must be an implicit_nash LinearSolver, got "
                            f"{type(self.linear_solver).__name__}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not isinstance(self.warm_start, bool):
            raise TypeError(f"warm_start must be True or False, got {self.warm_start!r}")
        object.__setattr__(self, "warm", WarmStart())  # the implicit backward's memory between iterations

    def implicit_adjoint(self) -> Implicit:
        """The adjoint of the implicit mode: this algorithm's linear solver, warm-started if asked."""
        return Implicit(linear_solver=self.linear_solver, warm_start=self.warm if self.warm_start else None)

    # ----------------------------------------------------------------- per-algorithm hooks
    def input_extra(self) -> int:
        """Extra input features the network needs (CAVIA's context); 0 otherwise."""
        return 0

    def init(self, model: torch.nn.Module) -> Dict[str, Any]:
        """Meta-parameters: copies of the model's parameters (leaves that require grad)."""
        params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
        return {"params": params}

    def anchor(self, theta: Dict[str, Any]) -> Any:
        """The adapted parameters' starting point :math:`\\phi_0` (also the penalties' anchor)."""
        return theta["params"]

    def predict(self, model: torch.nn.Module, theta: Dict[str, Any], phi_i: Any, x: torch.Tensor):
        """The network's output for one task with task-specific parameters ``phi_i``."""
        return functional_call(model, phi_i, (x,))

    def step_size(self, theta: Dict[str, Any]) -> Any:
        """The inner step :math:`\\alpha` (Meta-SGD: a learned tensor per parameter)."""
        return self.inner_lr

    def own_penalty(self) -> Optional[Penalty]:
        """A penalty that is part of the algorithm itself (iMAML's proximal term)."""
        return None

    # ----------------------------------------------------------------- the inner game
    def inner_penalty(self, nash: bool = True) -> Optional[Penalty]:
        """The algorithm's own penalty plus (when ``nash``) the Nash-GBML penalty."""
        terms = [p for p in (self.own_penalty(), self.penalty if nash else None) if p is not None]
        if not terms:
            return None
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total

    def game(self, model, theta, x, y, nash: bool = True) -> AggregativeGame:
        """The inner game of eq. 12 for a batch of tasks with support sets ``(x, y)``.

        When the meta-batch is sharded over ranks (:mod:`implicit_nash.distributed`), ``x`` and ``y``
        hold this rank's tasks and B counts the tasks of every rank (the blocks may differ in size).
        """
        return self._game(model, x, y, self.inner_penalty(nash))

    def _game(self, model, x, y, penalty: Optional[Penalty]) -> AggregativeGame:
        B = _collective.total(x.shape[0])
        kind = self.loss

        def task_loss(phi_i, th, x_i, y_i):
            return _task_loss(kind, self.predict(model, th, phi_i, x_i), y_i)

        if penalty is None:
            return AggregativeGame(local=task_loss, data=(x, y), symmetric=None)
        if not penalty.coupled:
            def local(phi_i, th, x_i, y_i):
                return task_loss(phi_i, th, x_i, y_i) + penalty.value(phi_i, self.anchor(th), None, B)
            return AggregativeGame(local=local, data=(x, y))

        def contribution(phi_i, th):
            return penalty.contribution(phi_i, self.anchor(th))

        def coupling(phi_i, th, s, x_i, y_i):
            return penalty.value(phi_i, self.anchor(th), s, B)

        def fast(phi, th):
            return penalty.pseudo_gradient(phi, self.anchor(th), B)

        use_fast = penalty.has_pseudo_gradient and self.fast_penalty
        return AggregativeGame(local=task_loss, contribution=contribution, coupling=coupling, data=(x, y),
                               coupling_gradient=fast if use_fast else None, symmetric=penalty.symmetric)

    def _start(self, theta, B):
        return tree_map(lambda a: a.unsqueeze(0).expand(B, *a.shape), self.anchor(theta))

    def adapt(self, model, theta, x, y, *, nash: bool = True, mode: Optional[str] = None):
        """Task-specific parameters of a batch of tasks (leading dimension B).

        ``nash=False`` drops the Nash-GBML penalty (used at evaluation, where tasks are adapted
        one by one as in the plain algorithm); ``mode`` overrides ``meta_gradient``.
        """
        mode = self.meta_gradient if mode is None else mode
        penalty = self.inner_penalty(nash)
        game = self._game(model, x, y, penalty)
        B = x.shape[0]
        if mode == "implicit":
            return self._implicit(game, theta, B, penalty, build=lambda p: self._game(model, x, y, p))
        # Every player starts at the anchor, where a penalty that vanishes there contributes nothing
        # (in value or derivative along the start): the first step uses the task losses alone.
        first = self._game(model, x, y, None) if penalty is not None and penalty.vanishes_at_anchor else game
        if mode == "first_order":
            detached = tree_map(torch.Tensor.detach, theta)
            with torch.no_grad():
                phi = self._algorithm_2(game, detached, B, first)
            # straight-through: the value of phi, the gradient of the starting point (d phi / d phi_0 = I)
            start = self._start(theta, B)
            return tree_map(lambda p, s: p.detach() + (s - s.detach()), phi, start)
        return self._algorithm_2(game, theta, B, first)

    def _implicit(self, game, theta, B, penalty, build=None):
        """The inner game solved to equilibrium and differentiated implicitly (the core layer).

        ``build(p)`` builds the same tasks' game with penalty ``p`` instead (a subclass may warm-start
        from the game without the Nash-GBML penalty, or differentiate the task losses alone).
        """
        solver = PRGD(max_steps=1000) if self.solver is None else self.solver
        return vi_solution(game.pseudo_gradient, self._start(theta, B), theta, solver=solver,
                           adjoint=self.implicit_adjoint(),
                           symmetric=game.symmetric, throw=self.throw).value

    def _algorithm_2(self, game, theta, B, first):
        """``inner_steps`` simultaneous gradient steps from phi_i = phi_0 (the paper's Algorithm 2).

        Written as a plain loop rather than through ``solve_vi``: a fixed number of steps has no
        tolerance to check, and the loop's graph is what the unrolled meta-gradient differentiates.
        ``first`` is the game of the first step (``game`` itself, or ``game`` without a penalty that
        vanishes at the start).
        """
        phi = self._start(theta, B)
        step = self.step_size(theta)
        for k in range(self.inner_steps):
            F = (first if k == 0 else game).pseudo_gradient(phi, theta)
            if isinstance(step, (int, float)):
                phi = tree_map(lambda p, f: p - step * f, phi, F)
            else:
                phi = tree_map(lambda p, f, a: p - a * f, phi, F, step)
        return phi

    # ----------------------------------------------------------------- the outer level
    def task_losses(self, model, theta, batch, *, nash: bool = True, mode: Optional[str] = None,
                    metric: Optional[str] = None):
        """Each task's query loss after adaptation on its support set, shape (B,).

        ``metric="accuracy"`` returns each task's query accuracy instead (evaluation).
        """
        phi = self.adapt(model, theta, batch["x_support"], batch["y_support"], nash=nash, mode=mode)
        kind = self.loss

        def query_loss(phi_i, x_i, y_i):
            pred = self.predict(model, theta, phi_i, x_i)
            if metric == "accuracy":
                return (pred.argmax(-1) == y_i).to(pred.dtype).mean()
            return _task_loss(kind, pred, y_i)

        return vmap(query_loss)(phi, batch["x_query"], batch["y_query"])

    def init_state(self, num_tasks: int, like: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Outer-level state other than theta (TR-MAML's task probabilities); empty by default."""
        return {}

    def outer_loss(self, losses: torch.Tensor, batch, state) -> torch.Tensor:
        """:math:`F(\\theta, \\phi) \\approx \\frac{1}{B}\\sum_i \\mathcal{L}(\\phi_i; \\mathcal{D}_i^{test})`."""
        return losses.mean()

    def update_state(self, state, losses: torch.Tensor, batch) -> Dict[str, torch.Tensor]:
        """The outer-level state after one meta-iteration (TR-MAML's projected ascent)."""
        return state
