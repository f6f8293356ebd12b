"""The ``implicit-nash`` command."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, non-zero exit, no traceback
        self.exit(2, f"implicit-nash: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="implicit-nash", description="Differentiable Nash equilibria and Nash-GBML.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="solve a small non-symmetric game and check its hypergradient")
    demo.add_argument("--players", type=int, default=5)
    demo.add_argument("--dim", type=int, default=3)

    train = sub.add_parser("train", help="meta-train a (Nash-)GBML algorithm on a task family")
    train.add_argument("task", choices=["sinusoid", "faces", "celeba", "digits", "miniimagenet"], help="task family")
    train.add_argument("--data-root", help="dataset folder (celeba, miniimagenet)")
    train.add_argument("--ways", type=int, help="classes per episode (classification)")
    train.add_argument("--shots", type=int, help="support examples (per class for classification)")
    train.add_argument("--query-shots", type=int, help="query examples (per class for classification)")
    train.add_argument("--filters", type=int, help="conv-4 filters (classification)")
    train.add_argument("--algorithm", choices=["maml", "fomaml", "metasgd", "cavia", "trmaml", "imaml"])
    train.add_argument("--penalty", choices=["none", "centroid", "robust"])
    train.add_argument("--weight", type=float, help="penalty weight w")
    train.add_argument("--robustness", type=float, help="robust penalty's r (>= 1)")
    train.add_argument("--robust-c", type=float, help="robust penalty's constant C (default 1e-8)")
    train.add_argument("--penalty-alpha", type=float,
                       help="alpha of the (B/(alpha N))^2 scale (default: inner lr; Meta-SGD 0.05)")
    train.add_argument("--num-tasks", type=int, help="N of the penalty scale (default: the task family's)")
    train.add_argument("--meta-gradient", choices=["unrolled", "first_order", "implicit"])
    train.add_argument("--inner-steps", type=int)
    train.add_argument("--inner-lr", type=float)
    train.add_argument("--outer-lr", type=float)
    train.add_argument("--meta-batch", type=int)
    train.add_argument("--iterations", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--seeds", type=int, nargs="+", help="train these seeds together, vectorised over runs")
    train.add_argument("--context-dim", type=int, help="CAVIA context parameters")
    train.add_argument("--task-lr", type=float, help="TR-MAML task-probability learning rate")
    train.add_argument("--lam", type=float, help="iMAML proximal weight")
    train.add_argument("--inner-solver", choices=["newton", "prgd"],
                       help="iMAML's inner solver (default newton: Newton-Krylov)")
    train.add_argument("--inner-budget", type=int,
                       help="iMAML: a fixed number of Newton steps (default: solve to tolerance)")
    train.add_argument("--cg-budget", type=int,
                       help="iMAML: a fixed number of backward Krylov iterations (default: to tolerance)")
    train.add_argument("--krylov-steps", type=int,
                       help="iMAML: Krylov iterations per Newton step (default 20; exactly this many when budgeted)")
    train.add_argument("--hypergrad-check-every", type=int,
                       help="budgeted iMAML: measure the meta-gradient's error against a tight solve every "
                            "K iterations (default 100; 0: never)")
    train.add_argument("--lr-init", type=float, nargs=2, metavar=("LO", "HI"),
                       help="Meta-SGD: draw the initial step sizes uniformly from [LO, HI) (default: --inner-lr)")
    train.add_argument("--activation", choices=["relu", "tanh"])
    train.add_argument("--eval-every", type=int)
    train.add_argument("--checkpoint-every", type=int)
    train.add_argument("--val-tasks", type=int)
    train.add_argument("--test-tasks", type=int)
    train.add_argument("--device", help="cpu or cuda")
    train.add_argument("--dtype", choices=["float32", "float64"])
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--config", help="JSON file of options (command-line values override it)")
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--distributed", action="store_true", default=None,
                       help="shard the meta-batch over torch.distributed ranks (run under torchrun)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    rep = sub.add_parser("reproduce", help="reproduce the paper's sinusoid tables (all seeds, all rows)")
    rep.add_argument("name", choices=["table2", "robustness", "table3", "table4"],
                     help="table2: Table 2's 12 rows; robustness: the weight sweeps of Tables 5-6; table3: CelebA "
                          "image completion; table4: MiniImageNet (both need --data-root)")
    rep.add_argument("--iterations", type=int, help="meta-iterations per run (default: the paper's)")
    rep.add_argument("--data-root", help="dataset folder for table3 (CelebA) and table4 (MiniImageNet)")
    rep.add_argument("--seeds", type=int, default=5, help="seeds per row, trained together (paper: 5)")
    rep.add_argument("--jobs", type=int, default=1, help="rows trained in parallel processes")
    rep.add_argument("--algorithms", nargs="+", help="only these algorithms' rows")
    rep.add_argument("--out", default="results", help="output directory (default: results)")
    rep.add_argument("--eval-every", type=int, help="validation every N iterations (default 1000)")
    rep.add_argument("--val-tasks", type=int)
    rep.add_argument("--test-tasks", type=int)
    rep.add_argument("--no-progress", action="store_true")

    sw = sub.add_parser("sweep", help="run a grid of trainings (local process pool or Ray), cached and resumable")
    sw.add_argument("spec", help="JSON file: {'task': ..., 'fixed': {...}, 'grid': {option: [values]}}")
    sw.add_argument("--jobs", type=int, default=1, help="parallel runs on the local backend")
    sw.add_argument("--backend", choices=["local", "ray"], default="local")
    sw.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    sw.add_argument("--out", default="sweeps", help="output directory (default: sweeps)")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar")

    ver = sub.add_parser("verify", help="run the numerical checks of the paper's theory (the analysis package)")
    ver.add_argument("--quick", action="store_true", help="smaller grids, under 3 minutes")
    ver.add_argument("--out", help="output directory (default results/analysis[_quick])")
    ver.add_argument("--check", default="all", help="one check, or all (default)")

    ev = sub.add_parser("evaluate", help="re-evaluate a saved run from its checkpoint")
    ev.add_argument("run_dir")
    ev.add_argument("--split", choices=["test", "val"], default="test")
    return parser


_TRAIN_KEYS = ("algorithm", "penalty", "weight", "robustness", "robust_c", "penalty_alpha", "num_tasks",
               "meta_gradient", "inner_steps", "inner_lr", "outer_lr", "meta_batch", "iterations", "seed", "seeds",
               "context_dim", "task_lr", "lam", "inner_solver", "inner_budget", "cg_budget",
               "krylov_steps", "hypergrad_check_every", "lr_init", "activation", "eval_every", "checkpoint_every", "val_tasks",
               "test_tasks", "device", "dtype", "threads", "data_root", "ways", "shots", "query_shots", "filters",
               "distributed")


def _fail(message: str) -> int:
    print(f"implicit-nash: error: {message}", file=sys.stderr)
    return 2


def _train(args) -> int:
    import json

    from .meta.config import ConfigError, load_config_file, resolve
    from .meta.trainer import train
    from .tasks import DataError
    try:
        if args.distributed:
            from .distributed import init_from_env
            try:
                init_from_env()
            except RuntimeError as e:
                return _fail(str(e).splitlines()[0])
        if args.resume:
            given = [k for k in _TRAIN_KEYS if k != "distributed" and getattr(args, k) is not None] + \
                (["config"] if args.config else [])
            if given:
                return _fail(f"--resume continues the saved configuration; drop {', '.join('--' + g.replace('_', '-') for g in given)}")
            metrics = train({}, args.out, resume=True, progress=not args.no_progress)
        else:
            file = load_config_file(args.config) if args.config else None
            cli = {k: getattr(args, k) for k in _TRAIN_KEYS}
            cli["task"] = args.task
            config = resolve(cli, file)
            metrics = train(config, args.out, progress=not args.no_progress)
    except (ConfigError, DataError, FloatingPointError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail(f"interrupted; continue with: implicit-nash train {args.task} --out {args.out} --resume")
    mt = metrics["metric"]
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return 0  # rank 0 reports for a sharded run
    print(json.dumps({k: metrics[k] for k in (f"test_{mt}_mean", f"test_{mt}_worst", f"test_{mt}_std",
                                              "sec_per_iteration", "iterations")}))
    return 0


def _reproduce(args) -> int:
    from .meta.config import ConfigError
    from .reproduce import reproduce
    from .tasks import DataError
    overrides = {k: getattr(args, k) for k in ("eval_every", "val_tasks", "test_tasks") if getattr(args, k) is not None}
    try:
        if args.iterations is not None and args.iterations < 1:
            return _fail(f"--iterations must be positive, got {args.iterations}")
        reproduce(args.name, args.out, iterations=args.iterations, seeds=args.seeds, jobs=args.jobs,
                  algorithms=args.algorithms, progress=not args.no_progress, overrides=overrides or None,
                  data_root=args.data_root)
    except (ConfigError, DataError, FloatingPointError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to resume (finished rows are kept)")
    return 0


def _evaluate(args) -> int:
    import json

    from .meta.config import ConfigError
    from .meta.trainer import evaluate_run
    try:
        result = evaluate_run(args.run_dir, split=args.split)
    except ConfigError as e:
        return _fail(str(e))
    print(json.dumps(result, indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        if args.players < 1 or args.dim < 1:
            print("implicit-nash: error: --players and --dim must be positive", file=sys.stderr)
            return 2
        from .demo import main as demo_main
        return demo_main(args.players, args.dim)
    if args.command == "train":
        return _train(args)
    if args.command == "sweep":
        from .meta.config import ConfigError
        from .sweep import load_spec, sweep
        from .tasks import DataError
        try:
            sweep(load_spec(args.spec), args.out, jobs=args.jobs, backend=args.backend, address=args.address,
                  progress=not args.no_progress)
        except (ConfigError, DataError) as e:
            return _fail(str(e))
        return 0
    if args.command == "verify":
        # The command line is the application layer: the library modules never import analysis.
        from analysis import CHECKS
        from analysis.report import main as verify_main
        if args.check != "all" and args.check not in CHECKS:
            return _fail(f"unknown check {args.check!r}; choose from {', '.join(CHECKS)} or all")
        return verify_main(args.check, args.out, args.quick)
    if args.command == "reproduce":
        return _reproduce(args)
    if args.command == "evaluate":
        return _evaluate(args)
    return 2  # pragma: no cover (argparse enforces a command)


if __name__ == "__main__":
    raise SystemExit(main())
