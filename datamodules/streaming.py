"""The training stream: every sample's object and randomness fixed by its place in the stream.

The stream is endless. Its global sample number ``n`` reads object ``perm_e[n % N]`` of epoch
``e = n // N`` (a permutation of the ``N`` objects seeded by ``(seed, e)``), so every epoch reads
every object once, and draws its augmentation and clicks from ``(seed, n)``. Batch ``b`` of DDP
rank ``r`` of ``R`` holds the numbers ``(b * R + r) * B + j``, ``j < B``; dataloader worker ``w``
of ``W`` makes batches ``w, w + W, ...`` (the order in which a DataLoader takes them). So the
samples a run sees do not depend on the number of workers, and a run resumed at step ``s``
starts at batch ``s`` and sees exactly what an uninterrupted run would have.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info


def stream_numbers(start_batch: int, batch_size: int, rank: int = 0, world_size: int = 1, worker: int = 0,
                   num_workers: int = 1) -> Iterator[int]:
    """The global sample numbers that (rank, worker) reads, in order, from batch ``start_batch``."""
    b = start_batch + worker
    while True:
        first = (b * world_size + rank) * batch_size
        yield from range(first, first + batch_size)
        b += num_workers


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def object_at(number: int, n: int, seed: int) -> int:
    """The object read by global sample ``number`` of a stream over ``n`` objects."""
    return int(_epoch_order(n, seed, number // n)[number % n])


def distributed_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ObjectStream(IterableDataset):
    """``dataset.sample(index, seed)`` for each sample of the stream, from batch ``start_batch``
    on (a resumed run's global step), sharded across ranks and dataloader workers.

    ``rank`` / ``world_size`` default to the initialised process group (read when the stream is
    iterated, i.e. after DDP has started).
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, start_batch: int = 0, rank: int | None = None,
                 world_size: int | None = None):
        self.dataset, self.batch_size, self.seed, self.start_batch = dataset, batch_size, seed, start_batch
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        rank, world = (self.rank, self.world_size) if self.rank is not None else distributed_rank()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = len(self.dataset)
        for number in stream_numbers(self.start_batch, self.batch_size, rank, world, worker, workers):
            yield self.dataset.sample(object_at(number, n, self.seed), seed=[self.seed, number])
