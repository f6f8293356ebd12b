r"""Strategy sets :math:`\Omega_i` and their Euclidean projections.

A set is applied to every leaf of a strategy pytree.  ``batch_dims`` leading dimensions (the player
dimension for games, none for a plain variational inequality) index independent copies of the set:
in a game every player projects onto its own :math:`\Omega_i`.

The projections are written with differentiable torch operations, so the derivative of the
fixed-point map :math:`z \mapsto \Pi_\Omega(z - F(z;\theta))` used by the implicit backward
(:mod:`implicit_nash.implicit`) is the Jacobian of the projection wherever it is differentiable,
which covers active constraints with strict complementarity.

Set parameters (a Box's bounds, a Ball's centre and radius, a Simplex's total) may be tensors that
require grad: :meth:`StrategySet.parameters` lists them, the layer passes them to the implicit
backward beside ``theta``, and they receive their gradients (the solution moves with them).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch

from ._compat import functorch_active

Bound = Union[float, torch.Tensor]

__all__ = ["StrategySet", "Reals", "Box", "NonNegative", "Ball", "Simplex"]


class StrategySet:
    """Base class: a closed convex set with a Euclidean projection."""

    #: True only for the whole space; the implicit backward then differentiates ``F`` directly.
    unconstrained: bool = False

    def project(self, x: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def parameters(self) -> Dict[str, torch.Tensor]:
        """The floating-point tensors that define the set (its fields or attributes), by name.

        The layer differentiates the solution with respect to each of them.  A user-defined set
        that keeps tensors elsewhere (inside a list, say) must override this and
        :meth:`with_parameters`.
        """
        names = [f.name for f in dataclasses.fields(self)] if dataclasses.is_dataclass(self) else list(vars(self))
        found = {}
        for name in names:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                found[name] = value
        return found

    def with_parameters(self, values: Dict[str, torch.Tensor]) -> "StrategySet":
        """A copy of the set with the named tensors replaced (no validation: they may be traced)."""
        new = copy.copy(self)
        for name, value in values.items():
            object.__setattr__(new, name, value)
        return new


@dataclass(frozen=True)
class Reals(StrategySet):
    """The whole space :math:`\\mathbb{R}^d` (no constraint)."""

    unconstrained = True

    def project(self, x: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        return x


def _traced(*values) -> bool:
    """Whether a value is being transformed by torch.func (its entries cannot be inspected; a bad
    value then shows as a non-finite projection, which the solvers report as a failure)."""
    return any(isinstance(v, torch.Tensor) for v in values) and functorch_active()


def _as_bound(value: Bound, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


@dataclass(frozen=True, eq=False)
class Box(StrategySet):
    """The box :math:`\\{x : \\text{lower} \\le x \\le \\text{upper}\\}` (elementwise).

    Args:
        lower, upper: floats or tensors broadcastable to each leaf (including its player
            dimension); ``-inf``/``inf`` leave a side open.
    """

    lower: Bound
    upper: Bound

    def __post_init__(self):
        if _traced(self.lower, self.upper):
            return
        lo, up = (torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, dtype=torch.float64)
                  for v in (self.lower, self.upper))
        if torch.isnan(lo).any() or torch.isnan(up).any():
            raise ValueError("Box bounds contain NaN")
        if (lo > up).any():
            raise ValueError("Box needs lower <= upper everywhere")

    def project(self, x: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        return torch.clamp(x, _as_bound(self.lower, x), _as_bound(self.upper, x))


@dataclass(frozen=True)
class NonNegative(StrategySet):
    """The non-negative orthant :math:`\\{x : x \\ge 0\\}`."""

    def project(self, x: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        return torch.clamp(x, min=0)


@dataclass(frozen=True, eq=False)
class Ball(StrategySet):
    """The Euclidean ball :math:`\\{x : \\|x - c\\|_2 \\le r\\}` of each player (per leaf).

    Args:
        radius: positive radius ``r``.
        center: optional center ``c`` broadcastable to a leaf (default 0).
    """

    radius: Bound
    center: Optional[Bound] = None

    def __post_init__(self):
        if _traced(self.radius, self.center):
            return
        r = torch.as_tensor(self.radius.detach() if isinstance(self.radius, torch.Tensor) else self.radius,
                            dtype=torch.float64)
        if isinstance(self.radius, bool) or r.numel() != 1 or not bool(torch.isfinite(r).all()) or not bool((r > 0).all()):
            raise ValueError(f"Ball radius must be a positive finite number, got {self.radius!r}")
        if self.center is not None:
            c = self.center.detach() if isinstance(self.center, torch.Tensor) else torch.as_tensor(self.center)
            if not bool(torch.isfinite(torch.as_tensor(c, dtype=torch.float64)).all()):
                raise ValueError("Ball center contains NaN or inf")

    def project(self, x: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        c = torch.zeros((), dtype=x.dtype, device=x.device) if self.center is None else _as_bound(self.center, x)
        radius = _as_bound(self.radius, x)
        d = x - c
        dims = tuple(range(batch_dims, x.dim()))
        norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True) if dims else d.abs()
        # clamp_min keeps the untaken branch finite at x = c, so autograd never sees 0/0.
        scaled = d * (radius / norm.clamp_min(torch.finfo(x.dtype).tiny))
        return c + torch.where(norm > radius, scaled, d)


@dataclass(frozen=True)
class Simplex(StrategySet):
    """The probability simplex :math:`\\{x \\ge 0, \\sum_j x_j = s\\}` along the last dimension.

    The projection sorts the entries and shifts them by the threshold :math:`\\tau` that makes the
    positive part sum to ``s`` (Held, Wolfe and Crowder 1974; Duchi et al. 2008).

    Args:
        total: the sum ``s`` (default 1).
    """

    total: Bound = 1.0

    def __post_init__(self):
        if _traced(self.total):
            return
        t = torch.as_tensor(self.total.detach() if isinstance(self.total, torch.Tensor) else self.total,
                            dtype=torch.float64)
        if t.numel() != 1 or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
            raise ValueError(f"Simplex total must be a positive finite number, got {self.total!r}")

    def project(self, x: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        if x.dim() <= batch_dims:
            raise ValueError("Simplex projects along the last dimension; each leaf needs one beyond "
                             "the player dimension")
        n = x.shape[-1]
        u, _ = torch.sort(x, dim=-1, descending=True)
        css = u.cumsum(dim=-1) - _as_bound(self.total, x)
        k = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
        # The condition u_k - css_k / k > 0 holds for a prefix of the sorted entries; its length is
        # the support size rho of the projection (at least 1 for finite input; the clamp keeps a
        # NaN input a NaN output instead of an index error).
        rho = (u - css / k > 0).sum(dim=-1, keepdim=True).clamp_min(1)
        tau = css.gather(-1, rho - 1) / rho.to(x.dtype)
        return torch.clamp(x - tau, min=0)
