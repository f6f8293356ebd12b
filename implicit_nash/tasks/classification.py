r"""N-way K-shot classification episodes (Ravi and Larochelle 2017; Finn et al. 2017).

A task draws N classes of a split, K support and Q query images of each, and relabels the classes
0..N-1 in a random order. Evaluation reports the mean, worst (lowest) and standard deviation over
test episodes of the query accuracy.

Sources:

* :class:`MiniImageNetCSV`: the Ravi-Larochelle split, ``ROOT/train.csv``, ``val.csv``,
  ``test.csv`` (``filename,label``) and ``ROOT/images/`` of 84×84 images;
* :class:`MiniImageNetPickle`: the common caches ``ROOT/mini-imagenet-cache-{train,val,test}.pkl``
  holding ``image_data`` (an array of images) and ``class_dict`` (class -> image indices);
* :func:`sklearn_digits`: scikit-learn's bundled 8×8 digits (real handwriting). Classes 0-6 are
  meta-training classes, 7-9 meta-test classes (3-way tasks); validation episodes use the 20% of
  each meta-training class's images that training never samples.
"""
from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path
from typing import Dict, List

import torch

from .base import DataError, TaskFamily, data_root
from .networks import Conv4

__all__ = ["FewShotClassification", "ClassImages", "MiniImageNetCSV", "MiniImageNetPickle", "sklearn_digits"]

SPLITS = ("train", "val", "test")


class ClassImages:
    """Images grouped by class per split: ``{split: {class: tensor (n, C, H, W) or list of files}}``."""

    name = "images"

    def __init__(self, classes: Dict[str, Dict[str, torch.Tensor]], name: str):
        self.classes = classes
        self.name = name
        first = next(iter(classes["train"].values()))
        self.shape = tuple(first.shape[1:])

    def class_names(self, split: str) -> List[str]:
        return sorted(self.classes[split])

    def count(self, split: str, cls: str) -> int:
        return int(self.classes[split][cls].shape[0])

    def get(self, split: str, cls: str, indices: List[int]) -> torch.Tensor:
        return _as_float(self.classes[split][cls][indices])


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """Images stored as bytes (a quarter of the memory of float32) as floats in [0, 1]."""
    return images.to(torch.float32) / 255.0 if images.dtype == torch.uint8 else images


def _load_image(path: Path, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    if not path.is_file():
        raise DataError(f"image {path} is missing")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise DataError(f"image {path} cannot be read (corrupt or truncated): {e}") from None
    return data.reshape(size, size, 3).permute(2, 0, 1).contiguous()  # uint8; _as_float converts


class MiniImageNetCSV(ClassImages):
    """MiniImageNet in the Ravi-Larochelle CSV layout; images are read on demand.

    Meta-training images are cached as bytes (at most ``CACHE`` of them, 21 KB each at 84×84);
    validation and test images are read again at every evaluation, so that evaluation memory does
    not grow with the number of episodes.
    """

    CACHE = 40000

    def __init__(self, root: str, image_size: int = 84):
        root_p = data_root(root, "MiniImageNet")
        self.folder = root_p / "images"
        if not self.folder.is_dir():
            raise DataError(f"MiniImageNet image folder {self.folder} is missing")
        self.files: Dict[str, Dict[str, List[str]]] = {}
        for split in SPLITS:
            path = root_p / f"{split}.csv"
            if not path.is_file():
                raise DataError(f"MiniImageNet split file {path} is missing")
            per_class: Dict[str, List[str]] = {}
            with open(path, newline="") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None or [h.strip() for h in header[:2]] != ["filename", "label"]:
                    raise DataError(f"{path}: expected a 'filename,label' header, got {header!r}")
                for n, row in enumerate(reader, 2):
                    if len(row) < 2:
                        raise DataError(f"{path}:{n}: expected 'filename,label', got {row!r}")
                    per_class.setdefault(row[1], []).append(row[0])
            if not per_class:
                raise DataError(f"{path} lists no images")
            self.files[split] = per_class
        self.image_size = image_size
        self.shape = (3, image_size, image_size)
        self.name = "MiniImageNet"
        self._cache: Dict[str, torch.Tensor] = {}

    def class_names(self, split):
        return sorted(self.files[split])

    def count(self, split, cls):
        return len(self.files[split][cls])

    def get(self, split, cls, indices):
        out = []
        for i in indices:
            name = self.files[split][cls][i]
            image = self._cache.get(name)
            if image is None:
                image = _load_image(self.folder / name, self.image_size)
                if split == "train" and len(self._cache) < self.CACHE:
                    self._cache[name] = image
            out.append(image)
        return _as_float(torch.stack(out))


class MiniImageNetPickle(ClassImages):
    """MiniImageNet from ``mini-imagenet-cache-{train,val,test}.pkl`` (``image_data``, ``class_dict``)."""

    def __init__(self, root: str):
        root_p = data_root(root, "MiniImageNet")
        classes: Dict[str, Dict[str, torch.Tensor]] = {}
        for split in SPLITS:
            path = root_p / f"mini-imagenet-cache-{split}.pkl"
            if not path.is_file():
                raise DataError(f"MiniImageNet cache {path} is missing")
            try:
                with open(path, "rb") as f:
                    cache = pickle.load(f)
                data, class_dict = cache["image_data"], cache["class_dict"]
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"MiniImageNet cache {path} cannot be read (corrupt, truncated or without "
                                f"image_data/class_dict): {type(e).__name__}: {e}") from None
            images = torch.as_tensor(data)
            if images.dim() != 4 or images.shape[-1] != 3:
                raise DataError(f"{path}: image_data must be (n, H, W, 3), got {tuple(images.shape)}")
            images = images.permute(0, 3, 1, 2)
            if images.dtype != torch.uint8:  # the usual caches hold bytes, kept as such (1.3 GB, not 5 GB)
                images = images.to(torch.float32) / 255.0
            classes[split] = {str(c): images[torch.as_tensor(list(idx))] for c, idx in class_dict.items()}
        super().__init__(classes, "MiniImageNet")


def sklearn_digits() -> ClassImages:
    """scikit-learn's digits: classes 0-6 meta-train (80% of images) / meta-val (20%), 7-9 meta-test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits task needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    target = torch.as_tensor(d.target)
    classes: Dict[str, Dict[str, torch.Tensor]] = {s: {} for s in SPLITS}
    for c in range(10):
        imgs = images[target == c]
        if c <= 6:
            cut = int(0.8 * imgs.shape[0])
            classes["train"][str(c)], classes["val"][str(c)] = imgs[:cut], imgs[cut:]
        else:
            classes["test"][str(c)] = imgs
    return ClassImages(classes, "digits")


class FewShotClassification(TaskFamily):
    """N-way K-shot episodes from a class-image source."""

    loss = "cross_entropy"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, source: ClassImages, ways: int = 5, shots: int = 5, query_shots: int = 15):
        self.source, self.ways, self.shots, self.query_shots = source, ways, shots, query_shots
        for split in SPLITS:
            names = source.class_names(split)
            if len(names) < ways:
                raise DataError(f"{source.name}: the {split} split has {len(names)} classes, fewer than {ways}-way")
            need = shots + query_shots
            for c in names:
                if source.count(split, c) < need:
                    raise DataError(f"{source.name}: class {c!r} of the {split} split has {source.count(split, c)} "
                                    f"images, fewer than shots + query = {need}")

    @property
    def num_train_tasks(self) -> int:
        """C(classes, N): the number of distinct meta-training tasks (the paper's count for MiniImageNet)."""
        return math.comb(len(self.source.class_names("train")), self.ways)

    def network(self, algorithm, config):
        C, H, _ = self.source.shape
        return Conv4(C, config["filters"], self.ways, H, context_dim=algorithm.input_extra())

    def _plan(self, split, generator):
        """One episode's classes and image indices (the generator draws of :meth:`_episode`)."""
        names = self.source.class_names(split)
        chosen = torch.randperm(len(names), generator=generator)[:self.ways].tolist()
        plan = []
        for c in chosen:
            n = self.source.count(split, names[c])
            plan.append((names[c], torch.randperm(n, generator=generator)[:self.shots + self.query_shots].tolist()))
        return plan

    def _load(self, split, plans, dtype):
        """The episodes of a list of plans, stacked (``ways`` included)."""
        xs_all, xq_all = [], []
        for plan in plans:
            xs, xq = [], []
            for name, idx in plan:
                images = self.source.get(split, name, idx)
                xs.append(images[:self.shots])
                xq.append(images[self.shots:])
            xs_all.append(torch.cat(xs).to(dtype))
            xq_all.append(torch.cat(xq).to(dtype))
        labels = torch.arange(self.ways)
        n = len(plans)
        return {"x_support": torch.stack(xs_all), "y_support": labels.repeat_interleave(self.shots).expand(n, -1).clone(),
                "x_query": torch.stack(xq_all), "y_query": labels.repeat_interleave(self.query_shots).expand(n, -1).clone(),
                "ways": self.ways}

    def sample(self, batch_size, generator, dtype=torch.float32):
        batch = self._load("train", [self._plan("train", generator) for _ in range(batch_size)], dtype)
        batch.pop("ways")
        batch["task_ids"] = torch.zeros(batch_size, dtype=torch.long)
        return batch

    def eval_set(self, split, num_tasks, seed, dtype=torch.float32):
        """Lazy: only the episodes' plans (classes and image indices) are drawn here; the images of
        episodes ``lo:hi`` are read when :func:`~implicit_nash.tasks.base.eval_chunk` asks for them."""
        gen = torch.Generator().manual_seed(seed)
        plans = [self._plan(split, gen) for _ in range(num_tasks)]

        def load(lo, hi):
            batch = self._load(split, plans[lo:hi], dtype)
            batch.pop("ways")
            return batch

        return {"num_tasks": num_tasks, "load": load, "ways": self.ways,
                "group_ids": torch.arange(num_tasks), "num_groups": num_tasks}
