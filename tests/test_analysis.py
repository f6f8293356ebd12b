"""`implicit-nash verify --quick`: every check runs, writes its record and figure, and the theory's
predictions hold where the paper's assumptions do (and the robust penalty's assumptions fail)."""
import json

import pytest

from implicit_nash.cli import main

EXPECTED = {
    "prgd_rate": "holds", "iteration_complexity": "holds", "memory": "holds", "hypergradient_error": "holds",
    "order_independence": "holds", "outer_convergence": "holds", "lemma_b4": "holds",
    "assumptions": "assumption fails",
}


@pytest.mark.slow  # all eight checks: about 3 minutes
def test_verify_quick(tmp_path, capsys):
    assert main(["verify", "--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.html").is_file()
    for check, verdict in EXPECTED.items():
        record = json.loads((tmp_path / f"{check}.json").read_text())
        assert record["verdict"] == verdict, (check, record["explanation"])
        assert (tmp_path / record["figure"]).is_file()
        assert record["measured"] and record["predicted"] and record["explanation"]
        assert f"(#{check})" in report
    rate = json.loads((tmp_path / "prgd_rate.json").read_text())["measured"]
    assert rate["max_error_over_bound"] <= 1 + 1e-9
    assumptions = json.loads((tmp_path / "assumptions.json").read_text())["measured"]
    assert assumptions["p_C_symmetric"] and assumptions["p_R_asymmetric"]
    assert -1.1 < assumptions["robust_gradient_slope"] < -0.9
    # Re-running one check rebuilds the report from every record on disk and says so.
    before = json.loads((tmp_path / "lemma_b4.json").read_text())
    assert main(["verify", "--check", "lemma_b4", "--quick", "--out", str(tmp_path)]) == 2  # records there
    assert "--force" in capsys.readouterr().err
    assert main(["verify", "--check", "lemma_b4", "--quick", "--out", str(tmp_path), "--force"]) == 0
    rebuilt = (tmp_path / "report.md").read_text()
    assert "re-ran lemma_b4" in rebuilt and all(f"(#{check})" in rebuilt for check in EXPECTED)
    assert json.loads((tmp_path / "lemma_b4.json").read_text())["measured"] == before["measured"]


def test_verify_writes_a_new_folder_under_runs_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["verify", "--quick", "--check", "lemma_b4"]) == 0
    assert main(["verify", "--quick", "--check", "lemma_b4"]) == 0
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f.startswith("analysis_quick-") for f in folders)
    assert not (tmp_path / "results").exists()


def test_verify_rejects_unknown_check(capsys):
    assert main(["verify", "--check", "nope"]) == 2
    assert "unknown check" in capsys.readouterr().err
