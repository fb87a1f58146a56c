"""The images of a study's dataset, split train/val/test (what a cell's extraction reads)."""
from __future__ import annotations

from pathlib import Path

from .spec import Dataset


def dataset_splits(dataset: Dataset, img_size: int, config: dict) -> tuple[dict, list]:
    """({split: torch Dataset}, class names) for a builtin or ImageFolder dataset.

    ``config`` is timm's data config of the backbone (mean, std, input size, interpolation).
    """
    import timm.data

    from ..extract import digits_splits, image_folder_splits
    from .synthetic import gratings_splits

    if dataset.builtin == "digits":
        return digits_splits(img_size, config["mean"], config["std"])
    if dataset.builtin == "synthetic-gratings":
        return gratings_splits(img_size, config["mean"], config["std"])
    root = Path(dataset.path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset {dataset.label}: {root} is not a directory (expected an ImageFolder tree)")
    splits, classes = image_folder_splits(root, timm.data.create_transform(**config, is_training=False))
    missing = [name for name in ("train", "val", "test") if name not in splits]
    if missing:
        raise ValueError(f"dataset {dataset.label}: {root} has some split folders but not {missing}; give it "
                         "train/val/test folders, or only class folders (split by a fixed seed)")
    return splits, classes
