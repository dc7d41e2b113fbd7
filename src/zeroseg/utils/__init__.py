from zeroseg.utils.instantiate import instantiate_callbacks, instantiate_loggers
from zeroseg.utils.reporting import format_metrics_table, print_metrics_table, save_metrics_json
from zeroseg.utils.run import close_loggers, log_hyperparameters, task_wrapper

__all__ = [
    "close_loggers",
    "format_metrics_table",
    "instantiate_callbacks",
    "instantiate_loggers",
    "log_hyperparameters",
    "print_metrics_table",
    "save_metrics_json",
    "task_wrapper",
]
