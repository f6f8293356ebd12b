"""Exceptions raised by implicit_nash: one failure contract for every forward and backward solve.

A solve that fails raises :class:`ConvergenceError` (or, with ``throw=False``, issues a
:class:`ConvergenceWarning`) whose ``status`` names the reason:

* ``"max_steps"``: the iteration budget ran out before the tolerance was met;
* ``"diverged"``: the residual grew a million-fold or became non-finite;
* ``"inaccurate"``: the answer's estimated error stays above the tolerance, which rounding in the
  working precision does not let the solver meet (an ill-conditioned problem for its dtype);
* ``"breakdown"``: a Krylov recurrence met a zero denominator (BiCGSTAB on a skew operator, CG on an
  indefinite one);
* ``"singular"``: the linear system is singular to working precision;
* ``"non_finite"``: a product or residual returned NaN or inf;
* ``"not_a_root"``: a user-supplied forward solver (:func:`~implicit_nash.custom_root`) returned a
  point that does not satisfy the optimality condition.

Never a ``ZeroDivisionError``, ``IndexError`` or ``LinAlgError``.
"""
from __future__ import annotations

from typing import Optional, Sequence

#: The reasons a solve can fail with.
REASONS = ("max_steps", "diverged", "inaccurate", "breakdown", "singular", "non_finite", "not_a_root")


class ConvergenceError(RuntimeError):
    """A solver stopped without meeting its tolerance (or diverged, broke down...).

    Attributes:
        status: the reason, one of :data:`REASONS`.
        stage: ``"forward"`` (the equilibrium) or ``"backward"`` (an implicit linear solve).
        steps: number of iterations taken.
        residual: the last residual norm.
        history: residual norm after each iteration (natural residual of the VI for the forward
            solvers, ``||A x - b||`` for linear solvers).
    """

    def __init__(self, message: str, *, status: str, steps: int, residual: float,
                 history: Optional[Sequence[float]] = None, stage: str = "forward"):
        super().__init__(message)
        self.status = status
        self.stage = stage
        self.steps = steps
        self.residual = residual
        self.history = list(history) if history is not None else []


class ConvergenceWarning(RuntimeWarning):
    """Issued instead of :class:`ConvergenceError` when ``throw=False``."""
