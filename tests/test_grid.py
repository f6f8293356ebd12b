"""A grid of configurations trained in one vmap equals its members trained separately (float64)."""
import json

import pytest
import torch

from implicit_nash._compat import tree_leaves
from implicit_nash.meta.config import ConfigError, resolve
from implicit_nash.meta.grid import GridRun, grid_groups, train_grid
from implicit_nash.meta.trainer import Run, train
from implicit_nash.reproduce import grid_jobs, run_rows

SMALL = {"dtype": "float64", "meta_batch": 5, "hidden": [8, 8], "seeds": [0, 1]}
TINY = {"eval_every": 2, "val_tasks": 490, "test_tasks": 490, "checkpoint_every": 2}


def _configs(algorithm, extra=None):
    base = {**SMALL, "algorithm": algorithm, **(extra or {})}
    weights = {"cavia": (0.001, 1e-5), "trmaml": (0.01, 0.01)}.get(algorithm, (0.1, 0.01))
    return [resolve(base), resolve({**base, "penalty": "centroid", "weight": weights[0]}),
            resolve({**base, "penalty": "robust", "weight": weights[1], "robustness": 2.0}),
            resolve({**base, "inner_lr": 0.01}),
            resolve({**base, "penalty": "centroid", "weight": weights[0], "inner_lr": 0.003})]


def _same(a, b):
    for x, y in zip(tree_leaves(a), tree_leaves(b)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0)


@pytest.mark.parametrize("algorithm, extra", [("maml", None), ("cavia", None), ("trmaml", None),
                                              ("metasgd", {"inner_steps": 1}),
                                              ("metasgd", {"inner_steps": 3, "lr_clip": [0.0, 0.1]})])
def test_grid_steps_equal_separate_runs(algorithm, extra):
    configs = _configs(algorithm, extra)
    separate = [Run(c) for c in configs]
    grid = GridRun([Run(c) for c in configs])
    assert grid.runs == 10 and grid.vectorised
    for _ in range(3):
        expected = [v for r in separate for v in r.step()]
        found = grid.step()
        torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), rtol=1e-12, atol=0)
    for k, r in enumerate(separate):
        m = grid.member(k)
        _same(r.theta, m.theta)
        _same(r.state, m.state)
        for name in ("exp_avg", "exp_avg_sq"):
            for i, entry in r.optimizer.state_dict()["state"].items():
                torch.testing.assert_close(entry[name], m.optimizer.state_dict()["state"][i][name], rtol=1e-12, atol=0)


def test_zero_weight_is_exactly_the_plain_algorithm():
    """p_R and p_C at weight 0 add an exact zero: the plain member of a grid is the plain algorithm."""
    base = {**SMALL, "algorithm": "maml"}
    plain, robust0, centroid0 = (Run(resolve(base)), Run(resolve({**base, "penalty": "robust", "weight": 0.0,
                                                                  "robustness": 2.0})),
                                 Run(resolve({**base, "penalty": "centroid", "weight": 0.0})))
    for _ in range(3):
        losses = [r.step() for r in (plain, robust0, centroid0)]
        assert losses[0] == losses[1] == losses[2]
    for other in (robust0, centroid0):
        for x, y in zip(tree_leaves(plain.theta), tree_leaves(other.theta)):
            assert torch.equal(x, y)


def test_train_grid_writes_the_members_runs_and_resumes(tmp_path):
    configs = [resolve({**c, **TINY, "iterations": 4}) for c in _configs("cavia")[:3]]
    alone = [train(c, str(tmp_path / f"alone{k}"), progress=False, log=lambda s: None) for k, c in enumerate(configs)]
    dirs = [str(tmp_path / f"grid{k}") for k in range(3)]
    assert train_grid(configs, dirs, stop_after=2) == [{"stopped_at": 2}] * 3  # killed after 2, then resumed
    metrics = train_grid(configs, dirs)
    for a, m, d in zip(alone, metrics, dirs):
        assert m["trained_in_grid"] == 3 and m["iterations"] == 4
        assert json.loads((tmp_path / d / "metrics.json").read_text())["test_mse_mean"] == m["test_mse_mean"]
        for key in ("test_mse_mean", "test_mse_worst", "test_mse_std"):
            assert m[key] == pytest.approx(a[key], rel=1e-10, abs=0)
        for ra, rm in zip(a["runs"], m["runs"]):
            assert ra["seed"] == rm["seed"]
            assert rm["per_group"] == pytest.approx(ra["per_group"], rel=1e-10)
        assert [v["iteration"] for v in m["val_history"]] == [2, 4]
    # a member extends alone from the checkpoint the grid wrote
    more = train(None, dirs[0], resume=True, iterations=6, progress=False, log=lambda s: None)
    assert more["iterations"] == 6


def test_grid_groups_and_jobs():
    base = {"algorithm": "cavia", "seeds": [0, 1]}
    configs = {"plain": resolve(base), "pc": resolve({**base, "penalty": "centroid", "weight": 0.1}),
               "r1": resolve({**base, "penalty": "robust", "weight": 0.01}),
               "r2": resolve({**base, "penalty": "robust", "weight": 0.01, "robustness": 2.0}),
               "a": resolve({**base, "inner_lr": 0.01}), "b10": resolve({**base, "meta_batch": 10}),
               "maml": resolve({"algorithm": "maml", "seeds": [0, 1]}),
               "maml_pc": resolve({"algorithm": "maml", "seeds": [0, 1], "penalty": "centroid", "weight": 0.1})}
    groups = sorted(map(sorted, grid_groups(configs)))
    assert groups == sorted([["a", "pc", "plain", "r1"], ["r2"], ["b10"], ["maml", "maml_pc"]])
    assert sorted(map(sorted, grid_jobs(configs, "on"))) == groups
    # auto: a grid only where it measured faster (CAVIA), MAML's rows one by one
    assert sorted(map(sorted, grid_jobs(configs, "auto"))) == sorted(
        [["a", "pc", "plain", "r1"], ["r2"], ["b10"], ["maml"], ["maml_pc"]])
    assert grid_jobs(configs, "off") == [[k] for k in configs]
    with pytest.raises(ConfigError, match="--grid must be"):
        grid_jobs(configs, "sometimes")


def test_grid_refuses_what_it_cannot_hold():
    base = {**SMALL, "algorithm": "maml"}
    with pytest.raises(ConfigError, match="may differ only"):
        GridRun([Run(resolve(base)), Run(resolve({**base, "meta_batch": 6}))])
    with pytest.raises(ConfigError, match="two configurations"):
        GridRun([Run(resolve(base))])


def test_run_rows_with_grid_on_equals_off(tmp_path):
    configs = {f"row{k}": resolve({**c, **TINY, "iterations": 2}) for k, c in enumerate(_configs("cavia")[:3])}
    on, fail_on = run_rows(configs, tmp_path / "on", progress=False, grid="on")
    off, fail_off = run_rows(configs, tmp_path / "off", progress=False, grid="off")
    assert not fail_on and not fail_off
    for k in configs:
        assert on[k]["trained_in_grid"] == 3 and "trained_in_grid" not in off[k]
        assert on[k]["test_mse_mean"] == pytest.approx(off[k]["test_mse_mean"], rel=1e-10)
    again, _ = run_rows(configs, tmp_path / "on", progress=False, grid="on")  # cached
    assert again == on


def test_step_size_study_trains_one_grid_per_algorithm(tmp_path):
    from implicit_nash.cli import main
    out = tmp_path / "ss"
    assert main(["reproduce", "step-size", "--algorithms", "cavia", "--values", "0.001", "0.01", "--iterations", "2",
                 "--seeds", "2", "--eval-every", "2", "--val-tasks", "490", "--test-tasks", "490", "--no-progress",
                 "--grid", "on", "--out", str(out)]) == 0
    rep = json.loads((out / "step-size.json").read_text())
    assert len(rep["rows"]) == 6
    for r in rep["rows"]:  # plain, p_C and p_R at both step sizes: one grid of 6 rows x 2 seeds
        assert json.loads((out / "runs" / r["key"] / "metrics.json").read_text())["trained_in_grid"] == 6
