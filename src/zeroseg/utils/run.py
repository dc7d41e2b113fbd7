"""Run-level helpers: hyperparameter logging and a wrapper that always closes loggers."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Sequence

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = ["task_wrapper", "close_loggers", "log_hyperparameters"]


def close_loggers() -> None:
    """Finish a W&B run if one is open, so a failed job does not break the next job of a multirun."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        return
    if wandb.run is not None:
        wandb.finish()


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Run ``task(cfg)``; whatever happens, close the loggers afterwards."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except Exception:
            log.exception("task %s failed", task.__name__)
            raise
        finally:
            close_loggers()

    return wrapped


@rank_zero_only
def log_hyperparameters(loggers: Sequence[Logger], cfg: DictConfig, extra: dict[str, Any]) -> None:
    """Send the whole resolved config (plus run facts such as parameter counts) to every logger."""
    params = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(params, dict)
    params.update(extra)
    for logger in loggers:
        logger.log_hyperparams(params)
