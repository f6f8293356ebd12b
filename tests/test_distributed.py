"""The inner game sharded over 2 gloo processes equals one process with the whole meta-batch."""
import json

import pytest
import torch
import torch.multiprocessing as mp

import _dist_worker as W
from implicit_nash.meta.config import resolve
from implicit_nash.meta.trainer import train

# robust_c = 1e-4, not the default 1e-8: Algorithm 2 starts at phi = theta, where some meta-gradient
# entries are zero in exact arithmetic, and with a tiny C their round-off sign (which sharding changes by
# changing the order of sums) becomes a full +-lr step in Adam's first update
CONFIG = {"algorithm": "maml", "penalty": "robust", "weight": 0.01, "robustness": 2.0, "robust_c": 1e-4,
          "activation": "tanh", "iterations": 3,
          "meta_batch": 4, "hidden": [8], "eval_every": 3, "checkpoint_every": 3, "val_tasks": 490,
          "test_tasks": 490, "inner_lr": 0.01, "dtype": "float64"}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_equal_one_process(tmp_path):
    """Even (4 = 2 + 2) and uneven (5 = 3 + 2) meta-batches: sharded meta-gradients and training runs
    equal one process (the uneven runs weight each rank's mean by its share of the tasks)."""
    config = resolve(CONFIG)
    # TR-MAML: the task probabilities must stay the same on every rank (updated from the gathered losses);
    # with an uneven split its N/B weights must use the whole batch's B
    config2 = resolve({**CONFIG, "algorithm": "trmaml", "penalty": "centroid", "weight": 0.1, "task_lr": 0.05,
                       "meta_batch": 5})
    config3 = resolve({**CONFIG, "penalty": "centroid", "weight": 0.1, "meta_batch": 5})
    configs = [config, config2, config3]
    mp.start_processes(W.run, args=(2, str(tmp_path / "init"), str(tmp_path), configs, (4, 5)), nprocs=2,
                       join=True, start_method="spawn")
    sharded = torch.load(tmp_path / "grads.pt")
    for name, algo in W.problems().items():
        for B in (4, 5):
            whole = W.meta_gradient(algo, W.batch(B))
            for a, b in zip(sharded[(name, B)], whole):
                assert torch.allclose(a, b, rtol=1e-6, atol=1e-10), (name, B)
            assert max(float(g.abs().max()) for g in whole) > 1e-3
    for k, cfg in enumerate(configs):
        single = train(cfg, tmp_path / f"single{k}", progress=False, log=lambda s: None)
        both = json.loads((tmp_path / f"run{k}" / "metrics.json").read_text())
        for key in ("test_mse_mean", "test_mse_worst", "test_mse_std", "final_train_loss"):
            assert both[key] == pytest.approx(single[key], rel=1e-6, abs=1e-12), (k, key)
        assert both["config"]["distributed"] is True
        if cfg["algorithm"] == "trmaml":
            assert both["runs"][0]["task_probs"] == pytest.approx(single["runs"][0]["task_probs"], rel=1e-9)


def test_uneven_blocks():
    from implicit_nash.distributed import block, shard
    assert [block(25, r, 2) for r in (0, 1)] == [slice(0, 13), slice(13, 25)]
    assert [block(7, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]
    parts = [shard({"x": torch.arange(25), "ways": 5}, r, 2) for r in (0, 1)]
    assert torch.equal(torch.cat([p["x"] for p in parts]), torch.arange(25)) and parts[1]["ways"] == 5
    with pytest.raises(ValueError, match="every rank needs a task; use --meta-batch 3 or more"):
        block(2, 0, 3)


def test_solvers_that_cannot_shard_say_so(tmp_path):
    import implicit_nash as inn
    from implicit_nash.distributed import sharded
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init1'}", rank=0, world_size=1)
    try:
        F = lambda z, t: z - t
        with sharded():
            with pytest.raises(ValueError, match="GaussSeidel updates players one after another"):
                inn.solve_vi(F, torch.zeros(2, 1), torch.ones(2, 1), solver=inn.GaussSeidel(step_size=0.5))
            with pytest.raises(ValueError, match="Dense materialises"):
                inn.Dense().solve(lambda v: 2 * v, torch.ones(3))
            # with one rank the sharded reductions are the plain ones
            z = inn.solve_vi(F, torch.zeros(2, 1), torch.ones(2, 1))
            assert torch.allclose(z, torch.ones(2, 1))
    finally:
        torch.distributed.destroy_process_group()
    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        with sharded():
            pass


def test_collective_tensors_live_on_the_groups_device(tmp_path):
    # NCCL cannot run here (no GPU): the choice of device is checked as logic, and on a real gloo group
    from implicit_nash import _collective as C
    assert C._backend_devices("nccl") == ["cuda"]
    assert C._backend_devices("gloo") == ["cpu", "cuda"]
    assert C._backend_devices("cpu:gloo,cuda:nccl") == ["cpu", "cuda"]
    cuda1 = torch.device("cuda", 1)
    assert C._pick_device(["cuda"], index=lambda kind: 1) == cuda1  # NCCL: this process's CUDA device
    assert C._pick_device(["cuda"], like=cuda1, index=lambda kind: 0) == cuda1  # the input's own device
    assert C._pick_device(["cpu", "cuda"], index=lambda kind: 1) == torch.device("cpu")
    assert C._pick_device(["cpu", "cuda"], like=cuda1) == cuda1
    assert C._pick_device(["cpu"], like=torch.device("meta")) == torch.device("cpu")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with C.sharded():
            assert set(C._group_devices()) >= {"cpu"}
            assert C._device() == torch.device("cpu")
            assert C.allmax(2.5) == 2.5 and C.allmax(torch.tensor(-1.5)) == -1.5 and C.total(3) == 3
    finally:
        torch.distributed.destroy_process_group()
