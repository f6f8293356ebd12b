"""MAML (Finn et al., 2017) and its Nash-GBML variant.

Inner level: ``inner_steps`` gradient steps on each task's support loss from :math:`\\phi_i = \\theta`
(plus the Nash-GBML penalty when one is given); outer level: the mean query loss, differentiated
through the inner steps (second order) by default.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Algorithm

__all__ = ["MAML"]


@dataclass(frozen=True, kw_only=True)
class MAML(Algorithm):
    """Model-agnostic meta-learning; ``MAML(penalty=CentroidPenalty(...))`` is Nash-MAML.

    Example:
        >>> import torch
        >>> from implicit_nash.meta import MAML
        >>> from implicit_nash.tasks import mlp
        >>> torch.manual_seed(0) and None
        >>> model = mlp([1, 8, 1])
        >>> algo = MAML(inner_steps=2, inner_lr=0.01)
        >>> theta = algo.init(model)
        >>> batch = {k: torch.randn(3, 5, 1) for k in ("x_support", "y_support", "x_query", "y_query")}
        >>> algo.task_losses(model, theta, batch).shape
        torch.Size([3])
    """

    name = "maml"
