from zeroseg.utils.config import compose_config
from zeroseg.utils.instantiate import instantiate_callbacks, instantiate_loggers
from zeroseg.utils.reporting import (
    format_metrics_table,
    print_metrics_table,
    save_metrics_json,
    save_resolved_config,
    write_run_outputs,
)
from zeroseg.utils.run import close_loggers, log_hyperparameters, task_wrapper

__all__ = [
    "close_loggers",
    "compose_config",
    "format_metrics_table",
    "instantiate_callbacks",
    "instantiate_loggers",
    "log_hyperparameters",
    "print_metrics_table",
    "save_metrics_json",
    "save_resolved_config",
    "task_wrapper",
    "write_run_outputs",
]
