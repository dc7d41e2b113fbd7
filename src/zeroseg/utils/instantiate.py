"""Instantiate the named entries of the ``callbacks`` and ``logger`` config groups."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from zeroseg.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["instantiate_callbacks", "instantiate_loggers", "wandb_run_id"]


WANDB_ID_FILE = ".wandb_run_id"


def _instantiate_entries(
    cfg: Optional[DictConfig], group: str, expected: type, extra_kwargs: Optional[Callable[[DictConfig], dict]] = None
) -> list[Any]:
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"config '{group}' must be a mapping of named entries, got {type(cfg).__name__}")
    objects = []
    for name, entry in cfg.items():
        # an entry without _target_ (or set to null) is switched off, so `+callbacks.x=null` removes x
        if isinstance(entry, DictConfig) and "_target_" in entry:
            obj = hydra.utils.instantiate(entry, **(extra_kwargs(entry) if extra_kwargs else {}))
            if not isinstance(obj, expected):
                raise TypeError(f"{group}.{name} builds {type(obj).__name__}, expected a {expected.__name__}")
            log.info("%s.%s: %s", group, name, entry._target_)
            objects.append(obj)
    return objects


def instantiate_callbacks(cfg: Optional[DictConfig]) -> list[Callback]:
    return _instantiate_entries(cfg, "callbacks", Callback)


def wandb_run_id(run_dir: str | Path) -> str:
    """The W&B run id of a run directory: made once, kept in ``<run_dir>/.wandb_run_id``, so a resumed
    run (``resume=auto``) continues the same W&B run."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, run_id + "\n", what="W&B run id")
    return run_id


def instantiate_loggers(cfg: Optional[DictConfig], run_dir: Optional[str] = None) -> list[Logger]:
    """The loggers of ``cfg``; a W&B logger without an explicit ``id`` gets the run directory's id (resume allowed)."""

    def wandb_kwargs(entry: DictConfig) -> dict:
        if run_dir is None or not str(entry._target_).endswith("WandbLogger") or entry.get("id"):
            return {}
        return {"id": wandb_run_id(run_dir), "resume": "allow"}

    return _instantiate_entries(cfg, "logger", Logger, wandb_kwargs)
