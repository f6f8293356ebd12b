"""The meta-trainer, its configuration and the command line."""
import json
import math

import pytest
import torch

from implicit_nash.cli import main
from implicit_nash.meta.config import ConfigError, build_algorithm, resolve
from implicit_nash.meta.trainer import evaluate_run, train
from implicit_nash.tasks import mlp

TINY = {"iterations": 6, "meta_batch": 3, "hidden": [8], "eval_every": 3, "checkpoint_every": 2,
        "val_tasks": 490, "test_tasks": 490, "inner_lr": 0.01, "outer_lr": 0.01, "dtype": "float64"}


def tiny(**kw):
    return resolve({**TINY, **kw})


@pytest.mark.parametrize("algorithm, extra", [
    ("maml", {"penalty": "centroid", "weight": 0.1}),
    ("metasgd", {"penalty": "robust", "weight": 0.01, "robustness": 2.0}),
    ("trmaml", {}),
    ("cavia", {}),
])
def test_resume_equals_an_uninterrupted_run(tmp_path, algorithm, extra):
    config = tiny(algorithm=algorithm, **extra)
    full = train(config, tmp_path / "full", progress=False, log=lambda s: None)
    stopped = train(config, tmp_path / "resumed", progress=False, stop_after=3, log=lambda s: None)
    assert stopped == {"stopped_at": 3}
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = train({}, tmp_path / "resumed", resume=True, progress=False, log=lambda s: None)
    for key in ("test_mse_mean", "test_mse_worst", "test_mse_std", "final_train_loss", "iterations"):
        assert resumed[key] == full[key], key
    assert resumed["val_history"] == full["val_history"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["theta"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["theta"]
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k])


@pytest.mark.parametrize("algorithm, extra", [
    ("maml", {"penalty": "robust", "weight": 0.01, "robustness": 2.0}),
    ("trmaml", {"penalty": "centroid", "weight": 0.1}),
    ("metasgd", {}),
])
def test_runs_trained_together_equal_runs_trained_alone(tmp_path, algorithm, extra):
    """Vectorising over seeds (vmap over stacked parameters, one Adam) changes nothing per run."""
    config = tiny(algorithm=algorithm, iterations=4, **extra)
    together = train({**config, "seeds": [0, 5]}, tmp_path / "both", progress=False, log=lambda s: None)
    assert together["vectorised_over_runs"] and together["runs_trained_together"] == 2
    for r, seed in enumerate([0, 5]):
        alone = train({**config, "seed": seed}, tmp_path / f"s{seed}", progress=False, log=lambda s: None)
        mine = together["runs"][r]
        assert mine["seed"] == seed
        for key in ("test_mse_mean", "test_mse_worst", "test_mse_std", "final_train_loss"):
            assert mine[key] == pytest.approx(alone[key], rel=1e-9), key
    assert together["test_mse_mean"] == pytest.approx(
        (together["runs"][0]["test_mse_mean"] + together["runs"][1]["test_mse_mean"]) / 2)
    assert together["test_mse_mean_ci95"] > 0


def test_resume_can_extend_a_finished_run(tmp_path):
    short = tiny(iterations=3)
    train(short, tmp_path / "ext", progress=False, log=lambda s: None)
    (tmp_path / "ext" / "metrics.json").unlink()
    extended = train(tiny(iterations=6), tmp_path / "ext", resume=True, progress=False, log=lambda s: None)
    full = train(tiny(iterations=6), tmp_path / "full", progress=False, log=lambda s: None)
    assert extended["test_mse_mean"] == full["test_mse_mean"]
    with pytest.raises(ConfigError, match="another configuration"):
        train(tiny(iterations=9, seed=3), tmp_path / "ext", resume=True, progress=False)


def test_outputs_and_evaluate(tmp_path):
    config = tiny()
    metrics = train(config, tmp_path / "run", progress=False, log=lambda s: None)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "metrics.json", "checkpoint.pt", "curves.png"} <= files
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("test_mse_mean", "test_mse_worst", "test_mse_std", "sec_per_iteration", "iterations", "config"):
        assert key in saved
    assert saved["iterations"] == 6 and saved["config"]["algorithm"] == "maml"
    assert saved["test_mse_worst"] >= saved["test_mse_mean"] > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == config
    again = evaluate_run(tmp_path / "run")
    assert again["test_mse_mean"] == pytest.approx(metrics["test_mse_mean"], rel=1e-12)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config, tmp_path / "run", progress=False)


def test_a_run_does_not_depend_on_the_process_default_dtype(tmp_path):
    """Ray workers and the command line start with float32 as torch's default dtype, the tests with
    float64: a float64 run (and a float32 one) must not notice."""
    for dtype in ("float64", "float32"):
        config = tiny(iterations=2, dtype=dtype, algorithm="metasgd")
        results = []
        for default in (torch.float32, torch.float64):
            torch.set_default_dtype(default)
            results.append(train(config, tmp_path / f"{dtype}_{default}", progress=False, log=lambda s: None))
        assert results[0]["test_mse_mean"] == results[1]["test_mse_mean"], dtype


def test_curves_of_a_short_run_are_labelled_for_what_they_show(tmp_path, monkeypatch):
    import matplotlib.figure
    seen = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        seen.append([t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
                    + [ax.get_title() for ax in fig.axes])
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    train(tiny(iterations=4, eval_every=4), tmp_path / "short", progress=False, log=lambda s: None)
    texts = " | ".join(seen[-1])
    assert "moving mean" not in texts and "mean of the 4 iterations" in texts
    assert "1 validation in this run" in texts
    assert (tmp_path / "short" / "curves.png").is_file()


def test_penalty_scale_decisions():
    algo = build_algorithm(tiny(penalty="centroid", weight=0.1), 100)
    assert algo.penalty.num_tasks == 100 and algo.penalty.inner_lr == 0.01
    algo = build_algorithm(tiny(algorithm="metasgd", penalty="centroid", weight=0.1), 100)
    assert algo.penalty.inner_lr == 0.05  # Appendix E
    algo = build_algorithm(tiny(penalty="robust", weight=0.1, robustness=2.0), 100)
    assert algo.penalty.robustness == 2.0 and algo.penalty.scale == 1.0
    assert build_algorithm(tiny(algorithm="imaml"), 100).throw is False


def test_metasgd_step_sizes_drawn_per_seed_within_lr_init():
    """``lr_init: [lo, hi]`` draws every step size uniformly in [lo, hi), reproducibly per seed;
    without it every step size is the inner learning rate."""
    algo = build_algorithm(tiny(algorithm="metasgd", lr_init=[0.005, 0.1]), 100)
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        theta = algo.init(mlp([1, 8, 1]))
        draws.append(torch.cat([v.detach().reshape(-1) for v in theta["lr"].values()]))
    assert all(float(d.min()) >= 0.005 and float(d.max()) < 0.1 for d in draws)
    assert float(draws[0].std()) > 0.01  # spread over the interval, not a constant
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    plain = build_algorithm(tiny(algorithm="metasgd"), 100).init(mlp([1, 8, 1]))
    assert all(torch.all(v == 0.01) for v in plain["lr"].values())


@pytest.mark.parametrize("options, message", [
    ({"penalty": "centroid"}, "needs --weight"),
    ({"weight": 0.1}, "--penalty is none"),
    ({"algorithm": "reptile"}, "unknown algorithm"),
    ({"inner_steps": 0}, "inner_steps must be positive"),
    ({"robustness": 0.5, "penalty": "robust", "weight": 0.1}, "robustness must be >= 1"),
    ({"algorithm": "fomaml", "meta_gradient": "unrolled"}, "fomaml is MAML"),
    ({"bogus": 1}, "unknown option key"),
    ({"test_tasks": 100}, "at least 490"),
    ({"lr_init": [0.005, 0.1]}, "maml has none"),
    ({"algorithm": "metasgd", "lr_init": [0.1, 0.005]}, "lr_init must be"),
    ({"algorithm": "metasgd", "lr_init": [0.1]}, "lr_init must be"),
    ({"lr_clip": [0.0, 0.1]}, "maml has none"),
    ({"algorithm": "metasgd", "lr_clip": [-0.1, 0.1]}, "lr_clip must be"),
    ({"algorithm": "metasgd", "lr_clip": [0.1, float("inf")]}, "lr_clip must be"),
])
def test_bad_configurations_are_rejected(options, message):
    with pytest.raises(ConfigError, match=message):
        resolve({**TINY, **options})


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "sinusoid", "--penalty", "robust", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs --weight" in err and "Traceback" not in err
    assert main(["train", "sinusoid", "--out", str(tmp_path / "y"), "--resume"]) == 2
    assert "does not exist" in capsys.readouterr().err
    cfg = tmp_path / "c.json"
    cfg.write_text("{not json")
    assert main(["train", "sinusoid", "--config", str(cfg), "--out", str(tmp_path / "z")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "sinusoid", "--algorithm", "nope", "--out", "o"])
    assert e.value.code == 2


def test_cli_train_with_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**TINY, "iterations": 2, "algorithm": "fomaml"}))
    out = tmp_path / "run"
    assert main(["train", "sinusoid", "--config", str(cfg), "--iterations", "3", "--out", str(out),
                 "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["iterations"] == 3  # the command line overrides the file
    assert json.loads((out / "config.json").read_text())["algorithm"] == "fomaml"
    assert main(["evaluate", str(out)]) == 0


def test_a_diverging_seed_is_recorded_and_does_not_disturb_the_others():
    from implicit_nash.meta.trainer import Run
    config = tiny(seeds=[0, 5], penalty="centroid", weight=0.1)
    both = Run(config)
    with torch.no_grad():  # seed 5's run blows up
        next(iter(both.theta["params"].values()))[1].fill_(float("inf"))
    alone = Run(tiny(seed=0, penalty="centroid", weight=0.1))
    for _ in range(3):
        losses = both.step()
        alone.step()
    assert both.diverged == {5: 1} and not math.isfinite(losses[1])
    for k, v in alone.theta["params"].items():
        assert torch.allclose(both.theta["params"][k][0], v, rtol=1e-12, atol=1e-14)
    every = Run(tiny(seeds=[0, 1]))
    with torch.no_grad():
        for v in every.theta["params"].values():
            v.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="every seed"):
        every.step()


def test_a_finite_blow_up_is_flagged_with_its_iteration():
    from implicit_nash.meta.trainer import Run
    run = Run(tiny(seeds=[0, 1]))
    for it, losses in enumerate(([1.0, 2.0], [5.0, 3.0], [900.0, 1e3], [5e20, 4.0]), start=1):
        run.iteration = it
        run.record(losses)
    assert run.history["blowups"] == {"0": {"iteration": 4, "loss": 5e20, "initial_loss": 1.0}}


def test_budgeted_imaml_reports_its_measured_meta_gradient_error(tmp_path):
    base = dict(algorithm="imaml", activation="tanh", hypergrad_check_every=2, iterations=4, eval_every=4)
    loose = train(tiny(inner_budget=1, cg_budget=1, **base), tmp_path / "loose", progress=False, log=lambda s: None)
    tight = train(tiny(inner_budget=8, cg_budget=40, **base), tmp_path / "tight", progress=False, log=lambda s: None)
    for m in (loose, tight):
        h = m["hypergradient_error"]
        assert h["checks"] == 2 and h["reference_not_converged"] == 0 and m["not_converged_solves"] == 0
        assert m["blown_up_seeds"] == {}
    assert loose["hypergradient_error"]["relative_median"] > 1e-3
    assert tight["hypergradient_error"]["relative_max"] < 1e-8 and tight["hypergradient_error"]["inner_error_max"] < 1e-8
    with pytest.raises(ConfigError, match="inner_budget"):
        tiny(algorithm="maml", inner_budget=3)


def test_imaml_inner_mode_auto_is_budgeted_with_relu_and_tolerance_with_tanh():
    from implicit_nash.meta.config import BUDGET_DEFAULTS, upgrade
    relu = tiny(algorithm="imaml")
    assert relu["inner_mode"] == "budgeted" and relu["activation"] == "relu"
    assert {k: relu[k] for k in BUDGET_DEFAULTS} == BUDGET_DEFAULTS
    algo = build_algorithm(relu, 10)
    assert algo.budgeted and algo.budget == 2 and algo.cg_budget == 5 and algo.newton.krylov_steps == 3
    tanh = tiny(algorithm="imaml", activation="tanh")
    assert tanh["inner_mode"] == "tolerance" and tanh["inner_budget"] is None and tanh["krylov_steps"] == 20
    assert not build_algorithm(tanh, 10).budgeted
    forced = tiny(algorithm="imaml", inner_mode="tolerance")  # ReLU to tolerance: asked for explicitly
    assert forced["inner_budget"] is None and not build_algorithm(forced, 10).budgeted
    partial = tiny(algorithm="imaml", activation="tanh", inner_budget=3)  # an explicit budget is budgeted
    assert partial["inner_mode"] == "budgeted" and partial["cg_budget"] is None and partial["krylov_steps"] == 3
    with pytest.raises(ConfigError, match="inner-mode tolerance"):
        tiny(algorithm="imaml", inner_mode="tolerance", cg_budget=5)
    with pytest.raises(ConfigError, match="Newton-Krylov"):
        tiny(algorithm="imaml", inner_solver="prgd", inner_budget=2)
    with pytest.raises(ConfigError, match="inner_mode must be"):
        tiny(algorithm="imaml", inner_mode="fast")
    # a configuration saved before inner_mode existed keeps its mode (and MAML's unused krylov_steps)
    old = {k: v for k, v in tiny(algorithm="imaml", inner_mode="tolerance").items() if k != "inner_mode"}
    old["krylov_steps"] = 20
    assert upgrade(old)["inner_mode"] == "tolerance" and not build_algorithm(upgrade(old), 10).budgeted
    maml = {k: v for k, v in tiny().items() if k != "inner_mode"}
    assert upgrade({**maml, "krylov_steps": 20}) == tiny()


def test_compiled_key_reaches_budgeted_imaml_and_is_refused_where_it_would_do_nothing():
    from implicit_nash.cli import build_parser
    args = build_parser().parse_args(["train", "sinusoid", "--algorithm", "imaml", "--compiled", "--out", "x"])
    assert args.compiled is True
    algo = build_algorithm(resolve({"task": "sinusoid", "algorithm": "imaml", "compiled": True}), 10)
    assert algo.compiled and algo.budgeted
    assert not build_algorithm(resolve({"task": "sinusoid", "algorithm": "imaml"}), 10).compiled
    with pytest.raises(ConfigError, match="budgeted mode's fixed Krylov iterations"):
        resolve({"task": "sinusoid", "algorithm": "imaml", "compiled": True, "activation": "tanh"})
    with pytest.raises(ConfigError, match="Newton-Krylov inner solver"):
        resolve({"task": "sinusoid", "algorithm": "imaml", "compiled": True, "inner_solver": "prgd"})
    from implicit_nash.meta.config import unused_options
    with pytest.raises(ConfigError, match="--compiled is used only by --algorithm imaml"):
        unused_options(resolve({"task": "sinusoid", "algorithm": "maml", "compiled": True}), ["compiled"])
    with pytest.raises(ConfigError, match="compiled must be true or false"):
        resolve({"task": "sinusoid", "algorithm": "imaml", "compiled": "yes"})
