"""The ``implicit-nash`` command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, non-zero exit, no traceback
        self.exit(2, f"implicit-nash: error: {message}\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (the train options whose
    default depends on the task: their help text names it)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# the task families whose presets are the paper's hyperparameters (the others are ours)
_PAPER_TASKS = ("sinusoid", "celeba", "miniimagenet")
_CLASSIFICATION = ("miniimagenet", "digits")


def _preset_help(key: str, what: str, tasks=None, paper: bool = True) -> str:
    """``what``, then the default per task, marking the paper's values (where the paper fixes them:
    ``paper=False`` for the settings it does not give)."""
    from .meta.config import ALGORITHM_PRESETS, DEFAULTS, PRESETS
    tasks = list(tasks or PRESETS)
    values = {task: PRESETS[task].get(key, DEFAULTS[key]) for task in tasks}
    if len(set(map(str, values.values()))) == 1:
        text = f"{what} (default {values[tasks[0]]}"
    else:
        paper_tasks = _PAPER_TASKS if paper else ()
        paper = [f"{t} {values[t]}" for t in tasks if t in paper_tasks]
        ours = [f"{t} {values[t]}" for t in tasks if t not in paper_tasks]
        text = f"{what} (default by task: " + "; ".join(
            ([", ".join(paper) + " (the paper's)"] if paper else []) + ([", ".join(ours) + (" (ours)" if paper else "")] if ours else []))
    extra = [f"{algo} on {task}: {v[key]}" for (task, algo), v in ALGORITHM_PRESETS.items() if key in v]
    return text + (f"; {', '.join(extra)}" if extra else "") + ")"


def build_parser() -> argparse.ArgumentParser:
    from .meta.config import DEFAULTS
    parser = _Parser(prog="implicit-nash", description="Differentiable Nash equilibria and Nash-GBML.",
                     formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)

    demo = command("demo", "the main job in under 3 minutes: the layer's hypergradient against a dense solve, the "
                           "theory checks (quick), and Nash-MAML against MAML on sinusoids, with a figure")
    demo.add_argument("--players", type=int, default=5, help="players of the layer check's game")
    demo.add_argument("--dim", type=int, default=3, help="strategy dimension of each player in the layer check")
    demo.add_argument("--out", help="output folder (default: a new runs/demo-<date>-<time>)")
    demo.add_argument("--iterations", type=int, default=2000,
                      help="meta-iterations of the MAML and Nash-MAML runs (the paper: 70000)")
    demo.add_argument("--layer-only", action="store_true", help="only the layer check (a few seconds)")

    train = command("train", "meta-train a (Nash-)GBML algorithm on a task family")
    t = train.add_argument
    t("task", choices=["sinusoid", "faces", "celeba", "digits", "miniimagenet"], help="task family")
    t("--data-root", help="dataset folder (celeba, miniimagenet only)")
    t("--ways", type=int, help=_preset_help("ways", "classes per episode (digits, miniimagenet only)", _CLASSIFICATION))
    t("--shots", type=int, help=_preset_help("shots", "support examples (per class for classification)"))
    t("--query-shots", type=int,
      help="query examples (per class for classification; default 5, miniimagenet 15, digits 10, images: the "
           "rest of the image)")
    t("--filters", type=int, help=_preset_help("filters", "conv-4 filters (digits, miniimagenet only)", _CLASSIFICATION))
    t("--algorithm", choices=["maml", "fomaml", "metasgd", "cavia", "trmaml", "imaml"],
      help=f"the GBML algorithm (default {DEFAULTS['algorithm']})")
    t("--penalty", choices=["none", "centroid", "robust", "proximal"],
      help="Nash-GBML penalty: centroid p_C (eq. 13), robust p_R (eq. 14), or proximal (w/2)|phi_i - theta|^2 "
           "(default none)")
    t("--weight", type=float, help="penalty weight w (no default: required with a penalty; the paper sweeps "
                                   "0.001-1)")
    t("--robustness", type=float,
      help=f"robust penalty's r >= 1 (default {DEFAULTS['robustness']}; the paper: 1 and 2)")
    t("--robust-c", type=float,
      help=f"robust penalty's constant C (default {DEFAULTS['robust_c']}; the paper gives none)")
    t("--penalty-alpha", type=float,
      help="centroid penalty: alpha of its (B/(alpha N))^2 scale (default: the inner lr; Meta-SGD 0.05, as "
           "Appendix E)")
    t("--num-tasks", type=int, help="centroid penalty: N of its scale (default: the task family's, sinusoid 100)")
    t("--meta-gradient", choices=["unrolled", "first_order", "implicit"],
      help="how the meta-gradient is computed (default: the algorithm's; fomaml first_order, imaml implicit, "
           "others unrolled)")
    t("--inner-steps", type=int, help=_preset_help("inner_steps", "inner gradient steps"))
    t("--inner-lr", type=float, help=_preset_help("inner_lr", "inner learning rate alpha"))
    t("--outer-lr", type=float, help=_preset_help("outer_lr", "outer (Adam) learning rate beta"))
    t("--meta-batch", type=int, help=_preset_help("meta_batch", "tasks per meta-iteration B"))
    t("--iterations", type=int, help=_preset_help("iterations", "meta-iterations; with --resume: continue a run, "
                                                                "finished or not, up to this many"))
    t("--seed", type=int, help=f"random seed (default {DEFAULTS['seed']})")
    t("--seeds", type=int, nargs="+", help="train these seeds together, vectorised over runs (instead of --seed)")
    t("--context-dim", type=int, help=_preset_help("context_dim", "CAVIA context parameters (cavia only)"))
    t("--task-lr", type=float, help=_preset_help("task_lr", "TR-MAML task-probability learning rate (trmaml only)"))
    t("--lam", type=float, help=f"iMAML proximal weight lambda (imaml only; default {DEFAULTS['lam']})")
    t("--inner-solver", choices=["newton", "prgd"], help="iMAML's inner solver (default newton: Newton-Krylov)")
    t("--inner-mode", choices=["auto", "budgeted", "tolerance"],
      help="iMAML: a fixed budget with its meta-gradient error measured, or solves to tolerance (default auto: "
           "budgeted with a ReLU network, whose inner minimiser sits on a kink where no tolerance can be met; "
           "tolerance with tanh)")
    t("--inner-budget", type=int, help="iMAML: a fixed number of Newton steps (default 2 when budgeted)")
    t("--cg-budget", type=int, help="iMAML: a fixed number of backward Krylov iterations (default 5 when budgeted: "
                                    "MINRES per task, GMRES on a coupled Nash-iMAML system)")
    t("--krylov-steps", type=int,
      help="iMAML: Krylov iterations per Newton step (default: exactly 3 when budgeted, at most 20 to tolerance)")
    t("--compiled", action="store_true", default=None,
      help="budgeted iMAML: run the Newton steps' and the backward's fixed Krylov iterations as compiled "
           "programs (torch.compile, inductor: the same iterates, about 1.5x faster per meta-iteration on the "
           "sinusoid preset; the first iterations take a minute or so to compile)")
    t("--hypergrad-check-every", type=int,
      help="budgeted iMAML: measure the meta-gradient's error against a tight solve every K iterations "
           "(default 100; 0: never)")
    t("--lr-init", type=float, nargs=2, metavar=("LO", "HI"),
      help="Meta-SGD: draw the initial step sizes uniformly from [LO, HI) (default: --inner-lr everywhere)")
    t("--lr-clip", type=float, nargs=2, metavar=("LO", "HI"),
      help="Meta-SGD: clamp the learned step sizes to [LO, HI] in the inner steps (default: not clamped)")
    t("--activation", choices=["relu", "tanh"], help="MLP activation (default relu, the paper's)")
    t("--eval-every", type=int, help=_preset_help("eval_every", "validate every N iterations", paper=False))
    t("--checkpoint-every", type=int, help=_preset_help("checkpoint_every", "write checkpoint.pt every N iterations", paper=False))
    t("--val-tasks", type=int, help=_preset_help("val_tasks", "validation tasks", paper=False))
    t("--test-tasks", type=int, help=_preset_help("test_tasks", "test tasks"))
    t("--eval-batch", type=int, help=_preset_help("eval_batch", "evaluation tasks adapted at a time (bounds "
                                                              "evaluation memory)", paper=False))
    t("--task-vectorisation", choices=["auto", "vmap", "loop"],
      help="the tasks of a meta-batch: vmapped, looped over with plain autograd (faster for convolutional "
           "networks on the CPU), or auto (the default: loop for convolutions on the CPU, else vmap); seeds "
           "trained together and the implicit meta-gradient always vmap")
    t("--device", help="cpu or cuda (default cpu)")
    t("--dtype", choices=["float32", "float64"], help="floating-point precision (default float32)")
    t("--threads", type=int, help="torch CPU threads (default: 1 for sinusoid, whose tiny network gains nothing "
                                  "from more and slows down badly on a shared machine; torch's default, one per "
                                  "core, for the image tasks; see benchmarks/results/threads.md)")
    t("--config", help="JSON file of options (command-line values override it)")
    t("--out", required=True, help="run directory (created; must not hold another run)")
    t("--resume", action="store_true", help="continue the run in --out from its checkpoint (with --iterations: "
                                            "to that many iterations)")
    t("--distributed", action="store_true", default=None,
      help="shard the meta-batch over torch.distributed ranks (run under torchrun)")
    t("--no-progress", action="store_true", help="no progress bar")

    rep = command("reproduce", "reproduce the paper's tables (all seeds, all rows; cached and resumable)")
    rep.add_argument("name", choices=["table2", "robustness", "table3", "table4", "faces", "digits", "batch-size",
                                      "step-size", "trajectories", "sweep-summary", "batch-size-summary",
                                      "step-size-summary"],
                     help="table2: Table 2's 12 rows; robustness: the weight sweeps of Tables 5-6; table3: CelebA "
                          "image completion; table4: MiniImageNet (both need --data-root); faces, digits: stand-ins "
                          "for Tables 3 and 4 on data that ships with scikit-image / scikit-learn (LFW faces, "
                          "digits); batch-size, step-size: "
                          "Appendix F's studies (Figures 3-10); trajectories: Figures 2 and 11-13 from the finished "
                          "Table 2 runs in --source; sweep-summary: every algorithm's weight sweep of --iterations "
                          "side by side, from the robustness reports in --source/*/ (trains nothing); "
                          "batch-size-summary, step-size-summary: that study of every algorithm at --iterations "
                          "side by side, from the study reports in --source/*/ (trains nothing)")
    rep.add_argument("--iterations", type=int, help="meta-iterations per run (default: the paper's, 70000 for "
                                                    "sinusoid)")
    rep.add_argument("--data-root", help="dataset folder for table3 (CelebA) and table4 (MiniImageNet)")
    rep.add_argument("--seeds", type=int, default=5, help="seeds per row, trained together (the paper: 5 trials)")
    rep.add_argument("--jobs", type=int, default=1, help="rows trained in parallel processes")
    rep.add_argument("--algorithms", nargs="+", help="only these algorithms' rows (default: all)")
    rep.add_argument("--rows", nargs="+", metavar="KEY",
                     help="table2, robustness, table3, table4: only these rows, by their run directory's name "
                          "(e.g. trmaml trmaml_pC_0.1 trmaml_pR_0.01_r1), trained in this order and reported in "
                          "the table's; the plain row of each algorithm is needed "
                          "for the paired comparisons, and the Holm family is the rows run (default: all)")
    rep.add_argument("--out", help="output directory (default: runs/<name>); the same command again resumes it")
    rep.add_argument("--force", action="store_true",
                     help="write into --out although it holds a report of another budget or rows")
    rep.add_argument("--eval-every", type=int, help="validation every N iterations (default 1000)")
    rep.add_argument("--val-tasks", type=int, help="validation tasks (default: the task's, sinusoid 980)")
    rep.add_argument("--test-tasks", type=int, help="test tasks (default: the task's, sinusoid 5000)")
    rep.add_argument("--no-progress", action="store_true", help="no progress bar")
    rep.add_argument("--values", type=float, nargs="+",
                     help="batch-size, step-size: the grid (default: B 5 10 15 20 25; alpha 1e-4 3e-4 1e-3 3e-3 1e-2)")
    rep.add_argument("--source", default="results",
                     help="trajectories: the directory of the Table 2 runs; sweep-summary, batch-size-summary, "
                          "step-size-summary: the directory whose subdirectories hold the reports to read")
    rep.add_argument("--grid", choices=["auto", "on", "off"], default="auto",
                     help="train the rows that differ only in penalty weights and inner step sizes as one grid "
                          "(one vmap over rows and seeds, one job): on, off, or auto (where it measured faster: "
                          "CAVIA; see benchmarks/results/grid_runs.md)")
    rep.add_argument("--reuse", nargs="+", metavar="DIR", default=[],
                     help="batch-size, step-size: link in the finished runs of an identical configuration from "
                          "these reproductions' runs/ (e.g. a weight sweep's Table 2 rows, which are the study's "
                          "rows at B = 25 or alpha = 0.001) instead of training them; the report lists them")
    rep.add_argument("--report-only", action="store_true",
                     help="train nothing: rebuild the table, JSON and figure from the rows already finished")

    sw = command("sweep", "run a grid of trainings (local process pool or Ray), cached and resumable")
    sw.add_argument("spec", help="JSON file: {'task': ..., 'fixed': {...}, 'grid': {option: [values]}}")
    sw.add_argument("--jobs", type=int, default=1, help="parallel runs on the local backend")
    sw.add_argument("--backend", choices=["local", "ray"], default="local", help="where the runs train")
    sw.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    sw.add_argument("--out", help="output directory (default: runs/<spec file name>); the same command again "
                                  "resumes it")
    sw.add_argument("--force", action="store_true", help="write into --out although it holds another sweep")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar")

    ver = command("verify", "run the numerical checks of the paper's theory (the analysis package)")
    ver.add_argument("--quick", action="store_true", help="smaller grids, under 3 minutes")
    ver.add_argument("--out", help="output directory (default: a new runs/analysis[_quick]-<date>-<time>)")
    ver.add_argument("--force", action="store_true", help="overwrite the records already in --out")
    ver.add_argument("--check", default="all", help="one check, or all")

    ev = command("evaluate", "re-evaluate a saved run from its checkpoint; writes evaluation.json beside "
                             "metrics.json, with the same keys")
    ev.add_argument("run_dir", help="a run directory written by train")
    ev.add_argument("--split", choices=["test", "val"], default="test", help="which evaluation tasks")
    return parser


_TRAIN_KEYS = ("algorithm", "penalty", "weight", "robustness", "robust_c", "penalty_alpha", "num_tasks",
               "meta_gradient", "inner_steps", "inner_lr", "outer_lr", "meta_batch", "iterations", "seed", "seeds",
               "context_dim", "task_lr", "lam", "inner_solver", "inner_mode", "inner_budget", "cg_budget",
               "krylov_steps", "hypergrad_check_every", "compiled", "lr_init", "lr_clip", "activation", "eval_every",
               "checkpoint_every",
               "val_tasks", "test_tasks", "eval_batch", "device", "dtype", "threads", "data_root", "ways", "shots",
               "query_shots", "filters", "task_vectorisation",
               "distributed")


def load_analysis():
    """The analysis package that ships with this ``implicit_nash``, imported as ``implicit_nash_analysis``.

    A wheel installs it as ``implicit_nash_analysis`` beside ``implicit_nash``; in a checkout it is the
    ``analysis/`` folder beside ``implicit_nash/`` (``python -m analysis`` also works from there). It is
    found by location, so another installed package named ``analysis`` is never used.
    """
    import importlib
    import importlib.util
    name = "implicit_nash_analysis"
    if name in sys.modules:
        return sys.modules[name]
    root = Path(__file__).resolve().parents[1]
    for folder in (root / name, root / "analysis"):  # installed / checkout
        if (folder / "__init__.py").is_file():
            spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            importlib.import_module(f"{name}.report")
            return module
    return importlib.import_module(name)  # pragma: no cover - an unusual layout: the installed package


def _new_run_dir(stem: str) -> str:
    """A new folder name under ``runs/`` (never the committed ``results/``): ``runs/<stem>-<date>-<time>``."""
    import time
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return str(path)


def _fail(message: str) -> int:
    print(f"implicit-nash: error: {message}", file=sys.stderr)
    return 2


def _train(args) -> int:
    import json

    from .meta.config import ConfigError, load_config_file, resolve, unused_options
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
            given = [k for k in _TRAIN_KEYS if k not in ("distributed", "iterations") and getattr(args, k) is not None] \
                + (["config"] if args.config else [])
            if given:
                return _fail(f"--resume continues the saved configuration (only --iterations may change); drop "
                             f"{', '.join('--' + g.replace('_', '-') for g in given)}")
            if args.iterations is not None and args.iterations < 1:
                return _fail(f"--iterations must be positive, got {args.iterations}")
            metrics = train({}, args.out, resume=True, iterations=args.iterations, progress=not args.no_progress)
        else:
            file = load_config_file(args.config) if args.config else None
            cli = {k: getattr(args, k) for k in _TRAIN_KEYS}
            cli["task"] = args.task
            config = resolve(cli, file)
            unused_options(config, [k for k in _TRAIN_KEYS if getattr(args, k) is not None])
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
        out = args.out or str(Path("runs") / args.name)
        if args.rows and args.name in ("trajectories", "batch-size", "step-size", "sweep-summary",
                                       "batch-size-summary", "step-size-summary"):
            return _fail(f"--rows is for the tables (table2, robustness, table3, table4), not {args.name}")
        if args.reuse and args.name not in ("batch-size", "step-size"):
            return _fail(f"--reuse is for the studies (batch-size, step-size), not {args.name}")
        if args.name == "sweep-summary":
            from .studies import sweep_summary
            if args.iterations is None:
                return _fail("reproduce sweep-summary needs --iterations N, the budget of the reports to read")
            sweep_summary(args.out or str(Path("runs") / "sweep_summary"), source=args.source,
                          iterations=args.iterations)
        elif args.name in ("batch-size-summary", "step-size-summary"):
            from .studies import study_summary
            if args.iterations is None:
                return _fail(f"reproduce {args.name} needs --iterations N, the budget of the reports to read")
            study = args.name[:-len("-summary")]
            study_summary(study, args.out or str(Path("runs") / f"{study}_summary"), source=args.source,
                          iterations=args.iterations)
        elif args.name == "trajectories":
            from .studies import trajectories
            trajectories(out, source=args.source, iterations=args.iterations or 70000, seeds=args.seeds,
                         overrides=overrides or None)
        elif args.name in ("batch-size", "step-size"):
            from .studies import study
            study(args.name, out, iterations=args.iterations, seeds=args.seeds, jobs=args.jobs,
                  algorithms=args.algorithms, values=args.values, progress=not args.no_progress,
                  overrides=overrides or None, report_only=args.report_only, grid=args.grid, reuse=args.reuse)
        else:
            reproduce(args.name, out, iterations=args.iterations, seeds=args.seeds, jobs=args.jobs,
                      algorithms=args.algorithms, progress=not args.no_progress, overrides=overrides or None,
                      data_root=args.data_root, force=args.force, report_only=args.report_only, grid=args.grid,
                      only_rows=args.rows)
    except (ConfigError, DataError, FloatingPointError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to resume (finished rows are kept)")
    return 0


def _evaluate(args) -> int:
    import json

    from .meta.config import ConfigError
    from .meta.trainer import evaluate_run
    from .tasks import DataError
    try:
        result = evaluate_run(args.run_dir, split=args.split)
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    mt, sp = result["metric"], args.split
    name = "evaluation.json" if sp == "test" else "evaluation_val.json"
    print(f"wrote {Path(args.run_dir) / name} (the keys of metrics.json)")
    print(json.dumps({k: result[k] for k in (f"{sp}_{mt}_mean", f"{sp}_{mt}_worst", f"{sp}_{mt}_std",
                                             f"baseline_unadapted_{mt}_mean", "iterations")}))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        if args.players < 1 or args.dim < 1:
            print("implicit-nash: error: --players and --dim must be positive", file=sys.stderr)
            return 2
        if args.iterations < 1:
            return _fail(f"--iterations must be positive, got {args.iterations}")
        from .demo import main as demo_main
        out = args.out or _new_run_dir("demo")
        if not args.layer_only and Path(out).exists() and any(Path(out).iterdir()):
            return _fail(f"{out} is not empty; choose another --out")
        return demo_main(args.players, args.dim, out=out, iterations=args.iterations, layer_only=args.layer_only)
    if args.command == "train":
        return _train(args)
    if args.command == "sweep":
        from .meta.config import ConfigError
        from .sweep import load_spec, sweep
        from .tasks import DataError
        import shlex
        out = args.out or str(Path("runs") / Path(args.spec).stem)
        command = shlex.join(["implicit-nash", *(sys.argv[1:] if argv is None else argv)])
        try:
            sweep(load_spec(args.spec), out, jobs=args.jobs, backend=args.backend, address=args.address,
                  progress=not args.no_progress, force=args.force, command=command)
        except (ConfigError, DataError) as e:
            return _fail(str(e))
        return 0
    if args.command == "verify":
        # The command line is the application layer: the library modules never import analysis.
        analysis = load_analysis()
        CHECKS, verify_main = analysis.CHECKS, analysis.report.main
        if args.check != "all" and args.check not in CHECKS:
            return _fail(f"unknown check {args.check!r}; choose from {', '.join(CHECKS)} or all")
        out = args.out or _new_run_dir("analysis_quick" if args.quick else "analysis")
        names = list(CHECKS) if args.check == "all" else [args.check]
        held = [n for n in names if (Path(out) / f"{n}.json").exists()]
        if held and not args.force:
            return _fail(f"{out} already holds the records of {', '.join(held)}; add --force to overwrite them "
                         "or choose another --out")
        return verify_main(args.check, out, args.quick)
    if args.command == "reproduce":
        return _reproduce(args)
    if args.command == "evaluate":
        return _evaluate(args)
    return 2  # pragma: no cover (argparse enforces a command)


if __name__ == "__main__":
    raise SystemExit(main())
