"""``python -m zeroseg.eval ckpt_path=... [overrides]``: test a checkpoint.

Training-free methods (``method=clip_zero_shot``) are evaluated without a checkpoint.

Compose the same dataset / clip / backbone / method choices as the training run; the checkpoint's
recorded class split is checked against the configured dataset. Writes ``metrics.json`` into
the run's output directory and prints the table.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import hydra
import lightning as L
from omegaconf import DictConfig

from zeroseg.build import build_run, check_checkpoint_fits, check_checkpoint_path
from zeroseg.utils import save_resolved_config, task_wrapper, warn_unknown_keys, write_run_outputs
from zeroseg.utils.console import quiet_known_noise

log = logging.getLogger(__name__)

__all__ = ["evaluate", "main"]


@task_wrapper
def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Test ``cfg.ckpt_path`` on the test split of ``cfg.dataset``; return (metrics, objects)."""
    warn_unknown_keys(cfg, "eval")
    ckpt_path = check_checkpoint_path(cfg.get("ckpt_path"))
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    save_resolved_config(cfg)
    objects = build_run(cfg, with_callbacks=False)
    model, datamodule, trainer = objects["model"], objects["datamodule"], objects["trainer"]
    if ckpt_path is None and model.trainable:
        raise ValueError(f"eval of method {type(model).__name__} needs ckpt_path=<checkpoint file>")
    if ckpt_path is not None:
        check_checkpoint_fits(ckpt_path, model)
    trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {
        **model.test_results,
        "ckpt_path": ckpt_path,
        # the same keys as a training run's metrics.json: here the caller chose the checkpoint
        "tested_checkpoint": "given" if ckpt_path is not None else "none",
        "tested_checkpoint_reason": "ckpt_path given to zeroseg.eval" if ckpt_path is not None else "training-free method",
    }
    write_run_outputs(cfg, metrics, set(datamodule.split.unseen_class_names), title="eval")
    return metrics, objects


@hydra.main(version_base="1.3", config_path="pkg://zeroseg.conf", config_name="eval")
def main(cfg: DictConfig) -> Optional[float]:
    quiet_known_noise()
    metrics, _ = evaluate(cfg)
    return float(metrics["hIoU"])


if __name__ == "__main__":
    main()
