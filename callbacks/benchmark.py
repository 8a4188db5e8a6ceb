"""Collects the per-object click-by-click results of ``trainer.test`` runs."""
from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch.distributed as dist

from modules.evaluation import ObjectResult


class ClickRecorder(pl.Callback):
    """Keeps every benchmark object's IoU curve and click latencies, keyed by dataset.

    Under DDP each rank evaluates its share; ``on_test_epoch_end`` gathers all shares to every
    rank and drops the duplicates that a distributed sampler pads with.
    """

    def __init__(self) -> None:
        self.records: dict[str, dict[int, tuple[str, np.ndarray, list[float]]]] = {}

    def on_test_batch_end(self, trainer, pl_module, outputs: ObjectResult, batch, batch_idx, dataloader_idx=0) -> None:
        loaders = trainer.test_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        name = loader.dataset.name
        self.records.setdefault(name, {})[int(batch["index"][0])] = (batch["name"][0], outputs.ious, outputs.seconds)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shares: list = [None] * dist.get_world_size()
            dist.all_gather_object(shares, self.records)
            merged: dict = {}
            for share in shares:
                for name, objects in share.items():
                    merged.setdefault(name, {}).update(objects)
            self.records = merged

    def dataset(self, name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Object names, IoUs ``(objects, clicks)`` and per-click seconds, in dataset order."""
        objects = self.records[name]
        order = sorted(objects)
        names = [objects[i][0] for i in order]
        ious = np.stack([objects[i][1] for i in order])
        seconds = np.concatenate([objects[i][2] for i in order])
        return names, ious, seconds
