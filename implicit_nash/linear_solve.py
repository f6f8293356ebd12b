r"""Matrix-free linear solvers for the implicit backward pass.

Every solver is a frozen dataclass with one method, ``solve(A, b) -> (x, info)``, where ``A`` is a
:class:`LinearOperator`, a callable ``v -> A v`` or a dense matrix, and ``b`` a 1-D tensor.  ``info``
(:class:`LinearSolveInfo`) reports convergence, iterations, matrix-vector products and the final
residual :math:`\|Ax - b\|`, which is always measured, never estimated.

Stopping rule (all solvers): :math:`\|Ax - b\| \le \max(\text{atol}, \text{rtol}\,\|b\|)`.
With ``rtol=None`` the tolerance follows the dtype: :math:`10\,\varepsilon^{3/4}`
(about ``2e-11`` in float64, ``6e-5`` in float32).

Which solver for a game: the Jacobian :math:`P = \partial_\phi F` of a game is symmetric only for
potential games.  :class:`CG` is valid only for symmetric positive definite operators and refuses
anything else; :class:`GMRES` (the default) and :class:`BiCGSTAB` handle non-symmetric operators;
:class:`NormalCG` works on :math:`A^\top A` and squares the condition number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import torch

from . import _collective

__all__ = [
    "LinearOperator", "LinearSolveInfo", "LinearSolver", "CG", "GMRES", "BiCGSTAB", "NormalCG",
    "Neumann", "Dense", "default_rtol",
]


def default_rtol(dtype: torch.dtype) -> float:
    """Default relative tolerance for ``dtype``: ``10 * eps**0.75``."""
    return 10.0 * torch.finfo(dtype).eps ** 0.75


class LinearOperator:
    """A square linear map given by its matrix-vector product.

    Args:
        matvec: ``v -> A v`` on 1-D tensors.
        rmatvec: optional ``v -> A^T v`` (needed by :class:`NormalCG`).
        symmetric: ``True`` if ``A`` is known to be symmetric, ``False`` if known not to be,
            ``None`` if unknown (then :class:`CG` tests it).
    """

    def __init__(self, matvec: Callable[[torch.Tensor], torch.Tensor],
                 rmatvec: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 symmetric: Optional[bool] = None):
        self.matvec = matvec
        self.rmatvec = rmatvec
        self.symmetric = symmetric

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    @property
    def T(self) -> "LinearOperator":
        if self.rmatvec is None:
            raise ValueError("this operator has no transpose (rmatvec); NormalCG needs one")
        return LinearOperator(self.rmatvec, self.matvec, self.symmetric)


def as_operator(A: Union[LinearOperator, Callable, torch.Tensor]) -> LinearOperator:
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, torch.Tensor):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"a dense operator must be a square matrix, got shape {tuple(A.shape)}")
        return LinearOperator(lambda v: A @ v, lambda v: A.T @ v)
    if callable(A):
        return LinearOperator(A)
    raise TypeError(f"expected a LinearOperator, a callable or a matrix, got {type(A).__name__}")


@dataclass
class LinearSolveInfo:
    """What a linear solve did.

    Attributes:
        converged: whether the stopping rule was met.
        steps: iterations of the method (Krylov dimension for GMRES).
        matvecs: operator applications (transposed ones included).
        residual: final :math:`\\|Ax - b\\|`, measured.
        tolerance: the threshold the residual was compared with.
        history: residual norms observed along the way.
        message: why it stopped.
    """

    converged: bool
    steps: int
    matvecs: int
    residual: float
    tolerance: float
    history: List[float] = field(default_factory=list)
    message: str = ""


def _check_b(b: torch.Tensor) -> None:
    if not isinstance(b, torch.Tensor) or b.dim() != 1:
        raise ValueError("b must be a 1-D tensor")
    if not bool(torch.isfinite(b).all()):
        raise ValueError("the right-hand side b contains NaN or inf")


def _check_positive(name: str, value, *, integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _check_nonneg(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class LinearSolver:
    """Common fields: ``rtol`` (``None``: dtype default), ``atol``, ``max_steps``."""

    rtol: Optional[float] = None
    atol: float = 0.0
    max_steps: int = 1000

    def __post_init__(self):
        _check_positive("rtol", self.rtol, allow_none=True)
        _check_nonneg("atol", self.atol)
        _check_positive("max_steps", self.max_steps, integer=True)

    def _tolerance(self, b: torch.Tensor) -> float:
        rtol = default_rtol(b.dtype) if self.rtol is None else self.rtol
        return max(self.atol, rtol * _norm(b))

    def solve(self, A, b: torch.Tensor) -> Tuple[torch.Tensor, LinearSolveInfo]:  # pragma: no cover
        raise NotImplementedError


def _norm(v: torch.Tensor) -> float:
    # over every rank's block of the vector when the players are sharded (implicit_nash.distributed)
    return _collective.norm(v)


_dot = _collective.dot


def _zero_rhs(b: torch.Tensor, tol: float) -> Tuple[torch.Tensor, LinearSolveInfo]:
    return torch.zeros_like(b), LinearSolveInfo(True, 0, 0, 0.0, tol, [0.0], "b = 0")


@dataclass(frozen=True, kw_only=True)
class CG(LinearSolver):
    """Conjugate gradients, for symmetric positive definite operators only (potential games).

    Before iterating it makes sure the operator is symmetric: an operator declared symmetric is
    trusted, one declared non-symmetric is refused, and for an unknown one ``check_symmetry``
    compares :math:`u^\\top A v` with :math:`v^\\top A u` for random ``u, v`` (two extra
    products) and raises ``ValueError`` if they differ.  A non-positive curvature
    :math:`p^\\top A p \\le 0` also stops it with an error.
    """

    check_symmetry: bool = True

    def solve(self, A, b):
        _check_b(b)
        op = as_operator(A)
        tol = self._tolerance(b)
        matvecs = 0
        if op.symmetric is False:
            raise ValueError("CG needs a symmetric operator and this one is declared non-symmetric "
                             "(a game that is not a potential game); use GMRES or BiCGSTAB")
        if op.symmetric is None and self.check_symmetry:
            gen = torch.Generator(device=b.device).manual_seed(0)
            u = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
            v = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
            Av, Au = op(v), op(u)
            matvecs += 2
            gap = abs(_dot(u, Av) - _dot(v, Au))
            scale = _norm(u) * _norm(Av) + _norm(v) * _norm(Au)
            limit = max(1e-6, 1e3 * torch.finfo(b.dtype).eps)
            if gap > limit * scale:
                raise ValueError(
                    f"CG needs a symmetric operator, but u'Av - v'Au = {gap:.3g} (relative "
                    f"{gap / scale:.3g}) for random u, v: the game's Jacobian is not symmetric (not a "
                    f"potential game, or constraints are active); use GMRES or BiCGSTAB")
        if _norm(b) == 0:
            return _zero_rhs(b, tol)
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = _dot(r, r)
        history = [math.sqrt(rs)]
        steps = 0
        while steps < self.max_steps and history[-1] > tol:
            Ap = op(p)
            matvecs += 1
            curv = _dot(p, Ap)
            if not curv > 0:
                raise ValueError(f"CG met non-positive curvature p'Ap = {curv:.3g}: the operator is not "
                                 "positive definite; use GMRES")
            alpha = rs / curv
            x = x + alpha * p
            r = r - alpha * Ap
            rs_new = _dot(r, r)
            p = r + (rs_new / rs) * p
            rs = rs_new
            steps += 1
            history.append(math.sqrt(rs))
        res = _norm(b - op(x))
        matvecs += 1
        return x, LinearSolveInfo(res <= tol, steps, matvecs, res, tol, history,
                                  "converged" if res <= tol else "max_steps reached")


@dataclass(frozen=True, kw_only=True)
class GMRES(LinearSolver):
    """Restarted GMRES (Saad and Schultz 1986) for general non-singular operators.

    The Arnoldi basis is orthogonalised twice (classical Gram--Schmidt with reorthogonalisation);
    the small least-squares problem is updated with Givens rotations.  ``restart`` is the Krylov
    dimension before a restart; ``max_steps`` bounds the total number of products.
    """

    restart: int = 50

    def __post_init__(self):
        super().__post_init__()
        _check_positive("restart", self.restart, integer=True)

    def solve(self, A, b):
        _check_b(b)
        op = as_operator(A)
        tol = self._tolerance(b)
        if _norm(b) == 0:
            return _zero_rhs(b, tol)
        x = torch.zeros_like(b)
        r = b
        beta = _norm(r)
        history = [beta]
        steps = matvecs = 0
        while beta > tol and steps < self.max_steps:
            m = min(self.restart, self.max_steps - steps)
            V = torch.empty((m + 1, b.numel()), dtype=b.dtype, device=b.device)
            V[0] = r / beta
            H = [[0.0] * m for _ in range(m + 1)]
            cs, sn = [0.0] * m, [0.0] * m
            g = [beta] + [0.0] * m
            k = 0
            for j in range(m):
                w = op(V[j])
                matvecs += 1
                steps += 1
                basis = V[: j + 1]
                h = _collective.allsum(basis @ w)
                w = w - h @ basis
                h2 = _collective.allsum(basis @ w)  # second pass: keeps the basis orthogonal to working precision
                w = w - h2 @ basis
                col = (h + h2).tolist()
                hn = _norm(w)
                for i in range(j):  # apply the earlier rotations to the new column
                    a, c = col[i], col[i + 1]
                    col[i], col[i + 1] = cs[i] * a + sn[i] * c, -sn[i] * a + cs[i] * c
                denom = math.hypot(col[j], hn)
                cs[j], sn[j] = (1.0, 0.0) if denom == 0 else (col[j] / denom, hn / denom)
                col[j] = denom
                g[j + 1] = -sn[j] * g[j]
                g[j] = cs[j] * g[j]
                for i in range(j + 1):
                    H[i][j] = col[i]
                k = j + 1
                history.append(abs(g[j + 1]))
                if hn == 0 or abs(g[j + 1]) <= tol:
                    break
                V[j + 1] = w / hn
            Hk = torch.tensor([row[:k] for row in H[:k]], dtype=torch.float64)
            gk = torch.tensor(g[:k], dtype=torch.float64).unsqueeze(1)
            y = torch.linalg.solve_triangular(Hk, gk, upper=True).squeeze(1).to(b.dtype).to(b.device)
            x = x + y @ V[:k]
            r = b - op(x)  # the true residual, not the recurrence's estimate
            matvecs += 1
            beta = _norm(r)
            history.append(beta)
            if not math.isfinite(beta):
                break
        ok = beta <= tol
        return x, LinearSolveInfo(ok, steps, matvecs, beta, tol, history,
                                  "converged" if ok else "max_steps reached")


@dataclass(frozen=True, kw_only=True)
class BiCGSTAB(LinearSolver):
    """Stabilised bi-conjugate gradients (van der Vorst 1992) for non-symmetric operators.

    Two products per iteration, short recurrences (constant memory).  A breakdown
    (:math:`\\hat r^\\top r = 0`) restarts from the current iterate.
    """

    def solve(self, A, b):
        _check_b(b)
        op = as_operator(A)
        tol = self._tolerance(b)
        if _norm(b) == 0:
            return _zero_rhs(b, tol)
        x = torch.zeros_like(b)
        r = b.clone()
        r_hat = r.clone()
        rho = alpha = omega = 1.0
        v = torch.zeros_like(b)
        p = torch.zeros_like(b)
        res = _norm(r)
        history = [res]
        steps = matvecs = 0
        tiny = torch.finfo(b.dtype).tiny
        while res > tol and steps < self.max_steps:
            rho_new = _dot(r_hat, r)
            if abs(rho_new) <= tiny:  # breakdown: restart the shadow residual
                r_hat = r.clone()
                rho, alpha, omega = 1.0, 1.0, 1.0
                v.zero_()
                p.zero_()
                rho_new = _dot(r_hat, r)
            beta = (rho_new / rho) * (alpha / omega)
            p = r + beta * (p - omega * v)
            v = op(p)
            matvecs += 1
            alpha = rho_new / _dot(r_hat, v)
            s = r - alpha * v
            steps += 1
            if _norm(s) <= tol:
                x = x + alpha * p
                r = s
                res = _norm(r)
                history.append(res)
                break
            t = op(s)
            matvecs += 1
            tt = _dot(t, t)
            omega = _dot(t, s) / tt if tt > 0 else 0.0
            x = x + alpha * p + omega * s
            r = s - omega * t
            rho = rho_new
            res = _norm(r)
            history.append(res)
            if not math.isfinite(res):
                break
        res = _norm(b - op(x))
        matvecs += 1
        ok = res <= tol
        return x, LinearSolveInfo(ok, steps, matvecs, res, tol, history,
                                  "converged" if ok else "max_steps reached")


@dataclass(frozen=True, kw_only=True)
class NormalCG(LinearSolver):
    """CG on the normal equations :math:`A^\\top A x = A^\\top b` (CGNR).

    Valid for any non-singular operator, but squares its condition number (JAXopt's default
    linear solver has this weakness); needs the transpose product (``rmatvec``).
    """

    def solve(self, A, b):
        _check_b(b)
        op = as_operator(A)
        opT = op.T
        tol = self._tolerance(b)
        if _norm(b) == 0:
            return _zero_rhs(b, tol)
        x = torch.zeros_like(b)
        r = b.clone()
        z = opT(r)
        p = z.clone()
        zz = _dot(z, z)
        matvecs = 1
        res = _norm(r)
        history = [res]
        steps = 0
        while res > tol and steps < self.max_steps and zz > 0:
            w = op(p)
            matvecs += 1
            alpha = zz / _dot(w, w)
            x = x + alpha * p
            r = r - alpha * w
            z = opT(r)
            matvecs += 1
            zz_new = _dot(z, z)
            p = z + (zz_new / zz) * p
            zz = zz_new
            steps += 1
            res = _norm(r)
            history.append(res)
        res = _norm(b - op(x))
        matvecs += 1
        ok = res <= tol
        return x, LinearSolveInfo(ok, steps, matvecs, res, tol, history,
                                  "converged" if ok else "max_steps reached")


@dataclass(frozen=True, kw_only=True)
class Neumann(LinearSolver):
    """Truncated Neumann series / Richardson iteration :math:`x_{k+1} = x_k + \\eta (b - A x_k)`.

    Converges when the spectral radius of :math:`I - \\eta A` is below one (for a μ-strongly
    monotone, L-Lipschitz operator: :math:`\\eta < 2\\mu/L^2`).  Stops early, unconverged, when the
    residual grows a million-fold.
    """

    step_size: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _check_positive("step_size", self.step_size)

    def solve(self, A, b):
        _check_b(b)
        op = as_operator(A)
        tol = self._tolerance(b)
        bnorm = _norm(b)
        if bnorm == 0:
            return _zero_rhs(b, tol)
        x = torch.zeros_like(b)
        r = b.clone()
        res = bnorm
        history = [res]
        steps = matvecs = 0
        message = "max_steps reached"
        while res > tol and steps < self.max_steps:
            x = x + self.step_size * r
            r = b - op(x)
            matvecs += 1
            steps += 1
            res = _norm(r)
            history.append(res)
            if not math.isfinite(res) or res > 1e6 * bnorm:
                message = "diverged: spectral radius of I - step_size * A is at least one"
                break
        ok = res <= tol
        return x, LinearSolveInfo(ok, steps, matvecs, res, tol, history, "converged" if ok else message)


@dataclass(frozen=True, kw_only=True)
class Dense(LinearSolver):
    """Materialise the matrix (one product per column, batched with ``vmap``) and solve with LU.

    Exact up to rounding; for tests and small problems (memory :math:`n^2`).  ``rtol``/``atol``
    only decide whether the measured residual counts as converged.
    """

    def solve(self, A, b):
        _check_b(b)
        if _collective.active():
            raise ValueError("Dense materialises the operator on one process and cannot be used with players "
                             "sharded over ranks; use GMRES or BiCGSTAB")
        op = as_operator(A)
        tol = self._tolerance(b)
        eye = torch.eye(b.numel(), dtype=b.dtype, device=b.device)
        try:
            rows = torch.func.vmap(op)(eye)  # row j is A e_j, i.e. column j of A
        except (RuntimeError, ValueError, NotImplementedError):
            rows = torch.stack([op(e) for e in eye])
        x = torch.linalg.solve(rows.T, b)
        res = _norm(b - op(x))
        ok = res <= tol
        return x, LinearSolveInfo(ok, 1, b.numel() + 1, res, tol, [res],
                                  "converged" if ok else "residual above tolerance (ill-conditioned)")
