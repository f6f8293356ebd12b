"""Appendix F of the paper: the batch-size and step-size studies and the training trajectories.

* ``batch-size`` (Figures 3-6) and ``step-size`` (Figures 7-10) train every Table 2 algorithm plain,
  with p_C and with p_R at its Table 2 weights, at each value of a grid of the meta-batch size B or the
  inner step size alpha, all seeds of a row together (as :func:`implicit_nash.reproduce.reproduce` does,
  through the same cached, resumable :func:`~implicit_nash.reproduce.run_rows`).
* ``trajectories`` (Figures 2 and 11-13) plots the validation curves that the Table 2 runs saved.

Every Nash-GBML row is compared with the plain row of the same algorithm and grid value in pairs (same
seeds, same test groups): :func:`implicit_nash.reproduce.paired_comparisons`, Holm's rule over the study.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .meta.config import ConfigError, resolve
from .meta.stats import holm, mean_ci95, paired_seeds
from .reproduce import (PAIRED_RULE, ROWSETS, STABLE_NOTE, STABLE_SETTINGS, TAIL, _rows, check_counts, finished_run,
                        reuse_runs,
                        paired_comparisons, train_rows, write_outputs)

__all__ = ["STUDIES", "study", "study_summary", "sweep_summary", "trajectories"]

# The grids. Batch size: the paper's B in {5, 10, 15, 20, 25} (Appendix F.2). Step size: the paper
# does not print its grid (F.3 repeats F.2's sentence), so we take 5 values over two decades, evenly
# spaced in log scale around Table 2's alpha = 0.001 (every algorithm's Table 2 value).
STUDIES: Dict[str, Dict[str, Any]] = {
    "batch-size": {"option": "meta_batch", "symbol": "B", "values": [5, 10, 15, 20, 25], "log": False,
                   "figures": "3-6"},
    "step-size": {"option": "inner_lr", "symbol": "alpha", "values": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "log": True,
                  "figures": "7-10"},
}


def _study_rows(name: str, algorithms: Optional[Sequence[str]], values: Sequence[float]) -> List[Dict[str, Any]]:
    spec = STUDIES[name]
    rows = []
    # grid value outermost, so that the plain and Nash rows of one value finish close together
    for v in values:
        for r in _rows("table2", list(algorithms) if algorithms else None):
            rows.append({**r, "key": f"{r['key']}_{spec['symbol']}{v:g}", "group": f"{r['group']}|{v:g}",
                         "algorithm_label": r["group"], "value": v,
                         "options": {**r["options"], **STABLE_SETTINGS.get(r["algorithm"], {}), spec["option"]: v}})
    return rows


def _variant(row: Dict[str, Any]) -> str:
    """'plain', 'p_C(w)' or 'p_R(w, r)': the row's label without the algorithm."""
    return row["label"][len(row["algorithm_label"]):].lstrip(" +") or "plain"


def study(name: str, out_dir: str, *, iterations: Optional[int] = None, seeds: int = 5, jobs: int = 1,
          algorithms: Optional[Sequence[str]] = None, values: Optional[Sequence[float]] = None,
          progress: bool = True, overrides: Optional[Dict[str, Any]] = None, report_only: bool = False,
          log: Callable[[str], None] = print, grid: str = "auto", reuse: Sequence[str] = ()) -> Dict[str, Any]:
    """Run (or finish, or only report) the ``batch-size`` or ``step-size`` study of Appendix F.

    ``reuse``: other reproductions' directories whose finished runs of an identical configuration (for
    example a weight sweep's Table 2 rows, which are the study's rows at B = 25 or alpha = 0.001) are
    linked in instead of trained (:func:`implicit_nash.reproduce.reuse_runs`); the report lists them.

    ``grid``: whether the rows that share shapes (every row of one algorithm in the step-size study;
    the rows of one B in the batch-size study) train as one grid, one vmap over rows and seeds
    (:func:`implicit_nash.reproduce.run_rows`; ``auto``: where it measured faster).

    Writes ``DIR/<name>.json``, ``.md`` (the budget, the grid, every row and its paired verdict against
    the plain row at the same value) and ``.png`` (mean and worst-case test MSE with 95% t-intervals
    against the grid value, one row of panels per algorithm, plain and Nash overlaid, and the paired
    differences). Runs live in ``DIR/runs/<row>/``, cached and resumable as for ``reproduce``.
    """
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; choose from {', '.join(STUDIES)}")
    check_counts(seeds, jobs)
    spec = STUDIES[name]
    values = list(values) if values else spec["values"]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise ConfigError(f"--values must be positive numbers, got {v!r}")
        if spec["option"] == "meta_batch" and int(v) != v:
            raise ConfigError(f"batch sizes must be integers, got {v!r}")
    if spec["option"] == "meta_batch":
        values = [int(v) for v in values]
    known = sorted({r["algorithm"] for r in _rows("table2")})
    if algorithms:
        unknown = sorted(set(algorithms) - set(known))
        if unknown:
            raise ConfigError(f"unknown algorithm(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if iterations is None:
        from .meta.config import PRESETS
        iterations = PRESETS["sinusoid"]["iterations"]
    rows = _study_rows(name, algorithms, values)
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    configs = {r["key"]: resolve({"task": "sinusoid", "algorithm": r["algorithm"], **r["options"],
                                  "iterations": iterations, "seeds": list(range(seeds)), "threads": 1,
                                  **(overrides or {})}) for r in rows}
    budget = f"{iterations} iterations x {seeds} seeds (0..{seeds - 1}) per row, {len(rows)} rows"
    reused = {} if report_only else reuse_runs(configs, out / "runs", list(reuse))
    for key, src in reused.items():
        log(f"row {key}: reused the finished run {src} (the identical configuration)")
    # rows reused by an earlier call stay listed while their run is still the same file as the source's
    earlier = out / f"{name}.json"
    if earlier.is_file():
        try:
            old_reused = json.loads(earlier.read_text()).get("reused", {})
        except ValueError:
            old_reused = {}
        still = {}
        for k, v in old_reused.items():
            mine, theirs = out / "runs" / k / "metrics.json", Path(v) / "metrics.json"
            if k in configs and mine.is_file() and theirs.is_file() and os.path.samefile(mine, theirs):
                still[k] = v
        reused = {**still, **reused}
    t0 = time.time()
    results, failures = train_rows(name, configs, out, budget, jobs=jobs, progress=progress,
                                   report_only=report_only, log=log, grid=grid)
    table = _table(rows, results, failures)
    paired_comparisons(table, results, "mse")
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in (overrides or {}).items())
    algos_flag = f" --algorithms {' '.join(algorithms)}" if algorithms else ""
    report = {"study": name, "option": spec["option"], "symbol": spec["symbol"], "values": values,
              "paper_figures": spec["figures"], "budget": budget, "iterations": iterations,
              "seeds": list(range(seeds)), "overrides": overrides or {}, "report_only": report_only,
              "stable_settings": STABLE_SETTINGS, "wall_seconds_this_call": time.time() - t0,
              "command": f"implicit-nash reproduce {name} --iterations {iterations} --seeds {seeds}"
                         f"{algos_flag} --values {' '.join(f'{v:g}' for v in values)}{flags}"
                         f"{'' if grid == 'auto' else f' --grid {grid}'}",
              "grid": grid, "rows": table, "reused": reused}
    write_outputs(out, name, report, _study_markdown(report), lambda path: _study_figure(report, path), log)
    return report


def _table(rows, results, failures) -> List[Dict[str, Any]]:
    table = []
    for r in rows:
        base = {"key": r["key"], "label": f"{r['label']} at {r['value']:g}", "algorithm": r["algorithm_label"],
                "group": r["group"], "value": r["value"], "variant": _variant(r), "penalty": r["options"]}
        if r["key"] not in results:
            table.append({**base, "failed": failures.get(r["key"], "not run")})
            continue
        m = results[r["key"]]
        finite = [run for run in m["runs"] if run.get("diverged_at") is None]
        ours = {stat: {**mean_ci95([run[f"test_mse_{stat}"] for run in finite]),
                       "values": [run[f"test_mse_{stat}"] for run in finite]}
                for stat in ("mean", "worst", "std")} if finite else {}
        # seeds that disagree by orders of magnitude (or none finite) make an interval meaningless
        unstable = len(finite) < 2 or not ours["mean"]["ci"] < abs(ours["mean"]["mean"])
        table.append({**base, "ours": ours, "verdict": {"unstable": bool(unstable)},
                      "diverged_seeds": {str(run["seed"]): run["diverged_at"] for run in m["runs"]
                                         if run.get("diverged_at") is not None},
                      "sec_per_iteration": m["sec_per_iteration"]})
    return table


def _cell(x: Optional[Dict[str, float]]) -> str:
    if not x:
        return ""
    return f"{x['mean']:.3f} ± {x['ci']:.3f}" if x["n"] > 1 else f"{x['mean']:.3f}"


def _study_setting(rep) -> str:
    """The sentences on the grid and the settings, for a study report (or a summary of several)."""
    sym = rep["symbol"]
    text = (f"Grid: {sym} in {{{', '.join(f'{v:g}' for v in rep['values'])}}}; every other hyperparameter as in "
            "Table 2, penalties at their Table 2 weights. The centroid penalty's (B/(alpha N))^2 scale follows B "
            "and alpha (the paper's eq. 13).")
    if any(r["algorithm"] == "Meta-SGD" for r in rep["rows"]):
        text += (" Meta-SGD runs in its stable setting: three inner steps with the learned step sizes clamped to "
                 "[0, 0.1] (`inner_steps = 3`, `lr_clip = [0, 0.1]`, chosen on validation data, "
                 "`results/metasgd_stable/`); with the paper's three unclamped steps it diverges. Its step sizes "
                 "are learned: alpha is their initial value, and its centroid scale keeps Appendix E's alpha = 0.05.")
    return text


def _study_markdown(rep) -> str:
    lines = [f"# Appendix F: robustness to the {rep['study'].replace('-', ' ')} (the paper's Figures "
             f"{rep['paper_figures']})", "",
             f"Command: `{rep['command']}`", "",
             f"**Budget used: {rep['budget']}.** The paper's budget: 70,000 iterations, 5 trials.",
             _study_setting(rep),
             "Test: 5,000 tasks in 490 amplitude groups; mean and worst case over groups of the per-group MSE, "
             "± the 95% t-interval over seeds.", ""]
    if rep["overrides"]:
        lines += [f"Overrides: `{json.dumps(rep['overrides'])}`", ""]
    if rep.get("reused"):
        lines += ["Rows not trained here but reused, as finished runs of the identical configuration (every option, "
                  "budget and seed; hard links): " + "; ".join(f"`{k}` ← `{v}`" for k, v in rep["reused"].items()), ""]
    lines += _study_table(rep)
    if rep["report_only"]:
        lines += ["", "Rebuilt from the finished runs without training (`--report-only`)."]
    else:
        lines += ["", f"Wall time of the call that wrote this file: {rep['wall_seconds_this_call'] / 60:.1f} min "
                  "(rows found finished were not retrained)."]
    return "\n".join(lines) + "\n"


def _study_table(rep) -> List[str]:
    """The paired table and its per-algorithm summary (each algorithm's Holm family as in its rows)."""
    sym = rep["symbol"]
    lines = [PAIRED_RULE, "",
              f"Paired Δ = Nash − plain at the same {sym}: per seed ± 95% t-interval, Holm-adjusted p; over "
              f"groups [95% bootstrap] (the worst case over the hardest {int(TAIL * 100)}% of groups).", "",
              f"| algorithm | {sym} | variant | mean | worst | Δ mean per seed (p Holm) | Δ mean over groups "
              "| Δ worst per seed (p Holm) | Δ worst, hardest groups | verdict (mean; worst) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        head = f"| {r['algorithm']} | {r['value']:g} | {r['variant']} |"
        if "failed" in r:
            lines.append(f"{head} {r['failed']} | | | | | | |")
            continue
        o = r["ours"]
        div = f" ({len(r['diverged_seeds'])} seed(s) diverged)" if r["diverged_seeds"] else ""
        pr = r.get("paired")
        if pr is None:
            cells = "| | | | | (plain)"
        elif not pr["tested"]:
            cells = f"| | | | | not tested: {pr['reason']}"
        else:
            cs = []
            for m in ("mean", "worst"):
                e, g = pr[m], pr[m].get("groups")
                cs.append(f"{e['difference']:+.3g} ± {e['ci']:.2g} ({e['p_holm']:.2g})")
                cs.append(f"{g['difference']:+.3g} [{g['low']:+.3g}, {g['high']:+.3g}]" if g else "")
            cells = "| " + " | ".join(cs) + f" | {pr['mean']['verdict']}; {pr['worst']['verdict']}"
        lines.append(f"{head} {_cell(o.get('mean'))}{div} | {_cell(o.get('worst'))} {cells} |")
    tested = [r for r in rep["rows"] if r.get("paired", {}).get("tested")]
    lines += ["", "## Summary", ""]
    families = {r["paired"]["family_size"] for r in tested}
    one_family = len(families) == 1
    if one_family:
        lines.append(f"Holm family: {min(families)} tests (mean and worst case of {len(tested)} Nash-GBML rows).")
        lines.append("")
    for algo in dict.fromkeys(r["algorithm"] for r in rep["rows"]):
        rs = [r for r in tested if r["algorithm"] == algo]
        if not rs:
            lines.append(f"- {algo}: no tested pair.")
            continue
        parts = []
        for m in ("mean", "worst"):
            lower = sum(r["paired"][m]["difference"] < 0 for r in rs)
            better = sum(r["paired"][m]["verdict"] == "better" for r in rs)
            worse = sum(r["paired"][m]["verdict"] == "worse" for r in rs)
            parts.append(f"{m}: Nash lower in {lower} of {len(rs)}, paired verdict better in {better}, worse in {worse}")
        family = "" if one_family else f" (Holm family: {rs[0]['paired']['family_size']} tests)"
        lines.append(f"- {algo}{family}: " + "; ".join(parts) + ".")
    return lines


def _study_figure(rep, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rep["rows"] if "ours" in r and r["ours"]]
    algos = list(dict.fromkeys(r["algorithm"] for r in rows))
    fig, axes = plt.subplots(len(algos), 4, figsize=(15, 3.0 * len(algos)), squeeze=False)
    for i, algo in enumerate(algos):
        mine = [r for r in rows if r["algorithm"] == algo]
        for j, variant in enumerate(dict.fromkeys(r["variant"] for r in mine)):
            rs = [r for r in mine if r["variant"] == variant]
            # offset the points of the variants a little so that their intervals do not hide each other
            shift = (1.0 + 0.03 * (j - 1)) if rep["symbol"] == "alpha" else None
            xs = [r["value"] * shift if shift else r["value"] + 0.3 * (j - 1) for r in rs]
            for k, stat in enumerate(("mean", "worst")):
                axes[i][k].errorbar(xs, [r["ours"][stat]["mean"] for r in rs],
                                    yerr=[0.0 if math.isnan(r["ours"][stat]["ci"]) else r["ours"][stat]["ci"] for r in rs],
                                    marker="o", ms=3, capsize=2, lw=1, label=variant)
                pr = [(x, r["paired"][stat]) for x, r in zip(xs, rs) if r.get("paired", {}).get("tested")]
                if pr:
                    axes[i][k + 2].errorbar([x for x, _ in pr], [e["difference"] for _, e in pr],
                                            yerr=[e["ci"] for _, e in pr], marker="o", ms=3, capsize=2, lw=1,
                                            color=f"C{j}", label=f"{variant} − plain")
        for k, title in enumerate(("mean MSE", "worst-case MSE", "paired Δ mean (Nash − plain)",
                                   "paired Δ worst (Nash − plain)")):
            ax = axes[i][k]
            ax.set_title(f"{algo}: {title}", fontsize=9)
            if k >= 2:
                ax.axhline(0.0, color="k", lw=0.6)
            if rep["symbol"] == "alpha":
                ax.set_xscale("log")
            ys = [y for line in ax.lines for y in line.get_ydata()]
            if k < 2 and ys and min(ys) > 0 and max(ys) > 10 * min(ys):  # rows that span decades
                ax.set_yscale("log")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel(rep["symbol"])
    fig.suptitle(f"Test MSE against {rep['symbol']} (mean over seeds, 95% t-intervals); budget: {rep['budget']}",
                 fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _reports_by_algorithm(source: str, filename: str, iterations: int, field: str,
                          what: str) -> Dict[str, Dict[str, Any]]:
    """algorithm -> its report's source, command, budget, stable settings and rows, from every
    ``SOURCE/*/<filename>`` of exactly ``iterations`` iterations (rows grouped by their ``field``), in the
    paper's order of the algorithms (MAML, Meta-SGD, CAVIA, TR-MAML; others after them); two reports of
    one algorithm at that budget are refused."""
    reports: Dict[str, Dict[str, Any]] = {}
    for path in sorted(Path(source).glob(f"*/{filename}")):
        rep = json.loads(path.read_text())
        if rep.get("iterations") != iterations:
            continue
        for algo in dict.fromkeys(r[field] for r in rep["rows"]):
            if algo in reports:
                raise ConfigError(f"two {what} reports of {algo} at {iterations} iterations: "
                                  f"{reports[algo]['source']} and {path.parent}")
            reports[algo] = {"source": str(path.parent), "command": rep["command"], "budget": rep["budget"],
                             "stable_settings": rep.get("stable_settings", {}),
                             "rows": [r for r in rep["rows"] if r[field] == algo]}
    order = list(dict.fromkeys(r["group"] for r in _rows("table2")))
    return {a: reports[a] for a in sorted(reports, key=lambda a: order.index(a) if a in order else len(order))}


def study_summary(name: str, out_dir: str, *, source: str = "results", iterations: int = 10000,
                  log: Callable[[str], None] = print) -> Dict[str, Any]:
    """One study (``batch-size`` or ``step-size``) for every algorithm at one budget, side by side, from the
    study reports already written (``SOURCE/*/<name>.json``, e.g. one ``reproduce batch-size`` per algorithm).

    Only reports of exactly ``iterations`` iterations are read (budgets are never pooled); two reports of
    one algorithm at that budget are refused. Each row keeps the paired statistics and verdict of its own
    report (Holm over that report's tests), which are not recomputed. Writes
    ``DIR/<name>_summary.{json,md,png}``: the figure has one row of panels per algorithm (mean and
    worst-case test MSE against the grid value, plain and Nash-GBML overlaid, and the paired differences).
    """
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; choose from {', '.join(STUDIES)}")
    spec = STUDIES[name]
    reports = _reports_by_algorithm(source, f"{name}.json", iterations, "algorithm", name)
    if not reports:
        raise ConfigError(f"no {name} report (*/{name}.json) of {iterations} iterations in {source}")
    algos = list(reports)
    rows = [r for a in algos for r in reports[a]["rows"]]
    report = {"summary": f"the {name} study, every algorithm at one budget", "study": name,
              "symbol": spec["symbol"], "paper_figures": spec["figures"], "iterations": iterations,
              "values": sorted({r["value"] for r in rows}), "source": source,
              "budget": f"{iterations} iterations x 5 seeds per row (each report's own budget line below)",
              "command": f"implicit-nash reproduce {name}-summary --source {source} --iterations {iterations}",
              "reports": {a: {k: reports[a][k] for k in ("source", "command", "budget")} for a in algos},
              "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(out, f"{name}_summary", report, _study_summary_markdown(report),
                  lambda path: _study_figure(report, path), log)
    return report


def _study_summary_markdown(rep) -> str:
    lines = [f"# Appendix F at {rep['iterations']:,} iterations: the {rep['study'].replace('-', ' ')} study of every "
             f"algorithm (the paper's Figures {rep['paper_figures']})", "",
             f"Command: `{rep['command']}` (reads the study reports below; trains nothing).", "",
             f"**Budget: {rep['iterations']:,} of the paper's 70,000 iterations, 5 seeds per row.** Reports at other "
             "budgets are not read, so nothing is pooled across budgets. Each row keeps the paired statistics and "
             "verdict of its own report (Holm over that report's tests).", "",
             _study_setting(rep), "", "| algorithm | report | budget | command |", "|---|---|---|---|"]
    for algo, r in rep["reports"].items():
        lines.append(f"| {algo} | `{r['source']}` | {r['budget']} | `{r['command']}` |")
    lines += [""] + _study_table(rep)
    return "\n".join(lines) + "\n"


# --- training trajectories (Figures 2, 11-13) ---------------------------------------------------------

def trajectories(out_dir: str, *, source: str = "results", iterations: int = 70000, seeds: int = 5,
                 overrides: Optional[Dict[str, Any]] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Figures 2 and 11-13 from the validation curves that the finished Table 2 runs saved.

    Reads ``SOURCE/runs/<row>/metrics.json`` of the Table 2 rows that finished with ``iterations`` x
    ``seeds`` (and the ``overrides`` they were trained with; nothing trains) and writes ``OUT/trajectories_<algorithm>.png`` (validation mean, worst and
    std of the per-group MSE against the iteration, mean over seeds with 95% t-bands, for the algorithm and
    its Nash-GBML variants, and the paired differences Nash − plain), ``OUT/trajectories.md`` and
    ``.json``. The table compares, seed by seed, the average of each validation statistic over the second
    half of training (the paper: Nash-GBML "consistently outperform[s] MAML after sufficient iterations").
    """
    src = Path(source)
    rows = _rows("table2")
    runs: Dict[str, Dict[str, Any]] = {}
    stable: List[str] = []  # the rows found in their algorithm's stable setting (STABLE_SETTINGS)
    for r in rows:
        # the paper's setting first; then, where the algorithm has one, its stable setting (e.g. the
        # Meta-SGD rows of the weight sweep, results/robustness_metasgd_10k); finished_run compares
        # the whole configuration, so a run is used only under the setting it was trained with
        settings = [{}] + ([STABLE_SETTINGS[r["algorithm"]]] if r["algorithm"] in STABLE_SETTINGS else [])
        for extra in settings:
            config = resolve({"task": "sinusoid", "algorithm": r["algorithm"], **r["options"], **extra,
                              "iterations": iterations, "seeds": list(range(seeds)), "threads": 1,
                              **(overrides or {})})
            done = finished_run(config, str(src / "runs" / r["key"]))
            if done is not None:
                runs[r["key"]] = done
                if extra:
                    stable.append(r["key"])
                break
    if not runs:
        raise ConfigError(f"no Table 2 row in {src / 'runs'} has finished {iterations} iterations x {seeds} seeds; "
                          f"run implicit-nash reproduce table2 --iterations {iterations} --seeds {seeds} --out {src}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    half = iterations / 2
    entries, family = [], []
    for algo in dict.fromkeys(r["group"] for r in rows):
        mine = [r for r in rows if r["group"] == algo and r["key"] in runs]
        plain = next((r for r in mine if r["options"]["penalty"] == "none"), None)
        if plain is None:
            continue
        for r in mine:
            if r is plain:
                continue
            a, b = _finite_curves(runs[r["key"]]), _finite_curves(runs[plain["key"]])
            common = sorted(set(a) & set(b))
            e: Dict[str, Any] = {"algorithm": algo, "label": r["label"], "key": r["key"], "seeds": common}
            late = {s: {st: _late_average(runs[r["key"]], s, st, half) for st in ("mean", "worst", "std")}
                    for s in common}
            late_plain = {s: {st: _late_average(runs[plain["key"]], s, st, half) for st in ("mean", "worst", "std")}
                          for s in common}
            values = [v for s in common for v in (*late[s].values(), *late_plain[s].values())]
            if len(common) < 2 or not all(math.isfinite(v) for v in values) or max(values) > 1e3:
                e["tested"] = False
                e["reason"] = f"{len(common)} seed(s) finite in both rows" if len(common) < 2 else \
                    "validation MSE not finite or above 1e3 (the row does not train)"
            else:
                e["tested"] = True
                for st in ("mean", "worst", "std"):
                    e[st] = paired_seeds([late[s][st] for s in common], [late_plain[s][st] for s in common])
                    e[st]["share_of_evaluations_lower"] = _share_lower(runs[r["key"]], runs[plain["key"]], common, st, half)
                    family.append(e[st])
            entries.append(e)
    for e, adj in zip(family, holm([f["p_t"] for f in family])):
        e["p_holm"] = adj
        e["verdict"] = ("better" if e["difference"] < 0 else "worse") if adj < 0.05 else "no detectable difference"
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in (overrides or {}).items())
    report = {"source": str(src / "runs"), "iterations": iterations, "seeds": list(range(seeds)),
              "command": f"implicit-nash reproduce trajectories --iterations {iterations} --seeds {seeds}{flags} "
                         f"--source {source} --out {out_dir}",
              "late_window": f"evaluations after iteration {half:g}", "family_size": len(family), "rows": entries,
              "stable_setting_rows": stable}
    (out / "trajectories.json").write_text(json.dumps(report, indent=2))
    (out / "trajectories.md").write_text(_trajectories_markdown(report))
    figures = {"MAML": 2, "Meta-SGD": 11, "CAVIA": 12, "TR-MAML": 13}
    try:
        for algo in dict.fromkeys(r["group"] for r in rows):
            mine = [r for r in rows if r["group"] == algo and r["key"] in runs]
            if mine:
                _trajectory_figure(algo, figures.get(algo), mine, runs, report,
                                   out / f"trajectories_{mine[0]['algorithm']}.png")
    except ImportError:  # pragma: no cover
        log("matplotlib is not installed: no figures")
    log(f"wrote {out / 'trajectories.md'}, {out / 'trajectories.json'} and {out}/trajectories_<algorithm>.png")
    return report


def _finite_curves(m: Dict[str, Any]) -> Dict[int, int]:
    """seed -> its index among the runs, for the seeds that did not diverge."""
    return {run["seed"]: j for j, run in enumerate(m["runs"]) if run.get("diverged_at") is None}


def _curve(m: Dict[str, Any], seed: int, stat: str):
    j = _finite_curves(m)[seed]
    return [h["iteration"] for h in m["val_history"]], [h["runs"][j][f"mse_{stat}"] for h in m["val_history"]]


def _late_average(m: Dict[str, Any], seed: int, stat: str, after: float) -> float:
    its, ys = _curve(m, seed, stat)
    late = [y for i, y in zip(its, ys) if i > after]
    return sum(late) / len(late) if late else float("nan")


def _share_lower(a: Dict[str, Any], b: Dict[str, Any], seeds: List[int], stat: str, after: float) -> float:
    """Share of the late evaluations at which the seed-mean of ``a`` is below that of ``b``."""
    curves_a = [_curve(a, s, stat) for s in seeds]
    curves_b = [_curve(b, s, stat) for s in seeds]
    its = curves_a[0][0]
    idx = [k for k, i in enumerate(its) if i > after]
    lower = sum(sum(c[1][k] for c in curves_a) < sum(c[1][k] for c in curves_b) for k in idx)
    return lower / len(idx) if idx else float("nan")


def _trajectories_markdown(rep) -> str:
    lines = ["# Training trajectories (the paper's Figures 2 and 11-13)", "",
             f"Command: `{rep['command']}`", "",
             f"From the saved validation curves of the Table 2 runs ({rep['iterations']} iterations x "
             f"{len(rep['seeds'])} seeds; nothing was trained): validation MSE on 980 fixed tasks, evaluated "
             "every 1,000 iterations. Figures: `trajectories_<algorithm>.png` (mean, worst and std over groups, "
             "mean over seeds with 95% t-bands; bottom row: the paired difference Nash − plain, seed by seed, "
             "with its 95% t-band).", ""]
    if rep.get("stable_setting_rows"):
        lines += [f"Rows trained in their algorithm's stable setting, not the paper's: "
                  f"{', '.join(rep['stable_setting_rows'])}. {STABLE_NOTE}", ""]
    lines += [f"Paired test of the late-training level: per seed, the average of each validation statistic over "
             f"the {rep['late_window']} (the paper: Nash-GBML \"consistently outperform[s] MAML after sufficient "
             "iterations\" and \"converges more stably ... based on the lower MSE standard deviation\"); Δ = Nash − "
             f"plain ± 95% t-interval; p: paired t-test, Holm-adjusted over the {rep['family_size']} tests of this "
             "table, and the exact sign-flip p; 'lower at' is the share of late evaluations where the seed-mean "
             "of the Nash row is below the plain row's. Verdict: better / worse when the Holm-adjusted p < 0.05.",
             "", "| row | statistic | Δ late average (± 95% t) | p (Holm) | p (sign-flip) | lower at | verdict |",
             "|---|---|---|---|---|---|---|"]
    for e in rep["rows"]:
        if not e["tested"]:
            lines.append(f"| {e['label']} | | | | | | not tested: {e['reason']} |")
            continue
        for st in ("mean", "worst", "std"):
            x = e[st]
            lines.append(f"| {e['label']} | {st} | {x['difference']:+.3f} ± {x['ci']:.3f} | {x['p_holm']:.3g} | "
                         f"{x['p_sign_flip']:.3g} | {x['share_of_evaluations_lower'] * 100:.0f}% | {x['verdict']} |")
    return "\n".join(lines) + "\n"


def _trajectory_figure(algo, number, mine, runs, rep, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scipy import stats as sps

    plain = next(r for r in mine if r["options"]["penalty"] == "none")
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), squeeze=False)
    bounds: Dict[int, tuple] = {}
    for j, r in enumerate(mine):
        m = runs[r["key"]]
        seeds = sorted(_finite_curves(m))
        for k, st in enumerate(("mean", "worst", "std")):
            curves = [_curve(m, s, st) for s in seeds]
            its = curves[0][0]
            stats_ = [mean_ci95([c[1][t] for c in curves]) for t in range(len(its))]
            mid = [s["mean"] for s in stats_]
            ci = [0.0 if math.isnan(s["ci"]) else s["ci"] for s in stats_]
            ax = axes[0][k]
            ax.plot(its, mid, lw=1.1, color=f"C{j}", label=f"{r['label']} ({len(seeds)} seeds)")
            ax.fill_between(its, [a - c for a, c in zip(mid, ci)], [a + c for a, c in zip(mid, ci)],
                            color=f"C{j}", alpha=0.2)
            if min(mid) > 0:
                ax.set_yscale("log")
            ax.set_title(f"validation {st} MSE", fontsize=9)
            if r is plain:
                continue
            common = sorted(set(seeds) & set(_finite_curves(runs[plain["key"]])))
            if len(common) < 2:
                continue
            ca = [_curve(m, s, st)[1] for s in common]
            cb = [_curve(runs[plain["key"]], s, st)[1] for s in common]
            d = [[x - y for x, y in zip(u, v)] for u, v in zip(ca, cb)]
            t = sps.t.ppf(0.975, len(common) - 1)
            dm = [sum(col) / len(col) for col in zip(*d)]
            dci = [t * (sum((x - mu) ** 2 for x in col) / (len(col) - 1)) ** 0.5 / len(col) ** 0.5
                   for col, mu in zip(zip(*d), dm)]
            if max(abs(x) for x in dm) > 1e3:  # a row that does not train: its difference says nothing
                continue
            ax = axes[1][k]
            ax.plot(its, dm, lw=1.1, color=f"C{j}", label=f"{r['label']} − plain")
            ax.fill_between(its, [a - c for a, c in zip(dm, dci)], [a + c for a, c in zip(dm, dci)],
                            color=f"C{j}", alpha=0.2)
            ax.axhline(0.0, color="k", lw=0.6)
            ax.set_title(f"paired Δ validation {st} (Nash − plain, {len(common)} seeds)", fontsize=9)
            # the first evaluations differ by far more than the rest: scale the axis to the last 90%
            band = [(a - c, a + c) for i, (a, c) in enumerate(zip(dm, dci)) if its[i] > 0.1 * rep["iterations"]]
            if band:
                lo, hi = bounds.get(k, (math.inf, -math.inf))
                bounds[k] = (min(lo, min(b[0] for b in band)), max(hi, max(b[1] for b in band)))
    for k, (lo, hi) in bounds.items():
        pad = 0.05 * (hi - lo) if hi > lo else 1e-3
        axes[1][k].set_ylim(lo - pad, hi + pad)
    for ax in axes[1]:
        if not ax.lines:
            ax.text(0.5, 0.5, "no paired comparison:\nfewer than 2 seeds train in both rows", ha="center",
                    va="center", fontsize=9, transform=ax.transAxes)
            ax.set_axis_off()
    from matplotlib.ticker import FuncFormatter
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    fig.suptitle(f"{algo} and its Nash-GBML (the paper's Figure {number}): validation MSE during training, mean over "
                 f"seeds with 95% t-bands; {rep['iterations']} iterations", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


# --- Tables 5-6 at one budget, all algorithms side by side -------------------------------------------

def sweep_summary(out_dir: str, *, source: str = "results", iterations: int = 10000,
                  log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Tables 5-6 of every algorithm at one budget, side by side, from the weight-sweep reports already
    written (``SOURCE/*/robustness.json``, e.g. ``reproduce robustness --algorithms trmaml ...``).

    Only reports of exactly ``iterations`` iterations are read (budgets are never pooled); two reports
    of one algorithm at that budget are refused. Each row keeps the paired statistics and verdict of its
    own table (Holm over that table), which are not recomputed. Writes ``DIR/sweep_summary.{json,md,png}``:
    per algorithm and weight, the paired Δ (Nash − plain) of the mean and worst-case test MSE with its
    95% t-interval over seeds and verdict, and per algorithm the counts in the direction the paper claims.
    """
    reports = _reports_by_algorithm(source, "robustness.json", iterations, "group", "weight-sweep")
    if not reports:
        raise ConfigError(f"no weight-sweep report (*/robustness.json) of {iterations} iterations in {source}")
    table = ROWSETS["robustness"]()
    algos = {}
    for algo in reports:
        rep = reports[algo]
        rows = rep["rows"]
        nash = [r for r in rows if r["penalty"]["penalty"] != "none"]
        tested = [r for r in nash if r.get("paired", {}).get("tested")]
        counts = {}
        for kind, stat in (("centroid", "mean"), ("robust", "worst")):
            rs = [r for r in tested if r["penalty"]["penalty"] == kind]
            counts[kind] = {"stat": stat, "tested": len(rs),
                            "lower": sum(r["paired"][stat]["difference"] < 0 for r in rs)}
        verdicts = {v: [f"{r['label']} ({m})" for r in tested for m in ("mean", "worst")
                        if r["paired"][m]["verdict"] == v] for v in ("better", "worse")}
        algos[algo] = {**{k: rep[k] for k in ("source", "command", "budget", "stable_settings")},
                       "rows": len(rows), "finished": sum("failed" not in r for r in rows),
                       "paper_rows": sum(r["group"] == algo for r in table), **verdicts,
                       "family_size": tested[0]["paired"]["family_size"] if tested else 0,
                       "plain": next((r["ours"] for r in rows if r["penalty"]["penalty"] == "none" and "ours" in r), None),
                       "counts": counts,
                       "comparisons": [{"label": r["label"], "penalty": r["penalty"], "failed": r.get("failed"),
                                        "paired": r.get("paired")} for r in nash]}
    report = {"summary": "Tables 5-6, every algorithm at one budget", "iterations": iterations, "source": source,
              "command": f"implicit-nash reproduce sweep-summary --source {source} --iterations {iterations}",
              "algorithms": algos}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_outputs(Path(out_dir), "sweep_summary", report, _summary_markdown(report),
                  lambda path: _summary_figure(report, path), log)
    return report


def _summary_markdown(rep) -> str:
    lines = [f"# Tables 5-6 at {rep['iterations']:,} iterations: every algorithm's weight sweep, paired with its "
             "plain row", "", f"Command: `{rep['command']}` (reads the weight-sweep reports below; trains nothing).",
             "", f"**Budget: {rep['iterations']:,} of the paper's 70,000 iterations, 5 seeds per row** (each table's "
             "own budget line below). Reports at other budgets are not read, so nothing is pooled across budgets. "
             "Each row keeps the paired statistics and verdict of its own table (Holm over that table's tested "
             "mean and worst-case comparisons). Δ = Nash − plain, mean over seeds ± 95% t-interval; negative is "
             "lower error.", "", PAIRED_RULE, ""]
    if any(a["stable_settings"] for a in rep["algorithms"].values()):
        lines += [STABLE_NOTE, ""]
    lines += ["| algorithm | report | rows finished (of the paper's) | Holm family | plain: mean | plain: worst | p_C lowers the mean "
              "| p_R lowers the worst case | better (metric) | worse (metric) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for algo, a in rep["algorithms"].items():
        c, p = a["counts"], a["plain"]
        better, worse = a["better"], a["worse"]
        lines.append(f"| {algo} | `{a['source']}` | {a['finished']} of {a['paper_rows']} | {a['family_size']} | "
                     f"{_cell(p['mean']) if p else ''} | {_cell(p['worst']) if p else ''} | "
                     f"{c['centroid']['lower']} of {c['centroid']['tested']} | {c['robust']['lower']} of "
                     f"{c['robust']['tested']} | {', '.join(better) or 'none'} | {', '.join(worse) or 'none'} |")
    lines += ["", "## Every weight", "",
              "| algorithm | row | Δ mean | p (Holm) | verdict | Δ worst | p (Holm) | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for algo, a in rep["algorithms"].items():
        for r in a["comparisons"]:
            pr = r["paired"] or {}
            if r["failed"] or not pr.get("tested"):
                why = r["failed"] or pr.get("reason", "")
                lines.append(f"| {algo} | {r['label']} | | | not tested: {why} | | | |")
                continue
            cells = [f"{pr[m]['difference']:+.3f} ± {pr[m]['ci']:.3f} | {pr[m]['p_holm']:.3g} | {pr[m]['verdict']}"
                     for m in ("mean", "worst")]
            lines.append(f"| {algo} | {r['label']} | {' | '.join(cells)} |")
    lines += ["", "## The reports", ""]
    for algo, a in rep["algorithms"].items():
        lines.append(f"- {algo}: `{a['source']}/robustness.md`, budget {a['budget']}; command `{a['command']}`.")
    return "\n".join(lines) + "\n"


def _summary_figure(rep, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = rep["algorithms"]
    fig, axes = plt.subplots(2, len(algos), figsize=(4.2 * len(algos), 6.5), squeeze=False)
    for j, (algo, a) in enumerate(algos.items()):
        comps = [r for r in a["comparisons"] if r["paired"] and r["paired"].get("tested")]
        labels = [r["label"][len(algo):].lstrip(" +") for r in comps]
        for i, stat in enumerate(("mean", "worst")):
            ax = axes[i][j]
            for k, r in enumerate(comps):
                e = r["paired"][stat]
                color = {"better": "C2", "worse": "C3"}.get(e["verdict"], "C0")
                ax.errorbar([k], [e["difference"]], yerr=[e["ci"]], marker="o", ms=3, capsize=2, lw=1, color=color)
            ax.axhline(0.0, color="k", lw=0.6)
            ax.set_xticks(range(len(comps)))
            ax.set_xticklabels(labels, rotation=90, fontsize=6)
            ax.set_title(f"{algo}: paired Δ {stat} (Nash − plain)", fontsize=9)
    fig.suptitle(f"Tables 5-6 at {rep['iterations']:,} iterations, 5 seeds: paired differences with 95% t-intervals\n"
                 "(green: better, red: worse, blue: no detectable difference)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
