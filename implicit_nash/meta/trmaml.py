"""TR-MAML (Collins et al., 2020), task-robust MAML, and its Nash-GBML variant.

The outer problem is the worst case over the N meta-training tasks,
:math:`\\min_\\theta \\max_{p \\in \\Delta_N} \\sum_j p_j \\mathcal{L}_j(\\theta)`, solved by stochastic
gradient descent-ascent: the meta-loss of a batch is the unbiased estimate
:math:`\\frac{N}{B}\\sum_b p_{j_b} \\mathcal{L}_b` (tasks :math:`j_b` drawn uniformly), and after every
meta-iteration the task probabilities take a projected ascent step
:math:`p \\leftarrow \\Pi_\\Delta(p + \\gamma g)` with :math:`g_j = \\frac{N}{B}\\sum_{b: j_b = j}
\\mathcal{L}_b`. The inner level is MAML's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sets import Simplex
from .maml import MAML

__all__ = ["TRMAML"]


@dataclass(frozen=True, kw_only=True)
class TRMAML(MAML):
    """Task-robust MAML with task-probability learning rate ``task_lr`` (the paper: 1e-5)."""

    task_lr: float = 1e-5
    name = "trmaml"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.task_lr, (int, float)) or not self.task_lr > 0 or self.task_lr == float("inf"):
            raise ValueError(f"TRMAML.task_lr must be a finite positive number, got {self.task_lr!r}")

    def init_state(self, num_tasks, like):
        return {"task_probs": torch.full((num_tasks,), 1.0 / num_tasks, dtype=like.dtype, device=like.device)}

    def _weights(self, batch, state):
        if "task_ids" not in batch:
            raise ValueError("TR-MAML needs batch['task_ids']: the index of each task among the N training tasks")
        probs = state["task_probs"]
        B = batch["task_ids"].shape[0]
        return probs[batch["task_ids"]] * (probs.shape[0] / B)

    def outer_loss(self, losses, batch, state):
        return (self._weights(batch, state) * losses).sum()

    def update_state(self, state, losses, batch):
        probs = state["task_probs"]
        g = torch.zeros_like(probs).index_add_(0, batch["task_ids"], losses.detach().to(probs.dtype))
        g = g * (probs.shape[0] / batch["task_ids"].shape[0])
        return {**state, "task_probs": Simplex().project(probs + self.task_lr * g)}
