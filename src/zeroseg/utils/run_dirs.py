"""Run directories: one per launch, never shared, and found again by ``resume=auto``.

``conf/hydra/default.yaml`` names run directories with the ``${run_dir:<base>}`` resolver:

* a new run gets ``<base>/<YYYY-MM-DD_HH-MM-SS>``, created atomically; a launch in the same second
  gets ``..._HH-MM-SS-1``, ``-2`` and so on, so concurrent launches never share a directory;
* with ``resume=auto`` it is the newest directory under ``<base>`` holding a run of the same
  configuration (the composed config minus ``resume``/``ckpt_path``/``hydra``) with a
  ``checkpoints/last.ckpt``; if there is none, a new directory as above;
* the tasks of one multi-task ``srun`` step share ``<base>/slurm-<job id>.<step id>`` (each task
  composes its config on its own, so only a name from the job can be common to all of them); other ranks of an
  externally launched job (``RANK``/``LOCAL_RANK``/``SLURM_PROCID`` ≠ 0) take the time-stamped name
  without claiming it.

Every directory created here holds ``.zeroseg_run.json`` (the configuration key, creation time,
command line), which is how ``resume=auto`` recognises it. :func:`run_lock` marks a directory as in
use by a live process, so a second ``resume=auto`` launch of a running run fails instead of writing
into it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = ["RUN_MARKER", "RunInUseError", "config_key", "find_resumable_run", "new_run_dir", "run_dir_resolver", "run_lock"]

RUN_MARKER = ".zeroseg_run.json"
LOCK_FILE = ".zeroseg_run.lock"
# keys that say how to start, not what the run is
_NOT_PART_OF_THE_RUN = ("hydra", "resume", "ckpt_path")
# resolved once per process and base: Hydra evaluates ${hydra:...} interpolations more than once
_RESOLVED: dict[tuple[str, str], str] = {}


class RunInUseError(RuntimeError):
    """Another live process holds the run directory."""


def config_key(cfg: DictConfig) -> str:
    """A short hash of what defines a run: the composed config without how it was started."""
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    for key in _NOT_PART_OF_THE_RUN:
        container.pop(key, None)
    if isinstance(container.get("paths"), dict):
        container["paths"]["output_dir"] = ""  # the one value that depends on the directory itself
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(container), resolve=True)
    except Exception:  # noqa: BLE001 - a value that cannot resolve yet (e.g. a mandatory ???): hash the text
        resolved = container
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _read_marker(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return {}


def find_resumable_run(base: str | Path, key: str) -> Optional[Path]:
    """The newest directory under ``base`` made for config ``key`` that holds ``checkpoints/last.ckpt``."""
    base = Path(base)
    if not base.is_dir():
        return None
    candidates = []
    for run in base.iterdir():
        marker = _read_marker(run) if run.is_dir() else {}
        if marker.get("config_key") == key and (run / "checkpoints" / "last.ckpt").is_file():
            candidates.append((float(marker.get("created", 0.0)), run.name, run))
    return max(candidates)[2] if candidates else None


def _write_marker(run: Path, key: str) -> None:
    from zeroseg.utils.atomic import atomic_write_text

    marker = {"config_key": key, "created": time.time(), "command": [sys.executable, *sys.argv]}
    atomic_write_text(run / RUN_MARKER, json.dumps(marker, indent=2) + "\n", what="run marker")


def _nonzero_rank() -> bool:
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def new_run_dir(base: str | Path, key: str = "", now: Optional[datetime] = None) -> Path:
    """Create and return a run directory under ``base`` that no other launch uses (see module doc)."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1 and os.environ.get("SLURM_JOB_ID"):
        # the tasks of one `srun` step: named by job (array task) and step, the same in every task
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else os.environ["SLURM_JOB_ID"]
        run = base / f"slurm-{job}.{os.environ.get('SLURM_STEP_ID', '0')}"
        run.mkdir(exist_ok=True)
        if os.environ.get("SLURM_PROCID", "0") == "0" and not (run / RUN_MARKER).exists():
            _write_marker(run, key)
        return run
    stamp = (now or datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")
    if _nonzero_rank():
        return base / stamp  # rank 0 of the same launch claims it
    for attempt in range(10_000):
        run = base / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            run.mkdir()  # atomic: exactly one launch gets each name
        except FileExistsError:
            continue
        _write_marker(run, key)
        return run
    raise RuntimeError(f"could not create a new run directory under {base}: 10,000 names of {stamp} are taken")


def run_dir_resolver(base: str, kind: str = "run", *, _root_: DictConfig) -> str:
    """``${run_dir:<base>}`` (single runs: unique, or the run to continue with ``resume=auto``) and
    ``${run_dir:<base>,sweep}`` (multirun parent directories: unique)."""
    cache_key = (str(base), kind)
    if cache_key in _RESOLVED:
        return _RESOLVED[cache_key]
    key = config_key(_root_) if kind == "run" else ""
    run: Optional[Path] = None
    if kind == "run" and _root_.get("resume") == "auto":
        run = find_resumable_run(base, key)
        if run is not None:
            log.info("resume=auto: continuing %s", run)
    if run is None:
        run = new_run_dir(base, key)
    _RESOLVED[cache_key] = str(run)
    return str(run)


@contextlib.contextmanager
def run_lock(run: str | Path) -> Iterator[None]:
    """Hold ``run`` for this process; a :class:`RunInUseError` if a live process holds it already.

    Only the global-rank-0 process locks (the other ranks of a job work in the same directory).
    Advisory (``fcntl.flock``); a no-op where that is unavailable.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    if _nonzero_rank():
        yield
        return
    path = Path(run) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunInUseError(
                f"run directory {run} is in use by another process ({holder}); wait for it to stop "
                "(or stop it: it saves on SIGTERM) before continuing it with resume=auto"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {datetime.now():%Y-%m-%d %H:%M:%S}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
