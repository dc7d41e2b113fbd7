"""Readers for the benchmarks' on-disk layouts (mmseg's default roots under ``paths.data_dir``).

One class per layout; each lists its (image, label) file pairs, maps raw label values to class ids
(and ignore) through a lookup table that also rejects values outside the layout's valid set, and
hands the pair to a transform (:mod:`zeroseg.data.transforms`). Items are
``{"image": float (3, H, W) in [0, 1], "label": int64 (H, W)}`` in full class ids, like every
zeroseg dataset; normalisation belongs to the models.

========================  ==============================================================  ==========================
reader (``dataset=``)      layout under ``data_dir``                                         raw label values
========================  ==============================================================  ==========================
``VOCSegmentation``        ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass[Aug]}``          0 bg → ignore, 1–20, 255
``COCOStuffSegmentation``  ``coco_stuff164k/{images,annotations}/{train2017,val2017}``        0–170, 255
``PascalContext``          ``VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext}``        0 bg (59: ignore; 60: class), 1–59
``ADE20KSegmentation``     ``ADEChallengeData2016/{images,annotations}/{training,validation}``  0 → ignore, 1–150
========================  ==============================================================  ==========================
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "ADE20KSegmentation",
    "COCOStuffSegmentation",
    "DatasetLayoutError",
    "LabelValueError",
    "PascalContext",
    "SegmentationFolder",
    "VOCSegmentation",
    "label_lut",
    "read_image",
    "read_label",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
INVALID = -1

Transform = Callable[[np.ndarray, np.ndarray], dict[str, torch.Tensor]]


class DatasetLayoutError(FileNotFoundError):
    """A dataset root, sub-folder, list file or listed file is missing."""


class LabelValueError(ValueError):
    """A label map holds values outside its layout's valid set, or does not match its image."""


def label_lut(valid_raw: Iterable[int], offset: int, ignore_raw: Iterable[int] = (IGNORE_INDEX,)) -> np.ndarray:
    """Raw value → class id table over 0..255: ``id = raw - offset`` for ``valid_raw``, ignore for
    ``ignore_raw``, :data:`INVALID` (-1) for everything else."""
    lut = np.full(256, INVALID, dtype=np.int16)
    for value in valid_raw:
        lut[value] = value - offset
    for value in ignore_raw:
        lut[value] = IGNORE_INDEX
    return lut


def read_image(path: Path) -> np.ndarray:
    """An RGB image as ``uint8 (H, W, 3)``; errors name the file."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise DatasetLayoutError(f"image file {path} does not exist") from None
    except Exception as error:  # PIL raises several types for truncated/corrupt files
        raise OSError(f"cannot read image file {path}: {error}") from error


def read_label(path: Path) -> np.ndarray:
    """A single-channel label PNG (mode L or P: palette indices are the values) as ``uint8 (H, W)``."""
    try:
        with Image.open(path) as label:
            if label.mode not in ("L", "P"):
                raise LabelValueError(
                    f"label file {path} has image mode {label.mode}; expected a single-channel (L or P) PNG of class values"
                )
            return np.asarray(label)
    except FileNotFoundError:
        raise DatasetLayoutError(f"label file {path} does not exist") from None
    except LabelValueError:
        raise
    except Exception as error:
        raise OSError(f"cannot read label file {path}: {error}") from error


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``uint8 (H, W, 3)`` → ``float (3, H, W)`` in [0, 1]."""
    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image)  # PIL arrays are read-only; flips are negative-stride views
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(255)


def _read_list(path: Path, what: str) -> list[str]:
    names = [line.strip().split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetLayoutError(f"{what}: list file {path} is empty; expected one image id per line")
    return names


class SegmentationFolder(Dataset):
    """Base reader: (image, label) pairs + raw-value lookup table + transform.

    Subclasses set :attr:`name`, :attr:`root_name`, :attr:`expected_tree`, :attr:`lut` and
    implement :meth:`list_pairs`.

    Args:
        data_dir: the folder holding the dataset's root (``paths.data_dir``).
        split: ``train`` or ``val``.
        transform: ``(image uint8 HWC, label class ids uint8 HW) → item``; ``None`` converts to
            tensors unchanged.
        limit: read only the first ``limit`` pairs (smoke runs); ``None`` = all.
    """

    name: ClassVar[str] = "dataset"
    root_name: ClassVar[str] = ""
    expected_tree: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("train", "val")
    lut: np.ndarray

    def __init__(
        self, data_dir: str | Path, split: str, transform: Optional[Transform] = None, limit: Optional[int] = None
    ) -> None:
        if split not in self.splits:
            raise ValueError(f"dataset '{self.name}': split={split!r} is not one of {list(self.splits)}")
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / self.root_name
        self.split = split
        self.transform = transform
        self.require_dir(self.root)
        pairs = self.list_pairs()
        if limit is not None:
            pairs = pairs[:limit]
        self.pairs: list[tuple[Path, Path]] = pairs
        log.info("dataset '%s' %s: %d image/label pairs under %s", self.name, split, len(pairs), self.root)

    # -- layout -----------------------------------------------------------------------------------
    def list_pairs(self) -> list[tuple[Path, Path]]:
        raise NotImplementedError

    def layout_error(self, problem: str) -> DatasetLayoutError:
        return DatasetLayoutError(
            f"dataset '{self.name}': {problem}\nExpected under paths.data_dir={self.data_dir}:\n{self.expected_tree}"
            "\n(`python -m zeroseg.data.prepare` builds this layout from the official downloads)"
        )

    def require_dir(self, path: Path) -> Path:
        if not path.is_dir():
            raise self.layout_error(f"folder {path} does not exist")
        return path

    def require_file(self, path: Path) -> Path:
        if not path.is_file():
            raise self.layout_error(f"file {path} does not exist")
        return path

    def pairs_from_list(
        self, list_file: Path, image_dir: Path, label_dir: Path, label_suffix: str = ".png"
    ) -> list[tuple[Path, Path]]:
        ids = _read_list(self.require_file(list_file), f"dataset '{self.name}'")
        self.require_dir(image_dir)
        self.require_dir(label_dir)
        return [(image_dir / f"{i}.jpg", label_dir / f"{i}{label_suffix}") for i in ids]

    def pairs_from_folders(self, image_dir: Path, label_dir: Path, label_suffix: str) -> list[tuple[Path, Path]]:
        images = sorted(self.require_dir(image_dir).glob("*.jpg"))
        self.require_dir(label_dir)
        if not images:
            raise self.layout_error(f"folder {image_dir} holds no .jpg images")
        pairs = [(p, label_dir / f"{p.stem}{label_suffix}") for p in images]
        missing = [str(label) for _, label in pairs if not label.is_file()]
        if missing:
            raise self.layout_error(f"{len(missing)} images of {image_dir} have no label, e.g. {missing[:3]}")
        return pairs

    # -- reading ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pairs)

    def map_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Raw values → class ids (uint8, ignore = 255); values outside the valid set raise."""
        mapped = self.lut[raw]
        if (mapped == INVALID).any():
            bad = np.unique(raw[mapped == INVALID]).tolist()
            valid = np.flatnonzero(self.lut != INVALID).tolist()
            raise LabelValueError(f"label file {path} holds values {bad} outside the valid set of '{self.name}' {_ranges(valid)}")
        return mapped.astype(np.uint8)

    def read_label(self, index: int) -> np.ndarray:
        """The label of item ``index`` in class ids (no transform)."""
        path = self.pairs[index][1]
        return self.map_label(read_label(path), path)

    def read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = self.read_label(index)
        if image.shape[:2] != label.shape:
            raise LabelValueError(_size_mismatch(label_path, label.shape, image_path, image.shape[:2]))
        return image, label

    def check_item(self, index: int) -> list[str]:
        """Every problem of item ``index``, each naming its file: missing, unreadable or truncated files,
        label values outside the valid set, image and label sizes that differ. ``[]`` when it is sound.

        Cheaper than reading the item: JPEG images are decoded at 1/8 scale (which still reads every
        byte of the compressed data, so truncation and corruption show), labels in full (their values).
        """
        image_path, label_path = self.pairs[index]
        problems: list[str] = []
        image_size: Optional[tuple[int, int]] = None
        try:
            with Image.open(image_path) as image:
                image_size = image.size
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
        except FileNotFoundError:
            problems.append(f"image file {image_path} does not exist (listed as item {index})")
        except Exception as error:  # noqa: BLE001 - PIL raises several types for corrupt files
            problems.append(f"cannot read image file {image_path} (truncated or corrupt): {error}")
        try:
            label = self.read_label(index)
        except (DatasetLayoutError, LabelValueError, OSError) as error:
            problems.append(str(error) + (f" (listed as item {index})" if isinstance(error, DatasetLayoutError) else ""))
        else:
            if image_size is not None and label.shape != (image_size[1], image_size[0]):
                problems.append(_size_mismatch(label_path, label.shape, image_path, (image_size[1], image_size[0])))
        return problems

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.read_pair(index)
        if self.transform is not None:
            return self.transform(image, label)
        return {"image": image_to_tensor(image), "label": torch.from_numpy(label.astype(np.int64))}


def _size_mismatch(label_path: Path, label_hw: Sequence[int], image_path: Path, image_hw: Sequence[int]) -> str:
    return (
        f"label file {label_path} is {label_hw[1]}x{label_hw[0]} but its image {image_path} is "
        f"{image_hw[1]}x{image_hw[0]} (width x height); they must match"
    )


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5] → '{0-2, 5}'."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return "{" + ", ".join(parts) + "}"


class VOCSegmentation(SegmentationFolder):
    """PASCAL VOC 2012 + SBD aug, background ignored (20 classes; 10,582 train / 1,449 val).

    Training images come from ``ImageSets/Segmentation/train_aug.txt`` over
    ``SegmentationClassAug`` if that file exists, else from mmseg's pair ``train.txt`` over
    ``SegmentationClass`` plus ``aug.txt`` over ``SegmentationClassAug`` (an id listed in both is
    read once, from ``SegmentationClass``). ``use_aug=false`` trains on ``train.txt`` alone.
    """

    name = "voc"
    root_name = "VOCdevkit/VOC2012"
    expected_tree = """\
VOCdevkit/VOC2012/
  JPEGImages/<id>.jpg
  SegmentationClass/<id>.png          (0 background, 1-20, 255 void)
  SegmentationClassAug/<id>.png       (SBD aug labels, same values)
  ImageSets/Segmentation/train.txt + aug.txt   (or train_aug.txt), val.txt"""
    lut = label_lut(range(1, 21), offset=1, ignore_raw=(0, IGNORE_INDEX))

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        transform: Optional[Transform] = None,
        limit: Optional[int] = None,
        use_aug: bool = True,
    ) -> None:
        self.use_aug = use_aug
        super().__init__(data_dir, split, transform, limit)

    def list_pairs(self) -> list[tuple[Path, Path]]:
        lists = self.root / "ImageSets/Segmentation"
        images = self.root / "JPEGImages"
        if self.split == "val":
            return self.pairs_from_list(lists / "val.txt", images, self.root / "SegmentationClass")
        if self.use_aug and (lists / "train_aug.txt").is_file():
            return self.pairs_from_list(lists / "train_aug.txt", images, self.root / "SegmentationClassAug")
        pairs = self.pairs_from_list(lists / "train.txt", images, self.root / "SegmentationClass")
        if not self.use_aug:
            return pairs
        if not (lists / "aug.txt").is_file():
            raise self.layout_error(
                f"neither {lists / 'train_aug.txt'} nor {lists / 'aug.txt'} exists (SBD aug labels); "
                "set dataset.train_dataset.use_aug=false to train on train.txt alone"
            )
        seen = {image.stem for image, _ in pairs}
        aug = self.pairs_from_list(lists / "aug.txt", images, self.root / "SegmentationClassAug")
        return pairs + [pair for pair in aug if pair[0].stem not in seen]


class COCOStuffSegmentation(SegmentationFolder):
    """COCO-Stuff 164k in mmseg's converted layout (171 classes; 118,287 train / 5,000 val)."""

    name = "coco_stuff"
    root_name = "coco_stuff164k"
    expected_tree = """\
coco_stuff164k/
  images/train2017/<id>.jpg, images/val2017/<id>.jpg
  annotations/train2017/<id>_labelTrainIds.png, annotations/val2017/...   (0-170, 255 unlabeled)"""
    lut = label_lut(range(171), offset=0)

    def list_pairs(self) -> list[tuple[Path, Path]]:
        folder = {"train": "train2017", "val": "val2017"}[self.split]
        return self.pairs_from_folders(self.root / "images" / folder, self.root / "annotations" / folder, "_labelTrainIds.png")


class PascalContext(SegmentationFolder):
    """PASCAL Context in mmseg's layout (4,996 train / 5,104 val with mmseg's lists; 4,998 / 5,105 when
    ``prepare context`` had no Detail file and took VOC2010's Main lists, see :mod:`zeroseg.data.prepare`).

    ``num_classes=59``: raw 0 (background) is ignored and 1–59 become 0–58 (the ZSS protocol);
    ``num_classes=60``: background is class 0 (cross-dataset evaluation as in ZegCLIP).
    """

    name = "context"
    root_name = "VOCdevkit/VOC2010"
    expected_tree = """\
VOCdevkit/VOC2010/
  JPEGImages/<id>.jpg
  SegmentationClassContext/<id>.png        (0 background, 1-59)
  ImageSets/SegmentationContext/train.txt, val.txt"""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        transform: Optional[Transform] = None,
        limit: Optional[int] = None,
        num_classes: int = 59,
    ) -> None:
        if num_classes == 59:
            self.lut = label_lut(range(1, 60), offset=1, ignore_raw=(0, IGNORE_INDEX))
        elif num_classes == 60:
            self.lut = label_lut(range(60), offset=0)
        else:
            raise ValueError(f"dataset 'context': num_classes={num_classes} must be 59 (background ignored) or 60")
        self.name = f"context{num_classes}"  # type: ignore[misc]
        super().__init__(data_dir, split, transform, limit)

    def list_pairs(self) -> list[tuple[Path, Path]]:
        return self.pairs_from_list(
            self.root / "ImageSets/SegmentationContext" / f"{self.split}.txt",
            self.root / "JPEGImages",
            self.root / "SegmentationClassContext",
        )


class ADE20KSegmentation(SegmentationFolder):
    """ADE20K SceneParsing (ADEChallengeData2016) as released: 150 classes, 0 ("other") ignored;
    20,210 training / 2,000 validation images."""

    name = "ade150"
    root_name = "ADEChallengeData2016"
    expected_tree = """\
ADEChallengeData2016/
  images/training/<id>.jpg, images/validation/<id>.jpg
  annotations/training/<id>.png, annotations/validation/<id>.png   (0 other, 1-150)"""
    lut = label_lut(range(1, 151), offset=1, ignore_raw=(0,))

    def list_pairs(self) -> list[tuple[Path, Path]]:
        folder = {"train": "training", "val": "validation"}[self.split]
        return self.pairs_from_folders(self.root / "images" / folder, self.root / "annotations" / folder, ".png")
