"""CAVIA (Zintgraf et al., 2019) and its Nash-GBML variant.

Only a context vector :math:`\\psi_i` is adapted per task; it is concatenated to the network's input
(or, for a network with ``takes_context``, such as :class:`~implicit_nash.tasks.Conv4`, passed to it
for FiLM conditioning)
and reset to zero for every task. The network weights are the meta-parameters and are not adapted,
so the task loss depends on :math:`\\theta` directly: the implicit mode uses the general
:math:`Q = \\partial_\\theta F` that includes the loss term (DESIGN.md §2). The penalties measure
distances from the initial context :math:`\\phi_0 = 0` (Appendix E: "set :math:`\\theta = \\phi_0` for
CAVIA").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from .base import Algorithm

__all__ = ["CAVIA"]


@dataclass(frozen=True, kw_only=True)
class CAVIA(Algorithm):
    """Fast context adaptation: ``context_dim`` context parameters concatenated to the input."""

    context_dim: int = 4
    name = "cavia"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.context_dim, bool) or not isinstance(self.context_dim, int) or self.context_dim < 1:
            raise ValueError(f"CAVIA.context_dim must be an integer >= 1, got {self.context_dim!r}")

    def input_extra(self):
        return self.context_dim

    def anchor(self, theta):
        leaf = next(iter(theta["params"].values()))
        return {"context": leaf.new_zeros(self.context_dim)}

    def predict(self, model, theta, phi_i, x):
        if getattr(model, "takes_context", False):  # e.g. Conv4 with FiLM conditioning
            return functional_call(model, theta["params"], (x, phi_i["context"]))
        context = phi_i["context"].expand(*x.shape[:-1], self.context_dim)
        return functional_call(model, theta["params"], (torch.cat([x, context], dim=-1),))
