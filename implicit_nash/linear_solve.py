r"""Matrix-free linear solvers for the implicit backward pass.

Every solver is a frozen dataclass with one method, ``solve(A, b) -> (x, info)``, where ``A`` is a
:class:`LinearOperator`, a callable ``v -> A v`` or a dense matrix, and ``b`` a 1-D tensor.  ``info``
(:class:`LinearSolveInfo`) reports the status, iterations, matrix-vector products and the final
residual :math:`\|Ax - b\|`, which is always measured, never estimated.

Stopping rule (all solvers), backward-stable and independent of the scale of ``A`` and ``b``:

.. math:: \|b - Ax\| \le \text{atol} + \text{rtol}\,(\hat A\,\|x\| + \|b\|),

where :math:`\hat A` is a lower estimate of :math:`\|A\|` (the largest :math:`\|Av\|/\|v\|` over
the products the solver made); a solution that meets it is then held to its estimated error
:math:`\|b - Ax\|/\hat\sigma_{\min} \le \text{atol} + \max(\text{rtol}, \sqrt\varepsilon)\|x\|`
(``LinearSolveInfo.error``; ``"inaccurate"`` where it cannot be met).  A solution that meets it is the exact solution of a system whose
matrix and right-hand side differ from ``A`` and ``b`` by relative amounts of order ``rtol``; an
exact (LU) solve meets it at any condition number.  ``rtol=None`` follows the dtype:
:math:`10\,\varepsilon^{3/4}` (about ``2e-11`` in float64, ``6e-5`` in float32); ``rtol=0`` and
``atol=0`` are accepted (as in SciPy) and ask for an exact solve.

Every solver keeps the best iterate it has seen (smallest measured residual) and reports one status
(:data:`STATUSES`): ``"converged"``, ``"max_steps"``, ``"breakdown"`` (a Krylov recurrence divided by
zero), ``"singular"`` (the matrix is singular to working precision: an LU failure, or a solution
whose norm shows a condition number :math:`\hat A\|x\|/\|b\|` of at least ``0.05 / eps``, where no
digit of it can be trusted), ``"non_finite"`` (a product returned NaN or inf) or ``"diverged"``.

Which solver for a game: the Jacobian :math:`P = \partial_\phi F` of a game is symmetric only for
potential games.  :class:`CG` is valid only for symmetric positive definite operators (it hands an operator
that is not symmetric to GMRES and says so in ``info.message``); :class:`GMRES` (the default) and :class:`BiCGSTAB` handle non-symmetric operators;
:class:`NormalCG` works on :math:`A^\top A` and squares the condition number.

``groups``: ``solve(A, b, groups=g)`` treats ``b`` as ``g`` independent blocks of equal size (a batch
of systems stacked into one block-diagonal system, as the ``vmap`` rule of the implicit backward
does) and requires the stopping rule of every block, with its own :math:`\|b_g\|` and :math:`\|x_g\|`.
:class:`CG` and :class:`GMRES` also build their Krylov spaces per block (the operator must then be
block-diagonal, as a ``vmap`` stack is), so that each block converges at its own rate.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable, ClassVar, List, Optional, Tuple, Union

import torch

from . import _collective
from ._tree import all_finite, check_supported_tensor

__all__ = [
    "LinearOperator", "LinearSolveInfo", "LinearSolver", "CG", "GMRES", "BiCGSTAB", "NormalCG",
    "Neumann", "Dense", "Refined", "default_rtol", "STATUSES",
]

#: The statuses a linear solve can end with.
STATUSES = ("converged", "max_steps", "inaccurate", "breakdown", "singular", "non_finite", "diverged")

#: A solution whose norm shows a condition number of at least ``SINGULAR / eps`` is reported singular.
SINGULAR = 0.05

DEFAULT_MAX_STEPS = 1000

#: GMRES orthogonalises a second time when the first pass leaves less than this fraction of the norm
#: (Daniel, Gragg, Kaufman and Stewart 1976: "twice is enough"; 1/sqrt(2) is the usual threshold).
_REORTH = 0.7071

#: CG refreshes its stopping threshold (and records its best iterate) every this many iterations.
_CG_CHECK = 10

#: Products of the short Arnoldi run that estimates sigma_min(A) for methods with no estimate of their own.
_ARNOLDI_STEPS = 20

#: How many times a solve whose estimated error exceeds its tolerance iterates on, from its answer.
_ERROR_ROUNDS = 3


def default_rtol(dtype: torch.dtype) -> float:
    """Default relative tolerance for ``dtype``: ``10 * eps**0.75``."""
    return 10.0 * torch.finfo(dtype).eps ** 0.75


class LinearOperator:
    """A square linear map given by its matrix-vector product.

    Args:
        matvec: ``v -> A v`` on 1-D tensors.
        rmatvec: optional ``v -> A^T v`` (needed by :class:`NormalCG`).
        symmetric: the operator's symmetry tag: ``True`` if ``A`` is known to be symmetric, ``False``
            if known not to be, ``None`` if unknown (then :class:`CG` tests it).
        lowered: optional ``dtype -> LinearOperator``: the same operator in a lower precision
            (:class:`Refined`).
        functional: optional ``(fn, operands)`` with ``fn(v, *operands) == matvec(v)`` a pure
            function of tensors (no captured autograd graph, no side effects), so that it can be
            traced: what a compiled solve (``CG(compiled=True)``) runs.  A dense matrix and the
            layer's Jacobians have one.
    """

    def __init__(self, matvec: Callable[[torch.Tensor], torch.Tensor],
                 rmatvec: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 symmetric: Optional[bool] = None,
                 lowered: Optional[Callable[[torch.dtype], Optional["LinearOperator"]]] = None,
                 functional: Optional[Tuple[Callable, Tuple[torch.Tensor, ...]]] = None):
        if symmetric not in (None, True, False):
            raise ValueError(f"symmetric must be True, False or None, got {symmetric!r}")
        if functional is not None and not (isinstance(functional, tuple) and len(functional) == 2
                                           and callable(functional[0])):
            raise TypeError("functional must be a pair (fn, operands) with fn(v, *operands) = A v")
        self.matvec = matvec
        self.rmatvec = rmatvec
        self.symmetric = symmetric
        self.functional = None if functional is None else (functional[0], tuple(functional[1]))
        self._lowered = lowered
        self._low = {}

    def lowered(self, dtype: torch.dtype) -> Optional["LinearOperator"]:
        """The same operator computed in the lower precision ``dtype`` (for :class:`Refined`), or
        ``None`` when it has no such form (then the refinement runs in the working precision)."""
        if self._lowered is None:
            return None
        if dtype not in self._low:
            self._low[dtype] = self._lowered(dtype)
        return self._low[dtype]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    @property
    def T(self) -> "LinearOperator":
        if self.rmatvec is None:
            raise ValueError("this operator has no transpose (rmatvec); NormalCG needs one")
        return LinearOperator(self.rmatvec, self.matvec, self.symmetric)


def _matrix_product(v: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return A @ v


def as_operator(A: Union[LinearOperator, Callable, torch.Tensor]) -> LinearOperator:
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, torch.Tensor):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"a dense operator must be a square matrix, got shape {tuple(A.shape)}")
        return LinearOperator(lambda v: A @ v, lambda v: A.T @ v,
                              lowered=lambda dtype: as_operator(A.detach().to(dtype)),
                              functional=(_matrix_product, (A.detach(),)))
    if callable(A):
        return LinearOperator(A)
    raise TypeError(f"expected a LinearOperator, a callable or a matrix, got {type(A).__name__}")


@dataclass(repr=False)
class LinearSolveInfo:
    """What a linear solve did.

    Attributes:
        converged: whether the stopping rule was met (``status == "converged"``).
        steps: iterations of the method (Krylov dimension for GMRES).
        matvecs: operator applications (transposed ones included).
        residual: final :math:`\\|Ax - b\\|`, measured (with ``groups``: of the block that is
            furthest from its tolerance).
        tolerance: the threshold the residual was compared with.
        history: residual norms observed along the way.
        message: why it stopped, in words.
        status: one of :data:`STATUSES`.
        norm_estimate: the estimate :math:`\\hat A` of :math:`\\|A\\|` used by the stopping rule.
        group_residuals, group_tolerances: per block, with ``groups > 1``.
        group_statuses: per block, with ``groups > 1``: ``"converged"`` where that block meets its
            tolerance (and shows no singularity), else the reason it failed.
        warm: how many blocks started from the given ``x0`` (the others from zero: a start whose
            residual is not below :math:`\\|b\\|` is discarded); ``0`` without ``x0``.
        error: an estimate of the solution's error :math:`\\|x - A^{-1}b\\|` (of the block furthest
            from its tolerance): :math:`\\|b - Ax\\|/\\hat\\sigma_{\\min}` plus rounding, with
            :math:`\\hat\\sigma_{\\min}` the smallest singular value of the Krylov process's projected
            matrix (GMRES's Hessenberg, CG's Lanczos tridiagonal) or of a short Arnoldi run from the
            solution; ``nan`` where none was computed.
        condition: the condition estimate :math:`\\hat A/\\hat\\sigma_{\\min}` behind it.
        hypergradient_error: for the reverse-mode solve of the layer's backward, the share of this
            solve in the hypergradient's error (the :math:`\\epsilon` of Theorem D.3):
            ``error`` carried through :math:`-Q^\\top` (see :meth:`Solution.hypergradient_error`).
        group_errors: per block, with ``groups > 1``.
    """

    converged: bool
    steps: int
    matvecs: int
    residual: float
    tolerance: float
    history: List[float] = field(default_factory=list)
    message: str = ""
    status: str = "converged"
    norm_estimate: float = float("nan")
    group_residuals: List[float] = field(default_factory=list)
    group_tolerances: List[float] = field(default_factory=list)
    warm: int = 0
    group_statuses: List[str] = field(default_factory=list)
    error: float = float("nan")
    condition: float = float("nan")
    group_errors: List[float] = field(default_factory=list)
    hypergradient_error: float = float("nan")

    def __repr__(self) -> str:
        # a summary (the history can be long); fields added later are read with defaults
        def num(x):
            return f"{x:.3g}" if isinstance(x, float) else repr(x)[:30]
        parts = [f"status={getattr(self, 'status', None)!r}", f"steps={getattr(self, 'steps', None)}",
                 f"matvecs={getattr(self, 'matvecs', None)}", f"residual={num(getattr(self, 'residual', None))}",
                 f"tolerance={num(getattr(self, 'tolerance', None))}",
                 f"history={len(getattr(self, 'history', None) or ())}"]
        groups = getattr(self, "group_residuals", None)
        if groups:
            parts.append(f"groups={len(groups)}")
        return f"LinearSolveInfo({', '.join(parts)})"


def _check_b(b: torch.Tensor) -> None:
    if not isinstance(b, torch.Tensor) or b.dim() != 1:
        raise ValueError("b must be a 1-D tensor")
    check_supported_tensor(b, "b", "the linear solver's")
    if not all_finite(b):
        raise ValueError("the right-hand side b contains NaN or inf")


def _plain(value):
    """A real number (numpy's scalars included, booleans excluded) as a Python ``int`` or ``float``;
    anything else unchanged."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or type(value) in (int, float):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _plain_fields(obj) -> None:
    """Store every real-number field of the dataclass ``obj`` as a Python ``int`` or ``float``."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name, None)
        plain = _plain(value)
        if plain is not value:
            object.__setattr__(obj, f.name, plain)


def _check_positive(name: str, value, *, integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real)
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _check_nonneg(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")


def _group_sq(v: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-block sums of squares, in float64, on v's device (not reduced over ranks)."""
    return (v.detach().to(torch.float64) ** 2).reshape(groups, -1).sum(1)


def _gnorm(v: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-block norms over every rank's part, as a float64 CPU tensor of shape ``(groups,)``."""
    sq = _group_sq(v, groups)
    if _collective.active():
        sq = _collective.allsum(sq)
    return sq.cpu().sqrt()


def _norm(v: torch.Tensor) -> float:
    # over every rank's block of the vector when the players are sharded (implicit_nash.distributed)
    return _collective.norm(v)


_dot = _collective.dot


class _Monitor:
    """The shared machinery of every solver: counts products, estimates ``||A||`` from them, applies
    the stopping rule per block, keeps the best iterate and builds the :class:`LinearSolveInfo`."""

    def __init__(self, solver: "LinearSolver", A, b: torch.Tensor, groups: int,
                 x0: Optional[torch.Tensor] = None):
        _check_b(b)
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or b.numel() % groups:
            raise ValueError(f"groups must be a positive integer dividing len(b) = {b.numel()}, got {groups!r}")
        if groups > 1 and _collective.active():
            raise ValueError("a batch of systems (groups > 1) cannot also be sharded over ranks")
        self.op = as_operator(A)
        self.b = b
        self.groups = groups
        self.rtol = default_rtol(b.dtype) if solver.rtol is None else solver.rtol
        self.atol = solver.atol
        # the solution's error is held to atol + error_rtol * ||x||, error_rtol = max(rtol, sqrt(eps)):
        # the error estimate is good to a digit or two, not to rtol = 1e-12, and the residual rule's
        # default 10 eps^0.75 would refuse every condition number above about 1 / (10 eps^0.25)
        self.error_rtol = max(self.rtol, math.sqrt(torch.finfo(b.dtype).eps))
        self.eps = torch.finfo(b.dtype).eps
        self.matvecs = 0
        self._pairs: List[torch.Tensor] = []
        self._known = 0.0
        self.estimate = torch.zeros(groups, dtype=torch.float64)
        self.sigma = torch.full((groups,), math.inf, dtype=torch.float64)  # upper estimates of sigma_min(A)
        self.check_error = True
        self.enforce_error = True
        self.inaccurate = ""  # why the solution's estimated error is above its tolerance
        self.bnorm = _gnorm(b, groups)
        self.best_x = torch.zeros_like(b)
        self.best_res = self.bnorm.clone()
        self.history: List[float] = [float(self.bnorm.norm())]
        self.res = self.bnorm.clone()
        self.tol = self.tolerance_for(self.best_x)
        # where the iteration starts: x0 and its residual r0 = b - A x0 (zero and b without a warm start)
        self.x0, self.r0, self.warm = torch.zeros_like(b), b, 0
        if x0 is not None and not self.zero_rhs:
            self._start_from(x0)

    def _start_from(self, x0: torch.Tensor) -> None:
        """A warm start: one product for its residual; a block whose start is no better than zero
        (residual not below ``||b_g||``, or not finite) starts from zero instead."""
        b = self.b
        if not isinstance(x0, torch.Tensor) or x0.shape != b.shape or x0.dtype != b.dtype or x0.device != b.device:
            what = (f"shape {tuple(x0.shape)}, {x0.dtype}, {x0.device}" if isinstance(x0, torch.Tensor)
                    else type(x0).__name__)
            raise ValueError(f"x0 must be a tensor like b (shape {tuple(b.shape)}, {b.dtype}, {b.device}), got {what}")
        x0 = x0.detach()
        r = b - self(x0)
        res = _gnorm(r, self.groups)
        use = torch.isfinite(res) & (res < self.bnorm)
        self.warm = int(use.sum())
        if not self.warm:
            return
        if self.groups == 1:
            self.x0, self.r0 = x0, r
        else:
            mask = use.to(b.device).unsqueeze(1)
            self.x0 = torch.where(mask, x0.reshape(self.groups, -1), 0.0).reshape(-1)
            self.r0 = torch.where(mask, r.reshape(self.groups, -1), b.reshape(self.groups, -1)).reshape(-1)
        self.accept(self.x0, self.r0)

    def __call__(self, v: torch.Tensor, track: bool = True) -> torch.Tensor:
        """``A v``; ``track=False`` leaves the norm estimate to the caller (:meth:`note_norm`)."""
        w = self.op(v)
        self.matvecs += 1
        if not track:
            return w
        with torch.no_grad():  # ||v||^2 and ||Av||^2 per block in one reduction, read at the next check
            self._pairs.append((torch.stack((v.detach(), w.detach())).reshape(2, self.groups, -1).to(torch.float64) ** 2).sum(2))
        return w

    def note_norm(self, ratio) -> None:
        """A known lower bound of ``||A||``, e.g. ``||A v|| / ||v||`` from the Arnoldi process: a number
        (one block), or a tensor of one bound per block."""
        if isinstance(ratio, torch.Tensor):
            r = torch.nan_to_num(ratio.detach().to("cpu", torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
            self.estimate = torch.maximum(self.estimate, r.clamp_min(0.0))
            return
        self._known = max(self._known, ratio) if math.isfinite(ratio) else self._known

    def note_sigma(self, sigma) -> None:
        """An estimate of the smallest singular value of ``A`` (the smallest singular value of a
        projection of ``A`` on a Krylov space, an upper bound): a number or one per block."""
        if isinstance(sigma, torch.Tensor):
            sig = torch.nan_to_num(sigma.detach().to("cpu", torch.float64), nan=math.inf)
        else:
            sig = torch.tensor([sigma if math.isfinite(sigma) else math.inf] * self.groups, dtype=torch.float64)
        self.sigma = torch.minimum(self.sigma, sig.clamp_min(0.0))

    def _sigma_by_arnoldi(self, x: torch.Tensor) -> None:
        """``sigma`` from a short Arnoldi run on ``A`` started at ``x`` (rich in the directions that
        ``A`` shrinks most, since ``x`` is about ``A^{-1} b``): ``min(n, 20)`` products, for the
        methods whose recurrences give no estimate of their own."""
        G = self.groups
        n = self.b.numel() // G
        k = min(n, _ARNOLDI_STEPS)
        V = torch.zeros((k + 1, G, n), dtype=self.b.dtype, device=self.b.device)
        start = x.detach().reshape(G, n)
        norms = start.norm(dim=1)
        start = torch.where((norms > 0).unsqueeze(1), start / norms.clamp_min(1e-300).unsqueeze(1),
                            torch.full_like(start, 1.0 / math.sqrt(n)))
        V[0] = start
        H = torch.zeros((G, k + 1, k), dtype=torch.float64)
        size = k
        for j in range(k):
            w = self(V[j].reshape(-1)).reshape(G, n)
            for _ in range(2):  # twice is enough
                h = torch.einsum("jgn,gn->gj", V[: j + 1], w)
                w = w - torch.einsum("gj,jgn->gn", h, V[: j + 1])
                H[:, : j + 1, j] += h.to("cpu", torch.float64)
            hn = w.norm(dim=1)
            H[:, j + 1, j] = hn.to("cpu", torch.float64)
            if not bool(torch.isfinite(hn).all()):
                return
            if bool((hn <= 1e-300).all()):
                size = j + 1
                break
            V[j + 1] = w / hn.clamp_min(1e-300).unsqueeze(1)
        self.note_sigma(torch.linalg.svdvals(H[:, : size + 1, :size]).min(dim=1).values)

    def _update_estimate(self) -> None:
        if self._known > 0:
            self.estimate = torch.maximum(self.estimate, torch.tensor([self._known], dtype=torch.float64))
        if not self._pairs:
            return
        pairs = torch.stack(self._pairs)  # (k, 2, groups)
        self._pairs = []
        if _collective.active():
            pairs = _collective.allsum(pairs)
        pairs = pairs.cpu()
        ratio = torch.where(pairs[:, 0] > 0, pairs[:, 1] / pairs[:, 0].clamp_min(1e-300), torch.zeros(()))
        ratio = torch.nan_to_num(ratio, nan=0.0, posinf=0.0)  # a non-finite product is reported elsewhere
        self.estimate = torch.maximum(self.estimate, ratio.max(0).values.sqrt())

    def tolerance_for(self, x: torch.Tensor) -> torch.Tensor:
        self._update_estimate()
        return self.atol + self.rtol * (self.estimate * _gnorm(x, self.groups) + self.bnorm)

    @property
    def zero_rhs(self) -> bool:
        return bool((self.bnorm == 0).all())

    def threshold(self, x: torch.Tensor) -> float:
        """One number for a recurrence's estimate of the global residual: the strictest block's."""
        return float(self.tolerance_for(x).min())

    def accept(self, x: torch.Tensor, r: torch.Tensor) -> bool:
        """Record ``x`` with its residual ``r = b - A x`` (true or recurrence); True if every block
        meets its tolerance.  The best iterate is kept per block."""
        res = _gnorm(r, self.groups)
        self.history.append(float(res.norm()))
        tol = self.tolerance_for(x)
        finite = torch.isfinite(res)
        better = finite & (res < self.best_res)
        if bool(better.any()):
            if self.groups == 1:
                self.best_x = x.detach().clone()
            else:
                mask = better.to(x.device).unsqueeze(1)
                self.best_x = torch.where(mask, x.detach().reshape(self.groups, -1),
                                          self.best_x.reshape(self.groups, -1)).reshape(-1)
            self.best_res = torch.where(better, res, self.best_res)
        self.res, self.tol = res, tol
        return bool(finite.all()) and bool((res <= tol).all())

    def finish(self, steps: int, status: Optional[str] = None, message: str = "",
               verify: bool = True, product: Optional[Callable] = None) -> Tuple[torch.Tensor, LinearSolveInfo]:
        """The best iterate and its info.  ``verify`` re-measures its true residual (one product, by
        ``product`` if given: the same operator computed another way).  A solution that meets the
        residual rule is then held to its estimated error (:meth:`error_of`): an estimate above
        ``atol + rtol * ||x||`` is status ``"inaccurate"``, which :meth:`LinearSolver.solve` may
        still cure by iterating on."""
        x = self.best_x
        if verify and self.matvecs:
            if product is None:
                w = self(x)
            else:
                w = product(x)
                self.matvecs += 1
            r = self.b - w
            res = _gnorm(r, self.groups)
        else:
            res = self.best_res
        tol = self.tolerance_for(x)
        ok = bool(torch.isfinite(res).all()) and bool((res <= tol).all())
        xn = _gnorm(x, self.groups)
        errors = torch.full((self.groups,), math.nan, dtype=torch.float64)
        cond = torch.where(self.bnorm > 0, self.estimate * xn / self.bnorm.clamp_min(1e-300), torch.zeros(()))
        if ok:
            worst = float(cond.max())
            if worst * self.eps >= SINGULAR:
                status = "singular"
                message = (f"the solution's norm shows a condition number of at least {worst:.3g}, "
                           f"beyond {SINGULAR:g}/eps = {SINGULAR / self.eps:.3g} for {self.b.dtype}: the matrix "
                           f"is singular to working precision and no digit of the solution can be trusted")
            else:
                status, message = "converged", "converged"
                if self.check_error:
                    errors = self.error_of(x, res, xn)
                    allowed = self.atol + self.error_rtol * xn
                    if self.enforce_error and not bool((errors <= allowed).all()):
                        k = int((errors / allowed.clamp_min(1e-300)).argmax())
                        status = "inaccurate"
                        self.inaccurate = (f"the residual meets the backward-stable rule but the solution's estimated "
                                   f"error {float(errors[k]):.3g} exceeds atol + {self.error_rtol:.3g} * ||x|| = "
                                   f"{float(allowed[k]):.3g} "
                                   f"(condition number estimate {float(self.estimate[k] / self.sigma[k]):.3g}, "
                                   f"{self.b.dtype} eps {self.eps:.3g})")
        elif status is None or status == "converged":
            status, message = "max_steps", message or "max_steps reached"
        ratio = torch.where(tol > 0, res / tol.clamp_min(1e-300), torch.where(res > 0, torch.inf, 0.0))
        ratio = torch.nan_to_num(ratio, nan=math.inf)
        k = int(ratio.argmax()) if status != "inaccurate" else int(torch.nan_to_num(errors, nan=0.0).argmax())
        self.history.append(float(res.norm()))
        info = LinearSolveInfo(status == "converged", steps, self.matvecs, float(res[k]), float(tol[k]),
                               self.history, message, status, float(self.estimate.max()),
                               res.tolist() if self.groups > 1 else [], tol.tolist() if self.groups > 1 else [],
                               self.warm)
        info.error = float(errors[k])
        info.condition = float((self.estimate / self.sigma).max()) if bool(torch.isfinite(self.sigma).all()) else math.nan
        info.group_statuses = self._group_statuses(res, tol, x, status)
        if self.groups > 1:
            info.group_errors = errors.tolist()
            over = (errors > self.atol + self.error_rtol * xn).tolist() if self.enforce_error \
                else [False] * self.groups  # nan compares False
            info.group_statuses = ["inaccurate" if o and g == "converged" else g
                                   for o, g in zip(over, info.group_statuses)]
        return x, info

    def error_of(self, x: torch.Tensor, res: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        """The estimated error of ``x`` per block: ``||b - Ax|| / sigma_min`` (the solve's own estimate
        of the smallest singular value, or a short Arnoldi run's) plus the rounding of ``x``."""
        if not bool(torch.isfinite(self.sigma).all()):
            self._sigma_by_arnoldi(x)
        # ||A^-1|| >= ||x|| / ||b||: sigma_min <= ||b|| / ||x|| whatever the Krylov space saw
        self.note_sigma(torch.where(xn > 0, self.bnorm / xn.clamp_min(1e-300), torch.full_like(xn, math.inf)))
        sigma = torch.where(torch.isfinite(self.sigma), self.sigma, torch.zeros(()))
        err = torch.where(sigma > 0, res / sigma.clamp_min(1e-300), torch.where(res > 0, math.inf, 0.0))
        return err + self.eps * xn

    def _group_statuses(self, res: torch.Tensor, tol: torch.Tensor, x: torch.Tensor, status: str) -> List[str]:
        """Each block's outcome (``groups > 1``): converged where its residual meets its tolerance and
        its solution's norm shows no singularity; a block that misses its tolerance gets the solve's
        status, one that meets it but is singular to working precision gets ``"singular"``."""
        if self.groups == 1:
            return []
        met = (torch.isfinite(res) & (res <= tol)).tolist()
        xn = _gnorm(x, self.groups)
        cond = torch.where(self.bnorm > 0, self.estimate * xn / self.bnorm.clamp_min(1e-300), torch.zeros(()))
        singular = (cond * self.eps >= SINGULAR).tolist()
        failed = status if status != "converged" else "max_steps"
        return ["converged" if m and not s else ("singular" if m else failed) for m, s in zip(met, singular)]

    def zero(self) -> Tuple[torch.Tensor, LinearSolveInfo]:
        zeros = [0.0] * self.groups if self.groups > 1 else []
        tol = self.tolerance_for(self.best_x)
        return torch.zeros_like(self.b), LinearSolveInfo(True, 0, 0, 0.0, float(tol.min()), [0.0], "b = 0",
                                                         "converged", 0.0, zeros, tol.tolist() if zeros else [],
                                                         group_statuses=["converged"] * len(zeros))


@dataclass(frozen=True, kw_only=True)
class LinearSolver:
    """Common fields: ``rtol`` (``None``: dtype default; ``0`` allowed), ``atol`` (``0`` allowed),
    ``max_steps`` (``None``: 1000 products for the iterative solvers)."""

    rtol: Optional[float] = None
    atol: float = 0.0
    max_steps: Optional[int] = None

    #: whether the method can use a starting guess (a direct solve cannot: it ignores ``x0``)
    iterative = True

    def __post_init__(self):
        _plain_fields(self)  # numpy scalars are accepted and kept as Python numbers
        _check_nonneg("rtol", self.rtol, allow_none=True)
        _check_nonneg("atol", self.atol)
        _check_positive("max_steps", self.max_steps, integer=True, allow_none=True)

    @property
    def steps_limit(self) -> int:
        return DEFAULT_MAX_STEPS if self.max_steps is None else self.max_steps

    def solve(self, A, b: torch.Tensor, *, groups: int = 1, x0: Optional[torch.Tensor] = None,
              enforce_error: bool = True) -> Tuple[torch.Tensor, LinearSolveInfo]:
        """Solve ``A x = b``; ``x0`` (optional) is a starting guess, e.g. the solution of a nearby
        system (a warm start).  The stopping rule does not depend on it: a warm start changes how many
        products the solve makes, not what it returns (to the tolerance).  ``enforce_error=False``
        reports the solution's estimated error (``info.error``) without holding the solve to it."""
        mon = _Monitor(self, A, b, groups, x0 if self.iterative else None)
        mon.enforce_error = bool(enforce_error)
        if mon.zero_rhs:
            return mon.zero()
        if mon.warm and bool((mon.res <= mon.tol).all()):  # the start already meets the tolerance
            x, info = mon.finish(0, verify=False)
        else:
            x, info = self._solve(mon)
        return self._iterate_on(mon, x, info)

    def _iterate_on(self, mon: "_Monitor", x: torch.Tensor, info: LinearSolveInfo) -> Tuple[torch.Tensor, LinearSolveInfo]:
        """A solution whose residual passed but whose estimated error did not ("inaccurate"): go on
        from it, to the residual that the error bound needs (``sigma_min * (atol + rtol ||x||) / 2``),
        while that residual lies above the rounding floor ``4 eps ||A|| ||x||`` of the working
        precision; otherwise the status stays ``"inaccurate"``."""
        rounds = 0
        base, why = info.message, mon.inaccurate
        while (info.status == "inaccurate" and self.iterative and mon.check_error and rounds < _ERROR_ROUNDS
               and info.matvecs < self.steps_limit):
            xn = _gnorm(x, mon.groups)
            allowed = mon.atol + mon.error_rtol * xn
            target = float((mon.sigma * allowed).min()) / 2
            floor = float((4 * mon.eps * mon.estimate * xn).max())
            if not (math.isfinite(target) and target > floor):
                why += (f"; the residual it needs ({target:.3g}) is below the rounding floor of "
                        f"{mon.b.dtype} ({floor:.3g})")
                break
            rounds += 1
            more = dataclasses.replace(self, rtol=0.0, atol=target, max_steps=self.steps_limit - info.matvecs)
            sub = _Monitor(more, mon.op, mon.b, mon.groups, x)
            sub.check_error = False
            sub.estimate = torch.maximum(sub.estimate, mon.estimate)
            y, sub_info = more._solve(sub) if not (sub.warm and bool((sub.res <= sub.tol).all())) \
                else sub.finish(0, verify=False)
            mon.matvecs += sub.matvecs
            mon.note_sigma(sub.sigma)
            mon.estimate = torch.maximum(mon.estimate, sub.estimate)
            if not sub_info.converged:
                why += f"; iterating on ended '{sub_info.status}' ({sub_info.message})"
                break
            mon.history.extend(sub_info.history)
            mon.best_x, mon.best_res = y, _gnorm(mon.b - mon(y), mon.groups)
            x, info = mon.finish(info.steps + sub_info.steps, verify=False)
            why = mon.inaccurate or why
        if info.status == "inaccurate":
            info.message = f"{why} [{base}]"
        elif rounds:
            info.message = f"{base} (iterated on {rounds} time{'s' if rounds > 1 else ''} to bound the error)"
        return x, info

    def _solve(self, mon: _Monitor) -> Tuple[torch.Tensor, LinearSolveInfo]:  # pragma: no cover
        raise NotImplementedError


def _finite(value: float) -> bool:
    return math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class _Chunked(LinearSolver):
    """A Krylov method that can also run compiled: ``compiled=True`` runs it in chunks of ``chunk``
    iterations, each chunk one program traced by ``torch.compile`` (``backend``, default inductor)
    with the operator's products inside.  Subclasses give the chunk (a pure function of tensors,
    ``_chunk_fn``) and its starting state; the driver (:meth:`_solve_compiled`) applies the stopping
    rule between chunks, as the eager method does."""

    compiled: bool = False
    chunk: Optional[int] = None
    backend: str = "inductor"

    #: the chunk: ``fn(product, k, state, active, threshold, *operands) -> (state, active, broke, top)``
    _chunk_fn: ClassVar[Callable]
    #: products per iteration
    _products: ClassVar[int] = 1
    #: iterations per chunk when ``chunk`` is None (about 5 products: as fast per product as longer
    #: chunks on the iMAML product, and the compilation time grows with the chunk's length)
    _default_chunk: ClassVar[int] = 5

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.compiled, bool):
            raise TypeError(f"compiled must be True or False, got {self.compiled!r}")
        _check_positive("chunk", self.chunk, integer=True, allow_none=True)
        if self.chunk is None:
            object.__setattr__(self, "chunk", type(self)._default_chunk)
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"backend must be the name of a torch.compile backend, got {self.backend!r}")

    def _chunk_start(self, mon) -> Tuple[torch.Tensor, ...]:  # pragma: no cover
        raise NotImplementedError

    def _eager_overrides(self) -> dict:
        return {}

    def _solve_compiled(self, mon):
        """The method in compiled chunks of ``chunk`` iterations: the products and the vector
        updates of a chunk run as one traced program, and the host sees the iterate only between
        chunks, where the stopping rule is applied as in the eager method (recurrence residuals
        against thresholds refreshed per block, the answer's residual re-measured with a true
        product).  A chunk stops moving at the first iteration whose recurrence residual meets the
        thresholds, so its extra iterations change nothing (their products are still made and
        counted).  A breakdown or a non-finite product in a chunk hands over to the eager method
        from the last iterate, which then reports it; so do an operator without a functional form
        and a failed compilation (said in ``info.message``)."""
        op, G = mon.op, mon.groups
        if op.functional is None or _collective.active():
            why = ("the operator has no functional form (LinearOperator(functional=...))"
                   if op.functional is None else "a solve sharded over ranks is not compiled")
            return self._eager_from(mon, mon.x0 if mon.warm else None, why)
        known = _UNAVAILABLE.get((type(self)._chunk_fn, self.backend))
        if known is not None:
            return self._eager_from(mon, mon.x0 if mon.warm else None, f"compiled linear solve unavailable ({known})")
        fn, operands = op.functional
        state = self._chunk_start(mon)
        threshold = mon.tolerance_for(state[0]).to(mon.b.device, mon.b.dtype)
        active = _gnorm(state[1], G).to(mon.b.device, mon.b.dtype) > threshold
        steps = 0
        while steps < self.steps_limit:
            k = min(self.chunk, self.steps_limit - steps)
            try:  # a short last chunk runs eagerly (no compilation for its length)
                new, nactive, broke, top = self._compiled(k == self.chunk, fn, k, state, active, threshold,
                                                          *operands)
            except _CompileUnavailable as err:  # the backend cannot compile: said once, then remembered
                why = _unavailable(err)
                return self._eager_from(mon, state[0] if steps or mon.warm else None, why, steps)
            except Exception as err:  # noqa: BLE001 - any tracing or compiler failure: run eagerly instead
                lines = [ln.strip() for ln in str(err).splitlines()
                         if ln.strip() and not ln.startswith(("Set TORCHDYNAMO", "For even more"))]
                said = " ... ".join(dict.fromkeys(lines[:1] + lines[-1:]))[:300]
                why = f"the compiled chunk failed ({type(err).__name__}: {said})"
                return self._eager_from(mon, state[0] if steps or mon.warm else None, why, steps)
            mon.matvecs += k * self._products
            if bool(broke.any()):  # the eager method redoes it from the last good iterate and reports
                return self._eager_from(mon, state[0] if steps or mon.warm else None,
                                        "a chunk met a breakdown or a non-finite product", steps)
            state = new
            steps += k
            mon.note_norm(top.to("cpu", torch.float64))
            if mon.accept(state[0], state[1]):
                break
            threshold = mon.tol.to(mon.b.device, mon.b.dtype)
            active = nactive & (mon.res > mon.tol).to(mon.b.device)

        def verify(v):  # the final check, compiled too (an eager product may need a graph built for it)
            try:
                return self._compiled(None, fn, v, *operands)
            except _CompileUnavailable as err:
                _unavailable(err)
                return op(v)
            except Exception:  # noqa: BLE001 - as in the chunks: fall back to the eager product
                return op(v)

        x, info = mon.finish(steps, product=verify)
        info.message += f" (compiled in chunks of {self.chunk}, backend {self.backend})"
        return x, info

    def _compiled(self, full_chunk: Optional[bool], *args):
        """A chunk (compiled if ``full_chunk``, else eager) or, for ``None``, one compiled product, on
        ``args``.  torch's compiler stack emits DeprecationWarnings of its own, which a
        warnings-as-errors filter would turn into a failed compilation: they are silenced here."""
        kind = _one_product if full_chunk is None else type(self)._chunk_fn
        return _compiled_call(kind, None if full_chunk is False else self.backend, *args)

    def _eager_from(self, mon, x0, why: str, steps: int = 0):
        """The eager method from ``x0`` (products counted together with the compiled ones)."""
        eager = dataclasses.replace(self, compiled=False, max_steps=max(1, self.steps_limit - mon.matvecs),
                                    **self._eager_overrides())
        x, info = eager.solve(mon.op, mon.b, groups=mon.groups, x0=x0)
        info.matvecs += mon.matvecs
        info.steps += steps
        info.message = f"{info.message} (ran eagerly: {why})"
        return x, info


def _unavailable(err: "_CompileUnavailable") -> str:
    """Why a compiled solve runs eagerly when its backend cannot compile; warned once (the call that
    found it out), later calls say it in ``info.message`` only."""
    why = f"compiled linear solve unavailable ({err.reason})"
    if err.first:
        warnings.warn(f"{why}: running eagerly", RuntimeWarning, stacklevel=5)
    return why


@dataclass(frozen=True, kw_only=True)
class CG(_Chunked):
    """Conjugate gradients, for symmetric positive definite operators only (potential games).

    Symmetry: CG is valid for symmetric operators only; an operator tagged non-symmetric, or one that
    fails the symmetry test, is solved by :class:`GMRES` instead (same tolerance and product budget),
    and ``info.message`` says so and why (``"(ran GMRES: ...)"``): e.g. the implicit system of a
    potential game with an active constraint, which is not symmetric.  ``check_symmetry``: ``None``
    (default) tests an operator whose symmetry is unknown by comparing :math:`u^\\top A v` with
    :math:`v^\\top A u` for random ``u, v`` (two extra products), and trusts one tagged symmetric;
    ``True`` tests even a tagged one; ``False`` never tests.  Non-positive curvature :math:`p^\\top A p \\le 0` stops it with status
    ``"breakdown"`` (the operator is not positive definite).

    ``compiled=True`` runs the iteration in chunks of ``chunk`` steps, each one program compiled by
    ``torch.compile`` (``backend``, default inductor) with the operator's products inside; it needs
    the operator's functional form (:class:`LinearOperator` ``functional``: dense matrices and the
    layer's Jacobians have one).  The same iterates and stopping rule as the eager method, up to
    ``chunk - 1`` extra (counted) products at the end; the first call pays the compilation.
    Whatever cannot be compiled runs eagerly instead, and ``info.message`` says so.
    """

    check_symmetry: Optional[bool] = None

    def __post_init__(self):
        super().__post_init__()
        if self.check_symmetry not in (None, True, False):
            raise ValueError(f"check_symmetry must be True, False or None, got {self.check_symmetry!r}")

    def _solve(self, mon):
        op, b = mon.op, mon.b
        if op.symmetric is False:
            return self._run_gmres(mon, "the operator is declared non-symmetric (not a potential game)")
        test = self.check_symmetry if self.check_symmetry is not None else op.symmetric is None
        if test:
            gen = torch.Generator(device=b.device).manual_seed(0)
            u = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
            v = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
            Av, Au = mon(v), mon(u)
            gap = abs(_dot(u, Av) - _dot(v, Au))
            scale = _norm(u) * _norm(Av) + _norm(v) * _norm(Au)
            limit = max(1e-6, 1e3 * mon.eps)
            if gap > limit * scale:
                return self._run_gmres(mon, f"the operator is not symmetric: u'Av - v'Au = {gap:.3g} (relative "
                                            f"{gap / scale:.3g}) for random u, v (not a potential game, or "
                                            f"constraints are active)")
        if self.compiled:
            return self._solve_compiled(mon)
        if mon.groups > 1:
            return self._solve_blocks(mon)
        x = mon.x0
        r = mon.r0.clone()
        p = r.clone()
        rs = _dot(r, r)
        steps = 0
        # The recurrence's residual norm (a dot product CG computes anyway) is compared with a threshold
        # refreshed every few iterations; ||x_k|| grows along CG, so an older threshold is the
        # stricter one.  Only then is the iterate checked in full (and kept as the best one); the
        # final answer's residual is always re-measured with a true product.
        threshold = mon.threshold(x)
        lanczos: List[Tuple[float, float]] = []  # (alpha, beta) of each iteration: CG's Lanczos tridiagonal
        while steps < self.steps_limit:
            Ap = mon(p, track=False)
            curv = _dot(p, Ap)
            if not _finite(curv):
                return mon.finish(steps, "non_finite", "a product returned NaN or inf")
            if curv <= 0:
                mon.accept(x, r)  # the last iterate competes for the best one
                return mon.finish(steps, "breakdown", f"non-positive curvature p'Ap = {curv:.3g}: the operator "
                                  "is not positive definite; use GMRES")
            mon.note_norm(curv / _dot(p, p))  # a Rayleigh quotient: a lower bound of ||A||
            alpha = rs / curv
            x = x + alpha * p
            r = r - alpha * Ap
            steps += 1
            rs_new = _dot(r, r)
            if not _finite(rs_new):
                return mon.finish(steps, "non_finite", "a product returned NaN or inf")
            if math.sqrt(rs_new) <= threshold or steps % _CG_CHECK == 0:
                if mon.accept(x, r):
                    break
                threshold = mon.threshold(x)
            else:
                mon.history.append(math.sqrt(rs_new))
            lanczos.append((alpha, rs_new / rs))
            p = r + (rs_new / rs) * p
            rs = rs_new
        else:  # the budget ran out between two full checks: the last iterate competes for the best one
            mon.accept(x, r)
        lanczos.append((alpha, 0.0)) if steps > len(lanczos) else None
        mon.note_sigma(_lanczos_smallest(lanczos))
        return mon.finish(steps)

    def _solve_blocks(self, mon):
        """CG on a stack of independent systems (``groups``): one product for all blocks per
        iteration, but each block with its own step lengths, so each converges at its own rate (a
        single recurrence over the stack would have to resolve the union of the blocks' spectra).
        A block that has met its tolerance stops moving."""
        G = mon.groups
        x = mon.x0
        r = mon.r0.clone()
        p = r.clone()

        def per(u, v):
            return (u.reshape(G, -1) * v.reshape(G, -1)).sum(1)

        def scaled(c, v):
            return (c.unsqueeze(1) * v.reshape(G, -1)).reshape(-1)

        rs = per(r, r)
        active = torch.ones(G, dtype=torch.bool, device=r.device)
        # as in the one-block CG: the recurrence's residuals against thresholds refreshed at every
        # full check (every _CG_CHECK iterations, or when every block's recurrence says it is done)
        threshold = mon.tolerance_for(x).to(r.device, r.dtype)
        steps = 0
        while steps < self.steps_limit:
            Ap = mon(p, track=False)
            curv = per(p, Ap)
            if not bool(torch.isfinite(curv).all()):
                return mon.finish(steps, "non_finite", "a product returned NaN or inf")
            bad = active & (curv <= 0)
            if bool(bad.any()):
                k = int(bad.nonzero()[0])
                mon.accept(x, r)
                return mon.finish(steps, "breakdown", f"non-positive curvature p'Ap = {float(curv[k]):.3g} in block "
                                  f"{k}: the operator is not positive definite; use GMRES")
            pp = per(p, p)
            mon.note_norm(torch.where(active & (pp > 0), curv / torch.where(pp > 0, pp, 1.0), 0.0))  # Rayleigh
            alpha = torch.where(active, rs / torch.where(active, curv, 1.0), 0.0)
            x = x + scaled(alpha, p)
            r = r - scaled(alpha, Ap)
            steps += 1
            rs_new = per(r, r)
            active = rs_new.sqrt() > threshold
            if not bool(active.any()) or steps % _CG_CHECK == 0:
                if mon.accept(x, r):
                    break
                threshold = mon.tol.to(r.device, r.dtype)
                active = (mon.res > mon.tol).to(r.device)
            beta = torch.where(active, rs_new / torch.where(active, rs, 1.0), 0.0)
            p = scaled(active.to(r.dtype), r + scaled(beta, p))
            rs = rs_new
        else:
            mon.accept(x, r)
        return mon.finish(steps)

    def _run_gmres(self, mon, why: str):
        """GMRES on the same system (same monitor: tolerance, products and best iterate carry over) for an
        operator CG cannot solve, with the reason in ``info.message``."""
        x, info = GMRES(rtol=self.rtol, atol=self.atol, max_steps=max(1, self.steps_limit - mon.matvecs))._solve(mon)
        info.message = f"{info.message} (ran GMRES: {why})"
        return x, info

    def _chunk_start(self, mon):
        return mon.x0, mon.r0.clone(), mon.r0.clone(), _group_sq(mon.r0, mon.groups).to(mon.b.dtype)

    def _eager_overrides(self):
        return {"check_symmetry": False}  # tested (or trusted) once already


def _lanczos_smallest(coefficients: List[Tuple[float, float]]) -> float:
    """The smallest eigenvalue of CG's Lanczos tridiagonal, from its step lengths ``alpha_j`` and
    ratios ``beta_j = ||r_{j+1}||^2 / ||r_j||^2``: an upper bound of the smallest eigenvalue of an
    SPD operator (``inf`` without coefficients)."""
    if not coefficients:
        return math.inf
    k = len(coefficients)
    T = torch.zeros((k, k), dtype=torch.float64)
    for j, (alpha, beta) in enumerate(coefficients):
        T[j, j] = 1.0 / alpha + (coefficients[j - 1][1] / coefficients[j - 1][0] if j else 0.0)
        if j + 1 < k:
            T[j, j + 1] = T[j + 1, j] = math.sqrt(max(beta, 0.0)) / alpha
    if not bool(torch.isfinite(T).all()):
        return math.inf
    return float(torch.linalg.eigvalsh(T)[0])


def _cg_chunk(fn, k: int, state, active, threshold, *operands):
    """``k`` iterations of per-block CG with products ``fn(v, *operands)``: a pure function of
    tensors, traced whole by ``torch.compile``.  ``state = (x, r, p, rs)``.  A block steps only while
    ``active`` (its residual above ``threshold``, positive finite curvature); ``broke`` marks the
    blocks that met non-positive or non-finite curvature, ``top`` the largest Rayleigh quotient (a
    lower bound of each block's ``||A||``)."""
    x, r, p, rs = state
    G = rs.shape[0]
    broke = torch.zeros_like(active)
    top = torch.zeros_like(rs)
    for _ in range(k):
        Ap = fn(p, *operands)
        pb, Apb = p.reshape(G, -1), Ap.reshape(G, -1)
        curv = (pb * Apb).sum(1)
        pp = (pb * pb).sum(1)
        good = torch.isfinite(curv) & (curv > 0)
        broke = broke | (active & ~good)
        move = active & good
        top = torch.maximum(top, torch.where(move, curv / torch.where(move, pp, 1.0), 0.0))
        alpha = torch.where(move, rs / torch.where(move, curv, 1.0), 0.0)
        x = x + (alpha.unsqueeze(1) * pb).reshape(-1)
        r = r - (alpha.unsqueeze(1) * Apb).reshape(-1)
        rb = r.reshape(G, -1)
        rs_new = torch.where(move, (rb * rb).sum(1), rs)
        beta = torch.where(move, rs_new / torch.where(move, rs, 1.0), 0.0)
        p = torch.where(move.unsqueeze(1), rb + beta.unsqueeze(1) * pb, pb).reshape(-1)
        rs = rs_new
        active = move & (rs_new.sqrt() > threshold)
    return (x, r, p, rs), active, broke, top


CG._chunk_fn = _cg_chunk


def _bicgstab_chunk(fn, k: int, state, active, threshold, *operands):
    """``k`` iterations of BiCGSTAB (one recurrence over the whole vector, as the eager method),
    products ``fn(v, *operands)``, traced whole by ``torch.compile``.  ``state = (x, r, r_hat, rho,
    alpha, omega, v, p)``.  It steps while some block is ``active``; ``broke`` is set (and it stops)
    at a breakdown or a non-finite value, which the eager method then handles (a restart, or the
    report); ``top`` bounds each block's ``||A||`` from below by ``||Ap|| / ||p||``."""
    x, r, r_hat, rho, alpha, omega, v, p = state
    G = active.shape[0]
    tiny = torch.finfo(x.dtype).tiny
    broke = torch.zeros((1,), dtype=torch.bool, device=x.device)
    top = torch.zeros_like(threshold)

    def ratio(w, u):
        uu = (u.reshape(G, -1) ** 2).sum(1)
        return torch.where(uu > 0, ((w.reshape(G, -1) ** 2).sum(1) / torch.where(uu > 0, uu, 1.0)).sqrt(), 0.0)

    for _ in range(k):
        go = active.any()
        rho_new = (r_hat * r).sum()
        ok = torch.isfinite(rho_new) & (rho_new.abs() > tiny) & (omega != 0)
        beta = (rho_new / torch.where(rho != 0, rho, 1.0)) * (alpha / torch.where(omega != 0, omega, 1.0))
        p_new = r + beta * (p - omega * v)
        v_new = fn(p_new, *operands)
        denom = (r_hat * v_new).sum()
        ok = ok & torch.isfinite(denom) & (denom.abs() > tiny)
        alpha_new = rho_new / torch.where(ok, denom, 1.0)
        s = r - alpha_new * v_new
        t = fn(s, *operands)
        tt = (t * t).sum()
        omega_new = torch.where(tt > 0, (t * s).sum() / torch.where(tt > 0, tt, 1.0), 0.0)
        x_new = x + alpha_new * p_new + omega_new * s
        r_new = s - omega_new * t
        ok = ok & torch.isfinite(x_new).all() & torch.isfinite(r_new).all()
        move = go & ok
        broke = broke | (go & ~ok)
        top = torch.maximum(top, torch.where(move, torch.maximum(ratio(v_new, p_new), ratio(t, s)), 0.0))
        x, r = torch.where(move, x_new, x), torch.where(move, r_new, r)
        p, v = torch.where(move, p_new, p), torch.where(move, v_new, v)
        rho = torch.where(move, rho_new, rho)
        alpha = torch.where(move, alpha_new, alpha)
        omega = torch.where(move, omega_new, omega)
        res = ((r.reshape(G, -1) ** 2).sum(1)).sqrt()
        active = torch.where(move, res > threshold, active)
    return (x, r, r_hat, rho, alpha, omega, v, p), active, broke, top


def _one_product(fn, v, *operands):
    return fn(v, *operands)


_COMPILED = {}

#: How many specialisations (product functions, shapes, dtypes, chunk lengths) one backend's compiled
#: chunk keeps before torch.compile gives up and runs it eagerly (its default, 8, is soon reached by a
#: session that differentiates several problems).
_RECOMPILE_LIMIT = 64


#: ``(fn, backend)`` pairs that cannot be compiled whatever they are called with (``torch.compile``
#: itself failed, or the backend's compiler did: e.g. no working C++ compiler), with the reason: later
#: calls run eagerly at once instead of paying for the failed compilation again.  A failure to trace
#: one operator's product is that operator's, and is not remembered.
_UNAVAILABLE = {}


class _CompileUnavailable(RuntimeError):
    """``fn`` cannot be compiled with this backend; ``first``: this call found it out."""

    def __init__(self, reason: str, first: bool):
        super().__init__(reason)
        self.reason, self.first = reason, first


def _failure_reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _backend_failures() -> tuple:
    failed = getattr(getattr(torch, "_dynamo", None), "exc", None)
    failed = getattr(failed, "BackendCompilerFailed", None)
    return (failed,) if isinstance(failed, type) else ()


def _give_up(key, err: BaseException) -> _CompileUnavailable:
    _UNAVAILABLE[key] = _failure_reason(err)
    _COMPILED.pop(key, None)
    return _CompileUnavailable(_UNAVAILABLE[key], True)


def _compiled_version(fn: Callable, backend: str):
    key = (fn, backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)
    return _COMPILED[key]


def _compiled_call(fn: Callable, backend: Optional[str], *args):
    """``fn(*args)``, traced whole by ``torch.compile`` with ``backend`` (static shapes; ``None``: run
    eagerly), with the recompile limit raised to :data:`_RECOMPILE_LIMIT`. torch's compiler stack
    emits DeprecationWarnings of its own, which a warnings-as-errors filter would turn into a failed
    compilation: they are silenced here.  A pair ``(fn, backend)`` that cannot compile at all raises
    :class:`_CompileUnavailable` (at once, from the second call on: see :data:`_UNAVAILABLE`)."""
    key = (fn, backend)
    if backend is not None and key in _UNAVAILABLE:
        raise _CompileUnavailable(_UNAVAILABLE[key], False)
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if backend is None:
            return fn(*args)
        try:
            compiled = _compiled_version(fn, backend)
        except Exception as err:  # noqa: BLE001 - torch.compile itself refuses: nothing will compile
            raise _give_up(key, err) from err
        try:
            return compiled(*args)
        except _backend_failures() as err:
            raise _give_up(key, err) from err


@dataclass(frozen=True, kw_only=True)
class GMRES(LinearSolver):
    """Restarted GMRES (Saad and Schultz 1986) for general non-singular operators.

    The Arnoldi basis is orthogonalised by classical Gram--Schmidt, a second time when the first pass
    cancels more than a factor :math:`1/\\sqrt 2` of the norm (the DGKS criterion);
    the small least-squares problem is updated with Givens rotations.  ``restart`` is the Krylov
    dimension before a restart; ``max_steps`` bounds the total number of products.  The true
    residual is measured at every restart and the best iterate is kept.
    """

    restart: int = 50
    #: the Krylov dimension a restart cycle reaches before the tolerance may stop it (at most the
    #: system's size): an error estimate needs the weak directions, which a small residual can hide
    min_steps: int = 0

    def __post_init__(self):
        super().__post_init__()
        _check_positive("restart", self.restart, integer=True)
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ValueError(f"min_steps must be a non-negative integer, got {self.min_steps!r}")

    def _solve(self, mon):
        if mon.groups > 1:
            return self._solve_blocks(mon)
        b = mon.b
        x = mon.x0
        r = mon.r0
        beta = _norm(r)
        steps = 0
        while steps < self.steps_limit:
            m = min(self.restart, self.steps_limit - steps)
            threshold = mon.threshold(x)
            V = torch.empty((m + 1, b.numel()), dtype=b.dtype, device=b.device)
            V[0] = r / beta
            H = [[0.0] * m for _ in range(m + 1)]
            cs, sn = [0.0] * m, [0.0] * m
            g = [beta] + [0.0] * m
            k = 0
            status = None
            single = mon.groups == 1
            for j in range(m):
                w = mon(V[j], track=not single)
                steps += 1
                basis = V[: j + 1]
                wn = _norm(w)
                h = _collective.allsum(basis @ w)
                w = w - h @ basis
                hn = _norm(w)
                if hn < _REORTH * wn:  # cancellation: a second pass restores orthogonality (DGKS criterion)
                    h2 = _collective.allsum(basis @ w)
                    w = w - h2 @ basis
                    h = h + h2
                    hn = _norm(w)
                col = h.tolist()
                if not (_finite(hn) and all(map(_finite, col))):
                    status = "non_finite"
                    break
                if single:  # ||A v_j|| from the orthogonal decomposition A v_j = V (h + h2) + w, ||v_j|| = 1
                    mon.note_norm(math.sqrt(sum(c * c for c in col) + hn * hn))
                for i in range(j):  # apply the earlier rotations to the new column
                    a, c = col[i], col[i + 1]
                    col[i], col[i + 1] = cs[i] * a + sn[i] * c, -sn[i] * a + cs[i] * c
                denom = math.hypot(col[j], hn)
                if denom == 0:  # A v_j lies in the span of v_0..v_{j-1} with a zero pivot: singular
                    status = "breakdown"
                    break
                cs[j], sn[j] = col[j] / denom, hn / denom
                col[j] = denom
                g[j + 1] = -sn[j] * g[j]
                g[j] = cs[j] * g[j]
                for i in range(j + 1):
                    H[i][j] = col[i]
                k = j + 1
                mon.history.append(abs(g[j + 1]))
                # min_steps holds a converged cycle only while the new direction is not rounding noise
                if hn == 0 or (abs(g[j + 1]) <= threshold and (j + 1 >= self.min_steps or hn <= 1e3 * mon.eps * wn)):
                    break
                V[j + 1] = w / hn
            if k:
                Hk = torch.tensor([row[:k] for row in H[:k]], dtype=torch.float64)
                mon.note_sigma(float(torch.linalg.svdvals(Hk).min()))  # sigma_min of the Hessenberg (its R)
                gk = torch.tensor(g[:k], dtype=torch.float64).unsqueeze(1)
                y = torch.linalg.solve_triangular(Hk, gk, upper=True).squeeze(1).to(b.dtype).to(b.device)
                x = x + y @ V[:k]
                r = b - mon(x)  # the true residual, not the recurrence's estimate
                if mon.accept(x, r):
                    break
                beta = _norm(r)
                if not _finite(beta):
                    status = "non_finite"
            if status is not None or k == 0:
                message = {"non_finite": "a product returned NaN or inf",
                           "breakdown": "GMRES broke down (a zero pivot in the Arnoldi process): the operator "
                                        "is singular on the Krylov space"}.get(status, "no progress")
                return mon.finish(steps, status or "breakdown", message)
        return mon.finish(steps, verify=False)

    def _solve_blocks(self, mon):
        """GMRES on a stack of independent systems (``groups``): one Arnoldi process per block, run
        side by side (one product for all blocks per step, the orthogonalisation and the Givens
        rotations batched over blocks), so each block's Krylov space is its own and each converges at
        its own rate.  A block whose Arnoldi process ends exactly (a zero new direction: its solution
        lies in the space already built) keeps its solution from that space."""
        b, G = mon.b, mon.groups
        n = b.numel() // G
        opts = {"dtype": b.dtype, "device": b.device}
        x, r = mon.x0, mon.r0
        steps = 0
        while steps < self.steps_limit:
            m = min(self.restart, self.steps_limit - steps)
            tol = mon.tolerance_for(x).to(b.device, b.dtype)
            beta = r.reshape(G, n).norm(dim=1)
            if not bool(torch.isfinite(beta).all()):
                return mon.finish(steps, "non_finite", "a product returned NaN or inf")
            live = beta > 0
            V = torch.zeros((m + 1, G, n), **opts)
            V[0] = r.reshape(G, n) / torch.where(live, beta, 1.0).unsqueeze(1)
            H = torch.zeros((G, m, m), **opts)
            cs, sn = torch.zeros((G, m), **opts), torch.zeros((G, m), **opts)
            g = torch.zeros((G, m + 1), **opts)
            g[:, 0] = beta
            size = torch.zeros(G, dtype=torch.long, device=b.device)  # each block's Krylov dimension
            mon._update_estimate()
            pad = mon.estimate.clamp_min(1.0).to(b.device, b.dtype)
            k = 0
            for j in range(m):
                w = mon(V[j].reshape(-1)).reshape(G, n)
                wn0 = w.norm(dim=1)
                steps += 1
                basis = V[: j + 1]
                h = torch.einsum("jgn,gn->gj", basis, w)
                w = w - torch.einsum("gj,jgn->gn", h, basis)
                h2 = torch.einsum("jgn,gn->gj", basis, w)  # second pass: the basis stays orthogonal
                w = w - torch.einsum("gj,jgn->gn", h2, basis)
                col = h + h2
                hn = w.norm(dim=1)
                if not (bool(torch.isfinite(hn).all()) and bool(torch.isfinite(col).all())):
                    return mon.finish(steps, "non_finite", "a product returned NaN or inf")
                for i in range(j):  # the earlier rotations, every block at once
                    a, c = col[:, i].clone(), col[:, i + 1].clone()
                    col[:, i], col[:, i + 1] = cs[:, i] * a + sn[:, i] * c, -sn[:, i] * a + cs[:, i] * c
                denom = torch.hypot(col[:, j], hn)
                grow = live & (denom > 0)
                safe = torch.where(grow, denom, 1.0)
                cs[:, j] = torch.where(grow, col[:, j] / safe, 1.0)
                sn[:, j] = torch.where(grow, hn / safe, 0.0)
                # a finished block gets a pivot of the size of ||A|| (y_j = 0), which leaves its smallest
                # singular value (the error estimate's sigma_min) that of its own Krylov space
                col[:, j] = torch.where(grow, denom, pad)
                g[:, j + 1] = torch.where(grow, -sn[:, j] * g[:, j], 0.0)
                g[:, j] = torch.where(grow, cs[:, j] * g[:, j], 0.0)
                H[:, : j + 1, j] = col
                size = torch.where(grow, j + 1, size)
                k = j + 1
                est = g[:, j + 1].abs()
                mon.history.append(float(est.norm()))
                live = grow & (hn > 0) & ((est > tol) | ((j + 1 < self.min_steps) & (hn > 1e3 * mon.eps * wn0)))
                if not bool(live.any()):
                    break
                V[j + 1] = w / torch.where(live, hn, 1.0).unsqueeze(1) * live.unsqueeze(1)
            if bool((size == 0).all()):
                return mon.finish(steps, "breakdown", "GMRES broke down (a zero pivot in the Arnoldi process): "
                                  "the operator is singular on the Krylov space")
            y = torch.linalg.solve_triangular(H[:, :k, :k], g[:, :k].unsqueeze(2), upper=True).squeeze(2)
            mon.note_sigma(torch.linalg.svdvals(H[:, :k, :k].to(torch.float64)).min(dim=1).values)
            x = x + torch.einsum("gk,kgn->gn", y, V[:k]).reshape(-1)
            r = b - mon(x)  # the true residual, not the recurrences' estimates
            if mon.accept(x, r):
                break
        return mon.finish(steps, verify=False)


@dataclass(frozen=True, kw_only=True)
class BiCGSTAB(_Chunked):
    """Stabilised bi-conjugate gradients (van der Vorst 1992) for non-symmetric operators.

    Two products per iteration, short recurrences (constant memory).  A breakdown (a zero
    :math:`\\hat r^\\top r`, :math:`\\hat r^\\top A p` or stabilisation step) restarts once from the
    current iterate with a fresh shadow residual; a second breakdown without progress ends the solve
    with status ``"breakdown"`` (skew-symmetric operators, such as a purely bilinear game, break it:
    use GMRES there).

    ``compiled=True`` runs it in compiled chunks, as :class:`CG` does (two products per iteration);
    a breakdown inside a chunk hands over to the eager method, which restarts or reports it.
    """

    _products = 2
    _default_chunk = 3

    def _chunk_start(self, mon):
        one = torch.ones((), dtype=mon.b.dtype, device=mon.b.device)
        zero = torch.zeros_like(mon.b)
        return mon.x0, mon.r0.clone(), mon.r0.clone(), one, one.clone(), one.clone(), zero, zero.clone()

    def _solve(self, mon):
        if self.compiled:
            return self._solve_compiled(mon)
        b = mon.b
        x = mon.x0
        r = mon.r0.clone()
        steps = 0
        restarts_without_progress = 0

        def fresh():
            return r.clone(), 1.0, 1.0, 1.0, torch.zeros_like(b), torch.zeros_like(b)

        r_hat, rho, alpha, omega, v, p = fresh()
        tiny = torch.finfo(b.dtype).tiny
        # as in CG: the recurrence's residual norms against a threshold refreshed at every full check
        # (every _CG_CHECK iterations, or when a norm says it may be done)
        threshold = mon.threshold(x)
        while steps < self.steps_limit:
            rho_new = _dot(r_hat, r)
            if not _finite(rho_new):
                return mon.finish(steps, "non_finite", "a product returned NaN or inf")
            broke = None
            if abs(rho_new) <= tiny or omega == 0:
                broke = "r_hat'r = 0 or a zero stabilisation step"
            else:
                beta = (rho_new / rho) * (alpha / omega)
                p = r + beta * (p - omega * v)
                v = mon(p)
                denom = _dot(r_hat, v)
                if not _finite(denom):
                    return mon.finish(steps, "non_finite", "a product returned NaN or inf")
                if abs(denom) <= tiny:
                    broke = "r_hat'Ap = 0: the operator may be skew-symmetric or indefinite"
            if broke is not None:
                restarts_without_progress += 1
                if restarts_without_progress > 1:
                    return mon.finish(steps, "breakdown", f"BiCGSTAB broke down ({broke}) twice without "
                                      "progress; use GMRES")
                r_hat, rho, alpha, omega, v, p = fresh()
                continue
            alpha = rho_new / denom
            s = r - alpha * v
            steps += 1
            if _norm(s) <= threshold and mon.accept(x + alpha * p, s):
                x = x + alpha * p
                break
            t = mon(s)
            tt = _dot(t, t)
            omega = _dot(t, s) / tt if tt > 0 else 0.0
            x = x + alpha * p + omega * s
            r = s - omega * t
            rho = rho_new
            rn = _norm(r)
            if not _finite(rn):
                mon.accept(x, r)
                return mon.finish(steps, "non_finite", "a product returned NaN or inf")
            if rn <= threshold or steps % _CG_CHECK == 0:
                if mon.accept(x, r):
                    break
                threshold = mon.threshold(x)
            else:
                mon.history.append(rn)
            restarts_without_progress = 0 if omega != 0 else restarts_without_progress
        else:  # the budget ran out between two full checks: the last iterate competes for the best one
            mon.accept(x, r)
        return mon.finish(steps)


BiCGSTAB._chunk_fn = _bicgstab_chunk


@dataclass(frozen=True, kw_only=True)
class NormalCG(LinearSolver):
    """CG on the normal equations :math:`A^\\top A x = A^\\top b` (CGNR).

    Valid for any non-singular operator, but squares its condition number (JAXopt's default
    linear solver has this weakness); needs the transpose product (``rmatvec``).
    """

    def _solve(self, mon):
        b = mon.b
        opT = mon.op.T
        x = mon.x0
        r = mon.r0.clone()

        def transposed(u):
            mon.matvecs += 1
            return opT(u)

        z = transposed(r)
        p = z.clone()
        zz = _dot(z, z)
        steps = 0
        while steps < self.steps_limit:
            if zz == 0:
                return mon.finish(steps, "singular", "A^T r = 0 with r != 0: b is not in the range of A")
            w = mon(p)
            ww = _dot(w, w)
            if not (_finite(ww) and _finite(zz)):
                return mon.finish(steps, "non_finite", "a product returned NaN or inf")
            if ww == 0:
                return mon.finish(steps, "singular", "A p = 0 for a non-zero p: the operator is singular")
            alpha = zz / ww
            x = x + alpha * p
            r = r - alpha * w
            steps += 1
            if mon.accept(x, r):
                break
            z = transposed(r)
            zz_new = _dot(z, z)
            p = z + (zz_new / zz) * p
            zz = zz_new
        return mon.finish(steps)


@dataclass(frozen=True, kw_only=True)
class Neumann(LinearSolver):
    """Truncated Neumann series / Richardson iteration :math:`x_{k+1} = x_k + \\eta (b - A x_k)`.

    Converges when the spectral radius of :math:`I - \\eta A` is below one (for a μ-strongly
    monotone, L-Lipschitz operator: :math:`\\eta < 2\\mu/L^2`).  Stops early with status
    ``"diverged"`` when the residual grows a million-fold.
    """

    step_size: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _check_positive("step_size", self.step_size)

    def _solve(self, mon):
        b = mon.b
        x = mon.x0
        r = mon.r0.clone()
        bnorm = float(mon.bnorm.norm())
        steps = 0
        while steps < self.steps_limit:
            x = x + self.step_size * r
            r = b - mon(x)
            steps += 1
            if mon.accept(x, r):
                break
            res = mon.history[-1]
            if not _finite(res) or res > 1e6 * bnorm:
                return mon.finish(steps, "diverged", "diverged: the spectral radius of I - step_size * A is at "
                                  "least one")
        return mon.finish(steps, verify=False)


@dataclass(frozen=True, kw_only=True)
class Dense(LinearSolver):
    """Materialise the matrix (one product per column, batched with ``vmap``) and solve with LU.

    Exact up to rounding; for tests and small problems (memory :math:`n^2`).  ``rtol``/``atol``
    only decide whether the measured residual counts as converged; a direct solve has no
    ``max_steps`` (setting it is an error).  A singular matrix gives status ``"singular"``.
    """

    iterative = False

    def __post_init__(self):
        super().__post_init__()
        if self.max_steps is not None:
            raise ValueError("Dense is a direct solve and takes no max_steps")

    def _solve(self, mon):
        if _collective.active():
            raise ValueError("Dense materialises the operator on one process and cannot be used with players "
                             "sharded over ranks; use GMRES or BiCGSTAB")
        b = mon.b
        n = b.numel() // mon.groups
        eye = torch.eye(n, dtype=b.dtype, device=b.device)
        # column j of block g: A applied to e_j placed in every block at once (the blocks are independent)
        basis = eye.repeat(1, mon.groups)
        try:
            rows = torch.func.vmap(mon.op)(basis)
        except (RuntimeError, ValueError, NotImplementedError):
            rows = torch.stack([mon.op(e) for e in basis])
        mon.matvecs += n
        blocks = rows.reshape(n, mon.groups, n).permute(1, 2, 0)  # (groups, n, n): A_g
        if not bool(torch.isfinite(blocks).all()):
            return mon.finish(1, "non_finite", "the materialised matrix contains NaN or inf", verify=False)
        try:
            x = torch.linalg.solve(blocks, b.reshape(mon.groups, n)).reshape(-1)
        except torch.linalg.LinAlgError as err:
            return mon.finish(1, "singular", f"LU failed: {str(err).splitlines()[0]}", verify=False)
        mon.note_sigma(torch.linalg.svdvals(blocks.to(torch.float64)).min(dim=1).values)
        for k in range(n):  # the norm estimate: the columns' norms (exact lower bounds of ||A||)
            mon._pairs.append(torch.stack([torch.ones(mon.groups, dtype=torch.float64, device=b.device),
                                           _group_sq(rows[k], mon.groups)]))
        r = b - mon(x)
        if mon.accept(x, r):
            return mon.finish(1, verify=False)
        status = "non_finite" if not bool(torch.isfinite(x).all()) else "max_steps"
        return mon.finish(1, status, "residual above tolerance (ill-conditioned)", verify=False)


@dataclass(frozen=True, kw_only=True)
class Refined(LinearSolver):
    """Mixed-precision iterative refinement: the products in a lower precision, the answer in the
    working one.

    Each round solves for a correction in ``precision`` with ``solver`` (to that precision's default
    tolerance, or ``solver.rtol``), then measures the true residual :math:`b - Ax` with one product in
    the working precision.  The stopping rule is the working precision's (``rtol``, ``atol`` as for
    every solver), so the answer meets the same tolerance as a solve in the working precision; what
    changes is the cost of the products (about half for a memory-bound product in float32 rather
    than float64).  Each round asks its solver for the reduction still needed, and stops it at the
    lower precision's floor, the backward-stable rule with ``solver.rtol`` (default
    :math:`10\\varepsilon_{\\text{low}}`, about ``1e-6`` in float32): a round gains about five digits
    in float32 while :math:`\\kappa(A)\\,\\varepsilon_{\\text{low}} \\ll 1`.  A round that does not halve every block's
    residual (the condition number is too large for ``precision``) ends the refinement, and the
    solve finishes in the working precision from where it got (stated in ``info.message``); so does
    an operator with no lower-precision form (:meth:`LinearOperator.lowered`: a dense matrix and the
    layer's Jacobians have one).  ``max_steps`` bounds the products of both precisions together.

    Args:
        solver: the Krylov method of each round (default :class:`GMRES`; :class:`CG` for symmetric
            positive definite operators).
        precision: the dtype of the products (default ``torch.float32``).
    """

    solver: LinearSolver = field(default_factory=lambda: GMRES())
    precision: torch.dtype = torch.float32

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.solver, LinearSolver) or isinstance(self.solver, (Refined, Dense)):
            raise TypeError(f"Refined.solver must be an iterative LinearSolver (CG, GMRES, ...), got "
                            f"{type(self.solver).__name__}")
        if not (isinstance(self.precision, torch.dtype) and self.precision.is_floating_point):
            raise ValueError(f"Refined.precision must be a floating dtype, got {self.precision!r}")
        if self.precision in (torch.float16, torch.bfloat16):
            raise ValueError(f"Refined.precision is {self.precision}: half precision cannot meet the linear "
                             f"solver's tolerances (eps = {torch.finfo(self.precision).eps:.3g}): use float32")

    def _solve(self, mon):
        b, groups = mon.b, mon.groups
        low = None
        if torch.finfo(self.precision).eps > mon.eps:
            low = mon.op.lowered(self.precision)
        x, r = mon.x0, mon.r0
        rounds, spent = 0, 0
        swapped = ""
        note = "the operator has no lower-precision form"
        if low is not None:
            low = LinearOperator(low.matvec, low.rmatvec, mon.op.symmetric, functional=low.functional)
            floor = 10 * torch.finfo(self.precision).eps if self.solver.rtol is None else self.solver.rtol
            inner = dataclasses.replace(self.solver, rtol=floor)
            last = mon.res
            while mon.matvecs + spent < self.steps_limit:
                scale = mon.res.clamp_min(torch.finfo(torch.float64).tiny).to(b.device, b.dtype)
                rows = r.reshape(groups, -1) / scale.unsqueeze(1)
                # Every block of the scaled residual has norm 1: atol asks each round for the reduction
                # still needed (with a margin), the backward-stable rtol stops it at the low precision's
                # floor, whichever comes first.
                needed = float((mon.tol / mon.res.clamp_min(1e-300)).min())
                budget = min(self.steps_limit - mon.matvecs - spent, inner.steps_limit)
                d, info = dataclasses.replace(inner, atol=min(0.3 * needed, 0.25), max_steps=max(1, budget)).solve(
                    low, rows.reshape(-1).to(self.precision), groups=groups)
                spent += info.matvecs
                rounds += 1
                if groups == 1:  # ||A_low|| estimates ||A|| to the lower precision: a better A-hat
                    mon.note_norm(info.norm_estimate)
                if isinstance(inner, CG):  # one symmetry test is enough for the whole refinement
                    if "(ran GMRES:" in info.message:  # not symmetric: GMRES for every round
                        swapped = " " + info.message[info.message.index("(ran GMRES:"):]
                        inner = GMRES(rtol=inner.rtol, atol=inner.atol, max_steps=inner.max_steps)
                    else:
                        inner = dataclasses.replace(inner, check_symmetry=False)
                if not bool(torch.isfinite(d).all()):
                    note = f"round {rounds} in {self.precision} returned NaN or inf"
                    break
                x = x + (d.to(b.dtype).reshape(groups, -1) * scale.unsqueeze(1)).reshape(-1)
                r = b - mon(x)
                if mon.accept(x, r):
                    mon.matvecs += spent
                    x, out = mon.finish(rounds, verify=False)
                    out.message += (f" ({rounds} rounds of mixed-precision refinement: {spent} products in "
                                    f"{self.precision}, {out.matvecs - spent} in {b.dtype}){swapped}")
                    return x, out
                if not bool((mon.res <= 0.5 * last).all()):
                    note = (f"round {rounds} did not halve the residual (condition number too large for "
                            f"{self.precision}?)")
                    break
                last = mon.res
            else:
                note = f"the product budget ran out after {rounds} rounds"
            x = mon.best_x
        # the rest in the working precision, from the best point so far
        mon.matvecs += spent
        if mon.matvecs >= self.steps_limit:
            return mon.finish(rounds, "max_steps", note, verify=False)
        full = dataclasses.replace(self.solver, rtol=mon.rtol, atol=mon.atol,
                                   max_steps=self.steps_limit - mon.matvecs)
        y, info = full.solve(mon.op, b, groups=groups, x0=x if bool(x.any()) else None)
        info.matvecs += mon.matvecs
        info.message = f"{info.message} ({note}; finished in {b.dtype})"
        info.steps += rounds
        return y, info
