"""Meta-SGD (Li et al., 2017) and its Nash-GBML variant.

The inner step is :math:`\\phi_i \\leftarrow \\phi_i - \\alpha \\odot \\nabla f_i`, with a learned step
size :math:`\\alpha` of the same shape as every parameter, meta-learned together with the
initialisation. ``theta["lr"]`` holds it, initialised to ``inner_lr`` everywhere, or, with
``lr_init=(lo, hi)``, to independent uniform draws from ``[lo, hi)`` (Li et al. draw their sinusoid
step sizes at random from [0.005, 0.1]; the Nash-GBML paper gives only α = 0.001, so this is a
flag). With ``lr_clip=(lo, hi)`` the inner steps use the learned step sizes clamped to ``[lo, hi]``
(the learned values themselves are left as they are; outside the interval their gradient is zero). Our
choice, not the paper's: with three inner steps the learned step sizes drift far from ``inner_lr``, and to
negative values, and the adaptation diverges on some seeds (``results/table2.md``); a clamp keeps every
inner step a descent step of bounded size. The paper's penalty scale uses :math:`\\alpha = 0.05` for
Meta-SGD (Appendix E), which the configuration layer fills in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .base import Algorithm

__all__ = ["MetaSGD"]


@dataclass(frozen=True, kw_only=True)
class MetaSGD(Algorithm):
    """Meta-SGD: MAML with learned per-parameter inner learning rates."""

    name = "metasgd"
    lr_init: Optional[Tuple[float, float]] = None
    lr_clip: Optional[Tuple[float, float]] = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("lr_init", "lr_clip"):
            value = getattr(self, name)
            if value is not None:
                lo_hi = tuple(value)
                if (len(lo_hi) != 2 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in lo_hi)
                        or not lo_hi[0] < lo_hi[1]):
                    raise ValueError(f"{name} must be a pair (lo, hi) with lo < hi, got {value!r}")

    def init(self, model):
        """The model's parameters and the step sizes (random draws use torch's global generator, which
        the trainer seeds per run before calling this)."""
        theta = super().init(model)
        if self.lr_init is None:
            lrs = {k: torch.full_like(v, self.inner_lr) for k, v in theta["params"].items()}
        else:
            lo, hi = (float(x) for x in self.lr_init)
            lrs = {k: lo + (hi - lo) * torch.rand_like(v) for k, v in theta["params"].items()}
        theta["lr"] = {k: v.requires_grad_(True) for k, v in lrs.items()}
        return theta

    def step_size(self, theta):
        if self.lr_clip is None:
            return theta["lr"]
        lo, hi = (float(x) for x in self.lr_clip)
        return {k: v.clamp(lo, hi) for k, v in theta["lr"].items()}
