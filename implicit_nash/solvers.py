r"""Forward solvers for the variational inequality :math:`\text{VI}(\Omega, F)`.

A solution satisfies :math:`z^* = \Pi_\Omega(z^* - F(z^*;\theta))`; for a game, ``F`` stacks the
players' partial gradients (the pseudo-gradient) and :math:`z^*` is a Nash equilibrium
(Lemma B.2 of the paper when ``F`` is strongly monotone).

All solvers are frozen dataclasses holding hyperparameters only, and all run in one loop,
:func:`iterate`, through ``init / step``:

* each ``step`` evaluates ``F`` and reports the step-scaled natural residual
  :math:`\rho(y) = \|y - \Pi_\Omega(y - F(y)/\hat L)\|` at the point ``y`` where it evaluated ``F``,
  in the units of ``z`` (:math:`\hat L`: a finite-difference estimate of the Lipschitz constant of
  ``F`` at the initial point);
* the loop stops when that residual, re-measured at the returned iterate, is at most
  :math:`\tau(z) = \text{atol} + \text{rtol}\,\|z\| + \varepsilon^2 s_0` *and* the estimated error
  :math:`\|A^{-1}G(z)\|` (:func:`error_estimate`, a Newton correction) is at most :math:`\tau` too;
  if the estimate is above, the residual's threshold is lowered and the loop goes on, and a problem
  whose error rounding keeps above :math:`\tau` ends ``"inaccurate"``.  Neither the scale of ``F`` nor
  the starting point loosens the rule (:math:`s_0 = \max(\|z_0\|, \|F(z_0)\|/\hat L)` only sets the
  level below which a solution counts as zero).  ``rtol`` below ``4 eps`` is raised to it.  Or the
  loop stops after exactly ``num_steps`` steps when that is set (the paper's Algorithm 2 runs a fixed
  number of steps); or when the residual exceeds ``1e6`` times its initial value or is not finite
  (``"diverged"``).  See ``docs/differentiation.rst`` for the error bound behind the rule.

A batch of independent problems (the ``vmap`` rule of the layer) runs as one flat vector of
``groups`` equal blocks: the solver steps them together, and every norm above is taken per block,
so that each problem stops on its own tolerance and gets its own status.

Shared fields: ``rtol`` (``None``: ``10 * eps**0.75`` of the dtype), ``atol``, ``max_steps``,
``num_steps``.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import _collective
from .linear_solve import LinearSolveInfo, _check_nonneg, _check_positive, _plain_fields, default_rtol

__all__ = ["Solver", "PRGD", "SimultaneousGradient", "GaussSeidel", "Extragradient", "Solution",
           "iterate", "initial_state", "error_estimate", "DIVERGENCE_FACTOR"]

#: The loop declares divergence when the residual exceeds this multiple of the initial residual.
DIVERGENCE_FACTOR = 1e6

#: The rounding floor of the forward tolerance: ``rtol`` below ``FLOOR * eps`` is raised to it.
FLOOR = 4.0

#: The error estimate's linear solve: its relative tolerance and its budget of products.
ESTIMATE_RTOL = 1e-3
ESTIMATE_MAX_STEPS = 200
#: The error estimate's GMRES builds a Krylov space of at least this dimension (or the problem's size):
#: the error of an ill-conditioned problem lies along directions in which G(z) is small.
ESTIMATE_MIN_KRYLOV = 10
#: The error estimate is the Newton correction's norm times this margin (which covers the correction's
#: own inaccuracy: its linear solve's tolerance, and the second-order term of a nonlinear F).
ESTIMATE_MARGIN = 1.25

#: The error estimate's rounding term is eps * (1 + ROUNDING * condition) * ||z||.
ROUNDING = 1.0

#: How many times a solve may lower its residual threshold after an error estimate above tolerance.
MAX_ESTIMATES = 8

#: Statuses from best to worst (the status of a batch is its worst member's).
_ORDER = ["converged", "completed", "max_steps", "inaccurate", "diverged"]


@dataclass(repr=False)
class Solution:
    """The result of a solve, and of the backward passes through it.

    Attributes:
        value: the solution (a pytree like the initial point; differentiable w.r.t. ``theta``).
        status: ``"converged"``, ``"completed"`` (a fixed ``num_steps`` run), ``"max_steps"`` or
            ``"diverged"``.  Under ``torch.func.vmap``: the worst status of the batch (see
            ``statuses``).
        steps: iterations taken.
        residual: natural residual :math:`\\|z - \\Pi(z - F(z))\\|` measured at the returned point
            (under ``vmap``: the largest of the batch).
        history: residual reported by each step (under ``vmap``: the norm over the batch).
        stats: solver-specific numbers (``evaluations`` of ``F``, ``tolerance``, ``lipschitz`` (the
            estimate the stopping rule uses), final ``step_size``...).
        backward: the :class:`~implicit_nash.LinearSolveInfo` of every implicit linear solve made
            through this solution so far, in order (one per backward pass, and one per higher-order
            or forward-mode product); empty until a backward pass runs.
        statuses, residuals: per problem, when the solve ran batched under ``torch.func.vmap``.
        error: an estimate of :math:`\\|z - z^*\\|` at the returned point (under ``vmap``: the
            largest of the batch; ``errors`` per problem): the norm of the Newton correction
            :math:`\\|A^{-1} G(z)\\|` with :math:`A = \\partial_z G` of the natural map (see
            :func:`error_estimate`).  ``nan`` where none was computed (a diverged solve).
    """

    value: Any
    status: str
    steps: int
    residual: float
    history: List[float] = field(default_factory=list)
    stats: Dict[str, Any] = field(default_factory=dict)
    backward: List[LinearSolveInfo] = field(default_factory=list)
    statuses: List[str] = field(default_factory=list)
    residuals: List[float] = field(default_factory=list)
    error: float = math.nan
    errors: List[float] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return self.status in ("converged", "completed")

    def hypergradient_error(self, C: float) -> float:
        r"""An estimate of the error of the latest hypergradient computed through this solution, in the
        form of Theorem D.3 (eq. 69): :math:`C\delta + \epsilon`.

        :math:`\delta` is :attr:`error`, the estimated distance of the returned point to the equilibrium,
        and :math:`\epsilon` the latest backward solve's ``hypergradient_error`` (its estimated error
        carried through :math:`-Q^	op`).  ``C`` is the Lipschitz constant of the hypergradient in the
        inner variable (eq. 64 gives it from the game's constants; ``analysis.hypergradient_error``
        computes it for affine games): the layer cannot estimate it from one solve.  ``nan`` before a
        backward pass.

        Args:
            C: the constant of eq. 64, a non-negative number.
        """
        if isinstance(C, bool) or not isinstance(C, (int, float)) or not C >= 0 or not math.isfinite(C):
            raise ValueError(f"C must be a non-negative finite number, got {C!r}")
        eps = next((info.hypergradient_error for info in reversed(self.backward)
                    if not math.isnan(getattr(info, "hypergradient_error", math.nan))), math.nan)
        return C * self.error + eps

    def __repr__(self) -> str:
        # a summary (the history and the value can be long); fields added later are read with defaults
        parts = [f"status={getattr(self, 'status', None)!r}", f"steps={getattr(self, 'steps', None)}",
                 f"residual={_short_number(getattr(self, 'residual', None))}",
                 f"value={_describe_value(getattr(self, 'value', None))}",
                 f"history={len(getattr(self, 'history', None) or ())}",
                 f"backward={len(getattr(self, 'backward', None) or ())}"]
        statuses = getattr(self, "statuses", None)
        if statuses:
            parts.append(f"batch={len(statuses)}")
        if getattr(self, "error", None) is not None:
            parts.append(f"error={_clip(repr(self.error), 60)}")
        return f"Solution({', '.join(parts)})"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _short_number(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else _clip(repr(x), 30)


def _describe_value(value) -> str:
    """A value's shape and dtype (a tensor), or its type and number of leaves (a pytree)."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    if value is None:
        return "None"
    from ._compat import tree_flatten
    try:
        leaves = tree_flatten(value)[0]
    except Exception:  # noqa: BLE001 - a repr never fails
        leaves = []
    return f"{type(value).__name__} of {len(leaves)} leaf" + ("" if len(leaves) == 1 else "s")


class FlatProblem:
    """What a solver sees: ``F`` and the projection on flat player-major vectors.

    ``groups`` independent problems of equal size may be stacked into one vector (batched solves);
    norms are then taken per group.  ``step`` (set by :func:`iterate`; ``None``: 1) is the step
    :math:`\\eta = 1/\\hat L` of the natural residual that the solvers report, per group, so that
    the residual :math:`\\|z - \\Pi(z - \\eta F(z))\\|` is in the units of ``z``.
    """

    def __init__(self, operator: Callable[[torch.Tensor], torch.Tensor],
                 project: Callable[[torch.Tensor], torch.Tensor], players: int, block: int,
                 unconstrained: bool, groups: int = 1):
        self.operator = operator
        self.project = project
        self.players = players
        self.block = block
        self.unconstrained = unconstrained
        self.groups = groups
        self.evaluations = 0
        self.lipschitz: Optional[List[float]] = None  # per group, set by iterate()
        self.step: Optional[Union[float, torch.Tensor]] = None  # the residual's step 1/L, set by iterate()
        self.check_closure = False  # iterate() evaluates F(z0) with grad on and refuses a closure
        self.name = ""  # the initial point's name, for messages
        self.frozen: Optional[torch.Tensor] = None  # groups that diverged (batched solves)
        self.condition = 1.0  # the largest condition number the error estimates have seen

    def F(self, z: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        out = self.operator(z)
        if self.frozen is not None:  # a diverged member of a batch stops moving; the others go on
            out = torch.where(self.frozen.to(out.device).repeat_interleave(out.numel() // self.groups),
                              torch.zeros((), dtype=out.dtype, device=out.device), out)
        return out

    def set_step(self, lipschitz: Sequence[float], like: torch.Tensor) -> None:
        """The residual's step :math:`1/\\hat L` per group (1 where the estimate is zero)."""
        steps = [1.0 / l if l > 0 and math.isfinite(1.0 / l) else 1.0 for l in lipschitz]
        if self.groups == 1:
            self.step = steps[0]
        else:
            self.step = torch.tensor(steps, dtype=like.dtype, device=like.device).repeat_interleave(
                like.numel() // self.groups)

    def residual_vector(self, z: torch.Tensor, Fz: torch.Tensor) -> torch.Tensor:
        if self.step is not None:
            Fz = Fz * self.step
        return Fz if self.unconstrained else z - self.project(z - Fz)

    def natural_map(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`G(z) = z - \\Pi(z - \\eta F(z))` (``F`` itself, scaled, without constraints): a
        function of ``z`` whose derivatives are taken (no evaluation count, no frozen groups)."""
        Fz = self.operator(z)
        if self.step is not None:
            Fz = Fz * self.step
        return Fz if self.unconstrained else z - self.project(z - Fz)

    def norms(self, v: torch.Tensor) -> List[float]:
        """Per-group norms (over every rank's players when sharded), as Python floats."""
        with torch.no_grad():
            if self.groups == 1:
                return [_collective.norm(v)]
            return torch.linalg.vector_norm(v.detach().reshape(self.groups, -1).to(torch.float64), dim=1).tolist()

    def residual_norm(self, z: torch.Tensor, Fz: torch.Tensor) -> List[float]:
        """The natural residual of each group."""
        with torch.no_grad():
            return self.norms(self.residual_vector(z.detach(), Fz.detach()))


def _lipschitz_estimate(problem: FlatProblem, z0: torch.Tensor, F0: torch.Tensor) -> List[float]:
    """A finite-difference estimate of the Lipschitz constant of F at z0, per group (a lower bound)."""
    g = problem.groups
    with torch.no_grad():
        D = F0.detach().reshape(g, -1)
        Z = z0.detach().reshape(g, -1)
        if g == 1:
            dmax = torch.tensor([_collective.allmax(float(D.abs().max()) if D.numel() else 0.0)],
                                dtype=D.dtype, device=D.device)
            zmax = torch.tensor([_collective.allmax(float(Z.abs().max()) if Z.numel() else 0.0)],
                                dtype=D.dtype, device=D.device)
        else:
            dmax, zmax = D.abs().amax(1), Z.abs().amax(1)
        direction = torch.where((dmax > 0).unsqueeze(1), D / dmax.clamp_min(torch.finfo(D.dtype).tiny).unsqueeze(1),
                                torch.ones_like(D))
        step = 1e-4 * torch.clamp(zmax, min=1.0)
        dz = (-step.unsqueeze(1) * direction).reshape(-1)
        dF = problem.F(z0 + dz) - F0
        out = []
        for a, b in zip(problem.norms(dF), problem.norms(dz)):
            L = a / b if b > 0 else 0.0
            out.append(L if math.isfinite(L) else 0.0)
    return out


def _validate_step_size(value, *, allow_none: bool) -> None:
    _check_positive("step_size", value, allow_none=allow_none)


def _require_step_size(solver: "Solver", rule: str) -> None:
    if solver.step_size is None:
        raise ValueError(
            f"{type(solver).__name__} needs step_size: it converges for {rule}, with mu the strong "
            f"monotonicity and L the Lipschitz constant of F (for the paper's Algorithm 2, the inner "
            f"learning rate alpha). If they are unknown, use PRGD(), which chooses its own step")
    _validate_step_size(solver.step_size, allow_none=False)


@dataclass(frozen=True, kw_only=True)
class Solver:
    """Base class of the forward solvers (see the module docstring for the shared loop)."""

    rtol: Optional[float] = None
    atol: float = 0.0
    max_steps: int = 10_000
    num_steps: Optional[int] = None

    def __post_init__(self):
        _plain_fields(self)  # numpy scalars are accepted and kept as Python numbers
        _check_nonneg("rtol", self.rtol, allow_none=True)
        _check_nonneg("atol", self.atol)
        _check_positive("max_steps", self.max_steps, integer=True)
        _check_positive("num_steps", self.num_steps, integer=True, allow_none=True)

    def init(self, problem: FlatProblem, z0: torch.Tensor, F0: torch.Tensor) -> Dict[str, Any]:
        return {"z": z0}

    def step(self, problem: FlatProblem, state: Dict[str, Any]) -> Dict[str, Any]:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class SimultaneousGradient(Solver):
    """Simultaneous projected gradient play: :math:`z_{k+1} = \\Pi(z_k - \\lambda F(z_k))`.

    The paper's Algorithm 2 (every player takes a gradient step on its own cost at once) when run
    for ``num_steps`` steps from :math:`\\phi_i = \\theta`.  Converges linearly for μ-strongly
    monotone, L-Lipschitz ``F`` when :math:`\\lambda < 2\\mu/L^2`; may diverge for games with strong
    rotational (bilinear) coupling, where :class:`PRGD` does not.

    Args:
        step_size: the inner learning rate λ (the paper's α); required (there is no safe default
            without μ and L: use :class:`PRGD` when they are unknown).
    """

    step_size: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        _require_step_size(self, "step_size < 2 mu / L^2")

    def step(self, problem, state):
        z = state["z"]
        Fz = problem.F(z)
        residual = problem.residual_norm(z, Fz)
        return {"z": problem.project(z - self.step_size * Fz), "residual": residual,
                "step_size": self.step_size}


@dataclass(frozen=True, kw_only=True)
class Extragradient(Solver):
    """Korpelevich's extragradient: :math:`y = \\Pi(z_k - \\lambda F(z_k))`,
    :math:`z_{k+1} = \\Pi(z_k - \\lambda F(y))`.

    Converges for monotone L-Lipschitz ``F`` with :math:`\\lambda < 1/L` (two evaluations and two
    projections per step).

    Args:
        step_size: the step λ; required (use :class:`PRGD` when ``L`` is unknown).
    """

    step_size: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        _require_step_size(self, "step_size < 1 / L")

    def step(self, problem, state):
        z = state["z"]
        Fz = problem.F(z)
        residual = problem.residual_norm(z, Fz)
        y = problem.project(z - self.step_size * Fz)
        return {"z": problem.project(z - self.step_size * problem.F(y)), "residual": residual,
                "step_size": self.step_size}


@dataclass(frozen=True, kw_only=True)
class PRGD(Solver):
    """Projected reflected gradient descent (Malitsky 2015), the default solver.

    Constant step (``step_size`` given), Malitsky's Algorithm 3.1 and eq. (39) of the paper:

    .. math:: z_{k+1} = \\Pi_\\Omega\\bigl(z_k - \\lambda F(2 z_k - z_{k-1})\\bigr),
              \\qquad 0 < \\lambda < (\\sqrt 2 - 1)/L,

    one evaluation of ``F`` and one projection per step; converges for monotone L-Lipschitz ``F``
    and linearly, with :math:`\\|z_k - z^*\\|^2 \\le \\gamma^k D^2`, for μ-strongly monotone ``F``
    (Theorem C.3).

    Adaptive step (``step_size=None``), after the linesearch variant of Malitsky (2015, Sec. 3.2):
    the reflected point uses the step ratio, :math:`y_k = z_k + (\\lambda_k/\\lambda_{k-1})(z_k - z_{k-1})`,
    and :math:`\\lambda_k` starts at ``growth`` times the previous step and is halved until
    :math:`\\lambda_k \\|F(y_k) - F(y_{k-1})\\| \\le \\text{ratio}\\,\\|y_k - y_{k-1}\\|` with
    ``ratio`` below :math:`\\sqrt 2 - 1`: a local Lipschitz estimate replaces the unknown ``L``.
    The first step uses ``ratio / L0`` with ``L0`` a finite-difference estimate at the initial point.

    Args:
        step_size: constant step λ, or ``None`` for the adaptive rule.
        ratio: the linesearch constant (``0 < ratio < sqrt(2) - 1``; default 0.4); adaptive rule only.
        growth: factor (``>= 1``; default 1.2) by which a step may grow from one iteration to the
            next; adaptive rule only.
    """

    step_size: Optional[float] = None
    ratio: Optional[float] = None
    growth: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        _validate_step_size(self.step_size, allow_none=True)
        if self.step_size is not None and (self.ratio is not None or self.growth is not None):
            raise ValueError("ratio and growth belong to the adaptive step (step_size=None); with a constant "
                             "step_size they would be ignored: drop them")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0 < self.ratio < math.sqrt(2) - 1):
            raise ValueError(f"ratio must lie in (0, sqrt(2) - 1) = (0, 0.4142), got {self.ratio!r}")
        if self.growth is not None and not (isinstance(self.growth, (int, float)) and math.isfinite(self.growth)
                                            and self.growth >= 1):
            raise ValueError(f"growth must be a finite number >= 1, got {self.growth!r}")

    @property
    def _ratio(self) -> float:
        return 0.4 if self.ratio is None else self.ratio

    @property
    def _growth(self) -> float:
        return 1.2 if self.growth is None else self.growth

    def init(self, problem, z0, F0):
        if self.step_size is not None:
            lam = self.step_size
        else:
            L0 = max(problem.lipschitz)
            lam = self._ratio / L0 if L0 > 0 else 1.0
        return {"z": z0, "z_prev": z0, "y_prev": None, "Fy_prev": None, "step_size": lam}

    def step(self, problem, state):
        z, z_prev, lam_prev = state["z"], state["z_prev"], state["step_size"]
        if self.step_size is not None or state["y_prev"] is None:
            lam = lam_prev
            y = 2 * z - z_prev
            Fy = problem.F(y)
        else:
            lam = lam_prev * self._growth
            y_prev, Fy_prev = state["y_prev"], state["Fy_prev"]
            for _ in range(60):
                y = z + (lam / lam_prev) * (z - z_prev)
                Fy = problem.F(y)
                with torch.no_grad():
                    dF = _collective.norm(Fy - Fy_prev)
                    dy = _collective.norm(y - y_prev)
                if lam * dF <= self._ratio * dy or not math.isfinite(dF):
                    break
                lam *= 0.5
        residual = problem.residual_norm(y, Fy)
        z_new = problem.project(z - lam * Fy)
        return {"z": z_new, "z_prev": z, "y_prev": y.detach(), "Fy_prev": Fy.detach(),
                "step_size": lam, "residual": residual}


@dataclass(frozen=True, kw_only=True)
class GaussSeidel(Solver):
    """Sequential (Gauss--Seidel) projected gradient play: within a sweep the players update one
    after another, each seeing the others' latest strategies,
    :math:`\\phi_i \\leftarrow \\Pi_{\\Omega_i}(\\phi_i - \\lambda F_i(\\phi))`.

    Theorem 3.3 of the paper states that the order of the updates does not change the equilibrium;
    ``order`` makes that checkable.  One step is one sweep over all players and costs ``B``
    evaluations of the full ``F``: a verification tool, not a fast path (it does not shard over
    ranks nor batch under ``vmap``).  For a plain variational inequality (one block) it equals
    :class:`SimultaneousGradient`.

    Args:
        step_size: the step λ; required (``step_size < 2 mu / L^2`` is safe).
        order: ``"cyclic"``, ``"reverse"``, ``"random"`` (a fresh permutation every sweep, from
            ``seed``) or an explicit sequence of player indices.
        seed: seed of the ``"random"`` order.
    """

    step_size: Optional[float] = None
    order: Union[str, Sequence[int]] = "cyclic"
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        _require_step_size(self, "step_size < 2 mu / L^2")
        if isinstance(self.order, str):
            if self.order not in ("cyclic", "reverse", "random"):
                raise ValueError(f"order must be 'cyclic', 'reverse', 'random' or a sequence of player "
                                 f"indices, got {self.order!r}")
        else:
            object.__setattr__(self, "order", tuple(int(i) for i in self.order))

    def init(self, problem, z0, F0):
        if _collective.active():
            raise ValueError("GaussSeidel updates players one after another, which does not shard over ranks; "
                             "use PRGD, Extragradient or SimultaneousGradient")
        if problem.groups > 1:
            raise ValueError("GaussSeidel does not batch under torch.func.vmap; use PRGD, Extragradient or "
                             "SimultaneousGradient")
        return {"z": z0, "rng": random.Random(self.seed)}

    def _order(self, players: int, rng: random.Random) -> Sequence[int]:
        if self.order == "cyclic":
            return range(players)
        if self.order == "reverse":
            return range(players - 1, -1, -1)
        if self.order == "random":
            perm = list(range(players))
            rng.shuffle(perm)
            return perm
        if sorted(self.order) != list(range(players)):
            raise ValueError(f"order {self.order} is not a permutation of the {players} players")
        return self.order

    def step(self, problem, state):
        z = state["z"]
        B, n = problem.players, problem.block
        residual = None
        for i in self._order(B, state["rng"]):
            Fz = problem.F(z)
            if residual is None:
                residual = problem.residual_norm(z, Fz)
            mask = torch.zeros((B, 1), dtype=torch.bool, device=z.device)
            mask[i] = True
            mask = mask.expand(B, n).reshape(-1)
            z = torch.where(mask, problem.project(z - self.step_size * Fz), z)
        return {"z": z, "rng": state["rng"], "residual": residual, "step_size": self.step_size}


def initial_state(solver: Solver, problem: FlatProblem, z0: torch.Tensor) -> Dict[str, Any]:
    """The solver's state at ``z0`` (evaluates ``F(z0)`` and the Lipschitz estimate first), for
    code that steps a solver by hand (``analysis`` records trajectories this way)."""
    F0 = problem.F(z0)
    problem.lipschitz = _lipschitz_estimate(problem, z0, F0)
    return solver.init(problem, z0, F0)


def error_estimate(problem: FlatProblem, z: torch.Tensor, rtol: float = ESTIMATE_RTOL,
                   max_steps: int = ESTIMATE_MAX_STEPS,
                   condition: float = 1.0) -> Tuple[List[float], str]:
    r"""An estimate of :math:`\|z - z^*\|` per group: the norm of the Newton correction
    :math:`d = A^{-1} G(z)`, :math:`G(z) = z - \Pi(z - \eta F(z))` the natural map with the
    problem's step and :math:`A = \partial_z G(z)`, solved by GMRES to ``rtol``.

    For an affine ``F`` whose active set at ``z`` is that of the solution, :math:`z - d = z^*`
    exactly, so that :math:`\|d\| = \|z - z^*\|`; for a smooth ``F`` the two differ by
    :math:`O(\|z - z^*\|^2)`.  The estimate is :math:`\|d\|` times a margin of 1.25, plus the
    correction's own estimated error (its residual over the smallest singular value of GMRES's
    Hessenberg matrix) and the rounding floor :math:`\varepsilon\|z\|`, and
    it reflects the conditioning of the problem: rounding noise in :math:`G(z)` comes back
    amplified by :math:`\|A^{-1}\|`, as it does in the iterate.  ``inf`` where the linear solve
    fails (a Jacobian singular to working precision: no derivative exists there, and no error can
    be bounded); returns the per-group estimates and, for a failure, why.
    """
    from ._compat import functorch_active
    from .implicit import graph_products
    from .linear_solve import GMRES, LinearOperator

    z = z.detach()
    eps = torch.finfo(z.dtype).eps
    if functorch_active():
        _, pull = torch.func.vjp(problem.natural_map, z)
        Gz = problem.natural_map(z)

        def AT(u):
            return pull(u)[0]

        lazy = []

        def A(u):
            if not lazy:
                lazy.append(torch.func.vjp(AT, torch.zeros_like(z))[1])
            return lazy[0](u)[0]
    else:
        with torch.enable_grad():
            zz = z.clone().requires_grad_(True)
            Gz = problem.natural_map(zz)
        if Gz.requires_grad:
            AT, A = graph_products(Gz, zz)
        else:  # G does not depend on z
            return [math.inf] * problem.groups, "the natural map does not depend on z (a singular Jacobian)"
    b = Gz.detach()
    znorm = problem.norms(z)
    if not bool(torch.isfinite(b).all()):
        return [math.inf] * problem.groups, "the natural map is not finite at the returned point"
    # a relative tolerance only, and a Krylov space of at least ESTIMATE_MIN_KRYLOV dimensions: a small
    # residual can hide the weak directions of an ill-conditioned A, where the error lives
    with torch.no_grad():
        d, info = GMRES(rtol=rtol, max_steps=max_steps, min_steps=ESTIMATE_MIN_KRYLOV).solve(
            LinearOperator(A, AT), b, groups=problem.groups, enforce_error=False)
    note = "" if info.status == "converged" else \
        f"the Newton correction's linear solve ended '{info.status}' ({info.message})"
    good = info.group_statuses if problem.groups > 1 and info.group_statuses else [info.status] * problem.groups
    own = info.group_errors if problem.groups > 1 and info.group_errors else [info.error] * problem.groups
    dn = problem.norms(d)
    out = []
    kappa = max(condition, info.condition if math.isfinite(info.condition) else 1.0)
    problem.condition = kappa
    for dg, eg, zg, st in zip(dn, own, znorm, good):
        # the correction's norm with a margin, plus the correction's own estimated error, plus the
        # rounding floor of the iterate: noise of order eps ||z|| in G, amplified by the condition
        # number (the largest that this solve's Krylov spaces have shown; a correction whose GMRES
        # ends in a step or two sees almost none of the spectrum)
        eg = 0.0 if math.isnan(eg) else eg
        out.append(ESTIMATE_MARGIN * dg + eg + eps * (1.0 + ROUNDING * kappa) * zg if st == "converged" else math.inf)
    return out, note


def _tolerances(rtol: float, atol: float, znorm: Sequence[float], floor: Sequence[float]) -> List[float]:
    return [atol + rtol * zn + f for zn, f in zip(znorm, floor)]


def iterate(solver: Solver, problem: FlatProblem, z0: torch.Tensor, *, estimate: bool = True) -> Solution:
    r"""Run ``solver`` on ``problem`` from the flat point ``z0``; returns a flat :class:`Solution`.

    The stopping rule bounds the error in the answer (see the module docstring): the loop stops on
    the step-scaled residual :math:`\rho(z) = \|z - \Pi(z - F(z)/\hat L)\|` (in the units of ``z``)
    meeting :math:`\tau(z) = \text{atol} + \text{rtol}\,\|z\| + \varepsilon^2 s_0`, then checks
    the estimated error :math:`\|A^{-1}G(z)\|` (:func:`error_estimate`) against the same
    :math:`\tau`; when the estimate is above it, the residual's threshold is lowered by the ratio and
    the iteration goes on.  ``estimate=False`` stops on the residual alone (no error estimate).

    With ``problem.groups > 1`` every group stops on its own tolerance (the loop ends when all have);
    ``Solution.statuses``/``residuals``/``errors`` hold the per-group outcome.
    """
    with torch.enable_grad() if problem.check_closure else torch.no_grad():
        F0 = problem.F(z0)
    if problem.check_closure and F0.requires_grad:
        raise ValueError("the operator depends on tensors that require grad but are not in theta (a closure "
                         "over parameters?); the implicit adjoint would silently drop their gradient: pass them "
                         "inside theta, use NashLayer with an nn.Module, or use adjoint=Unrolled()")
    F0 = F0.detach() if problem.check_closure else F0
    with torch.no_grad():
        if not bool(torch.isfinite(F0).all()):
            raise ValueError(f"the operator is NaN or inf at the initial point {problem.name}".rstrip())
    problem.lipschitz = _lipschitz_estimate(problem, z0, F0)
    L = problem.lipschitz
    problem.set_step(L, z0)
    G = problem.groups
    eps = torch.finfo(z0.dtype).eps
    requested = default_rtol(z0.dtype) if solver.rtol is None else float(solver.rtol)
    rtol = max(requested, FLOOR * eps)
    atol = float(solver.atol)
    with torch.no_grad():
        r0 = problem.residual_norm(z0, F0)
        # the problem's scale at the start, in the units of z: below eps^2 of it, a solution is zero
        scale0 = [max(zn, fn / l if l > 0 else fn) for zn, fn, l in zip(problem.norms(z0), problem.norms(F0), L)]
    floor = [eps ** 2 * s for s in scale0]
    state = solver.init(problem, z0, F0)
    history: List[float] = []
    limit_r = [DIVERGENCE_FACTOR * max(r, atol, 1e-300) for r in r0]
    factor = [1.0] * G          # the residual's threshold is factor * tau; lowered when the estimate says so
    stuck = [False] * G         # the threshold cannot be lowered further (rounding): the error stays above tau
    tol = _tolerances(rtol, atol, problem.norms(z0), floor)
    diverged = [False] * G
    done = False
    limit = solver.num_steps if solver.num_steps is not None else solver.max_steps
    steps = 0
    final = None
    errors: Optional[List[float]] = None
    note = ""
    estimates = 0
    for steps in range(1, limit + 1):
        state = solver.step(problem, state)
        r = state["residual"]
        history.append(r[0] if G == 1 else math.sqrt(sum(x * x for x in r)))
        newly = [not d and not (x <= lim) for d, x, lim in zip(diverged, r, limit_r)]  # NaN counts
        if any(newly):
            diverged = [d or n for d, n in zip(diverged, newly)]
            if G == 1 or all(diverged):
                break
            problem.frozen = torch.tensor(diverged)
            r = [0.0 if d else x for d, x in zip(diverged, r)]
        if solver.num_steps is not None:
            continue
        znorm = problem.norms(state["z"])
        tol = _tolerances(rtol, atol, znorm, floor)
        if not all(x <= t * f for x, t, f in zip(r, tol, factor)):
            continue
        z = state["z"]
        with torch.no_grad():
            final = problem.residual_norm(z, problem.F(z))
        if not all(d or x <= t * f for d, x, t, f in zip(diverged, final, tol, factor)):
            final = None
            continue
        if not estimate:
            done = True
            break
        errors, note = error_estimate(problem, z, condition=problem.condition)
        estimates += 1
        ok = [d or e <= t for d, e, t in zip(diverged, errors, tol)]
        if all(ok):
            done = True
            break
        for g in range(G):
            if ok[g] or stuck[g]:
                continue
            lowest = FLOOR * eps * znorm[g]
            if factor[g] * tol[g] <= lowest or not math.isfinite(errors[g]):
                stuck[g] = True  # rounding (or a singular Jacobian) keeps the error above tau
            else:
                factor[g] = max(factor[g] * min(0.5, 0.5 * tol[g] / errors[g]), lowest / tol[g])
        if all(o or s for o, s in zip(ok, stuck)) or estimates >= MAX_ESTIMATES:
            break
        final = None
    z = state["z"]
    if final is None:
        with torch.no_grad():
            final = problem.residual_norm(z, problem.F(z))
        errors = None
    if errors is None and estimate and not any(diverged):
        errors, note = error_estimate(problem, z, condition=problem.condition)
    if errors is None:
        errors = [math.nan] * G
    tol = _tolerances(rtol, atol, problem.norms(z), floor)
    if solver.num_steps is not None:
        statuses = ["diverged" if d else "completed" for d in diverged]
    else:
        statuses = []
        for g in range(G):
            if diverged[g]:
                statuses.append("diverged")
            elif done or (final[g] <= tol[g] * factor[g] and not errors[g] > tol[g]):
                statuses.append("converged")
            elif stuck[g] or (estimates >= MAX_ESTIMATES and final[g] <= tol[g] * factor[g]):
                statuses.append("inaccurate")
            else:
                statuses.append("max_steps")
    final = [math.nan if d else f for d, f in zip(diverged, final)]
    errors = [math.nan if d else e for d, e in zip(diverged, errors)]
    status = max(statuses, key=_ORDER.index)
    stats = {"evaluations": problem.evaluations, "tolerance": min(tol), "step_size": state.get("step_size"),
             "lipschitz": max(L), "rtol": rtol, "estimates": estimates}
    if rtol > requested:
        stats["note"] = (f"rtol={requested:g} is below the rounding floor {FLOOR:g} * eps = {rtol:.3g} of "
                         f"{z0.dtype}: raised to it")
    if note:
        stats["estimate"] = note
    residual = math.nan if any(math.isnan(f) for f in final) else max(final)
    sol = Solution(z, status, steps, residual, history, stats)
    sol.error = math.nan if any(math.isnan(e) for e in errors) else max(errors)
    if G > 1:
        sol.statuses, sol.residuals, sol.errors = statuses, final, errors
        sol.stats["tolerances"] = tol
    return sol
