"""Done-when of the real-data layer: `train dataset=<voc|coco_stuff|context59>` trains a few steps of
the baseline on miniature trees, and `eval dataset=ade150` evaluates a COCO-Stuff checkpoint
cross-dataset; the configs carry the papers' pipeline and sliding-window inference."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataset_trees import write_ade, write_coco_stuff, write_context, write_voc
from zeroseg.eval import evaluate
from zeroseg.inference import SegmentationInference
from zeroseg.train import train

from conftest import REAL_TINY_OVERRIDES


def test_real_dataset_configs_pin_the_paper_pipeline(make_cfg) -> None:
    cfg = make_cfg(["dataset=voc"])
    assert cfg.dataset.train_dataset.transform.scale == [2048, 512]
    assert cfg.dataset.train_dataset.transform.crop_size == [512, 512]
    assert cfg.dataset.train_dataset.transform.cat_max_ratio == 0.75
    assert cfg.dataset.val_dataset.transform.scale == [2048, 512]
    assert cfg.inference.mode == "slide" and cfg.inference.stride == [426, 426]
    assert make_cfg(["dataset=synthetic"], subdir="s").inference.mode == "whole"
    assert make_cfg(["dataset=ade150"], config_name="eval", subdir="a").dataset.train_dataset is None


@pytest.mark.parametrize("name,writer", [("coco_stuff", write_coco_stuff), ("context59", write_context)])
def test_train_a_few_steps_on_a_miniature_tree(make_cfg, name: str, writer) -> None:
    cfg = make_cfg([f"dataset={name}", *REAL_TINY_OVERRIDES, "trainer.max_steps=2", "trainer.val_check_interval=2"])
    writer(Path(cfg.paths.data_dir))
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 2
    assert isinstance(objects["model"].inference, SegmentationInference) and objects["model"].inference.mode == "slide"
    assert all(math.isfinite(metrics[k]) for k in ("mIoU", "pAcc"))
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert len(written["per_class_iou"]) == objects["datamodule"].split.num_classes


def test_cli_trains_voc_and_ade150_evaluates_a_coco_stuff_checkpoint_cross_dataset(make_cfg, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_voc(data)
    write_coco_stuff(data)
    write_ade(data)
    env = {**os.environ, "ZEROSEG_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    common = ["backbone=resnet10t", "logger=none", "method.head.width=32", f"paths.data_dir={data}", *REAL_TINY_OVERRIDES]
    run = subprocess.run(
        [sys.executable, "-m", "zeroseg.train", "dataset=voc", *common, "callbacks=minimal", "trainer.max_steps=2",
         "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "hydra.run.dir=" + str(tmp_path / "voc_run")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "voc_run/metrics.json").read_text())["global_step"] == 2

    coco_cfg = make_cfg(
        ["dataset=coco_stuff", *REAL_TINY_OVERRIDES, "trainer.max_steps=2", "trainer.val_check_interval=2"], subdir="coco"
    )
    coco_cfg.paths.data_dir = str(data)
    metrics, _ = train(coco_cfg)
    eval_overrides = [o for o in REAL_TINY_OVERRIDES if not o.startswith("dataset.train_dataset.")]  # ADE has no train split
    ade_cfg = make_cfg(["dataset=ade150", f"ckpt_path={metrics['ckpt_path']}", *eval_overrides], config_name="eval", subdir="ade")
    ade_cfg.paths.data_dir = str(data)
    ade_metrics, objects = evaluate(ade_cfg)
    assert len(ade_metrics["per_class_iou"]) == 150 and math.isfinite(ade_metrics["mIoU"])
    assert objects["datamodule"].split.unseen_class_ids == []


PAPER_RECIPES = {"voc": 20000, "coco_stuff": 80000, "context59": 40000}


@pytest.mark.parametrize("name,steps", PAPER_RECIPES.items())
def test_c2s_paper_recipes_pin_the_papers_values(make_cfg, name: str, steps: int) -> None:
    cfg = make_cfg([f"experiment=c2s_{name}_segformer_b4"], tiny=False)
    assert cfg.dataset.split.benchmark == name and cfg.backbone.variant == "b4"
    assert cfg.method._target_ == "zeroseg.methods.CLIPToSeg" and cfg.method.bank_size == 24
    assert cfg.clip.arch == "ViT-B-16" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.max_steps == steps and cfg.dataset.batch_size == 16
    assert cfg.dataset.train_dataset.transform.crop_size == [512, 512]
    assert cfg.method.optimizer.lr == 6.0e-5 and cfg.method.optimizer.weight_decay == 0.01
    assert dict(cfg.method.lr_multipliers) == {"head": 10.0, "latent_decoder": 10.0}
    assert cfg.method.scheduler.warmup_steps == 1500 and cfg.inference.mode == "slide"


def test_c2s_voc_recipe_runs_on_a_miniature_tree(make_cfg) -> None:
    cfg = make_cfg(
        ["experiment=c2s_voc_segformer_b4", *REAL_TINY_OVERRIDES, "clip=tiny_random", "trainer=cpu", "logger=none",
         "callbacks=minimal", "trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.enable_progress_bar=false",
         "method.pseudo_masks.window_sizes=[1,3]", "test=false"],
        tiny=False,
    )  # fmt: skip
    write_voc(Path(cfg.paths.data_dir))
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert math.isfinite(metrics["train/loss"]) and "val/hIoU" in metrics
