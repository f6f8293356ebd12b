"""First-order MAML (Finn et al., 2017, Section 5.2) and its Nash-GBML variant.

The forward pass is MAML's; the meta-gradient drops the second-order terms, treating
:math:`d\\phi_i / d\\theta` as the identity: the meta-gradient is the mean of the query-loss gradients
at the adapted parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

from .maml import MAML

__all__ = ["FOMAML"]


@dataclass(frozen=True, kw_only=True)
class FOMAML(MAML):
    """MAML with ``meta_gradient="first_order"``."""

    meta_gradient: str = "first_order"
    name = "fomaml"
