"""``implicit-nash demo``, the README's first command: every part runs and reports where it wrote."""
import json

import pytest

from implicit_nash.cli import main


def test_layer_only(capsys):
    assert main(["demo", "--layer-only"]) == 0
    assert "relative error against the dense -P^-1 Q solve" in capsys.readouterr().out


@pytest.mark.slow  # the quick theory checks and three rows in two spawned processes: ~30 s CPU
def test_demo_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--iterations", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "check: PASSED" in printed and str(out / "summary.md") in printed
    summary = (out / "summary.md").read_text()
    assert "| MAML + p_R(0.01, 2) |" in summary and "4 meta-iterations" in summary
    assert (out / "maml_vs_nash.png").is_file() and (out / "theory" / "report.md").is_file()
    metrics = json.loads((out / "maml_vs_nash" / "runs" / "maml_pC_0.1" / "metrics.json").read_text())
    assert metrics["iterations"] == 4 and metrics["seeds"] == [0, 1, 2]
    assert main(["demo", "--iterations", "4", "--out", str(out)]) == 2  # not into a used folder
    assert "not empty" in capsys.readouterr().err
