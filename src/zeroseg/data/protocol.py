"""Which training images a zero-shot protocol keeps, from per-image class pixel counts.

Three inductive training sets exist in the literature (see ``docs/data.md``):

* keep every image, unseen pixels → ignore (ZegCLIP; zeroseg's default);
* ``skip_all_ignore``: also drop images whose *training* label is all ignore (zsseg / DeOP prep);
* ``drop_images_with_unseen``: drop every image that contains an unseen class (ZS3Net).

:func:`label_histograms` counts, per training image, the pixels of every class id plus ignore —
one pass over the label files, parallel over loader workers, cached on disk by the list of label
files and their sizes and modification times. :func:`select_training_images` applies the options and
returns the kept indices with a report of images and pixels kept and removed by each option.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zeroseg.data.splits import ClassSplit, Setting
from zeroseg.data.verify import fingerprint_files
from zeroseg.utils.atomic import atomic_output

log = logging.getLogger(__name__)

__all__ = ["label_histograms", "select_training_images"]


class _Histograms(Dataset):
    """Per-item ``bincount`` of the class-id label (last bin: ignore and anything ≥ num_classes)."""

    def __init__(self, dataset: Dataset, num_classes: int) -> None:
        self.dataset = dataset
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> torch.Tensor:
        read_label = getattr(self.dataset, "read_label", None)
        label = read_label(index) if read_label is not None else self.dataset[index]["label"].numpy()
        label = np.minimum(np.asarray(label, dtype=np.int64).ravel(), self.num_classes)
        return torch.from_numpy(np.bincount(label, minlength=self.num_classes + 1).astype(np.int64))


def _cache_key(dataset: Dataset, num_classes: int) -> Optional[str]:
    pairs = getattr(dataset, "pairs", None)
    if pairs is None:
        return None
    return fingerprint_files((label_path for _, label_path in pairs), f"{type(dataset).__name__}:{num_classes}")


def label_histograms(
    dataset: Dataset, num_classes: int, cache_dir: Optional[str | Path] = None, num_workers: int = 0
) -> np.ndarray:
    """``(N, num_classes + 1)`` int64 pixel counts per image; the last column counts ignore.

    Datasets with a ``read_label(index)`` method (the folder readers) are read without their
    transform; others through ``dataset[index]["label"]``. Folder datasets are cached under
    ``cache_dir/label_stats``.
    """
    key = _cache_key(dataset, num_classes) if cache_dir is not None else None
    cache_file = Path(cache_dir) / "label_stats" / f"{getattr(dataset, 'name', 'dataset')}-{key}.npy" if key else None
    if cache_file is not None and cache_file.is_file():
        return np.load(cache_file)
    loader = DataLoader(_Histograms(dataset, num_classes), batch_size=64, num_workers=num_workers)
    log.info("counting label pixels of %d training images (once; cached)", len(dataset))  # type: ignore[arg-type]
    histograms = torch.cat(list(loader)).numpy() if len(dataset) else np.zeros((0, num_classes + 1), np.int64)  # type: ignore[arg-type]
    if cache_file is not None:
        with atomic_output(cache_file, what="label statistics") as handle:
            np.save(handle, histograms)
    return histograms


def select_training_images(
    histograms: np.ndarray,
    split: ClassSplit,
    setting: Setting,
    drop_images_with_unseen: bool = False,
    skip_all_ignore: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Indices of the training images the options keep, and what each step kept and removed.

    Steps, in order: unseen pixels become ignore (both zero-shot settings); ``drop_images_with_unseen``
    removes images with any unseen pixel; ``skip_all_ignore`` removes images with no trainable pixel.
    """
    num_classes = split.num_classes
    counts = histograms[:, :num_classes]
    unseen_ids = split.unseen_class_ids if setting != "supervised" else []
    unseen_pixels = counts[:, unseen_ids].sum(axis=1)
    trainable_pixels = counts.sum(axis=1) - unseen_pixels
    total_pixels = int(histograms.sum())
    report: dict[str, Any] = {
        "images": int(len(histograms)),
        "pixels": total_pixels,
        "labelled_pixels": int(counts.sum()),
        "unseen_pixels_to_ignore": int(unseen_pixels.sum()),
        "images_with_unseen": int((unseen_pixels > 0).sum()),
    }
    keep = np.ones(len(histograms), dtype=bool)
    for option, enabled, removes in (
        ("drop_images_with_unseen", drop_images_with_unseen, unseen_pixels > 0),
        ("skip_all_ignore", skip_all_ignore, trainable_pixels == 0),
    ):
        if not enabled:
            continue
        removed = keep & removes
        report[option] = {
            "removed_images": int(removed.sum()),
            "removed_trainable_pixels": int(trainable_pixels[removed].sum()),
            "kept_images": int((keep & ~removes).sum()),
        }
        keep &= ~removes
    report["kept_images"] = int(keep.sum())
    report["kept_trainable_pixels"] = int(trainable_pixels[keep].sum())
    return np.flatnonzero(keep), report
