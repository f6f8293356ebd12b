"""Peak memory of one hypergradient: implicit adjoint vs unrolled back-propagation.

One hypergradient = forward solve of the sinusoid game (``B = 25`` players, each a 1-40-40-1 ReLU
MLP flattened to 1,761 numbers, see ``_sinusoid.py``) with ``SimultaneousGradient(step_size=0.01,
num_steps=N)`` from :math:`\\phi_i = \\theta`, then ``backward()`` of a scalar meta-loss (query MSE)
of the equilibrium with respect to ``theta``.  Both adjoints run exactly ``N`` forward steps;
``Implicit()`` uses its default linear solver (GMRES), with the library's default ``throw=True``, so
a backward whose linear solve does not converge makes the run fail.

The proximal weight is ``lam = 50`` by default: implicit differentiation needs an equilibrium of a
strongly monotone game, and with ``lam = 1`` the Jacobian blocks ``lam * I + Hess MSE_i`` have
eigenvalues down to -46 (not monotone; the implicit backward's GMRES then exhausts its budget).
Before measuring, the script checks the smallest and largest eigenvalue of every player's block at
the starting point and at the last forward iterate (and so the step-size bound ``2 / L``), and, for
ReLU, how many hidden units change sign in one more forward step: the ReLU pseudo-gradient jumps
across such kinks, which no ``lam`` removes (``--activation tanh`` is the smooth variant).

Every ``(adjoint, N)`` configuration runs in a fresh Python subprocess (``--worker``), which

1. builds the game, warms up with one small solve (2 steps) and its backward, so that one-off
   library and allocator costs are paid before measuring;
2. for each repetition: collects garbage, resets the peak-RSS counter of the process (Linux
   ``/proc/self/clear_refs``; without it ``ru_maxrss`` keeps the warm-up's peak), records
   ``ru_maxrss``, runs the hypergradient and records ``ru_maxrss`` again.  The difference is the
   increase of peak resident memory caused by the hypergradient (forward graph, the backward's
   temporaries, GMRES's Krylov basis...);
3. in the first repetition, between forward and backward, walks the autograd graph of the
   meta-loss and adds up the storages of all tensors saved for backward (each storage once,
   excluding ``theta`` and the task data, which exist anyway): the exact memory held by the graph.

Why a graph walk and not ``torch.autograd.graph.saved_tensors_hooks``: every pseudo-gradient of
``implicit_nash`` is computed with ``torch.func.grad``/``jacrev``, and those transforms refuse to
run while saved-tensor hooks are active (``RuntimeError: torch.func.{grad, vjp, jacrev, hessian}
don't yet support saved tensor hooks``).  The walk visits every node reachable from the loss and
reads the tensors each node saved (``node._saved_*`` for built-in nodes, ``saved_tensors`` for
custom ``autograd.Function`` nodes such as the implicit solution).  The script checks that the walk
and ``saved_tensors_hooks`` agree on a control graph built without ``torch.func``.

On a CUDA machine the same worker also reports ``torch.cuda.max_memory_allocated`` deltas.

Usage::

    python benchmarks/memory_hypergradient.py [--quick] [--lam 50] [--step-size 0.01] [--activation relu]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings
import weakref
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import _common
from _common import fmt, fmt_bytes, median

_common.ensure_importable()

import torch  # noqa: E402

import _sinusoid  # noqa: E402

NAME = "memory_hypergradient"
NUM_PLAYERS = 25
SHOTS = _sinusoid.SHOTS
QUERIES = _sinusoid.QUERIES


# --------------------------------------------------------------------------------------------
# Measuring memory
# --------------------------------------------------------------------------------------------

def _tensors_in(value: Any) -> Iterable[torch.Tensor]:
    """Yield the tensors in ``value`` (a tensor, or a tuple/list of tensors and other things)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)


def _storage_key(t: torch.Tensor) -> Tuple[str, int]:
    """Identify a tensor's storage (views of one buffer share it)."""
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


def graph_saved_bytes(root: torch.Tensor, exclude: Sequence[torch.Tensor] = ()) -> Dict[str, int]:
    """Bytes of the tensors that the autograd graph of ``root`` saved for backward.

    Walks every node reachable from ``root.grad_fn`` through ``next_functions`` and reads the
    tensors each node saved: the ``_saved_*`` attributes of built-in nodes and ``saved_tensors``
    of custom :class:`torch.autograd.Function` nodes.  Each storage is counted once, with its full
    size (a saved view keeps its whole base buffer alive).

    Args:
        root: the (scalar) tensor whose graph is inspected; must not have been back-propagated.
        exclude: tensors whose storages are not owed to the graph (inputs that exist anyway).

    Returns:
        ``{"bytes": ..., "tensors": number of distinct storages, "nodes": number of nodes,
        "bytes_without_scalars": ...}``; the last leaves out zero-dimensional tensors (the Python
        scalars of ``0.5 * x`` are saved as 0-dim tensors, which ``saved_tensors_hooks`` never sees).
    """
    excluded = {_storage_key(t) for t in exclude}
    storages: Dict[Tuple[str, int], int] = {}
    scalars: Dict[Tuple[str, int], int] = {}
    attr_cache: Dict[type, List[str]] = {}
    seen = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kind = type(node)
        if kind not in attr_cache:
            attr_cache[kind] = [a for a in dir(node) if a.startswith("_saved_")]
        values = [getattr(node, a) for a in attr_cache[kind]]
        if hasattr(node, "saved_tensors"):  # custom autograd.Function (e.g. the implicit solution)
            values.append(node.saved_tensors)
        for value in values:
            for t in _tensors_in(value):
                key = _storage_key(t)
                if key not in excluded:
                    storages[key] = t.untyped_storage().nbytes()
                    if t.dim() == 0:
                        scalars[key] = storages[key]
        stack.extend(fn for fn, _ in node.next_functions)
    total = sum(storages.values())
    return {"bytes": total, "tensors": len(storages), "nodes": len(seen),
            "bytes_without_scalars": total - sum(scalars.values())}


class _Packed:
    """Wrapper returned by the pack hook, so that freed graph nodes can be noticed (weakref)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class LiveSavedTensors:
    """Count, with ``saved_tensors_hooks``, the storages saved by nodes that are still alive.

    Used only to validate :func:`graph_saved_bytes` on a graph built without ``torch.func``.
    """

    def __init__(self, exclude: Sequence[torch.Tensor] = ()):
        self.live: "weakref.WeakSet[_Packed]" = weakref.WeakSet()
        self.excluded = {_storage_key(t) for t in exclude}
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda p: p.tensor)

    def _pack(self, tensor: torch.Tensor) -> _Packed:
        packed = _Packed(tensor)
        self.live.add(packed)
        return packed

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def bytes(self) -> int:
        """Bytes of the distinct storages of live saved tensors (0-dim tensors left out)."""
        gc.collect()
        storages = {}
        for packed in list(self.live):
            key = _storage_key(packed.tensor)
            if key not in self.excluded and packed.tensor.dim() > 0:
                storages[key] = packed.tensor.untyped_storage().nbytes()
        return sum(storages.values())


def validate_graph_walk(seed: int, step_size: float) -> Dict[str, Any]:
    """Compare :func:`graph_saved_bytes` with ``saved_tensors_hooks`` on a ``torch.func``-free graph.

    The control graph is a 3-step unrolled gradient descent of 4 players on the same MLP loss,
    written with batched matrix products and ``torch.autograd.grad(create_graph=True)``.
    """
    gen = torch.Generator().manual_seed(seed)
    tasks = _sinusoid.sample_tasks(4, SHOTS, QUERIES, gen)
    theta = _sinusoid.init_theta(gen).requires_grad_(True)

    def batched_mse(phi, x, y):
        sizes = [math.prod(s) for s in _sinusoid.LAYER_SHAPES]
        w1, b1, w2, b2, w3, b3 = [p.reshape((phi.shape[0],) + s)
                                  for p, s in zip(phi.split(sizes, dim=1), _sinusoid.LAYER_SHAPES)]
        h = torch.relu(x.unsqueeze(-1) @ w1.transpose(1, 2) + b1.unsqueeze(1))
        h = torch.relu(h @ w2.transpose(1, 2) + b2.unsqueeze(1))
        out = (h @ w3.transpose(1, 2) + b3.unsqueeze(1)).squeeze(-1)
        return ((out - y) ** 2).mean(1)

    with LiveSavedTensors(exclude=[theta, tasks.x, tasks.y, tasks.xq, tasks.yq]) as hooks:
        phi = theta.expand(4, -1)
        for _ in range(3):
            cost = batched_mse(phi, tasks.x, tasks.y).sum() + 0.5 * ((phi - theta) ** 2).sum()
            (g,) = torch.autograd.grad(cost, phi, create_graph=True)
            phi = phi - step_size * g
        loss = batched_mse(phi, tasks.xq, tasks.yq).mean()
    by_hooks = hooks.bytes()
    by_walk = graph_saved_bytes(loss, exclude=[theta, tasks.x, tasks.y, tasks.xq, tasks.yq])
    return {"hooks_bytes": by_hooks, "walk_bytes": by_walk["bytes_without_scalars"],
            "walk_scalar_bytes": by_walk["bytes"] - by_walk["bytes_without_scalars"],
            "walk_nodes": by_walk["nodes"], "agree": by_hooks == by_walk["bytes_without_scalars"]}


def reset_peak_rss() -> bool:
    """Reset the peak-RSS counter of this address space to the current RSS (Linux).

    Writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM``.  Returns ``False`` if unsupported.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _proc_status_kib(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``), or ``None``."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def ru_maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def peak_rss_bytes() -> Tuple[int, str]:
    """Peak resident memory of this process in bytes and the counter it was read from.

    ``VmHWM`` (Linux) is the high-water mark of the current address space, the quantity behind
    ``ru_maxrss``, but unlike ``ru_maxrss`` it is not floored by the parent process: on exec, Linux
    folds the RSS of the pre-exec image (a copy of the parent) into ``ru_maxrss``, so in a worker
    started by a large parent ``ru_maxrss`` cannot move.  Falls back to ``ru_maxrss`` elsewhere.
    """
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024, "VmHWM"
    return ru_maxrss_bytes(), "ru_maxrss"


def release_free_memory() -> None:
    """Collect garbage and return the allocator's free pages to the OS (glibc ``malloc_trim``).

    Without it, memory freed by one repetition stays resident and the next repetition's peak
    increase would be under-counted.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------
# The worker: one (adjoint, N) configuration in a fresh process
# --------------------------------------------------------------------------------------------

def _make_adjoint(name: str, warmup: bool = False):
    import implicit_nash

    if name == "unrolled":
        return implicit_nash.Unrolled()
    if warmup:  # a short GMRES only to pay one-off costs of the implicit backward's code path
        return implicit_nash.Implicit(linear_solver=implicit_nash.GMRES(max_steps=5))
    return implicit_nash.Implicit()  # default linear solver: GMRES


def hypergradient(game, tasks, theta, adjoint, steps: int, walk: bool, step_size: float, activation: str,
                  throw: bool = True) -> Dict[str, Any]:
    """Solve, evaluate the meta-loss and back-propagate once; time the phases.

    ``throw`` is passed to ``nash_equilibrium``: with ``True`` (the library's default, used for every
    measurement) a linear solve of the implicit backward that does not converge raises
    ``ConvergenceError``; only the warm-up, whose GMRES is capped at 5 products, passes ``False``.

    Returns a dictionary with forward/backward seconds, graph bytes (if ``walk``), solver and
    linear-solver diagnostics.
    """
    import implicit_nash

    solver = implicit_nash.SimultaneousGradient(step_size=step_size, num_steps=steps)
    phi0 = theta.detach().expand(NUM_PLAYERS, -1).clone()
    theta.grad = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        sol = implicit_nash.nash_solution(game, phi0, theta, solver=solver, adjoint=adjoint,
                                             throw=throw)
        loss = _sinusoid.meta_loss(sol.value, tasks, activation)
        t1 = time.perf_counter()
        graph = (graph_saved_bytes(loss, exclude=[theta, tasks.x, tasks.y, tasks.xq, tasks.yq])
                 if walk else None)
        t2 = time.perf_counter()
        loss.backward()
        if theta.device.type == "cuda":
            torch.cuda.synchronize()
        t3 = time.perf_counter()
    out: Dict[str, Any] = {
        "forward_s": t1 - t0, "backward_s": t3 - t2, "total_s": (t1 - t0) + (t3 - t2),
        "graph": graph, "loss": loss.detach().item(), "grad_norm": theta.grad.norm().item(),
        "status": sol.status, "steps": sol.steps, "residual": sol.residual,
        "residual0": sol.history[0] if sol.history else float("nan"),
        "warnings": sorted({str(w.message)[:160] for w in caught}),
    }
    if sol.backward:
        info = sol.backward[-1]
        rhs = info.history[0] if info.history else float("nan")
        out["linear_solve"] = {"solver": type(adjoint.linear_solver).__name__, "converged": info.converged,
                               "steps": info.steps, "matvecs": info.matvecs, "residual": info.residual,
                               "relative_residual": info.residual / rhs if rhs else float("nan"),
                               "tolerance": info.tolerance}
    return out


def worker(args: argparse.Namespace) -> None:
    """Run ``args.reps`` hypergradients of one configuration and print one JSON line."""
    _common.configure_torch(args.threads, args.seed)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    tasks = _sinusoid.sample_tasks(NUM_PLAYERS, SHOTS, QUERIES, gen)
    theta0 = _sinusoid.init_theta(gen)
    tasks = _sinusoid.Tasks(*(t.to(device) for t in (tasks.x, tasks.y, tasks.xq, tasks.yq,
                                                      tasks.amplitude, tasks.phase)))
    theta = theta0.to(device).requires_grad_(True)
    game = _sinusoid.aggregative_game(tasks, lam=args.lam, w=args.w, activation=args.activation)

    # Warm-up: one small solve and its backward with the same adjoint (library code paths,
    # torch.func transforms, allocator pools are initialised before anything is measured).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hypergradient(game, tasks, theta, _make_adjoint(args.adjoint, warmup=True), 2, walk=False,
                      step_size=args.step_size, activation=args.activation, throw=False)

    adjoint = _make_adjoint(args.adjoint)
    cuda = device.type == "cuda"
    reps: List[Dict[str, Any]] = []
    for rep in range(args.reps):
        release_free_memory()
        reset_ok = reset_peak_rss()
        rss_before, counter = peak_rss_bytes()
        ru_before = ru_maxrss_bytes()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_before = torch.cuda.memory_allocated()
        result = hypergradient(game, tasks, theta, adjoint, args.steps, walk=(rep == 0),
                               step_size=args.step_size, activation=args.activation)
        result["rss_peak_increase"] = peak_rss_bytes()[0] - rss_before
        result["ru_maxrss_increase"] = ru_maxrss_bytes() - ru_before
        result["rss_before"] = rss_before
        result["rss_counter"] = counter
        result["peak_reset"] = reset_ok
        if cuda:
            torch.cuda.synchronize()
            result["cuda_peak_increase"] = torch.cuda.max_memory_allocated() - cuda_before
        reps.append(result)
    print(json.dumps({"adjoint": args.adjoint, "steps": args.steps, "reps": reps}))


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------

def run_config(args: argparse.Namespace, adjoint: str, steps: int) -> Dict[str, Any]:
    """Run one configuration in a fresh subprocess and return its parsed JSON record.

    The record gets ``parent_rss``, this (parent) process's resident size when it started the worker.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--adjoint", adjoint,
           "--steps", str(steps), "--reps", str(args.reps), "--threads", str(args.threads),
           "--seed", str(args.seed), "--lam", str(args.lam), "--w", str(args.w),
           "--step-size", str(args.step_size), "--activation", args.activation, "--device", args.device]
    kib = _proc_status_kib("VmRSS")
    parent_rss = kib * 1024 if kib is not None else None
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {adjoint} N={steps} failed:\n{proc.stderr[-4000:]}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["parent_rss"] = parent_rss
    return record


def _block_eigenvalues(point: torch.Tensor, tasks, lam: float, activation: str, players: int) -> Tuple[List[float], List[float]]:
    """Smallest and largest eigenvalue of ``lam * I + Hess MSE_i`` at ``point[i]`` for the first players."""
    lows, highs = [], []
    for i in range(players):
        hess = torch.func.hessian(lambda p: _sinusoid.mse(p, tasks.x[i], tasks.y[i], activation))(point[i])
        eig = torch.linalg.eigvalsh(hess)
        lows.append(float(eig[0]) + lam)
        highs.append(float(eig[-1]) + lam)
    return lows, highs


def game_diagnostic(args: argparse.Namespace, steps: int) -> Dict[str, Any]:
    """Monotonicity and step-size check of the game at the points the forward solve visits.

    Runs the forward solve of the measurements (``SimultaneousGradient(step_size, num_steps=steps)``
    from :math:`\\phi_i = \\theta`, no gradient) and, for the first ``args.spectrum_players`` players,
    computes the eigenvalues of the own Jacobian block ``lam * I + Hess MSE_i`` at the starting point
    and at the last iterate ``phi_N``.  The coupling adds ``2 w / B^2`` on the block diagonal and a
    positive semi-definite term of norm ``2 w / B`` overall (both left out; ``0.008`` here).  A
    positive smallest eigenvalue means the game is strongly monotone there (on the smooth piece); the
    largest, ``L``, gives the step bound ``2 / L`` and the contraction factor
    ``max |1 - step * eigenvalue|`` of one step on a smooth piece.

    The Hessian does not see kinks: with ReLU the pseudo-gradient jumps where a hidden pre-activation
    at a training input changes sign, so the diagnostic also counts the pre-activations that change
    sign in one more step from ``phi_N``.  A diagnostic of the problem, not a measurement of the library.
    """
    import implicit_nash

    gen = torch.Generator().manual_seed(args.seed)
    tasks = _sinusoid.sample_tasks(NUM_PLAYERS, SHOTS, QUERIES, gen)
    theta = _sinusoid.init_theta(gen)
    game = _sinusoid.aggregative_game(tasks, lam=args.lam, w=args.w, activation=args.activation)
    phi0 = theta.expand(NUM_PLAYERS, -1).clone()
    solver = implicit_nash.SimultaneousGradient(step_size=args.step_size, num_steps=steps)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = implicit_nash.nash_solution(game, phi0, theta, solver=solver, adjoint=implicit_nash.Unrolled())
        phi_n = sol.value
        phi_next = phi_n - args.step_size * game.pseudo_gradient(phi_n, theta)
        sign_changes = total_units = 0
        for i in range(NUM_PLAYERS):
            before = _sinusoid.preactivations(phi_n[i], tasks.x[i], args.activation) > 0
            after = _sinusoid.preactivations(phi_next[i], tasks.x[i], args.activation) > 0
            sign_changes += int((before != after).sum())
            total_units += before.numel()
    players = min(args.spectrum_players, NUM_PLAYERS)
    points = {}
    for name, point in (("initial", phi0), ("final", phi_n)):
        lows, highs = _block_eigenvalues(point, tasks, args.lam, args.activation, players)
        points[name] = {"min_eigenvalue": min(lows), "max_eigenvalue": max(highs), "per_player_min": lows,
                        "per_player_max": highs, "players_not_monotone": sum(v <= 0 for v in lows)}
    lipschitz = max(p["max_eigenvalue"] for p in points.values())
    smallest = min(p["min_eigenvalue"] for p in points.values())
    return {
        "players_checked": players, "steps": steps, "lam": args.lam, "activation": args.activation,
        "initial": points["initial"], "final": points["final"],
        "min_eigenvalue": smallest, "lipschitz": lipschitz, "step_size": args.step_size,
        "step_bound": 2.0 / lipschitz if lipschitz > 0 else float("nan"),
        "contraction_per_step": max(abs(1 - args.step_size * smallest), abs(1 - args.step_size * lipschitz)),
        "strongly_monotone": smallest > 0,
        "forward_residual0": sol.history[0] if sol.history else float("nan"), "forward_residual": sol.residual,
        "kink_sign_changes": sign_changes,
        "preactivations": total_units,
        "displacement_max": float((phi_n - phi0).norm(dim=1).max()),
    }


def summarise(record: Dict[str, Any]) -> Dict[str, Any]:
    """Medians over the repetitions of one configuration."""
    reps = record["reps"]
    first = reps[0]
    out = {
        "adjoint": record["adjoint"], "steps": record["steps"], "repetitions": len(reps),
        "graph_bytes": first["graph"]["bytes"], "graph_tensors": first["graph"]["tensors"],
        "graph_nodes": first["graph"]["nodes"],
        "rss_first": first["rss_peak_increase"],
        "rss_median": median(r["rss_peak_increase"] for r in reps),
        "cuda_median": median(r["cuda_peak_increase"] for r in reps) if "cuda_peak_increase" in first else None,
        "time_median": median(r["total_s"] for r in reps),
        "forward_median": median(r["forward_s"] for r in reps),
        "backward_median": median(r["backward_s"] for r in reps),
        "status": first["status"], "forward_residual": first["residual"],
        "forward_residual0": first["residual0"], "grad_norm": first["grad_norm"],
        "ru_maxrss_median": median(r["ru_maxrss_increase"] for r in reps),
        "parent_rss": record.get("parent_rss"),
        "rss_counter": first["rss_counter"],
        "peak_reset": all(r["peak_reset"] for r in reps),
        "warnings": sorted({w for r in reps for w in r["warnings"]}),
    }
    if "linear_solve" in first:
        out["linear_solve"] = first["linear_solve"]
    return out


def _parent_rss_range(summaries: Dict[Any, Dict[str, Any]]) -> str:
    """The parent's resident size when it started the workers, as "x" or "x to y"."""
    values = [s["parent_rss"] for s in summaries.values() if s.get("parent_rss")]
    if not values:
        return "an unknown size"
    low, high = fmt_bytes(min(values)), fmt_bytes(max(values))
    return low if low == high else f"{low} to {high}"


def ratio(a: Optional[float], b: Optional[float]) -> float:
    """``a / b`` with ``nan`` for missing or zero denominators."""
    if a is None or b is None or b == 0 or a != a or b != b:
        return float("nan")
    return a / b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N in {10, 100}, 2 repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="hypergradients per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lam", type=float, default=50.0,
                        help="proximal weight lambda (default 50: the game's Jacobian blocks are positive definite "
                             "at the points visited; with 1 they are not)")
    parser.add_argument("--w", type=float, default=0.1, help="centroid coupling weight")
    parser.add_argument("--step-size", type=float, default=0.01,
                        help="SimultaneousGradient step (default 0.01, below 2/L for the blocks' largest eigenvalue L)")
    parser.add_argument("--activation", choices=sorted(_sinusoid.ACTIVATIONS), default="relu",
                        help="the MLP's hidden activation (default relu; tanh is the smooth variant)")
    parser.add_argument("--spectrum-players", type=int, default=NUM_PLAYERS,
                        help=f"players whose Jacobian blocks the diagnostic checks (default all {NUM_PLAYERS})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per worker process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--adjoint", choices=["implicit", "unrolled"], help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    if args.worker:
        worker(args)
        return

    _common.configure_torch(args.threads, args.seed)
    start = time.perf_counter()
    step_counts = [10, 100] if args.quick else [10, 100, 1000]
    env = _common.environment(repetitions=args.reps, device=args.device, threads=args.threads)

    validation = validate_graph_walk(args.seed, args.step_size)
    print(f"graph walk vs saved_tensors_hooks on a torch.func-free control graph: "
          f"{validation['walk_bytes']} vs {validation['hooks_bytes']} bytes "
          f"({'agree' if validation['agree'] else 'DISAGREE'})", flush=True)
    t = time.perf_counter()
    diag = game_diagnostic(args, step_counts[-1])
    diag["seconds"] = time.perf_counter() - t
    for name, label in (("initial", "phi_i = theta"), ("final", f"phi_N, N = {diag['steps']}")):
        point = diag[name]
        print(f"lam*I + Hess MSE_i of {diag['players_checked']} players at {label}: eigenvalues in "
              f"[{point['min_eigenvalue']:.4g}, {point['max_eigenvalue']:.4g}] "
              f"({point['players_not_monotone']} blocks with a non-positive eigenvalue)", flush=True)
    print(f"step {args.step_size:g} vs 2/L = {diag['step_bound']:.4g} (L = {diag['lipschitz']:.4g}); contraction per step "
          f"on a smooth piece {diag['contraction_per_step']:.4f}; forward residual {fmt(diag['forward_residual0'])} -> "
          f"{fmt(diag['forward_residual'])} after N = {diag['steps']}; hidden pre-activations changing sign in one more "
          f"step: {diag['kink_sign_changes']} of {diag['preactivations']} ({diag['seconds']:.0f} s)", flush=True)
    if not diag["strongly_monotone"]:
        print(f"WARNING: lam = {args.lam} leaves a non-positive eigenvalue: the game is not monotone at the points "
              f"visited, and the implicit backward is expected to fail", flush=True)

    summaries: Dict[Tuple[str, int], Dict[str, Any]] = {}
    raw = []
    for adjoint in ("implicit", "unrolled"):
        for steps in step_counts:
            t = time.perf_counter()
            record = run_config(args, adjoint, steps)
            raw.append(record)
            summaries[adjoint, steps] = s = summarise(record)
            print(f"  {adjoint:8s} N={steps:5d}: graph {fmt_bytes(s['graph_bytes'])}, peak RSS +"
                  f"{fmt_bytes(s['rss_median'])}, {s['time_median']:.2f} s/hypergradient "
                  f"(worker {time.perf_counter() - t:.0f} s)", flush=True)

    base_n = step_counts[0]
    rows = []
    for (adjoint, steps), s in summaries.items():
        base = summaries[adjoint, base_n]
        ref = summaries["implicit", steps]
        s["graph_ratio_vs_N10"] = ratio(s["graph_bytes"], base["graph_bytes"])
        s["rss_ratio_vs_N10"] = ratio(s["rss_median"], base["rss_median"])
        s["time_ratio_vs_N10"] = ratio(s["time_median"], base["time_median"])
        s["graph_ratio_vs_implicit"] = ratio(s["graph_bytes"], ref["graph_bytes"])
        s["rss_ratio_vs_implicit"] = ratio(s["rss_median"], ref["rss_median"])
        s["time_ratio_vs_implicit"] = ratio(s["time_median"], ref["time_median"])
        ls = s.get("linear_solve")
        gmres = (f"{ls['matvecs']} / {ls['relative_residual']:.2g}" + ("" if ls["converged"] else " (not conv.)")
                 if ls else "-")
        row = [adjoint, steps, fmt_bytes(s["graph_bytes"]), f"{s['graph_ratio_vs_N10']:.2f}",
               fmt_bytes(s["rss_first"]), fmt_bytes(s["rss_median"]), fmt_bytes(s["ru_maxrss_median"]),
               f"{s['rss_ratio_vs_N10']:.2f}",
               f"{s['rss_ratio_vs_implicit']:.2f}", f"{s['time_median']:.3f}", f"{s['forward_median']:.3f}",
               f"{s['backward_median']:.3f}", f"{s['time_ratio_vs_implicit']:.2f}",
               fmt(s["forward_residual"]), gmres]
        if s["cuda_median"] is not None:
            row.insert(8, f"{fmt_bytes(s['cuda_median'])} ({ratio(s['cuda_median'], base['cuda_median']):.2f}x N10)")
        rows.append(row)
    headers = ["adjoint", "N", "graph saved", "graph x N10", "peak RSS +, 1st rep", "peak RSS + (median)",
               "ru_maxrss + (median)", "RSS x N10", "RSS x implicit", "s / hypergrad", "fwd s", "bwd s", "time x implicit",
               "fwd residual", "GMRES matvecs / rel. res."]
    if any(s["cuda_median"] is not None for s in summaries.values()):
        headers.insert(8, "CUDA peak + (median)")
    print()
    _common.print_table(headers, rows)

    # The memory the targets are checked on: device memory on a GPU, resident host memory on a CPU.
    cuda = all(s["cuda_median"] is not None for s in summaries.values())
    mem_key, mem_label = ("cuda_median", "CUDA peak-allocated increase") if cuda else ("rss_median", "peak-RSS increase")
    for (adjoint, steps), s in summaries.items():
        s["memory_metric"] = mem_key
        s["memory_ratio_vs_N10"] = ratio(s[mem_key], summaries[adjoint, base_n][mem_key])
        s["memory_ratio_vs_implicit"] = ratio(s[mem_key], summaries["implicit", steps][mem_key])
    last = step_counts[-1]
    imp_graph_ratio = summaries["implicit", last]["graph_ratio_vs_N10"]
    imp_mem_ratio = summaries["implicit", last]["memory_ratio_vs_N10"]
    unr = [summaries["unrolled", n] for n in step_counts]
    unrolled_growing = all(b["graph_bytes"] > a["graph_bytes"] and b[mem_key] > a[mem_key]
                           for a, b in zip(unr, unr[1:]))
    implicit_flat = imp_graph_ratio <= 1.1 and imp_mem_ratio <= 1.1
    checks = {
        f"implicit graph bytes N={last} / N={base_n}": imp_graph_ratio,
        f"implicit {mem_label} N={last} / N={base_n}": imp_mem_ratio,
        "implicit_flat (both ratios <= 1.1)": implicit_flat,
        f"unrolled graph bytes N={last} / N={base_n}": summaries["unrolled", last]["graph_ratio_vs_N10"],
        f"unrolled {mem_label} N={last} / N={base_n}": summaries["unrolled", last]["memory_ratio_vs_N10"],
        f"unrolled_growing (graph and {mem_label} strictly increase with N)": unrolled_growing,
    }
    print()
    for k, v in checks.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {'PASS' if v else 'FAIL'}")

    elapsed = time.perf_counter() - start
    _common.finish_environment(env)
    gmres_conv = [summaries["implicit", n]["linear_solve"] for n in step_counts]
    fwd_res = {n: summaries["implicit", n]["forward_residual"] for n in step_counts}
    r0 = summaries["implicit", base_n]["forward_residual0"]
    act_name = {"relu": "ReLU"}.get(args.activation, args.activation)
    init, final = diag["initial"], diag["final"]
    forward_converged = fwd_res[last] <= 1e-6 * r0
    approx_warned = [n for n in step_counts
                     if any("assumes an equilibrium" in w for w in summaries["implicit", n]["warnings"])]

    md = _common.report_head(
        "Peak memory of one hypergradient: implicit adjoint vs unrolled", env,
        f"{args.reps} hypergradients per configuration, each configuration in its own fresh subprocess; "
        f"medians reported (graph bytes are exact and identical across repetitions; measured in the "
        f"first repetition)",
        [f"Game: B = {NUM_PLAYERS} players, each a 1-40-40-1 {act_name} MLP ({_sinusoid.NUM_PARAMS} parameters), "
         f"phi of shape ({NUM_PLAYERS}, {_sinusoid.NUM_PARAMS}), theta ({_sinusoid.NUM_PARAMS},); "
         f"{SHOTS}-shot sinusoid tasks; cost_i = MSE_i + (lam/2)||phi_i - theta||^2 + w||theta - mean_k phi_k||^2, "
         f"lam = {args.lam}, w = {args.w}; `AggregativeGame`; float64; seed {args.seed}; device {args.device}",
         f"Solver: `SimultaneousGradient(step_size={args.step_size:g}, num_steps=N)` from phi_i = theta; "
         f"meta-loss: query MSE ({QUERIES} points per task) averaged over players; "
         f"`Implicit()` = default GMRES(restart=50, max_steps=1000); `nash_equilibrium(..., throw=True)` (the "
         f"default): a linear solve that does not converge aborts the run"],
        elapsed, headers, rows)
    md += [
        "",
        "Columns: *graph saved* = bytes of the tensors saved for backward by autograd (exact, from a walk of",
        "the graph between forward and backward; each storage once; theta and the task data excluded).",
        "*peak RSS +* = increase of the process's peak resident memory during the hypergradient (forward solve +",
        f"meta-loss + backward), read from `{next(iter(summaries.values()))['rss_counter']}`, with the peak counter "
        "reset to the current RSS just before"
        + (" (Linux `clear_refs`)" if all(s["peak_reset"] for s in summaries.values()) else
           " (reset NOT available here, so the warm-up peak may mask it)")
        + " and the allocator's free pages returned to the OS (`malloc_trim`) so that repetitions do not reuse",
        "pages of the previous one; *1st rep* is the first hypergradient of the fresh process, the median is over all",
        "repetitions.",
        f"*x N10* = ratio to the same adjoint at N = {base_n}; *x implicit* = ratio to the implicit adjoint at the",
        "same N (both measured in this run). *s / hypergrad* = forward + backward seconds (the graph walk",
        "is not timed). *fwd residual* = natural residual ||F(phi_N)|| of the forward iterate",
        f"(||F(phi_0)|| = {fmt(r0)}). *GMRES* = matrix-vector products of the implicit backward's linear",
        "solve and its final relative residual.",
        "",
        "## Target",
        "",
        f"- Implicit adjoint flat in N: graph bytes N={last}/N={base_n} = {imp_graph_ratio:.3f}, {mem_label} "
        f"N={last}/N={base_n} = {imp_mem_ratio:.3f}; target <= 1.1: **{'MET' if implicit_flat else 'NOT MET'}**.",
        f"- Unrolled growing with N: graph bytes N={last}/N={base_n} = "
        f"{summaries['unrolled', last]['graph_ratio_vs_N10']:.1f}x, {mem_label} "
        f"{summaries['unrolled', last]['memory_ratio_vs_N10']:.1f}x: **{'MET' if unrolled_growing else 'NOT MET'}**.",
        f"- At N = {last} the unrolled hypergradient's {mem_label} is "
        f"{summaries['unrolled', last]['memory_ratio_vs_implicit']:.1f}x the implicit one and its graph "
        f"{summaries['unrolled', last]['graph_ratio_vs_implicit']:.0f}x.",
    ]
    if cuda:
        md.append("- On a GPU the targets use the device memory (`torch.cuda.max_memory_allocated` increase); the "
                  "host RSS columns then only show host-side bookkeeping.")
    md += [
        "",
        "## Notes",
        "",
        "- Why not `saved_tensors_hooks`: `implicit_nash` computes every pseudo-gradient with `torch.func.grad`",
        "  (or `jacrev`), and torch refuses to run those transforms while saved-tensor hooks are active",
        "  (`RuntimeError: torch.func.{grad, vjp, jacrev, hessian} don't yet support saved tensor hooks`).",
        "  The graph walk is used instead; on a control graph built without `torch.func` (3 unrolled steps,",
        f"  4 players, `autograd.grad(create_graph=True)`) the walk counts {validation['walk_bytes']} bytes and",
        f"  `saved_tensors_hooks` (storages of live saved tensors) {validation['hooks_bytes']} bytes: "
        f"{'identical' if validation['agree'] else 'DIFFERENT'}.",
        "- `ru_maxrss` vs `VmHWM`: on Linux, `getrusage(RUSAGE_SELF).ru_maxrss` of a process started with",
        "  `subprocess` starts at the resident size of the pre-exec image, a copy of the parent (the kernel folds",
        "  the old address space's high-water mark into the process's maxrss at exec; `clear_refs` cannot reset",
        "  that part). The parent of these workers was resident at " + _parent_rss_range(summaries)
        + " when it started them, so the *ru_maxrss +* column",
        "  stays 0 until a hypergradient's peak exceeds that, and under-counts after. `VmHWM` from",
        "  `/proc/self/status` is the same high-water mark for the current address space only, and is what the",
        "  *peak RSS +* columns report.",
        "- The implicit backward's own vectors (GMRES's Krylov basis of 51 x 44,025 float64 = 18 MB, the",
        "  linearisation of one pseudo-gradient evaluation) are not in the graph; they are in the RSS column.",
        "",
        "## Monotonicity, step size and convergence",
        "",
        f"- Why lam = {args.lam:g}: implicit differentiation needs an equilibrium of a strongly monotone game (the",
        "  implicit function theorem needs the Jacobian of the pseudo-gradient to be non-singular there; strong",
        "  monotonicity makes it so and makes the forward iteration converge). An earlier version of this",
        "  benchmark used lam = 1, which is not monotone: the Hessians of MSE_i computed in this run have",
        f"  smallest eigenvalue {init['min_eigenvalue'] - args.lam:.3g} at phi_i = theta, so lam = 1 leaves blocks",
        "  lam*I + Hess MSE_i with " + ("negative" if init["min_eigenvalue"] - args.lam + 1 <= 0 else "small")
        + " eigenvalues; there the forward iteration did not converge and the",
        "  implicit backward's GMRES ran out of its 1000-product budget, so that run's implicit gradients and",
        "  times are not reported here.",
        f"- Diagnostic (computed before the measurements, {diag['seconds']:.0f} s): eigenvalues of the Jacobian blocks "
        f"lam*I + Hess MSE_i of {diag['players_checked']} of {NUM_PLAYERS} players",
        f"  (the coupling adds at most 2w/B = {2 * args.w / NUM_PLAYERS:.3g}): at phi_i = theta in "
        f"[{init['min_eigenvalue']:.4g}, {init['max_eigenvalue']:.4g}], at the forward iterate phi_N, N = {diag['steps']}, "
        f"in [{final['min_eigenvalue']:.4g}, {final['max_eigenvalue']:.4g}];",
        f"  {init['players_not_monotone'] + final['players_not_monotone']} blocks with a non-positive eigenvalue: "
        + ("the game is strongly monotone at both points (on the smooth piece where the Hessian is taken)."
           if diag["strongly_monotone"] else "**the game is NOT monotone at the points visited.**"),
        f"- Step size: L = {diag['lipschitz']:.4g} (largest block eigenvalue at the two points), 2/L = {diag['step_bound']:.4g}; "
        f"the step {args.step_size:g} is {'below' if args.step_size < diag['step_bound'] else 'NOT below'} it, and one",
        f"  step of `SimultaneousGradient` contracts by at most max|1 - step * eigenvalue| = {diag['contraction_per_step']:.4f} "
        "on a smooth piece.",
        f"- Forward residual ||F(phi_N)||: {fmt(r0)} at N = 0, "
        + ", ".join(f"{fmt(v)} at N = {n}" for n, v in fwd_res.items())
        + (" (the iterate reaches the equilibrium)." if forward_converged else "."),
    ]
    if not forward_converged and args.activation == "relu":
        md += [
            "  The ReLU iteration does not converge" + (" despite the positive eigenvalues" if diag["strongly_monotone"] else "")
            + ": the pseudo-gradient of a ReLU",
            "  network is only piecewise smooth, it jumps where a hidden pre-activation at a training input changes",
            f"  sign, and in one more step from phi_N {diag['kink_sign_changes']} of the {diag['preactivations']} "
            "pre-activations (25 players x 5 inputs x 80 units) change sign:",
            "  the iterate oscillates across such kinks. The Hessian sees each smooth piece only, and no lam removes",
            "  the jumps (lam*I is continuous). phi_N is therefore not an equilibrium in the smooth sense, and the",
            "  implicit hypergradient (the implicit function theorem applied at phi_N, with the Jacobian of the piece",
            "  phi_N lies on) is an approximation; `--activation tanh` gives the smooth variant of the game.",
        ]
    if approx_warned:
        md.append("  `nash_equilibrium` warned at N = " + ", ".join(str(n) for n in approx_warned)
                  + " that the fixed step count stopped above its tolerance, so the implicit gradient is only approximate.")
    md += [
        "- Implicit backward (GMRES, `throw=True`): "
        + ", ".join(f"N = {n}: {g['matvecs']} products, relative residual {g['relative_residual']:.2g}"
                    + ("" if g["converged"] else " (NOT converged)")
                    for n, g in zip(step_counts, gmres_conv))
        + (": the linear solve converges at every N, so the implicit times are those of a converged backward."
           if all(g["converged"] for g in gmres_conv) else "."),
        "",
        "## Reproduce",
        "",
        f"`{env['command']}` (add `--quick` for a smoke test; it writes `{NAME}_quick.*`; `--lam`, `--step-size` "
        "and `--activation` change the game and the forward step).",
    ]
    payload = {"environment": env, "settings": vars(args), "step_counts": step_counts,
               "validation_graph_walk_vs_hooks": validation, "game_diagnostic": diag,
               "summary": [summaries[k] for k in summaries], "checks": checks, "raw": raw,
               "elapsed_s": elapsed}
    paths = _common.write_results(NAME, args.quick, payload, md)
    print(f"\nwrote {paths['json']} and {paths['md']} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
