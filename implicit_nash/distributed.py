"""The coupled inner game across ``torch.distributed`` ranks (gloo on CPU, NCCL on GPU).

Unlike plain MAML, the Nash-GBML inner game couples the tasks of a meta-batch through the penalty
aggregates, so sharding the meta-batch is not embarrassingly parallel. Each rank holds a contiguous
block of the tasks (:func:`shard`: sizes differ by at most one, e.g. 13 + 12 for B = 25 over 2 ranks); inside :func:`sharded` the penalty aggregates (the centroid's sum of parameters, the robust
penalty's sum of distances) are all-reduced with a differentiable all-reduce at every inner step and
inside every matrix-vector product of the implicit backward, and every norm and inner product of the
forward and linear solvers is reduced over the ranks, so that all ranks take the same steps and stop
together. The meta-gradient is then all-reduced as in DDP (:func:`allreduce_gradients`).

With the trainer: ``torchrun --nproc_per_node 2 -m implicit_nash.cli train sinusoid --distributed ...``.
A run sharded over ranks gives the same
meta-gradients and metrics as one process with the whole meta-batch (tests/test_distributed.py).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable

import torch

from ._collective import active, allsum, differentiable_sum, rank, sharded, world

__all__ = ["sharded", "init_from_env", "shard", "block", "allreduce_gradients", "all_gather_cat", "active", "world",
           "rank", "allsum", "differentiable_sum"]


def init_from_env(backend: str = None) -> None:
    """``init_process_group`` from torchrun's environment (gloo on CPU, NCCL when CUDA is used)."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("--distributed needs torchrun (or RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set)")
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))


def block(n: int, r: int, w: int) -> slice:
    """Rank ``r``'s block of ``n`` tasks over ``w`` ranks: the first ``n % w`` ranks hold one more."""
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is not in 0..{w - 1}")
    if n < w:
        raise ValueError(f"a meta-batch of {n} tasks cannot be sharded over {w} ranks: every rank needs a task; "
                         f"use --meta-batch {w} or more, or fewer ranks")
    q, extra = divmod(n, w)
    lo = r * q + min(r, extra)
    return slice(lo, lo + q + (1 if r < extra else 0))


def shard(batch: Dict[str, Any], r: int, w: int) -> Dict[str, Any]:
    """This rank's contiguous block (:func:`block`) of the leading (task) dimension of every tensor."""
    out = {}
    for k, v in batch.items():
        out[k] = v[block(v.shape[0], r, w)] if isinstance(v, torch.Tensor) else v
    return out


def allreduce_gradients(params: Iterable[torch.Tensor]) -> None:
    """Sum every parameter's gradient over the ranks (each rank holds a part of the meta-loss).

    The gradients travel as one flat buffer (one all-reduce, as DDP's buckets do) rather than one
    call per tensor.
    """
    import torch.distributed as dist
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    i = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[i:i + n].reshape(p.grad.shape))
        i += n


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dimension 0, in rank order (the ranks' lengths may differ)."""
    import torch.distributed as dist
    w = dist.get_world_size()
    sizes = torch.zeros(w, dtype=torch.int64, device=t.device)
    sizes[dist.get_rank()] = t.shape[0]
    dist.all_reduce(sizes)
    longest = int(sizes.max())
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(k)] for p, k in zip(parts, sizes)])
