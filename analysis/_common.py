"""Shared pieces of the checks: convex test problems with known constants, trajectories, records.

Every check returns a :class:`Record`: the claim (with the paper's equation), what the theory
predicts, what was measured, and a verdict computed from the numbers (``"holds"``, ``"violated"``
or ``"assumption fails"``), plus the path of its figure. Records are written as JSON next to the
figure.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from implicit_nash.solvers import FlatProblem, Solver, _lipschitz_estimate

__all__ = ["Record", "QuadraticGame", "quadratic_game", "trajectory", "write_record", "loglog_slope",
           "figure", "HOLDS", "VIOLATED", "ASSUMPTION_FAILS"]

HOLDS, VIOLATED, ASSUMPTION_FAILS = "holds", "violated", "assumption fails"


@dataclass
class Record:
    check: str
    title: str
    claim: str
    predicted: Dict[str, Any]
    measured: Dict[str, Any]
    verdict: str
    explanation: str
    settings: Dict[str, Any] = field(default_factory=dict)
    figure: Optional[str] = None
    seconds: float = 0.0


def _plain(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def write_record(record: Record, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{record.check}.json"
    path.write_text(json.dumps(_plain(asdict(record)), indent=2))
    return path


@dataclass
class QuadraticGame:
    r"""The affine game :math:`F(z;\theta) = A z + C\theta + b` on :math:`B` players of dimension ``d``.

    ``A = S + K`` with ``S`` symmetric positive definite (eigenvalues evenly spaced in
    [mu, mu * cond]) and ``K`` skew-symmetric (``skew`` times the norm of ``S``): the game is
    mu-strongly monotone with :math:`\mu = \lambda_{min}(S)` exactly (the symmetric part of A is S)
    and L-Lipschitz with :math:`L = \|A\|_2`. Its equilibrium and Jacobian are closed forms:
    :math:`z^* = -A^{-1}(C\theta + b)`, :math:`dz^*/d\theta = -A^{-1}C` (Lemma B.4 with P = A, Q = C).
    """

    A: torch.Tensor
    C: torch.Tensor
    b: torch.Tensor
    B: int
    d: int
    mu: float
    L: float

    def operator(self, z, theta):
        return (self.A @ z.reshape(-1) + self.C @ theta + self.b).reshape(z.shape)

    def solution(self, theta):
        return torch.linalg.solve(self.A, -(self.C @ theta + self.b)).reshape(self.B, self.d)

    def jacobian(self):
        return -torch.linalg.solve(self.A, self.C)


def quadratic_game(B: int = 4, d: int = 5, p: int = 3, cond: float = 10.0, skew: float = 1.0,
                   mu: float = 1.0, seed: int = 0) -> QuadraticGame:
    g = torch.Generator().manual_seed(seed)
    n = B * d
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(mu, mu * cond, n, dtype=torch.float64)
    S = Q @ torch.diag(eig) @ Q.T
    S = 0.5 * (S + S.T)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    K = M - M.T
    K = K * (skew * float(eig.max()) / float(torch.linalg.matrix_norm(K, 2))) if skew > 0 else torch.zeros_like(K)
    A = S + K
    C = torch.randn(n, p, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    L = float(torch.linalg.matrix_norm(A, 2))
    return QuadraticGame(A, C, b, B, d, float(eig.min()), L)


def trajectory(solver: Solver, operator, z0: torch.Tensor, theta, steps: int) -> List[torch.Tensor]:
    """The iterates z_0, z_1, ..., z_steps of ``solver`` (the library's own update rule), flat."""
    shape = z0.shape
    problem = FlatProblem(lambda z: operator(z.reshape(shape), theta).reshape(-1), lambda z: z,
                          players=shape[0], block=int(z0[0].numel()), unconstrained=True)
    with torch.no_grad():
        z = z0.reshape(-1)
        F0 = problem.F(z)
        problem.lipschitz = _lipschitz_estimate(problem, z, F0)  # as implicit_nash.solvers.iterate does
        state = solver.init(problem, z, F0)
        out = [state["z"]]
        for _ in range(steps):
            state = solver.step(problem, state)
            out.append(state["z"])
    return out


def loglog_slope(x, y) -> float:
    """Least-squares slope of log y against log x."""
    lx = torch.log(torch.as_tensor(x, dtype=torch.float64))
    ly = torch.log(torch.as_tensor(y, dtype=torch.float64))
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


def figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


def save(fig, out: Path, name: str) -> str:
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)
    plt.close(fig)
    return f"{name}.png"


class float64:
    """Context manager: float64 default dtype (the analysis runs in double precision)."""

    def __enter__(self):
        self._old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self._old)
        return False
