r"""Few-shot sinusoid regression as in TR-MAML (Collins et al., 2020) and the paper's Section 4.1.

A task is :math:`y = a \sin(x + b)`, :math:`x \sim U[-5, 5]`, :math:`b \sim U[0, \pi]`.
Meta-training amplitudes come from 100 sub-intervals of width 0.01, 95 covering [0.1, 1.05] and 5
covering [4.95, 5.0]; a task picks a sub-interval uniformly (so large amplitudes are rare) and its
amplitude uniformly inside it. The sub-interval is the task's identity among the N = 100
meta-training tasks (TR-MAML's task probabilities and the penalty scale's N). Meta-testing uses 490
sub-intervals of width 0.01 covering [0.1, 5.0]: the test MSE of each sub-interval (the mean over the
test tasks that fall in it) is reported as mean, worst and standard deviation over the 490.

All sampling goes through an explicit ``torch.Generator`` (CPU), so a run is reproducible and its
sampler state can be checkpointed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .base import TaskFamily, group_statistics
from .networks import mlp

__all__ = ["SinusoidTasks", "train_intervals", "test_intervals", "interval_statistics"]


def train_intervals() -> torch.Tensor:
    """The 100 meta-training amplitude sub-intervals as a (100, 2) tensor of [low, high)."""
    lows = [0.1 + 0.01 * k for k in range(95)] + [4.95 + 0.01 * k for k in range(5)]
    return torch.tensor([[lo, lo + 0.01] for lo in lows], dtype=torch.float64)


def test_intervals() -> torch.Tensor:
    """The 490 meta-testing amplitude sub-intervals covering [0.1, 5.0] as a (490, 2) tensor."""
    lows = [0.1 + 0.01 * k for k in range(490)]
    return torch.tensor([[lo, lo + 0.01] for lo in lows], dtype=torch.float64)


def interval_statistics(per_task: torch.Tensor, interval_ids: torch.Tensor, num_intervals: int) -> Dict[str, float]:
    """Mean, worst and (population) standard deviation over sub-intervals of the per-interval mean."""
    stats = group_statistics(per_task, interval_ids, num_intervals)
    stats["per_interval"] = stats.pop("per_group")
    return stats


@dataclass(frozen=True)
class SinusoidTasks(TaskFamily):
    """The sinusoid task family.

    Args:
        shots: support points per task (K = 5 in the paper).
        query_shots: query points per meta-training task (MAML's code uses K for both; so do we).
        test_query_points: query points per meta-test task.
    """

    shots: int = 5
    query_shots: int = 5
    test_query_points: int = 100
    x_range: float = 5.0

    def __post_init__(self):
        for name in ("shots", "query_shots", "test_query_points"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SinusoidTasks.{name} must be an integer >= 1, got {v!r}")

    input_dim = 1
    output_dim = 1

    @property
    def num_train_tasks(self) -> int:
        return 100

    def network(self, algorithm, config):
        """Finn et al.'s 1-40-40-1 ReLU network (CAVIA: plus its context inputs)."""
        return mlp([self.input_dim + algorithm.input_extra(), *config["hidden"], self.output_dim], config["activation"])

    def eval_set(self, split, num_tasks, seed, dtype=torch.float32):
        batch = self.test_set(num_tasks=num_tasks, seed=seed, dtype=dtype)
        batch["group_ids"], batch["num_groups"] = batch["interval_ids"], batch["num_intervals"]
        return batch

    def _tasks(self, intervals, ids, n_support, n_query, generator, dtype):
        n = ids.shape[0]
        lo, hi = intervals[ids, 0], intervals[ids, 1]
        amp = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        phase = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        x = (2 * torch.rand(n, n_support + n_query, 1, generator=generator, dtype=torch.float64) - 1) * self.x_range
        y = amp[:, None, None] * torch.sin(x + phase[:, None, None])
        x, y = x.to(dtype), y.to(dtype)
        return {"x_support": x[:, :n_support], "y_support": y[:, :n_support],
                "x_query": x[:, n_support:], "y_query": y[:, n_support:], "amplitude": amp.to(dtype)}

    def sample(self, batch_size: int, generator: torch.Generator, dtype=torch.float32) -> Dict[str, torch.Tensor]:
        """A meta-training batch; ``task_ids`` are the sub-interval indices (0..99)."""
        ids = torch.randint(0, self.num_train_tasks, (batch_size,), generator=generator)
        batch = self._tasks(train_intervals(), ids, self.shots, self.query_shots, generator, dtype)
        batch["task_ids"] = ids
        return batch

    def test_set(self, num_tasks: int = 5000, seed: int = 12345, dtype=torch.float32,
                 num_intervals: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Fixed meta-test tasks: task t uses sub-interval ``t mod 490`` (balanced), ``seed`` fixed.

        The same seed gives the same tasks to every run, so runs are compared on identical tasks.
        ``interval_ids`` says which sub-interval each task belongs to.
        """
        intervals = test_intervals()
        m = intervals.shape[0] if num_intervals is None else num_intervals
        if num_tasks < m:
            raise ValueError(f"need at least one test task per sub-interval: num_tasks={num_tasks} < {m}")
        ids = torch.arange(num_tasks) % m
        gen = torch.Generator().manual_seed(seed)
        batch = self._tasks(intervals[:m], ids, self.shots, self.test_query_points, gen, dtype)
        batch["interval_ids"] = ids
        batch["num_intervals"] = m
        return batch
