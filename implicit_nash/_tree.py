"""Flattening pytrees of tensors into one vector with a player-major layout.

Every leaf of a game's strategy has a leading player dimension ``B``; the flat vector stores
player 0's entries of every leaf, then player 1's, and so on, so that a player's block is contiguous
(Gauss--Seidel updates one block at a time).  A plain variational inequality is the case ``B = 1``
with no player dimension.
"""
from __future__ import annotations

import math
from typing import Any, List, Sequence, Tuple

import torch

from ._compat import tree_flatten, tree_unflatten


class Flattener:
    def __init__(self, tree: Any, players: int | None, name: str):
        leaves, self.treedef = tree_flatten(tree)
        if not leaves:
            raise ValueError(f"{name} is an empty pytree; it must hold at least one tensor")
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"{name} must be a tensor or a pytree (dict/tuple/list) of tensors, "
                                f"found a leaf of type {type(leaf).__name__}")
        dtypes = {leaf.dtype for leaf in leaves}
        if len(dtypes) > 1:
            raise TypeError(f"{name} mixes dtypes {sorted(map(str, dtypes))}; use one floating dtype")
        if not leaves[0].is_floating_point():
            raise TypeError(f"{name} must be floating point, got {leaves[0].dtype}")
        self.shapes: List[torch.Size] = [leaf.shape for leaf in leaves]
        if players is None:
            self.players = 1
            self.sizes = [leaf.numel() for leaf in leaves]
        else:
            for leaf in leaves:
                if leaf.dim() == 0 or leaf.shape[0] != players:
                    raise ValueError(
                        f"every leaf of {name} must have the player dimension first: expected leading "
                        f"size {players}, got shape {tuple(leaf.shape)}")
            self.players = players
            self.sizes = [math.prod(leaf.shape[1:]) for leaf in leaves]
        self.block = sum(self.sizes)
        self.numel = self.players * self.block
        self.dtype = leaves[0].dtype
        self.device = leaves[0].device

    def flatten(self, tree: Any) -> torch.Tensor:
        leaves, treedef = tree_flatten(tree)
        if treedef != self.treedef:
            raise ValueError(f"pytree structure changed: expected {self.treedef}, got {treedef}")
        for leaf, shape in zip(leaves, self.shapes):
            if leaf.shape != shape:
                raise ValueError(f"expected a tensor of shape {tuple(shape)}, got {tuple(leaf.shape)}")
        if len(leaves) == 1:
            return leaves[0].reshape(-1)
        return torch.cat([leaf.reshape(self.players, -1) for leaf in leaves], dim=1).reshape(-1)

    def unflatten(self, flat: torch.Tensor) -> Any:
        if len(self.shapes) == 1:
            return tree_unflatten([flat.reshape(self.shapes[0])], self.treedef)
        parts = flat.reshape(self.players, self.block).split(self.sizes, dim=1)
        return tree_unflatten([p.reshape(s) for p, s in zip(parts, self.shapes)], self.treedef)


def leaves_of(tree: Any, name: str) -> Tuple[List[torch.Tensor], Any]:
    """Flatten ``theta``; it may hold tensors only (use closures for non-tensor data)."""
    leaves, treedef = tree_flatten(tree)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or a pytree of tensors, found a leaf of type "
                            f"{type(leaf).__name__}; pass non-tensor data through a closure")
    return leaves, treedef


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite.  A finite sum proves it in one reduction (a NaN or an
    infinity anywhere makes the sum NaN or infinite); only a sum that overflows, or a tensor that is
    not finite, pays for the elementwise test (which allocates a mask as large as ``t``)."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_finite(leaves: Sequence[torch.Tensor], name: str) -> None:
    for i, leaf in enumerate(leaves):
        if not all_finite(leaf):
            where = "" if len(leaves) == 1 else f" (leaf {i}, shape {tuple(leaf.shape)})"
            raise ValueError(f"{name} contains NaN or inf{where}")


#: floating dtypes whose resolution is too coarse for the solvers' stopping rules
_HALF = (torch.float16, torch.bfloat16)


def check_supported_tensor(t: torch.Tensor, name: str, where: str = "the layer's") -> None:
    """Refuse, with one clear ``ValueError``, a tensor the solvers cannot compute with: a meta
    tensor (no data), a complex one, or half precision (``float16``/``bfloat16``: its resolution is
    above the tolerances, so a solve would stop short of them or "converge" far from the answer).
    Integer and boolean tensors pass (data)."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: meta tensors carry no data; compute on a CPU or "
                         f"CUDA device")
    if t.is_complex():
        raise ValueError(f"{name} is {t.dtype}: complex tensors are not supported; split them into real "
                         f"and imaginary parts")
    if t.dtype in _HALF:
        raise ValueError(f"{name} is {t.dtype}: half precision cannot meet {where} tolerances (eps = "
                         f"{torch.finfo(t.dtype).eps:.3g}): compute in float32 and cast")


def check_supported(*named_trees: Tuple[Any, str]) -> None:
    """:func:`check_supported_tensor` on every tensor leaf of each ``(tree, name)`` pair (other
    leaves are left to the type checks that follow)."""
    for tree, name in named_trees:
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor):
                check_supported_tensor(leaf, name)
