"""Run-level helpers: hyperparameter logging and a wrapper that always closes loggers."""

from __future__ import annotations

import csv
import functools
import io
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from zeroseg.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["task_wrapper", "close_loggers", "continue_csv_logs", "log_hyperparameters"]


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
        except Exception as error:
            # the message reaches the run's log file; Hydra prints the traceback to the console once
            log.error("%s failed: %s: %s", task.__name__, type(error).__name__, error)
            raise
        finally:
            close_loggers()

    return wrapped


@rank_zero_only
def continue_csv_logs(loggers: Sequence[Logger], resumed_step: int) -> None:
    """Keep the rows a resumed run will not log again in its CSV logs (same run directory).

    Lightning's CSV logger deletes an existing ``metrics.csv`` when it starts; the rows logged before
    ``resumed_step`` (logger step ``global_step - 1``) are written back, and the ones after it, which
    the resumed run logs again, are dropped, so the two halves do not overlap.
    """
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / _ExperimentWriter.NAME_METRICS_FILE
        rows: list[dict[str, str]] = []
        header: list[str] = []
        if path.is_file():
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                header = list(reader.fieldnames or [])
                rows = [row for row in reader if row.get("step") and int(float(row["step"])) < resumed_step]
        writer = logger.experiment  # created now: this is where Lightning deletes the old file
        if not rows:
            continue
        text = io.StringIO()
        table = csv.DictWriter(text, fieldnames=header)
        table.writeheader()
        table.writerows(rows)
        atomic_write_text(path, text.getvalue(), what="CSV log")
        writer.metrics_keys = list(header)
        log.info("CSV log %s: kept %d rows before step %d", path, len(rows), resumed_step)


@rank_zero_only
def log_hyperparameters(loggers: Sequence[Logger], cfg: DictConfig, extra: dict[str, Any]) -> None:
    """Send the whole resolved config (plus run facts such as parameter counts) to every logger."""
    params = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(params, dict)
    params.update(extra)
    for logger in loggers:
        logger.log_hyperparams(params)
