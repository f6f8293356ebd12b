"""The one place that touches private PyTorch APIs (STYLE.md §4)."""
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


def tree_leaves(tree):
    """The leaves of a pytree, in flattening order."""
    return tree_flatten(tree)[0]


__all__ = ["tree_flatten", "tree_leaves", "tree_map", "tree_unflatten", "differentiable_all_reduce_sum", "is_batched",
           "functorch_active", "forward_mode_levels"]


def differentiable_all_reduce_sum(t, group):
    """All-reduce (sum) that autograd differentiates: its backward all-reduces the incoming gradients.

    ``torch.distributed._functional_collectives`` is what PyTorch recommends in place of the deprecated
    ``torch.distributed.nn.functional.all_reduce``; it is private, hence here.
    """
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    return funcol.all_reduce(t, "sum", group if group is not None else dist.group.WORLD)


def is_batched(t) -> bool:
    """Whether ``t`` is being transformed by ``torch.func.vmap`` (a functorch BatchedTensor)."""
    import torch
    try:
        return bool(torch._C._functorch.is_batchedtensor(t))
    except AttributeError:  # pragma: no cover
        return False


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, vmap...) is running around this call."""
    import torch
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # pragma: no cover
        return True


def forward_mode_levels() -> int:
    """How many ``torch.func`` forward-mode transforms (``jvp``, ``jacfwd``) are running around this call."""
    import torch
    try:
        stack = torch._C._functorch.get_interpreter_stack() or []
        return sum(1 for i in stack if i.key().name == "Jvp")
    except AttributeError:  # pragma: no cover
        return 0
