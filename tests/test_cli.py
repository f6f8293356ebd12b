"""The command line's habits: continuing finished runs, one-line errors for damaged files, options
that do nothing are refused, no litter after a failed start, help that shows defaults, evaluate's
file, and outputs that never land on committed results by default."""
import argparse
import json

import pytest

from implicit_nash.cli import build_parser, main
from implicit_nash.meta.config import resolve
from implicit_nash.meta.trainer import train

FAST = ["--meta-batch", "3", "--eval-every", "2", "--checkpoint-every", "2", "--val-tasks", "490",
        "--test-tasks", "490", "--inner-lr", "0.01", "--dtype", "float64", "--no-progress"]


def _train(out, *extra, iterations=2):
    return main(["train", "sinusoid", "--iterations", str(iterations), *FAST, *extra, "--out", str(out)])


def test_resume_continues_a_finished_run_to_more_iterations(tmp_path, capsys):
    assert _train(tmp_path / "run") == 0
    assert main(["train", "sinusoid", "--out", str(tmp_path / "run"), "--resume", "--iterations", "4",
                 "--no-progress"]) == 0
    continued = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert _train(tmp_path / "straight", iterations=4) == 0
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert continued["iterations"] == 4 and continued["test_mse_mean"] == straight["test_mse_mean"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["iterations"] == 4
    capsys.readouterr()
    assert main(["train", "sinusoid", "--out", str(tmp_path / "run"), "--resume", "--iterations", "3"]) == 2
    assert "already run 4 iterations" in capsys.readouterr().err
    assert main(["train", "sinusoid", "--out", str(tmp_path / "run"), "--resume", "--inner-lr", "0.1"]) == 2
    assert "drop --inner-lr" in capsys.readouterr().err


def test_damaged_checkpoint_and_progress_files(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run) == 0
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # truncated
    capsys.readouterr()
    for argv in (["train", "sinusoid", "--out", str(run), "--resume"], ["evaluate", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert str(ckpt) in err and "cannot be read" in err and "delete" in err
    # a garbled progress.json is named, and rewritten on resume
    assert _train(tmp_path / "other") == 0
    (tmp_path / "other" / "progress.json").write_text("{garbled")
    capsys.readouterr()
    assert main(["train", "sinusoid", "--out", str(tmp_path / "other"), "--resume", "--iterations", "4",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "progress.json is garbled" in out
    assert json.loads((tmp_path / "other" / "progress.json").read_text()) == {"iteration": 4, "total": 4}


@pytest.mark.parametrize("options, message", [
    (["--data-root", "somewhere"], "--data-root is used only by the celeba and miniimagenet tasks"),
    (["--ways", "7"], "--ways is used only by the classification tasks"),
    (["--filters", "8"], "--filters is used only by the classification tasks"),
    (["--context-dim", "3"], "--context-dim is used only by --algorithm cavia"),
    (["--robustness", "2"], "--robustness is used only by --penalty robust"),
    (["--penalty", "robust", "--weight", "0.1", "--num-tasks", "5"], "--num-tasks is used only by --penalty centroid"),
])
def test_options_that_the_run_does_not_use_are_refused(tmp_path, capsys, options, message):
    assert _train(tmp_path / "run", *options) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_no_directory_and_data_root_names_a_file(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    for root, message in ((tmp_path / "missing", "does not exist"), (a_file, "is a file")):
        out = tmp_path / "run"
        assert main(["train", "miniimagenet", "--data-root", str(root), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()


def test_proximal_penalty_trains(tmp_path):
    assert _train(tmp_path / "run", "--penalty", "proximal", "--weight", "0.5") == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["penalty"] == "proximal"
    assert _train(tmp_path / "bad", "--penalty", "proximal", "--weight", "0") == 2


def _actions(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((name, a) for a in sub._actions)


def test_help_explains_every_option_and_its_default(capsys):
    parser = build_parser()
    for command, action in _actions(parser):
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.dest} has no help text"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "inner learning rate alpha (default by task: sinusoid 0.001" in text and "(the paper's)" in text
    assert "{none,centroid,robust,proximal}" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["reproduce", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 5)" in text and "(default: 1)" in text


def test_evaluate_writes_evaluation_json_with_the_keys_of_metrics_json(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--seeds", "0", "1") == 0
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    assert "evaluation.json" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    evaluation = json.loads((run / "evaluation.json").read_text())
    shared = [k for k in metrics if k.startswith(("test_", "baseline_"))]
    assert "test_mse_mean" in shared and "baseline_unadapted_mse_mean" in shared and "test_mse_mean_ci95" in shared
    for key in shared:
        assert evaluation[key] == pytest.approx(metrics[key], rel=1e-12), key
    assert [set(r) for r in evaluation["runs"]] == [set(r) for r in metrics["runs"]]
    assert main(["evaluate", str(run), "--split", "val"]) == 0
    assert "val_mse_mean" in json.loads((run / "evaluation_val.json").read_text())


def test_resume_of_another_configuration_says_what_to_do(tmp_path):
    from implicit_nash.meta.config import ConfigError
    tiny = {"iterations": 2, "meta_batch": 3, "hidden": [8], "val_tasks": 490, "test_tasks": 490,
            "dtype": "float64"}
    train(resolve(tiny), tmp_path / "run", progress=False, log=lambda s: None)
    with pytest.raises(ConfigError) as e:
        train(resolve({**tiny, "inner_lr": 0.5}), tmp_path / "run", resume=True, progress=False)
    assert "differs in inner_lr" in str(e.value) and "without options" not in str(e.value)
