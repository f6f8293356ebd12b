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
from torch.autograd.function import once_differentiable
from torch.func import functional_call, vmap

from .. import _collective
from .._compat import functorch_active, tree_flatten, tree_leaves, tree_map, tree_unflatten
from ..equilibrium import vi_solution
from ..games import AggregativeGame
from ..implicit import Implicit, WarmStart
from ..linear_solve import GMRES, LinearSolver
from ..penalties import Penalty
from ..solvers import PRGD, Solver

__all__ = ["Algorithm", "META_GRADIENTS", "LOSSES", "TASK_VECTORISATIONS"]

META_GRADIENTS = ("unrolled", "first_order", "implicit")
LOSSES = ("mse", "cross_entropy")
TASK_VECTORISATIONS = ("auto", "vmap", "loop")


def _has_convolution(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())


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
        task_vectorisation: how the unrolled and first-order modes treat the tasks of a batch:
            ``"vmap"`` (``torch.func.vmap`` over tasks), ``"loop"`` (a Python loop over tasks with
            plain autograd, the penalty's pseudo-gradient still batched) or ``"auto"`` (the
            default: ``"loop"`` for a network with convolutions on the CPU, ``"vmap"`` otherwise).
            Both compute the same values and meta-gradients. Why: vmapping per-task convolution
            weights turns every convolution into a grouped convolution, which is 3-4x slower on the
            CPU than one convolution per task (conv-4 at 84x84, ``benchmarks/meta_images_vs_peers.py``);
            on a GPU and for fully connected networks the vmapped path is the fast one. Inside a
            ``torch.func`` transform (the trainer's vectorised seeds) and in implicit mode the tasks
            are always vmapped.
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
    task_vectorisation: str = "auto"

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
        if self.task_vectorisation not in TASK_VECTORISATIONS:
            raise ValueError(f"task_vectorisation must be one of {TASK_VECTORISATIONS}, "
                             f"got {self.task_vectorisation!r}")
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
        if self._loops(model, x, mode):
            game = _LoopedGame(self, model, x, y, penalty, B)
            first = _LoopedGame(self, model, x, y, None, B) if penalty is not None and penalty.vanishes_at_anchor else game
        if mode == "first_order":
            detached = tree_map(torch.Tensor.detach, theta)
            with torch.no_grad():
                phi = self._algorithm_2(game, detached, B, first)
            # straight-through: the value of phi, the gradient of the starting point (d phi / d phi_0 = I)
            start = self._start(theta, B)
            return tree_map(lambda p, s: p.detach() + (s - s.detach()), phi, start)
        return self._algorithm_2(game, theta, B, first)

    def _loops(self, model, x: torch.Tensor, mode: str) -> bool:
        """Whether the tasks are looped over (``task_vectorisation``; implicit mode always vmaps)."""
        if mode == "implicit" or self.task_vectorisation == "vmap" or functorch_active():
            return False
        if self.task_vectorisation == "loop":
            return True
        return x.device.type == "cpu" and _has_convolution(model)

    def _penalty_game(self, penalty: Optional[Penalty], B: int) -> Optional[AggregativeGame]:
        """The penalty's part of the inner game alone (no task loss): its pseudo-gradient is batched
        over tasks and cheap (parameter-sized operations), also when the task losses are looped."""
        if penalty is None:
            return None
        if not penalty.coupled:
            return AggregativeGame(local=lambda phi_i, th: penalty.value(phi_i, self.anchor(th), None, B))
        use_fast = penalty.has_pseudo_gradient and self.fast_penalty
        return AggregativeGame(
            contribution=lambda phi_i, th: penalty.contribution(phi_i, self.anchor(th)),
            coupling=lambda phi_i, th, s: penalty.value(phi_i, self.anchor(th), s, B),
            coupling_gradient=(lambda phi, th: penalty.pseudo_gradient(phi, self.anchor(th), B)) if use_fast else None)

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
            if isinstance(step, dict):  # Meta-SGD: a learned step per parameter
                phi = tree_map(lambda p, f, a: p - a * f, phi, F, step)
            else:  # a number, or a 0-dim tensor (one per run of a grid: implicit_nash.meta.grid)
                phi = tree_map(lambda p, f: p - step * f, phi, F)
        return phi

    # ----------------------------------------------------------------- the outer level
    def task_losses(self, model, theta, batch, *, nash: bool = True, mode: Optional[str] = None,
                    metric: Optional[str] = None):
        """Each task's query loss after adaptation on its support set, shape (B,).

        ``metric="accuracy"`` returns each task's query accuracy instead (evaluation).

        When the tasks are looped over (``task_vectorisation``), uncoupled (no penalty) and the
        meta-gradient is being recorded, each task's meta-gradient is computed as soon as its loss
        is, and its graph freed: the returned losses carry these gradients to ``theta``'s leaves
        (exact for any outer loss built from them, e.g. a mean or TR-MAML's weighting), so that one
        task's graph is alive at a time instead of the whole batch's. They support one backward
        pass (``.backward()`` or ``torch.autograd.grad``), not a second-order one.
        """
        mode_ = self.meta_gradient if mode is None else mode
        leaves = [t for t in tree_leaves(theta) if isinstance(t, torch.Tensor) and t.requires_grad]
        if (metric is None and leaves and torch.is_grad_enabled() and self.inner_penalty(nash) is None
                and self._loops(model, batch["x_query"], mode_)
                and not any(isinstance(v, torch.Tensor) and v.requires_grad for v in batch.values())):
            out = []
            for i in range(batch["x_query"].shape[0]):
                one = {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                loss = self._task_losses(model, theta, one, nash, mode, metric)[0]
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                out.append(_Precomputed.apply(loss.detach(), grads, *leaves))
            return torch.stack(out)
        return self._task_losses(model, theta, batch, nash, mode, metric)

    def _task_losses(self, model, theta, batch, nash, mode, metric):
        phi = self.adapt(model, theta, batch["x_support"], batch["y_support"], nash=nash, mode=mode)
        kind = self.loss

        def query_loss(phi_i, x_i, y_i):
            pred = self.predict(model, theta, phi_i, x_i)
            if metric == "accuracy":
                return (pred.argmax(-1) == y_i).to(pred.dtype).mean()
            return _task_loss(kind, pred, y_i)

        return self.map_tasks(model, query_loss, phi, batch["x_query"], batch["y_query"], mode=mode)

    def map_tasks(self, model, fn, phi, *data, mode: Optional[str] = None):
        """``fn(phi_i, *data_i)`` for every task, stacked: vmapped, or looped over the tasks when
        ``task_vectorisation`` says so for this network (``mode`` as in :meth:`adapt`)."""
        if self._loops(model, data[0], self.meta_gradient if mode is None else mode):
            return torch.stack([fn(tree_map(lambda t: t[i], phi), *(d[i] for d in data)) for i in range(data[0].shape[0])])
        return vmap(fn)(phi, *data)

    def init_state(self, num_tasks: int, like: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Outer-level state other than theta (TR-MAML's task probabilities); empty by default."""
        return {}

    def outer_loss(self, losses: torch.Tensor, batch, state) -> torch.Tensor:
        """:math:`F(\\theta, \\phi) \\approx \\frac{1}{B}\\sum_i \\mathcal{L}(\\phi_i; \\mathcal{D}_i^{test})`."""
        return losses.mean()

    def update_state(self, state, losses: torch.Tensor, batch) -> Dict[str, torch.Tensor]:
        """The outer-level state after one meta-iteration (TR-MAML's projected ascent)."""
        return state


class _LoopedGame:
    """The inner game's pseudo-gradient with the task losses' gradients taken one task at a time by
    plain autograd (``task_vectorisation="loop"``) and the penalty's part batched as in the game.

    Each task's gradient is built with ``create_graph`` when the caller records gradients and the
    meta-parameters require them (unrolled mode), so that the meta-gradient differentiates through
    it exactly as through the vmapped pseudo-gradient.
    """

    def __init__(self, algo: Algorithm, model, x, y, penalty: Optional[Penalty], B: int):
        self.algo, self.model, self.x, self.y = algo, model, x, y
        self.rest = algo._penalty_game(penalty, _collective.total(B))

    def pseudo_gradient(self, phi, theta):
        algo, kind = self.algo, self.algo.loss
        create = torch.is_grad_enabled() and any(t.requires_grad for t in tree_leaves(theta))
        grads = []
        for i in range(self.x.shape[0]):
            with torch.enable_grad():
                phi_i = tree_map(lambda t: t[i] if create and t.requires_grad else t[i].detach().requires_grad_(True), phi)
                leaves, spec = tree_flatten(phi_i)
                loss = _task_loss(kind, algo.predict(self.model, theta, phi_i, self.x[i]), self.y[i])
                g = torch.autograd.grad(loss, leaves, create_graph=create)
            grads.append(tree_unflatten(list(g), spec))
        F = tree_map(lambda *gs: torch.stack(gs), *grads)
        if self.rest is not None:
            F = tree_map(torch.add, F, self.rest.pseudo_gradient(phi, theta))
        return F


class _Precomputed(torch.autograd.Function):
    """A loss value whose gradients with respect to ``leaves`` were computed already (``grads``):
    the backward scales them by the incoming gradient. First order only."""

    @staticmethod
    def forward(ctx, value, grads, *leaves):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return (None, None) + tuple(None if gi is None else g * gi for gi in ctx.grads)
