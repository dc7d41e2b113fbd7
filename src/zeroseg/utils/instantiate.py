"""Instantiate the named entries of the ``callbacks`` and ``logger`` config groups."""

from __future__ import annotations

import logging
from typing import Any, Optional

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

log = logging.getLogger(__name__)

__all__ = ["instantiate_callbacks", "instantiate_loggers"]


def _instantiate_entries(cfg: Optional[DictConfig], group: str, expected: type) -> list[Any]:
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"config '{group}' must be a mapping of named entries, got {type(cfg).__name__}")
    objects = []
    for name, entry in cfg.items():
        # an entry without _target_ (or set to null) is switched off, so `+callbacks.x=null` removes x
        if isinstance(entry, DictConfig) and "_target_" in entry:
            obj = hydra.utils.instantiate(entry)
            if not isinstance(obj, expected):
                raise TypeError(f"{group}.{name} builds {type(obj).__name__}, expected a {expected.__name__}")
            log.info("%s.%s: %s", group, name, entry._target_)
            objects.append(obj)
    return objects


def instantiate_callbacks(cfg: Optional[DictConfig]) -> list[Callback]:
    return _instantiate_entries(cfg, "callbacks", Callback)


def instantiate_loggers(cfg: Optional[DictConfig]) -> list[Logger]:
    return _instantiate_entries(cfg, "logger", Logger)
