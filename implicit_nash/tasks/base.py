"""What a task family provides to the trainer: sampling, evaluation sets, its network and metric."""
from __future__ import annotations

from typing import Any, Dict

import torch

__all__ = ["TaskFamily", "DataError", "group_statistics", "eval_size", "eval_chunk"]


class DataError(ValueError):
    """Data on disk that cannot be used (missing, truncated, too small); the message names the file."""


def data_root(root, what: str):
    """``root`` as a :class:`~pathlib.Path` if it is a folder, else a one-line :class:`DataError`."""
    from pathlib import Path
    p = Path(root)
    if p.is_file():
        raise DataError(f"{what} data root {root} is a file; --data-root takes the folder that holds the data")
    if not p.is_dir():
        raise DataError(f"{what} data root {root} does not exist")
    return p


def group_statistics(per_task: torch.Tensor, group_ids: torch.Tensor, num_groups: int,
                     higher_is_better: bool = False) -> Dict[str, Any]:
    """Mean, worst and (population) standard deviation over groups of the per-group mean.

    Groups are sinusoid amplitude sub-intervals, or single test images or episodes. ``worst`` is the
    largest value for an error, the smallest for an accuracy.
    """
    counts = torch.bincount(group_ids, minlength=num_groups).to(per_task.dtype)
    if bool((counts == 0).any()):
        raise ValueError("every evaluation group needs at least one task")
    sums = torch.zeros(num_groups, dtype=per_task.dtype).index_add_(0, group_ids, per_task)
    per_group = sums / counts
    worst = per_group.min() if higher_is_better else per_group.max()
    return {"mean": float(per_group.mean()), "worst": float(worst),
            "std": float(per_group.std(unbiased=False)), "per_group": per_group.tolist()}


def eval_size(test: Dict[str, Any]) -> int:
    """The number of tasks of an evaluation set (materialised or lazy)."""
    return int(test["num_tasks"]) if "load" in test else int(test["x_support"].shape[0])


def eval_chunk(test: Dict[str, Any], lo: int, hi: int) -> Dict[str, torch.Tensor]:
    """Tasks ``lo:hi`` of an evaluation set as tensors.

    A materialised set holds its tensors; a lazy one (image families, whose tasks would not fit in
    memory together) holds ``num_tasks`` and ``load(lo, hi)``, which builds only those tasks, so
    that evaluation memory does not grow with the number of tasks.
    """
    if "load" in test:
        return test["load"](lo, hi)
    return {k: v[lo:hi] for k, v in test.items() if isinstance(v, torch.Tensor)}


class TaskFamily:
    """Base class of the task families.

    Attributes:
        loss: ``"mse"`` or ``"cross_entropy"``, the inner and outer training loss.
        metric: ``"mse"`` or ``"accuracy"``, what evaluation reports.
        higher_is_better: whether a larger metric is better (accuracy).
        num_train_tasks: N, the number of meta-training tasks (the penalty scale's N).
    """

    loss = "mse"
    metric = "mse"
    higher_is_better = False
    num_train_tasks = 1

    def network(self, algorithm, config: Dict[str, Any]) -> torch.nn.Module:  # pragma: no cover
        raise NotImplementedError

    def sample(self, batch_size: int, generator: torch.Generator, dtype=torch.float32) -> Dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def eval_set(self, split: str, num_tasks: int, seed: int, dtype=torch.float32) -> Dict[str, Any]:
        """Fixed evaluation tasks with ``group_ids`` and ``num_groups`` (see :func:`group_statistics`);
        either the tasks' tensors or a lazy ``num_tasks`` and ``load(lo, hi)`` (see :func:`eval_chunk`)."""
        raise NotImplementedError  # pragma: no cover

    def trivial_metric(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Per-task metric of a trivial predictor on a batch of tasks (an evaluation chunk): predicting
        0 (regression) or chance, 1 / ways (classification)."""
        if self.metric == "mse":
            return (batch["y_query"] ** 2).mean(dim=tuple(range(1, batch["y_query"].dim())))
        n = batch["x_query"].shape[0]
        return torch.full((n,), 1.0 / float(self.ways), dtype=torch.float64)
