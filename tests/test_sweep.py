"""Sweeps: grid expansion, the local backend, resuming an interrupted sweep, Ray where installed."""
import json

import pytest

from implicit_nash.cli import main
from implicit_nash.meta.config import ConfigError, resolve
from implicit_nash.meta.trainer import train
from implicit_nash.sweep import _key, expand, load_spec, sweep

FIXED = {"iterations": 4, "meta_batch": 3, "hidden": [8], "eval_every": 2, "checkpoint_every": 2,
         "val_tasks": 490, "test_tasks": 490, "inner_lr": 0.01, "dtype": "float64"}


def spec(**grid):
    return {"task": "sinusoid", "fixed": FIXED, "grid": grid}


def test_expand_drops_weights_of_plain_runs():
    runs = expand(spec(penalty=["none", "centroid"], weight=[0.1, 0.01], seed=[0, 1]))
    assert len(runs) == 2 + 4  # plain once per seed, centroid per weight and seed
    assert all("weight" not in r for r in runs if r["penalty"] == "none")


def test_local_sweep_resumes_without_redoing_finished_runs(tmp_path, capsys):
    s = spec(algorithm=["maml", "fomaml"], seed=[0])
    out = tmp_path / "sw"
    # an interrupted sweep: one run finished, the other killed half-way
    runs = expand(s)
    done_cfg = resolve({"task": "sinusoid", "threads": 1, **FIXED, **runs[0]})
    train(done_cfg, out / "runs" / _key(runs[0]), progress=False, log=lambda m: None)
    half_cfg = resolve({"task": "sinusoid", "threads": 1, **FIXED, **runs[1]})
    train(half_cfg, out / "runs" / _key(runs[1]), progress=False, stop_after=2, log=lambda m: None)
    finished = (out / "runs" / _key(runs[0]) / "checkpoint.pt").stat().st_mtime_ns
    report = sweep(s, out, log=lambda m: None)
    assert (out / "runs" / _key(runs[0]) / "checkpoint.pt").stat().st_mtime_ns == finished  # not redone
    assert all(r["iterations"] == 4 for r in report["runs"])
    # the resumed run ends where an uninterrupted one does
    fresh = train(half_cfg, tmp_path / "fresh", progress=False, log=lambda m: None)
    resumed = next(r for r in report["runs"] if r["algorithm"] == "fomaml")
    assert resumed["mean"] == fresh["test_mse_mean"]
    for name in ("sweep.json", "sweep.md", "sweep.png"):
        assert (out / name).is_file()
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(s))
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    assert f"Command: `implicit-nash sweep {path} --out {out}`" in (out / "sweep.md").read_text()
    other = tmp_path / "other.json"
    other.write_text(json.dumps(spec(algorithm=["maml"], seed=[1])))
    assert main(["sweep", str(other), "--out", str(out)]) == 2
    assert "another spec" in capsys.readouterr().err
    assert load_spec(str(path))["grid"] == s["grid"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"grid": {"seed": []}}))
    with pytest.raises(ConfigError, match="non-empty list"):
        load_spec(str(bad))


def test_sweep_reports_validation_and_divergence_and_takes_list_values(tmp_path):
    """List-valued options (Meta-SGD's lr_init) make readable keys; the table reports the final
    validation value (to compare settings on) and how many seeds diverged."""
    s = {"task": "sinusoid", "fixed": {**FIXED, "algorithm": "metasgd", "seeds": [0, 1]},
         "grid": {"lr_init": [None, [0.005, 0.1]]}}
    assert [_key(r) for r in expand(s)] == ["lr_init=None", "lr_init=0.005-0.1"]
    report = sweep(s, tmp_path / "sw", log=lambda m: None)
    for row in report["runs"]:
        run = json.loads((tmp_path / "sw" / "runs" / row["key"] / "metrics.json").read_text())
        last = run["val_history"][-1]["runs"]
        assert row["val_mean"] == pytest.approx(sum(r["mse_mean"] for r in last) / 2)
        assert row["diverged_seeds"] == [] and row["seeds"] == 2
    assert report["runs"][0]["val_mean"] != report["runs"][1]["val_mean"]  # the initialisation matters
    table = (tmp_path / "sw" / "sweep.md").read_text()
    assert "| diverged seeds | val |" in table and "0 of 2" in table
    header, rule = table.splitlines()[6:8]
    assert header.count("|") == rule.count("|")  # a well-formed Markdown table


def test_ray_backend_equals_the_local_backend(tmp_path):
    """A local Ray instance, started and shut down here, runs the same sweep to the same numbers."""
    ray = pytest.importorskip("ray")
    s = spec(algorithm=["maml", "fomaml"], seed=[0])
    local = sweep(s, tmp_path / "local", log=lambda m: None)
    assert not ray.is_initialized()
    try:
        remote = sweep(s, tmp_path / "ray", backend="ray", log=lambda m: None)
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    assert remote["backend"] == "ray" and len(remote["runs"]) == 2
    for a, b in zip(local["runs"], remote["runs"]):
        assert "failed" not in b, b.get("failed")
        assert a["key"] == b["key"] and b["iterations"] == 4
        for stat in ("mean", "worst", "std", "val_mean"):
            assert a[stat] == b[stat], (a["key"], stat)
