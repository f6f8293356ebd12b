"""The one place that touches private PyTorch APIs (STYLE.md §4)."""
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["tree_flatten", "tree_map", "tree_unflatten"]
