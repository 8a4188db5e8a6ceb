"""Streaming a dataset view across DDP ranks and dataloader workers, each object once.

Every epoch draws one permutation of the objects (the same on every rank, from ``seed`` and
the epoch); rank ``r`` of ``R`` takes every R-th object of it and its worker ``w`` of ``W``
every W-th of those. The last ``len % R`` objects of an epoch's permutation are left out so
that every rank takes the same number of steps (DDP needs that); a different few each epoch.
"""
from __future__ import annotations

import numpy as np
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, get_worker_info


def shard_indices(n: int, seed: int, epoch: int, rank: int, world_size: int, worker: int = 0,
                  num_workers: int = 1) -> np.ndarray:
    """The indices of ``range(n)`` that (rank, worker) reads in ``epoch``."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = n // world_size
    return order[: per_rank * world_size][rank::world_size][worker::num_workers]


def distributed_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ObjectStream(IterableDataset):
    """``dataset``'s items in a seeded order per epoch, sharded across ranks and workers.

    ``rank`` / ``world_size`` default to the initialised process group (when the stream is
    iterated, i.e. after DDP has started).
    """

    def __init__(self, dataset: Dataset, seed: int = 0, rank: int | None = None, world_size: int | None = None):
        self.dataset, self.seed = dataset, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0  # each worker's copy counts its own epochs: all count alike

    def _rank(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        return distributed_rank()

    def __len__(self) -> int:
        return len(self.dataset) // self._rank()[1]

    def __iter__(self):
        rank, world = self._rank()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        indices = shard_indices(len(self.dataset), self.seed, self.epoch, rank, world, worker, workers)
        self.epoch += 1
        for i in indices:
            yield self.dataset[int(i)]
