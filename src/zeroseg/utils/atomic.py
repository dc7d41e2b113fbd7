"""Atomic file writes: a temporary file in the same directory, flushed to disk, then renamed.

A crash, a full disk or a kill during the write leaves the previous file intact (``os.replace`` is
atomic within one file system) and no half-written file under the final name. Used for every file
a run must be able to trust afterwards: checkpoints, ``metrics.json``, ``config.yaml``, caches.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

__all__ = ["AtomicWriteError", "atomic_output", "atomic_write_text"]

# free space below this on a failed write is reported as a full disk even when the error lost its errno
# (torch's zip writer turns ENOSPC into "PytorchStreamWriter failed writing file")
_NEARLY_FULL_BYTES = 64 * 2**20


class AtomicWriteError(OSError):
    """Writing a file failed; the previous version of the file (if any) is untouched."""


def _disk_full(error: BaseException, directory: Path) -> tuple[bool, int]:
    """(whether the failure looks like a full disk or quota, free bytes in ``directory``)."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = -1
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True, free
        cause = cause.__cause__ or cause.__context__
    return 0 <= free < _NEARLY_FULL_BYTES, free


@contextmanager
def atomic_output(path: str | os.PathLike, what: str = "file") -> Iterator[IO[bytes]]:
    """``with atomic_output(path) as f: f.write(...)`` — ``path`` appears only once complete.

    On failure the temporary file is removed, the previous ``path`` stays as it was, and an
    :class:`AtomicWriteError` names the file, the reason (a full disk is named as such) and the
    free space left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if not isinstance(error, Exception):  # KeyboardInterrupt / SystemExit: not a write failure
            raise
        full, free = _disk_full(error, path.parent)
        reason = "the disk is full (no space left on device)" if full else f"{type(error).__name__}: {error}"
        previous = f"the previous {path.name} is left intact" if path.exists() else f"no {path.name} was written"
        space = f"; {free / 2**20:.0f} MiB free in {path.parent}" if free >= 0 else ""
        raise AtomicWriteError(f"could not write {what} {path}: {reason}{space}; {previous}") from error


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_output(path, what) as handle:
        handle.write(text.encode("utf-8"))
    return Path(path)
