"""Keep the console of a run readable: silence messages that are known to be harmless for zeroseg runs.

Each entry says why it is harmless here; everything else (including Lightning's other hints) still shows.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["HARMLESS_WARNINGS", "quiet_known_noise"]

# (message regex, why it does not apply to zeroseg runs)
HARMLESS_WARNINGS: tuple[tuple[str, str], ...] = (
    (r"Found \d+ module\(s\) in eval mode", "the frozen CLIP teacher is in eval mode on purpose"),
    (r".*isinstance\(treespec, LeafSpec\)", "a deprecation inside Lightning, not in zeroseg code"),
    (r"Checkpoint directory .* exists and is not empty", "resume=auto continues inside the run's own directory"),
    (r"Experiment logs directory .* exists and is not empty", "resumed runs keep their CSV rows (continue_csv_logs)"),
)
# Lightning's advertisements for its cloud services, logged at INFO on every run
_TIPS = re.compile(r"💡 Tip: .*\b(litlogger|litmodels)\b")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _TIPS.search(record.getMessage())


def quiet_known_noise() -> None:
    """Install the warning filters and the log filter (idempotent); called by the command-line entry points."""
    for pattern, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
