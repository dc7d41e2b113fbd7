"""Check every file of a dataset before training starts, and list every bad one.

``python -m zeroseg.data.verify dataset=<name> [overrides] [--force]`` checks the train, val and test
splits that ``dataset=<name>`` configures and prints every problem (exit status 1 if any);
``ZSSDataModule`` runs the same check at setup (``dataset.verify``, on by default) so a missing,
corrupt or mislabelled file stops the run in its first minute, not hours into it.

Each item is checked by its reader (:meth:`zeroseg.data.folders.SegmentationFolder.check_item`):
image and label exist and open (JPEGs decoded at 1/8 scale, which still reads all their data),
label values lie in the layout's valid set, image and label sizes match. The pass runs over the
loader workers with a progress bar (log lines when not on a terminal). A split that passed is
remembered under ``<cache_dir>/verified/``, keyed by the paths, sizes and modification times of all
its files, so reruns skip it until a file changes.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from torch.utils.data import DataLoader, Dataset

from zeroseg.utils.atomic import atomic_write_text

__all__ = ["DatasetVerificationError", "fingerprint_files", "main", "verify_dataset", "verify_datasets"]

log = logging.getLogger(__name__)

# bump when the checks change, so earlier passes are not trusted any more
CHECKS_VERSION = 1
REPORTED_PROBLEMS = 20


class DatasetVerificationError(ValueError):
    """Files of a dataset are missing, unreadable or hold invalid labels."""


def fingerprint_files(paths: Iterable[Path], salt: str) -> Optional[str]:
    """A digest of the paths, sizes and modification times of ``paths`` (``None`` if one is missing)."""
    digest = hashlib.sha1(salt.encode())
    try:
        for path in paths:
            stat = Path(path).stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    except OSError:
        return None
    return digest.hexdigest()[:16]


class _ItemChecks(Dataset):
    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> list[str]:
        return self.dataset.check_item(index)


def _as_list(batch: list[list[str]]) -> list[list[str]]:
    return batch


class _Progress:
    """A tqdm bar on a terminal; otherwise a log line at every tenth of the way."""

    def __init__(self, total: int, description: str) -> None:
        self.total, self.description, self.done, self.started = total, description, 0, time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description, unit="item")
        self._next_report = max(1, total // 10)

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.done >= self._next_report or self.done == self.total:
            elapsed = time.monotonic() - self.started
            log.info("%s: %d/%d items (%.0f%%), %.0f items/s", self.description, self.done, self.total,
                     100 * self.done / max(self.total, 1), self.done / max(elapsed, 1e-9))  # fmt: skip
            self._next_report = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def verify_dataset(
    dataset: Any, cache_dir: Optional[str | Path] = None, num_workers: int = 0, use_cache: bool = True
) -> list[str]:
    """Every problem of every item of ``dataset`` (``[]``: sound, or nothing to check — generated data)."""
    if not callable(getattr(dataset, "check_item", None)):
        return []
    name = f"{getattr(dataset, 'name', type(dataset).__name__)} {getattr(dataset, 'split', '')}".strip()
    lut = getattr(dataset, "lut", None)
    salt = f"{type(dataset).__name__}:{CHECKS_VERSION}:{lut.tobytes().hex() if lut is not None else ''}"
    key = fingerprint_files((path for pair in dataset.pairs for path in pair), salt) if cache_dir is not None else None
    marker = Path(cache_dir) / "verified" / f"{name.replace(' ', '-')}-{key}" if key else None
    if use_cache and marker is not None and marker.is_file():
        log.info("dataset %s: %d items verified before (unchanged since; %s)", name, len(dataset), marker)
        return []
    progress = _Progress(len(dataset), f"verifying {name}")
    problems: list[str] = []
    loader = DataLoader(_ItemChecks(dataset), batch_size=16, num_workers=num_workers, collate_fn=_as_list)
    try:
        for batch in loader:
            for item_problems in batch:
                problems.extend(item_problems)
            progress.update(len(batch))
    finally:
        progress.close()
    if not problems and marker is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        atomic_write_text(marker, f"{len(dataset)} items verified {stamp}\n", what="verification mark")
    log.info("dataset %s: %d items checked, %d problems", name, len(dataset), len(problems))
    return problems


def verify_datasets(
    datasets: Mapping[str, Any], dataset_name: str, cache_dir: Optional[str | Path] = None, num_workers: int = 0
) -> None:
    """Verify each split; a :class:`DatasetVerificationError` listing the first problems if any split has one."""
    problems = [problem for dataset in datasets.values() for problem in verify_dataset(dataset, cache_dir, num_workers)]
    if not problems:
        return
    shown = "\n".join(f"  - {p}" for p in problems[:REPORTED_PROBLEMS])
    more = f"\n  ... and {len(problems) - REPORTED_PROBLEMS} more" if len(problems) > REPORTED_PROBLEMS else ""
    raise DatasetVerificationError(
        f"dataset '{dataset_name}': {len(problems)} problem(s) in its files ({', '.join(datasets)} checked):\n{shown}{more}\n"
        f"`python -m zeroseg.data.verify dataset={dataset_name}` lists them all; dataset.verify=false skips this check"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zeroseg.data.verify",
        description="Check every image and label file of a dataset's splits and list every problem.",
        epilog="example: python -m zeroseg.data.verify dataset=voc paths.data_dir=/data",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for zeroseg.train (dataset=<name>, paths.data_dir=...)")
    parser.add_argument("--force", action="store_true", help="check splits that passed before too (ignore the cache)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import tempfile

    import hydra

    from zeroseg.data.folders import DatasetLayoutError
    from zeroseg.utils.config import compose_config

    cfg = compose_config("train", args.overrides, output_dir=tempfile.gettempdir())
    dataset_cfg = cfg.dataset
    name = str(dataset_cfg.split.get("name") or dataset_cfg.split.get("benchmark") or "dataset")
    total, checked = 0, 0
    seen: set[str] = set()
    for split in ("train", "val", "test"):
        node = dataset_cfg.get(f"{split}_dataset")
        if node is None:
            continue
        try:
            dataset = hydra.utils.instantiate(node)()
        except DatasetLayoutError as error:
            print(f"[{split}] {error}")
            total += 1
            continue
        identity = f"{type(dataset).__name__}:{getattr(dataset, 'root', split)}:{getattr(dataset, 'split', split)}:{len(dataset)}"
        if identity in seen:
            continue  # test = val for the real benchmarks
        seen.add(identity)
        if not callable(getattr(dataset, "check_item", None)):
            print(f"[{split}] {type(dataset).__name__}: generated in memory, no files to check")
            continue
        problems = verify_dataset(dataset, dataset_cfg.get("cache_dir"), int(dataset_cfg.get("num_workers") or 0), not args.force)
        checked += len(dataset)
        for problem in problems:
            print(f"[{split}] {problem}")
        total += len(problems)
    print(f"dataset '{name}': {checked} items checked, {total} problem(s)")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
