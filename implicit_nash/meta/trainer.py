"""The meta-trainer (Algorithm 1): Adam on the meta-parameters, checkpoints, evaluation, outputs.

One run lives in one directory:

* ``config.json``: the fully resolved configuration (written first);
* ``checkpoint.pt``: written atomically (a temporary file, then ``os.replace``) every
  ``checkpoint_every`` iterations and at the end: meta-parameters, Adam state, the task sampler's
  generator state, the algorithm's outer state (TR-MAML's task probabilities), the history;
* ``metrics.json``: final test metrics (``test_mse_mean/worst/std``, ``sec_per_iteration``,
  ``iterations``), the baselines, validation history, and the configuration;
* ``curves.png``: training loss and validation MSE against iterations.

A run killed mid-way and resumed (``resume=True``) continues from the last checkpoint with the same
generator and optimiser state, so it ends with the same metrics as an uninterrupted run. Training is
deterministic on the CPU for a given seed.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from .._compat import tree_leaves, tree_map
from ..errors import ConvergenceWarning
from ..tasks import SinusoidTasks, interval_statistics, mlp
from .config import ConfigError, build_algorithm

__all__ = ["Run", "train", "evaluate_run", "evaluate"]

CHECKPOINT = "checkpoint.pt"


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def _to(batch: Dict[str, Any], device) -> Dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Run:
    """A configured run: task family, network, algorithm, meta-parameters and optimiser."""

    def __init__(self, config: Dict[str, Any]):
        self.config = config
        if config["task"] != "sinusoid":  # pragma: no cover - other task families come with their issues
            raise ConfigError(f"task {config['task']!r} is not available")
        self.tasks = SinusoidTasks(shots=config["shots"], query_shots=config["query_shots"])
        self.algorithm = build_algorithm(config, self.tasks.num_train_tasks)
        device = torch.device(config["device"])
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but CUDA is not available")
        self.device = device
        self.dtype = _dtype(config["dtype"])
        torch.manual_seed(config["seed"])
        sizes = [self.tasks.input_dim + self.algorithm.input_extra(), *config["hidden"], self.tasks.output_dim]
        self.model = mlp(sizes, config["activation"]).to(device=device, dtype=self.dtype)
        self.theta = self.algorithm.init(self.model)
        self.optimizer = torch.optim.Adam(tree_leaves(self.theta), lr=config["outer_lr"])
        self.generator = torch.Generator().manual_seed(config["seed"] + 1)
        like = tree_leaves(self.theta)[0]
        self.state = self.algorithm.init_state(self.tasks.num_train_tasks, like)
        self.iteration = 0
        self.history: Dict[str, list] = {"iteration": [], "train_loss": [], "val": []}
        self.train_seconds = 0.0
        self.warnings = 0

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {"theta": tree_map(lambda t: t.detach().cpu(), self.theta),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "state": tree_map(lambda t: t.detach().cpu(), self.state), "iteration": self.iteration,
                "history": self.history, "train_seconds": self.train_seconds, "warnings": self.warnings,
                "config": self.config}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        with torch.no_grad():
            for t, v in zip(tree_leaves(self.theta), tree_leaves(sd["theta"])):
                t.copy_(v)
        self.optimizer.load_state_dict(sd["optimizer"])
        self.generator.set_state(sd["generator"])
        self.state = tree_map(lambda t: t.to(self.device), sd["state"])
        self.iteration = sd["iteration"]
        self.history = sd["history"]
        self.train_seconds = sd["train_seconds"]
        self.warnings = sd["warnings"]

    # ------------------------------------------------------------------ one meta-iteration
    def step(self) -> float:
        batch = _to(self.tasks.sample(self.config["meta_batch"], self.generator, self.dtype), self.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            losses = self.algorithm.task_losses(self.model, self.theta, batch)
            loss = self.algorithm.outer_loss(losses, batch, self.state)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self._count(caught)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the meta-loss is {value} at iteration {self.iteration + 1}; "
                                     f"lower --outer-lr or --inner-lr")
        self.optimizer.step()
        self.state = self.algorithm.update_state(self.state, losses, batch)
        self.iteration += 1
        return value

    def _count(self, caught) -> None:
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                self.warnings += 1
            else:  # not ours to swallow
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str) -> Dict[str, Any]:
        c = self.config
        n, seed = (c["val_tasks"], c["val_seed"]) if split == "val" else (c["test_tasks"], c["test_seed"])
        test = self.tasks.test_set(num_tasks=n, seed=seed, dtype=self.dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            result = evaluate(self.algorithm, self.model, self.theta, test, device=self.device,
                              nash=c["eval_penalty"])
        self._count(caught)
        return result


def evaluate(algorithm, model, theta, test: Dict[str, Any], *, device=None, nash: bool = False,
             chunk: int = 500) -> Dict[str, Any]:
    """Adapt to every test task (``inner_steps`` on its support set) and score its query set.

    Returns mean, worst and standard deviation over amplitude sub-intervals of the per-interval
    test MSE, plus two baselines on the same tasks: ``unadapted`` (the meta-parameters without any
    inner step) and ``zero`` (predicting 0 everywhere).
    """
    device = torch.device("cpu") if device is None else device
    detached = tree_map(lambda t: t.detach(), theta)
    mode = "implicit" if algorithm.meta_gradient == "implicit" else "first_order"
    n = test["x_support"].shape[0]
    per_task, unadapted = [], []
    with torch.no_grad():
        for lo in range(0, n, chunk):
            part = _to({k: v[lo:lo + chunk] for k, v in test.items() if isinstance(v, torch.Tensor)}, device)
            per_task.append(algorithm.task_losses(model, detached, part, nash=nash, mode=mode).cpu())
            start = algorithm._start(detached, part["x_query"].shape[0])
            pred = torch.func.vmap(lambda p, x: algorithm.predict(model, detached, p, x))(start, part["x_query"])
            unadapted.append(((pred - part["y_query"]) ** 2).mean(dim=(1, 2)).cpu())
    per_task_t = torch.cat(per_task).to(torch.float64)
    ids, m = test["interval_ids"], test["num_intervals"]
    stats = interval_statistics(per_task_t, ids, m)
    base = interval_statistics(torch.cat(unadapted).to(torch.float64), ids, m)
    zero = interval_statistics((test["y_query"] ** 2).mean(dim=(1, 2)).to(torch.float64), ids, m)
    return {"mse_mean": stats["mean"], "mse_worst": stats["worst"], "mse_std": stats["std"],
            "per_interval": stats["per_interval"], "tasks": n, "intervals": m,
            "unadapted_mean": base["mean"], "zero_mean": zero["mean"]}


def _plot(history: Dict[str, list], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    it, tl = history["iteration"], history["train_loss"]
    if it:
        w = max(1, len(tl) // 100)
        smooth = [sum(tl[max(0, i - w + 1):i + 1]) / len(tl[max(0, i - w + 1):i + 1]) for i in range(len(tl))]
        axes[0].plot(it, tl, alpha=0.25, lw=0.6, label="per iteration")
        axes[0].plot(it, smooth, lw=1.2, label=f"moving mean ({w})")
        axes[0].set_yscale("log")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("meta-training loss")
    axes[0].legend(fontsize=8)
    val = history["val"]
    if val:
        vi = [v["iteration"] for v in val]
        for key, label in (("mse_mean", "mean"), ("mse_worst", "worst"), ("mse_std", "std")):
            axes[1].plot(vi, [v[key] for v in val], marker="o", ms=3, label=label)
        axes[1].set_yscale("log")
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("validation MSE over sub-intervals")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _title(c: Dict[str, Any]) -> str:
    pen = "" if c["penalty"] == "none" else (
        f" + p_C({c['weight']:g})" if c["penalty"] == "centroid" else f" + p_R({c['weight']:g}, {c['robustness']:g})")
    return f"{c['task']}: {c['algorithm']}{pen}, seed {c['seed']}"


def train(config: Dict[str, Any], out_dir: str, *, resume: bool = False, progress: bool = True,
          stop_after: Optional[int] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train a resolved configuration into ``out_dir``; returns the metrics (also in metrics.json).

    ``stop_after`` stops after that many iterations of this call *without* finishing the run (a
    test hook that simulates a kill; a checkpoint is written first).
    """
    out = Path(out_dir)
    ckpt = out / CHECKPOINT
    if resume:
        if not ckpt.is_file():
            raise ConfigError(f"--resume: {ckpt} does not exist")
        saved = torch.load(ckpt, weights_only=False)
        config = saved["config"]
    elif ckpt.exists() or (out / "metrics.json").exists():
        raise ConfigError(f"{out} already holds a run; use --resume to continue it or another --out")
    out.mkdir(parents=True, exist_ok=True)
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    run = Run(config)
    if resume:
        run.load_state_dict(saved)
    else:
        _atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True))
    c = config
    total = c["iterations"]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=run.iteration, desc=_title(c), dynamic_ncols=True, mininterval=0.5)
    done_here = 0
    while run.iteration < total:
        t0 = time.perf_counter()
        loss = run.step()
        run.train_seconds += time.perf_counter() - t0
        run.history["iteration"].append(run.iteration)
        run.history["train_loss"].append(loss)
        done_here += 1
        if run.iteration % c["eval_every"] == 0 or run.iteration == total:
            v = run.evaluate("val")
            run.history["val"].append({"iteration": run.iteration, **{k: v[k] for k in ("mse_mean", "mse_worst", "mse_std")}})
        if bar is not None:
            post = {"loss": f"{loss:.3g}"}
            if run.history["val"]:
                post["val_mean"] = f"{run.history['val'][-1]['mse_mean']:.3g}"
            if run.warnings:
                post["not_converged"] = run.warnings
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if run.iteration % c["checkpoint_every"] == 0 or run.iteration == total:
            _atomic_save(run.state_dict(), ckpt)
        if stop_after is not None and done_here >= stop_after and run.iteration < total:
            _atomic_save(run.state_dict(), ckpt)
            if bar is not None:
                bar.close()
            return {"stopped_at": run.iteration}
    if bar is not None:
        bar.close()
    metrics = _finish(run, out)
    log(f"{_title(c)}: test MSE mean {metrics['test_mse_mean']:.4g}, worst {metrics['test_mse_worst']:.4g}, "
        f"std {metrics['test_mse_std']:.4g} over {metrics['test']['intervals']} sub-intervals "
        f"({metrics['iterations']} iterations, {metrics['sec_per_iteration'] * 1e3:.2f} ms/iteration) -> {out}")
    if run.warnings:
        log(f"warning: {run.warnings} inner or linear solves did not converge to tolerance (see metrics.json)")
    return metrics


def _finish(run: Run, out: Path) -> Dict[str, Any]:
    test = run.evaluate("test")
    c = run.config
    metrics = {
        "test_mse_mean": test["mse_mean"], "test_mse_worst": test["mse_worst"], "test_mse_std": test["mse_std"],
        "baseline_unadapted_mse_mean": test["unadapted_mean"], "baseline_zero_mse_mean": test["zero_mean"],
        "sec_per_iteration": run.train_seconds / max(run.iteration, 1),
        "iterations": run.iteration,
        "budget": f"{run.iteration} iterations x meta-batch {c['meta_batch']}, seed {c['seed']}; "
                  f"test: {test['tasks']} tasks over {test['intervals']} amplitude sub-intervals (seed {c['test_seed']})",
        "not_converged_solves": run.warnings,
        "test": {k: test[k] for k in ("tasks", "intervals", "per_interval")},
        "val_history": run.history["val"],
        "final_train_loss": run.history["train_loss"][-1] if run.history["train_loss"] else None,
        "torch": torch.__version__,
        "config": c,
    }
    if "task_probs" in run.state:
        probs = run.state["task_probs"].cpu()
        metrics["task_probs"] = {"max": float(probs.max()), "min": float(probs.min()),
                                 "large_amplitude_mass": float(probs[95:].sum())}
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    try:
        _plot(run.history, out / "curves.png", _title(c))
    except ImportError:  # pragma: no cover - matplotlib is a dependency; say so if it is missing
        warnings.warn("matplotlib is not installed: curves.png was not written", RuntimeWarning)
    return metrics


def evaluate_run(out_dir: str, *, split: str = "test") -> Dict[str, Any]:
    """Re-evaluate a saved run from its checkpoint (the metrics are recomputed, not read back)."""
    ckpt = Path(out_dir) / CHECKPOINT
    if not ckpt.is_file():
        raise ConfigError(f"{ckpt} does not exist: is {out_dir} a run directory?")
    saved = torch.load(ckpt, weights_only=False)
    run = Run(saved["config"])
    run.load_state_dict(saved)
    result = run.evaluate(split)
    result.pop("per_interval")
    return {"iteration": run.iteration, "split": split, **result}
