"""Networks of the paper's benchmarks (plain ``nn.Module``; algorithms call them functionally)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._compat import functorch_active
from . import _fast_ops

__all__ = ["mlp", "Conv4"]


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


class Conv4(nn.Module):
    """The 4-block convolutional network of Finn et al. (2017) for few-shot classification.

    Each block: 3×3 convolution with ``filters`` channels, batch normalisation with batch statistics
    only (``track_running_stats=False``: every task normalises with its own examples, as MAML's
    transductive setting does, and nothing is updated in place, which ``vmap`` needs), ReLU and 2×2
    max-pooling; then a linear layer to ``ways`` logits.

    With ``context_dim > 0`` (CAVIA), a FiLM layer maps the context vector to a per-channel scale and
    shift applied after the batch normalisation of block ``film_block`` (1-based), and the network is
    called as ``net(x, context)``. CAVIA's paper conditions the convolutional network through FiLM;
    which block is our choice (the third by default) and is an argument.

    ``fast=True`` (the default) computes the same function with layers whose second derivatives
    are cheaper on the CPU (:mod:`implicit_nash.tasks._fast_ops`: batch norm with a closed-form
    double backward, max-pool as a gather, the first convolution without the images' gradient) and
    pools before the ReLU (the same values and derivatives: max-pooling commutes with the ReLU). It
    is used on the CPU outside ``torch.func`` transforms; ``fast=False``, other devices and vmapped
    calls use PyTorch's own layers. Values and derivatives agree to rounding
    (``tests/test_fast_ops.py``, float64).
    """

    def __init__(self, in_channels: int = 3, filters: int = 32, ways: int = 5, image_size: int = 84,
                 context_dim: int = 0, film_block: int = 3, fast: bool = True):
        super().__init__()
        if not 1 <= film_block <= 4:
            raise ValueError(f"film_block must be 1..4, got {film_block}")
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        size, channels = image_size, in_channels
        self.pools = []
        for _ in range(4):
            self.convs.append(nn.Conv2d(channels, filters, 3, padding=1))
            self.norms.append(nn.BatchNorm2d(filters, track_running_stats=False))
            self.pools.append(size >= 2)  # small images (8x8 digits) stop pooling at 1x1
            channels, size = filters, (size // 2 if size >= 2 else size)
        self.head = nn.Linear(filters * size * size, ways)
        self.context_dim, self.film_block = context_dim, film_block
        self.fast = bool(fast)
        self.takes_context = context_dim > 0
        if context_dim > 0:
            self.film = nn.Linear(context_dim, 2 * filters)

    def forward(self, x, context=None):
        if self.fast and x.device.type == "cpu" and x.dim() == 4 and not functorch_active():
            return self._fast_forward(x, context)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms), 1):
            x = norm(conv(x))
            if self.takes_context and i == self.film_block:
                gamma, beta = self.film(context).chunk(2, dim=-1)
                x = x * (1 + gamma).reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1)
            x = torch.relu(x)
            if self.pools[i - 1]:
                x = nn.functional.max_pool2d(x, 2)
        return self.head(x.flatten(1))

    def _fast_forward(self, x, context):
        x = x.contiguous(memory_format=torch.channels_last)  # mkldnn, batch norm and max-pool are faster so
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms), 1):
            if i == 1 and not x.requires_grad:
                x = _fast_ops.input_conv(x, conv.weight, conv.bias)
            else:
                x = _fast_ops.conv(x, conv.weight, conv.bias)
            x = _fast_ops.batch_norm(x, norm.weight, norm.bias, norm.eps)
            if self.takes_context and i == self.film_block:
                gamma, beta = self.film(context).chunk(2, dim=-1)
                x = x * (1 + gamma).reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1)
            if self.pools[i - 1]:
                x = _fast_ops.max_pool2x2(x)
            x = torch.relu(x)
        return self.head(x.flatten(1))
