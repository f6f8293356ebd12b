r"""Strategy sets :math:`\Omega_i` and their Euclidean projections.

A set is applied to every leaf of a strategy pytree.  ``batch_dims`` leading dimensions (the player
dimension for games, none for a plain variational inequality) index independent copies of the set:
in a game every player projects onto its own :math:`\Omega_i`.

The projections are written with differentiable torch operations, so the derivative of the
fixed-point map :math:`z \mapsto \Pi_\Omega(z - F(z;\theta))` used by the implicit backward
(:mod:`implicit_nash.implicit`) is the Jacobian of the projection wherever it is differentiable,
which covers active constraints with strict complementarity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

Bound = Union[float, torch.Tensor]

__all__ = ["StrategySet", "Reals", "Box", "NonNegative", "Ball", "Simplex"]


class StrategySet:
    """Base class: a closed convex set with a Euclidean projection."""

    #: True only for the whole space; the implicit backward then differentiates ``F`` directly.
    unconstrained: bool = False

    def project(self, x: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class Reals(StrategySet):
    """The whole space :math:`\\mathbb{R}^d` (no constraint)."""

    unconstrained = True

    def project(self, x: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        return x


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
        lo, up = torch.as_tensor(self.lower, dtype=torch.float64), torch.as_tensor(self.upper, dtype=torch.float64)
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

    radius: float
    center: Optional[Bound] = None

    def __post_init__(self):
        if not (isinstance(self.radius, (int, float)) and math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"Ball radius must be a positive finite number, got {self.radius!r}")

    def project(self, x: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        c = torch.zeros((), dtype=x.dtype, device=x.device) if self.center is None else _as_bound(self.center, x)
        d = x - c
        dims = tuple(range(batch_dims, x.dim()))
        norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True) if dims else d.abs()
        # clamp_min keeps the untaken branch finite at x = c, so autograd never sees 0/0.
        scaled = d * (self.radius / norm.clamp_min(torch.finfo(x.dtype).tiny))
        return c + torch.where(norm > self.radius, scaled, d)


@dataclass(frozen=True)
class Simplex(StrategySet):
    """The probability simplex :math:`\\{x \\ge 0, \\sum_j x_j = s\\}` along the last dimension.

    The projection sorts the entries and shifts them by the threshold :math:`\\tau` that makes the
    positive part sum to ``s`` (Held, Wolfe and Crowder 1974; Duchi et al. 2008).

    Args:
        total: the sum ``s`` (default 1).
    """

    total: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.total) and self.total > 0):
            raise ValueError(f"Simplex total must be a positive finite number, got {self.total!r}")

    def project(self, x: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        if x.dim() <= batch_dims:
            raise ValueError("Simplex projects along the last dimension; each leaf needs one beyond "
                             "the player dimension")
        n = x.shape[-1]
        u, _ = torch.sort(x, dim=-1, descending=True)
        css = u.cumsum(dim=-1) - self.total
        k = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
        # The condition u_k - css_k / k > 0 holds for a prefix of the sorted entries; its length is
        # the support size rho of the projection.
        rho = (u - css / k > 0).sum(dim=-1, keepdim=True)
        tau = css.gather(-1, rho - 1) / rho.to(x.dtype)
        return torch.clamp(x - tau, min=0)
