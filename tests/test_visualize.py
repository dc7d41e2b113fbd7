"""What a run shows of itself: per-class IoU tables, the unseen-class confusion, prediction overlays,
to W&B (offline here) or as PNG/CSV in the run directory (zeroseg.visualize.SegmentationVisuals)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from zeroseg.metrics import HarmonicIoU, confusion_matrix
from zeroseg.train import train
from zeroseg.visualize import SegmentationVisuals, per_class_rows, unseen_confusion_rows

from conftest import TINY_OVERRIDES, subprocess_env

# 5 classes, two of them unseen; "ghost" (unseen) is never in the ground truth
NAMES = ["sky", "cat", "grass", "dog", "ghost"]
UNSEEN = [1, 3, 4]
# a tiny hand-made case: rows are pixels (target, prediction); 255 is ignored
PIXELS = [
    (0, 0), (0, 0), (0, 2),
    (1, 1), (1, 0), (1, 0), (1, 2), (1, 3),
    (2, 2), (2, 2), (2, 1),
    (3, 2), (3, 2), (3, 3), (3, 0),
    (255, 1), (255, 3),
]  # fmt: skip


def hand_made() -> tuple[torch.Tensor, torch.Tensor]:
    target, prediction = (torch.tensor([p[k] for p in PIXELS]).view(1, 1, -1) for k in (0, 1))
    return prediction, target


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_unseen_confusion_is_the_share_of_each_unseen_class_given_to_each_class() -> None:
    prediction, target = hand_made()
    confmat = confusion_matrix(prediction, target, len(NAMES), 255)
    rows = unseen_confusion_rows(confmat, NAMES, UNSEEN, top_k=2)

    # reference: count with numpy, pixel by pixel
    t, p = target.numpy().ravel(), prediction.numpy().ravel()
    expected = []
    for u in UNSEEN:
        mine = p[t == u]
        if mine.size == 0:
            continue
        counts = np.bincount(mine, minlength=len(NAMES))
        order = sorted((c for c in range(len(NAMES)) if counts[c]), key=lambda c: (-counts[c], c))[:2]
        seen_share = counts[[c for c in range(len(NAMES)) if c not in UNSEEN]].sum() / mine.size
        for rank, c in enumerate(order, start=1):
            expected.append((NAMES[u], mine.size, counts[u] / mine.size, seen_share, rank, NAMES[c], counts[c] / mine.size))
    got = [
        (r["unseen_class"], r["gt_pixels"], r["correct"], r["to_seen"], r["rank"], r["predicted_as"], r["fraction"]) for r in rows
    ]
    assert [g[:2] + (g[4], g[5]) for g in got] == [e[:2] + (e[4], e[5]) for e in expected]
    np.testing.assert_allclose([g[2:4] + (g[6],) for g in got], [e[2:4] + (e[6],) for e in expected], rtol=0, atol=1e-12)
    # cat: 2 of its 5 pixels went to sky, its seen bias is 3/5 (sky + grass)
    assert got[0] == ("cat", 5, 0.2, 0.6, 1, "sky", 0.4)
    assert {r["predicted_split"] for r in rows if r["predicted_as"] == "grass"} == {"seen"}
    assert "ghost" not in {r["unseen_class"] for r in rows}  # absent from the ground truth: no row


def test_per_class_rows_are_the_metrics_own_per_class_iou() -> None:
    prediction, target = hand_made()
    metric = HarmonicIoU(len(NAMES), UNSEEN, 255)
    metric.update(prediction, target)
    per_class_iou = metric.compute()["per_class_iou"].tolist()
    rows = per_class_rows(metric.confmat, NAMES, UNSEEN)
    assert [r["class"] for r in rows] == NAMES
    assert [r["split"] for r in rows] == ["seen", "unseen", "seen", "unseen", "unseen"]
    for row, iou in zip(rows, per_class_iou):
        assert (row["iou"] is None) if math.isnan(iou) else row["iou"] == iou
    assert rows[4]["iou"] is None  # ghost: neither predicted nor present, so no IoU (as in the metric)
    assert [r["gt_pixels"] for r in rows] == [3, 5, 3, 4, 0]
    assert [r["pred_pixels"] for r in rows] == [5, 2, 6, 2, 0]


def test_only_rank_zero_reports(tmp_path: Path) -> None:
    prediction, target = hand_made()
    module = SimpleNamespace(class_names=NAMES, unseen_class_ids=UNSEEN, ignore_index=255)
    reports = {}
    for rank in (1, 0):
        metric = HarmonicIoU(len(NAMES), UNSEEN, 255)
        metric.update(prediction, target)
        callback = SegmentationVisuals(num_images=0, output_dir=str(tmp_path / f"rank{rank}"))
        trainer = SimpleNamespace(is_global_zero=rank == 0, global_step=7, loggers=[], sanity_checking=False)
        callback._report(trainer, module, "val", metric, dataset=None)
        reports[rank] = callback.last_report
        # the metric's own state is untouched: the method computes and resets it afterwards
        assert int(metric.confmat.sum()) == 15
    assert reports[1] == {} and not (tmp_path / "rank1").exists()
    assert (tmp_path / "rank0" / "val_step000007" / "per_class_iou.csv").is_file()


def test_overlays_are_drawn_at_the_label_size(tmp_path: Path) -> None:
    # real test sets keep labels at their original size while the image is resized (as the metric does)
    import contextlib

    calls = []

    def segment(images: torch.Tensor, size) -> torch.Tensor:
        calls.append((tuple(images.shape[-2:]), tuple(size)))
        logits = torch.zeros(1, len(NAMES), *size)
        logits[:, 2] = 1.0
        return logits

    module = SimpleNamespace(
        class_names=NAMES, unseen_class_ids=UNSEEN, ignore_index=255, device=torch.device("cpu"), training=False,
        segment=segment, eval=lambda: None, train=lambda mode=True: None,
    )  # fmt: skip
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(val_step_context=contextlib.nullcontext))
    dataset = [{"image": torch.rand(3, 20, 30), "label": torch.full((40, 60), 255)}]
    (sample,) = SegmentationVisuals(num_images=2)._predict_samples(trainer, module, dataset)
    assert calls == [((20, 30), (40, 60))]
    assert sample["image"].shape == (40, 60, 3) and sample["target"].shape == sample["prediction"].shape == (40, 60)
    assert (sample["prediction"] == 2).all()


def train_with_visuals(make_cfg, logger: str):
    # the default callbacks (they hold the visuals entry) with the tiny run of the other tests
    cfg = make_cfg([f"logger={logger}", "callbacks=default"])
    metrics, objects = train(cfg)
    (callback,) = [c for c in objects["callbacks"] if isinstance(c, SegmentationVisuals)]
    return cfg, metrics, objects, callback


def test_png_and_csv_in_the_run_directory_without_wandb(make_cfg) -> None:
    cfg, metrics, objects, callback = train_with_visuals(make_cfg, "csv")
    visuals = Path(cfg.paths.output_dir) / "visuals"
    # every validation (steps 2 and 4) and the test
    assert sorted(p.name for p in visuals.iterdir()) == ["test_step000004", "val_step000002", "val_step000004"]
    val_images = {
        tuple(sorted(p.name for p in (visuals / d).glob("overlay_*.png"))) for d in ("val_step000002", "val_step000004")
    }
    assert val_images == {("overlay_00000.png", "overlay_00003.png", "overlay_00005.png", "overlay_00008.png")}  # fixed set

    # the test table is the metric's own per-class IoU (metrics.json), unseen classes marked
    rows = read_csv(visuals / "test_step000004" / "per_class_iou.csv")
    reported = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["per_class_iou"]
    split = objects["datamodule"].split
    assert [r["class"] for r in rows] == list(split.class_names)
    assert {r["class"] for r in rows if r["split"] == "unseen"} == set(split.unseen_class_names)
    for row in rows:
        expected = reported[row["class"]]
        assert (row["iou"] == "") if expected is None or math.isnan(expected) else float(row["iou"]) == expected

    # the confusion rows agree with the table's pixel counts and list the largest shares first
    confusion = read_csv(visuals / "test_step000004" / "unseen_confusion.csv")
    gt_pixels = {r["class"]: int(r["gt_pixels"]) for r in rows}
    assert confusion and {r["unseen_class"] for r in confusion} <= set(split.unseen_class_names)
    for name in {r["unseen_class"] for r in confusion}:
        mine = [r for r in confusion if r["unseen_class"] == name]
        assert all(int(r["gt_pixels"]) == gt_pixels[name] for r in mine)
        fractions = [float(r["fraction"]) for r in mine]
        assert fractions == sorted(fractions, reverse=True) and [int(r["rank"]) for r in mine] == list(range(1, len(mine) + 1))

    # the overlays show the tested model's prediction of those very images
    model, dataset = objects["model"].eval(), objects["datamodule"].datasets["test"]
    samples = callback.last_report["test"]["samples"]
    assert [s["index"] for s in samples] == [0, 3, 7, 10]
    with torch.no_grad():
        for sample in samples:
            image = dataset[sample["index"]]["image"]
            np.testing.assert_array_equal(sample["prediction"], model.segment(image[None]).argmax(1)[0].numpy())
            np.testing.assert_array_equal(sample["target"], dataset[sample["index"]]["label"].numpy())
    panel = Image.open(visuals / "test_step000004" / "overlay_00000.png")
    assert panel.width >= 3 * 160  # image | ground truth | prediction, enlarged from 32 pixels


def test_wandb_offline_files_hold_overlays_with_class_labels_and_tables(make_cfg) -> None:
    cfg, metrics, objects, callback = train_with_visuals(make_cfg, "wandb")
    run_dir = Path(cfg.paths.output_dir)
    assert not (run_dir / "visuals").exists()  # files: auto writes PNG/CSV only without W&B
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    media = offline / "files" / "media"
    # 4 images per report (2 validations + test), each with a prediction and a ground-truth mask
    assert len(list((media / "images" / "val").glob("overlays_*.png"))) == 8
    assert len(list((media / "images" / "test").glob("overlays_*.png"))) == 4
    assert len(list((media / "images" / "mask" / "val").glob("overlays_*.mask.png"))) == 16

    # the run file records the mask class labels (unseen classes marked, ignore named)
    record = next(offline.glob("run-*.wandb")).read_bytes()
    for text in (b'"mask/class_labels"', b"val/overlays_wandb_delimeter_prediction", b"val/overlays_wandb_delimeter_ground_truth",
                 b'"cyan grid (unseen)"', b'"red stripes"', b'"255":"ignore"'):  # fmt: skip
        assert text in record, text

    # the per-class table of the test: the metric's own numbers, seen/unseen marked
    (table_file,) = list((media / "table" / "test").glob("per_class_iou_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["class_id", "class", "split", "iou", "gt_pixels", "pred_pixels"]
    reported = json.loads((run_dir / "metrics.json").read_text())["per_class_iou"]
    split = objects["datamodule"].split
    assert {row[1] for row in table["data"] if row[2] == "unseen"} == set(split.unseen_class_names)
    for row in table["data"]:
        expected = reported[row[1]]
        assert row[3] is None if expected is None or math.isnan(expected) else row[3] == pytest.approx(expected, abs=1e-9)
    assert len(list((media / "table" / "val").glob("unseen_confusion_*.table.json"))) == 2


@pytest.mark.slow
def test_two_processes_report_the_confusion_of_both(tmp_path: Path) -> None:
    # 11 test images over 2 ranks: the table must count every image once, summed over the ranks
    overrides = [o for o in TINY_OVERRIDES if not o.startswith(("logger=", "callbacks="))]
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "trainer.sync_batchnorm=false", "trainer.benchmark=false"]  # fmt: skip
    run_dir = tmp_path / "run"
    env = {**subprocess_env(), "ZEROSEG_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "zeroseg.train", *overrides, "logger=csv", "callbacks=default", *ddp, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(run_dir / "visuals" / "test_step000004" / "per_class_iou.csv")
    assert sum(int(r["gt_pixels"]) for r in rows) == 11 * 32 * 32
    reported = json.loads((run_dir / "metrics.json").read_text())["per_class_iou"]
    for row in rows:
        expected = reported[row["class"]]
        assert (row["iou"] == "") if expected is None or math.isnan(expected) else float(row["iou"]) == expected
