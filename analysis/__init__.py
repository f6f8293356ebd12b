"""Numerical checks of the Nash-GBML paper's theory on convex problems.

This package imports :mod:`implicit_nash`, never the other way round.  The checks themselves
(convergence rate, iteration complexity, hypergradient error, order independence, memory) are the
subject of a separate issue and are not implemented yet.
"""
