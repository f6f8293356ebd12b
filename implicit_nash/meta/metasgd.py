"""Meta-SGD (Li et al., 2017) and its Nash-GBML variant.

The inner step is :math:`\\phi_i \\leftarrow \\phi_i - \\alpha \\odot \\nabla f_i`, with a learned step
size :math:`\\alpha` of the same shape as every parameter, meta-learned together with the
initialisation. ``theta["lr"]`` holds it, initialised to ``inner_lr``. The paper's penalty scale
uses :math:`\\alpha = 0.05` for Meta-SGD (Appendix E), which the configuration layer fills in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Algorithm

__all__ = ["MetaSGD"]


@dataclass(frozen=True, kw_only=True)
class MetaSGD(Algorithm):
    """Meta-SGD: MAML with learned per-parameter inner learning rates."""

    name = "metasgd"

    def init(self, model):
        theta = super().init(model)
        theta["lr"] = {k: torch.full_like(v, self.inner_lr).requires_grad_(True)
                       for k, v in theta["params"].items()}
        return theta

    def step_size(self, theta):
        return theta["lr"]
