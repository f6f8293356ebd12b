"""Several configurations that differ only in scalar hyperparameters, trained together (vmap over runs).

The trainer's :class:`~implicit_nash.meta.trainer.Run` already trains the seeds of one configuration
together: every leaf of the meta-parameters has a leading run dimension and one ``torch.func.vmap``
computes every run's meta-loss. A :class:`GridRun` extends the run dimension over *configurations*:
members that differ only in

* the Nash-GBML penalty (``none``, ``centroid``, ``robust``) and its ``weight``,
* the inner step size ``inner_lr`` (and the centroid penalty's ``penalty_alpha``),

are trained in one process, with those scalars held as per-run tensors (``Run.hyper``) instead of
the algorithm's Python floats. Inside the vmap each run sees the algorithm with its own values: the
penalty of the grid is the sum of the kinds its members use (``p_C + p_R`` for a plain / p_C / p_R
grid), each at the member's weight and at weight 0 where the member does not use it. A penalty of
weight 0 adds an exact zero to the inner gradient (``0 * x``), so the plain member computes the plain
algorithm (checked in ``tests/test_grid.py`` against separate runs, in float64).

Each member keeps its own directory, written exactly as :func:`~implicit_nash.meta.trainer.train`
writes it (``config.json``, ``checkpoint.pt``, ``progress.json``, ``metrics.json``, ``curves.png``): a
member can be resumed, extended or re-evaluated alone, and the reproduction caches do not tell a
member from a separate run. ``sec_per_iteration`` of a member is the whole grid's time per iteration
(``trained_in_grid`` says how many members shared it).

Not in a grid: the implicit meta-gradient (its solver loops over runs anyway), sharded runs, and
configurations that differ in anything else (the batch size changes shapes: separate jobs).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .._compat import tree_leaves, tree_map
from ..penalties import CentroidPenalty, RobustPenalty, SumPenalty
from .config import ConfigError
from .trainer import CHECKPOINT, Run, _atomic_save, _atomic_write_text, _finish, default_threads, load_checkpoint

__all__ = ["GRID_KEYS", "GRID_PAYS", "GridRun", "grid_key", "grid_groups", "train_grid"]

# The algorithms for which one vmap over a grid measured faster than its members' runs one after
# another (benchmarks/results/grid_runs.md, 1 CPU thread, 5 seeds per member): CAVIA (2.2x; it adapts
# only a 4-number context, so the per-operation overhead that vmap removes dominates). MAML and
# TR-MAML measured 0.9-1.0x (their 5-seed runs are already compute-bound), and so did Meta-SGD in
# its stable setting, 0.91-0.94x (benchmarks/results/grid_runs_metasgd.md): ``--grid auto`` keeps
# them separate.
GRID_PAYS = ("cavia",)

# what may differ between the members of one grid
GRID_KEYS = ("penalty", "weight", "inner_lr", "penalty_alpha", "robustness", "robust_c")
_KINDS = {"centroid": CentroidPenalty, "robust": RobustPenalty}


def grid_key(config: Dict[str, Any]) -> Optional[str]:
    """A string equal for configurations that can share a grid (``None``: this one cannot)."""
    if config["penalty"] not in ("none", "centroid", "robust") or config["algorithm"] == "imaml" \
            or config.get("meta_gradient") == "implicit" or config.get("distributed"):
        return None
    rest = {k: v for k, v in config.items() if k not in GRID_KEYS}
    robust = (config["robustness"], config["robust_c"]) if config["penalty"] == "robust" else None
    return json.dumps(rest, sort_keys=True) + "|" + json.dumps(robust)


def grid_groups(configs: Dict[str, Dict[str, Any]]) -> List[List[str]]:
    """The keys of ``configs`` in groups that can each train as one grid (in the given order).

    Robust members with different ``robustness`` go to different groups (the exponent selects the
    code path); plain and centroid members join the first group of their shapes.
    """
    alone: List[List[str]] = []
    shapes: Dict[str, List[list]] = {}  # shape -> [[robust (r, C) or None, keys], ...]
    for k, c in configs.items():
        key = grid_key(c)
        if key is None:
            alone.append([k])
            continue
        shape, robust = key.rsplit("|", 1)
        parts = shapes.setdefault(shape, [])
        if robust == "null":  # plain or centroid: the first group of its shape
            if not parts:
                parts.append([None, []])
            parts[0][1].append(k)
            continue
        part = next((p for p in parts if p[0] in (None, robust)), None)
        if part is None:
            part = [robust, []]
            parts.append(part)
        part[0] = robust
        part[1].append(k)
    return [p[1] for parts in shapes.values() for p in parts] + alone


def _with(obj, **fields):
    """A copy of a frozen dataclass with some fields replaced, without its validation (tensors)."""
    new = copy.copy(obj)
    for k, v in fields.items():
        object.__setattr__(new, k, v)
    return new


def _penalties(algorithm) -> Dict[str, Any]:
    p = algorithm.penalty
    terms = () if p is None else (p.terms if isinstance(p, SumPenalty) else (p,))
    found = {}
    for t in terms:
        kind = next((k for k, cls in _KINDS.items() if type(t) is cls), None)
        if kind is None:
            raise ConfigError(f"a grid holds centroid and robust penalties only, not {type(t).__name__}")
        found[kind] = t
    return found


class GridRun(Run):
    """The members' runs (each a :class:`Run` of its own configuration, all its seeds) trained as one.

    ``members`` are :class:`Run` objects, fresh or loaded from their checkpoints, all at the same
    iteration. The grid's run ``j`` is seed ``j`` of the members concatenated in order; ``member(k)``
    writes the grid's state back into member ``k`` (for its checkpoint and metrics).
    """

    def __init__(self, members: Sequence[Run]):
        members = list(members)
        if len(members) < 2:
            raise ConfigError("a grid needs two configurations or more")
        keys = {grid_key(m.config) for m in members}
        if None in keys or len({k.rsplit("|", 1)[0] for k in keys}) > 1 or \
                len({k for k in keys if not k.endswith("|null")}) > 1:
            raise ConfigError("the configurations of a grid may differ only in " + ", ".join(GRID_KEYS) +
                              " (one robustness for the robust members), and none may be implicit or sharded")
        if len({m.iteration for m in members}) > 1:
            raise ConfigError("the members of a grid must be at the same iteration: resume them separately")
        first = members[0]
        self.members = members
        self.config = first.config
        self.tasks, self.model, self.device, self.dtype = first.tasks, first.model, first.device, first.dtype
        self.distributed = False
        self.slices, start = [], 0
        for m in members:
            self.slices.append(slice(start, start + m.runs))
            start += m.runs
        self.seeds = list(range(start))  # run indices: the members' seeds repeat
        # the algorithm of the vmapped step: the first member's, with the penalty kinds of all members
        found = [_penalties(m.algorithm) for m in members]
        self.kinds = {k: t for f in found for k, t in f.items()}
        terms = tuple(self.kinds.values())
        penalty = None if not terms else terms[0] if len(terms) == 1 else SumPenalty(terms=terms)
        self.algorithm = _with(first.algorithm, penalty=penalty)
        self.vectorised = True

        def column(values):
            return torch.tensor([v for m, v in zip(members, values) for _ in range(m.runs)],
                                dtype=self.dtype, device=self.device)

        self.hyper = {"inner_lr": column([float(m.algorithm.inner_lr) for m in members])}
        for kind, template in self.kinds.items():
            self.hyper[kind] = column([float(f[kind].weight) if kind in f else 0.0 for f in found])
            if kind == "centroid":  # the scale's alpha (a member without p_C: any positive value)
                self.hyper["centroid_alpha"] = column([float(f.get(kind, template).inner_lr) for f in found])
        self._gather()

    # ------------------------------------------------------------------ the members' values
    def algorithm_for(self, hyper):
        terms = []
        for kind, template in self.kinds.items():
            extra = {"inner_lr": hyper["centroid_alpha"]} if kind == "centroid" else {}
            terms.append(_with(template, weight=hyper[kind], **extra))
        penalty = None if not terms else terms[0] if len(terms) == 1 else SumPenalty(terms=tuple(terms))
        return _with(self.algorithm, inner_lr=hyper["inner_lr"], penalty=penalty)

    def _member_index(self, r: int) -> int:
        return next(k for k, sl in enumerate(self.slices) if sl.start <= r < sl.stop)

    def algorithm_of(self, r):
        return self.members[self._member_index(r)].algorithm

    # ------------------------------------------------------------------ gather / scatter
    def _gather(self) -> None:
        """The grid's state from its members' (theta, Adam, generators, outer state, history)."""
        ms = self.members
        self.theta = tree_map(lambda *xs: torch.cat([x.detach() for x in xs]).requires_grad_(True),
                              *[m.theta for m in ms])
        self.optimizer = torch.optim.Adam(tree_leaves(self.theta), lr=self.config["outer_lr"])
        states = [m.optimizer.state_dict() for m in ms]
        if states[0]["state"]:
            merged = copy.deepcopy(states[0])
            for i, entry in merged["state"].items():
                for name, value in entry.items():
                    if name != "step":
                        entry[name] = torch.cat([s["state"][i][name] for s in states])
            self.optimizer.load_state_dict(merged)
        self.generators = [g for m in ms for g in m.generators]  # shared objects: they stay in step
        self.state = tree_map(lambda *xs: torch.cat(xs), *[m.state for m in ms]) if ms[0].state else {}
        self.iteration = ms[0].iteration
        self.train_seconds = max(m.train_seconds for m in ms)
        self.warnings = sum(m.warnings for m in ms)
        self.diverged = {}
        self.history = {"iteration": list(ms[0].history["iteration"]), "train_loss": [], "val": []}
        for k, m in enumerate(ms):
            index = {s: j for j, s in zip(range(self.slices[k].start, self.slices[k].stop), m.seeds)}
            self.diverged.update({index[s]: it for s, it in m.diverged.items()})
            for s, b in m.history.get("blowups", {}).items():
                self.history.setdefault("blowups", {})[str(index[int(s)])] = b
        h0 = ms[0].history
        self.history["train_loss"] = [sum((m.history["train_loss"][i] for m in ms), []) for i in
                                      range(len(h0["train_loss"]))]
        self.history["val"] = [{"iteration": v["iteration"], "runs": sum((m.history["val"][i]["runs"] for m in ms), [])}
                               for i, v in enumerate(h0["val"])]
        if "initial_loss" in h0:
            self.history["initial_loss"] = sum((m.history["initial_loss"] for m in ms), [])
        if "block" in h0:
            self.history["block"] = {"sum": sum((m.history["block"]["sum"] for m in ms), []),
                                     "count": h0["block"]["count"]}
        self._eval_sets = {}

    def member(self, k: int) -> Run:
        """Member ``k`` with the grid's current state written back into it."""
        m, sl = self.members[k], self.slices[k]
        with torch.no_grad():
            for mine, ours in zip(tree_leaves(m.theta), tree_leaves(self.theta)):
                mine.copy_(ours[sl])
        sd = self.optimizer.state_dict()
        if sd["state"]:
            sd = copy.deepcopy(sd)
            for entry in sd["state"].values():
                for name, value in entry.items():
                    if name != "step":
                        entry[name] = value[sl].clone()
            m.optimizer.load_state_dict(sd)
        m.state = tree_map(lambda t: t[sl].clone(), self.state) if self.state else {}
        m.iteration, m.train_seconds, m.warnings = self.iteration, self.train_seconds, self.warnings
        m.diverged = {m.seeds[r - sl.start]: it for r, it in self.diverged.items() if sl.start <= r < sl.stop}
        h = self.history
        m.history = {"iteration": list(h["iteration"]), "train_loss": [v[sl] for v in h["train_loss"]],
                     "val": [{"iteration": v["iteration"], "runs": v["runs"][sl]} for v in h["val"]]}
        if "initial_loss" in h:
            m.history["initial_loss"] = h["initial_loss"][sl]
        if "block" in h:
            m.history["block"] = {"sum": h["block"]["sum"][sl], "count": h["block"]["count"]}
        m.history["blowups"] = {str(m.seeds[int(r) - sl.start]): b for r, b in h.get("blowups", {}).items()
                                if sl.start <= int(r) < sl.stop}
        return m


def train_grid(configs: Sequence[Dict[str, Any]], out_dirs: Sequence[str], *,
               stop_after: Optional[int] = None) -> List[Dict[str, Any]]:
    """Train resolved configurations that can share a grid into their own directories; returns each
    member's metrics (as :func:`~implicit_nash.meta.trainer.train` writes them).

    Every directory is new, or holds a checkpoint of its configuration (the number of iterations
    may grow: a run is extended) at the same iteration as the others: the grid resumes from them.
    ``stop_after``: stop after that many iterations without finishing (a test hook, as in ``train``).
    """
    if len(configs) != len(out_dirs):
        raise ConfigError("train_grid needs one output directory per configuration")
    if len({c["iterations"] for c in configs}) > 1:
        raise ConfigError("the members of a grid must have the same number of iterations")
    threads = configs[0].get("threads") or default_threads(configs[0])
    if threads:
        torch.set_num_threads(threads)
    members = []
    for c, out in zip(configs, out_dirs):
        out_p = Path(out)
        m = Run(c)
        if (out_p / CHECKPOINT).is_file():
            saved = load_checkpoint(out_p / CHECKPOINT, "resume")
            from .config import upgrade
            if {**upgrade(saved["config"]), "iterations": c["iterations"]} != c:
                raise ConfigError(f"{out} holds a run of another configuration; use another output directory")
            if saved["iteration"] > c["iterations"]:
                raise ConfigError(f"{out} has already run {saved['iteration']} iterations, more than {c['iterations']}")
            m.load_state_dict(saved)
            m.config = c
        elif (out_p / "metrics.json").exists():
            raise ConfigError(f"{out} already holds a finished run without a checkpoint")
        out_p.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out_p / "config.json", json.dumps(c, indent=2, sort_keys=True))
        members.append(m)
    grid = GridRun(members)
    total, mt, done_here = configs[0]["iterations"], grid.tasks.metric, 0
    c = configs[0]

    def save_all():
        for k, out in enumerate(out_dirs):
            _atomic_save(grid.member(k).state_dict(), Path(out) / CHECKPOINT)

    def progress_all():
        for out in out_dirs:
            _atomic_write_text(Path(out) / "progress.json", json.dumps({"iteration": grid.iteration, "total": total}))

    progress_all()
    while grid.iteration < total:
        t0 = time.perf_counter()
        losses = grid.step()
        grid.train_seconds += time.perf_counter() - t0
        grid.record(losses, final=grid.iteration == total)
        done_here += 1
        if grid.iteration % c["eval_every"] == 0 or grid.iteration == total:
            results = grid.evaluate("val")
            grid.history["val"].append({"iteration": grid.iteration, "runs": [
                {k: v[k] for k in (f"{mt}_mean", f"{mt}_worst", f"{mt}_std")} for v in results]})
        if grid.iteration % c["checkpoint_every"] == 0 or grid.iteration == total:
            save_all()
        if grid.iteration % 200 == 0 or grid.iteration == total:
            progress_all()
        if stop_after is not None and done_here >= stop_after and grid.iteration < total:
            save_all()
            return [{"stopped_at": grid.iteration} for _ in out_dirs]
    metrics = []
    for k, out in enumerate(out_dirs):
        m = _finish(grid.member(k), Path(out))
        m["trained_in_grid"] = len(out_dirs)
        _atomic_write_text(Path(out) / "metrics.json", json.dumps(m, indent=2))
        metrics.append(m)
    return metrics
