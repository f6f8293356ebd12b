"""Appendix F machinery on a tiny budget: the batch-size and step-size studies and the trajectories."""
import json
import os

import pytest

from implicit_nash.cli import main
from implicit_nash.meta.config import ConfigError
from implicit_nash.reproduce import reproduce
from implicit_nash.studies import STUDIES, study, study_summary, trajectories

TINY = {"eval_every": 2, "val_tasks": 490, "test_tasks": 490}


def test_batch_size_study_tiny_budget(tmp_path):
    out = tmp_path / "bs"
    rep = study("batch-size", out, iterations=2, seeds=2, algorithms=["cavia"], values=[5, 10], progress=False,
                overrides=TINY, log=lambda s: None)
    for name in ("batch-size.json", "batch-size.md", "batch-size.png"):
        assert (out / name).is_file()
    assert json.loads((out / "batch-size.json").read_text()) == json.loads(json.dumps(rep))
    assert [(r["value"], r["variant"]) for r in rep["rows"]] == [
        (5, "plain"), (5, "p_C(0.001)"), (5, "p_R(1e-05, 2)"), (10, "plain"), (10, "p_C(0.001)"), (10, "p_R(1e-05, 2)")]
    # each row trained with its grid value, and the Nash rows are paired with the plain row of the same value
    for r in rep["rows"]:
        cfg = json.loads((out / "runs" / r["key"] / "config.json").read_text())
        assert cfg["meta_batch"] == r["value"] and cfg["iterations"] == 2 and cfg["seeds"] == [0, 1]
        if r["variant"] != "plain":
            assert r["paired"]["tested"] and r["paired"]["plain"] == f"cavia_B{r['value']}"
            assert r["paired"]["family_size"] == 8
    md = (out / "batch-size.md").read_text()
    assert "Budget used: 2 iterations x 2 seeds" in md and "B in {5, 10}" in md and "Holm family: 8 tests" in md
    # cached: a second call retrains nothing; --report-only with a larger grid trains nothing either
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/checkpoint.pt")}
    again = study("batch-size", out, iterations=2, seeds=2, algorithms=["cavia"], values=[5, 10], progress=False,
                  overrides=TINY, log=lambda s: None)
    assert [r["ours"] for r in again["rows"]] == [r["ours"] for r in rep["rows"]]
    only = study("batch-size", out, iterations=2, seeds=2, algorithms=["cavia"], values=[5, 10, 15], progress=False,
                 overrides=TINY, report_only=True, log=lambda s: None)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/checkpoint.pt")} == mtimes
    assert sum("not finished" in r.get("failed", "") for r in only["rows"]) == 3


def test_step_size_study_uses_meta_sgd_stable_setting(tmp_path):
    out = tmp_path / "ss"
    assert main(["reproduce", "step-size", "--algorithms", "metasgd", "--values", "0.001", "0.01", "--iterations", "2",
                 "--seeds", "2", "--eval-every", "2", "--val-tasks", "490", "--test-tasks", "490", "--no-progress",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "step-size.json").read_text())
    assert len(rep["rows"]) == 6 and (out / "step-size.png").is_file()
    for r in rep["rows"]:
        cfg = json.loads((out / "runs" / r["key"] / "config.json").read_text())
        assert cfg["inner_lr"] == r["value"] and cfg["inner_steps"] == 3 and cfg["lr_clip"] == [0.0, 0.1]


def test_study_rejects_bad_requests(tmp_path, capsys):
    with pytest.raises(ConfigError, match="positive"):
        study("step-size", tmp_path, values=[0.0], progress=False)
    with pytest.raises(ConfigError, match="integers"):
        study("batch-size", tmp_path, values=[2.5], progress=False)
    with pytest.raises(ConfigError, match="unknown algorithm"):
        study("batch-size", tmp_path, algorithms=["reptile"], progress=False)
    with pytest.raises(ConfigError, match="unknown study"):
        study("width", tmp_path, progress=False)
    assert STUDIES["batch-size"]["values"] == [5, 10, 15, 20, 25]
    assert main(["reproduce", "trajectories", "--source", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "no Table 2 row" in capsys.readouterr().err


def test_trajectories_from_finished_table2_runs(tmp_path):
    src = tmp_path / "t2"
    reproduce("table2", src, iterations=4, seeds=2, algorithms=["cavia"], progress=False, overrides=TINY,
              log=lambda s: None)
    # the trajectories read runs of the default evaluation settings; these tiny runs have their own, so
    # they are found only when asked for with the same budget and overrides
    with pytest.raises(ConfigError, match="no Table 2 row"):
        trajectories(tmp_path / "tr", source=str(src), iterations=4, seeds=2, log=lambda s: None)
    rep = trajectories(tmp_path / "tr", source=str(src), iterations=4, seeds=2, overrides=TINY, log=lambda s: None)
    assert (tmp_path / "tr" / "trajectories_cavia.png").is_file() and (tmp_path / "tr" / "trajectories.md").is_file()
    assert [e["label"] for e in rep["rows"]] == ["CAVIA + p_C(0.001)", "CAVIA + p_R(1e-05, 2)"]
    e = rep["rows"][0]
    assert e["tested"] and e["seeds"] == [0, 1] and rep["family_size"] == 6
    # the late window is the evaluations after iteration 2: the one at iteration 4
    run = json.loads((src / "runs" / "cavia_pC_0.001" / "metrics.json").read_text())
    plain = json.loads((src / "runs" / "cavia" / "metrics.json").read_text())
    last = [h for h in run["val_history"] if h["iteration"] > 2]
    last_plain = [h for h in plain["val_history"] if h["iteration"] > 2]
    assert len(last) == 1
    d = [a["mse_mean"] - b["mse_mean"] for a, b in zip(last[0]["runs"], last_plain[0]["runs"])]
    assert e["mean"]["difference"] == pytest.approx(sum(d) / 2)


def test_trajectories_read_meta_sgd_rows_of_its_stable_setting(tmp_path):
    # the weight sweep trains Meta-SGD in its stable setting (three clamped inner steps); its Table 2
    # rows are found there, and the report says that they are not the paper's configuration
    src = tmp_path / "sweep"
    keys = ["metasgd", "metasgd_pC_0.1", "metasgd_pR_1e-05_r1"]
    reproduce("robustness", src, iterations=4, seeds=2, algorithms=["metasgd"], progress=False, overrides=TINY,
              only_rows=keys, log=lambda s: None)
    cfg = json.loads((src / "runs" / "metasgd" / "config.json").read_text())
    assert cfg["inner_steps"] == 3 and cfg["lr_clip"] == [0.0, 0.1]
    rep = trajectories(tmp_path / "tr", source=str(src), iterations=4, seeds=2, overrides=TINY, log=lambda s: None)
    assert rep["stable_setting_rows"] == keys
    assert [e["label"] for e in rep["rows"]] == ["Meta-SGD + p_C(0.1)", "Meta-SGD + p_R(1e-05, 1)"]
    assert "not the paper's configuration" in (tmp_path / "tr" / "trajectories.md").read_text()
    assert (tmp_path / "tr" / "trajectories_metasgd.png").is_file()
    # a run of another setting (here: one inner step) is not taken for either
    path = src / "runs" / "metasgd_pC_0.1" / "metrics.json"
    metrics = json.loads(path.read_text())
    path.write_text(json.dumps({**metrics, "config": {**metrics["config"], "inner_steps": 1}}))
    rep = trajectories(tmp_path / "tr2", source=str(src), iterations=4, seeds=2, overrides=TINY, log=lambda s: None)
    assert [e["label"] for e in rep["rows"]] == ["Meta-SGD + p_R(1e-05, 1)"]


def test_study_reuses_finished_runs_of_the_identical_configuration(tmp_path):
    # the weight sweep's Table 2 rows are the batch-size study's rows at B = 25 (the Table 2 batch)
    sweep = tmp_path / "sweep"
    keys = ["cavia", "cavia_pC_0.001", "cavia_pR_1e-05_r2"]
    reproduce("robustness", sweep, iterations=2, seeds=2, algorithms=["cavia"], progress=False, overrides=TINY,
              only_rows=keys, log=lambda s: None)
    with pytest.raises(ConfigError, match="no runs/ directory"):
        study("batch-size", tmp_path / "bad", iterations=2, seeds=2, algorithms=["cavia"], values=[25],
              progress=False, overrides=TINY, reuse=[str(tmp_path / "none")], log=lambda s: None)
    out = tmp_path / "bs"
    logged = []
    rep = study("batch-size", out, iterations=2, seeds=2, algorithms=["cavia"], values=[5, 25], progress=False,
                overrides=TINY, reuse=[str(sweep)], log=logged.append)
    assert rep["reused"] == {f"{k}_B25": str(sweep / "runs" / k) for k in keys}
    for k in keys:  # the same files, not retrained
        a, b = out / "runs" / f"{k}_B25" / "checkpoint.pt", sweep / "runs" / k / "checkpoint.pt"
        assert a.stat().st_ino == b.stat().st_ino
    assert not any("reused" in line for line in logged if "_B5" in line)
    by_key = {r["key"]: r for r in rep["rows"]}
    swept = json.loads((sweep / "robustness.json").read_text())
    plain = next(r for r in swept["rows"] if r["key"] == "cavia")
    assert by_key["cavia_B25"]["ours"]["mean"] == plain["ours"]["mean"]
    assert "reused, as finished runs of the identical configuration" in (out / "batch-size.md").read_text()
    # a run of another configuration is not taken: at B = 5 nothing matched, so those rows trained here
    assert (out / "runs" / "cavia_B5" / "checkpoint.pt").stat().st_nlink == 1
    # a later call without --reuse keeps the list
    again = study("batch-size", out, iterations=2, seeds=2, algorithms=["cavia"], values=[5, 25], progress=False,
                  overrides=TINY, log=lambda s: None)
    assert again["reused"] == rep["reused"]
    # a row whose run no longer is the source's file (here: rewritten) is no longer listed
    target = out / "runs" / "cavia_B25" / "metrics.json"
    content = target.read_text()
    target.unlink()
    target.write_text(content)
    fourth = study("batch-size", out, iterations=2, seeds=2, algorithms=["cavia"], values=[5, 25], progress=False,
                   overrides=TINY, log=lambda s: None)
    assert set(fourth["reused"]) == set(rep["reused"]) - {"cavia_B25"}
    target.unlink()
    os.link(sweep / "runs" / "cavia" / "metrics.json", target)
    # rows linked by hand (or by an earlier call) are recognised as reused by a call with --reuse
    (out / "batch-size.json").unlink()
    third = study("batch-size", out, iterations=2, seeds=2, algorithms=["cavia"], values=[5, 25], progress=False,
                  overrides=TINY, reuse=[str(sweep)], log=lambda s: None)
    assert third["reused"] == rep["reused"]
    assert main(["reproduce", "table2", "--reuse", str(sweep), "--out", str(tmp_path / "t2")]) == 2


def test_study_summary_puts_each_algorithms_report_side_by_side(tmp_path):
    src = tmp_path / "results"
    quiet = {"progress": False, "overrides": TINY, "log": lambda s: None, "seeds": 2}
    study("batch-size", src / "bs_cavia", iterations=2, algorithms=["cavia"], values=[5], **quiet)
    study("batch-size", src / "bs_maml", iterations=2, algorithms=["maml"], values=[5], **quiet)
    study("batch-size", src / "bs_cavia_3", iterations=3, algorithms=["cavia"], values=[5], **quiet)  # other budget
    rep = study_summary("batch-size", tmp_path / "sum", source=str(src), iterations=2, log=lambda s: None)
    assert list(rep["reports"]) == ["MAML", "CAVIA"]  # the paper's order
    assert [(r["algorithm"], r["variant"]) for r in rep["rows"]] == [
        ("MAML", "plain"), ("MAML", "p_C(0.1)"), ("MAML", "p_R(0.01, 2)"),
        ("CAVIA", "plain"), ("CAVIA", "p_C(0.001)"), ("CAVIA", "p_R(1e-05, 2)")]
    # each row keeps its own report's paired statistics (and Holm family)
    own = json.loads((src / "bs_cavia" / "batch-size.json").read_text())
    assert rep["rows"][3:] == own["rows"]
    md = (tmp_path / "sum" / "batch-size_summary.md").read_text()
    assert "`" + str(src / "bs_maml") + "`" in md and "bs_cavia_3" not in md
    assert (tmp_path / "sum" / "batch-size_summary.png").is_file()
    with pytest.raises(ConfigError, match="no step-size report"):
        study_summary("step-size", tmp_path / "s2", source=str(src), iterations=2, log=lambda s: None)
    (src / "copy").mkdir()
    (src / "copy" / "batch-size.json").write_text((src / "bs_cavia" / "batch-size.json").read_text())
    with pytest.raises(ConfigError, match="two batch-size reports of CAVIA"):
        study_summary("batch-size", tmp_path / "s3", source=str(src), iterations=2, log=lambda s: None)
    assert main(["reproduce", "batch-size-summary", "--source", str(src), "--out", str(tmp_path / "s4")]) == 2
