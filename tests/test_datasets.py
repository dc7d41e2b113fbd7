"""Real-benchmark readers on miniature trees: splits, counts, remapping, protocol options, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_trees import SIZE, write_ade, write_coco_stuff, write_context, write_image, write_png, write_voc
from zeroseg.data import (
    ADE20KSegmentation,
    COCOStuffSegmentation,
    DatasetLayoutError,
    LabelValueError,
    PascalContext,
    VOCSegmentation,
    ZSSDataModule,
    benchmark_split,
)
from zeroseg.data.benchmarks import BENCHMARKS, COCO_STUFF_RAW_NAMES
from zeroseg.data.protocol import select_training_images


# -- class splits ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,num_classes,unseen_ids",
    [
        ("voc", 20, [15, 16, 17, 18, 19]),
        ("coco_stuff", 171, [19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160]),
        ("context59", 59, [0, 6, 7, 14, 19, 24, 31, 33, 48, 54]),
        ("context60", 60, [1, 7, 8, 15, 20, 25, 32, 34, 49, 55]),
        ("ade150", 150, []),
    ],
)
def test_benchmark_splits_match_the_published_indices(name: str, num_classes: int, unseen_ids: list[int]) -> None:
    split = benchmark_split(name)
    assert split.num_classes == num_classes
    assert split.unseen_class_ids == unseen_ids


def test_coco_stuff_unseen_raw_ids_of_deop_map_to_the_same_names() -> None:
    # DeOP lists the unseen classes by raw stuffthingmaps value (COCO id - 1): an independent check
    deop_raw = [20, 24, 32, 33, 40, 56, 86, 99, 105, 123, 144, 147, 148, 168, 171]
    assert sorted(COCO_STUFF_RAW_NAMES[v] for v in deop_raw) == sorted(BENCHMARKS["coco_stuff"].unseen_class_names)
    assert len(COCO_STUFF_RAW_NAMES) == 182


def test_name_variants_and_renaming_change_prompts_not_ids() -> None:
    reference, readable = benchmark_split("voc"), benchmark_split("voc", names="readable")
    assert "tvmonitor" in reference.class_names and "tv monitor" in readable.class_names
    assert reference.unseen_class_ids == readable.unseen_class_ids
    assert "tv monitor" in readable.unseen_class_names
    renamed = benchmark_split("voc", rename={"tvmonitor": "television"})
    assert renamed.class_names[19] == "television" and "television" in renamed.unseen_class_names
    assert benchmark_split("context59").class_names[54] == "tv monitor"
    assert benchmark_split("context60").class_names[55] == "tvmonitor"
    coco = benchmark_split("coco_stuff", names="readable")
    assert coco.class_names[COCO_STUFF_RAW_NAMES.index("building-other") - 11] == "building"  # 11 unused thing ids before
    with pytest.raises(ValueError, match=r"rename keys \['tv monitor'\] are not class names"):
        benchmark_split("voc", rename={"tv monitor": "tv"})
    with pytest.raises(ValueError, match="benchmark 'kitti' is unknown"):
        benchmark_split("kitti")


# -- readers: counts and remapping ---------------------------------------------------------------------------
@pytest.mark.parametrize("train_aug_file", [False, True])
def test_voc_reader_counts_and_background_rule(tmp_path: Path, train_aug_file: bool) -> None:
    tree = write_voc(tmp_path, train_aug_file=train_aug_file)
    train = VOCSegmentation(tmp_path, "train")
    val = VOCSegmentation(tmp_path, "val")
    assert [p[0].stem for p in train.pairs] == tree["train"]  # the overlapping aug id is read once
    assert len(val) == len(tree["val"])
    if not train_aug_file:
        assert train.pairs[0][1].parent.name == "SegmentationClass" and train.pairs[-1][1].parent.name == "SegmentationClassAug"
        assert len(VOCSegmentation(tmp_path, "train", use_aug=False)) == 4
    for index, (image_path, _) in enumerate(train.pairs):
        raw = tree["labels"][image_path.stem]
        expected = np.where(raw == 0, 255, np.where(raw == 255, 255, raw - 1))
        item = train[index]
        assert item["image"].shape == (3, *SIZE) and item["image"].dtype == torch.float32
        assert torch.equal(item["label"], torch.from_numpy(expected))


@pytest.mark.parametrize(
    "reader,writer,mapping",
    [
        (COCOStuffSegmentation, write_coco_stuff, lambda raw: raw),
        (lambda d, s: PascalContext(d, s, num_classes=59), write_context, lambda raw: np.where(raw == 0, 255, raw - 1)),
        (lambda d, s: PascalContext(d, s, num_classes=60), write_context, lambda raw: raw),
        (ADE20KSegmentation, write_ade, lambda raw: np.where(raw == 0, 255, raw - 1)),
    ],
    ids=["coco_stuff", "context59", "context60", "ade150"],
)
def test_readers_count_and_remap(tmp_path: Path, reader, writer, mapping) -> None:
    tree = writer(tmp_path)
    for split in ("train", "val"):
        dataset = reader(tmp_path, split)
        assert [p[0].stem for p in dataset.pairs] == tree[split]
        for index, (image_path, _) in enumerate(dataset.pairs):
            assert torch.equal(dataset[index]["label"], torch.from_numpy(mapping(tree["labels"][image_path.stem])))


def test_inductive_training_labels_hold_no_unseen_id_and_eval_labels_keep_them(tmp_path: Path) -> None:
    write_voc(tmp_path, n_train=6, n_aug=0)
    split = benchmark_split("voc")
    datamodule = ZSSDataModule(
        split, lambda: VOCSegmentation(tmp_path, "train", use_aug=False), lambda: VOCSegmentation(tmp_path, "val"), batch_size=2
    )
    datamodule.setup("fit")
    raw_train = VOCSegmentation(tmp_path, "train", use_aug=False)
    seen_ids = split.seen_class_ids
    for index in range(len(raw_train)):
        full = raw_train[index]["label"]
        train = datamodule.datasets["train"][index]["label"]
        assert set(train.unique().tolist()) <= set(range(15)) | {255}
        unseen_pixels = torch.isin(full, torch.tensor(split.unseen_class_ids))
        assert bool((train[unseen_pixels] == 255).all())
        seen_pixels = torch.isin(full, torch.tensor(seen_ids))
        assert torch.equal(train[seen_pixels], torch.searchsorted(torch.tensor(seen_ids), full[seen_pixels]))


def test_protocol_options_remove_what_they_say(tmp_path: Path) -> None:
    write_coco_stuff(tmp_path, n_train=8)
    split = benchmark_split("coco_stuff")
    dataset = COCOStuffSegmentation(tmp_path, "train")
    # make image 0 unseen-only and image 1 free of unseen classes, by hand
    unseen, seen = split.unseen_class_ids, split.seen_class_ids
    write_png(dataset.pairs[0][1], np.full(SIZE, unseen[0]))
    write_png(dataset.pairs[1][1], np.full(SIZE, seen[0]))
    labels = [dataset.read_label(i) for i in range(len(dataset))]
    has_unseen = [bool(np.isin(lab, unseen).any()) for lab in labels]
    all_ignore = [bool((~np.isin(lab, seen)).all()) for lab in labels]

    def kept(**options) -> tuple[list[int], dict]:
        dm = ZSSDataModule(
            split,
            lambda: COCOStuffSegmentation(tmp_path, "train"),
            lambda: COCOStuffSegmentation(tmp_path, "val"),
            batch_size=1,
            cache_dir=str(tmp_path / "cache"),
            **options,
        )
        dm.setup("fit")
        subset = dm.datasets["train"].dataset
        return (list(subset.indices) if hasattr(subset, "indices") else list(range(len(subset)))), dm.training_set_report

    indices, report = kept(drop_images_with_unseen=True)
    assert indices == [i for i in range(8) if not has_unseen[i]]
    assert report["drop_images_with_unseen"]["removed_images"] == sum(has_unseen)
    assert report["unseen_pixels_to_ignore"] == sum(int(np.isin(lab, unseen).sum()) for lab in labels)
    indices, report = kept(skip_all_ignore=True)
    assert indices == [i for i in range(8) if not all_ignore[i]] and 0 not in indices
    assert report["kept_trainable_pixels"] == sum(int(np.isin(lab, seen).sum()) for lab in labels)
    indices, report = kept()
    assert indices == list(range(8)) and report["kept_images"] == 8
    assert any((tmp_path / "cache/label_stats").iterdir())  # counts were cached


def test_select_training_images_on_hand_counts() -> None:
    split = benchmark_split("voc")
    hist = np.zeros((3, 21), dtype=np.int64)
    hist[0, [0, 16]] = [10, 5]  # seen 0, unseen 16
    hist[1, [16, 20]] = [7, 3]  # unseen only + ignore
    hist[2, [1, 20]] = [4, 4]  # seen only
    keep, report = select_training_images(hist, split, "inductive", drop_images_with_unseen=True, skip_all_ignore=True)
    assert keep.tolist() == [2]
    assert report["drop_images_with_unseen"] == {"removed_images": 2, "removed_trainable_pixels": 10, "kept_images": 1}
    assert report["skip_all_ignore"]["removed_images"] == 0
    keep, report = select_training_images(hist, split, "inductive", skip_all_ignore=True)
    assert keep.tolist() == [0, 2] and report["unseen_pixels_to_ignore"] == 12


# -- errors ------------------------------------------------------------------------------------------------------
def test_missing_root_prints_the_expected_tree(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"(?s)folder .*VOCdevkit/VOC2012 does not exist.*SegmentationClassAug/<id>.png"):
        VOCSegmentation(tmp_path, "train")
    write_voc(tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/aug.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="use_aug=false"):
        VOCSegmentation(tmp_path, "train")
    with pytest.raises(DatasetLayoutError, match=r"(?s)ADEChallengeData2016 does not exist.*annotations/training"):
        ADE20KSegmentation(tmp_path, "val")


def test_unreadable_files_out_of_range_values_and_size_mismatch_name_the_file(tmp_path: Path) -> None:
    write_ade(tmp_path, n_val=4)
    dataset = ADE20KSegmentation(tmp_path, "val")
    (image0, _), (_, label1), (image2, label2), (_, label3) = dataset.pairs
    image0.write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match=f"cannot read image file {image0}"):
        dataset[0]
    write_png(label1, np.full(SIZE, 151))
    with pytest.raises(
        LabelValueError, match=rf"label file {label1} holds values \[151\] outside the valid set of 'ade150' {{0-150}}"
    ):
        dataset[1]
    write_image(image2, np.random.default_rng(0), size=(30, 40))
    with pytest.raises(LabelValueError, match=f"label file {label2} is 80x60 but its image {image2} is 40x30"):
        dataset[2]
    from PIL import Image

    Image.new("RGB", (SIZE[1], SIZE[0])).save(label3)
    with pytest.raises(LabelValueError, match=f"label file {label3} has image mode RGB"):
        dataset[3]
    label1.unlink()
    with pytest.raises(DatasetLayoutError, match="have no label"):
        ADE20KSegmentation(tmp_path, "val")


# -- evaluation protocol: does the test split reuse validation images? -----------------------------------------
@pytest.mark.parametrize(
    "name,writer",
    [("voc", write_voc), ("coco_stuff", write_coco_stuff), ("context59", write_context), ("context60", write_context),
     ("ade150", write_ade)],
)  # fmt: skip
def test_real_benchmarks_test_on_their_validation_images(make_cfg, name: str, writer) -> None:
    import hydra

    cfg = make_cfg([f"dataset={name}"], config_name="eval" if name == "ade150" else "train")
    writer(Path(cfg.paths.data_dir))
    datamodule = hydra.utils.instantiate(cfg.dataset)
    shared, evidence = datamodule.test_shares_validation_images()
    assert shared and "test split is the validation split" in evidence


def test_separately_configured_splits_are_compared_image_by_image(tmp_path: Path) -> None:
    tree = write_voc(tmp_path, n_train=3, n_aug=0, n_val=3)
    assert not set(tree["train"]) & set(tree["val"])  # the writer's ids: train and val are disjoint

    def reader(split: str, limit=None):
        return lambda: VOCSegmentation(tmp_path, split, use_aug=False, limit=limit)

    split = benchmark_split("voc")
    # a test reader of its own that lists two of the validation images
    overlapping = ZSSDataModule(split, reader("train"), reader("val"), reader("val", limit=2))
    assert overlapping.test_shares_validation_images() == (True, "2 of the 2 test images are also validation images")
    disjoint = ZSSDataModule(split, reader("val"), reader("val"), reader("train"))
    shared, evidence = disjoint.test_shares_validation_images()
    assert not shared and "the 3 test images and the 3 validation images are disjoint" == evidence


def test_unknown_test_images_do_not_count_as_disjoint() -> None:
    class Opaque(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

    split = benchmark_split("voc")
    datamodule = ZSSDataModule(split, None, lambda: Opaque(), lambda: Opaque())
    shared, evidence = datamodule.test_shares_validation_images()
    assert shared and "cannot be compared" in evidence
