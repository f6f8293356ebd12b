"""implicit_nash: differentiable Nash equilibria and Nash gradient-based meta-learning in PyTorch."""
from .equilibrium import (NashLayer, custom_fixed_point, custom_root, nash_equilibrium, nash_solution, solve_vi,
                          vi_solution)
from .errors import ConvergenceError, ConvergenceWarning
from .games import AggregativeGame, CostGame, Game, residual
from .implicit import Adjoint, Implicit, Unrolled, WarmStart
from .penalties import (CentroidPenalty, Penalty, ProximalPenalty, RobustPenalty, SumPenalty, centroid_penalty,
                        proximal_penalty, robust_penalty)
from .linear_solve import (CG, GMRES, BiCGSTAB, Dense, LinearOperator, LinearSolveInfo, LinearSolver,
                           Neumann, NormalCG, Refined)
from .sets import Ball, Box, NonNegative, Reals, Simplex, StrategySet
from .solvers import PRGD, Extragradient, GaussSeidel, SimultaneousGradient, Solution, Solver

__version__ = "0.1.0"

__all__ = [
    "solve_vi", "nash_equilibrium", "NashLayer", "vi_solution", "nash_solution", "custom_root",
    "custom_fixed_point",
    "Game", "CostGame", "AggregativeGame", "residual",
    "Solver", "PRGD", "SimultaneousGradient", "GaussSeidel", "Extragradient", "Solution",
    "Adjoint", "Implicit", "Unrolled", "WarmStart",
    "LinearSolver", "LinearOperator", "LinearSolveInfo", "CG", "GMRES", "BiCGSTAB", "NormalCG",
    "Neumann", "Dense", "Refined",
    "StrategySet", "Reals", "Box", "Ball", "NonNegative", "Simplex",
    "ConvergenceError", "ConvergenceWarning",
    "Penalty", "CentroidPenalty", "RobustPenalty", "ProximalPenalty", "SumPenalty",
    "centroid_penalty", "robust_penalty", "proximal_penalty",
]
