"""``python -m zeroseg.train [overrides]``: train a method, then test its best checkpoint.

``train(cfg)`` is a plain function (tests call it); ``main`` is the thin Hydra entry point.
Every run writes into its output directory the resolved ``config.yaml``, checkpoints, logs and
``metrics.json`` (the final test metrics), and prints a final table. ``ckpt_path=...`` resumes
training exactly: step, optimizer, scheduler, data order and RNG states.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import hydra
import lightning as L
from omegaconf import DictConfig

from zeroseg.build import build_run, check_checkpoint_path
from zeroseg.utils import log_hyperparameters, save_resolved_config, task_wrapper, write_run_outputs

log = logging.getLogger(__name__)

__all__ = ["train", "main"]


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit ``cfg.method`` on ``cfg.dataset``; test the best checkpoint; return (metrics, objects)."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    ckpt_path = check_checkpoint_path(cfg.get("ckpt_path"))
    save_resolved_config(cfg)
    objects = build_run(cfg)
    model, datamodule, trainer = objects["model"], objects["datamodule"], objects["trainer"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log_hyperparameters(objects["loggers"], cfg, {"model/params_trainable": trainable, "data/classes": model.describe()})

    if cfg.get("train", True):
        log.info("training (resume from %s)", ckpt_path) if ckpt_path else log.info("training")
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
    train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    test_metrics: dict[str, Any] = {}
    if cfg.get("test", True):
        best_path: Optional[str] = None
        if trainer.checkpoint_callback is not None:
            best_path = trainer.checkpoint_callback.best_model_path or None
        if best_path is None:
            log.warning("no best checkpoint was saved: testing the current weights")
        log.info("testing checkpoint %s", best_path)
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best_path)
        test_metrics = {**model.test_results, "ckpt_path": best_path or "", "global_step": int(trainer.global_step)}
        write_run_outputs(cfg, test_metrics, set(datamodule.split.unseen_class_names), title="test")
    return {**train_metrics, **test_metrics}, objects


@hydra.main(version_base="1.3", config_path="pkg://zeroseg.conf", config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    metrics, _ = train(cfg)
    optimized = cfg.get("optimized_metric")
    return float(metrics[optimized]) if optimized and optimized in metrics else None


if __name__ == "__main__":
    main()
