"""Build the objects of a run from a composed config: data, teacher, method, trainer.

Shared by :mod:`zeroseg.train` and :mod:`zeroseg.eval` so both build exactly the same model, and
check a checkpoint against that model before Lightning loads it, so that a wrong file fails with
the file, the reason and the option to use (not a zip error, a ``KeyError`` or sixty size mismatches).
"""

from __future__ import annotations

import logging
import zipfile
from importlib.resources import files
from pathlib import Path
from typing import Any, Mapping, Optional

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, OmegaConf

from zeroseg.callbacks import AtomicCheckpointIO
from zeroseg.clip.teacher import CLIPTeacher
from zeroseg.data.datamodule import ZSSDataModule
from zeroseg.methods.base import TEACHER_PREFIX, CheckpointMismatchError, ZSSMethod
from zeroseg.utils import instantiate_callbacks, instantiate_loggers

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointFileError",
    "build_model",
    "build_run",
    "check_checkpoint_fits",
    "check_checkpoint_path",
    "check_trainer_values",
    "method_option",
    "read_checkpoint",
]

# the config groups whose choice a checkpoint must match (recorded in it, named in errors)
RECORDED_CHOICES = ("method", "backbone", "clip", "dataset", "experiment")
# Trainer arguments that must be whole numbers / numbers (Lightning's own error names no key)
TRAINER_WHOLE_NUMBERS = (
    "max_steps", "max_epochs", "min_steps", "min_epochs", "log_every_n_steps", "accumulate_grad_batches",
    "num_sanity_val_steps", "check_val_every_n_epoch", "num_nodes",
)  # fmt: skip
TRAINER_NUMBERS = ("val_check_interval", "gradient_clip_val", "limit_train_batches", "limit_val_batches", "limit_test_batches")


class CheckpointFileError(ValueError):
    """A checkpoint file cannot be read: missing, empty, truncated, or not a zeroseg checkpoint."""


def check_checkpoint_path(ckpt_path: Optional[str], key: str = "ckpt_path") -> Optional[str]:
    """``ckpt_path`` as a string if it is a file; a ``FileNotFoundError`` naming the key and nearby checkpoints otherwise."""
    if ckpt_path is None:
        return None
    path = Path(ckpt_path)
    if not path.is_file():
        nearby = sorted(p.name for p in path.parent.glob("*.ckpt")) if path.parent.is_dir() else []
        hint = f"; {path.parent} holds {nearby}" if nearby else ""
        raise FileNotFoundError(f"{key}={ckpt_path!r}: no such checkpoint file{hint}")
    return str(ckpt_path)


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """Load a zeroseg checkpoint (memory-mapped), or a :class:`CheckpointFileError` that says what the file is."""
    path = Path(path)
    size = path.stat().st_size
    where = f"{key}={str(path)!r} ({size:,} bytes)"
    if size == 0:
        raise CheckpointFileError(f"{where} is empty: a write that never finished? Use an earlier checkpoint")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            head = handle.read(64)
        if _looks_like_text(head):
            raise CheckpointFileError(f"{where} is a text file (it starts with {head[:40]!r}), not a checkpoint")
        raise CheckpointFileError(
            f"{where} is truncated or not a checkpoint: a torch checkpoint is a zip archive and this file has no zip "
            "directory at its end (an interrupted copy or write?). Use another checkpoint, e.g. the run's last.ckpt"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file and what to do
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointFileError(f"{where} cannot be read, corrupt or truncated ({first_line})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointFileError(f"{where} holds a {type(checkpoint).__name__} without 'state_dict': not a Lightning checkpoint")
    if "zeroseg" not in checkpoint:
        raise CheckpointFileError(
            f"{where} was not written by zeroseg (no 'zeroseg' entry); backbone weights go to backbone.pretrained=<file>"
        )
    return checkpoint


def method_option(class_name: str) -> Optional[str]:
    """The ``method=`` option whose config builds ``class_name`` (e.g. ``Baseline`` → ``baseline``)."""
    for yaml_file in sorted(files("zeroseg.conf").joinpath("method").iterdir(), key=lambda p: p.name):
        if yaml_file.name.endswith(".yaml"):
            target = str(OmegaConf.create(yaml_file.read_text()).get("_target_", ""))
            if target.rsplit(".", 1)[-1] == class_name:
                return yaml_file.name[: -len(".yaml")]
    return None


def _choices_text(choices: Mapping[str, Any]) -> str:
    return " ".join(f"{group}={option}" for group, option in choices.items() if option is not None)


def check_checkpoint_fits(path: str | Path, model: ZSSMethod, key: str = "ckpt_path") -> dict[str, Any]:
    """Read ``path`` and check that it was written by the method this config builds, with tensors of the
    same names and shapes; errors name the options recorded in the checkpoint. Returns the checkpoint."""
    checkpoint = read_checkpoint(path, key)
    info = checkpoint["zeroseg"]
    recorded = dict(info.get("config_choices") or {})
    where = f"{key}={str(path)!r}"
    current = _choices_text({g: model.run_choices.get(g) for g in RECORDED_CHOICES if g in model.run_choices})
    if info.get("method") != type(model).__name__:
        option = recorded.get("method") or method_option(str(info.get("method")))
        raise CheckpointMismatchError(
            f"{where} was written by method {info.get('method')}; this config builds {type(model).__name__}"
            + (f": add method={option}" if option else "")
            + (f" (its run used {_choices_text(recorded)})" if recorded else "")
        )
    saved = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(TEACHER_PREFIX)}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(TEACHER_PREFIX)}
    mismatched = [k for k in saved if k in expected and tuple(saved[k].shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            examples = ", ".join(
                f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched[:1]
            )
            parts.append(f"{len(mismatched)} tensors differ in shape (e.g. {examples})")
        if missing:
            parts.append(f"{len(missing)} of the model's tensors are missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors are not in the model (e.g. {unexpected[0]})")
        if recorded:
            fix = f"its run used {_choices_text(recorded)}; give the same options"
        else:
            fix = f"give the backbone=/method= options of its training run (see {Path(path).parent.parent / 'config.yaml'})"
        raise CheckpointMismatchError(
            f"{where} does not fit the model this config builds{f' ({current})' if current else ''}: "
            + "; ".join(parts)
            + f". A checkpoint of another backbone or head size? {fix}"
        )
    return checkpoint


def check_trainer_values(trainer_cfg: DictConfig) -> None:
    """Type-check the Trainer arguments whose wrong type Lightning reports without naming the key."""
    for key in (*TRAINER_WHOLE_NUMBERS, *TRAINER_NUMBERS):
        value = trainer_cfg.get(key)
        if value is None:
            continue
        whole = key in TRAINER_WHOLE_NUMBERS
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            kind = "a whole number" if whole else "a number"
            raise ValueError(f"trainer.{key}={value!r}: expected {kind}, e.g. trainer.{key}={'1000' if whole else '0.5'}")


def run_choices() -> dict[str, Any]:
    """The config-group choices of the current Hydra run (``{}`` outside Hydra)."""
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.get("choices") or {}
    return {group: choices.get(group) for group in RECORDED_CHOICES if group in choices}


def _resolved(cfg: DictConfig, group: str) -> Optional[dict[str, Any]]:
    try:
        return OmegaConf.to_container(cfg[group], resolve=True)  # type: ignore[return-value]
    except Exception as error:  # noqa: BLE001 - recorded for later rebuilding only; never stops a run
        log.warning("the %s config cannot be resolved for the checkpoint (%s): it is recorded unresolved", group, error)
        return OmegaConf.to_container(cfg[group], resolve=False)  # type: ignore[return-value]


def build_model(cfg: DictConfig) -> tuple[ZSSDataModule, CLIPTeacher, ZSSMethod]:
    """The datamodule (not set up: no data is read), the teacher and the method of a composed config."""
    log.info("dataset: %s", cfg.dataset._target_)
    datamodule: ZSSDataModule = hydra.utils.instantiate(cfg.dataset)
    log.info("clip teacher: %s (%s)", cfg.clip.arch, cfg.clip.get("pretrained"))
    teacher: CLIPTeacher = hydra.utils.instantiate(cfg.clip)
    backbone = hydra.utils.instantiate(cfg.backbone)
    log.info("method: %s", cfg.method._target_)
    # built as a partial, then called: live objects never pass through OmegaConf
    method_factory = hydra.utils.instantiate(cfg.method, _partial_=True)
    inference = hydra.utils.instantiate(cfg.inference) if cfg.get("inference") is not None else None
    log.info("inference: %s", inference)
    model: ZSSMethod = method_factory(
        split=datamodule.split, setting=datamodule.setting, teacher=teacher, backbone=backbone, inference=inference
    )
    model.run_choices = run_choices()
    model.run_model_config = {group: _resolved(cfg, group) for group in ("backbone", "method")}
    return datamodule, teacher, model


def build_run(cfg: DictConfig, with_callbacks: bool = True) -> dict[str, Any]:
    """Instantiate datamodule, teacher, backbone, method, callbacks, loggers and trainer."""
    check_trainer_values(cfg.trainer)
    datamodule, teacher, model = build_model(cfg)
    callbacks = instantiate_callbacks(cfg.get("callbacks")) if with_callbacks else []
    loggers = instantiate_loggers(cfg.get("logger"), run_dir=cfg.paths.get("output_dir"))
    if not loggers and any(isinstance(c, LearningRateMonitor) for c in callbacks):
        # the LR monitor writes to loggers only; with logger=none it would stop the run
        log.info("logger=none: the learning-rate monitor is switched off")
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if cfg.trainer.get("enable_progress_bar") is False and any(isinstance(c, ProgressBar) for c in callbacks):
        # Lightning refuses a progress-bar callback with the bar switched off; the switch wins
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    # checkpoints are written to a temporary file and renamed (unless the config brings its own plugins)
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **plugins)
    return {
        "cfg": cfg,
        "datamodule": datamodule,
        "teacher": teacher,
        "model": model,
        "callbacks": callbacks,
        "loggers": loggers,
        "trainer": trainer,
    }
