"""Exceptions raised by implicit_nash."""
from __future__ import annotations

from typing import Optional, Sequence


class ConvergenceError(RuntimeError):
    """A solver stopped without meeting its tolerance (or diverged).

    Attributes:
        status: ``"max_steps"``, ``"diverged"`` or, for a linear solve, ``"linear_solve"``.
        steps: number of iterations taken.
        residual: the last residual norm.
        history: residual norm after each iteration (natural residual of the VI for the forward
            solvers, ``||A x - b||`` for linear solvers).
    """

    def __init__(self, message: str, *, status: str, steps: int, residual: float,
                 history: Optional[Sequence[float]] = None):
        super().__init__(message)
        self.status = status
        self.steps = steps
        self.residual = residual
        self.history = list(history) if history is not None else []


class ConvergenceWarning(RuntimeWarning):
    """Issued instead of :class:`ConvergenceError` when ``throw=False``."""
