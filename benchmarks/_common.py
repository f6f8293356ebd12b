"""Shared helpers of the benchmark scripts: environment record, statistics, result files.

Every benchmark writes ``benchmarks/results/<name>.json`` (all measured numbers) and
``benchmarks/results/<name>.md`` (a human-readable report that starts with the command that
produced it, the date, the torch version, the CPU and the number of repetitions).  A ``--quick``
run writes ``<name>_quick.json`` / ``<name>_quick.md`` instead, so that a smoke test never
overwrites the results of a full run.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


def ensure_importable() -> None:
    """Make ``import implicit_nash`` work when the package is not installed.

    The scripts are run as ``python benchmarks/<name>.py`` from the repository root, in which case
    ``sys.path[0]`` is ``benchmarks/`` and the package one level up is not importable by default.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def command_line() -> str:
    """The command that started this process, relative to the repository root when possible."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_str = str(script.relative_to(ROOT))
    except ValueError:
        script_str = str(script)
    python = os.path.basename(sys.executable) or "python"
    return " ".join([python, shlex.quote(script_str)] + [shlex.quote(a) for a in sys.argv[1:]])


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (Linux), or an empty string elsewhere."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def environment(**extra: Any) -> Dict[str, Any]:
    """Describe the machine and software a benchmark ran on.

    Args:
        **extra: additional entries (threads, repetitions, device...) stored verbatim.

    Returns:
        A JSON-serialisable dictionary.
    """
    import torch

    env = {
        "command": command_line(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    env.update(extra)
    return env


def package_version(pkg: str) -> str:
    """The installed version of ``pkg``, or ``"not installed"``."""
    import importlib.metadata

    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def median(values: Iterable[float]) -> float:
    """Median of the finite values (``nan`` when there are none)."""
    vals = [float(v) for v in values if v is not None and v == v]
    return statistics.median(vals) if vals else float("nan")


def header_md(title: str, env: Dict[str, Any], repetitions: str, notes: Sequence[str] = ()) -> List[str]:
    """The first lines of a results ``.md`` file: command, date, versions, CPU, repetitions."""
    lines = [
        f"# {title}",
        "",
        f"Command: `{env['command']}`",
        "",
        f"- Date (UTC): {env['date']}",
        f"- torch {env['torch']}, Python {env['python']}, {env['platform']}",
        f"- CPU: platform.processor() = '{env['processor']}', model '{env['cpu_model']}', "
        f"os.cpu_count() = {env['cpu_count']}, torch threads = {env['torch_threads']}",
        f"- CUDA available: {env['cuda_available']}" + (f" ({env['cuda_device']})" if env.get("cuda_device") else ""),
        f"- Load average (1, 5, 15 min) at start: {_loadavg(env)}" + (
            f", at end: {_loadavg(env, 'load_average_at_end')}" if env.get("load_average_at_end") else "")
        + " (a load above the benchmark's own thread count means the machine was shared)",
        f"- Repetitions: {repetitions}",
    ]
    lines += [f"- {note}" for note in notes]
    lines.append("")
    return lines


def report_head(title: str, env: Dict[str, Any], repetitions: str, notes: Sequence[str], elapsed: float,
                headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    """The start of a results ``.md`` file up to its main table.

    :func:`header_md` with the run's total wall time (``elapsed`` seconds) as the last note, then a
    ``## Results`` section holding the table of ``headers`` and ``rows``.
    """
    lines = header_md(title, env, repetitions, list(notes) + [f"Total wall time of this run: {elapsed:.0f} s"])
    lines += ["## Results", ""]
    lines += table(headers, rows)
    return lines


def configure_torch(threads: int, seed: int) -> None:
    """The benchmarks' common torch setup: ``threads`` intra-op threads, float64 default, global seed."""
    import torch

    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(seed)


def _loadavg(env: Dict[str, Any], key: str = "load_average_at_start") -> str:
    values = env.get(key)
    return "n/a" if not values else ", ".join(f"{v:.2f}" for v in values)


def finish_environment(env: Dict[str, Any]) -> None:
    """Record the load average at the end of the run (call just before writing results)."""
    env["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    """A GitHub-flavoured markdown table."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")  # a literal '|' would split the markdown cell

    out = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        out.append("| " + " | ".join(cell(c) for c in row) + " |")
    return out


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print an aligned plain-text table to stdout."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def result_paths(name: str, quick: bool) -> Dict[str, Path]:
    """Where a benchmark writes its files (``_quick`` suffix for smoke runs)."""
    stem = f"{name}_quick" if quick else name
    return {"json": RESULTS_DIR / f"{stem}.json", "md": RESULTS_DIR / f"{stem}.md",
            "png": RESULTS_DIR / f"{stem}.png"}


def write_results(name: str, quick: bool, payload: Dict[str, Any], md_lines: Sequence[str]) -> Dict[str, Path]:
    """Write the ``.json`` and ``.md`` result files and return their paths."""
    paths = result_paths(name, quick)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(paths["json"], "w") as handle:
        json.dump(payload, handle, indent=2, default=_json_default)
        handle.write("\n")
    with open(paths["md"], "w") as handle:
        handle.write("\n".join(md_lines).rstrip() + "\n")
    return paths


def _json_default(obj: Any) -> Any:
    """Serialise the few non-JSON types that appear in results (paths, floats from torch)."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def fmt(value: Optional[float], spec: str = ".3g") -> str:
    """Format a number, showing ``n/a`` for ``None`` or ``nan``."""
    if value is None or value != value:
        return "n/a"
    return format(value, spec)


def fmt_bytes(n: Optional[float]) -> str:
    """Human-readable size in MiB (or KiB below one MiB)."""
    if n is None or n != n:
        return "n/a"
    if abs(n) < 2 ** 20:
        return f"{n / 2 ** 10:.1f} KiB"
    return f"{n / 2 ** 20:.1f} MiB"


def interleaved_steps(runs: Dict[str, Sequence[Any]], reps: int, steps: int) -> Dict[str, List[float]]:
    """Seconds per meta-iteration of each method: ``runs[name]`` is a list of trainer runs stepped one
    after another ``steps`` times per timed block; the methods alternate in a shuffled order in each
    of ``reps`` repetitions, after one untimed step (warm-up)."""
    import random
    import time

    for group in runs.values():
        for r in group:
            r.step()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(reps):
        order = list(runs)
        random.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            for _ in range(steps):
                for r in runs[name]:
                    r.step()
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def step_timing_args(default_reps: int, extra=None):
    """The options of the meta-iteration timing benchmarks (``--reps``, ``--steps``, ``--quick``, and
    whatever ``extra(parser)`` adds); returns the parsed arguments and the repetitions to run (3 with
    ``--quick``). Sets one torch thread."""
    import argparse

    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=default_reps)
    parser.add_argument("--steps", type=int, default=5, help="meta-iterations per timed block")
    parser.add_argument("--quick", action="store_true")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    return args, 3 if args.quick else args.reps

