"""Build the objects of a run from a composed config: data, teacher, method, trainer.

Shared by :mod:`zeroseg.train` and :mod:`zeroseg.eval` so both build exactly the same model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning as L
from omegaconf import DictConfig

from zeroseg.clip.teacher import CLIPTeacher
from zeroseg.data.datamodule import ZSSDataModule
from zeroseg.methods.base import ZSSMethod
from zeroseg.utils import instantiate_callbacks, instantiate_loggers

log = logging.getLogger(__name__)

__all__ = ["build_run", "check_checkpoint_path"]


def check_checkpoint_path(ckpt_path: Optional[str], key: str = "ckpt_path") -> Optional[str]:
    if ckpt_path is None:
        return None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"{key}={ckpt_path!r}: no such checkpoint file")
    return str(ckpt_path)


def build_run(cfg: DictConfig, with_callbacks: bool = True) -> dict[str, Any]:
    """Instantiate datamodule, teacher, backbone, method, callbacks, loggers and trainer."""
    log.info("dataset: %s", cfg.dataset._target_)
    datamodule: ZSSDataModule = hydra.utils.instantiate(cfg.dataset)
    log.info("clip teacher: %s (%s)", cfg.clip.arch, cfg.clip.get("pretrained"))
    teacher: CLIPTeacher = hydra.utils.instantiate(cfg.clip)
    backbone = hydra.utils.instantiate(cfg.backbone)
    log.info("method: %s", cfg.method._target_)
    # built as a partial, then called: live objects never pass through OmegaConf
    method_factory = hydra.utils.instantiate(cfg.method, _partial_=True)
    inference = hydra.utils.instantiate(cfg.inference) if cfg.get("inference") is not None else None
    log.info("inference: %s", inference)
    model: ZSSMethod = method_factory(
        split=datamodule.split, setting=datamodule.setting, teacher=teacher, backbone=backbone, inference=inference
    )
    callbacks = instantiate_callbacks(cfg.get("callbacks")) if with_callbacks else []
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return {
        "cfg": cfg,
        "datamodule": datamodule,
        "teacher": teacher,
        "model": model,
        "callbacks": callbacks,
        "loggers": loggers,
        "trainer": trainer,
    }
