"""Seconds per meta-iteration of second-order MAML: implicit_nash vs learn2learn vs higher.

Problem (identical for every method): 5-shot sinusoid regression (``implicit_nash.tasks.SinusoidTasks``,
5 support and 5 query points per task), meta-batch of 25 tasks, network 1-40-40-1 ReLU
(``implicit_nash.tasks.mlp``, 1,761 parameters), 3 inner SGD steps with inner lr 0.001 on the
support MSE, outer loss the mean query MSE over the tasks, meta-gradient second order (back-propagated
through the inner steps), Adam outer step with lr 0.001, float32.

One meta-iteration = inner adaptation of all 25 tasks + meta-gradient + Adam step. Methods:

* ``implicit_nash MAML``: ``MAML(inner_steps=3, inner_lr=0.001)``, every task at once (vmapped);
  ``algo.task_losses`` -> ``algo.outer_loss`` -> ``backward`` -> ``Adam.step``;
* ``implicit_nash Nash-MAML (centroid)``: the same with
  ``penalty=CentroidPenalty(weight=0.1, num_tasks=100, inner_lr=0.001)``;
* ``implicit_nash Nash-MAML (robust)``: the same with ``penalty=RobustPenalty(weight=0.01, robustness=2.0)``;
* ``implicit_nash FOMAML`` (first order, for reference);
* ``learn2learn MAML``: ``learn2learn.algorithms.MAML(model, lr=0.001, first_order=False)``, a Python
  loop over the tasks (``learner = maml.clone()``; 3 x ``learner.adapt(support_loss)``), the query
  losses summed, divided by 25 and back-propagated once (the idiom of learn2learn's
  ``examples/maml_sine.py``);
* ``higher``: ``higher.innerloop_ctx(model, SGD(lr=0.001), copy_initial_weights=False)`` per task,
  3 x ``diffopt.step(support_loss)`` (second order: ``track_higher_grads=True``), then
  ``(query_loss / 25).backward()`` inside the context (the idiom of higher's MAML example).

Before any timing, the meta-gradients are checked in float64 on one batch: implicit_nash's MAML
against learn2learn's and higher's (and implicit_nash's FOMAML against learn2learn's
``first_order=True``); the run aborts when a max relative difference (max |g - g_ref| / max |g_ref|
over all parameters) exceeds ``--rtol`` (1e-8). The MAML vs FOMAML difference is recorded too: it
shows that the check sees the second-order terms.

Timing: one process, ``torch.set_num_threads(1)`` by default (``--threads``); warm-up iterations of
every method; then ``--reps`` repetitions (default 7). Each repetition samples its ``--iters``
(default 20) meta-batches once from one generator, resets every method to the same initial
network and a fresh Adam, and runs the methods in a shuffled order over those same batches. The
seconds per meta-iteration of a repetition is its block time / ``--iters``; the report gives the
median and interquartile range over the repetitions, and ratios against learn2learn from the same
run. Targets: implicit_nash MAML at least 6x faster than learn2learn; each Nash-MAML variant at most
1.3x the plain implicit_nash MAML.

learn2learn 0.2.0 does not install with pip on Python 3.11 (its shipped Cython-generated C does not
compile) and its top-level ``import learn2learn`` needs gym and a working torchvision; see
``benchmarks/requirements-meta-peers.txt`` for how it was installed. When the top-level import
fails, the script imports only the ``learn2learn.algorithms`` subpackage (pure torch) from the
installed package, without running ``learn2learn/__init__.py``, and records that it did.

Usage (from the repository root)::

    python benchmarks/meta_vs_peers.py            # writes benchmarks/results/meta_vs_peers.{json,md}
    python benchmarks/meta_vs_peers.py --quick    # smoke test: writes meta_vs_peers_quick.{json,md}
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import importlib.util
import random
import statistics
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import _common
from _common import fmt, median

_common.ensure_importable()

import torch  # noqa: E402
import torch.nn.functional as nnf  # noqa: E402

from implicit_nash.meta import FOMAML, MAML  # noqa: E402
from implicit_nash.penalties import CentroidPenalty, RobustPenalty  # noqa: E402
from implicit_nash.tasks import SinusoidTasks, mlp  # noqa: E402

NAME = "meta_vs_peers"
SIZES = [1, 40, 40, 1]
SHOTS = 5
QUERY_SHOTS = 5
META_BATCH = 25
INNER_STEPS = 3
INNER_LR = 1e-3
OUTER_LR = 1e-3
NUM_TASKS = 100          # N of the centroid penalty's scale (SinusoidTasks has 100 meta-training tasks)
REFERENCE = "learn2learn MAML"
BASE = "implicit_nash MAML"
SPEEDUP_TARGET = 6.0     # implicit_nash MAML at least this many times faster than learn2learn
NASH_TARGET = 1.3        # Nash-MAML variants at most this many times the plain implicit_nash MAML


def import_learn2learn() -> Tuple[Any, str]:
    """``learn2learn`` as installed, or only its ``algorithms`` subpackage when the full import fails.

    The full ``import learn2learn`` also imports its vision, gym and text subpackages (torchvision,
    gym); on a CPU-only torch build no torchvision wheel loads, so the fallback creates the package
    module from its installed spec without executing ``learn2learn/__init__.py`` and imports
    ``learn2learn.algorithms`` (torch only) from the installed files.

    Returns:
        The package module and a sentence saying how it was imported.
    """
    try:
        import learn2learn  # noqa: F401
        importlib.import_module("learn2learn.algorithms")
        return sys.modules["learn2learn"], "full `import learn2learn`"
    except Exception as err:  # noqa: BLE001 - a broken torchvision raises RuntimeError, not ImportError
        reason = f"{type(err).__name__}: {err}"
    for name in [n for n in sys.modules if n == "learn2learn" or n.startswith("learn2learn.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("learn2learn")
    if spec is None:
        raise ImportError("learn2learn is not installed; see benchmarks/requirements-meta-peers.txt")
    package = importlib.util.module_from_spec(spec)  # __path__ set, __init__.py not executed
    sys.modules["learn2learn"] = package
    importlib.import_module("learn2learn.algorithms")
    return package, (f"only the `learn2learn.algorithms` subpackage of the installed package (the full "
                     f"`import learn2learn` failed with {reason})")


def version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The task loss of every method: the mean squared error over a task's points."""
    return nnf.mse_loss(pred, y)


class Method:
    """One way to run a meta-iteration. ``forward_backward`` fills the meta-parameters' ``.grad``."""

    def named_parameters(self) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward_backward(self, batch: Dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def reset(self, init: Dict[str, torch.Tensor]) -> None:
        """Meta-parameters to ``init`` and a fresh Adam (same start for every method)."""
        with torch.no_grad():
            for name, p in self.named_parameters().items():
                p.copy_(init[name])
        self.opt = torch.optim.Adam(list(self.named_parameters().values()), lr=OUTER_LR)

    def step(self, batch: Dict[str, Any]) -> torch.Tensor:
        """One meta-iteration: zero the gradients, meta-gradient, Adam step."""
        self.opt.zero_grad()
        loss = self.forward_backward(batch)
        self.opt.step()
        return loss

    def meta_gradient(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """The meta-gradient of the timed code path, without the Adam step."""
        for p in self.named_parameters().values():
            p.grad = None
        self.forward_backward(batch)
        return {k: p.grad.detach().clone() for k, p in self.named_parameters().items()}


class ImplicitNash(Method):
    def __init__(self, model: torch.nn.Module, algo):
        self.model = model
        self.algo = algo
        self.theta = algo.init(model)
        self.reset({k: v.detach() for k, v in self.theta["params"].items()})

    def named_parameters(self):
        return self.theta["params"]

    def forward_backward(self, batch):
        losses = self.algo.task_losses(self.model, self.theta, batch)
        loss = self.algo.outer_loss(losses, batch, {})
        loss.backward()
        return loss.detach()


class Learn2Learn(Method):
    def __init__(self, l2l, model: torch.nn.Module, first_order: bool = False):
        self.maml = l2l.algorithms.MAML(model, lr=INNER_LR, first_order=first_order)
        self.reset({k: v.detach() for k, v in self.named_parameters().items()})

    def named_parameters(self):
        return dict(self.maml.module.named_parameters())

    def forward_backward(self, batch):
        tasks = batch["per_task"]
        total = 0.0
        for xs, ys, xq, yq in tasks:
            learner = self.maml.clone()
            for _ in range(INNER_STEPS):
                learner.adapt(mse(learner(xs), ys))
            total = total + mse(learner(xq), yq)
        loss = total / len(tasks)
        loss.backward()
        return loss.detach()


class Higher(Method):
    def __init__(self, higher, model: torch.nn.Module):
        self.higher = higher
        self.model = model
        self.inner_opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)
        self.reset({k: v.detach() for k, v in self.named_parameters().items()})

    def named_parameters(self):
        return dict(self.model.named_parameters())

    def forward_backward(self, batch):
        tasks = batch["per_task"]
        total = 0.0
        for xs, ys, xq, yq in tasks:
            with self.higher.innerloop_ctx(self.model, self.inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(INNER_STEPS):
                    diffopt.step(mse(fmodel(xs), ys))
                query = mse(fmodel(xq), yq) / len(tasks)
                query.backward()
            total = total + query.detach()
        return total


def make_methods(l2l, higher, model: torch.nn.Module, with_fo_reference: bool = False) -> Dict[str, Method]:
    """Every timed method, each with its own copy of ``model`` (same weights, same dtype)."""
    centroid = CentroidPenalty(weight=0.1, num_tasks=NUM_TASKS, inner_lr=INNER_LR)
    robust = RobustPenalty(weight=0.01, robustness=2.0)
    methods: Dict[str, Method] = {
        BASE: ImplicitNash(copy.deepcopy(model), MAML(inner_steps=INNER_STEPS, inner_lr=INNER_LR)),
        "implicit_nash Nash-MAML (centroid)": ImplicitNash(
            copy.deepcopy(model), MAML(inner_steps=INNER_STEPS, inner_lr=INNER_LR, penalty=centroid)),
        "implicit_nash Nash-MAML (robust)": ImplicitNash(
            copy.deepcopy(model), MAML(inner_steps=INNER_STEPS, inner_lr=INNER_LR, penalty=robust)),
        "implicit_nash FOMAML": ImplicitNash(copy.deepcopy(model), FOMAML(inner_steps=INNER_STEPS, inner_lr=INNER_LR)),
        REFERENCE: Learn2Learn(l2l, copy.deepcopy(model)),
        "higher MAML": Higher(higher, copy.deepcopy(model)),
    }
    if with_fo_reference:
        methods["learn2learn FOMAML (first_order=True)"] = Learn2Learn(l2l, copy.deepcopy(model), first_order=True)
    return methods


def sample_batch(tasks: SinusoidTasks, gen: torch.Generator, dtype) -> Dict[str, Any]:
    """A meta-batch, plus its per-task split for the looping peers (made here, outside the timing)."""
    batch = tasks.sample(META_BATCH, gen, dtype=dtype)
    batch["per_task"] = list(zip(batch["x_support"].unbind(0), batch["y_support"].unbind(0),
                                 batch["x_query"].unbind(0), batch["y_query"].unbind(0)))
    return batch


def max_rel_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    """max |a - b| / max |b| over all parameters together."""
    num = max(float((a[k] - b[k]).abs().max()) for k in b)
    den = max(float(b[k].abs().max()) for k in b)
    return num / den


def check_gradients(l2l, higher, model: torch.nn.Module, tasks: SinusoidTasks, seed: int,
                    rtol: float) -> Dict[str, Any]:
    """The float64 meta-gradient agreement check (abort on disagreement)."""
    model64 = copy.deepcopy(model).double()
    methods = make_methods(l2l, higher, model64, with_fo_reference=True)
    batch = sample_batch(tasks, torch.Generator().manual_seed(seed), torch.float64)
    grads = {name: m.meta_gradient(batch) for name, m in methods.items()}
    for name, g in grads.items():
        if not all(bool(torch.isfinite(t).all()) for t in g.values()):
            raise SystemExit(f"meta-gradient of {name} is not finite in the float64 check")
    pairs = [
        (BASE, REFERENCE, True),
        (BASE, "higher MAML", True),
        (REFERENCE, "higher MAML", True),
        ("implicit_nash FOMAML", "learn2learn FOMAML (first_order=True)", True),
        (BASE, "implicit_nash FOMAML", False),  # must differ: second-order terms
        (BASE, "implicit_nash Nash-MAML (centroid)", False),
        (BASE, "implicit_nash Nash-MAML (robust)", False),
    ]
    rows = []
    for a, b, must_agree in pairs:
        d = max_rel_diff(grads[a], grads[b])
        rows.append({"a": a, "b": b, "max_rel_difference": d, "must_agree": must_agree,
                     "ok": (d <= rtol) if must_agree else None})
        print(f"float64 meta-gradient  {a:>38s} vs {b:<40s}: max rel. difference {d:.2e}"
              + ("" if must_agree else "  (not expected to agree)"), flush=True)
    grad_norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads[BASE].values())))
    failed = [r for r in rows if r["ok"] is False]
    if failed:
        raise SystemExit("meta-gradients disagree beyond rtol = {:.0e}: {}; not timing".format(
            rtol, "; ".join(f"{r['a']} vs {r['b']}: {r['max_rel_difference']:.2e}" for r in failed)))
    return {"dtype": "float64", "rtol": rtol, "metric": "max |g_a - g_b| / max |g_b| over all parameters",
            "pairs": rows, "meta_gradient_norm": grad_norm}


def quartiles(values: List[float]) -> Tuple[float, float]:
    """First and third quartile (inclusive method; with one value both are that value)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def run_timing(methods: Dict[str, Method], tasks: SinusoidTasks, init: Dict[str, torch.Tensor], args
               ) -> Tuple[Dict[str, Dict[str, Any]], List[List[str]]]:
    """Warm-up, then ``args.reps`` repetitions of ``args.iters`` meta-iterations per method, shuffled."""
    warm_gen = torch.Generator().manual_seed(args.seed + 10_000)
    warm_batches = [sample_batch(tasks, warm_gen, torch.float32) for _ in range(args.warmup)]
    for m in methods.values():
        m.reset(init)
        for b in warm_batches:
            m.step(b)

    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    out = {name: {"per_iteration_s_by_rep": [], "iteration_times_s": [], "final_loss_by_rep": [],
                  "final_params": None} for name in methods}
    orders = []
    for rep in range(args.reps):
        batches = [sample_batch(tasks, gen, torch.float32) for _ in range(args.iters)]
        order = list(methods)
        rng.shuffle(order)
        orders.append(order)
        for name in order:
            m = methods[name]
            m.reset(init)
            times = []
            t_block = time.perf_counter()
            for b in batches:
                t0 = time.perf_counter()
                loss = m.step(b)
                times.append(time.perf_counter() - t0)
            block = time.perf_counter() - t_block
            out[name]["per_iteration_s_by_rep"].append(block / args.iters)
            out[name]["iteration_times_s"].append(times)
            out[name]["final_loss_by_rep"].append(float(loss))
            if rep == args.reps - 1:
                out[name]["final_params"] = {k: v.detach().clone() for k, v in m.named_parameters().items()}
        print(f"repetition {rep + 1}/{args.reps}: " + ", ".join(
            f"{n} {out[n]['per_iteration_s_by_rep'][-1] * 1e3:.1f} ms" for n in methods), flush=True)
    return out, orders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 repetitions of 5 meta-iterations (smoke test; writes meta_vs_peers_quick.*)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 7; 3 with --quick)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed meta-iterations per method and repetition (default 20; 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed meta-iterations per method first "
                                                                  "(default 5; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=1e-8,
                        help="largest max relative meta-gradient difference accepted in the float64 check")
    args = parser.parse_args()
    if args.reps is None:
        args.reps = 3 if args.quick else 7
    if args.iters is None:
        args.iters = 5 if args.quick else 20
    if args.warmup is None:
        args.warmup = 2 if args.quick else 5

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old peers import deprecated torch names
        l2l, l2l_import = import_learn2learn()
        import higher
    print(f"learn2learn {version('learn2learn')} imported as: {l2l_import}")
    print(f"higher {version('higher')}")

    env = _common.environment(threads=args.threads, repetitions=args.reps, iterations_per_repetition=args.iters,
                              warmup_iterations=args.warmup, learn2learn=version("learn2learn"),
                              learn2learn_import=l2l_import, higher=version("higher"),
                              implicit_nash_commit=_git_commit())

    tasks = SinusoidTasks(shots=SHOTS, query_shots=QUERY_SHOTS)
    model = mlp(SIZES)  # float32, initialised from the global seed: the common initial network
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    num_params = sum(v.numel() for v in init.values())

    check = check_gradients(l2l, higher, model, tasks, args.seed, args.rtol)

    methods = make_methods(l2l, higher, model)
    timing, orders = run_timing(methods, tasks, init, args)

    results: Dict[str, Dict[str, Any]] = {}
    ref = median(timing[REFERENCE]["per_iteration_s_by_rep"])
    base = median(timing[BASE]["per_iteration_s_by_rep"])
    for name, t in timing.items():
        per_rep = t["per_iteration_s_by_rep"]
        q1, q3 = quartiles(per_rep)
        med = median(per_rep)
        paired_ref = [r / s for r, s in zip(timing[REFERENCE]["per_iteration_s_by_rep"], per_rep)]
        paired_base = [s / b for s, b in zip(per_rep, timing[BASE]["per_iteration_s_by_rep"])]
        results[name] = {
            "median_s": med, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1,
            "min_s": min(per_rep), "max_s": max(per_rep),
            "median_single_iteration_s": median([x for rep in t["iteration_times_s"] for x in rep]),
            "speedup_vs_learn2learn": ref / med,
            "speedup_vs_learn2learn_paired_median": median(paired_ref),
            "speedup_vs_learn2learn_paired_range": [min(paired_ref), max(paired_ref)],
            "ratio_to_implicit_nash_maml": med / base,
            "ratio_to_implicit_nash_maml_paired_median": median(paired_base),
            "ratio_to_implicit_nash_maml_paired_range": [min(paired_base), max(paired_base)],
            "per_iteration_s_by_rep": per_rep, "iteration_times_s": t["iteration_times_s"],
            "final_loss_by_rep": t["final_loss_by_rep"],
        }

    # float32 sanity check: after the last repetition's meta-iterations the second-order MAML
    # implementations should hold nearly the same parameters (same data, init and optimiser).
    trajectory = {name: max_rel_diff(timing[name]["final_params"], timing[BASE]["final_params"])
                  for name in (REFERENCE, "higher MAML")}

    speedup = results[BASE]["speedup_vs_learn2learn"]
    targets = {"implicit_nash_maml_speedup_vs_learn2learn": {
        "value": speedup, "target": f">= {SPEEDUP_TARGET}", "met": speedup >= SPEEDUP_TARGET,
        "paired_median": results[BASE]["speedup_vs_learn2learn_paired_median"]}}
    for name in ("implicit_nash Nash-MAML (centroid)", "implicit_nash Nash-MAML (robust)"):
        r = results[name]["ratio_to_implicit_nash_maml"]
        targets[f"{name} / implicit_nash MAML"] = {
            "value": r, "target": f"<= {NASH_TARGET}", "met": r <= NASH_TARGET,
            "paired_median": results[name]["ratio_to_implicit_nash_maml_paired_median"]}

    headers = ["method", "median ms / meta-iter", "IQR ms", "min-max ms", "learn2learn / method",
               "method / implicit_nash MAML", "final query loss (last rep)"]
    rows = []
    for name, r in results.items():
        rows.append([name, f"{r['median_s'] * 1e3:.2f}", f"{r['q1_s'] * 1e3:.2f}-{r['q3_s'] * 1e3:.2f}",
                     f"{r['min_s'] * 1e3:.2f}-{r['max_s'] * 1e3:.2f}", f"{r['speedup_vs_learn2learn']:.2f}x",
                     f"{r['ratio_to_implicit_nash_maml']:.2f}", f"{r['final_loss_by_rep'][-1]:.4g}"])
    print()
    _common.print_table(headers, rows)
    verdicts = []
    for key, t in targets.items():
        if key.startswith("implicit_nash_maml_speedup"):
            text = (f"implicit_nash MAML is {t['value']:.2f}x faster than learn2learn (paired median over "
                    f"repetitions {t['paired_median']:.2f}x); target >= {SPEEDUP_TARGET:g}x: "
                    f"{'MET' if t['met'] else 'NOT MET'}")
        else:
            text = (f"{key} = {t['value']:.2f} (paired median {t['paired_median']:.2f}); target <= {NASH_TARGET:g}: "
                    f"{'MET' if t['met'] else 'NOT MET'}")
        verdicts.append(text)
        print(text)

    elapsed = time.perf_counter() - start
    _common.finish_environment(env)

    md = _common.report_head(
        "Seconds per meta-iteration of second-order MAML: implicit_nash vs learn2learn vs higher", env,
        f"{args.reps} repetitions x {args.iters} timed meta-iterations per method, after {args.warmup} warm-up "
        f"meta-iterations per method; methods in a shuffled order each repetition; per repetition the block "
        f"time / {args.iters}; median and IQR over the {args.reps} repetitions",
        [f"Problem: {SHOTS}-shot sinusoid regression ({QUERY_SHOTS} query points per task), meta-batch "
         f"{META_BATCH}, network {'-'.join(map(str, SIZES))} ReLU ({num_params} parameters), {INNER_STEPS} inner "
         f"SGD steps with lr {INNER_LR:g}, second-order meta-gradient, Adam outer lr {OUTER_LR:g}, float32; "
         f"seed {args.seed}",
         "Every repetition samples its meta-batches once from one generator; every method runs on those "
         "batches from the same initial network with a fresh Adam",
         f"Peers: learn2learn {env['learn2learn']} (imported as: {l2l_import}), higher {env['higher']}; "
         "installed as described in `benchmarks/requirements-meta-peers.txt`",
         f"implicit_nash commit: {env['implicit_nash_commit']}"],
        elapsed, headers, rows)
    md += [
        "",
        "*median ms / meta-iter* = median over repetitions of (block time / iterations); *IQR* = first-third",
        "quartile of those; *learn2learn / method* = learn2learn's median divided by the method's (higher =",
        "faster than learn2learn); *method / implicit_nash MAML* = the method's median divided by plain",
        "implicit_nash MAML's. One meta-iteration = adaptation of all 25 tasks, meta-gradient and Adam step.",
        "",
        "## Targets",
        "",
    ] + [f"- {v}." for v in verdicts] + [
        "",
        "Paired ratios (the two methods' times in the same repetition, then the median over repetitions)",
        "are given in parentheses; they are less sensitive to load changing between repetitions.",
        "",
        "## Meta-gradient agreement (checked before timing, float64, one meta-batch)",
        "",
    ]
    md += _common.table(["method a", "method b", "max rel. difference", "must agree (rtol)", "ok"],
                        [[p["a"], p["b"], f"{p['max_rel_difference']:.2e}",
                          f"yes ({args.rtol:.0e})" if p["must_agree"] else "no",
                          ("yes" if p["ok"] else "NO") if p["must_agree"] else "-"] for p in check["pairs"]])
    md += [
        "",
        f"Max relative difference = max |g_a - g_b| / max |g_b| over all {num_params} parameters (norm of the",
        f"MAML meta-gradient: {check['meta_gradient_norm']:.3g}). The MAML vs FOMAML row shows the size of the",
        "second-order terms at inner lr 0.001, i.e. that the check would catch an implementation that drops them;",
        "the Nash-MAML rows show how much the penalties change the meta-gradient on this batch.",
        "",
        "float32 trajectories: after the last repetition's meta-iterations (same batches, init and Adam), the",
        "parameters differ from implicit_nash MAML's by a max relative difference of " + ", ".join(
            f"{v:.1e} ({k})" for k, v in trajectory.items()) + ".",
        "",
        "## Notes",
        "",
        "- implicit_nash adapts all 25 tasks at once (`torch.func.vmap` over the tasks' pseudo-gradients);",
        "  learn2learn and higher loop over the tasks in Python, each with their own module clone / functional",
        "  model per task, which is where most of the difference comes from at this network size.",
        "- The peers' per-task tensors are split from the batch before timing (not counted against them).",
        "- " + ("learn2learn was imported as " + l2l_import + "."),
        "",
        "## Reproduce",
        "",
        "Install the peers as `benchmarks/requirements-meta-peers.txt` says (higher with pip; learn2learn built from",
        f"its sdist with Cython 3), then `{env['command']}` (`--quick` is a smoke test that writes `{NAME}_quick.*`).",
    ]
    for name in timing:
        timing[name].pop("final_params", None)
    payload = {"environment": env, "settings": vars(args),
               "problem": {"shots": SHOTS, "query_shots": QUERY_SHOTS, "meta_batch": META_BATCH, "sizes": SIZES,
                           "num_params": num_params, "inner_steps": INNER_STEPS, "inner_lr": INNER_LR,
                           "outer_lr": OUTER_LR, "dtype": "float32"},
               "gradient_check": check, "results": results, "targets": targets,
               "float32_trajectory_max_rel_difference": trajectory, "orders": orders, "elapsed_s": elapsed}
    paths = _common.write_results(NAME, args.quick, payload, md)
    print(f"\nwrote {paths['json']} and {paths['md']} ({elapsed:.0f} s)")


def _git_commit() -> Optional[str]:
    import subprocess
    try:
        out = subprocess.run(["git", "-C", str(_common.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(_common.ROOT), "status", "--porcelain", "implicit_nash"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        return out.stdout.strip() + (" (implicit_nash/ has uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    main()
