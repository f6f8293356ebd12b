r"""Image completion as meta-learning (Garnelo et al. 2018; CAVIA, Zintgraf et al. 2019).

A task is one image: the input of a pixel is its coordinates in [0, 1]², its target the pixel's
values. The support set is K pixels sampled without replacement; the query set is every pixel (so
the reported MSE is over all pixels). Evaluation reports the mean, worst and standard deviation over
test images of the per-image MSE.

Sources:

* :class:`CelebASource` reads the real CelebA layout, ``ROOT/img_align_celeba/*.jpg`` with
  ``ROOT/Eval/list_eval_partition.txt`` (``<file> <0|1|2>``: train, valid, test), and resizes images
  to 32×32 RGB as CAVIA does. Images are read on demand (a few per iteration), so the 202,599 files
  are never all in memory.
* :func:`lfw_faces` uses scikit-image's bundled LFW subset (real photographs shipped with the
  package): its 100 face images of 25×25 grey levels, split by index into 80 training, 10
  validation and 10 test images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch

from .base import DataError, TaskFamily, data_root
from .networks import mlp

__all__ = ["ImageCompletion", "CelebASource", "TensorImages", "lfw_faces"]

SPLITS = {"train": 0, "val": 1, "test": 2}


class TensorImages:
    """Images already in memory: ``{split: tensor (M, H, W, C) in [0, 1]}``."""

    def __init__(self, images: Dict[str, torch.Tensor], name: str):
        for split in SPLITS:
            if split not in images or images[split].shape[0] == 0:
                raise DataError(f"{name}: the {split} split has no images")
        self.images = images
        self.name = name
        self.shape = tuple(images["train"].shape[1:])

    def count(self, split: str) -> int:
        return int(self.images[split].shape[0])

    def get(self, split: str, indices: List[int]) -> torch.Tensor:
        return self.images[split][indices]


class CelebASource:
    """CelebA on disk (see the module docstring); ``image_size`` pixels a side after resizing."""

    def __init__(self, root: str, image_size: int = 32):
        root_p = data_root(root, "CelebA")
        split_file = root_p / "Eval" / "list_eval_partition.txt"
        if not split_file.is_file():
            raise DataError(f"CelebA split file {split_file} is missing")
        self.folder = root_p / "img_align_celeba"
        if not self.folder.is_dir():
            raise DataError(f"CelebA image folder {self.folder} is missing")
        self.files: Dict[str, List[str]] = {s: [] for s in SPLITS}
        names = {v: k for k, v in SPLITS.items()}
        for n, line in enumerate(split_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise DataError(f"{split_file}:{n}: expected '<image file> <0|1|2>', got {line!r}")
            self.files[names[int(parts[1])]].append(parts[0])
        for split, files in self.files.items():
            if not files:
                raise DataError(f"{split_file} lists no {split} images")
        self.image_size = image_size
        self.shape = (image_size, image_size, 3)
        self.name = "CelebA"
        self._cache: Dict[str, torch.Tensor] = {}

    def count(self, split: str) -> int:
        return len(self.files[split])

    def _load(self, name: str) -> torch.Tensor:
        if name in self._cache:
            return self._cache[name]
        from PIL import Image, UnidentifiedImageError
        path = self.folder / name
        if not path.is_file():
            raise DataError(f"CelebA image {path} (listed in the split file) is missing")
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise DataError(f"CelebA image {path} cannot be read (corrupt or truncated): {e}") from None
        image = data.reshape(self.image_size, self.image_size, 3).to(torch.float32) / 255.0
        return image

    def get(self, split: str, indices: List[int]) -> torch.Tensor:
        # meta-training images are cached (20,000 of 32x32: about 250 MB at most); validation and test
        # images are read at every evaluation, so that evaluation memory does not grow with their number
        out = []
        for i in indices:
            name = self.files[split][i]
            image = self._load(name)
            if split == "train" and len(self._cache) < 20000:
                self._cache[name] = image
            out.append(image)
        return torch.stack(out)


def lfw_faces() -> TensorImages:
    """scikit-image's LFW subset: 100 face images of 25×25, split 80 / 10 / 10 by index."""
    try:
        from skimage import data
    except ImportError:
        raise DataError("the faces task needs scikit-image: pip install scikit-image") from None
    faces = torch.as_tensor(data.lfw_subset()[:100], dtype=torch.float32)  # the first 100 are faces
    faces = faces.unsqueeze(-1)
    return TensorImages({"train": faces[:80], "val": faces[80:90], "test": faces[90:]}, "LFW faces")


class ImageCompletion(TaskFamily):
    """Image-completion tasks from an image source (CelebA, LFW faces or tensors).

    Args:
        source: a :class:`CelebASource` or :class:`TensorImages`.
        shots: K context pixels per task (the paper's CelebA experiments: 100).
        query_shots: query pixels per meta-training task (``None``: every pixel).
    """

    loss = "mse"
    metric = "mse"

    def __init__(self, source, shots: int = 100, query_shots: Optional[int] = None):
        self.source = source
        H, W, C = source.shape
        if not 1 <= shots < H * W:
            raise DataError(f"{source.name}: shots must be between 1 and {H * W - 1} pixels, got {shots}")
        self.shots, self.query_shots = shots, query_shots
        ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        self.coords = torch.stack([ys.reshape(-1) / max(H - 1, 1), xs.reshape(-1) / max(W - 1, 1)], 1)
        self.channels = C
        self.input_dim, self.output_dim = 2, C

    @property
    def num_train_tasks(self) -> int:
        return self.source.count("train")

    def network(self, algorithm, config):
        """A fully connected network on pixel coordinates (CAVIA's: 5 hidden layers of 128)."""
        return mlp([2 + algorithm.input_extra(), *config["hidden"], self.channels], config["activation"])

    def _tasks(self, split, indices, order, dtype, query_all):
        """The tasks of images ``indices``, with pixel order ``order`` (B, pixels) choosing the support."""
        images = self.source.get(split, indices)  # (B, H, W, C)
        B = images.shape[0]
        values = images.reshape(B, -1, self.channels)
        n = values.shape[1]
        sup = order[:, :self.shots]
        if query_all or self.query_shots is None:
            qry = torch.arange(n).expand(B, n)
        else:
            qry = order[:, self.shots:self.shots + self.query_shots]
        gather = lambda idx, t: torch.gather(t, 1, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1]))
        coords = self.coords.expand(B, n, 2)
        return {"x_support": gather(sup, coords).to(dtype), "y_support": gather(sup, values).to(dtype),
                "x_query": gather(qry, coords).to(dtype), "y_query": gather(qry, values).to(dtype)}

    def sample(self, batch_size, generator, dtype=torch.float32):
        ids = torch.randint(0, self.source.count("train"), (batch_size,), generator=generator)
        order = torch.rand(batch_size, self.coords.shape[0], generator=generator).argsort(1)
        batch = self._tasks("train", ids.tolist(), order, dtype, query_all=False)
        batch["task_ids"] = ids
        return batch

    def eval_set(self, split, num_tasks, seed, dtype=torch.float32):
        """Lazy: the images are drawn here, their pixels read when a chunk of tasks is asked for
        (:func:`~implicit_nash.tasks.base.eval_chunk`). Task ``t``'s support pixels come from its own
        generator (seeded by ``seed`` and ``t``), so a task does not depend on the chunk size."""
        gen = torch.Generator().manual_seed(seed)
        total = self.source.count(split)
        m = min(num_tasks, total)
        indices = torch.randperm(total, generator=gen)[:m].sort().values.tolist()
        pixels = self.coords.shape[0]

        def load(lo, hi):
            order = torch.stack([torch.rand(pixels, generator=torch.Generator().manual_seed(seed * 1_000_003 + t))
                                 .argsort() for t in range(lo, hi)])
            return self._tasks(split, indices[lo:hi], order, dtype, query_all=True)

        return {"num_tasks": m, "load": load, "group_ids": torch.arange(m), "num_groups": m}
