"""Collects the per-object click-by-click results of ``trainer.test`` runs."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch.distributed as dist

from modules.evaluation import ObjectResult
from modules.metrics import repeated_clicks


@dataclass
class ObjectRecord:
    """What the benchmark keeps of one object (masks bit-packed: they travel between ranks)."""

    name: str
    ious: np.ndarray
    seconds: list[float]
    user_clicks: int
    clicks: int
    repeats: int  # clicks within 2 px of an earlier click of the same sign, of all max_clicks
    user_repeats: int  # the same among the clicks until the target IoU (Algorithm 1's user)
    shape: tuple[int, int]
    first_mask: np.ndarray
    last_mask: np.ndarray

    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        size = self.shape[0] * self.shape[1]
        unpack = lambda m: np.unpackbits(m)[:size].reshape(self.shape).astype(bool)  # noqa: E731
        return unpack(self.first_mask), unpack(self.last_mask)


class ClickRecorder(pl.Callback):
    """Keeps every benchmark object's record, keyed by dataset and index, and prints progress.

    Under DDP each rank evaluates its share; ``on_test_epoch_end`` gathers all shares to every
    rank and drops the duplicates that a distributed sampler pads with.
    """

    def __init__(self, label: str = "", every: float = 30.0) -> None:
        self.records: dict[str, dict[int, ObjectRecord]] = {}
        self.label, self.every = label, every
        self._last = 0.0

    def on_test_batch_end(self, trainer, pl_module, outputs: ObjectResult, batch, batch_idx, dataloader_idx=0) -> None:
        loaders = trainer.test_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        name = loader.dataset.name
        self.records.setdefault(name, {})[int(batch["index"][0])] = ObjectRecord(
            batch["name"][0], outputs.ious, outputs.seconds, outputs.user_clicks, len(outputs.clicks),
            repeated_clicks(outputs.clicks), repeated_clicks(outputs.clicks[:outputs.user_clicks]), outputs.last_mask.shape, np.packbits(outputs.first_mask),
            np.packbits(outputs.last_mask))
        now = time.monotonic()
        if trainer.is_global_zero and now - self._last > self.every:  # a line now and then, also in a log file
            self._last = now
            done, total = len(self.records[name]), len(loader.dataset)
            print(f"  {self.label} {name}: {done}/{total // trainer.world_size} objects", file=sys.stderr, flush=True)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shares: list = [None] * dist.get_world_size()
            dist.all_gather_object(shares, self.records)
            merged: dict = {}
            for share in shares:
                for name, objects in share.items():
                    merged.setdefault(name, {}).update(objects)
            self.records = merged

    def dataset(self, name: str) -> list[ObjectRecord]:
        """The records of dataset ``name``, in dataset order."""
        objects = self.records[name]
        return [objects[i] for i in sorted(objects)]
