"""Run configuration: defaults, the paper's presets, validation, and building the algorithm.

A configuration is a flat dict of plain values (what ``--config FILE`` holds and what
``metrics.json`` records as ``config``). :func:`resolve` merges, in order, the defaults, the preset of
the task and algorithm (the paper's hyperparameters), a config file, and explicit command-line
values, and rejects unknown keys and inconsistent values with a :class:`ConfigError` whose message is
one line.

Decisions where the paper is ambiguous (each is a key, so a flag):

* ``penalty_alpha``: the :math:`\\alpha` of the centroid penalty's :math:`(B/(\\alpha N))^2` scale.
  The inner learning rate, except Meta-SGD, where Appendix E says 0.05.
* ``num_tasks``: N of the scale. For sinusoid the 100 amplitude sub-intervals of meta-training.
* ``robust_c``: the constant C of eq. 14, which the paper does not give: 1e-8.
* The robust penalty gets no :math:`(B/(\\alpha N))^2` factor: eq. 14 has none and Appendix E derives
  it for :math:`p_C` only.
* Evaluation adapts each test task with the plain inner problem (no Nash penalty, which couples the
  tasks of a training batch): ``eval_penalty = false``.
* ``query_shots``: 5 query points per meta-training task (K, as in MAML's sinusoid code).
* ``lr_init``: Meta-SGD's initial step sizes. ``null``: ``inner_lr`` everywhere (the paper gives
  α = 0.001 for every algorithm); ``[lo, hi]``: uniform draws, as Li et al. (2017) do with
  [0.005, 0.1] for sinusoids.
* ``lr_clip``: Meta-SGD's learned step sizes clamped to ``[lo, hi]`` in the inner steps (``null``: not
  clamped, as Li et al. and the paper). Not the paper's: a setting in which Meta-SGD with more than one
  inner step trains stably (``results/metasgd_stable/``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

from ..penalties import CentroidPenalty, ProximalPenalty, RobustPenalty
from ..solvers import PRGD
from . import ALGORITHMS
from .base import TASK_VECTORISATIONS
from .inner import NewtonKrylov

__all__ = ["ConfigError", "DEFAULTS", "PRESETS", "resolve", "build_algorithm", "load_config_file", "upgrade",
           "unused_options"]


class ConfigError(ValueError):
    """An unknown or inconsistent configuration value (the message is one line)."""


DEFAULTS: Dict[str, Any] = {
    "task": "sinusoid",
    "algorithm": "maml",
    "penalty": "none",
    "weight": None,
    "robustness": 1.0,
    "robust_c": 1e-8,
    "penalty_alpha": None,      # None: the inner learning rate (Meta-SGD: 0.05)
    "num_tasks": None,          # None: the task family's number of meta-training tasks
    "meta_gradient": None,      # None: the algorithm's default
    "inner_steps": 3,
    "inner_lr": 0.001,
    "outer_lr": 0.001,
    "meta_batch": 25,
    "iterations": 70000,
    "seed": 0,
    "seeds": None,              # a list: train these seeds together (vectorised over runs)
    "context_dim": 4,
    "task_lr": 1e-5,
    "lam": 10.0,
    "lr_init": None,            # Meta-SGD: None (inner_lr everywhere) or [lo, hi] (uniform draws)
    "lr_clip": None,            # Meta-SGD: None, or [lo, hi]: the learned steps clamped to it in the inner steps
    "inner_max_steps": 200,
    "inner_solver": "newton",   # iMAML: "newton" (Newton-Krylov) or "prgd" (the core layer's PRGD)
    "inner_mode": "auto",       # iMAML (newton): "budgeted", "tolerance", or "auto": budgeted with a ReLU
                                # network (its inner minimiser sits on a kink: no tolerance can be met), else tolerance
    "inner_budget": None,       # iMAML: a fixed number of Newton steps (None: 2 when budgeted, else to tolerance)
    "cg_budget": None,          # iMAML: fixed backward Krylov iterations (None: 5 when budgeted, else to tolerance)
    "krylov_steps": None,       # iMAML: Krylov iterations per Newton step (None: 3 budgeted, exactly; 20 at most
                                # to tolerance)
    "hypergrad_check_every": 100,  # budgeted iMAML: measure the meta-gradient's error every k iterations
    "compiled": False,          # budgeted iMAML: the Newton steps' and the backward's Krylov iterations as
                                # compiled programs (torch.compile, inductor); the first iterations compile
    "throw": None,              # None: False for iMAML (see IMAML's docstring), True otherwise
    "hidden": [40, 40],
    "activation": "relu",
    "shots": 5,
    "query_shots": 5,
    "eval_every": 1000,
    "val_tasks": 980,
    "val_seed": 777,
    "test_tasks": 5000,
    "test_seed": 12345,
    "eval_batch": 500,          # evaluation tasks adapted together (peak memory grows with it, not with the tasks)
    "eval_penalty": False,
    "checkpoint_every": 1000,
    "data_root": None,
    "ways": 5,
    "filters": 32,
    "image_size": 32,
    "task_vectorisation": "auto",  # the tasks of a batch: "auto", "vmap" or "loop" (Algorithm.task_vectorisation)
    "distributed": False,       # shard the meta-batch over torch.distributed ranks (under torchrun)
    "device": "cpu",
    "dtype": "float32",
    "threads": None,
}

# The paper's hyperparameters (Appendix F; Section 4.1): sinusoid, 3 inner steps, alpha = beta =
# 0.001, meta-batch 25, 70,000 iterations, TR-MAML task-probability rate 1e-5, 4 CAVIA contexts.
PRESETS: Dict[str, Dict[str, Any]] = {
    "sinusoid": {"inner_steps": 3, "inner_lr": 0.001, "outer_lr": 0.001, "meta_batch": 25,
                 "iterations": 70000, "task_lr": 1e-5, "context_dim": 4, "hidden": [40, 40],
                 "activation": "relu", "shots": 5},
}

# Image completion (Appendix F): CelebA, 100 shots, 5 inner steps, meta-batch 25, 50,000 iterations,
# CAVIA with 128 contexts, CAVIA's network (5 hidden layers of 128). The paper's "(alpha, beta) =
# (0.001, 0.1)" is read as (outer, inner): inner lr 0.1, Adam lr 0.001 -- the values of CAVIA's
# reference code for MAML on CelebA; taken literally (inner 0.001, Adam 0.1) MAML diverges within a few
# iterations. Appendix F's MiniImageNet pairs read the same way: CAVIA's "(0.001, 1)" is CAVIA's
# reference setting (inner 1.0, Adam 0.001), and MAML's "(0.0001, 0.01)" gives MAML's inner 0.01 (Finn
# et al.) with Adam 1e-4. See docs/nash_gbml.rst, "Image presets".
PRESETS["celeba"] = {"inner_steps": 5, "inner_lr": 0.1, "outer_lr": 0.001, "meta_batch": 25,
                     "iterations": 50000, "context_dim": 128, "hidden": [128] * 5, "activation": "relu",
                     "shots": 100, "query_shots": None, "image_size": 32, "val_tasks": 500, "test_tasks": 5000,
                     "eval_batch": 100}
# MiniImageNet 5-way 5-shot (Appendix F): conv-4 with 32 filters, 5 inner steps, meta-batch 2,
# 60,000 iterations; inner lr 0.01, Adam 1e-4 (MAML, Meta-SGD), inner 1.0, Adam 0.001 (CAVIA, with
# 100 context parameters). 15 query images per class and 600 test episodes are the usual protocol.
PRESETS["miniimagenet"] = {"inner_steps": 5, "inner_lr": 0.01, "outer_lr": 1e-4, "meta_batch": 2,
                           "iterations": 60000, "ways": 5, "shots": 5, "query_shots": 15, "filters": 32,
                           "image_size": 84, "context_dim": 100, "val_tasks": 100, "test_tasks": 600,
                           "eval_batch": 1}  # by measurement: benchmarks/results/eval_memory.md
# Real data that ships with scikit-image / scikit-learn (our choices, for short runs on this machine).
PRESETS["faces"] = {"inner_steps": 5, "inner_lr": 0.01, "outer_lr": 0.001, "meta_batch": 10, "iterations": 2000,
                    "context_dim": 128, "hidden": [128] * 5, "activation": "relu", "shots": 100,
                    "query_shots": None, "val_tasks": 10, "test_tasks": 10, "eval_every": 250,
                    "checkpoint_every": 250}
PRESETS["digits"] = {"inner_steps": 5, "inner_lr": 0.1, "outer_lr": 0.001, "meta_batch": 4, "iterations": 2000,
                     "ways": 3, "shots": 5, "query_shots": 10, "filters": 32, "context_dim": 32,
                     "val_tasks": 100, "test_tasks": 600, "eval_every": 250, "checkpoint_every": 250}
# CAVIA on digits: inner lr 10 for the context (the digits preset's 0.1 left every CAVIA row at chance).
# Chosen on validation data only (the 20% held-out images of the meta-training classes 0-6, never the
# test classes 7-9): 3 seeds x 250 iterations, validation accuracy at iteration 250 for inner lr 0.1 /
# 1 / 10 / 100: 0.327 / 0.907 / 0.980 / 0.977 (docs/reproduce.rst, "CAVIA's inner learning rate").
ALGORITHM_PRESETS = {("miniimagenet", "cavia"): {"inner_lr": 1.0, "outer_lr": 1e-3},
                     ("digits", "cavia"): {"inner_lr": 10.0}}

TASKS = tuple(PRESETS)
PENALTIES = ("none", "centroid", "robust", "proximal")

# Options that only some runs use: (what uses it, a test on the resolved configuration). An option
# given explicitly to a run that does not use it is refused instead of being silently ignored.
_USED_BY = {
    "data_root": ("the celeba and miniimagenet tasks", lambda c: c["task"] in ("celeba", "miniimagenet")),
    "ways": ("the classification tasks (digits, miniimagenet)", lambda c: c["task"] in ("digits", "miniimagenet")),
    "filters": ("the classification tasks (digits, miniimagenet)", lambda c: c["task"] in ("digits", "miniimagenet")),
    "context_dim": ("--algorithm cavia", lambda c: c["algorithm"] == "cavia"),
    "task_lr": ("--algorithm trmaml", lambda c: c["algorithm"] == "trmaml"),
    **{key: ("--algorithm imaml", lambda c: c["algorithm"] == "imaml")
       for key in ("lam", "inner_solver", "inner_mode", "inner_budget", "cg_budget", "krylov_steps",
                   "hypergrad_check_every", "compiled")},
    "robustness": ("--penalty robust", lambda c: c["penalty"] == "robust"),
    "robust_c": ("--penalty robust", lambda c: c["penalty"] == "robust"),
    "penalty_alpha": ("--penalty centroid", lambda c: c["penalty"] == "centroid"),
    "num_tasks": ("--penalty centroid", lambda c: c["penalty"] == "centroid"),
}


def unused_options(config: Dict[str, Any], given) -> None:
    """Refuse the options in ``given`` (keys set explicitly) that the resolved ``config`` does not use."""
    for key in given:
        if key in _USED_BY and not _USED_BY[key][1](config):
            raise ConfigError(f"--{key.replace('_', '-')} is used only by {_USED_BY[key][0]}, not by this "
                              f"{config['task']} {config['algorithm']} run; drop it")


def upgrade(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A configuration saved by an earlier version, with the options added since at their defaults
    (so that finished and interrupted runs stay usable when new options appear). A run saved before
    ``inner_mode`` existed keeps the mode its budgets gave it."""
    old = dict(saved)
    if "inner_mode" not in old:  # saved before it existed, when krylov_steps defaulted to 20
        if old.get("algorithm") == "imaml" and old.get("inner_solver", "newton") == "newton":
            old["inner_mode"] = "budgeted" if old.get("inner_budget") or old.get("cg_budget") else "tolerance"
            old.setdefault("krylov_steps", 20)
        else:
            old["krylov_steps"] = None
    return {**DEFAULTS, **old}


def read_json_object(path: str, what: str) -> Dict[str, Any]:
    """A JSON object from a file, or a one-line :class:`ConfigError` naming ``what`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object")
    return data


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a JSON config file (keys as in :data:`DEFAULTS`, dashes allowed)."""
    data = read_json_object(path, "config file")
    data.pop("config", None)
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve(cli: Optional[Dict[str, Any]] = None, file: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Defaults < preset < config file < explicit values (``None`` in ``cli`` means not given)."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    file = dict(file or {})
    for source, name in ((file, "config file"), (cli, "option")):
        unknown = sorted(set(source) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown {name} key(s): {', '.join(unknown)}")
    task = cli.get("task", file.get("task", DEFAULTS["task"]))
    if task not in PRESETS:
        raise ConfigError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    algorithm = cli.get("algorithm", file.get("algorithm", DEFAULTS["algorithm"]))
    config = {**DEFAULTS, **PRESETS[task], **ALGORITHM_PRESETS.get((task, algorithm), {}), **file, **cli}
    _validate(config)
    _resolve_inner_mode(config)
    return config


BUDGET_DEFAULTS = {"inner_budget": 2, "krylov_steps": 3, "cg_budget": 5}


def _resolve_inner_mode(c: Dict[str, Any]) -> None:
    """iMAML's inner mode made concrete (written to config.json as such): ``auto`` is ``budgeted``
    with a ReLU network, whose inner minimiser sits on a kink where no tolerance can be met (see
    :mod:`implicit_nash.meta.inner`), and ``tolerance`` otherwise; explicit budgets mean budgeted.
    Budgeted fills the budgets not given with :data:`BUDGET_DEFAULTS` (when neither budget is given);
    tolerance uses at most 20 Krylov iterations per Newton step."""
    if c["algorithm"] != "imaml":
        return
    given = c["inner_budget"] is not None or c["cg_budget"] is not None
    mode = c["inner_mode"]
    if c["inner_solver"] != "newton":
        if given or mode == "budgeted" or c["krylov_steps"] is not None or c.get("compiled"):
            raise ConfigError("the budgeted mode, --krylov-steps and --compiled belong to the Newton-Krylov inner "
                              "solver; drop them or use --inner-solver newton")
        c["inner_mode"] = "tolerance"
        return
    if mode == "tolerance" and given:
        raise ConfigError("--inner-mode tolerance solves to tolerance; drop --inner-budget/--cg-budget, "
                          "or use --inner-mode budgeted")
    if mode == "auto":
        mode = "budgeted" if given or c["activation"] == "relu" else "tolerance"
    c["inner_mode"] = mode
    if c.get("compiled") and mode == "tolerance":
        raise ConfigError("--compiled runs the budgeted mode's fixed Krylov iterations; this run solves to "
                          "tolerance: drop --compiled or use --inner-mode budgeted")
    if mode == "budgeted":
        if not given:
            c["inner_budget"], c["cg_budget"] = BUDGET_DEFAULTS["inner_budget"], BUDGET_DEFAULTS["cg_budget"]
        if c["krylov_steps"] is None:
            c["krylov_steps"] = BUDGET_DEFAULTS["krylov_steps"]
    elif c["krylov_steps"] is None:
        c["krylov_steps"] = 20


def _num(config, key, *, positive=True, integer=False, allow_zero=False):
    v = config[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{key} must be a finite number, got {v!r}")
    if integer and int(v) != v:
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    if positive and (v < 0 or (v == 0 and not allow_zero)):
        raise ConfigError(f"{key} must be {'non-negative' if allow_zero else 'positive'}, got {v!r}")
    if integer:
        config[key] = int(v)


def _validate(c: Dict[str, Any]) -> None:
    if c["algorithm"] not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {c['algorithm']!r}; choose from {', '.join(ALGORITHMS)}")
    if c["penalty"] not in PENALTIES:
        raise ConfigError(f"unknown penalty {c['penalty']!r}; choose from {', '.join(PENALTIES)}")
    if c["penalty"] == "none" and c["weight"] is not None:
        raise ConfigError("--weight is given but --penalty is none; choose --penalty centroid, robust or proximal")
    if c["penalty"] != "none" and c["weight"] is None:
        raise ConfigError(f"--penalty {c['penalty']} needs --weight W")
    if c["penalty"] != "none":
        _num(c, "weight", allow_zero=True)
    for key in ("inner_steps", "meta_batch", "iterations", "context_dim", "inner_max_steps", "shots",
                "eval_every", "val_tasks", "test_tasks", "checkpoint_every", "eval_batch", "ways", "filters", "image_size"):
        _num(c, key, integer=True)
    if c["query_shots"] is not None:
        _num(c, "query_shots", integer=True)
    if c["data_root"] is not None and not isinstance(c["data_root"], str):
        raise ConfigError(f"data_root must be a path, got {c['data_root']!r}")
    if c["algorithm"] == "trmaml" and c["task"] in ("digits", "miniimagenet"):
        raise ConfigError("trmaml keeps a probability per training task; classification has C(classes, ways) "
                          "tasks, too many to track: use it on sinusoid, faces or celeba")
    for key in ("inner_lr", "outer_lr", "task_lr", "lam", "robust_c", "robustness"):
        _num(c, key)
    if c["robustness"] < 1:
        raise ConfigError(f"robustness must be >= 1, got {c['robustness']!r}")
    for key in ("seed", "val_seed", "test_seed"):
        _num(c, key, integer=True, allow_zero=True)
    if c["inner_solver"] not in ("newton", "prgd"):
        raise ConfigError(f"inner_solver must be newton or prgd, got {c['inner_solver']!r}")
    if c["inner_mode"] not in ("auto", "budgeted", "tolerance"):
        raise ConfigError(f"inner_mode must be auto, budgeted or tolerance, got {c['inner_mode']!r}")
    if c["krylov_steps"] is not None:
        _num(c, "krylov_steps", integer=True)
    if not isinstance(c["compiled"], bool):
        raise ConfigError(f"compiled must be true or false, got {c['compiled']!r}")
    for key in ("inner_budget", "cg_budget"):
        if c[key] is not None:
            _num(c, key, integer=True)
            if c["algorithm"] != "imaml":
                raise ConfigError(f"{key} sets iMAML's fixed budget; {c['algorithm']} has none")
    _num(c, "hypergrad_check_every", integer=True, allow_zero=True)
    for key in ("penalty_alpha", "num_tasks", "threads"):
        if c[key] is not None:
            _num(c, key, integer=key != "penalty_alpha")
    if c["seeds"] is not None:
        seeds = c["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds):
            raise ConfigError(f"seeds must be a non-empty list of non-negative integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds must be distinct, got {seeds!r}")
    _check_task_vectorisation(c)
    if c["meta_gradient"] is not None and c["meta_gradient"] not in ("unrolled", "first_order", "implicit"):
        raise ConfigError(f"unknown meta_gradient {c['meta_gradient']!r}; choose unrolled, first_order or implicit")
    if c["algorithm"] == "fomaml" and c["meta_gradient"] not in (None, "first_order"):
        raise ConfigError("fomaml is MAML with meta_gradient first_order; use --algorithm maml for "
                          f"{c['meta_gradient']}")
    if c["device"] not in ("cpu", "cuda") and not str(c["device"]).startswith("cuda:"):
        raise ConfigError(f"device must be cpu or cuda, got {c['device']!r}")
    if c["dtype"] not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {c['dtype']!r}")
    if c["activation"] not in ("relu", "tanh"):
        raise ConfigError(f"activation must be relu or tanh, got {c['activation']!r}")
    if not isinstance(c["hidden"], list) or not c["hidden"] or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in c["hidden"]):
        raise ConfigError(f"hidden must be a non-empty list of positive integers, got {c['hidden']!r}")
    for key in ("eval_penalty", "distributed"):
        if not isinstance(c[key], bool):
            raise ConfigError(f"{key} must be true or false, got {c[key]!r}")
    if c["throw"] is not None and not isinstance(c["throw"], bool):
        raise ConfigError(f"throw must be true or false, got {c['throw']!r}")
    for key, what in (("lr_init", "initial step sizes"), ("lr_clip", "step-size clamp")):
        lr = c[key]
        if lr is None:
            continue
        if c["algorithm"] != "metasgd":
            raise ConfigError(f"{key} sets Meta-SGD's {what}; {c['algorithm']} has none")
        if (not isinstance(lr, (list, tuple)) or len(lr) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in lr)
                or not 0 <= lr[0] < lr[1]):
            raise ConfigError(f"{key} must be [lo, hi] with 0 <= lo < hi, got {lr!r}")
        c[key] = [float(x) for x in lr]
    if c["task"] == "sinusoid":
        for key in ("test_tasks", "val_tasks"):
            if c[key] < 490:
                raise ConfigError(f"{key} must be at least 490 (one per test sub-interval), got {c[key]}")


def _check_task_vectorisation(c: Dict[str, Any]) -> None:
    """``task_vectorisation`` is auto, vmap or loop; ``loop`` only where the tasks can be looped over."""
    tv = c["task_vectorisation"]
    if tv not in TASK_VECTORISATIONS:
        raise ConfigError(f"task_vectorisation must be one of {', '.join(TASK_VECTORISATIONS)}, got {tv!r}")
    if tv != "loop":
        return
    if c["algorithm"] == "imaml" or c["meta_gradient"] == "implicit":
        raise ConfigError("task_vectorisation loop: the implicit meta-gradient always vmaps the tasks; use auto or vmap")
    if c["seeds"] is not None and len(c["seeds"]) > 1:
        raise ConfigError("task_vectorisation loop: seeds trained together are vmapped, and their tasks with them; "
                          "train one seed (--seed) or use auto or vmap")


def build_algorithm(c: Dict[str, Any], num_train_tasks: int, loss: str = "mse"):
    """The algorithm object a resolved configuration describes."""
    name = c["algorithm"]
    N = c["num_tasks"] if c["num_tasks"] is not None else num_train_tasks
    alpha = c["penalty_alpha"]
    if alpha is None:
        alpha = 0.05 if name == "metasgd" else c["inner_lr"]
    penalty = None
    try:
        if c["penalty"] == "centroid":
            penalty = CentroidPenalty(weight=float(c["weight"]), num_tasks=N, inner_lr=float(alpha))
        elif c["penalty"] == "robust":
            penalty = RobustPenalty(weight=float(c["weight"]), robustness=float(c["robustness"]),
                                    C=float(c["robust_c"]))
        elif c["penalty"] == "proximal":
            penalty = ProximalPenalty(lam=float(c["weight"]))
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    kwargs: Dict[str, Any] = {"inner_steps": c["inner_steps"], "inner_lr": float(c["inner_lr"]), "penalty": penalty,
                              "loss": loss, "task_vectorisation": c["task_vectorisation"]}
    if c["meta_gradient"] is not None:
        kwargs["meta_gradient"] = c["meta_gradient"]
    if name == "cavia":
        kwargs["context_dim"] = c["context_dim"]
    if name == "trmaml":
        kwargs["task_lr"] = float(c["task_lr"])
    if name == "imaml":
        kwargs["lam"] = float(c["lam"])
    for key in ("lr_init", "lr_clip"):
        if name == "metasgd" and c[key] is not None:
            kwargs[key] = tuple(c[key])
    kwargs["throw"] = (name != "imaml") if c["throw"] is None else c["throw"]
    if name == "imaml" and c["inner_solver"] == "newton":
        kwargs["newton"] = NewtonKrylov(max_steps=min(c["inner_max_steps"], 50), krylov_steps=c["krylov_steps"] or 20)
        kwargs["budget"] = c["inner_budget"]
        kwargs["cg_budget"] = c["cg_budget"]
        kwargs["compiled"] = bool(c["compiled"])
    else:
        kwargs["solver"] = PRGD(max_steps=c["inner_max_steps"])
    try:
        return ALGORITHMS[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
