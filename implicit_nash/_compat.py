"""The one place that touches private PyTorch APIs (STYLE.md §4)."""
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


def tree_leaves(tree):
    """The leaves of a pytree, in flattening order."""
    return tree_flatten(tree)[0]


__all__ = ["tree_flatten", "tree_leaves", "tree_map", "tree_unflatten"]
