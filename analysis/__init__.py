"""Numerical checks of the Nash-GBML paper's theory on convex problems.

Each check runs the library on problems whose answers are known, writes a figure and a JSON record,
and states a verdict computed from the numbers (``holds``, ``violated`` or ``assumption fails``).
``python -m analysis <check> [--quick]`` runs one; ``python -m analysis all`` (or
``implicit-nash verify``) runs them all and writes ``report.md``. This package imports
:mod:`implicit_nash`; the library never imports it.
"""
from . import assumptions, complexity, hypergradient_error, independence, lemma_b4, memory, outer, rate

CHECKS = {
    "prgd_rate": rate.run,
    "iteration_complexity": complexity.run,
    "memory": memory.run,
    "hypergradient_error": hypergradient_error.run,
    "order_independence": independence.run,
    "outer_convergence": outer.run,
    "assumptions": assumptions.run,
    "lemma_b4": lemma_b4.run,
}

__all__ = ["CHECKS"]
