"""Image completion and few-shot classification: loaders on fixtures in the real on-disk layouts,
samplers, a few training iterations, the error cases, and the networks' parameter counts."""
import csv
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from implicit_nash.cli import main
from implicit_nash.meta.config import resolve
from implicit_nash.meta.trainer import train
from implicit_nash.tasks import Conv4, DataError, make_family, mlp
from implicit_nash.tasks.base import eval_chunk


def _jpeg(path, seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=95)


@pytest.fixture
def celeba(tmp_path):
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    (root / "Eval").mkdir()
    lines = []
    for i in range(1, 13):
        name = f"{i:06d}.jpg"
        _jpeg(root / "img_align_celeba" / name, i)
        lines.append(f"{name} {0 if i <= 8 else (1 if i <= 10 else 2)}")
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def celeba_config(root, **kw):
    return resolve({"task": "celeba", "data_root": str(root), "image_size": 8, "shots": 10, "hidden": [16],
                    "meta_batch": 3, "iterations": 3, "eval_every": 3, "checkpoint_every": 3, "val_tasks": 2,
                    "test_tasks": 2, "context_dim": 4, "dtype": "float64", **kw})


def test_celeba_loader_sampler_and_training(celeba, tmp_path):
    family = make_family(celeba_config(celeba))
    assert family.num_train_tasks == 8 and family.source.count("test") == 2
    batch = family.sample(3, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert batch["x_support"].shape == (3, 10, 2) and batch["y_support"].shape == (3, 10, 3)
    assert batch["x_query"].shape == (3, 64, 3 - 1) and batch["y_query"].shape == (3, 64, 3)
    assert float(batch["x_support"].min()) >= 0 and float(batch["x_support"].max()) <= 1
    # a support pixel's value is the resized image's pixel at its coordinates
    image = Image.open(celeba / "img_align_celeba" / f"{int(batch['task_ids'][0]) + 1:06d}.jpg").convert("RGB")
    pixels = torch.as_tensor(np.array(image.resize((8, 8), Image.BILINEAR)), dtype=torch.float64) / 255
    r, c = (batch["x_support"][0, 0] * 7).round().long().tolist()
    assert torch.allclose(batch["y_support"][0, 0], pixels[r, c], atol=1e-6)
    test = family.eval_set("test", 5, seed=0)
    assert test["num_groups"] == 2 and eval_chunk(test, 0, 2)["x_query"].shape[1] == 64  # every pixel
    for algorithm in ("maml", "cavia"):
        m = train(celeba_config(celeba, algorithm=algorithm, penalty="centroid", weight=0.1),
                  tmp_path / algorithm, progress=False, log=lambda s: None)
        assert m["metric"] == "mse" and m["test"]["groups"] == 2 and m["test_mse_mean"] > 0


def test_celeba_errors(celeba, tmp_path, capsys):
    with pytest.raises(DataError, match="does not exist"):
        make_family(celeba_config(tmp_path / "nowhere"))
    (celeba / "Eval" / "list_eval_partition.txt").rename(celeba / "Eval" / "moved.txt")
    with pytest.raises(DataError, match="list_eval_partition.txt is missing"):
        make_family(celeba_config(celeba))
    (celeba / "Eval" / "moved.txt").rename(celeba / "Eval" / "list_eval_partition.txt")
    good = (celeba / "img_align_celeba" / "000003.jpg").read_bytes()
    for name, data in (("000003.jpg", good[: len(good) // 3]), ("000004.jpg", b"not a jpeg")):
        (celeba / "img_align_celeba" / name).write_bytes(data)
    family = make_family(celeba_config(celeba))
    for idx, name in ((2, "000003.jpg"), (3, "000004.jpg")):
        with pytest.raises(DataError, match=name):
            family.source.get("train", [idx])
    # through the command line: one line naming the file, exit 2, no traceback
    (celeba / "img_align_celeba" / "000001.jpg").write_bytes(b"broken")
    for i in (2, 5, 6, 7, 8):
        (celeba / "img_align_celeba" / f"{i:06d}.jpg").write_bytes(b"broken")
    code = main(["train", "celeba", "--data-root", str(celeba), "--iterations", "2", "--test-tasks", "2",
                 "--val-tasks", "2", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot be read" in err and ".jpg" in err and "Traceback" not in err


def _png(path, seed, size=16):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def mini_csv(tmp_path):
    root = tmp_path / "mini"
    (root / "images").mkdir(parents=True)
    k = 0
    for split, n_classes in (("train", 6), ("val", 5), ("test", 5)):
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for c in range(n_classes):
                for j in range(4):
                    name = f"{split}{c}_{j}.png"
                    _png(root / "images" / name, k)
                    k += 1
                    w.writerow([name, f"n{split}{c:03d}"])
    return root


def mini_config(root, **kw):
    return resolve({"task": "miniimagenet", "data_root": str(root), "image_size": 16, "ways": 5, "shots": 1,
                    "query_shots": 2, "filters": 4, "meta_batch": 2, "iterations": 2, "eval_every": 2,
                    "checkpoint_every": 2, "val_tasks": 2, "test_tasks": 3, "inner_steps": 1, "inner_lr": 0.1,
                    "dtype": "float64", **kw})


def test_miniimagenet_csv_loader_episodes_and_training(mini_csv, tmp_path):
    family = make_family(mini_config(mini_csv))
    assert family.num_train_tasks == 6  # C(6, 5)
    batch = family.sample(2, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert batch["x_support"].shape == (2, 5, 3, 16, 16) and batch["x_query"].shape == (2, 10, 3, 16, 16)
    assert batch["y_support"].tolist()[0] == [0, 1, 2, 3, 4] and batch["y_query"].dtype == torch.long
    m = train(mini_config(mini_csv, algorithm="maml"), tmp_path / "maml", progress=False, log=lambda s: None)
    assert m["metric"] == "accuracy" and 0 <= m["test_accuracy_worst"] <= m["test_accuracy_mean"] <= 1
    m = train(mini_config(mini_csv, algorithm="cavia", context_dim=3, penalty="robust", weight=0.01),
              tmp_path / "cavia", progress=False, log=lambda s: None)
    assert m["baseline_chance_accuracy_mean"] == pytest.approx(0.2)


def test_miniimagenet_pickle_cache(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        data = rng.integers(0, 256, (5 * 3, 16, 16, 3), dtype=np.uint8)
        classes = {f"n{split}{c}": list(range(3 * c, 3 * c + 3)) for c in range(5)}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": classes}, f)
    family = make_family(mini_config(root))
    first = family.source.get("train", "ntrain0", [0])
    with open(root / "mini-imagenet-cache-train.pkl", "rb") as f:
        raw = pickle.load(f)
    assert torch.allclose(first[0].double(), torch.as_tensor(raw["image_data"][0]).permute(2, 0, 1).double() / 255)
    (root / "mini-imagenet-cache-val.pkl").write_bytes(b"\x80\x04truncated")
    with pytest.raises(DataError, match="mini-imagenet-cache-val.pkl cannot be read"):
        make_family(mini_config(root))


def test_miniimagenet_errors(mini_csv):
    with open(mini_csv / "test.csv", "a", newline="") as f:
        csv.writer(f).writerow(["lonely.png", "nsmall"])
    _png(mini_csv / "images" / "lonely.png", 99)
    with pytest.raises(DataError, match="class 'nsmall' of the test split has 1 images, fewer than"):
        make_family(mini_config(mini_csv))
    (mini_csv / "val.csv").unlink()
    with pytest.raises(DataError, match="val.csv is missing"):
        make_family(mini_config(mini_csv))


def test_bundled_real_data_families(tmp_path):
    faces = make_family(resolve({"task": "faces"}))
    assert faces.source.count("train") == 80 and faces.source.shape == (25, 25, 1)
    digits = make_family(resolve({"task": "digits"}))
    assert digits.source.class_names("test") == ["7", "8", "9"] and digits.ways == 3
    m = train(resolve({"task": "digits", "iterations": 2, "eval_every": 2, "val_tasks": 4, "test_tasks": 6,
                       "filters": 4, "dtype": "float64"}), tmp_path / "d", progress=False, log=lambda s: None)
    assert m["test"]["groups"] == 6


def test_network_parameter_counts():
    # Finn et al.'s conv-4 on 84x84 RGB, 32 filters, 5-way: 4 conv blocks (3x3) with batch-norm
    # scale/shift and a linear head on 5x5x32 features
    count = lambda net: sum(p.numel() for p in net.parameters())
    expected = (3 * 32 * 9 + 32) + 3 * (32 * 32 * 9 + 32) + 4 * 2 * 32 + (32 * 5 * 5 * 5 + 5)
    assert count(Conv4(3, 32, 5, 84)) == expected == 32901
    # CAVIA(32) adds the FiLM layer from 100 context parameters to 2 x 32 channels
    assert count(Conv4(3, 32, 5, 84, context_dim=100)) == expected + 100 * 64 + 64
    # CAVIA's image-completion network: 2 coordinates (+ 128 contexts), 5 hidden layers of 128, RGB out
    assert count(mlp([2, 128, 128, 128, 128, 128, 3])) == (2 * 128 + 128) + 4 * (128 * 128 + 128) + (128 * 3 + 3)
    assert count(mlp([2 + 128, *[128] * 5, 3])) == 83203


def test_evaluation_in_chunks_equals_one_chunk(mini_csv, celeba):
    """Chunked evaluation (lazy sets, only per-task numbers kept) gives the metrics of one chunk."""
    from implicit_nash.meta.trainer import Run, evaluate
    for config in (mini_config(mini_csv, test_tasks=7), celeba_config(celeba, test_tasks=2)):
        run = Run(config)
        test = run.tasks.eval_set("test", config["test_tasks"], seed=3, dtype=torch.float64)
        args = (run.algorithm, run.model, run.theta_of(0), test)
        one = evaluate(*args, family=run.tasks, chunk=500)
        for chunk in (1, 3):
            parts = evaluate(*args, family=run.tasks, chunk=chunk)
            for key in ("mean", "worst", "std"):
                assert parts[f"{run.tasks.metric}_{key}"] == pytest.approx(one[f"{run.tasks.metric}_{key}"], abs=1e-12)
            assert parts["unadapted_mean"] == pytest.approx(one["unadapted_mean"], abs=1e-12)
            assert parts["trivial_mean"] == pytest.approx(one["trivial_mean"], abs=1e-12)
        assert one["tasks"] == (7 if config["task"] == "miniimagenet" else 2)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        evaluate(*args, family=run.tasks, chunk=0)
    with pytest.raises(Exception, match="eval_batch must be positive"):
        mini_config(mini_csv, eval_batch=0)
