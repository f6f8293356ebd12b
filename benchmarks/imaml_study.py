"""A short study (issue 17): iMAML and Nash-iMAML against MAML on the sinusoid preset at a stated
budget: test MSE, time per meta-iteration, and the measured meta-gradient error of the budgeted mode.

Every configuration is trained with the project's trainer (``implicit_nash.meta.trainer.train``,
what ``implicit-nash train`` runs) on the sinusoid preset (meta-batch 25, 5 shots, 1-40-40-1 ReLU,
float32), inner lr 0.01, for ``--iterations`` meta-iterations and the given seeds, and evaluated on
490 test tasks (one per amplitude sub-interval). The iMAML runs use the ReLU network's default, the
budgeted mode (see the table's notes), and measure their meta-gradient against a tight solve
(Newton-Krylov to tolerance, GMRES to tolerance) every ``--check-every`` iterations; the table gives
the median and maximum relative error ``|g - g*| / |g*|`` over those checks, and the median inner
error ``|phi - phi*| / |phi* - theta|`` (Theorem D.3 bounds the first by C times the second plus the
backward's error). With the ReLU network the reference itself stops on a kink (counted).
"""
from __future__ import annotations

import argparse
import time

from _common import ensure_importable, environment, median, report_head, write_results

ensure_importable()

import torch  # noqa: E402

from imaml_budget_error import IMAML, P_C, P_R, SINUSOID, pooled  # noqa: E402
from implicit_nash.meta.config import resolve  # noqa: E402
from implicit_nash.meta.stats import paired_seeds  # noqa: E402
from implicit_nash.meta.trainer import train  # noqa: E402

# the ReLU network's default mode (budgeted): plain iMAML 2 Newton x 3 CG per task forward, 5 MINRES per
# task back; p_C 2 Newton x 3 CG on the coupled system, 5 GMRES back; p_R 1 Newton step on the tasks'
# own problems + 1 coupled step of 3 GMRES, 5 GMRES back
CONFIGS = {
    "MAML (3 unrolled steps)": {"algorithm": "maml"},
    "iMAML, budgeted (default)": IMAML,
    "Nash-iMAML + p_C(0.1), budgeted (default)": P_C,
    "Nash-iMAML + p_R(0.01, 1), budgeted (default)": P_R,
}
# other budgets, for --configs (short keys; the four above are maml, imaml, pC, pR)
KEYS = dict(zip(("maml", "imaml", "pC", "pR"), CONFIGS))
BUDGETS = {
    "imaml-2x3": ("iMAML, 2 Newton x 3 CG, 5 MINRES back", {**IMAML, "inner_budget": 2, "krylov_steps": 3, "cg_budget": 5}),
    "imaml-1x5": ("iMAML, 1 Newton x 5 CG, 5 MINRES back", {**IMAML, "inner_budget": 1, "krylov_steps": 5, "cg_budget": 5}),
    "imaml-1x3": ("iMAML, 1 Newton x 3 CG, 5 MINRES back", {**IMAML, "inner_budget": 1, "krylov_steps": 3, "cg_budget": 5}),
    "imaml-2x2": ("iMAML, 2 Newton x 2 CG, 5 MINRES back", {**IMAML, "inner_budget": 2, "krylov_steps": 2, "cg_budget": 5}),
    "imaml-2x3-b4": ("iMAML, 2 Newton x 3 CG, 4 MINRES back", {**IMAML, "inner_budget": 2, "krylov_steps": 3, "cg_budget": 4}),
    "imaml-2x3-b3": ("iMAML, 2 Newton x 3 CG, 3 MINRES back", {**IMAML, "inner_budget": 2, "krylov_steps": 3, "cg_budget": 3}),
    "imaml-compiled": ("iMAML, budgeted (default), --compiled", {**IMAML, "compiled": True}),
    "pC-compiled": ("Nash-iMAML + p_C(0.1), budgeted (default), --compiled", {**P_C, "compiled": True}),
    "pR-compiled": ("Nash-iMAML + p_R(0.01, 1), budgeted (default), --compiled", {**P_R, "compiled": True}),
    "pC-2x3": ("Nash-iMAML + p_C(0.1), 2 Newton x 3 CG, 5 GMRES back",
               {**P_C, "inner_budget": 2, "krylov_steps": 3, "cg_budget": 5}),
    "pC-1x5": ("Nash-iMAML + p_C(0.1), 1 Newton x 5 CG, 5 GMRES back",
               {**P_C, "inner_budget": 1, "krylov_steps": 5, "cg_budget": 5}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--check-every", type=int, default=50)
    parser.add_argument("--out", default="/tmp/imaml_study")
    parser.add_argument("--configs", nargs="+", default=list(KEYS), choices=[*KEYS, *BUDGETS],
                        help="configurations to train, by key (default: MAML and the three defaults)")
    parser.add_argument("--paired-against", default=None, choices=[*KEYS, *BUDGETS],
                        help="a configuration among --configs: every other row gets its per-seed paired "
                             "test-MSE difference against it (same seed = same init and task stream)")
    parser.add_argument("--name", default="imaml_study", help="result files benchmarks/results/NAME.{md,json}")
    args = parser.parse_args()
    if args.paired_against is not None and args.paired_against not in args.configs:
        parser.error(f"--paired-against {args.paired_against} is not among --configs")
    torch.set_num_threads(1)
    start = time.perf_counter()
    env = environment(threads=1)
    rows, raw = [], {}
    chosen = {key: (KEYS[key], CONFIGS[KEYS[key]]) if key in KEYS else BUDGETS[key] for key in args.configs}
    for key, (name, cfg) in chosen.items():
        per_seed = []
        for seed in args.seeds:
            config = resolve({**SINUSOID, "iterations": args.iterations, "seed": seed,
                              "eval_every": args.iterations, "val_tasks": 490, "test_tasks": 490, "threads": 1,
                              "hypergrad_check_every": args.check_every, **cfg})
            out = f"{args.out}/{key}_s{seed}"
            m = train(config, out, progress=False, log=print)
            per_seed.append({k: m.get(k) for k in ("test_mse_mean", "test_mse_worst", "sec_per_iteration",
                                                  "not_converged_solves", "blown_up_seeds", "diverged_seeds")})
            if "hypergradient_error" in m:
                h = m["hypergradient_error"]
                per_seed[-1]["hypergradient_error"] = {k: v for k, v in h.items() if k != "history"}
                per_seed[-1]["checks"] = [{k: e[k] for k in ("iteration", "relative_error", "inner_error",
                                                              "reference_not_converged")}
                                          for e in h["history"]]
        raw[key] = per_seed
        mean = lambda key: sum(s[key] for s in per_seed) / len(per_seed)  # noqa: E731
        h = [s["hypergradient_error"] for s in per_seed if "hypergradient_error" in s]
        # pooled over every check of every seed
        rel, inn, _ = pooled([e for s in per_seed for e in s.get("checks", [])])
        err = f"{median(rel):.3g} / {max(rel):.3g}" if rel else "exact (unrolled)"
        inner = f"{median(inn):.3g}" if inn else "-"
        paired = "-"
        if args.paired_against is not None and key != args.paired_against and args.paired_against in raw:
            base = [x["test_mse_mean"] for x in raw[args.paired_against]]
            d = paired_seeds([x["test_mse_mean"] for x in per_seed], base)
            paired = f"{d['difference']:+.3f} +- {d['ci']:.3f} (sign-flip p {d['p_sign_flip']:.2g})"
        rows.append([name, f"{mean('test_mse_mean'):.3f}", " ".join(f"{s['test_mse_mean']:.3f}" for s in per_seed),
                     f"{mean('test_mse_worst'):.2f}", f"{mean('sec_per_iteration') * 1e3:.0f}", err, inner,
                     str(sum(s["not_converged_solves"] for s in per_seed)),
                     str(sum(x["reference_not_converged"] for x in h)) if h else "-", paired])
    env["load_average_at_end"] = list(__import__("os").getloadavg())
    lines = report_head(
        f"iMAML and Nash-iMAML against MAML on the sinusoid, {args.iterations} meta-iterations", env,
        f"seeds {args.seeds}; test on 490 tasks (one per amplitude sub-interval)",
        ["sinusoid preset: meta-batch 25, 5 shots, 1-40-40-1 ReLU, float32, inner lr 0.01, outer lr 0.001, lam 10",
         "budgeted (the ReLU default): iMAML 2 Newton x 3 CG per task forward, 5 MINRES per task back; p_C 2 Newton x "
         "3 CG on the coupled system, 5 GMRES back; p_R 1 Newton step on the tasks' own problems + 1 coupled step "
         "of 3 GMRES, 5 GMRES back; meta-gradient error measured every "
         f"{args.check_every} iterations against Newton-Krylov + GMRES to tolerance",
         "a short budget (the paper trains 70,000 iterations): compares the methods' cost and error, not final accuracy"],
        time.perf_counter() - start,
        ["configuration", "test MSE mean (over seeds)", "per seed", "test MSE worst", "ms / iteration",
         "meta-gradient rel. error median / max (all checks)", "inner error median", "unconverged solves",
         "reference solves stopped on a kink",
         f"paired test-MSE difference vs {args.paired_against or '-'} (mean +- 95% t)"], rows)
    write_results(args.name, False, {"environment": env, "runs": raw}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
