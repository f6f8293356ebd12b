"""Task families and their networks."""
from .base import DataError, TaskFamily, data_root, group_statistics
from .networks import Conv4, mlp
from .sinusoid import SinusoidTasks, interval_statistics, test_intervals, train_intervals

__all__ = ["mlp", "Conv4", "SinusoidTasks", "interval_statistics", "train_intervals", "test_intervals",
           "TaskFamily", "DataError", "group_statistics", "make_family", "FAMILIES"]

FAMILIES = ("sinusoid", "faces", "celeba", "digits", "miniimagenet")


def make_family(config) -> TaskFamily:
    """The task family a resolved configuration names (data is read or checked here)."""
    task = config["task"]
    if task == "sinusoid":
        return SinusoidTasks(shots=config["shots"], query_shots=config["query_shots"])
    if task in ("faces", "celeba"):
        from .images import CelebASource, ImageCompletion, lfw_faces
        if task == "faces":
            source = lfw_faces()
        else:
            if not config.get("data_root"):
                raise DataError("the celeba task needs --data-root DIR (the folder holding img_align_celeba/ and Eval/)")
            source = CelebASource(config["data_root"], image_size=config["image_size"])
        return ImageCompletion(source, shots=config["shots"], query_shots=config["query_shots"])
    if task in ("digits", "miniimagenet"):
        from .classification import FewShotClassification, MiniImageNetCSV, MiniImageNetPickle, sklearn_digits
        if task == "digits":
            source = sklearn_digits()
        else:
            root = config.get("data_root")
            if not root:
                raise DataError("the miniimagenet task needs --data-root DIR (train.csv/val.csv/test.csv with images/, "
                                "or mini-imagenet-cache-*.pkl)")
            if (data_root(root, "MiniImageNet") / "mini-imagenet-cache-train.pkl").is_file():
                source = MiniImageNetPickle(root)
            else:
                source = MiniImageNetCSV(root, image_size=config["image_size"])
        return FewShotClassification(source, ways=config["ways"], shots=config["shots"],
                                     query_shots=config["query_shots"])
    raise DataError(f"unknown task {task!r}; choose from {', '.join(FAMILIES)}")
