"""Task families and their networks."""
from .networks import mlp
from .sinusoid import SinusoidTasks, interval_statistics, test_intervals, train_intervals

__all__ = ["mlp", "SinusoidTasks", "interval_statistics", "train_intervals", "test_intervals"]
