"""DDP on CPU (gloo, 2 processes) through the real command line: every image evaluated exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zeroseg.train import train

from conftest import TINY_OVERRIDES
from test_cli import run_cli

EVAL_OVERRIDES = [o for o in TINY_OVERRIDES if not o.startswith("callbacks=")]


@pytest.mark.slow
def test_two_process_evaluation_on_an_odd_sized_set_equals_single_process(make_cfg, tmp_path: Path) -> None:
    metrics, _ = train(make_cfg(subdir="train"))
    # 11 test images, batch 4: rank 0 gets 6 images (2 batches), rank 1 gets 5 (2 batches, one short).
    # A padding DistributedSampler would count an image twice and change the metrics.
    common = ["-m", "zeroseg.eval", f"ckpt_path={metrics['ckpt_path']}", *EVAL_OVERRIDES, "dataset.test_dataset.num_images=11"]
    results = {}
    for name, trainer_overrides in {
        "single": ["trainer=cpu"],
        "ddp": [
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            "trainer.sync_batchnorm=false",
            "trainer.benchmark=false",
        ],
    }.items():
        run_dir = tmp_path / name
        result = run_cli([*common, *trainer_overrides, f"hydra.run.dir={run_dir}"], tmp_path, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        results[name] = json.loads((run_dir / "metrics.json").read_text())
    assert "world_size=2" in result.stderr or "distributed_backend=gloo" in result.stderr
    single, ddp = results["single"], results["ddp"]
    for key in ("hIoU", "sIoU", "uIoU", "mIoU", "pAcc"):
        assert ddp[key] == single[key], key
    assert ddp["per_class_iou"] == single["per_class_iou"]
    assert 0 < single["pAcc"] < 100  # not saturated, so double counting would show
