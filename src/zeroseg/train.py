"""``python -m zeroseg.train [overrides]``: train a method, then test its best checkpoint.

``train(cfg)`` is a plain function (tests call it); ``main`` is the thin Hydra entry point.
Every run writes into its output directory the resolved ``config.yaml``, checkpoints, logs and
``metrics.json`` (the final test metrics), and prints a final table. ``ckpt_path=...`` resumes
training exactly: step, optimizer, scheduler, data order, RNG states and best-checkpoint tracking;
``resume=auto`` does the same from the newest run of the same config, inside its directory.

A run told to stop (SIGTERM, SIGUSR1) saves ``last.ckpt`` at the current step and exits with status
128 + the signal; a non-finite loss stops it with an error naming the step (see ``zeroseg.callbacks``).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from zeroseg.build import build_run, check_checkpoint_fits, check_checkpoint_path
from zeroseg.callbacks import RunInterrupted
from zeroseg.utils import (
    continue_csv_logs,
    log_hyperparameters,
    save_resolved_config,
    task_wrapper,
    warn_unknown_keys,
    write_run_outputs,
)
from zeroseg.utils.console import quiet_known_noise
from zeroseg.utils.run_dirs import run_lock

log = logging.getLogger(__name__)

__all__ = ["train", "main", "resume_checkpoint"]

RESUME_MODES = (None, "auto")


def resume_checkpoint(cfg: DictConfig) -> Optional[str]:
    """The checkpoint to continue from: ``ckpt_path`` if given, else with ``resume=auto`` the run
    directory's ``checkpoints/last.ckpt`` if there is one (none: a fresh start)."""
    resume = cfg.get("resume")
    if resume not in RESUME_MODES:
        raise ValueError(f"resume={resume!r}: expected resume=auto (continue the newest run of this config) or null")
    if cfg.get("ckpt_path") is not None:
        return check_checkpoint_path(cfg.ckpt_path)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if resume == "auto":
        if last.is_file():
            return str(last)
        log.info("resume=auto: no earlier run of this config with a checkpoint; starting a new run")
    return None


def _interrupted(error: SIGTERMException, stage: str) -> RunInterrupted:
    # Lightning raises this (an exit with status 0) for a SIGTERM outside the training steps
    message = f"SIGTERM during {stage}: stopped; continue with the same command plus resume=auto"
    log.warning(message)
    return RunInterrupted(signal.SIGTERM, message)


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit ``cfg.method`` on ``cfg.dataset``; test the best checkpoint; return (metrics, objects)."""
    warn_unknown_keys(cfg, "train")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resume_checkpoint(cfg)
    with run_lock(cfg.paths.output_dir):
        save_resolved_config(cfg)
        objects = build_run(cfg)
        model, datamodule, trainer = objects["model"], objects["datamodule"], objects["trainer"]
        if ckpt_path is not None:
            resumed_step = int(check_checkpoint_fits(ckpt_path, model).get("global_step", 0))
            if Path(ckpt_path).resolve().is_relative_to(Path(cfg.paths.output_dir).resolve()):
                continue_csv_logs(objects["loggers"], resumed_step)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log_hyperparameters(objects["loggers"], cfg, {"model/params_trainable": trainable, "data/classes": model.describe()})

        if cfg.get("train", True):
            log.info("training (resume from %s)", ckpt_path) if ckpt_path else log.info("training")
            try:
                trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
            except SIGTERMException as error:
                raise _interrupted(error, "training") from error
        train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

        test_metrics: dict[str, Any] = {}
        if cfg.get("test", True):
            best_path: Optional[str] = None
            if trainer.checkpoint_callback is not None:
                best_path = trainer.checkpoint_callback.best_model_path or None
            if best_path is None:
                log.warning("no best checkpoint was saved: testing the current weights")
            log.info("testing checkpoint %s", best_path)
            try:
                trainer.test(model=model, datamodule=datamodule, ckpt_path=best_path)
            except SIGTERMException as error:
                raise _interrupted(error, "the final test") from error
            test_metrics = {**model.test_results, "ckpt_path": best_path or "", "global_step": int(trainer.global_step)}
            write_run_outputs(cfg, test_metrics, set(datamodule.split.unseen_class_names), title="test")
    return {**train_metrics, **test_metrics}, objects


@hydra.main(version_base="1.3", config_path="pkg://zeroseg.conf", config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    quiet_known_noise()
    metrics, _ = train(cfg)
    optimized = cfg.get("optimized_metric")
    return float(metrics[optimized]) if optimized and optimized in metrics else None


if __name__ == "__main__":
    main()
