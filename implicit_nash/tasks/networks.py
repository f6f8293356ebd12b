"""Networks of the paper's benchmarks (plain ``nn.Module``; algorithms call them functionally)."""
from __future__ import annotations

from typing import Sequence

from torch import nn

__all__ = ["mlp"]


def mlp(sizes: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """A fully connected network, e.g. ``mlp([1, 40, 40, 1])`` (Finn et al.'s sinusoid network)."""
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"mlp sizes must be two or more positive integers, got {list(sizes)!r}")
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh}
    if activation not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(acts[activation]())
    return nn.Sequential(*layers)
