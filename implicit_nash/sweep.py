"""Sweeps: a grid of training runs on a local process pool or a Ray cluster, cached and resumable.

A sweep specification is a JSON file::

    {"task": "sinusoid",
     "fixed": {"iterations": 2000, "inner_lr": 0.01},
     "grid": {"algorithm": ["maml", "metasgd"],
              "penalty": ["none", "centroid"],
              "weight": [0.01, 0.1],
              "seed": [0, 1, 2]}}

Every combination of the grid's values is one run (``weight`` and ``robustness`` are dropped for
``penalty: none``, so the plain algorithm runs once per seed). Runs live in ``DIR/runs/<key>/`` and
use the same trainer, checkpoints and caching as :mod:`implicit_nash.reproduce`: a finished run is
skipped, an interrupted one resumes from its checkpoint. ``--backend ray`` sends each run to a Ray
cluster (``--address``; a local Ray instance when omitted) instead of the local process pool.
Results are gathered into ``DIR/sweep.json``, ``DIR/sweep.md`` and ``DIR/sweep.png``.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .meta.config import ConfigError, read_json_object, resolve
from .reproduce import _refuse_overwrite, _run_row, failure_message, run_rows

__all__ = ["expand", "sweep", "load_spec"]


def load_spec(path: str) -> Dict[str, Any]:
    """Read and check a sweep specification (see the module docstring)."""
    spec = read_json_object(path, "sweep specification")
    if not isinstance(spec.get("grid"), dict) or not spec["grid"]:
        raise ConfigError(f"sweep specification {path} needs a non-empty object 'grid' of lists")
    for k, v in spec["grid"].items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"sweep specification {path}: grid entry {k!r} must be a non-empty list")
    return spec


def _key(run: Dict[str, Any]) -> str:
    parts = []
    for k in sorted(run):
        v = run[k]
        if isinstance(v, (list, tuple)):  # e.g. lr_init [0.005, 0.1] -> lr_init=0.005-0.1
            v = "-".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
        parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return "_".join(parts).replace("/", "-")


def expand(spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The runs of a specification: one dict of grid values per distinct valid combination."""
    names = list(spec["grid"])
    runs, seen = [], set()
    for values in itertools.product(*(spec["grid"][n] for n in names)):
        run = dict(zip(names, values))
        if run.get("penalty", spec.get("fixed", {}).get("penalty", "none")) == "none":
            run.pop("weight", None)
            run.pop("robustness", None)
        key = _key(run)
        if key not in seen:
            seen.add(key)
            runs.append(run)
    return runs


def _submit_ray(address: Optional[str]):
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'ray[default]'") from None
    if not ray.is_initialized():
        kwargs: Dict[str, Any] = {}
        if address is None:
            # a local instance: its workers import the implicit_nash this process runs (a checkout's
            # too), and no dashboard is started
            import os
            root = str(Path(__file__).resolve().parents[1])
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
            kwargs = {"include_dashboard": False, "runtime_env": {"env_vars": {"PYTHONPATH": path}}}
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, **kwargs)
    remote = ray.remote(num_cpus=1)(_run_row)
    return ray, remote


def sweep(spec: Dict[str, Any], out_dir: str, *, jobs: int = 1, backend: str = "local",
          address: Optional[str] = None, progress: bool = False, force: bool = False,
          command: Optional[str] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run a sweep (skipping finished runs) and write its table, JSON and figure.

    ``out_dir`` holding another specification's sweep is refused unless ``force``; ``command`` is
    the command line written into ``sweep.md`` (the CLI passes the one that was run).
    """
    if backend not in ("local", "ray"):
        raise ConfigError(f"unknown backend {backend!r}; choose local or ray")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    out = Path(out_dir)
    _refuse_overwrite(out / "sweep.json", {"spec": spec}, force)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = expand(spec)
    configs = {}
    for run in runs:
        cli = {"task": spec.get("task", "sinusoid"), "threads": 1, **spec.get("fixed", {}), **run}
        configs[_key(run)] = resolve(cli)
    log(f"sweep: {len(runs)} runs in {out / 'runs'} ({backend} backend)")
    t0 = time.time()
    results: Dict[str, Dict[str, Any]] = {}
    failures: Dict[str, str] = {}
    keys = list(configs)
    if backend == "ray":
        ray, remote = _submit_ray(address)
        refs = {k: remote.remote(configs[k], str(out / "runs" / k)) for k in keys}
        for k, ref in refs.items():
            try:
                results[k] = ray.get(ref)
            except Exception as e:  # reported in the table; the other runs go on
                failures[k] = failure_message(e)
    else:
        results, failures = run_rows(configs, out / "runs", jobs=jobs, progress=progress, desc="sweep")
    table = []
    for run in runs:
        k = _key(run)
        row: Dict[str, Any] = {"key": k, **run}
        if k in failures:
            row["failed"] = failures[k]
        else:
            m = results[k]
            mt = m["metric"]
            trivial = "zero" if mt == "mse" else "chance"
            row.update({"metric": mt, "val_mean": _final_validation(m, mt),
                        "diverged_seeds": sorted(int(x) for x in (m.get("diverged_seeds") or {})),
                        "seeds": len(m.get("runs") or [None]),
                        "mean": m[f"test_{mt}_mean"], "worst": m[f"test_{mt}_worst"],
                        "std": m[f"test_{mt}_std"], "iterations": m["iterations"],
                        "sec_per_iteration": m["sec_per_iteration"],
                        "trivial_baseline": m.get(f"baseline_{trivial}_{mt}_mean"),
                        "unadapted_baseline": m.get(f"baseline_unadapted_{mt}_mean")})
        table.append(row)
    if command is None:
        command = f"implicit_nash.sweep.sweep(spec, {str(out)!r}, jobs={jobs}, backend={backend!r})"
    report = {"spec": spec, "runs": table, "backend": backend, "command": command,
              "wall_seconds_this_call": time.time() - t0}
    (out / "sweep.json").write_text(json.dumps(report, indent=2))
    names = list(spec["grid"])
    lines = ["# Sweep", "", f"Specification: `{json.dumps(spec)}`", "",
             f"{len(table)} runs; {len(failures)} failed. *val* is the validation {table[0].get('metric', 'metric')} "
             "at the end of training (mean over groups, averaged over the seeds that did not diverge): compare "
             "settings on it, not on the test columns. Test: mean, worst and standard deviation over evaluation "
             "groups, beside a trivial predictor (0, or chance) and the meta-parameters without adaptation. "
             f"Command: `{command}`.", "",
             "| " + " | ".join(names) + " | iterations | diverged seeds | val | test mean | worst | std | trivial "
             "predictor | unadapted |",
             "|" + "---|" * (len(names) + 8)]
    for row in table:
        cells = [str(row.get(n, "-")) for n in names]
        if "failed" in row:
            lines.append("| " + " | ".join(cells) + f" | failed: {row['failed']} | | | | | | | | |")
        else:
            div = f"{len(row['diverged_seeds'])} of {row['seeds']}" + (
                f" ({', '.join(map(str, row['diverged_seeds']))})" if row["diverged_seeds"] else "")
            lines.append("| " + " | ".join(cells) + f" | {row['iterations']} | {div} | {_g(row['val_mean'])} | "
                         f"{row['mean']:.4g} | {row['worst']:.4g} | {row['std']:.4g} | {row['trivial_baseline']:.4g} | "
                         f"{row['unadapted_baseline']:.4g} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    _figure(table, out / "sweep.png", names)
    log(f"wrote {out / 'sweep.md'}")
    return report


def _final_validation(metrics: Dict[str, Any], metric: str) -> Optional[float]:
    """The last validation's ``metric`` mean, averaged over the seeds whose value is finite."""
    history = metrics.get("val_history") or []
    if not history:
        return None
    last = history[-1]
    values = [r[f"{metric}_mean"] for r in last.get("runs", [last])
              if isinstance(r.get(f"{metric}_mean"), (int, float)) and math.isfinite(r[f"{metric}_mean"])]
    return sum(values) / len(values) if values else None


def _g(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4g}"


def _figure(table, path: Path, names: List[str]) -> None:
    """Test mean against the penalty weight when the grid has weights; otherwise one column per run
    (labelled by its grid values) with its final validation and test means."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in table if "failed" not in r]
    metric = done[0]["metric"] if done else ""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if any(r.get("weight") for r in done):
        groups: Dict[str, List[Dict[str, Any]]] = {}
        for r in done:
            label = f"{r.get('algorithm', '')} {r.get('penalty', '')}".strip() or "runs"
            groups.setdefault(label, []).append(r)
        for i, (label, rs) in enumerate(groups.items()):
            color = f"C{i % 10}"
            with_w = [r for r in rs if r.get("weight")]
            if with_w:
                ax.scatter([r["weight"] for r in with_w], [r["mean"] for r in with_w], label=label, s=14, color=color)
            else:  # plain algorithms: a horizontal line at their mean over seeds
                ax.axhline(sum(r["mean"] for r in rs) / len(rs), ls="--", lw=1, color=color,
                           label=f"{label} (mean of {len(rs)})")
        ax.set_xscale("log")
        ax.set_xlabel("penalty weight")
        ax.set_ylabel(f"test {metric} (mean over groups)")
    else:
        keys = [n for n in names if len({str(r.get(n)) for r in done}) > 1] or names
        labels = [", ".join(f"{k}={r.get(k)}" for k in keys) + (f"\n{len(r['diverged_seeds'])} of {r['seeds']} diverged"
                                                              if r.get("diverged_seeds") else "") for r in done]
        x = list(range(len(done)))
        val = [(i, r["val_mean"]) for i, r in zip(x, done) if r.get("val_mean") is not None]
        ax.scatter([i for i, _ in val], [v for _, v in val], marker="o", label="validation (end of training)")
        ax.scatter(x, [r["mean"] for r in done], marker="x", label="test")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)
        values = [v for _, v in val] + [r["mean"] for r in done]
        positive = [v for v in values if v > 0 and math.isfinite(v)]
        if positive and max(positive) / min(positive) > 100:
            ax.set_yscale("log")
        ax.set_ylabel(f"{metric} (mean over groups and seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
