"""Run outputs: the resolved ``config.yaml``, ``metrics.json`` and the table printed at the end."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from zeroseg.metrics import SUMMARY_KEYS
from zeroseg.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["save_metrics_json", "format_metrics_table", "print_metrics_table", "save_resolved_config", "write_run_outputs"]


def _json_number(value: float) -> Any:
    # JSON has no NaN: an absent class is written as null
    return None if isinstance(value, float) and math.isnan(value) else value


def save_metrics_json(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write flat ``sIoU, uIoU, hIoU, mIoU, pAcc`` plus ``per_class_iou`` ({class: IoU or null})."""
    path = Path(path)
    payload: dict[str, Any] = {k: _json_number(float(metrics[k])) for k in SUMMARY_KEYS}
    payload["per_class_iou"] = {name: _json_number(float(v)) for name, v in metrics["per_class_iou"].items()}
    for key, value in metrics.items():
        if key not in payload and isinstance(value, (int, float, str)):
            payload[key] = _json_number(value) if isinstance(value, float) else value
    return atomic_write_text(path, json.dumps(payload, indent=2) + "\n", what="metrics")


def format_metrics_table(metrics: Mapping[str, Any], unseen_class_names: set[str] | None = None, title: str = "test") -> Table:
    unseen_class_names = unseen_class_names or set()
    table = Table(title=f"zeroseg {title} metrics (%)")
    for key in SUMMARY_KEYS:
        table.add_column(key, justify="right")
    table.add_row(*(f"{float(metrics[k]):.2f}" for k in SUMMARY_KEYS))
    per_class = Table(title="per-class IoU (%)")
    per_class.add_column("class")
    per_class.add_column("split")
    per_class.add_column("IoU", justify="right")
    for name, value in metrics["per_class_iou"].items():
        shown = "absent" if value is None or math.isnan(value) else f"{value:.2f}"
        per_class.add_row(name, "unseen" if name in unseen_class_names else "seen", shown)
    outer = Table.grid()
    outer.add_row(table)
    outer.add_row(per_class)
    return outer


def print_metrics_table(metrics: Mapping[str, Any], unseen_class_names: set[str] | None = None, title: str = "test") -> None:
    Console().print(format_metrics_table(metrics, unseen_class_names, title))


@rank_zero_only
def save_resolved_config(cfg: DictConfig) -> None:
    """The fully resolved config of a run, as ``<output_dir>/config.yaml``."""
    atomic_write_text(Path(cfg.paths.output_dir) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True), what="config")


@rank_zero_only
def write_run_outputs(cfg: DictConfig, metrics: Mapping[str, Any], unseen_class_names: set[str], title: str) -> None:
    """``metrics.json`` into the run's output dir, and the final table to the console."""
    path = save_metrics_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
    print_metrics_table(metrics, unseen_class_names, title=title)
    log.info("metrics written to %s", path)
