"""The meta-trainer (Algorithm 1): Adam on the meta-parameters, checkpoints, evaluation, outputs.

One run lives in one directory:

* ``config.json``: the fully resolved configuration (written first);
* ``checkpoint.pt``: written atomically (a temporary file, then ``os.replace``) every
  ``checkpoint_every`` iterations and at the end: meta-parameters, Adam state, the task sampler's
  generator state, the algorithm's outer state (TR-MAML's task probabilities), the history;
* ``metrics.json``: final test metrics (``test_<metric>_mean/worst/std`` with metric ``mse`` or
  ``accuracy``, ``sec_per_iteration``,
  ``iterations``), the baselines, validation history, and the configuration;
* ``curves.png``: training loss and validation MSE against iterations;
* ``progress.json``: the iteration reached, for watchers in other processes;
* ``evaluation.json``: written by :func:`evaluate_run` (``implicit-nash evaluate``), the recomputed
  test metrics under the keys of ``metrics.json``.

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
from ..tasks import make_family
from ..tasks.base import eval_chunk, eval_size, group_statistics
from .config import ConfigError, build_algorithm, upgrade
from .stats import mean_ci95

__all__ = ["Run", "train", "evaluate_run", "evaluate", "default_threads", "load_checkpoint"]

CHECKPOINT = "checkpoint.pt"


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def _to(batch: Dict[str, Any], device) -> Dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _is_writer() -> bool:
    """Only rank 0 writes files when a run is sharded over ranks."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _atomic_write_text(path: Path, text: str) -> None:
    if not _is_writer():
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save(obj: Any, path: Path) -> None:
    if not _is_writer():
        return
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Run:
    """Configured runs of one configuration, one per seed, trained together.

    ``config["seeds"]`` (default ``[config["seed"]]``) lists R seeds. Every leaf of ``theta`` has a
    leading run dimension R; each run has its own network initialisation, task generator and outer
    state, and one Adam over the stacked leaves is R independent Adams (Adam is elementwise). With
    R > 1 the meta-loss of all runs is computed in one ``torch.func.vmap`` over runs (unrolled and
    first-order modes); the implicit mode, whose solver loop checks tolerances on concrete values,
    loops over runs instead.
    """

    def __init__(self, config: Dict[str, Any]):
        self.config = config
        self.tasks = make_family(config)
        self.algorithm = build_algorithm(config, self.tasks.num_train_tasks, loss=self.tasks.loss)
        device = torch.device(config["device"])
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but CUDA is not available")
        self.device = device
        self.dtype = _dtype(config["dtype"])
        self.seeds = list(config["seeds"]) if config.get("seeds") else [config["seed"]]
        thetas = []
        # initialised in the run's dtype whatever the process's default dtype is (a Ray worker's or a
        # test's), so that a seed gives the same run everywhere
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            for seed in self.seeds:
                torch.manual_seed(seed)
                model = self.tasks.network(self.algorithm, config).to(device=device, dtype=self.dtype)
                thetas.append(self.algorithm.init(model))
        finally:
            torch.set_default_dtype(default)
        self.model = model  # the structure; its own weights are never used (functional_call)
        self.theta = tree_map(lambda *xs: torch.stack([x.detach() for x in xs]).requires_grad_(True), *thetas)
        self.optimizer = torch.optim.Adam(tree_leaves(self.theta), lr=config["outer_lr"])
        self.generators = [torch.Generator().manual_seed(seed + 1) for seed in self.seeds]
        like = tree_leaves(self.theta)[0]
        states = [self.algorithm.init_state(self.tasks.num_train_tasks, like) for _ in self.seeds]
        self.state = tree_map(lambda *xs: torch.stack(xs), *states) if states[0] else {}
        self.distributed = bool(config.get("distributed"))
        if self.distributed:
            import torch.distributed as dist
            if not dist.is_initialized():
                raise ConfigError("--distributed needs torch.distributed initialised (run under torchrun)")
            if len(self.seeds) > 1:
                raise ConfigError("--distributed shards one run's meta-batch; train several seeds as separate runs")
            if config["meta_batch"] < dist.get_world_size():
                raise ConfigError(f"--meta-batch {config['meta_batch']} is smaller than the {dist.get_world_size()} "
                                  f"ranks: every rank needs a task; use --meta-batch {dist.get_world_size()} or "
                                  "more, or fewer ranks")
        self.vectorised = len(self.seeds) > 1 and self.algorithm.meta_gradient != "implicit"
        self.hyper: Dict[str, torch.Tensor] = {}  # per-run hyperparameters (a grid: implicit_nash.meta.grid)
        self.iteration = 0
        self.history: Dict[str, list] = {"iteration": [], "train_loss": [], "val": []}
        self.train_seconds = 0.0
        self.warnings = 0
        self.diverged: Dict[int, int] = {}  # seed -> first iteration with a non-finite meta-loss
        self._eval_sets: Dict[Any, Dict[str, Any]] = {}

    LOG_EVERY = 50  # the history keeps the meta-loss averaged over blocks of this many iterations
    BLOWUP = 1e3    # a finite meta-loss this many times the first iteration's is flagged as a blow-up

    def record(self, losses: list, final: bool = False) -> None:
        """Accumulate each run's meta-loss; log the block mean every ``LOG_EVERY`` iterations."""
        first = self.history.setdefault("initial_loss", list(losses))
        blown = self.history.setdefault("blowups", {})
        for seed, v, v0 in zip(self.seeds, losses, first):
            if str(seed) not in blown and math.isfinite(v) and v > self.BLOWUP * max(abs(v0), 1e-12):
                blown[str(seed)] = {"iteration": self.iteration, "loss": v, "initial_loss": v0}
        acc = self.history.setdefault("block", {"sum": [0.0] * self.runs, "count": 0})
        acc["sum"] = [a + v for a, v in zip(acc["sum"], losses)]
        acc["count"] += 1
        if self.iteration % self.LOG_EVERY == 0 or final:
            self.history["iteration"].append(self.iteration)
            self.history["train_loss"].append([a / acc["count"] for a in acc["sum"]])
            self.history["block"] = {"sum": [0.0] * self.runs, "count": 0}

    def algorithm_for(self, hyper: Dict[str, torch.Tensor]):
        """The algorithm of one run inside the vmap over runs, given its slice of ``self.hyper``."""
        return self.algorithm

    def algorithm_of(self, r: int):
        """The algorithm of run ``r`` (evaluation adapts each run's tasks with it)."""
        return self.algorithm

    @property
    def runs(self) -> int:
        return len(self.seeds)

    def theta_of(self, r: int) -> Dict[str, Any]:
        return tree_map(lambda t: t[r], self.theta)

    def state_of(self, r: int) -> Dict[str, Any]:
        return tree_map(lambda t: t[r], self.state)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {"theta": tree_map(lambda t: t.detach().cpu(), self.theta),
                "optimizer": self.optimizer.state_dict(), "generators": [g.get_state() for g in self.generators],
                "state": tree_map(lambda t: t.detach().cpu(), self.state), "iteration": self.iteration,
                "history": self.history, "train_seconds": self.train_seconds, "warnings": self.warnings,
                "diverged": self.diverged, "config": self.config}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        with torch.no_grad():
            for t, v in zip(tree_leaves(self.theta), tree_leaves(sd["theta"])):
                t.copy_(v)
        self.optimizer.load_state_dict(sd["optimizer"])
        for g, st in zip(self.generators, sd["generators"]):
            g.set_state(st)
        self.state = tree_map(lambda t: t.to(self.device), sd["state"])
        self.iteration = sd["iteration"]
        self.history = sd["history"]
        self.train_seconds = sd["train_seconds"]
        self.warnings = sd["warnings"]
        self.diverged = dict(sd.get("diverged", {}))

    # ------------------------------------------------------------------ one meta-iteration
    def _batch(self) -> Dict[str, Any]:
        parts = [self.tasks.sample(self.config["meta_batch"], g, self.dtype) for g in self.generators]
        return _to({k: torch.stack([p[k] for p in parts]) for k in parts[0]}, self.device)

    def step(self) -> list:
        """One meta-iteration of every run; returns each run's meta-loss."""
        batch = self._batch()
        algo, model = self.algorithm, self.model
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            if self.vectorised:
                def one(theta, b, state, hyper):
                    a = self.algorithm_for(hyper)
                    losses = a.task_losses(model, theta, b)
                    return a.outer_loss(losses, b, state), losses
                outer, losses = torch.func.vmap(one)(self.theta, batch, self.state, self.hyper)
            elif self.distributed:
                outer, losses = self._sharded_step(batch)
            else:
                pairs = []
                for r in range(self.runs):
                    b = {k: v[r] for k, v in batch.items()}
                    losses_r = self.algorithm_of(r).task_losses(model, self.theta_of(r), b)
                    pairs.append((self.algorithm_of(r).outer_loss(losses_r, b, self.state_of(r)), losses_r))
                outer = torch.stack([p[0] for p in pairs])
                losses = torch.stack([p[1] for p in pairs])
            if not self.distributed:
                self.optimizer.zero_grad(set_to_none=True)
                outer.sum().backward()  # runs are independent: each run's leaves get its own gradient
        self._count(caught)
        every = self.config.get("hypergrad_check_every") or 0
        if every and getattr(algo, "budgeted", False) and self.iteration % every == 0 and not self.distributed:
            t0 = time.perf_counter()
            self._check_hypergradient(batch)
            # a measurement, not training: train() leaves its time out of sec_per_iteration
            self.check_seconds = getattr(self, "check_seconds", 0.0) + time.perf_counter() - t0
        values = [float(v) for v in outer.detach()]
        for seed, v in zip(self.seeds, values):
            if not math.isfinite(v) and seed not in self.diverged:
                self.diverged[seed] = self.iteration + 1
        if len(self.diverged) == self.runs:
            which = "" if self.runs == 1 else f" for every seed ({', '.join(map(str, self.seeds))})"
            raise FloatingPointError(f"the meta-loss is not finite at iteration {self.iteration + 1}{which}; "
                                     f"lower --outer-lr or --inner-lr")
        # A run whose meta-loss is not finite has diverged: it is recorded (``diverged``) and carries
        # on as NaN in its own slice; the others are unaffected (vmap over runs and Adam are both
        # elementwise in the run dimension), so one diverging seed does not stop the rest.
        self.optimizer.step()
        if self.state:
            new = [self.algorithm_of(r).update_state(self.state_of(r), losses[r].detach(),
                                                     {k: v[r] for k, v in batch.items()}) for r in range(self.runs)]
            self.state = tree_map(lambda *xs: torch.stack(xs), *new)
        self.iteration += 1
        return values

    def _check_hypergradient(self, batch) -> None:
        """Measure a budgeted meta-gradient against a tight solve on the same batch (Theorem D.3:
        the error is at most C delta + eps, delta the inner solution's error, eps the backward's).

        Appends, per run, the relative error |g - g*| / |g*| of the meta-gradient just computed and
        the inner error delta = |phi - phi*| / |phi* - theta| to ``history["hypergrad"]``, and how
        many of the reference's solves did not reach their tolerance (with a ReLU network none can:
        the reference is then the best solve within its larger budget, not an exact one).
        """
        algo, model = self.algorithm, self.model
        reference = algo.reference()
        leaves = tree_leaves(self.theta)
        entry: Dict[str, Any] = {"iteration": self.iteration + 1, "relative_error": [], "inner_error": [],
                                 "reference_not_converged": 0}
        for r in range(self.runs):
            b = {k: v[r] for k, v in batch.items()}
            theta_r = self.theta_of(r)
            g_hat = torch.cat([t.grad[r].reshape(-1) for t in leaves if t.grad is not None])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                losses = reference.task_losses(model, theta_r, b)
                outer = reference.outer_loss(losses, b, self.state_of(r))
                found = torch.autograd.grad(outer, leaves, allow_unused=True)
            notes = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
            entry["reference_not_converged"] += len(notes)
            if notes:
                entry.setdefault("reference_messages", []).extend(notes[:2])
            g_ref = torch.cat([g[r].reshape(-1) for g, t in zip(found, leaves) if t.grad is not None])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                with torch.no_grad():
                    detached = tree_map(torch.Tensor.detach, theta_r)
                    phi = algo.adapt(model, detached, b["x_support"], b["y_support"])
                    phi_ref = reference.adapt(model, detached, b["x_support"], b["y_support"])
                    start = algo._start(detached, b["x_support"].shape[0])
                    flat = [torch.cat([x.reshape(-1) for x in tree_leaves(t)]) for t in (phi, phi_ref, start)]
            entry["relative_error"].append(float((g_hat - g_ref).norm() / g_ref.norm().clamp_min(1e-300)))
            entry["inner_error"].append(float((flat[0] - flat[1]).norm() / (flat[1] - flat[2]).norm().clamp_min(1e-300)))
        self.history.setdefault("hypergrad", []).append(entry)

    def _sharded_step(self, batch):
        """One meta-iteration with this rank's block of the meta-batch (see implicit_nash.distributed)."""
        from .. import distributed as dist_
        import torch.distributed as dist
        algo, model = self.algorithm, self.model
        w, r = dist.get_world_size(), dist.get_rank()
        full = {k: v[0] for k, v in batch.items()}  # every rank samples the same whole batch ...
        mine = dist_.shard(full, r, w)               # ... and keeps its contiguous block of tasks
        B, b = self.config["meta_batch"], dist_.block(self.config["meta_batch"], r, w)
        with dist_.sharded():
            losses_local = algo.task_losses(model, self.theta_of(0), mine)
            # the outer loss's mean (or TR-MAML's N/B weights) over this rank's b tasks, weighted by b/B:
            # summed over the ranks it is the loss of the whole batch, also when the blocks differ in size
            outer_local = algo.outer_loss(losses_local, mine, self.state_of(0)) * ((b.stop - b.start) / B)
            self.optimizer.zero_grad(set_to_none=True)
            outer_local.backward()
            outer = dist_.allsum(outer_local.detach().reshape(1))
        dist_.allreduce_gradients(tree_leaves(self.theta))
        losses = dist_.all_gather_cat(losses_local.detach()).unsqueeze(0)
        return outer, losses

    def _count(self, caught) -> None:
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                self.warnings += 1
            else:  # not ours to swallow
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str) -> list:
        """Each run's evaluation on the validation or test tasks (the same tasks for every run)."""
        c = self.config
        n, seed = (c["val_tasks"], c["val_seed"]) if split == "val" else (c["test_tasks"], c["test_seed"])
        # the evaluation tasks are fixed by their seed: build them once per run, not at every evaluation
        key = (split, n, seed)
        if key not in self._eval_sets:
            self._eval_sets[key] = self.tasks.eval_set(split, num_tasks=n, seed=seed, dtype=self.dtype)
        test = self._eval_sets[key]
        results = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            for r in range(self.runs):
                results.append(evaluate(self.algorithm_of(r), self.model, self.theta_of(r), test, device=self.device,
                                        nash=c["eval_penalty"], family=self.tasks, chunk=c["eval_batch"]))
        self._count(caught)
        return results


def evaluate(algorithm, model, theta, test: Dict[str, Any], *, device=None, nash: bool = False,
             chunk: int = 500, family=None) -> Dict[str, Any]:
    """Adapt to every evaluation task (on its support set) and score its query set.

    Returns mean, worst and standard deviation over the evaluation groups (sinusoid: amplitude
    sub-intervals; images and episodes: one group each) of the per-group metric, keyed
    ``<metric>_mean`` etc., plus two baselines on the same tasks: ``unadapted`` (the meta-parameters
    without any inner step) and ``trivial`` (predicting 0, or chance accuracy).

    Tasks are adapted ``chunk`` at a time (``eval_batch`` of the configuration), and a lazy
    evaluation set builds only the current chunk's tasks, so peak memory depends on ``chunk``, not on
    the number of tasks; only per-task numbers are kept between chunks.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"the evaluation chunk must be a positive integer, got {chunk!r}")
    device = torch.device("cpu") if device is None else device
    metric = "mse" if family is None else family.metric
    higher = False if family is None else family.higher_is_better
    detached = tree_map(lambda t: t.detach(), theta)
    mode = "implicit" if algorithm.meta_gradient == "implicit" else "first_order"
    n = eval_size(test)
    per_task, unadapted, trivial = [], [], []
    with torch.no_grad():
        for lo in range(0, n, chunk):
            part = _to(eval_chunk(test, lo, min(lo + chunk, n)), device)
            per_task.append(algorithm.task_losses(model, detached, part, nash=nash, mode=mode,
                                                  metric=None if metric == "mse" else metric).cpu())
            start = algorithm._start(detached, part["x_query"].shape[0])
            pred = algorithm.map_tasks(model, lambda p, x: algorithm.predict(model, detached, p, x), start,
                                       part["x_query"], mode="first_order")
            if metric == "accuracy":
                unadapted.append((pred.argmax(-1) == part["y_query"]).to(torch.float64).mean(1).cpu())
            else:
                unadapted.append(((pred - part["y_query"]) ** 2).mean(dim=tuple(range(1, pred.dim()))).cpu())
            trivial.append((family.trivial_metric(part) if family is not None
                            else (part["y_query"] ** 2).mean(dim=(1, 2))).cpu())
            del part, pred, start
    per_task_t = torch.cat(per_task).to(torch.float64)
    ids, m = test["group_ids"], test["num_groups"]
    stats = group_statistics(per_task_t, ids, m, higher)
    base = group_statistics(torch.cat(unadapted).to(torch.float64), ids, m, higher)
    zero = group_statistics(torch.cat(trivial).to(torch.float64), ids, m, higher)
    return {"metric": metric, f"{metric}_mean": stats["mean"], f"{metric}_worst": stats["worst"],
            f"{metric}_std": stats["std"], "per_group": stats["per_group"], "tasks": n, "groups": m,
            "unadapted_mean": base["mean"], "trivial_mean": zero["mean"]}


def _plot(history: Dict[str, list], path: Path, title: str, metric: str = "mse") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    it = history["iteration"]
    if it:
        tl = [sum(v) / len(v) for v in history["train_loss"]]
        w = max(1, len(tl) // 100)
        few = len(tl) < 30  # a short run: markers, no smoothing
        label = (f"mean of each block of {Run.LOG_EVERY} iterations" if it[-1] > Run.LOG_EVERY
                 else f"mean of the {it[-1]} iterations")
        axes[0].plot(it, tl, alpha=1.0 if few else 0.35, lw=0.6, marker="o" if few else None, ms=3, label=label)
        if w > 1:
            smooth = [sum(tl[max(0, i - w + 1):i + 1]) / len(tl[max(0, i - w + 1):i + 1]) for i in range(len(tl))]
            axes[0].plot(it, smooth, lw=1.2, label=f"moving mean of {w} blocks")
        if min(tl) > 0:
            axes[0].set_yscale("log")
        axes[0].legend(fontsize=8)
    runs = len(history["train_loss"][0]) if history["train_loss"] else 1
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("meta-training loss" + (f" (mean of {runs} runs)" if runs > 1 else ""))
    val = history["val"]
    if val:
        vi = [v["iteration"] for v in val]
        positive = True
        for key, label in ((f"{metric}_mean", "mean"), (f"{metric}_worst", "worst"), (f"{metric}_std", "std")):
            per_run = [[r[key] for r in v["runs"]] for v in val]
            mid = [sum(x) / len(x) for x in per_run]
            line, = axes[1].plot(vi, mid, marker="o", ms=3, label=label)
            positive = positive and min(mid) > 0
            if runs > 1:
                axes[1].fill_between(vi, [min(x) for x in per_run], [max(x) for x in per_run],
                                     color=line.get_color(), alpha=0.2)
        if metric == "mse" and positive:
            axes[1].set_yscale("log")
        axes[1].legend(fontsize=8)
        if len(vi) < 3:
            axes[1].set_title(f"{len(vi)} validation{'s' if len(vi) > 1 else ''} in this run (--eval-every sets "
                              "how often)", fontsize=8)
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel(f"validation {metric} over groups" + (" (band: min-max over runs)" if runs > 1 else ""))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _title(c: Dict[str, Any]) -> str:
    pen = "" if c["penalty"] == "none" else {
        "centroid": "p_C({w:g})", "proximal": "proximal({w:g})", "robust": "p_R({w:g}, {r:g})",
    }[c["penalty"]].format(w=c["weight"], r=c["robustness"])
    pen = pen and f" + {pen}"
    seeds = c.get("seeds") or [c["seed"]]
    who = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {','.join(map(str, seeds))}"
    return f"{c['task']}: {c['algorithm']}{pen}, {who}"


def default_threads(config: Dict[str, Any]) -> Optional[int]:
    """torch's CPU threads for a run that does not set ``threads``.

    1 for sinusoid: its 1-40-40-1 network gains nothing from more threads and slows down many
    times when another process holds a core. The image tasks: the cores left idle by the machine's
    load at the start (``os.cpu_count()`` minus the 1-minute load average, at least 1), so that a
    quiet machine uses all its cores and a shared one does not oversubscribe them (measured in
    ``benchmarks/results/threads.md``). ``None`` (torch's own default) off the CPU.
    """
    if str(config.get("device", "cpu")) != "cpu":
        return None
    if config["task"] == "sinusoid":
        return 1
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def load_checkpoint(path: Path, action: str) -> Dict[str, Any]:
    """``torch.load`` of a run's checkpoint, or a one-line :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: is {path.parent} a run directory?")
    try:
        saved = torch.load(path, weights_only=False)
        if not isinstance(saved, dict) or not {"theta", "config", "iteration"} <= set(saved):
            raise ValueError("not a checkpoint of implicit_nash's trainer")
    except Exception as e:  # truncated, garbled or foreign
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} cannot be read ({reason}); cannot {action} it: restore the file, or delete "
                          f"{path.parent} and train again") from None
    return saved


def _check_progress(out: Path, log: Callable[[str], None]) -> None:
    """Say so when ``progress.json`` (a progress record for watchers) is garbled; it is rewritten."""
    p = out / "progress.json"
    if not p.exists():
        return
    try:
        data = json.loads(p.read_text())
        ok = isinstance(data, dict) and isinstance(data.get("iteration"), int) and isinstance(data.get("total"), int)
    except (json.JSONDecodeError, UnicodeDecodeError):
        ok = False
    if not ok:
        log(f"warning: {p} is garbled; it is only a progress record and is rewritten from {CHECKPOINT} "
            "(nothing to do)")
        p.unlink()


def train(config: Dict[str, Any], out_dir: str, *, resume: bool = False, progress: bool = True,
          stop_after: Optional[int] = None, iterations: Optional[int] = None,
          log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train a resolved configuration into ``out_dir``; returns the metrics (also in metrics.json).

    ``resume=True`` continues the run saved in ``out_dir``, finished or not, to ``iterations`` (default:
    the saved run's); if ``config`` is given too, its ``iterations`` may extend the saved run (a longer
    run's first part is the shorter run).
    ``stop_after`` stops after that many iterations of this call *without* finishing the run (a
    test hook that simulates a kill; a checkpoint is written first).
    """
    out = Path(out_dir)
    ckpt = out / CHECKPOINT
    if resume:
        saved = load_checkpoint(ckpt, "resume")
        saved["config"] = upgrade(saved["config"])
        if iterations is not None:
            config = {**(config or saved["config"]), "iterations": iterations}
        if config and {k: v for k, v in config.items() if k != "iterations"} != \
                {k: v for k, v in saved["config"].items() if k != "iterations"}:
            differ = sorted(k for k in set(config) | set(saved["config"])
                            if k != "iterations" and config.get(k) != saved["config"].get(k))
            raise ConfigError(f"{out} holds a run of another configuration (it differs in {', '.join(differ)}); "
                              f"use another output directory, or delete {out} to start over")
        config = {**saved["config"], "iterations": (config or saved["config"])["iterations"]}
        if config["iterations"] < saved["iteration"]:
            raise ConfigError(f"{out} has already run {saved['iteration']} iterations, more than {config['iterations']}")
        _check_progress(out, log)
    elif ckpt.exists() or (out / "metrics.json").exists():
        raise ConfigError(f"{out} already holds a run; use --resume to continue it or another --out")
    if config.get("distributed"):
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()  # every rank has checked the directory before rank 0 writes into it
    threads = config.get("threads") or default_threads(config)
    if threads:
        torch.set_num_threads(threads)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        run = Run(config)
    except BaseException:
        if created and not any(out.iterdir()):  # a failed start leaves no empty directory behind
            out.rmdir()
        raise
    if resume:
        run.load_state_dict(saved)
    _atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True))
    c = config
    mt = run.tasks.metric
    total = c["iterations"]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=run.iteration, desc=_title(c), dynamic_ncols=True, mininterval=0.5)
    done_here = 0
    if resume:
        _atomic_write_text(out / "progress.json", json.dumps({"iteration": run.iteration, "total": total}))
    while run.iteration < total:
        t0 = time.perf_counter()
        checked = getattr(run, "check_seconds", 0.0)
        losses = run.step()
        run.train_seconds += time.perf_counter() - t0 - (getattr(run, "check_seconds", 0.0) - checked)
        run.record(losses, final=run.iteration == total)
        done_here += 1
        if run.iteration % c["eval_every"] == 0 or run.iteration == total:
            results = run.evaluate("val")
            run.history["val"].append({"iteration": run.iteration, "runs": [
                {k: v[k] for k in (f"{mt}_mean", f"{mt}_worst", f"{mt}_std")} for v in results]})
        if bar is not None:
            post = {"loss": f"{sum(losses) / len(losses):.3g}"}
            if run.history["val"]:
                last = run.history["val"][-1]["runs"]
                post[f"val_{mt}"] = f"{sum(v[mt + '_mean'] for v in last) / len(last):.3g}"
            if run.warnings:
                post["not_converged"] = run.warnings
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if run.iteration % c["checkpoint_every"] == 0 or run.iteration == total:
            _atomic_save(run.state_dict(), ckpt)
        if run.iteration % 200 == 0 or run.iteration == total:  # for watchers in other processes
            _atomic_write_text(out / "progress.json", json.dumps({"iteration": run.iteration, "total": total}))
        if stop_after is not None and done_here >= stop_after and run.iteration < total:
            _atomic_save(run.state_dict(), ckpt)
            if bar is not None:
                bar.close()
            return {"stopped_at": run.iteration}
    if bar is not None:
        bar.close()
    metrics = _finish(run, out)
    if not _is_writer():  # rank 0 reports for a sharded run
        return metrics
    log(f"{_title(c)}: test {mt} mean {metrics[f'test_{mt}_mean']:.4g}, worst {metrics[f'test_{mt}_worst']:.4g}, "
        f"std {metrics[f'test_{mt}_std']:.4g} over {metrics['test']['groups']} evaluation groups "
        f"({metrics['iterations']} iterations, {metrics['sec_per_iteration'] * 1e3:.2f} ms/iteration"
        f"{'' if run.runs == 1 else f' for {run.runs} runs together'}) -> {out}")
    if run.diverged:
        log(f"warning: seed(s) {', '.join(map(str, run.diverged))} diverged (non-finite meta-loss) at iteration(s) "
            f"{', '.join(map(str, run.diverged.values()))}; the metrics average the other seeds")
    for seed, b in metrics["blown_up_seeds"].items():
        log(f"warning: seed {seed} blew up: meta-loss {b['loss']:.3g} at iteration {b['iteration']}, "
            f"{b['loss'] / max(abs(b['initial_loss']), 1e-12):.3g} x its first value {b['initial_loss']:.3g}")
    if "hypergradient_error" in metrics:
        h = metrics["hypergradient_error"]
        missed = h["reference_not_converged"]
        log(f"budgeted meta-gradient: relative error {h['relative_median']:.3g} (median; max "
            f"{h['relative_max']:.3g}) against a tight solve over {h['checks']} checks"
            + (f"; {missed} of the reference's solves stopped short of their tolerance (a ReLU network's "
               "kinks): the reference is itself approximate" if missed else ""))
    if run.warnings:
        log(f"warning: {run.warnings} inner or linear solves did not converge to tolerance (see metrics.json)")
    return metrics


def _median(values: list) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def _summarise(run: Run, results: list, split: str) -> Dict[str, Any]:
    """The metrics of an evaluation of every run on ``split``, keyed as in ``metrics.json``
    (``<split>_<metric>_mean`` ..., the baselines, per-run entries); averages over the seeds that did
    not diverge."""
    mt = run.tasks.metric
    trivial = "zero" if mt == "mse" else "chance"
    per_run = []
    for r, (seed, res) in enumerate(zip(run.seeds, results)):
        entry = {"seed": seed, f"{split}_{mt}_mean": res[f"{mt}_mean"], f"{split}_{mt}_worst": res[f"{mt}_worst"],
                 f"{split}_{mt}_std": res[f"{mt}_std"], f"baseline_unadapted_{mt}_mean": res["unadapted_mean"],
                 f"baseline_{trivial}_{mt}_mean": res["trivial_mean"], "per_group": res["per_group"],
                 "final_train_loss": run.history["train_loss"][-1][r] if run.history["train_loss"] else None}
        if "task_probs" in run.state:
            probs = run.state["task_probs"][r].cpu()
            entry["task_probs"] = {"max": float(probs.max()), "min": float(probs.min()),
                                   "large_amplitude_mass": float(probs[95:].sum())}
        entry["diverged_at"] = run.diverged.get(seed)
        per_run.append(entry)
    metrics: Dict[str, Any] = {}
    finite = [e for e in per_run if e["diverged_at"] is None]
    for key in (f"{split}_{mt}_mean", f"{split}_{mt}_worst", f"{split}_{mt}_std", f"baseline_unadapted_{mt}_mean",
                f"baseline_{trivial}_{mt}_mean", "final_train_loss"):
        values = [e[key] for e in finite]  # over the seeds that did not diverge (listed below)
        metrics[key] = sum(values) / len(values) if values else float("nan")
        if len(values) > 1 and key.startswith(f"{split}_"):
            metrics[key + "_ci95"] = mean_ci95(values)["ci"]
    metrics["diverged_seeds"] = {str(k): v for k, v in run.diverged.items()}
    metrics.update({"iterations": run.iteration, "seeds": run.seeds, "metric": mt,
                    split: {"tasks": results[0]["tasks"], "groups": results[0]["groups"],
                            "intervals": results[0]["groups"]},
                    "runs": per_run})
    return metrics


def _finish(run: Run, out: Path) -> Dict[str, Any]:
    tests = run.evaluate("test")
    c = run.config
    metrics = _summarise(run, tests, "test")
    # finite but exploding: the first iteration whose meta-loss exceeded BLOWUP x the first one's
    metrics["blown_up_seeds"] = dict(run.history.get("blowups", {}))
    checks = run.history.get("hypergrad")
    if checks:
        rel = [x for e in checks for x in e["relative_error"]]
        inner = [x for e in checks for x in e["inner_error"]]
        metrics["hypergradient_error"] = {
            "every": c.get("hypergrad_check_every"), "checks": len(checks),
            "relative_median": _median(rel), "relative_max": max(rel),
            "inner_error_median": _median(inner), "inner_error_max": max(inner),
            "reference_not_converged": sum(e["reference_not_converged"] for e in checks),
            "history": checks}
    metrics.update({
        "sec_per_iteration": run.train_seconds / max(run.iteration, 1),
        "runs_trained_together": run.runs,
        "vectorised_over_runs": run.vectorised,
        "budget": f"{run.iteration} iterations x meta-batch {c['meta_batch']}, seeds {run.seeds}; test: "
                  f"{tests[0]['tasks']} tasks over {tests[0]['groups']} evaluation groups "
                  f"(seed {c['test_seed']})",
        "not_converged_solves": run.warnings,
        "threads": torch.get_num_threads(),
        "val_history": run.history["val"],
        "torch": torch.__version__,
        "config": c,
    })
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    try:
        if _is_writer():
            _plot(run.history, out / "curves.png", _title(c), run.tasks.metric)
    except ImportError:  # pragma: no cover - matplotlib is a dependency; say so if it is missing
        warnings.warn("matplotlib is not installed: curves.png was not written", RuntimeWarning)
    return metrics


def evaluate_run(out_dir: str, *, split: str = "test", write: bool = True) -> Dict[str, Any]:
    """Re-evaluate a saved run from its checkpoint (the metrics are recomputed, not read back).

    Returns, and writes to ``evaluation.json`` (``evaluation_val.json`` for ``split="val"``) beside
    ``metrics.json``, the metrics under the keys ``metrics.json`` uses (``<split>_<metric>_mean`` ...).
    """
    if split not in ("test", "val"):
        raise ConfigError(f"split must be test or val, got {split!r}")
    out = Path(out_dir)
    saved = load_checkpoint(out / CHECKPOINT, "evaluate")
    saved["config"] = upgrade(saved["config"])
    run = Run(saved["config"])
    run.load_state_dict(saved)
    metrics = {"split": split, **_summarise(run, run.evaluate(split), split), "torch": torch.__version__,
               "config": run.config}
    if write:
        _atomic_write_text(out / ("evaluation.json" if split == "test" else "evaluation_val.json"),
                           json.dumps(metrics, indent=2))
    return metrics
