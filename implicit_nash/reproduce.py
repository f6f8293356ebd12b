"""Reproduce the paper's sinusoid tables: Table 2 and the weight sweeps of Tables 5-6.

Every row (an algorithm with or without a penalty) trains all its seeds together in one process
(vectorised over runs, see :class:`implicit_nash.meta.trainer.Run`) in ``DIR/runs/<row>/``; rows run
in parallel processes with ``--jobs``. A finished row (its ``metrics.json`` holds the same
configuration) is skipped; an interrupted one resumes from its checkpoint; a finished row asked for
more iterations is extended from its checkpoint (the first part of a longer run is the shorter run).
The outputs, ``DIR/<name>.json``, ``DIR/<name>.md`` and ``DIR/<name>.png``, state the budget used
and put the paper's numbers beside ours.
"""
from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .meta.config import ConfigError, resolve
from .meta.stats import mean_ci95

__all__ = ["ROWSETS", "paper_tables", "reproduce"]

_NAMES = {"MAML": "maml", "Meta-SGD": "metasgd", "CAVIA": "cavia", "TR-MAML": "trmaml",
          "CAVIA(32)": "cavia", "CAVIA(128)": "cavia"}
_EXTRA = {"CAVIA(32)": {"filters": 32}, "CAVIA(128)": {"filters": 128}}


def paper_tables() -> Dict[str, Any]:
    """The paper's Tables 2-6 as transcribed numbers (``implicit_nash/data/paper_tables.json``)."""
    return json.loads(resources.files("implicit_nash").joinpath("data/paper_tables.json").read_text())


def _rows(table: str, algorithms: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    rows = []
    for r in paper_tables()[table]["rows"]:
        algo = _NAMES[r["algorithm"]]
        if algorithms and algo not in algorithms:
            continue
        pen = r["penalty"]
        base = r["algorithm"].lower().replace("(", "").replace(")", "").replace("-", "")
        if pen is None:
            key, opts = f"{base}", {"penalty": "none"}
        elif pen["kind"] == "centroid":
            key, opts = f"{base}_pC_{pen['weight']:g}", {"penalty": "centroid", "weight": pen["weight"]}
        else:
            key = f"{base}_pR_{pen['weight']:g}_r{pen['robustness']:g}"
            opts = {"penalty": "robust", "weight": pen["weight"], "robustness": float(pen["robustness"])}
        opts = {**opts, **_EXTRA.get(r["algorithm"], {})}
        rows.append({"key": key, "algorithm": algo, "group": r["algorithm"], "label": _label(r), "options": opts,
                     "paper": {m: (r[m], r[m + "_ci"]) for m in ("mean", "worst", "std")}})
    return rows


def _label(r) -> str:
    pen = r["penalty"]
    if pen is None:
        return r["algorithm"]
    if pen["kind"] == "centroid":
        return f"{r['algorithm']} + p_C({pen['weight']:g})"
    return f"{r['algorithm']} + p_R({pen['weight']:g}, {pen['robustness']:g})"


ROWSETS: Dict[str, Callable[[], List[Dict[str, Any]]]] = {
    "table2": lambda: _rows("table2"),
    "robustness": lambda: _rows("table5") + _rows("table6"),
    "table3": lambda: _rows("table3"),
    "table4": lambda: _rows("table4"),
}
# the task of each reproduction, and the factor from our metric to the paper's unit
# (Table 3 prints MSE x 1e-2, i.e. 100 x MSE; Table 4 prints accuracy in %)
SETTINGS = {"table2": ("sinusoid", 1.0), "robustness": ("sinusoid", 1.0), "table3": ("celeba", 100.0),
            "table4": ("miniimagenet", 100.0)}


def _run_row(config: Dict[str, Any], out: str) -> Dict[str, Any]:
    """Train (or resume, or extend) one row in this process; returns its metrics."""
    from .meta.trainer import train
    out_p = Path(out)
    metrics_file = out_p / "metrics.json"
    if metrics_file.is_file():
        done = json.loads(metrics_file.read_text())
        from .meta.config import upgrade
        if upgrade(done["config"]) == config:
            # cached: the same configuration has finished (metrics of earlier versions lack two keys)
            done.setdefault("metric", "mse")
            done["test"].setdefault("groups", done["test"].get("intervals"))
            return done
    resume = (out_p / "checkpoint.pt").is_file()
    return train(config, out, resume=resume, progress=False, log=lambda s: None)


def _progress(runs_dir: Path, key: str, cap: int) -> int:
    """Iterations on disk of the run ``runs_dir/key``, up to ``cap`` (the budget asked for)."""
    p = runs_dir / key / "progress.json"
    if p.is_file():
        try:
            return min(json.loads(p.read_text())["iteration"], cap)
        except (json.JSONDecodeError, KeyError):  # being replaced right now; the next poll reads it
            pass
    return 0


def failure_message(e: BaseException) -> str:
    """One line naming a failed run's exception, for the tables."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def run_rows(configs: Dict[str, Dict[str, Any]], runs_dir: Path, *, jobs: int = 1, progress: bool = True,
             desc: str = "runs") -> Tuple[Dict[str, Dict[str, Any]], Dict[str, str]]:
    """Train every configuration (``runs_dir/<key>``; cached, resumed or extended) on ``jobs`` processes.

    Returns the metrics of the runs that finished and a one-line message for each that failed (the
    others go on). The progress bar counts the iterations on disk (each run's ``progress.json``), so it
    moves while the runs train in other processes; iterations already done before the call are its
    starting point, not part of its rate.
    """
    runs_dir = Path(runs_dir)
    keys = list(configs)
    total = sum(c["iterations"] for c in configs.values())

    def on_disk() -> int:
        return sum(_progress(runs_dir, k, configs[k]["iterations"]) for k in keys)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=on_disk(), desc=desc, unit="it", dynamic_ncols=True)
    results: Dict[str, Dict[str, Any]] = {}
    failures: Dict[str, str] = {}

    def show() -> None:
        if bar is not None:
            bar.n = on_disk()
            bar.refresh()

    if jobs == 1:
        for k in keys:
            try:
                results[k] = _run_row(configs[k], str(runs_dir / k))
            except (FloatingPointError, RuntimeError, ValueError) as e:  # reported; the other runs go on
                failures[k] = failure_message(e)
            show()
    else:
        import multiprocessing as mp
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_row, configs[k], str(runs_dir / k)): k for k in keys}
            pending = set(futures)
            while pending:
                # wakes on every finished run, and every 2 s to move the progress bar
                finished, pending = wait(pending, timeout=2.0, return_when=FIRST_COMPLETED)
                for f in finished:
                    try:
                        results[futures[f]] = f.result()
                    except Exception as e:  # reported; the other runs go on
                        failures[futures[f]] = failure_message(e)
                show()
    if bar is not None:
        bar.n = total
        bar.close()
    return {k: results[k] for k in keys if k in results}, failures


def reproduce(name: str, out_dir: str, *, iterations: Optional[int] = None, seeds: int = 5, jobs: int = 1,
              algorithms: Optional[List[str]] = None, progress: bool = True, data_root: Optional[str] = None,
              overrides: Optional[Dict[str, Any]] = None, force: bool = False,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run (or finish) a reproduction and write its table, JSON and figure; returns the JSON.

    ``out_dir`` may hold this reproduction already: the same budget and rows resume it; another
    budget or set of rows would overwrite its report, which needs ``force=True``.
    """
    if name not in ROWSETS:
        raise ConfigError(f"unknown reproduction {name!r}; choose from {', '.join(ROWSETS)}")
    if seeds < 2:
        raise ConfigError(f"--seeds must be at least 2 for confidence intervals, got {seeds}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    rows = ROWSETS[name]()
    task, scale = SETTINGS[name]
    if task in ("celeba", "miniimagenet") and not data_root:
        raise ConfigError(f"reproduce {name} needs --data-root DIR (the {task} data)")
    if iterations is None:
        from .meta.config import PRESETS
        iterations = PRESETS[task]["iterations"]
    if algorithms:
        unknown = sorted(set(algorithms) - set(_NAMES.values()))
        if unknown:
            raise ConfigError(f"unknown algorithm(s) {', '.join(unknown)}; choose from {', '.join(_NAMES.values())}")
        rows = [r for r in rows if r["algorithm"] in algorithms]
    out = Path(out_dir)
    budget = f"{iterations} iterations x {seeds} seeds (0..{seeds - 1}) per row, {len(rows)} rows"
    _refuse_overwrite(out / f"{name}.json", {"budget": budget, "overrides": overrides or {},
                                             "rows": [r["key"] for r in rows]}, force)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    configs = {}
    for r in rows:
        cli = {"task": task, "algorithm": r["algorithm"], **r["options"], "iterations": iterations,
               "seeds": list(range(seeds)), "threads": 1, **(overrides or {})}
        if data_root:
            cli["data_root"] = str(data_root)
        configs[r["key"]] = resolve(cli)
    log(f"reproduce {name}: {budget}; runs in {out / 'runs'}")
    t0 = time.time()
    results, failures = run_rows(configs, out / "runs", jobs=jobs, progress=progress, desc=f"reproduce {name}")
    for key, msg in failures.items():
        log(f"row {key} failed: {msg}")
    if not results:
        raise ConfigError("every row failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    report = _report(name, rows, results, budget, iterations, seeds, time.time() - t0, overrides, failures, scale)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(_markdown(report))
    try:
        _figure(report, rows, results, out / f"{name}.png")
    except ImportError:  # pragma: no cover
        log("matplotlib is not installed: no figure")
    log(f"wrote {out / (name + '.md')}, {out / (name + '.json')} and {out / (name + '.png')}")
    return report


def _refuse_overwrite(report: Path, same: Dict[str, Any], force: bool) -> None:
    """A one-line :class:`ConfigError` when ``report`` exists and differs from ``same`` in any of its
    keys (another budget, rows or specification), unless ``force``."""
    if force or not report.is_file():
        return
    same = json.loads(json.dumps(same))  # compared as written to disk
    try:
        old = json.loads(report.read_text())
    except json.JSONDecodeError:
        old = {}
    old = {**old, "rows": [row.get("key") for row in old.get("rows", [])]} if "rows" in same else old
    differ = [k for k in same if old.get(k) != same[k]]
    if differ:
        raise ConfigError(f"{report.parent} holds a report of another {' and '.join(differ)} ({report.name}); add "
                          f"--force to overwrite it, or choose another --out")


def _report(name, rows, results, budget, iterations, seeds, seconds, overrides, failures=None,
            scale: float = 1.0) -> Dict[str, Any]:
    table = []
    failures = failures or {}
    metric = next(iter(results.values()))["metric"] if results else "mse"
    trivial = "zero" if metric == "mse" else "chance"
    for r in rows:
        if r["key"] in failures:
            table.append({"key": r["key"], "label": r["label"], "algorithm": r["algorithm"], "group": r["group"],
                          "penalty": r["options"], "failed": failures[r["key"]],
                          "paper": {k: {"mean": v[0], "ci": v[1]} for k, v in r["paper"].items()}})
            continue
        m = results[r["key"]]
        finite = [run for run in m["runs"] if run.get("diverged_at") is None]
        ours = {}
        for stat in ("mean", "worst", "std"):
            values = [scale * run[f"test_{metric}_{stat}"] for run in finite]
            ours[stat] = {**mean_ci95(values), "values": values}
        table.append({"key": r["key"], "label": r["label"], "algorithm": r["algorithm"], "group": r["group"],
                      "penalty": r["options"], "ours": ours,
                      "diverged_seeds": {str(run["seed"]): run["diverged_at"] for run in m["runs"]
                                         if run.get("diverged_at") is not None},
                      "paper": {k: {"mean": v[0], "ci": v[1]} for k, v in r["paper"].items()},
                      "iterations": m["iterations"], "sec_per_iteration": m["sec_per_iteration"],
                      "trivial_baseline": scale * m[f"baseline_{trivial}_{metric}_mean"],
                      "unadapted_baseline": scale * m[f"baseline_unadapted_{metric}_mean"]})
    for row in table:
        if "failed" in row:
            continue
        plain = next((t for t in table if t["group"] == row["group"] and t["penalty"]["penalty"] == "none"
                      and "failed" not in t), None)
        row["verdict"] = _verdict(row, plain if plain is not None else row, higher=metric == "accuracy")
    first = results[next(r["key"] for r in rows if r["key"] in results)]
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in (overrides or {}).items())
    return {"reproduction": name, "budget": budget, "test": first["test"], "metric": metric, "scale": scale,
            "unit": paper_tables()[{"robustness": "table5"}.get(name, name)].get("unit", metric), "iterations": iterations, "seeds": list(range(seeds)),
            "overrides": overrides or {}, "wall_seconds_this_call": seconds,
            "paper_budget": "70,000 iterations, 5 trials (paper, Appendix F)",
            "command": f"implicit-nash reproduce {name} --iterations {iterations} --seeds {seeds}{flags}",
            "rows": table}


def _verdict(row, plain, higher: bool = False) -> Dict[str, Any]:
    v: Dict[str, Any] = {}
    ours, paper = row["ours"], row["paper"]
    # against the paper's own number for this row
    v["vs_paper"] = {m: {"difference": ours[m]["mean"] - paper[m]["mean"],
                         "intervals_overlap": abs(ours[m]["mean"] - paper[m]["mean"]) <= ours[m]["ci"] + paper[m]["ci"]}
                     for m in ("mean", "worst", "std")}
    # seeds that disagree by orders of magnitude make any interval meaningless: say so, compare nothing
    v["unstable"] = bool(not ours["mean"]["ci"] < abs(ours["mean"]["mean"]))
    if row is not plain:
        v["vs_plain"] = {}
        for m in ("mean", "worst", "std"):
            d = ours[m]["mean"] - plain["ours"][m]["mean"]
            separated = abs(d) > ours[m]["ci"] + plain["ours"][m]["ci"]
            # "better": lower error, or higher accuracy (for the std the same direction as the mean's is
            # not a quality, so it is reported but not judged)
            v["vs_plain"][m] = {"difference": d, "relative": d / plain["ours"][m]["mean"],
                                "better": (d > 0) if (higher and m != "std") else (d < 0),
                                "outside_intervals": bool(separated)}
    return v


def _fmt(x: Dict[str, float]) -> str:
    ci = x["ci"]
    return f"{x['mean']:.3f} ± {ci:.3f}" if not math.isnan(ci) else f"{x['mean']:.3f}"


def _markdown(rep) -> str:
    what = paper_tables()[{'robustness': 'table5'}.get(rep['reproduction'], rep['reproduction'])]['what']
    # the paper's "95% CI over 5 trials" is the paper's; ours is over the seeds run
    what = what.replace("95% CI over 5 trials", f"95% CI over {len(rep['seeds'])} seeds (the paper: 5 trials)")
    lines = [f"# Reproduction: {rep['reproduction']} ({what})", "",
             f"Unit: {rep['unit']} (ours converted to the paper's unit).", "",
             f"Command: `{rep['command']}`", "",
             f"**Budget used: {rep['budget']}.** The paper's budget: {rep['paper_budget']}.",
             f"Test: {rep['test']['tasks']} tasks in {rep['test']['groups']} evaluation groups (the same tasks for "
             f"every run; sinusoid: amplitude sub-intervals of [0.1, 5.0], images and episodes: one each); mean, "
             f"worst and standard deviation over groups of the per-group {rep['metric']}; ± is the 95% t-interval "
             "over seeds (ours) or as printed in the paper.", ""]
    if rep["overrides"]:
        lines += [f"Overrides of the paper's hyperparameters: `{json.dumps(rep['overrides'])}`", ""]
    lines += ["| row | ours: mean | worst | std | paper: mean | worst | std | vs plain (ours) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        p = r["paper"]
        if "failed" in r:
            lines.append(f"| {r['label']} | failed: {r['failed']} | | | {_fmt(p['mean'])} | {_fmt(p['worst'])} | "
                         f"{_fmt(p['std'])} | |")
            continue
        o = r["ours"]
        if "vs_plain" in r["verdict"]:
            vp = r["verdict"]["vs_plain"]
            parts = []
            for m in ("mean", "worst"):
                d = vp[m]
                word = "better" if d["better"] else "worse"
                sig = "outside CIs" if d["outside_intervals"] else "within CIs"
                parts.append(f"{m} {word} by {abs(d['relative']) * 100:.1f}% ({sig})")
            verdict = "; ".join(parts)
        else:
            verdict = "(plain)"
        if r["verdict"]["unstable"]:
            verdict = "unstable across seeds (see below)"
        if r["diverged_seeds"]:
            verdict += (f"; seed(s) {', '.join(r['diverged_seeds'])} diverged (at iteration "
                        f"{', '.join(map(str, r['diverged_seeds'].values()))}): statistics over the other "
                        f"{o['mean']['n']}")
        lines.append(f"| {r['label']} | {_fmt(o['mean'])} | {_fmt(o['worst'])} | {_fmt(o['std'])} | "
                     f"{_fmt(p['mean'])} | {_fmt(p['worst'])} | {_fmt(p['std'])} | {verdict} |")
    ok_rows = [r for r in rep["rows"] if "failed" not in r]
    lines += ["", "## Against the paper", ""]
    for r in ok_rows:
        vs = r["verdict"]["vs_paper"]
        agree = [m for m in ("mean", "worst", "std") if vs[m]["intervals_overlap"]]
        seeds_txt = ", ".join(f"{v:.3g}" for v in r["ours"]["mean"]["values"])
        if r["verdict"]["unstable"]:
            lines.append(f"- {r['label']}: **unstable** — our seeds disagree by orders of magnitude (the 95% interval "
                         f"is wider than the mean), so no comparison is made; per-seed mean MSE: {seeds_txt}"
                         + (f"; diverged during training: seed(s) {', '.join(r['diverged_seeds'])}" if r["diverged_seeds"] else "")
                         + ".")
            continue
        lines.append(f"- {r['label']}: mean {r['ours']['mean']['mean']:.3f} vs paper {r['paper']['mean']['mean']:.3g} "
                     f"({'intervals overlap' if vs['mean']['intervals_overlap'] else 'intervals do not overlap'}); "
                     f"metrics whose intervals overlap the paper's: {', '.join(agree) if agree else 'none'}; "
                     f"per-seed mean MSE: {seeds_txt}"
                     + (f"; diverged during training: seed(s) {', '.join(r['diverged_seeds'])}" if r["diverged_seeds"] else "")
                     + ".")
    stable = {r["group"] for r in ok_rows if r["penalty"]["penalty"] == "none" and not r["verdict"]["unstable"]}
    usable = [r for r in ok_rows if "vs_plain" in r["verdict"] and not r["verdict"]["unstable"] and r["group"] in stable]
    claims_c = [r for r in usable if r["penalty"]["penalty"] == "centroid"]
    claims_r = [r for r in usable if r["penalty"]["penalty"] == "robust"]
    skipped = sorted({r["group"] for r in ok_rows} - {r["group"] for r in usable})
    lines += ["", "## The paper's two claims (Section 3.3)", ""]
    if skipped:
        lines.append(f"(Left out: {', '.join(skipped)}, whose plain or Nash rows are unstable across seeds.)")
        lines.append("")
    for rows_, stat, claim in ((claims_c, "mean", "*p_C improves the mean*: better mean"),
                               (claims_r, "worst", "*p_R improves the worst case*: better worst case")):
        if not rows_:
            continue
        held = [r["label"] for r in rows_ if r["verdict"]["vs_plain"][stat]["better"]]
        sig = [r["label"] for r in rows_ if r["verdict"]["vs_plain"][stat]["better"]
               and r["verdict"]["vs_plain"][stat]["outside_intervals"]]
        lines.append(f"- {claim} in {len(held)} of {len(rows_)} rows ({', '.join(held) or 'none'}); "
                     f"beyond the CIs in {len(sig)} ({', '.join(sig) or 'none'}).")
    lines += ["", "## Cost", "",
              "| row | iterations | ms per iteration (all seeds together) | trivial predictor | unadapted meta-parameters |",
              "|---|---|---|---|---|"]
    for r in ok_rows:
        lines.append(f"| {r['label']} | {r['iterations']} | {r['sec_per_iteration'] * 1e3:.1f} | "
                     f"{r['trivial_baseline']:.3f} | {r['unadapted_baseline']:.3f} |")
    lines += ["", f"Wall time of the call that wrote this file: {rep['wall_seconds_this_call'] / 60:.1f} min "
              "(rows found finished were not retrained)."]
    return "\n".join(lines) + "\n"


def _figure(rep, rows, results, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = list(dict.fromkeys(r["group"] for r in rows))
    metric = rep["metric"]
    fig, axes = plt.subplots(len(algos), 3, figsize=(12, 2.8 * len(algos)), squeeze=False)
    for i, algo in enumerate(algos):
        for r in [r for r in rows if r["group"] == algo and r["key"] in results]:
            m = results[r["key"]]
            keep = [j for j, run in enumerate(m["runs"]) if run.get("diverged_at") is None]
            hist = [{"iteration": h["iteration"], "runs": [h["runs"][j] for j in keep]} for h in m["val_history"]]
            its = [h["iteration"] for h in hist]
            for j, key in enumerate((f"{metric}_mean", f"{metric}_worst", f"{metric}_std")):
                stats = [mean_ci95([run[key] for run in h["runs"]]) for h in hist]
                mid = [s["mean"] for s in stats]
                ci = [0.0 if math.isnan(s["ci"]) else s["ci"] for s in stats]
                line, = axes[i][j].plot(its, mid, lw=1.2, label=r["label"])
                axes[i][j].fill_between(its, [m - c for m, c in zip(mid, ci)], [m + c for m, c in zip(mid, ci)],
                                        color=line.get_color(), alpha=0.2)
                if metric == "mse" and min(mid) > 0:
                    axes[i][j].set_yscale("log")
                axes[i][j].set_title(f"{algo}: {key.split('_')[1]} {metric}", fontsize=9)
        axes[i][0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    fig.suptitle(f"Validation {metric} during training (mean over seeds, 95% t-band); "
                 f"budget: {rep['budget']}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
