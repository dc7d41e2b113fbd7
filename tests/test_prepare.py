"""``python -m zeroseg.data.prepare``: raw downloads (miniature, real formats) → the reader layouts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_trees import write_ade_raw, write_coco_stuff_raw, write_context_raw, write_detail_json, write_voc_raw
from zeroseg.data import ADE20KSegmentation, COCOStuffSegmentation, PascalContext, VOCSegmentation
from zeroseg.data.benchmarks import COCO_STUFF_RAW_NAMES, CONTEXT60_CLASSES, benchmark_split
from zeroseg.data.folders import read_label
from zeroseg.data.prepare import PrepareError, coco_stuff_raw_lut, main, prepare


def test_voc_converts_sbd_mat_and_writes_aug_list(tmp_path: Path) -> None:
    tree = write_voc_raw(tmp_path / "raw")
    out = tmp_path / "data"
    counts = prepare("voc", tmp_path / "raw", out, allow_partial=True)
    assert counts == {"train": 3 + 3, "val": 2}
    root = out / "VOCdevkit/VOC2012"
    assert (root / "ImageSets/Segmentation/aug.txt").read_text().split() == tree["aug"]  # SBD minus VOC train/val
    for i in tree["aug"]:
        assert np.array_equal(read_label(root / "SegmentationClassAug" / f"{i}.png"), tree["sbd_labels"][i])
    train = VOCSegmentation(out, "train")
    assert [p[0].stem for p in train.pairs] == tree["train"] + tree["aug"]
    assert len(VOCSegmentation(out, "val")) == 2
    assert train[5]["label"].shape == (60, 80)


def test_coco_stuff_maps_182_raw_ids_to_171_train_ids(tmp_path: Path) -> None:
    tree = write_coco_stuff_raw(tmp_path / "raw")
    out = tmp_path / "data"
    prepare("coco_stuff", tmp_path / "raw", out, workers=2, allow_partial=True)
    lut = coco_stuff_raw_lut()
    split = benchmark_split("coco_stuff")
    # every used raw id maps to the train id of the same name; unused ids are undefined
    for raw_value, name in enumerate(COCO_STUFF_RAW_NAMES):
        assert (lut[raw_value] == -1) == (name not in split.class_names)
        if lut[raw_value] >= 0:
            assert split.class_names[lut[raw_value]] == name
    dataset = COCOStuffSegmentation(out, "train")
    assert len(dataset) == 3 and len(COCOStuffSegmentation(out, "val")) == 2
    for index, (image, _) in enumerate(dataset.pairs):
        assert torch.equal(dataset[index]["label"], torch.from_numpy(lut[tree["labels"][image.stem]]))


def test_context_maps_459_classes_by_name_and_skips_unannotated_images(tmp_path: Path) -> None:
    tree = write_context_raw(tmp_path / "raw")
    out = tmp_path / "data"
    counts = prepare("context", tmp_path / "raw", out, allow_partial=True)
    assert counts == {"train": 3, "val": 2}  # the unannotated train image is left out
    names = tree["names"]
    for num_classes in (59, 60):
        dataset = PascalContext(out, "train", num_classes=num_classes)
        assert [p[0].stem for p in dataset.pairs] == tree["train"]
    context60 = PascalContext(out, "val", num_classes=60)
    for index, (image, _) in enumerate(context60.pairs):
        raw = tree["labels"][image.stem]
        expected = np.array([CONTEXT60_CLASSES.index(n) if n in CONTEXT60_CLASSES else 0 for n in names])[raw - 1]
        assert torch.equal(context60[index]["label"], torch.from_numpy(expected))


def test_ade_is_linked_and_verified(tmp_path: Path) -> None:
    write_ade_raw(tmp_path / "raw")
    prepare("ade", tmp_path / "raw", tmp_path / "data", link="hardlink", allow_partial=True)
    dataset = ADE20KSegmentation(tmp_path / "data", "val")
    assert len(dataset) == 2
    assert os.path.samefile(
        dataset.pairs[0][0], tmp_path / "raw/ADEChallengeData2016/images/validation" / dataset.pairs[0][0].name
    )


def test_prepare_is_restartable_and_never_touches_raw(tmp_path: Path) -> None:
    write_coco_stuff_raw(tmp_path / "raw")
    raw_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "raw").rglob("*") if p.is_file()}
    out = tmp_path / "data"
    prepare("coco_stuff", tmp_path / "raw", out, allow_partial=True)
    outputs = sorted(p for p in out.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    outputs[0].unlink()  # an interrupted run: one file missing
    prepare("coco_stuff", tmp_path / "raw", out, allow_partial=True)
    assert sorted(p for p in out.rglob("*") if p.is_file()) == outputs
    assert all(p.stat().st_mtime_ns == stamps[p] for p in outputs[1:])  # finished files were skipped
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "raw").rglob("*") if p.is_file()} == raw_files
    write_ade_raw(tmp_path / "ade")
    with pytest.raises(PrepareError, match="overlaps the raw folder"):
        prepare("ade", tmp_path / "ade", tmp_path / "ade", allow_partial=True)


def test_corrupted_raw_files_are_rejected_by_name(tmp_path: Path) -> None:
    write_voc_raw(tmp_path / "raw")
    broken = tmp_path / "raw/benchmark_RELEASE/dataset/cls/2011_000001.mat"
    broken.write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(PrepareError, match=f"cannot read MATLAB file {broken}"):
        prepare("voc", tmp_path / "raw", tmp_path / "data", allow_partial=True)

    write_coco_stuff_raw(tmp_path / "raw2")
    label = tmp_path / "raw2/stuffthingmaps_trainval2017/val2017/val00000001.png"
    from dataset_trees import write_png

    write_png(label, np.full((60, 80), 11))  # raw 11 = "street sign", never used by COCO-Stuff
    with pytest.raises(PrepareError, match=rf"{label} holds raw values \[11\]"):
        prepare("coco_stuff", tmp_path / "raw2", tmp_path / "data2", allow_partial=True)


def test_counts_are_checked_against_the_official_ones(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_ade_raw(tmp_path / "raw")
    with pytest.raises(PrepareError, match="the raw train split has 2 images, the official count is 20210"):
        prepare("ade", tmp_path / "raw", tmp_path / "data")
    assert main(["ade", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "data")]) == 1
    assert "official count is 20210" in capsys.readouterr().err
    assert main(["ade", "--raw", str(tmp_path / "missing"), "--out", str(tmp_path / "data")]) == 1
    assert "ADEChallengeData2016 does not exist" in capsys.readouterr().err


def test_context_labels_without_a_59_class_name_are_an_error(tmp_path: Path) -> None:
    write_context_raw(tmp_path / "raw")
    labels = tmp_path / "raw/labels.txt"
    labels.write_text(labels.read_text().replace(": sheep\n", ": ewe\n"))
    with pytest.raises(PrepareError, match=r"the 59-class names \['sheep'\] are not in the 459-class list"):
        prepare("context", tmp_path / "raw", tmp_path / "data", allow_partial=True)


def test_context_takes_mmsegs_split_from_the_detail_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tree = write_context_raw(tmp_path / "raw")
    # mmseg's lists leave out one annotated image of VOC2010's Main train list; the test split and a
    # 'test' phase image that neither list uses must not leak into train/val either
    mmseg_train, left_out = tree["train"][:2], tree["train"][2]
    write_detail_json(
        tmp_path / "raw/VOCdevkit/VOC2010/trainval_merged.json",
        {"val": tree["val"][::-1], "train": mmseg_train[::-1], "test": [left_out]},
    )
    counts = prepare("context", tmp_path / "raw", tmp_path / "data", allow_partial=True)
    assert counts == {"train": 2, "val": 2}
    lists = tmp_path / "data/VOCdevkit/VOC2010/ImageSets/SegmentationContext"
    assert (lists / "train.txt").read_text().split() == sorted(mmseg_train)  # mmseg writes them sorted
    assert (lists / "val.txt").read_text().split() == sorted(tree["val"])
    assert [p[0].stem for p in PascalContext(tmp_path / "data", "train").pairs] == sorted(mmseg_train)
    assert f"annotated images that mmseg's split leaves out: ['{left_out}']" in capsys.readouterr().err


def test_context_without_the_detail_file_checks_the_main_list_count(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_context_raw(tmp_path / "raw")
    # VOC2010's Main lists with a label hold 4,998 / 5,105 images on the full download, not mmseg's 4,996 / 5,104
    with pytest.raises(PrepareError, match="the count of VOC2010's Main lists with a label is 4998"):
        prepare("context", tmp_path / "raw", tmp_path / "data")
    assert "2 train and 1 val image more than mmseg's 4,996 / 5,104" in capsys.readouterr().err
    write_detail_json(tmp_path / "raw/trainval_merged.json", {"train": ["2008_000000"], "val": []})
    with pytest.raises(PrepareError, match=r"mmseg's count \(Detail lists of trainval_merged.json\) is 4996"):
        prepare("context", tmp_path / "raw", tmp_path / "data")
    (tmp_path / "raw/trainval_merged.json").write_text('{"images": [{"file_name": "x.jpg"}]}')
    with pytest.raises(PrepareError, match="not a PASCAL in Detail annotation file"):
        prepare("context", tmp_path / "raw", tmp_path / "data")
