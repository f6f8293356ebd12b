"""Run the checks and write ``report.md`` (and ``report.html``) with every prediction beside its measurement."""
from __future__ import annotations

import html
import json
import platform
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from ._common import Record, float64, write_record


def run_checks(names: Iterable[str], out: Path, quick: bool, log: Callable[[str], None] = print):
    from . import CHECKS
    records = []
    for name in names:
        if name not in CHECKS:
            raise ValueError(f"unknown check {name!r}; choose from {', '.join(CHECKS)} or all")
        log(f"[analysis] {name}{' (quick)' if quick else ''} ...")
        with float64():
            record = CHECKS[name](out, quick=quick)
        write_record(record, out)
        log(f"[analysis] {name}: {record.verdict} ({record.seconds:.1f} s)")
        records.append(record)
    return records


def _json(x):
    return json.dumps(x, default=str) if not isinstance(x, str) else x


def load_records(out: Path, quick: bool) -> list:
    """The records on disk in ``out`` (one ``<check>.json`` each) of the given mode, in the order of ``CHECKS``."""
    from . import CHECKS
    records = []
    for name in CHECKS:
        path = out / f"{name}.json"
        if path.is_file():
            record = Record(**json.loads(path.read_text()))
            if bool(record.settings.get("quick", False)) == quick:
                records.append(record)
    return records


def write_report(records, out: Path, quick: bool, command: str) -> Path:
    lines = ["# Numerical checks of the Nash-GBML theory", "",
             f"Command: `{command}`  ", f"Date (UTC): {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}  ",
             f"torch {torch.__version__}, Python {platform.python_version()}, float64; "
             f"{'quick mode (smaller grids)' if quick else 'full mode'}", "",
             "| check | claim | predicted | measured | verdict |", "|---|---|---|---|---|"]
    for r in records:
        pred = "; ".join(f"{k} = {_fmt(v)}" for k, v in r.predicted.items())
        meas = "; ".join(f"{k} = {_fmt(v)}" for k, v in r.measured.items() if not isinstance(v, (list, dict)))
        lines.append(f"| [{r.title}](#{r.check}) | {r.claim} | {pred} | {meas} | **{r.verdict}** |")
    for r in records:
        lines += ["", f"## {r.title}", f'<a id="{r.check}"></a>', "", f"*Claim:* {r.claim}", "",
                  f"*Verdict:* **{r.verdict}**. {r.explanation}", "",
                  f"*Settings:* `{_json(r.settings)}`; {r.seconds:.1f} s.", ""]
        if r.figure:
            lines.append(f"![{r.title}]({r.figure})")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    body = "".join(f"<h2 id='{r.check}'>{html.escape(r.title)}</h2><p><b>{html.escape(r.verdict)}</b>. "
                   f"{html.escape(r.explanation)}</p>" + (f"<img src='{r.figure}' style='max-width:100%'>" if r.figure else "")
                   for r in records)
    (out / "report.html").write_text(f"<html><meta charset='utf-8'><title>Nash-GBML checks</title><body>"
                                     f"<h1>Numerical checks of the Nash-GBML theory</h1><p>{html.escape(command)}</p>"
                                     f"{body}</body></html>")
    return path


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list) and v and all(isinstance(x, float) for x in v):
        return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
    return str(v)


def main(check: str = "all", out: Optional[str] = None, quick: bool = False, command: str = "") -> int:
    from . import CHECKS
    out_p = Path(out) if out else Path("runs") / ("analysis_quick" if quick else "analysis")  # never results/
    names = list(CHECKS) if check == "all" else [check]
    records = run_checks(names, out_p, quick)
    mode = " --quick" if quick else ""
    if check == "all":
        path = write_report(records, out_p, quick, command or f"implicit-nash verify{mode} --out {out_p}")
        print(f"[analysis] wrote {path}")
    else:
        # One check re-run: the report is rebuilt from the records on disk when every check has one of this
        # mode, and it names both commands, so that nobody mistakes it for one run.
        on_disk = load_records(out_p, quick)
        if len(on_disk) == len(CHECKS):
            again = command or f"implicit-nash verify --check {check}{mode} --out {out_p}"
            path = write_report(on_disk, out_p, quick,
                                f"implicit-nash verify{mode} --out {out_p}`, then re-ran {check} with `{again}")
            print(f"[analysis] rebuilt {path} from the {len(on_disk)} records in {out_p}")
    failed = [r.check for r in records if r.verdict == "violated"]
    if failed:
        print(f"[analysis] violated: {', '.join(failed)}")
    return 0
