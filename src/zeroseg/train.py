"""``python -m zeroseg.train [overrides]``: train a method, then test one of its checkpoints.

``train(cfg)`` is a plain function (tests call it); ``main`` is the thin Hydra entry point.
Every run writes into its output directory the resolved ``config.yaml``, checkpoints, logs and
``metrics.json`` (the final test metrics), and prints a final table. ``ckpt_path=...`` resumes
training exactly: step, optimizer, scheduler, data order, RNG states and best-checkpoint tracking;
``resume=auto`` does the same from the newest run of the same config, inside its directory.

Which checkpoint the final test uses is ``test_checkpoint``: ``best`` (best ``val/hIoU``), ``last``
(the weights at the end of training: the papers' fixed budget) or ``auto`` (default): ``last`` when
the test split shares images with the validation split — the real benchmarks test on their
validation split, where picking the best validation score would pick it on the test images — and
``best`` when they are disjoint (the toy world). ``metrics.json`` records ``tested_checkpoint``
and ``tested_checkpoint_reason``.

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

__all__ = ["train", "main", "resume_checkpoint", "check_test_checkpoint", "choose_test_checkpoint"]

RESUME_MODES = (None, "auto")
TEST_CHECKPOINTS = ("auto", "best", "last")


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


def check_test_checkpoint(cfg: DictConfig) -> str:
    """``cfg.test_checkpoint`` (default ``auto``), or a ``ValueError`` naming the key and the allowed values."""
    value = cfg.get("test_checkpoint", "auto")
    if value not in TEST_CHECKPOINTS:
        raise ValueError(
            f"test_checkpoint={value!r}: expected one of {', '.join(TEST_CHECKPOINTS)} (auto: last when the test images "
            "are validation images, as on the real benchmarks; best by val/hIoU when they are disjoint)"
        )
    return str(value)


def choose_test_checkpoint(
    mode: str, trainer: L.Trainer, datamodule: Any, trained: bool, resumed_from: Optional[str]
) -> tuple[Optional[str], str, str]:
    """The checkpoint the final test loads (``None``: the weights in memory), which one it is, and why.

    ``mode`` is a checked ``test_checkpoint``; ``trained`` says whether ``fit`` ran in this call
    (without it the only weights are those of ``resumed_from``).
    """
    if not trained:
        if resumed_from is not None:
            return resumed_from, "given", f"train=false: testing the checkpoint it would resume from, {resumed_from}"
        return None, "initial", "train=false and no checkpoint: testing the initial weights"
    shared, evidence = datamodule.test_shares_validation_images()
    if mode == "auto":
        kind = "last" if shared else "best"
        why = (
            f"test_checkpoint=auto: {evidence}; the last checkpoint is tested (the papers' fixed training budget), "
            "because the best validation score would be selected on the test images"
            if shared
            else f"test_checkpoint=auto: {evidence}; the best checkpoint by validation is tested"
        )
    else:
        kind = mode
        why = f"test_checkpoint={mode} set in the config ({evidence})"
        if mode == "best" and shared:
            log.warning("test_checkpoint=best while %s: the test score is selected on the test images", evidence)
    callback = trainer.checkpoint_callback
    if kind == "best":
        path = (callback.best_model_path if callback is not None else "") or None
        if path is None:
            log.warning("no best checkpoint was saved: testing the weights at the end of training")
            return None, "last", why + "; no best checkpoint was saved, so the weights at the end of training are tested"
        return path, kind, why
    # RunCheckpoint writes last.ckpt at the final step; another callback's may be older than the weights in memory
    last = (getattr(callback, "last_model_path", "") or "") if callback is not None else ""
    if last and getattr(callback, "last_written_step", None) == trainer.global_step:
        return last, kind, why
    return None, kind, why + "; no last.ckpt at the final step, so the weights in memory are tested"


def _interrupted(error: SIGTERMException, stage: str) -> RunInterrupted:
    # Lightning raises this (an exit with status 0) for a SIGTERM outside the training steps
    message = f"SIGTERM during {stage}: stopped; continue with the same command plus resume=auto"
    log.warning(message)
    return RunInterrupted(signal.SIGTERM, message)


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit ``cfg.method`` on ``cfg.dataset``; test the checkpoint ``test_checkpoint`` picks; return (metrics, objects)."""
    warn_unknown_keys(cfg, "train")
    test_mode = check_test_checkpoint(cfg)  # before training: a typo must not cost the run
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

        trained = bool(cfg.get("train", True))
        if trained:
            log.info("training (resume from %s)", ckpt_path) if ckpt_path else log.info("training")
            try:
                trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
            except SIGTERMException as error:
                raise _interrupted(error, "training") from error
        train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

        test_metrics: dict[str, Any] = {}
        if cfg.get("test", True):
            tested_path, tested, reason = choose_test_checkpoint(test_mode, trainer, datamodule, trained, ckpt_path)
            log.info("testing the %s checkpoint %s: %s", tested, tested_path or "(weights in memory)", reason)
            try:
                trainer.test(model=model, datamodule=datamodule, ckpt_path=tested_path)
            except SIGTERMException as error:
                raise _interrupted(error, "the final test") from error
            test_metrics = {
                **model.test_results,
                "ckpt_path": tested_path or "",
                "tested_checkpoint": tested,
                "tested_checkpoint_reason": reason,
                "global_step": int(trainer.global_step),
            }
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
