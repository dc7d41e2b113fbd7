"""Miniature dataset trees in the exact on-disk layouts (reader layouts and raw downloads).

Labels are random rectangles of classes over a background value, so crops hold several classes.
Every writer returns what it wrote (ids / counts) so tests can check the readers against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy.io import savemat

SIZE = (60, 80)  # (height, width) of the miniature images


def random_label(rng: np.random.Generator, values: Sequence[int], background: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    label = np.full(size, background, dtype=np.int64)
    for _ in range(4):
        top, left = rng.integers(0, size[0] - 10), rng.integers(0, size[1] - 10)
        h, w = rng.integers(8, size[0] // 2), rng.integers(8, size[1] // 2)
        label[top : top + h, left : left + w] = rng.choice(values)
    return label


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=90)


def write_png(path: Path, label: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8))
    if palette:  # VOC's SegmentationClass PNGs are palette images whose indices are the labels
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, (37 * i) % 256, (91 * i) % 256)])
    image.save(path)


def write_list(path: Path, ids: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}_{i:06d}" for i in range(count)]


# -- reader layouts -------------------------------------------------------------------------------------
def write_voc(
    data_dir: Path, n_train: int = 4, n_aug: int = 3, n_val: int = 3, train_aug_file: bool = False, seed: int = 0
) -> dict:
    """VOCdevkit/VOC2012 with mmseg's train.txt + aug.txt (or one train_aug.txt)."""
    rng = np.random.default_rng(seed)
    root = data_dir / "VOCdevkit/VOC2012"
    train, aug, val = ids("2007", n_train), ids("2008", n_aug), ids("2010", n_val)
    labels = {}
    for i in train + aug + val:
        write_image(root / "JPEGImages" / f"{i}.jpg", rng)
        labels[i] = random_label(rng, list(range(1, 21)) + [255], background=0)
        if i in train or i in val:
            write_png(root / "SegmentationClass" / f"{i}.png", labels[i], palette=True)
        if i in aug or train_aug_file:
            write_png(root / "SegmentationClassAug" / f"{i}.png", labels[i])
    lists = root / "ImageSets/Segmentation"
    if train_aug_file:
        write_list(lists / "train_aug.txt", train + aug)
    else:
        write_list(lists / "train.txt", train)
        write_list(lists / "aug.txt", aug + train[:1])  # an overlap, read once
    write_list(lists / "val.txt", val)
    return {"train": train + aug, "val": val, "labels": labels}


def write_coco_stuff(data_dir: Path, n_train: int = 4, n_val: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root = data_dir / "coco_stuff164k"
    out = {"labels": {}}
    for split, folder, count in (("train", "train2017", n_train), ("val", "val2017", n_val)):
        names = [f"{i:012d}" for i in range(count)] if split == "train" else [f"{900000 + i:012d}" for i in range(count)]
        out[split] = names
        for name in names:
            write_image(root / "images" / folder / f"{name}.jpg", rng)
            out["labels"][name] = random_label(rng, list(range(171)), background=255)
            write_png(root / "annotations" / folder / f"{name}_labelTrainIds.png", out["labels"][name])
    return out


def write_context(data_dir: Path, n_train: int = 4, n_val: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root = data_dir / "VOCdevkit/VOC2010"
    train, val = ids("2008", n_train), ids("2009", n_val)
    labels = {}
    for i in train + val:
        write_image(root / "JPEGImages" / f"{i}.jpg", rng)
        labels[i] = random_label(rng, list(range(1, 60)), background=0)
        write_png(root / "SegmentationClassContext" / f"{i}.png", labels[i])
    write_list(root / "ImageSets/SegmentationContext/train.txt", train)
    write_list(root / "ImageSets/SegmentationContext/val.txt", val)
    return {"train": train, "val": val, "labels": labels}


def write_ade(data_dir: Path, n_train: int = 2, n_val: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root = data_dir / "ADEChallengeData2016"
    out = {"labels": {}}
    for split, folder, count in (("train", "training", n_train), ("val", "validation", n_val)):
        names = [f"ADE_{folder}_{i:08d}" for i in range(count)]
        out[split] = names
        for name in names:
            write_image(root / "images" / folder / f"{name}.jpg", rng)
            out["labels"][name] = random_label(rng, list(range(1, 151)), background=0)
            write_png(root / "annotations" / folder / f"{name}.png", out["labels"][name])
    return out


# -- raw downloads ---------------------------------------------------------------------------------------
def write_voc_raw(raw: Path, seed: int = 0) -> dict:
    """VOC2012 (train 3, val 2) + SBD (cls .mat for 5 ids: 1 VOC train, 1 VOC val, 3 new)."""
    rng = np.random.default_rng(seed)
    voc = raw / "VOCdevkit/VOC2012"
    train, val, extra = ids("2007", 3), ids("2010", 2), ids("2011", 3)
    for i in train + val + extra:
        write_image(voc / "JPEGImages" / f"{i}.jpg", rng)
    for i in train + val:
        write_png(voc / "SegmentationClass" / f"{i}.png", random_label(rng, list(range(1, 21)) + [255], 0), palette=True)
    write_list(voc / "ImageSets/Segmentation/train.txt", train)
    write_list(voc / "ImageSets/Segmentation/val.txt", val)
    sbd = raw / "benchmark_RELEASE/dataset"
    sbd_ids = [train[0], val[0], *extra]
    sbd_labels = {}
    for i in sbd_ids:
        sbd_labels[i] = random_label(rng, list(range(1, 21)), 0).astype(np.uint8)
        (sbd / "cls").mkdir(parents=True, exist_ok=True)
        savemat(
            sbd / "cls" / f"{i}.mat",
            {"GTcls": {"Segmentation": sbd_labels[i], "Boundaries": np.zeros(1), "CategoriesPresent": np.zeros(1)}},
        )
    write_list(sbd / "train.txt", sbd_ids[:3])
    write_list(sbd / "val.txt", sbd_ids[3:])
    return {"train": train, "val": val, "aug": extra, "sbd_labels": sbd_labels}


def write_coco_stuff_raw(raw: Path, seed: int = 0) -> dict:
    """COCO images + stuffthingmaps with raw values (COCO id - 1), including 255."""
    from zeroseg.data.benchmarks import COCO_STUFF_RAW_NAMES, COCO_STUFF_UNUSED_RAW_NAMES

    rng = np.random.default_rng(seed)
    used = [v for v, n in enumerate(COCO_STUFF_RAW_NAMES) if n not in COCO_STUFF_UNUSED_RAW_NAMES]
    labels = {}
    for folder, count in (("train2017", 3), ("val2017", 2)):
        for i in range(count):
            name = f"{folder[:-4]}{i:08d}"
            write_image(raw / folder / f"{name}.jpg", rng)
            labels[name] = random_label(rng, used, background=255)
            write_png(raw / "stuffthingmaps_trainval2017" / folder / f"{name}.png", labels[name])
    return {"labels": labels}


CONTEXT_459_NAMES = ("accordion", "aeroplane", "air conditioner", "antenna")  # a few of the 459 (prefix of labels.txt)


def write_context_raw(raw: Path, seed: int = 0) -> dict:
    """VOC2010 + trainval/*.mat ('LabelMap', 459-class ids) + labels.txt with the 59 names and others."""
    from zeroseg.data.benchmarks import CONTEXT60_CLASSES

    rng = np.random.default_rng(seed)
    names = sorted(set(CONTEXT_459_NAMES) | set(CONTEXT60_CLASSES[1:]) | {"zebra crossing", "ladder"})
    (raw).mkdir(parents=True, exist_ok=True)
    (raw / "labels.txt").write_text("".join(f"{k}: {n}\n" for k, n in enumerate(names, start=1)))
    voc = raw / "VOCdevkit/VOC2010"
    train, val, unannotated = ids("2008", 3), ids("2009", 2), ids("2010", 1)
    labels = {}
    for i in train + val + unannotated:
        write_image(voc / "JPEGImages" / f"{i}.jpg", rng)
    for i in train + val:
        labels[i] = random_label(rng, list(range(1, len(names) + 1)), background=1).astype(np.uint16)
        (raw / "trainval").mkdir(parents=True, exist_ok=True)
        savemat(raw / "trainval" / f"{i}.mat", {"LabelMap": labels[i]})
    write_list(voc / "ImageSets/Main/train.txt", train + unannotated)
    write_list(voc / "ImageSets/Main/val.txt", val)
    return {"train": train, "val": val, "names": names, "labels": labels}


def write_detail_json(path: Path, phases: dict[str, Sequence[str]]) -> None:
    """A PASCAL in Detail annotation file (``trainval_merged.json``) reduced to what a split needs:
    its ``images`` entries (``image_id`` as the Detail API numbers them, ``file_name``, ``phase``)
    and the other top-level keys, empty."""
    import json

    images = [
        {"image_id": int(i.replace("_", "")), "file_name": f"{i}.jpg", "phase": phase, "width": SIZE[1], "height": SIZE[0]}
        for phase, names in phases.items()
        for i in names
    ]
    content = {"info": {}, "images": images, "categories": [], "annos_segmentation": [], "annos_occlusion": [],
               "annos_boundary": [], "annos_joints": [], "parts": []}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def write_ade_raw(raw: Path, seed: int = 0) -> dict:
    return write_ade(raw, n_train=2, n_val=2, seed=seed)
