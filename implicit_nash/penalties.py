r"""Penalties that couple the inner problems of meta-learning into a game (Section 3.3 of the paper).

A player's cost is its task loss plus a penalty (eq. 12),
:math:`f_i = \mathcal{L}(\phi_i; \mathcal{D}_i^{tr}) + p(\theta, \phi_i, \phi_{-i})`.  Every penalty
here depends on the other players only through an *aggregate* :math:`s = \sum_k a(\phi_k, \theta)`,
so it is described by two functions:

* ``contribution(phi_i, anchor)``: player ``i``'s share :math:`a(\phi_i)` of the aggregate
  (not called when the penalty's ``coupled`` is ``False``, as for the proximal one, whose ``s`` is
  then ``None``);
* ``value(phi_i, anchor, s, num_players)``: :math:`p` for player ``i`` given the full sum ``s``
  (which includes player ``i``'s own share).

:class:`~implicit_nash.AggregativeGame` turns these into a pseudo-gradient in :math:`O(B)` work.
``anchor`` is the point the penalty pulls towards: the meta-parameter :math:`\theta` for MAML-type
algorithms, and the initial context :math:`\phi_0` for CAVIA, whose meta-parameters are network
weights that are not adapted (Appendix E: "set :math:`\theta = \phi_0` for CAVIA").  ``phi_i`` and
``anchor`` are pytrees (dicts of tensors) of the same structure; distances are Euclidean norms over
all leaves together.

Writing your own penalty: subclass :class:`Penalty`, implement ``contribution`` and ``value`` with
torch operations (they are vmapped over players and differentiated twice), and set ``symmetric`` to
whether the game it makes is a potential game.  Penalties add with ``+``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch

from . import _collective
from ._compat import tree_leaves, tree_map

__all__ = ["Penalty", "CentroidPenalty", "RobustPenalty", "ProximalPenalty", "SumPenalty",
           "centroid_penalty", "robust_penalty", "proximal_penalty"]


def _sq_distance(a: Any, b: Any) -> torch.Tensor:
    """Squared Euclidean distance between two pytrees of the same structure, over all leaves."""
    return sum(((x - y) ** 2).sum() for x, y in zip(tree_leaves(a), tree_leaves(b)))


def _pow(q: torch.Tensor, e: float) -> torch.Tensor:
    """``q ** e`` for ``q >= 0`` and ``e > 0`` whose derivatives are finite at ``q = 0``.

    An integer exponent uses an integer power. For a fractional one, autograd's ``e q^(e-1)`` is
    infinite at 0 when ``e < 1`` and multiplies ``dq = 2 (phi - theta) = 0`` into nan, although the
    penalties' derivatives there are 0 (``|phi - theta|^(2r)`` with ``r > 1`` is flat at ``phi = theta``,
    where Algorithm 2 starts). The two ``where`` keep the infinite branch out of the graph.
    """
    if float(e).is_integer():
        return q ** int(e)
    positive = q > 0
    return torch.where(positive, torch.where(positive, q, torch.ones_like(q)) ** e, torch.zeros_like(q))


def _check_positive(name: str, value: Optional[float], allow_zero: bool = False) -> None:
    if value is None:
        return
    bad = value < 0 if allow_zero else value <= 0
    if not isinstance(value, (int, float)) or not math.isfinite(value) or bad:
        need = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {need} number, got {value!r}")


class Penalty:
    """Protocol of a penalty :math:`p(\\theta, \\phi_i, \\phi_{-i})` coupling through an aggregate.

    Attributes:
        symmetric: ``True`` when the penalty's contribution to the game Jacobian is symmetric (the
            game stays a potential game if the task losses are), ``False`` otherwise.
        coupled: ``False`` when a player's penalty does not depend on the other players.
        vanishes_at_anchor: ``True`` when every player's penalty gradient is zero whenever all
            players sit at the anchor, for every anchor. The penalty then contributes nothing, in value
            or in any derivative along that set, to the first inner step of Algorithm 2 (which starts
            every player at the anchor), and the unrolled algorithms skip it there. It holds for
            penalties of the differences ``phi_k - anchor`` whose gradient is zero when they all are;
            leave it ``False`` (the default) when unsure.
    """

    symmetric: bool = False
    coupled: bool = True
    vanishes_at_anchor: bool = False

    def contribution(self, phi_i: Any, anchor: Any) -> Any:  # pragma: no cover
        """Player ``i``'s share of the aggregate (only called when ``coupled``)."""
        raise NotImplementedError

    def value(self, phi_i: Any, anchor: Any, s: Any, num_players: int) -> torch.Tensor:  # pragma: no cover
        """The penalty of player ``i`` given the aggregate ``s`` (``None`` if uncoupled)."""
        raise NotImplementedError

    def pseudo_gradient(self, phi: Any, anchor: Any, num_players: int) -> Any:
        """Optional fast path: every player's partial gradient of its penalty, batched over players.

        ``phi`` has the players as leading dimension. Implement it with torch operations (it is
        differentiated again by the unrolled and implicit meta-gradients); when absent, the
        gradient comes from autograd through ``contribution`` and ``value``.
        """
        raise NotImplementedError

    @property
    def has_pseudo_gradient(self) -> bool:
        """Whether :meth:`pseudo_gradient` is implemented."""
        return type(self).pseudo_gradient is not Penalty.pseudo_gradient

    def __add__(self, other: "Penalty") -> "SumPenalty":
        if not isinstance(other, Penalty):
            return NotImplemented
        left = self.terms if isinstance(self, SumPenalty) else (self,)
        right = other.terms if isinstance(other, SumPenalty) else (other,)
        return SumPenalty(terms=left + right)


@dataclass(frozen=True, kw_only=True)
class CentroidPenalty(Penalty):
    r"""The centroid penalty :math:`p_C` (eq. 13):

    .. math:: p_C = w \Big(\frac{B}{\alpha N}\Big)^2
              \Big\|\theta - \frac{1}{B}\sum_{k=1}^{B} \phi_k\Big\|_2^2 .

    The factor :math:`(B/(\alpha N))^2` is Appendix E's scale: the batch centroid estimates the
    centroid of all N tasks up to the factor B/N, and :math:`\theta - \phi_k` is proportional to
    the inner learning rate :math:`\alpha`.  It is applied when both ``num_tasks`` (N) and
    ``inner_lr`` (:math:`\alpha`) are given, and is 1 otherwise.  The paper sets :math:`\alpha = 0.05`
    for Meta-SGD (whose step sizes are learned) instead of its inner learning rate.

    Every player's penalty gradient is the same vector, :math:`-\frac{2c}{B}(\theta - \bar\phi)`
    with :math:`c` the scaled weight; its Jacobian in :math:`\phi` is
    :math:`\frac{2c}{B^2}\mathbf{1}\mathbf{1}^T \otimes I`, symmetric and positive semidefinite,
    so the game stays a potential game when the task losses make one.

    Args:
        weight: :math:`w \ge 0`.
        num_tasks: :math:`N`, the number of meta-training tasks (None: no scale).
        inner_lr: :math:`\alpha` in the scale (None: no scale).
    """

    weight: float
    num_tasks: Optional[int] = None
    inner_lr: Optional[float] = None
    symmetric = True
    vanishes_at_anchor = True

    def __post_init__(self):
        _check_positive("CentroidPenalty.weight", self.weight, allow_zero=True)
        _check_positive("CentroidPenalty.num_tasks", self.num_tasks)
        _check_positive("CentroidPenalty.inner_lr", self.inner_lr)

    def scale(self, num_players: int) -> float:
        """:math:`w (B/(\\alpha N))^2`, or :math:`w` without the scale (a tensor when ``weight`` or
        ``inner_lr`` is one)."""
        # a tensor weight or inner_lr (one per run of a grid trained together, see
        # implicit_nash.meta.grid) stays a tensor; a number is taken as a Python float
        w = self.weight if isinstance(self.weight, torch.Tensor) else float(self.weight)
        if self.num_tasks is None or self.inner_lr is None:
            return w
        return w * (num_players / (self.inner_lr * self.num_tasks)) ** 2

    def contribution(self, phi_i, anchor):
        return phi_i

    def value(self, phi_i, anchor, s, num_players):
        centroid = tree_map(lambda t: t / num_players, s)
        return self.scale(num_players) * _sq_distance(anchor, centroid)

    def pseudo_gradient(self, phi, anchor, num_players):
        # d/dphi_i c|a - s/B|^2 = (2c/B)(mean_k phi_k - a), the same for every player
        c = 2.0 * self.scale(num_players) / num_players
        # the mean over all players (every rank's block when they are sharded)
        sums = _collective.differentiable_sum_tree(tree_map(lambda p: p.sum(0), phi))  # one all-reduce
        return tree_map(lambda p, t, a: (c * (t / num_players - a)).expand_as(p), phi, sums, anchor)


@dataclass(frozen=True, kw_only=True)
class RobustPenalty(Penalty):
    r"""The robust penalty :math:`p_R` (eq. 14):

    .. math:: p_R = w \frac{B\, \|\theta - \phi_i\|_2^{2r}}{C + \sum_{k=1}^{B} \|\theta - \phi_k\|_2^{2r}} .

    Tasks far from the meta-parameter are pulled back harder (larger ``r``: harder still).  The
    game it makes is not a potential game: its Jacobian is not symmetric.

    :math:`p_R` is homogeneous of degree 0 in :math:`\phi - \theta` when ``C = 0``: its gradient
    grows like :math:`1/\|\phi_i - \theta\|` near the meta-parameter, so it is not Lipschitz
    smooth there (Assumption B.1 fails at :math:`\phi = \theta`).  The constant ``C`` keeps it
    smooth (for :math:`r = 1` the Lipschitz constant at :math:`\phi = \theta` is :math:`2wB/C`),
    at the price of a very stiff game while the distances are below :math:`C^{1/(2r)}`.  Eq. 14 has
    no :math:`(B/(\alpha N))^2` factor (Appendix E derives it for :math:`p_C` only, and a degree-0
    function would not need it); ``scale`` multiplies the penalty if one wants one.

    Args:
        weight: :math:`w \ge 0`.
        robustness: :math:`r \ge 1` (the paper uses 1 and 2; below 1 the gradient is undefined at
            :math:`\phi_i = \theta`, where Algorithm 2 starts).
        C: the small constant of the denominator (the paper does not give its value).
        scale: an extra constant factor (1 in the paper).
    """

    weight: float
    robustness: float = 1.0
    C: float = 1e-8
    scale: float = 1.0
    symmetric = False
    vanishes_at_anchor = True  # for r >= 1 its gradient is 2 c (phi_i - a) q_i^(r-1) / (C + S) ... = 0

    def __post_init__(self):
        _check_positive("RobustPenalty.weight", self.weight, allow_zero=True)
        _check_positive("RobustPenalty.C", self.C)
        _check_positive("RobustPenalty.scale", self.scale)
        if not isinstance(self.robustness, (int, float)) or not self.robustness >= 1:
            raise ValueError(f"RobustPenalty.robustness must be >= 1 (the gradient of |theta - phi|^(2r) "
                             f"is undefined at phi = theta for r < 1), got {self.robustness!r}")

    def contribution(self, phi_i, anchor):
        return _pow(_sq_distance(phi_i, anchor), self.robustness)

    def value(self, phi_i, anchor, s, num_players):
        mine = _pow(_sq_distance(phi_i, anchor), self.robustness)
        return self.scale * self.weight * num_players * mine / (self.C + s)

    def pseudo_gradient(self, phi, anchor, num_players):
        # a_i = q_i^r with q_i = |phi_i - a|^2; d/dphi_i [a_i / (C + sum_k a_k)]
        #   = (C + S - a_i) / (C + S)^2 * r q_i^(r-1) * 2 (phi_i - a)
        # Written with few operations (one concatenation for all the distances, Python-float
        # constants folded): the unrolled meta-gradient differentiates it twice per inner step, and
        # for small networks its cost is the number of operations, not their size.
        diffs = tree_map(lambda p, a: p - a, phi, anchor)
        leaves = tree_leaves(diffs)
        B = leaves[0].shape[0]
        flat = torch.cat([d.reshape(B, -1) for d in leaves], 1)
        q = (flat * flat).sum(1)
        r = self.robustness
        k = 2.0 * self.scale * self.weight * num_players
        # q ** 0 would put 0 * q ** -1 = nan into the second derivative at q = 0 (phi_i = theta,
        # where Algorithm 2 starts): r = 1 and r = 2 are special-cased, other r go through _pow
        if r == 1:
            a, dq = q, None
        elif r == 2:
            a, dq, k = q * q, q, 2.0 * k
        else:
            a, dq, k = _pow(q, r), _pow(q, r - 1), r * k
        total = self.C + _collective.differentiable_sum(a.sum())
        coef = (total - a) * (k / total ** 2)
        if dq is not None:
            coef = coef * dq
        return tree_map(lambda d: coef.reshape(-1, *([1] * (d.dim() - 1))) * d, diffs)


@dataclass(frozen=True, kw_only=True)
class ProximalPenalty(Penalty):
    r"""The proximal term of iMAML, :math:`\frac{\lambda}{2}\|\phi_i - \theta\|_2^2` (no coupling).

    It makes each player's cost :math:`\lambda`-strongly convex wherever the task loss's Hessian is
    above :math:`-\lambda`, which is what the implicit meta-gradient needs.
    """

    lam: float
    symmetric = True
    coupled = False
    vanishes_at_anchor = True

    def __post_init__(self):
        _check_positive("ProximalPenalty.lam", self.lam)

    def value(self, phi_i, anchor, s, num_players):
        return 0.5 * self.lam * _sq_distance(phi_i, anchor)

    def pseudo_gradient(self, phi, anchor, num_players):
        return tree_map(lambda p, a: self.lam * (p - a), phi, anchor)


@dataclass(frozen=True)
class SumPenalty(Penalty):
    """The sum of penalties (``p1 + p2``); its aggregate is the tuple of theirs."""

    terms: Tuple[Penalty, ...]

    def __post_init__(self):
        if not self.terms or not all(isinstance(t, Penalty) for t in self.terms):
            raise ValueError("SumPenalty needs one or more Penalty terms")

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return all(t.symmetric for t in self.terms)

    @property
    def coupled(self) -> bool:  # type: ignore[override]
        return any(t.coupled for t in self.terms)

    @property
    def vanishes_at_anchor(self) -> bool:  # type: ignore[override]
        return all(t.vanishes_at_anchor for t in self.terms)

    def contribution(self, phi_i, anchor):
        # an uncoupled term contributes a dummy zero so that the aggregate stays a tuple of tensors
        zero = tree_leaves(phi_i)[0].new_zeros(())
        return tuple(t.contribution(phi_i, anchor) if t.coupled else zero for t in self.terms)

    @property
    def has_pseudo_gradient(self) -> bool:  # type: ignore[override]
        return all(t.has_pseudo_gradient for t in self.terms)

    def pseudo_gradient(self, phi, anchor, num_players):
        parts = [t.pseudo_gradient(phi, anchor, num_players) for t in self.terms]
        return tree_map(lambda *xs: sum(xs), *parts)

    def value(self, phi_i, anchor, s, num_players):
        parts = (None,) * len(self.terms) if s is None else s
        return sum(t.value(phi_i, anchor, p if t.coupled else None, num_players)
                   for t, p in zip(self.terms, parts))


def centroid_penalty(weight: float, num_tasks: Optional[int] = None,
                     inner_lr: Optional[float] = None) -> CentroidPenalty:
    """Shorthand for :class:`CentroidPenalty` (the paper's :math:`p_C(w)`)."""
    return CentroidPenalty(weight=weight, num_tasks=num_tasks, inner_lr=inner_lr)


def robust_penalty(weight: float, robustness: float = 1.0, C: float = 1e-8) -> RobustPenalty:
    """Shorthand for :class:`RobustPenalty` (the paper's :math:`p_R(w, r)`)."""
    return RobustPenalty(weight=weight, robustness=robustness, C=C)


def proximal_penalty(lam: float) -> ProximalPenalty:
    """Shorthand for :class:`ProximalPenalty` (iMAML's :math:`\\lambda/2\\|\\phi - \\theta\\|^2`)."""
    return ProximalPenalty(lam=lam)

