"""Run plumbing: config composition, instantiation, run outputs, atomic writes, run directories.

Names load from their modules on first use, so light tools (``zeroseg.data.prepare``/``verify``, the
run-directory resolver) can use ``zeroseg.utils.atomic`` without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "check_keyword_options": "config",
    "compose_config": "config",
    "warn_unknown_keys": "config",
    "instantiate_callbacks": "instantiate",
    "instantiate_loggers": "instantiate",
    "format_metrics_table": "reporting",
    "print_metrics_table": "reporting",
    "save_metrics_json": "reporting",
    "save_resolved_config": "reporting",
    "write_run_outputs": "reporting",
    "close_loggers": "run",
    "continue_csv_logs": "run",
    "log_hyperparameters": "run",
    "task_wrapper": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"zeroseg.utils.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'zeroseg.utils' has no attribute {name!r}")
