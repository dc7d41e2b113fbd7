"""Callbacks and the checkpoint writer that keep a run's work safe (``conf/callbacks/``).

* :class:`RunCheckpoint` — the one checkpoint callback of a run: the best checkpoint by
  ``val/hIoU`` (never a non-finite score), ``last.ckpt`` at every validation, every
  ``last_every_n_steps`` steps and at the end of training, a checkpoint at the current step when the job is told to stop
  (SIGTERM, SIGUSR1: what SLURM sends before preemption or the time limit), and best-checkpoint
  tracking that survives a resume into another directory.
* :class:`NonFiniteLossGuard` — stops at the first non-finite loss (or skips up to
  ``max_skipped_steps`` such steps), before the weights are touched, naming the step and the terms.
* :class:`StepProgressBar` — progress as optimizer step / ``max_steps`` (a rich bar on a terminal,
  log lines otherwise, so they reach the run's log file).
* :class:`AtomicCheckpointIO` — every checkpoint is written to a temporary file and renamed.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from zeroseg.utils.atomic import atomic_output

log = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointIO",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "RunCheckpoint",
    "RunInterrupted",
    "StepProgressBar",
    "STOP_SIGNALS",
]

# the signals that ask a run to save and stop: SIGTERM (scancel, preemption, the end of the time
# limit) and SIGUSR1 (SLURM's advance warning with `--signal=USR1@<seconds>`; Lightning's requeue signal)
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


class RunInterrupted(SystemExit):
    """The run was told to stop by a signal; its state was saved. Exit status 128 + the signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NonFiniteLossError(RuntimeError):
    """A training loss was NaN or infinite; training stopped before the weights were updated."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, then an atomic rename: a full disk or a
    kill mid-write leaves the previous checkpoint loadable, and the error says why the write failed."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        with atomic_output(path, what="checkpoint") as handle:
            torch.save(checkpoint, handle)


def _describe_step(trainer: L.Trainer) -> str:
    total = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
    return f"step {trainer.global_step}{total}"


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with what a long run on a shared cluster needs.

    Args:
        last_every_n_steps: also write ``last.ckpt`` every this many optimizer steps (``None`` or
            0: only at validation), so a run killed without warning loses at most that many steps.
        stop_signals: handle these signals during training: finish the current step (and the
            validation in progress or due at it), write ``last.ckpt`` at that step, and end the run
            with :class:`RunInterrupted` (exit status 128 + signal). ``[]`` leaves signals to Lightning.
        **kwargs: as ``ModelCheckpoint`` (``dirpath``, ``filename``, ``monitor``, ``mode``, ...).

    Differences from ``ModelCheckpoint`` besides the above: a non-finite monitored value never
    becomes the best checkpoint; ``last.ckpt`` is written at every validation (not only when a new
    best was saved) and at the end of training (the final weights); resuming into another directory
    keeps the interrupted run's best score and best checkpoint path (Lightning keeps only the path),
    so the run tests the same checkpoint as an uninterrupted one.
    """

    def __init__(
        self,
        *args: Any,
        last_every_n_steps: Optional[int] = None,
        stop_signals: Optional[list[str]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if last_every_n_steps is not None and (not isinstance(last_every_n_steps, int) or last_every_n_steps < 0):
            raise ValueError(f"callbacks.last_every_n_steps must be a whole number >= 0 or null, got {last_every_n_steps!r}")
        self.last_every_n_steps = last_every_n_steps or 0
        names = [s.name for s in STOP_SIGNALS] if stop_signals is None else list(stop_signals)
        unknown = [n for n in names if n not in {s.name for s in STOP_SIGNALS}]
        if unknown:
            raise ValueError(f"stop_signals has unknown signal(s) {unknown}; allowed: {[s.name for s in STOP_SIGNALS]}")
        self.stop_signals = [signal.Signals[n] for n in names]
        self.signal_received: Optional[int] = None
        self._stop_pending = False
        self._trainer: Optional[L.Trainer] = None
        self._previous_handlers: dict[int, Any] = {}
        self._last_written_step = -1

    # -- signals -------------------------------------------------------------------------------------
    def _handle_stop_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        # only a flag here: the checkpoint is written at the end of the step, from the training loop
        self.signal_received = signum
        launcher = getattr(self._trainer.strategy, "launcher", None) if self._trainer is not None else None
        procs = getattr(launcher, "procs", None)
        if procs:  # Lightning's own DDP children (trainer=ddp started as one process) stop at the same step
            for proc in procs:
                proc.send_signal(signum)
        previous = self._previous_handlers.get(signum)
        if signum != signal.SIGTERM and callable(previous):
            previous(signum, frame)  # e.g. Lightning's SLURM requeue on SIGUSR1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._trainer = trainer
        self.signal_received = None
        self._stop_pending = False
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.stop_signals:
            # replaces Lightning's SIGTERM notifier, which would abort a validation half-way and exit with status 0
            self._previous_handlers[signum] = signal.signal(signum, self._handle_stop_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._restore_signal_handlers()
        if not trainer.sanity_checking and not bool(trainer.fast_dev_run):
            # last.ckpt holds the final weights even when the run does not end at a validation or a
            # periodic save: the final test of the real benchmarks uses it (test_checkpoint=last)
            self._write_last(trainer)
        if self._stop_pending:  # told to stop at the last step: do not go on to the test
            self._stop(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._restore_signal_handlers()

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        # every rank must stop at the same step
        return bool(trainer.strategy.reduce_boolean_decision(self.signal_received is not None, all=False))

    def _stop(self, trainer: L.Trainer) -> None:
        signum = self.signal_received or signal.SIGTERM
        name = signal.Signals(signum).name
        message = (
            f"{name} received: stopped at {_describe_step(trainer)} and saved {self.last_model_path}; "
            f"continue with the same command plus resume=auto (or ckpt_path={self.last_model_path})"
        )
        log.warning(message)
        raise RunInterrupted(signum, message)

    # -- saving ------------------------------------------------------------------------------------
    def _validation_due(self, trainer: L.Trainer) -> bool:
        """Whether Lightning validates right after this training batch (checkpoints then wait for it)."""
        loop = trainer.fit_loop.epoch_loop
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        try:
            return bool(loop._should_check_val_fx(fetcher))
        except Exception:  # noqa: BLE001 - a private Lightning API: fall back to the interval arithmetic
            interval = trainer.val_check_batch
            return isinstance(interval, int) and interval > 0 and trainer.global_step % interval == 0

    @property
    def last_written_step(self) -> int:
        """The optimizer step ``last.ckpt`` was last written at in this process (-1: not yet)."""
        return self._last_written_step

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _write_last(self, trainer: L.Trainer) -> None:
        if self.save_last and self._last_written_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.sanity_checking or bool(trainer.fast_dev_run):
            return
        stop = self._stop_requested(trainer)
        # at a validation step the checkpoint is written after the validation (its score and best
        # tracking belong in it; a checkpoint taken before it would make the resumed run skip it)
        if self._validation_due(trainer):
            return
        periodic = self.last_every_n_steps and trainer.global_step % self.last_every_n_steps == 0
        if periodic or stop:
            self._write_last(trainer)
        # the run ends once Lightning has logged this step's metrics: before the next batch, or at the end of training
        self._stop_pending = stop

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._stop_pending:
            self._stop(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or bool(trainer.fast_dev_run):
            return
        self._write_last(trainer)
        if self._stop_requested(trainer):
            self._stop(trainer)

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        current = monitor_candidates.get(self.monitor) if self.monitor else None
        if current is not None and not bool(torch.isfinite(torch.as_tensor(current)).all()):
            log.warning(
                "%s is %s at %s: not a candidate for the best checkpoint", self.monitor, float(current), _describe_step(trainer)
            )
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    # -- resume -------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        previous_dir = state_dict.get("dirpath", self.dirpath)
        if previous_dir == self.dirpath:
            super().load_state_dict(state_dict)
            return
        # another directory (ckpt_path= from an earlier run): keep its best score and files, so a
        # later validation replaces the best only by beating it (Lightning would start from scratch);
        # files outside this run's directory are never deleted (ModelCheckpoint._should_remove_checkpoint)
        self.best_model_score = state_dict["best_model_score"]
        self.best_model_path = state_dict["best_model_path"]
        self.best_k_models = dict(state_dict.get("best_k_models", {}))
        self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path)
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        if self.best_model_path:
            log.info(
                "resumed from %s: best %s so far %.4f at %s",
                previous_dir, self.monitor, float(self.best_model_score or float("nan")), self.best_model_path,
            )  # fmt: skip


class NonFiniteLossGuard(L.Callback):
    """Stop at the first non-finite training loss, before the optimizer applies it.

    Args:
        max_skipped_steps: skip (no weight update) up to this many steps with a non-finite loss
            before stopping; 0 stops at the first one.

    The error names the step, the loss terms that are not finite (from ``pl_module.last_loss_terms``
    when the method provides them) and the last checkpoint written, which holds finite weights.
    One host synchronisation per step (the check of one scalar).
    """

    def __init__(self, max_skipped_steps: int = 0) -> None:
        if not isinstance(max_skipped_steps, int) or max_skipped_steps < 0:
            raise ValueError(f"callbacks.nonfinite_loss.max_skipped_steps must be a whole number >= 0, got {max_skipped_steps!r}")
        self.max_skipped_steps = max_skipped_steps
        self.skipped_steps = 0
        self._skip_this_step = False

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
        if finite:
            return
        step = trainer.global_step + 1  # the optimizer step this loss was computed for
        terms = getattr(pl_module, "last_loss_terms", None) or {"loss": loss.detach()}
        bad = ", ".join(f"train/{name}={float(value):g}" for name, value in terms.items() if not torch.isfinite(value).all())
        where = f"step {step}" + (f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else "")
        if self.skipped_steps < self.max_skipped_steps:
            self.skipped_steps += 1
            self._skip_this_step = True
            log.warning(
                "non-finite loss at %s (%s): skipping this step (%d of %d allowed)",
                where,
                bad or "on another rank",
                self.skipped_steps,
                self.max_skipped_steps,
            )  # noqa: E501
            return
        checkpoint = trainer.checkpoint_callback
        last = getattr(checkpoint, "last_model_path", "") or ""
        last_step = getattr(checkpoint, "_last_written_step", -1)
        at = f" (step {last_step})" if last_step >= 0 else ""
        kept = f"the last checkpoint, {last}{at}, was written before any non-finite loss" if last else "no checkpoint was written"
        raise NonFiniteLossError(
            f"non-finite training loss at {where}: {bad or 'on another rank'}. Training stopped before this update; "
            f"{kept}. Usual causes: a learning rate too high (method.optimizer.lr), fp16 overflow (trainer.precision), "
            f"a bad batch; callbacks.nonfinite_loss.max_skipped_steps=N skips up to N such steps instead of stopping"
        )

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self._skip_this_step:
            self._skip_this_step = False
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None  # optimizers skip parameters without a gradient


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


class StepProgressBar(RichProgressBar):
    """Training progress as optimizer step / ``max_steps`` across epochs and resumes.

    On a terminal: Lightning's rich bar. Otherwise (batch jobs, output piped to a file): a log line
    every ``log_every_n_steps`` steps (default: every 1/20 of the run, and at least every
    ``log_every_seconds``) with the loss, speed and remaining time, through Python logging, so it
    reaches the run's log file as well.
    """

    def __init__(
        self, *args: Any, log_every_n_steps: Optional[int] = None, log_every_seconds: float = 300.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.log_every_n_steps = log_every_n_steps
        self.log_every_seconds = log_every_seconds
        self._started: Optional[tuple[float, int]] = None
        self._last_line = 0.0
        if not _stdout_is_terminal():
            self.disable()

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'train step':{len(self.validation_description)}}"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._started = (time.monotonic(), trainer.global_step)
        self._last_line = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # one bar for the whole run, started at the resumed step (Lightning restarts it every epoch)
        if self.is_enabled and self.train_progress_bar_id is None:
            super().on_train_epoch_start(trainer, pl_module)
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.is_enabled:
            # Lightning's own update counts batches of the epoch; this bar counts optimizer steps of the run
            if self.train_progress_bar_id is None:
                self._initialize_train_progress_bar_id()
            self._update(self.train_progress_bar_id, trainer.global_step)
            self._update_metrics(trainer, pl_module)
            self.refresh()
            return
        self._log_line(trainer, pl_module)

    def _log_line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step, total = trainer.global_step, trainer.max_steps
        every = self.log_every_n_steps or (max(1, total // 20) if total and total > 0 else 50)
        overdue = self.log_every_n_steps is None and time.monotonic() - self._last_line >= self.log_every_seconds
        if not trainer.is_global_zero or (step % every and step != total and not overdue):
            return
        self._last_line = time.monotonic()
        started_at, started_step = self._started or (time.monotonic(), 0)
        elapsed = time.monotonic() - started_at
        speed = (step - started_step) / elapsed if elapsed > 0 else 0.0
        eta = (
            f", eta {time.strftime('%H:%M:%S', time.gmtime((total - step) / speed))}" if speed > 0 and total and total > 0 else ""
        )
        metrics = self.get_metrics(trainer, pl_module)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("train/") and isinstance(v, float))
        fraction = f" ({100 * step / total:.0f}%)" if total and total > 0 else ""
        log.info("step %d%s%s %s | %.2f steps/s%s", step, f"/{total}" if total and total > 0 else "", fraction, shown, speed, eta)
