"""Samplers and a resumable loader that make zeroseg's data order exact under DDP and resume.

* :class:`ShardedEvalSampler` gives every evaluation image to exactly one process, with no
  padding: ``torch``'s ``DistributedSampler`` repeats images to even out the shards, which counts
  them twice in a dataset-level confusion matrix.
* :class:`ResumableTrainSampler` draws a seeded permutation per epoch, shards it over processes
  and can start mid-epoch.
* :class:`ResumableDataLoader` is a ``DataLoader`` with ``state_dict`` / ``load_state_dict``:
  Lightning stores that state in checkpoints and restores it before the next ``iter()``, so a
  resumed run continues with exactly the batch an uninterrupted run would have seen next.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["ShardedEvalSampler", "ResumableTrainSampler", "ResumableDataLoader"]


class ShardedEvalSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, …`` of a dataset, in order, without padding."""

    def __init__(self, dataset_size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardedEvalSampler: rank {rank} not in 0..{world_size - 1}")
        self.dataset_size = dataset_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_size, self.world_size))


class ResumableTrainSampler(Sampler[int]):
    """A permutation of ``0..dataset_size-1`` seeded by ``(seed, epoch)``, sharded over processes.

    The permutation is padded by wrapping around to a multiple of ``world_size`` (harmless in
    training, unlike in evaluation). ``start_index`` skips the first samples of this process's
    shard, which is how a mid-epoch resume continues where it stopped.
    """

    def __init__(self, dataset_size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if dataset_size < 1:
            raise ValueError("ResumableTrainSampler: the training dataset is empty")
        self.dataset_size = dataset_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.start_index = 0
        self.num_samples = math.ceil(dataset_size / world_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_index = 0
        self.epoch = epoch

    def _shard(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        total = self.num_samples * self.world_size
        order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        shard = self._shard()[self.start_index :]
        # a resumed epoch starts mid-way once; the next pass over the same epoch is a full one
        self.start_index = 0
        return iter(shard)

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableTrainSampler` that Lightning can checkpoint.

    It counts the batches it has handed out in the current epoch. Lightning does not prefetch
    from loaders that have a length, so at checkpoint time that count is exactly the number of
    batches consumed by the training loop.
    """

    def __init__(self, dataset, sampler: ResumableTrainSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.batches_consumed = 0
        self._epoch_of_count = sampler.epoch

    def __iter__(self):
        sampler: ResumableTrainSampler = self.sampler  # type: ignore[assignment]
        if sampler.epoch != self._epoch_of_count or sampler.start_index == 0:
            self.batches_consumed = 0
            self._epoch_of_count = sampler.epoch
        for batch in super().__iter__():
            self.batches_consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableTrainSampler = self.sampler  # type: ignore[assignment]
        return {
            "epoch": sampler.epoch,
            "batches_consumed": self.batches_consumed,
            "batch_size": int(self.batch_size or 1),
            "world_size": sampler.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: ResumableTrainSampler = self.sampler  # type: ignore[assignment]
        if state["world_size"] != sampler.world_size or state["batch_size"] != self.batch_size:
            raise ValueError(
                "cannot resume the training data order: the checkpoint was written with "
                f"world_size={state['world_size']}, batch_size={state['batch_size']}, but this run has "
                f"world_size={sampler.world_size}, batch_size={self.batch_size}"
            )
        sampler.epoch = state["epoch"]
        sampler.start_index = state["batches_consumed"] * state["batch_size"]
        self.batches_consumed = state["batches_consumed"]
        self._epoch_of_count = state["epoch"]
