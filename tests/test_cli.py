"""The command lines a user types: defaults-from-any-directory, multirun, W&B offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.loggers import WandbLogger

from zeroseg.train import train

from conftest import TINY_OVERRIDES, subprocess_env

CLI_OVERRIDES = [o for o in TINY_OVERRIDES if not o.startswith("trainer.max_steps")]


def run_cli(args: list[str], cwd: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env["ZEROSEG_CACHE_DIR"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_multirun_of_two_jobs_from_another_directory(tmp_path: Path) -> None:
    result = run_cli(
        ["-m", "zeroseg.train", "-m", "method=baseline", "trainer.max_steps=2,3", *CLI_OVERRIDES], tmp_path, tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics_files = sorted((tmp_path / "logs" / "train" / "multiruns").glob("*/*/metrics.json"))
    assert len(metrics_files) == 2
    steps = sorted(json.loads(f.read_text())["global_step"] for f in metrics_files)
    assert steps == [2, 3]
    assert "hIoU" in result.stdout


@pytest.mark.slow
def test_wandb_logger_runs_offline_without_a_key(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_cfg(["logger=wandb", "trainer.max_steps=2"])
    metrics, objects = train(cfg)
    assert "hIoU" in metrics
    (logger,) = objects["loggers"]
    assert isinstance(logger, WandbLogger)
    run = logger.experiment
    assert run.settings.mode == "offline"
    # the whole resolved config and the run facts were logged
    config = dict(run.config)
    assert config["method"]["_target_"] == "zeroseg.methods.Baseline"
    assert config["model/params_trainable"] > 0
    assert Path(run.dir).is_relative_to(Path(cfg.paths.output_dir))
