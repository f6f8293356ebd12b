r"""Forward solvers for the variational inequality :math:`\text{VI}(\Omega, F)`.

A solution satisfies :math:`z^* = \Pi_\Omega(z^* - F(z^*;\theta))`; for a game, ``F`` stacks the
players' partial gradients (the pseudo-gradient) and :math:`z^*` is a Nash equilibrium
(Lemma B.2 of the paper when ``F`` is strongly monotone).

All solvers are frozen dataclasses holding hyperparameters only, and all run in one loop,
:func:`iterate`, through ``init / step``:

* each ``step`` evaluates ``F`` and reports the natural residual
  :math:`\|y - \Pi_\Omega(y - F(y))\|` at the point ``y`` where it evaluated ``F``;
* the loop stops when that residual is at most ``atol + rtol * max(r0, ||z_k||)`` (``r0``: the
  residual at the initial point; with the unit step of the natural map the residual is measured in
  the units of ``z``, and the ``||z_k||`` term keeps a warm start at a solution from asking for an
  unreachable ``rtol * r0``) *and* the residual re-measured at the returned iterate passes too; or after
  exactly ``num_steps`` steps when that is set (the paper's Algorithm 2 runs a fixed number of
  steps); or when the residual exceeds ``1e6 * r0`` or is not finite (``"diverged"``).

Shared fields: ``rtol`` (``None``: ``10 * eps**0.75`` of the dtype), ``atol``, ``max_steps``,
``num_steps``.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from . import _collective
from .linear_solve import _check_nonneg, _check_positive, default_rtol

__all__ = ["Solver", "PRGD", "SimultaneousGradient", "GaussSeidel", "Extragradient", "Solution",
           "iterate", "DIVERGENCE_FACTOR"]

#: The loop declares divergence when the residual exceeds this multiple of the initial residual.
DIVERGENCE_FACTOR = 1e6


@dataclass
class Solution:
    """The result of a solve.

    Attributes:
        value: the solution (a pytree like the initial point; differentiable w.r.t. ``theta``).
        status: ``"converged"``, ``"completed"`` (a fixed ``num_steps`` run), ``"max_steps"`` or
            ``"diverged"``.
        steps: iterations taken.
        residual: natural residual :math:`\\|z - \\Pi(z - F(z))\\|` measured at the returned point.
        history: residual reported by each step.
        stats: solver-specific numbers (``evaluations`` of ``F``, ``tolerance``, final
            ``step_size``...).
    """

    value: Any
    status: str
    steps: int
    residual: float
    history: List[float] = field(default_factory=list)
    stats: Dict[str, Any] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return self.status in ("converged", "completed")


class FlatProblem:
    """What a solver sees: ``F`` and the projection on flat player-major vectors."""

    def __init__(self, operator: Callable[[torch.Tensor], torch.Tensor],
                 project: Callable[[torch.Tensor], torch.Tensor], players: int, block: int,
                 unconstrained: bool):
        self.operator = operator
        self.project = project
        self.players = players
        self.block = block
        self.unconstrained = unconstrained
        self.evaluations = 0

    def F(self, z: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        return self.operator(z)

    def residual_vector(self, z: torch.Tensor, Fz: torch.Tensor) -> torch.Tensor:
        return Fz if self.unconstrained else z - self.project(z - Fz)

    def residual_norm(self, z: torch.Tensor, Fz: torch.Tensor) -> float:
        with torch.no_grad():
            return _collective.norm(self.residual_vector(z.detach(), Fz.detach()))


def _validate_step_size(value, *, allow_none: bool) -> None:
    _check_positive("step_size", value, allow_none=allow_none)


@dataclass(frozen=True, kw_only=True)
class Solver:
    """Base class of the forward solvers (see the module docstring for the shared loop)."""

    rtol: Optional[float] = None
    atol: float = 0.0
    max_steps: int = 10_000
    num_steps: Optional[int] = None

    def __post_init__(self):
        _check_positive("rtol", self.rtol, allow_none=True)
        _check_nonneg("atol", self.atol)
        _check_positive("max_steps", self.max_steps, integer=True)
        _check_positive("num_steps", self.num_steps, integer=True, allow_none=True)

    def init(self, problem: FlatProblem, z0: torch.Tensor) -> Dict[str, Any]:
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
        step_size: the inner learning rate λ (the paper's α).
    """

    step_size: float

    def __post_init__(self):
        super().__post_init__()
        _validate_step_size(self.step_size, allow_none=False)

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
    """

    step_size: float

    def __post_init__(self):
        super().__post_init__()
        _validate_step_size(self.step_size, allow_none=False)

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
        ratio: the linesearch constant (``0 < ratio < sqrt(2) - 1``).
        growth: factor (``>= 1``) by which a step may grow from one iteration to the next.
    """

    step_size: Optional[float] = None
    ratio: float = 0.4
    growth: float = 1.2

    def __post_init__(self):
        super().__post_init__()
        _validate_step_size(self.step_size, allow_none=True)
        if not (isinstance(self.ratio, (int, float)) and 0 < self.ratio < math.sqrt(2) - 1):
            raise ValueError(f"ratio must lie in (0, sqrt(2) - 1) = (0, 0.4142), got {self.ratio!r}")
        if not (isinstance(self.growth, (int, float)) and math.isfinite(self.growth) and self.growth >= 1):
            raise ValueError(f"growth must be a finite number >= 1, got {self.growth!r}")

    def init(self, problem, z0):
        if self.step_size is not None:
            lam = self.step_size
        else:
            with torch.no_grad():
                F0 = problem.F(z0)
                direction = F0 if _collective.allmax(float(F0.abs().max()) if F0.numel() else 0.0) > 0 \
                    else torch.ones_like(z0)
                zmax = _collective.allmax(float(z0.abs().max()) if z0.numel() else 0.0)
                eps = 1e-4 * max(1.0, zmax)
                dz = -eps * direction / _collective.allmax(float(direction.abs().max()))
                L0 = _collective.norm(problem.F(z0 + dz) - F0) / _collective.norm(dz)
            lam = self.ratio / L0 if L0 > 0 else 1.0
        return {"z": z0, "z_prev": z0, "y_prev": None, "Fy_prev": None, "step_size": lam}

    def step(self, problem, state):
        z, z_prev, lam_prev = state["z"], state["z_prev"], state["step_size"]
        if self.step_size is not None or state["y_prev"] is None:
            lam = lam_prev
            y = 2 * z - z_prev
            Fy = problem.F(y)
        else:
            lam = lam_prev * self.growth
            y_prev, Fy_prev = state["y_prev"], state["Fy_prev"]
            for _ in range(60):
                y = z + (lam / lam_prev) * (z - z_prev)
                Fy = problem.F(y)
                with torch.no_grad():
                    dF = _collective.norm(Fy - Fy_prev)
                    dy = _collective.norm(y - y_prev)
                if lam * dF <= self.ratio * dy or not math.isfinite(dF):
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
    evaluations of the full ``F``: a verification tool, not a fast path.  For a plain variational
    inequality (one block) it equals :class:`SimultaneousGradient`.

    Args:
        step_size: the step λ.
        order: ``"cyclic"``, ``"reverse"``, ``"random"`` (a fresh permutation every sweep, from
            ``seed``) or an explicit sequence of player indices.
        seed: seed of the ``"random"`` order.
    """

    step_size: float
    order: Union[str, Sequence[int]] = "cyclic"
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        _validate_step_size(self.step_size, allow_none=False)
        if isinstance(self.order, str):
            if self.order not in ("cyclic", "reverse", "random"):
                raise ValueError(f"order must be 'cyclic', 'reverse', 'random' or a sequence of player "
                                 f"indices, got {self.order!r}")
        else:
            object.__setattr__(self, "order", tuple(int(i) for i in self.order))

    def init(self, problem, z0):
        if _collective.active():
            raise ValueError("GaussSeidel updates players one after another, which does not shard over ranks; "
                             "use PRGD, Extragradient or SimultaneousGradient")
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


def iterate(solver: Solver, problem: FlatProblem, z0: torch.Tensor) -> Solution:
    """Run ``solver`` on ``problem`` from the flat point ``z0``; returns a flat :class:`Solution`."""
    state = solver.init(problem, z0)
    rtol = default_rtol(z0.dtype) if solver.rtol is None else solver.rtol
    history: List[float] = []
    tol = None
    r0 = None
    status = "max_steps"
    limit = solver.num_steps if solver.num_steps is not None else solver.max_steps
    final_residual = None
    steps = 0
    for steps in range(1, limit + 1):
        state = solver.step(problem, state)
        r = state["residual"]
        history.append(r)
        if r0 is None:
            r0 = r
        if not math.isfinite(r) or r > DIVERGENCE_FACTOR * max(r0, solver.atol, 1e-300):
            status = "diverged"
            tol = solver.atol + rtol * r0
            break
        with torch.no_grad():
            tol = solver.atol + rtol * max(r0, _collective.norm(state["z"]))
        if solver.num_steps is None and r <= tol:
            with torch.no_grad():
                z = state["z"]
                final_residual = problem.residual_norm(z, problem.F(z))
            if final_residual <= tol:
                status = "converged"
                break
            final_residual = None
    if solver.num_steps is not None and status != "diverged":
        status = "completed"
    z = state["z"]
    if final_residual is None:
        with torch.no_grad():
            final_residual = problem.residual_norm(z, problem.F(z)) if status != "diverged" else float("nan")
    stats = {"evaluations": problem.evaluations, "tolerance": tol,
             "step_size": state.get("step_size")}
    return Solution(z, status, steps, final_residual, history, stats)
