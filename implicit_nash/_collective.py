"""Reductions that span ranks when a game's players are sharded over ``torch.distributed`` ranks.

Outside :func:`sharded` every function here is the plain single-process operation, so the
single-process code paths are unchanged. Inside it (see :mod:`implicit_nash.distributed`), each rank
holds a block of the players, and every quantity that involves all players is reduced over the
ranks:

* inner products and norms of player-major flat vectors (solver tolerances, PRGD's step-size
  estimate, the Krylov solvers' dot products) with :func:`dot`, :func:`norm`, :func:`allsum`,
  :func:`allmax`, so that every rank takes the same decisions in lockstep;
* the penalty aggregates (the centroid's sum of parameters, the robust penalty's sum of distances)
  with :func:`differentiable_sum`, an all-reduce that autograd differentiates (its backward is the
  all-reduce of the incoming gradients), inside the inner steps and inside the implicit backward's
  matrix-vector products.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Union

import torch

__all__ = ["sharded", "active", "world", "rank", "norm", "dot", "allsum", "allmax", "total", "differentiable_sum",
           "differentiable_sum_tree"]

_GROUP: Optional[object] = None
_ACTIVE = False


@contextlib.contextmanager
def sharded(group=None):
    """Within this block, players are sharded over the ranks of ``group`` (default: the world)."""
    global _GROUP, _ACTIVE
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sharded() needs torch.distributed to be initialised (init_process_group)")
    old = (_GROUP, _ACTIVE)
    _GROUP, _ACTIVE = group, True
    try:
        yield
    finally:
        _GROUP, _ACTIVE = old


def active() -> bool:
    return _ACTIVE


def world() -> int:
    if not _ACTIVE:
        return 1
    import torch.distributed as dist
    return dist.get_world_size(_GROUP)


def rank() -> int:
    if not _ACTIVE:
        return 0
    import torch.distributed as dist
    return dist.get_rank(_GROUP)


def allsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (not differentiable; for scalars and vectors of the linear algebra)."""
    if not _ACTIVE:
        return t
    import torch.distributed as dist
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_GROUP)
    return t


def _backend_devices(backend: str) -> List[str]:
    """The device types a backend string reduces: ``"nccl"`` -> ``["cuda"]``, ``"gloo"`` -> ``["cpu",
    "cuda"]``, ``"cpu:gloo,cuda:nccl"`` -> ``["cpu", "cuda"]`` (unknown backends: CPU)."""
    import torch.distributed as dist
    if ":" in backend:
        return [part.split(":")[0].strip() for part in backend.split(",")]
    return list(getattr(dist.Backend, "backend_capability", {}).get(backend.lower(), ["cpu"]))


def _group_devices() -> List[str]:
    """The device types the process group of :func:`sharded` reduces."""
    import torch.distributed as dist
    try:
        from torch.distributed.distributed_c10d import _device_capability
        return list(_device_capability(_GROUP))
    except (ImportError, AttributeError, RuntimeError):  # older torch: from the backend's name
        return _backend_devices(str(dist.get_backend(_GROUP)))


def _pick_device(types: List[str], like: Optional[torch.device] = None, index=None) -> torch.device:
    """Where a tensor built for a collective must live, given the device types the group reduces:
    ``like`` (the device of the inputs) when the group reduces it, else the CPU when it does, else
    this process's current device of the group's first type (NCCL: the current CUDA device).
    ``index(kind)``: the current device index of a type (default ``torch.<kind>.current_device()``)."""
    if like is not None and like.type in types:
        return like
    if "cpu" in types:
        return torch.device("cpu")
    kind = types[0]
    return torch.device(kind, index(kind) if index is not None else getattr(torch, kind).current_device())


def _device(like: Optional[torch.device] = None) -> torch.device:
    """The device of a tensor built here for a collective (NCCL reduces only CUDA tensors, gloo CPU
    tensors; :func:`_pick_device`)."""
    return _pick_device(_group_devices(), like)


def _reduce_number(x, dtype: torch.dtype, op: str):
    import torch.distributed as dist
    if isinstance(x, torch.Tensor):  # on the device of the input, when the group reduces it there
        t = x.detach().reshape(1).to(dtype=dtype, device=_device(x.device), copy=True)
    else:
        t = torch.tensor([x], dtype=dtype, device=_device())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op), group=_GROUP)
    return t.item()


def allmax(x: Union[float, torch.Tensor]) -> float:
    """The maximum of a number (a Python number or a one-element tensor) over ranks. The tensor that is
    reduced is built on the device the group reduces (:func:`_pick_device`): a tensor's own device when
    the group reduces it, else the CPU (gloo), else the current CUDA device (NCCL)."""
    if not _ACTIVE:
        return float(x)
    return float(_reduce_number(x, torch.float64, "MAX"))


def total(n: int) -> int:
    """The sum of a count over ranks (the number of players when ranks hold uneven blocks)."""
    return int(_reduce_number(n, torch.int64, "SUM")) if _ACTIVE else n


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """The inner product of two flat vectors (over all ranks' blocks)."""
    local = a @ b
    return float(allsum(local.reshape(1))[0]) if _ACTIVE else float(local)


def norm(v: torch.Tensor) -> float:
    """The Euclidean norm of a flat or blocked vector (over all ranks' blocks)."""
    if not _ACTIVE:
        return float(torch.linalg.vector_norm(v))
    sq = allsum((v.detach().reshape(-1).to(torch.float64) ** 2).sum().reshape(1))
    return float(sq[0]) ** 0.5


def differentiable_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable (penalty aggregates)."""
    if not _ACTIVE:
        return t
    from ._compat import differentiable_all_reduce_sum
    return differentiable_all_reduce_sum(t, _GROUP)


def differentiable_sum_tree(tree):
    """:func:`differentiable_sum` of every leaf of a pytree, coalesced into one all-reduce."""
    if not _ACTIVE:
        return tree
    from ._compat import tree_flatten, tree_unflatten
    leaves, spec = tree_flatten(tree)
    flat = differentiable_sum(torch.cat([leaf.reshape(-1) for leaf in leaves]))
    out, i = [], 0
    for leaf in leaves:
        out.append(flat[i:i + leaf.numel()].reshape(leaf.shape))
        i += leaf.numel()
    return tree_unflatten(out, spec)
