"""Seconds per meta-iteration and peak memory of second-order MAML on conv-4: implicit_nash vs learn2learn.

Problem (identical for every method): 5-way 5-shot classification with 15 query images per class,
synthetic 84×84 RGB images (uniform noise, one fixed batch per repetition), Finn et al.'s conv-4 with
32 filters (``implicit_nash.tasks.Conv4``: batch statistics in the batch norm, 32,901 parameters),
meta-batch 2, 5 inner SGD steps with inner lr 0.01 on the support cross-entropy, outer loss the mean
query cross-entropy, second-order meta-gradient, Adam with lr 1e-4 (the ``train miniimagenet``
preset), float32, CPU, one thread.

Networks. ``Conv4(fast=True)`` is the default: the same function with layers whose second
derivatives are cheaper on the CPU (``implicit_nash.tasks._fast_ops``: batch norm with a closed-form
double backward, max-pool indices from a channels-last max-pool, convolutions whose double backward
is one convolution and one convolution backward, the images' gradient never computed, channels-last
activations). ``Conv4(fast=False)`` is the same network on PyTorch's own layers (the default before).
learn2learn's standard conv-4 is ``learn2learn.vision.models.CNN4`` (its ``MiniImagenetCNN``):
conv -> batch norm -> ReLU -> max-pool blocks on PyTorch's layers; it is built here with 32 filters,
the MAML/paper MiniImageNet width (its own default, used by its MiniImageNet example, is 64 filters:
four times the convolution work, not compared), and the weights of our ``Conv4``'s initialisation,
so that it computes the same function (checked below).

Methods (the speed goal is against the peer on its own standard network; the identical-network rows
show where the speed comes from):

* ``ours``: ``MAML(inner_steps=5, inner_lr=0.01, loss="cross_entropy")`` on the default
  ``Conv4`` with its default ``task_vectorisation="auto"``, which for a convolutional network on the
  CPU loops over the tasks with plain autograd and computes each task's meta-gradient as soon as its
  query loss is known (one task's graph alive at a time); ``task_losses`` -> ``outer_loss`` ->
  ``backward`` -> ``Adam.step``;
* ``learn2learn-cnn4`` (b): ``learn2learn.algorithms.MAML(CNN4, lr=0.01, first_order=False)``, a
  Python loop over the tasks (``clone()``, 5 x ``adapt(support_loss)``), the query losses averaged
  and back-propagated once (the idiom of learn2learn's MAML examples);
* ``learn2learn`` (a): the same learn2learn loop on our default ``Conv4`` module (identical module);
* ``ours-pytorch-layers`` and ``learn2learn-pytorch-layers``: both on ``Conv4(fast=False)``;
* ``ours-vmap`` (``--with-vmap``): ours with ``task_vectorisation="vmap"`` (``torch.func.vmap`` over
  the tasks: per-task convolution weights become grouped convolutions, PyTorch's layers).

learn2learn 0.2.0's ``learn2learn.algorithms`` subpackage is imported from its PyPI source
distribution (sha256 69f1d7cb...a419, the file of ``benchmarks/requirements-meta-peers.txt``)
without the top-level package, which needs torchvision and gym: ``--l2l-path`` names the unpacked
sdist folder; ``learn2learn/vision/models/cnn4.py`` is loaded from the same folder by file (it needs
scipy). When learn2learn cannot be imported, ``--peer loop`` times the loop learn2learn performs
written here instead (clone the parameters, unroll the steps with
``torch.autograd.grad(create_graph=True)``, ``torch.func.functional_call``), and the report says so.

Before timing, the meta-gradients are compared in float64 on one batch (max relative difference
over all parameters; the run aborts above ``--rtol``): ours against the peer on the identical
module, ours against ours on PyTorch's layers, and ours against learn2learn on ``CNN4`` (the same
function: same meta-gradients).

Time: ``--reps`` repetitions (default 5); each runs ``--iters`` meta-iterations (default 2) of every
method, in a shuffled order, from the same initial network; the median over repetitions of the
seconds per meta-iteration, and the ratio against the peer from the same run.

Memory: every method runs ``--iters`` meta-iterations in a fresh subprocess, which reports its peak
resident set size (``VmHWM``, reset after building the method and the batch) and its RSS before the first iteration; the difference is the
training's own peak. The same subprocess measurement is made for the implicit mode (iMAML,
``IMAML(lam=1, solver=PRGD(num_steps=n), linear_solver=GMRES(max_steps=10, restart=10), throw=False)``:
a fixed forward budget and, as iMAML's own practice of 5-20 conjugate-gradient steps, a fixed backward
budget of 10 products; and Nash-iMAML with ``CentroidPenalty``) at
``--implicit-steps`` forward steps (default 5 and 50), next to unrolled MAML at ``--unrolled-steps``
(default 5 and 10), whose graph grows with the steps.

Usage (from the repository root)::

    python benchmarks/meta_images_vs_peers.py --l2l-path /tmp/l2l_src/learn2learn-0.2.0 --with-vmap
    python benchmarks/meta_images_vs_peers.py --quick --peer loop
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import subprocess
import sys
import time
from typing import Any, Dict

import _common as C

C.ensure_importable()

import torch  # noqa: E402
import torch.nn.functional as nnf  # noqa: E402

from implicit_nash.meta import IMAML, MAML  # noqa: E402
from implicit_nash.penalties import CentroidPenalty  # noqa: E402
from implicit_nash.linear_solve import GMRES  # noqa: E402
from implicit_nash.solvers import PRGD  # noqa: E402
from implicit_nash.tasks import Conv4  # noqa: E402

WAYS, SHOTS, QUERY, SIZE, FILTERS, META_BATCH = 5, 5, 15, 84, 32, 2
INNER_LR, OUTER_LR, INNER_STEPS = 0.01, 1e-4, 5


def make_batch(seed: int, dtype=torch.float32, size: int = SIZE) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAYS)
    return {"x_support": torch.rand(META_BATCH, WAYS * SHOTS, 3, size, size, generator=g, dtype=dtype),
            "y_support": labels.repeat_interleave(SHOTS).expand(META_BATCH, -1).clone(),
            "x_query": torch.rand(META_BATCH, WAYS * QUERY, 3, size, size, generator=g, dtype=dtype),
            "y_query": labels.repeat_interleave(QUERY).expand(META_BATCH, -1).clone()}


def make_model(dtype=torch.float32, size: int = SIZE, fast: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    return Conv4(3, FILTERS, WAYS, size, fast=fast).to(dtype)


def import_cnn4(path):
    """learn2learn's standard conv-4 class (``learn2learn.vision.models.CNN4``), loaded from its file
    when the ``learn2learn.vision`` package cannot be imported (it needs torchvision)."""
    import importlib.util
    import os
    try:
        from learn2learn.vision.models import CNN4
        return CNN4
    except Exception:  # noqa: BLE001 - torchvision missing or broken
        pass
    import_l2l(path)  # the package module (or its stub), which cnn4.py imports
    package = sys.modules["learn2learn"]
    file = os.path.join(list(package.__path__)[0], "vision", "models", "cnn4.py")
    spec = importlib.util.spec_from_file_location("learn2learn_vision_models_cnn4", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CNN4


def make_cnn4(args, dtype=torch.float32, size: int = SIZE) -> torch.nn.Module:
    """learn2learn's CNN4 with 32 filters, carrying the weights of our Conv4's initialisation (the
    same function: conv, batch norm with batch statistics in training mode, ReLU, 2x2 max-pool)."""
    ours = make_model(dtype, size, fast=False)
    side = size
    for _ in range(4):
        side //= 2
    net = import_cnn4(args.l2l_path)(WAYS, hidden_size=FILTERS, embedding_size=FILTERS * side * side).to(dtype)
    with torch.no_grad():
        for i, block in enumerate(net.features):
            block.conv.weight.copy_(ours.convs[i].weight)
            block.conv.bias.copy_(ours.convs[i].bias)
            block.normalize.weight.copy_(ours.norms[i].weight)
            block.normalize.bias.copy_(ours.norms[i].bias)
        net.classifier.weight.copy_(ours.head.weight)
        net.classifier.bias.copy_(ours.head.bias)
    return net


class Ours:
    def __init__(self, model, algo):
        self.model, self.algo = model, algo
        self.theta = algo.init(model)
        self.params = self.theta["params"]
        self.opt = torch.optim.Adam(list(self.params.values()), lr=OUTER_LR)

    def forward_backward(self, batch):
        loss = self.algo.outer_loss(self.algo.task_losses(self.model, self.theta, batch), batch, {})
        loss.backward()
        return loss.detach()


CNN4_ORDER = ([f"features.{i}.conv.{k}" for i in range(4) for k in ("weight", "bias")]
              + [f"features.{i}.normalize.{k}" for i in range(4) for k in ("weight", "bias")]
              + ["classifier.weight", "classifier.bias"])  # CNN4's names in Conv4's parameter order


class Learn2Learn:
    def __init__(self, l2l, model, order=None):
        self.maml = l2l.algorithms.MAML(model, lr=INNER_LR, first_order=False)
        named = dict(self.maml.module.named_parameters())
        # in the order of our Conv4's parameters, which the gradient check and the restarts match by position
        self.params = named if order is None else {k: named[k] for k in order}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=OUTER_LR)

    def forward_backward(self, batch):
        total = 0.0
        for i in range(META_BATCH):
            learner = self.maml.clone()
            for _ in range(INNER_STEPS):
                learner.adapt(nnf.cross_entropy(learner(batch["x_support"][i]), batch["y_support"][i]))
            total = total + nnf.cross_entropy(learner(batch["x_query"][i]), batch["y_query"][i])
        loss = total / META_BATCH
        loss.backward()
        return loss.detach()


class Loop:
    """What learn2learn's MAML does, written here: per task, unroll the steps with create_graph=True."""

    def __init__(self, model):
        self.model = model
        self.params = dict(model.named_parameters())
        self.opt = torch.optim.Adam(list(self.params.values()), lr=OUTER_LR)

    def forward_backward(self, batch):
        call = torch.func.functional_call
        total = 0.0
        for i in range(META_BATCH):
            fast = dict(self.params)
            for _ in range(INNER_STEPS):
                loss = nnf.cross_entropy(call(self.model, fast, (batch["x_support"][i],)), batch["y_support"][i])
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {k: v - INNER_LR * g for (k, v), g in zip(fast.items(), grads)}
            total = total + nnf.cross_entropy(call(self.model, fast, (batch["x_query"][i],)), batch["y_query"][i])
        loss = total / META_BATCH
        loss.backward()
        return loss.detach()


def restart_and_time(m, init, batch, iters: int, sync=lambda: None) -> float:
    """Reset ``m``'s parameters to ``init`` (a list, or a dict in ``m.params``' order) and its Adam, run
    ``iters`` meta-iterations; seconds per iteration (``sync`` waits for the device)."""
    if isinstance(init, dict):
        init = list(init.values())
    with torch.no_grad():
        for v, v0 in zip(m.params.values(), init):  # by position: Conv4's parameters in Conv4's order
            v.copy_(v0)
    m.opt = torch.optim.Adam(list(m.params.values()), lr=OUTER_LR)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        m.opt.zero_grad()
        m.forward_backward(batch)
        m.opt.step()
    sync()
    return (time.perf_counter() - t0) / iters


def import_l2l(path):
    if path:
        sys.path.insert(0, path)
    import meta_vs_peers  # the sinusoid benchmark's import of learn2learn.algorithms without the top level
    return meta_vs_peers.import_learn2learn()


def build(name: str, args, dtype=torch.float32, size: int = SIZE):
    model = make_model(dtype, size, fast=not name.endswith("pytorch-layers"))
    if name in ("ours", "ours-pytorch-layers"):
        return Ours(model, MAML(inner_steps=INNER_STEPS, inner_lr=INNER_LR, loss="cross_entropy"))
    if name == "learn2learn-cnn4":
        return Learn2Learn(import_l2l(args.l2l_path)[0], make_cnn4(args, dtype, size), CNN4_ORDER)
    if name == "ours-vmap":
        return Ours(model, MAML(inner_steps=INNER_STEPS, inner_lr=INNER_LR, loss="cross_entropy",
                                task_vectorisation="vmap"))
    if name.startswith("maml-"):
        return Ours(model, MAML(inner_steps=int(name.split("-")[1]), inner_lr=INNER_LR, loss="cross_entropy"))
    if name.startswith("imaml-") or name.startswith("nash-imaml-"):
        n = int(name.rsplit("-", 1)[1])
        penalty = CentroidPenalty(weight=0.1, num_tasks=1000, inner_lr=INNER_LR) if name.startswith("nash") else None
        return Ours(model, IMAML(lam=1.0, inner_lr=INNER_LR, loss="cross_entropy", penalty=penalty,
                                 solver=PRGD(num_steps=n), linear_solver=GMRES(max_steps=10, restart=10),
                                 throw=False))
    if name in ("loop", "loop-pytorch-layers"):
        return Loop(model)
    return Learn2Learn(import_l2l(args.l2l_path)[0], model)  # learn2learn, learn2learn-pytorch-layers


def child(args) -> None:
    import warnings

    # VmHWM, not ru_maxrss: a subprocess's ru_maxrss is floored by its parent's (see memory_hypergradient.py)
    from memory_hypergradient import peak_rss_bytes, reset_peak_rss
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    method = build(args.child, args)
    batch = make_batch(1)
    reset_peak_rss()
    before, counter = peak_rss_bytes()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        method.opt.zero_grad()
        method.forward_backward(batch)
        method.opt.step()
    seconds = (time.perf_counter() - t0) / args.iters
    peak, _ = peak_rss_bytes()
    print(json.dumps({"method": args.child, "rss_before_mb": before / 2**20, "peak_rss_mb": peak / 2**20,
                      "training_peak_mb": (peak - before) / 2**20, "sec_per_iteration": seconds, "counter": counter}))


def memory(name: str, args) -> Dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--iters", str(args.iters)]
    if args.l2l_path:
        cmd += ["--l2l-path", args.l2l_path]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {name:16s} peak RSS {row['peak_rss_mb']:8.1f} MB, training's own {row['training_peak_mb']:8.1f} MB "
          f"({row['sec_per_iteration']:.2f} s/iteration in the subprocess)", flush=True)
    return row


def check_gradients(a: str, b: str, args) -> float:
    """Max relative difference of the float64 meta-gradients of methods ``a`` and ``b`` on one batch
    (parameters matched by position: every network here has Conv4's parameters in Conv4's order)."""
    size = args.check_size
    batch = make_batch(0, torch.float64, size)
    grads = []
    for name in (a, b):
        m = build(name, args, torch.float64, size)
        m.forward_backward(batch)
        grads.append([p.grad.detach().clone() for p in m.params.values()])
    diff = max(float((x - y).abs().max()) for x, y in zip(*grads))
    scale = max(float(g.abs().max()) for g in grads[1])
    return diff / scale


def profile(names, args, size: int, rows: int = 12) -> Dict[str, Any]:
    """Self CPU time per operator of one meta-iteration (torch.profiler) of each method in ``names``."""
    from torch.profiler import profile as torch_profile
    out = {}
    for name in names:
        m = build(name, args, torch.float32, size)
        batch = make_batch(0, torch.float32, size)
        m.forward_backward(batch)  # warm-up
        with torch_profile() as prof:
            m.forward_backward(batch)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        out[name] = {"total_s": total / 1e6, "top": [(e.key, e.self_cpu_time_total / 1e6, e.count)
                                                      for e in events[:rows]]}
    return out


LABELS = {"ours": "implicit_nash MAML, default Conv4 (fast layers; per-task loop)",
          "learn2learn-cnn4": "(b) learn2learn MAML on its standard CNN4 (32 filters, PyTorch layers)",
          "learn2learn": "(a) learn2learn MAML on the identical module (our default Conv4)",
          "ours-pytorch-layers": "implicit_nash MAML, Conv4(fast=False) (PyTorch layers)",
          "learn2learn-pytorch-layers": "learn2learn MAML on Conv4(fast=False) (PyTorch layers)",
          "loop": "(a) per-task unrolled loop (learn2learn's method, written here), our default Conv4",
          "loop-pytorch-layers": "per-task unrolled loop on Conv4(fast=False)",
          "ours-vmap": "implicit_nash MAML, vmapped tasks (PyTorch layers under vmap)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", choices=["learn2learn", "loop"], default="learn2learn")
    p.add_argument("--l2l-path", help="folder holding the learn2learn package (the unpacked 0.2.0 sdist)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--implicit-steps", type=int, nargs="+", default=[5, 50])
    p.add_argument("--unrolled-steps", type=int, nargs="+", default=[5, 10])
    p.add_argument("--check-size", type=int, default=84, help="image size of the float64 gradient check")
    p.add_argument("--rtol", type=float, default=1e-8)
    p.add_argument("--skip-steps", action="store_true", help="skip the memory-against-steps rows")
    p.add_argument("--with-vmap", action="store_true", help="also time the vmapped tasks (the former default)")
    p.add_argument("--profile-size", type=int, default=0,
                   help="profile one meta-iteration of ours and the peer at this image size (0: no profile)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.reps, args.iters, args.implicit_steps, args.unrolled_steps, args.check_size = 1, 1, [5], [5], 16
    torch.set_num_threads(1)
    env = C.environment(threads=1, reps=args.reps, iters=args.iters)
    peer = args.peer
    how = "the loop learn2learn performs, written here (learn2learn not used)"
    if peer == "learn2learn":
        _, how = import_l2l(args.l2l_path)
    headline = "learn2learn-cnn4" if peer == "learn2learn" else "loop-pytorch-layers"
    names = ["ours", headline, peer, "ours-pytorch-layers", f"{peer}-pytorch-layers"]
    names = list(dict.fromkeys(names))
    checks = {f"ours vs {peer} (identical module)": ("ours", peer),
              "ours vs ours on PyTorch's layers": ("ours", "ours-pytorch-layers"),
              f"ours vs {headline}": ("ours", headline)}
    rels = {}
    for label, (a, b) in checks.items():
        rels[label] = check_gradients(a, b, args)
        print(f"meta-gradient check (float64, {args.check_size}x{args.check_size}), {label}: max relative difference "
              f"{rels[label]:.2e}", flush=True)
        if rels[label] > args.rtol:
            raise SystemExit(f"the meta-gradients of {label} differ by {rels[label]:.2e} > {args.rtol}: "
                             "not the same computation")
    methods = {name: build(name, args) for name in names}
    if args.with_vmap:
        methods["ours-vmap"] = build("ours-vmap", args)
    init = [v.detach().clone() for v in methods["ours"].params.values()]
    times = {k: [] for k in methods}
    rng = random.Random(0)
    for rep in range(args.reps + 1):  # repetition 0 is a warm-up
        batch = make_batch(rep)
        order = list(methods)
        rng.shuffle(order)
        for name in order:
            seconds = restart_and_time(methods[name], init, batch, args.iters)
            if rep:
                times[name].append(seconds)
        if rep:
            print(f"  rep {rep}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in methods), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("memory (fresh subprocess per method)")
    mem = {name: memory(name, args) for name in methods}
    scaling = {}
    if args.skip_steps:
        args.unrolled_steps, args.implicit_steps = [], []
    for n in args.unrolled_steps:
        scaling[f"maml-{n}"] = memory(f"maml-{n}", args)
    for n in args.implicit_steps:
        scaling[f"imaml-{n}"] = memory(f"imaml-{n}", args)
        scaling[f"nash-imaml-{n}"] = memory(f"nash-imaml-{n}", args)
    speed = {k: med[k] / med["ours"] for k in (headline, peer)}
    mem_ratio = {k: mem["ours"]["training_peak_mb"] / mem[k]["training_peak_mb"] for k in (headline, peer)}
    prof = profile(("ours", headline), args, args.profile_size) if args.profile_size else None
    C.finish_environment(env)
    data = {"env": env, "peer": peer, "peer_import": how, "headline_peer": headline, "gradient_checks_rel": rels,
            "times": times, "median": med, "speedup_vs_peer": speed, "memory": mem,
            "memory_ratio_ours_over_peer": mem_ratio, "steps_memory": scaling, "profile": prof}
    lines = C.header_md("Second-order MAML on conv-4, 84×84, 5-way 5-shot, 5 inner steps, meta-batch 2 (CPU)", env,
                        f"{args.reps} repetitions of {args.iters} meta-iteration(s) per method, shuffled order, "
                        "median; float32, 1 thread",
                        [f"Peer: {how}."])
    lines += [f"Meta-gradients agree (float64, {args.check_size}×{args.check_size}, max relative difference): "
              + "; ".join(f"{k} {v:.1e}" for k, v in rels.items()) + ".", "",
              "| method | s / meta-iteration (median) | peak RSS (MB) | training's own peak (MB) | "
              f"speed vs (b) | memory vs (b) |", "|---|---|---|---|---|---|"]
    for name in methods:
        lines.append(f"| {LABELS[name]} | {med[name]:.2f} | {mem[name]['peak_rss_mb']:.0f} | "
                     f"{mem[name]['training_peak_mb']:.0f} | {med[headline] / med[name]:.2f}× | "
                     f"{mem[name]['training_peak_mb'] / mem[headline]['training_peak_mb']:.2f}× |")
    lines += ["", f"Speed: implicit_nash is **{speed[headline]:.2f}×** the speed of (b), the peer on its own standard "
              f"network (goal ≥ 2×), and **{speed[peer]:.2f}×** that of (a), the peer on the identical module; memory: "
              f"**{mem_ratio[headline]:.2f}×** (b)'s training peak and **{mem_ratio[peer]:.2f}×** (a)'s (goal ≤ 1×).",
              "", "Where the speed comes from: the network's layers (Conv4's fast path), which the peer gets "
              "too when given the same module, row (a); the algorithm code itself runs the same kernels as the "
              "peer's loop.", "", "## Memory against forward steps (one process per row)", "",
              "| method | forward steps | training's own peak (MB) | s / meta-iteration |", "|---|---|---|---|"]
    for name, row in scaling.items():
        kind, n = name.rsplit("-", 1)
        label = {"maml": "MAML, unrolled", "imaml": "iMAML, implicit", "nash-imaml": "Nash-iMAML + p_C, implicit"}[kind]
        lines.append(f"| {label} | {n} | {row['training_peak_mb']:.0f} | {row['sec_per_iteration']:.2f} |")
    if prof:
        lines += ["", f"## Where the time goes (torch.profiler, one meta-iteration at {args.profile_size}×"
                  f"{args.profile_size}, self CPU time)", ""]
        for name in prof:
            lines += [f"{LABELS[name]}: {prof[name]['total_s']:.2f} s profiled", "",
                      "| operator | self CPU (s) | share | calls |", "|---|---|---|---|"]
            lines += [f"| {k} | {t:.3f} | {100 * t / prof[name]['total_s']:.0f}% | {c} |" for k, t, c in prof[name]["top"]]
            lines.append("")
    paths = C.write_results("meta_images_vs_peers", args.quick, data, lines)
    print(f"speed vs (b) {speed[headline]:.2f}x, vs (a) {speed[peer]:.2f}x; memory vs (b) {mem_ratio[headline]:.2f}x, "
          f"vs (a) {mem_ratio[peer]:.2f}x; wrote {paths['md']}")


if __name__ == "__main__":
    main()
