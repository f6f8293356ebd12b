"""The reproduction pipeline end to end on a tiny budget: files, schema, caching, extension."""
import json
import shutil

import pytest
import torch

from implicit_nash._compat import tree_leaves
from implicit_nash.cli import main
from implicit_nash.meta.config import ConfigError
from implicit_nash.meta.stats import mean_ci95, t_critical_95
from implicit_nash.reproduce import ROWSETS, paper_tables, reproduce
from implicit_nash.studies import sweep_summary

TINY = {"eval_every": 2, "val_tasks": 490, "test_tasks": 490}


def test_rowsets_match_the_paper():
    rows = ROWSETS["table2"]()
    assert len(rows) == 12
    labels = [r["label"] for r in rows]
    assert "MAML + p_R(0.01, 2)" in labels and "CAVIA + p_C(0.001)" in labels and "TR-MAML + p_R(0.01, 1)" in labels
    assert rows[0]["paper"]["mean"] == (0.59, 0.01)
    assert len(ROWSETS["robustness"]()) == len(paper_tables()["table5"]["rows"]) + len(paper_tables()["table6"]["rows"])
    assert len({r["key"] for r in ROWSETS["robustness"]()}) == len(ROWSETS["robustness"]())


def test_weight_sweeps_run_metasgd_in_its_stable_setting(tmp_path):
    # Table 2 keeps the paper's three unclamped inner steps (to show the divergence); the sweeps use
    # three with the learned steps clamped to [0, 0.1]
    steps = {r["key"]: r["options"].get("inner_steps") for r in ROWSETS["robustness"]()}
    assert {v for k, v in steps.items() if k.startswith("metasgd")} == {3}
    assert all(r["options"]["lr_clip"] == [0.0, 0.1] for r in ROWSETS["robustness"]() if r["algorithm"] == "metasgd")
    assert {v for k, v in steps.items() if not k.startswith("metasgd")} == {None}
    assert all("inner_steps" not in r["options"] for r in ROWSETS["table2"]())
    out = tmp_path / "rob"
    rep = reproduce("robustness", out, iterations=2, seeds=2, algorithms=["metasgd"], progress=False,
                    overrides=TINY, log=lambda s: None)
    assert rep["stable_settings"] == {"metasgd": {"inner_steps": 3, "lr_clip": [0.0, 0.1]}} and len(rep["rows"]) == 15
    cfg = json.loads((out / "runs" / "metasgd_pC_0.1" / "config.json").read_text())
    assert cfg["inner_steps"] == 3 and cfg["lr_clip"] == [0.0, 0.1]
    assert "Meta-SGD runs with three inner steps" in (out / "robustness.md").read_text()
    maml = reproduce("robustness", tmp_path / "maml", iterations=2, seeds=2, algorithms=["maml"], progress=False,
                     overrides=TINY, log=lambda s: None)
    assert maml["stable_settings"] == {} and "inner step" not in (tmp_path / "maml" / "robustness.md").read_text()


def test_reproduce_end_to_end_tiny_budget(tmp_path):
    out = tmp_path / "rep"
    rep = reproduce("table2", out, iterations=4, seeds=2, algorithms=["maml", "cavia"], progress=False,
                    overrides=TINY, log=lambda s: None)
    for name in ("table2.json", "table2.md", "table2.png"):
        assert (out / name).is_file()
    saved = json.loads((out / "table2.json").read_text())
    assert saved == json.loads(json.dumps(rep))
    assert saved["iterations"] == 4 and saved["seeds"] == [0, 1] and "4 iterations x 2 seeds" in saved["budget"]
    assert len(saved["rows"]) == 6
    for row in saved["rows"]:
        for m in ("mean", "worst", "std"):
            assert len(row["ours"][m]["values"]) == 2 and row["ours"][m]["ci"] > 0
            assert set(row["paper"][m]) == {"mean", "ci"}
        assert "vs_paper" in row["verdict"]
        assert ("vs_plain" in row["verdict"]) == (row["penalty"]["penalty"] != "none")
        assert ("paired" in row) == (row["penalty"]["penalty"] != "none")
    # the paired comparison: seed by seed and group by group against the plain row's own numbers
    maml = {r["key"]: r for r in saved["rows"] if r["group"] == "MAML"}
    pr = maml["maml_pC_0.1"]["paired"]
    assert pr["tested"] and pr["seeds"] == [0, 1] and pr["family_size"] == 8
    diffs = [a - b for a, b in zip(maml["maml_pC_0.1"]["ours"]["mean"]["values"], maml["maml"]["ours"]["mean"]["values"])]
    assert pr["mean"]["difference"] == pytest.approx(sum(diffs) / 2)
    assert pr["mean"]["groups"]["difference"] == pytest.approx(pr["mean"]["difference"])  # a mean of means
    assert pr["worst"]["groups"]["groups"] == 49                                        # hardest 10% of 490
    assert pr["mean"]["p_sign_flip"] >= 0.5                                             # 2 seeds: 4 patterns
    assert {pr[m]["verdict"] for m in ("mean", "worst")} <= {"better", "worse", "no detectable difference"}
    assert "verdict" not in pr["std"]
    md = (out / "table2.md").read_text()
    assert "Budget used: 4 iterations x 2 seeds" in md and "0.590 ± 0.010" in md
    assert "## Paired comparisons with the plain row" in md and "Holm family: 8 tests" in md
    # a second call finds every row finished and retrains nothing
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/checkpoint.pt")}
    again = reproduce("table2", out, iterations=4, seeds=2, algorithms=["maml", "cavia"], progress=False,
                      overrides=TINY, log=lambda s: None)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/checkpoint.pt")} == mtimes
    assert [r["ours"] for r in again["rows"]] == [r["ours"] for r in rep["rows"]]
    # --report-only rebuilds the outputs from the finished rows and trains nothing, not even missing rows
    only = reproduce("table2", out, iterations=4, seeds=2, algorithms=["maml", "cavia", "trmaml"], progress=False,
                     overrides=TINY, log=lambda s: None, report_only=True)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/checkpoint.pt")} == mtimes
    assert not (out / "runs" / "trmaml").exists()
    assert [r["ours"] for r in only["rows"] if "ours" in r] == [r["ours"] for r in rep["rows"]]
    assert sum("not finished" in r.get("failed", "") for r in only["rows"]) == 3
    assert "rebuilt from the finished runs without training" in (out / "table2.md").read_text()
    # asking for more iterations extends the finished rows from their checkpoints
    # (another budget would overwrite the report: refused without force)
    with pytest.raises(ConfigError, match="another budget and rows .*--force"):
        reproduce("table2", out, iterations=6, seeds=2, algorithms=["maml"], progress=False, overrides=TINY)
    longer = reproduce("table2", out, iterations=6, seeds=2, algorithms=["maml"], progress=False,
                       overrides=TINY, force=True, log=lambda s: None)
    assert all(r["iterations"] == 6 for r in longer["rows"])
    header = (out / "table2.md").read_text().splitlines()[0]
    assert "95% CI over 2 seeds (the paper: 5 trials)" in header


def test_reproduce_rejects_bad_requests(tmp_path, capsys):
    with pytest.raises(ConfigError, match="at least 2"):
        reproduce("table2", tmp_path, seeds=1, progress=False)
    with pytest.raises(ConfigError, match="unknown algorithm"):
        reproduce("table2", tmp_path, algorithms=["reptile"], progress=False)
    assert main(["reproduce", "table2", "--seeds", "1", "--out", str(tmp_path)]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_t_interval():
    assert t_critical_95(4) == 2.776
    r = mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    assert r["mean"] == 3.0 and r["ci"] == pytest.approx(2.776 * (2.5 / 5) ** 0.5)
    with pytest.raises(ValueError):
        t_critical_95(0)


def test_table3_pipeline_on_a_celeba_fixture(tmp_path):
    import numpy as np
    from PIL import Image
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    (root / "Eval").mkdir()
    lines = []
    for i in range(1, 9):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / "img_align_celeba" / f"{i}.jpg")
        lines.append(f"{i}.jpg {0 if i <= 5 else (1 if i <= 6 else 2)}")
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines))
    rows = ROWSETS["table4"]()
    assert {r["options"].get("filters") for r in rows if r["group"].startswith("CAVIA")} == {32, 128}
    with pytest.raises(ConfigError, match="needs --data-root"):
        reproduce("table3", tmp_path / "x", progress=False)
    rep = reproduce("table3", tmp_path / "t3", iterations=2, seeds=2, algorithms=["maml"], progress=False,
                    data_root=str(root), overrides={"image_size": 6, "shots": 5, "hidden": [8], "eval_every": 2,
                                                    "val_tasks": 1, "test_tasks": 2}, log=lambda s: None)
    assert rep["metric"] == "mse" and rep["scale"] == 100.0 and len(rep["rows"]) == 3
    assert "MSE x 1e-2" in (tmp_path / "t3" / "table3.md").read_text()


@pytest.mark.parametrize("inner_steps, same", [(1, True), (2, False)])
def test_one_inner_step_leaves_the_nash_penalties_without_effect(inner_steps, same):
    """Why Meta-SGD's stable setting cannot test Nash-GBML: p_C and p_R have zero gradient when every
    player is at theta, and one inner step starts (and ends its gradient evaluation) there, so the
    Nash rows train exactly as the plain one; from the second inner step on they differ."""
    from implicit_nash.meta.config import resolve
    from implicit_nash.meta.trainer import Run
    base = {"algorithm": "metasgd", "inner_steps": inner_steps, "dtype": "float64", "meta_batch": 5,
            "hidden": [8, 8], "seeds": [0, 1]}
    runs = [Run(resolve({**base, **pen})) for pen in ({}, {"penalty": "centroid", "weight": 0.1},
                                                      {"penalty": "robust", "weight": 0.01, "robustness": 1.0})]
    for _ in range(3):
        losses = [r.step() for r in runs]
    for other, loss in zip(runs[1:], losses[1:]):
        equal = all(torch.equal(a, b) for a, b in zip(tree_leaves(runs[0].theta), tree_leaves(other.theta)))
        assert equal == same and (loss == losses[0]) == same


def test_reproduce_only_some_rows(tmp_path, capsys):
    out = tmp_path / "rows"
    rep = reproduce("robustness", out, iterations=2, seeds=2, algorithms=["maml"], progress=False, overrides=TINY,
                    log=lambda s: None, only_rows=["maml_pR_0.01_r2", "maml"])
    assert [r["key"] for r in rep["rows"]] == ["maml", "maml_pR_0.01_r2"]  # the table's order
    # ... but trained in the order given
    assert ((out / "runs" / "maml_pR_0.01_r2" / "config.json").stat().st_mtime_ns
            < (out / "runs" / "maml" / "config.json").stat().st_mtime_ns)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["maml", "maml_pR_0.01_r2"]
    assert rep["rows"][1]["paired"]["family_size"] == 2
    assert rep["command"].endswith("--algorithms maml --rows maml maml_pR_0.01_r2")
    with pytest.raises(ConfigError, match="unknown row.*cavia.*choose from maml, maml_pC_0.1"):
        reproduce("robustness", out, iterations=2, seeds=2, algorithms=["maml"], only_rows=["cavia"])
    assert main(["reproduce", "step-size", "--rows", "maml", "--out", str(tmp_path / "s")]) == 2
    assert "--rows is for the tables" in capsys.readouterr().err
    # the four-algorithm summary reads the reports of one budget only, keeping each table's verdicts
    summary = sweep_summary(str(tmp_path / "sum"), source=str(tmp_path), iterations=2, log=lambda s: None)
    maml = summary["algorithms"]["MAML"]
    assert maml["finished"] == 2 and maml["family_size"] == 2 and maml["counts"]["robust"]["tested"] == 1
    assert maml["comparisons"][0]["paired"] == rep["rows"][1]["paired"]
    assert (tmp_path / "sum" / "sweep_summary.png").is_file()
    assert "Budget: 2 of the paper's 70,000 iterations" in (tmp_path / "sum" / "sweep_summary.md").read_text()
    with pytest.raises(ConfigError, match="no weight-sweep report .* of 3 iterations"):
        sweep_summary(str(tmp_path / "sum"), source=str(tmp_path), iterations=3)
    shutil.copytree(out, tmp_path / "rows_again", ignore=shutil.ignore_patterns("runs"))
    with pytest.raises(ConfigError, match="two weight-sweep reports of MAML at 2 iterations"):
        sweep_summary(str(tmp_path / "sum"), source=str(tmp_path), iterations=2)
    assert main(["reproduce", "sweep-summary", "--source", str(tmp_path)]) == 2
    assert "needs --iterations" in capsys.readouterr().err


def test_standin_tables_on_faces_and_digits(tmp_path):
    faces, digits = ROWSETS["faces"](), ROWSETS["digits"]()
    assert len(faces) == len(digits) == 9 and {r["group"] for r in digits} == {"MAML", "Meta-SGD", "CAVIA"}
    assert [r["key"] for r in faces] == [r["key"] for r in ROWSETS["table3"]()]  # Table 3's rows and weights
    pc = {r["group"]: r for r in digits if r["options"]["penalty"] == "centroid"}
    # Table 4's centroid weights for MAML and Meta-SGD diverge on digits: Table 2's weight instead
    assert pc["MAML"]["options"]["weight"] == pc["Meta-SGD"]["options"]["weight"] == 0.1
    assert pc["CAVIA"]["options"] == {"penalty": "centroid", "weight": 1000.0} and pc["CAVIA"]["key"] == "cavia_pC_1000"
    assert "Table 2's weight" in pc["MAML"]["label"]
    tiny = {"eval_every": 2, "val_tasks": 2, "test_tasks": 3}
    rep = reproduce("digits", tmp_path / "d", iterations=2, seeds=2, algorithms=["maml"], progress=False,
                    overrides={**tiny, "filters": 4}, log=lambda s: None)
    assert rep["metric"] == "accuracy" and rep["scale"] == 100.0 and rep["stands_in_for"] == "MiniImageNet"
    assert [r["key"] for r in rep["rows"]] == ["maml", "maml_pC_0.1", "maml_pR_0.1_r1"]
    assert all("paired" in r for r in rep["rows"][1:]) and "paired" not in rep["rows"][0]
    md = (tmp_path / "d" / "digits.md").read_text()
    assert md.startswith("# Stand-in for the paper's Table 4: digits") and "not the paper's experiment" in md
    assert "Not compared: the paper's numbers are for MiniImageNet" in md and "Budget used: 2 iterations x 2 seeds" in md
    assert "60,000 iterations" in md and (tmp_path / "d" / "digits.png").is_file()
    rep = reproduce("faces", tmp_path / "f", iterations=2, seeds=2, algorithms=["cavia"], progress=False,
                    overrides={**tiny, "hidden": [8]}, log=lambda s: None)
    assert rep["metric"] == "mse" and rep["stands_in_for"] == "CelebA" and len(rep["rows"]) == 3
    assert "LFW" in (tmp_path / "f" / "faces.md").read_text()
