"""LightningDataModule over object sources: training crops, validation, benchmark sets."""
from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Subset

from datamodules.objects import EvalObjects, ObjectSource, TrainObjects
from datamodules.registry import Concat, build_sources
from datamodules.streaming import ObjectStream
from modules.errors import UserError

DataEntry = str | dict[str, Any]


class InteractiveDataModule(pl.LightningDataModule):
    """Training, validation and benchmark data, each a list of dataset entries.

    An entry names a dataset and its arguments (``datamodules.registry``), e.g.
    ``{dataset: bsds, root: ../shared/data/BSDS500}``, ``{dataset: coco, split: val,
    classes: [donut], shuffle: 0}`` or ``{dataset: synthetic, domain: fundus, length: 100,
    seed: 2}``. Training concatenates its entries (VOC + SBD); the benchmark reports each
    ``test`` entry as its own dataset, in order. The defaults are the embedded procedural
    domains: training and validation on ``source`` under different seeds, the benchmark on
    held-out ``source`` scenes and the two target domains.

    Args:
        train: datasets the model is trained on (concatenated).
        val: datasets validated on during training (concatenated).
        test: datasets the benchmark evaluates, each reported under its name.
        crop_size: side of the training crops.
        train_max_side: photos are brought to this long side before cropping (match the
            model's ``eval_max_side``); ``None`` for images already at the network's size.
        batch_size: training batch size.
        num_workers: dataloader worker processes.
        min_area: objects smaller than this (pixels) are skipped (and counted); ``None``: 64, and a
            dataset that loses more than half of its objects to it is an error (a mask read
            wrongly) unless its entry sets ``min_area``.
        max_positive: at most this many random positive clicks per training sample.
        max_negative: at most this many random negative clicks per training sample.
        click_capacity: click slots per training sample (random + iterative clicks).
        seed: seed of the training stream: its order (a new permutation every epoch) and every
            sample's augmentation and clicks.
    """

    def __init__(
        self,
        train: list[DataEntry] = [{"dataset": "synthetic", "domain": "source", "length": 20000, "seed": 0}],  # noqa: B006
        val: list[DataEntry] = [{"dataset": "synthetic", "domain": "source", "length": 64, "seed": 1}],  # noqa: B006
        test: list[DataEntry] = [  # noqa: B006 (jsonargparse needs literal defaults)
            {"dataset": "synthetic", "domain": "source", "length": 100, "seed": 2},
            {"dataset": "synthetic", "domain": "fundus", "length": 100, "seed": 2},
            {"dataset": "synthetic", "domain": "rooftop", "length": 100, "seed": 2},
        ],
        crop_size: int = 128,
        train_max_side: int | None = None,
        batch_size: int = 8,
        num_workers: int = 1,
        min_area: int | None = None,
        max_positive: int = 5,
        max_negative: int = 5,
        click_capacity: int = 16,
        seed: int = 0,
    ):
        super().__init__()
        for key, value, least in (("num_workers", num_workers, 0), ("batch_size", batch_size, 1), ("crop_size", crop_size, 16)):
            if value < least:
                raise UserError(f"data.{key}={value}: expected at least {least}")
        self.save_hyperparameters()

    # sources are opened (their index built) on first use, once per process
    @cached_property
    def train_source(self) -> ObjectSource:
        return Concat(build_sources(self.hparams.train, "data.train", self.hparams.min_area))

    @cached_property
    def val_source(self) -> ObjectSource:
        return Concat(build_sources(self.hparams.val, "data.val", self.hparams.min_area))

    @cached_property
    def test_sources(self) -> list[ObjectSource]:
        return build_sources(self.hparams.test, "data.test", self.hparams.min_area)

    def _train_view(self, source: ObjectSource, augment: bool) -> TrainObjects:
        h = self.hparams
        return TrainObjects(source, h.crop_size, h.max_positive, h.max_negative, h.click_capacity, augment=augment,
                            max_side=h.train_max_side)

    def _loader(self, dataset, batch_size: int) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        """An endless stream: a new seeded order every epoch, each object once per epoch across
        ranks and workers, every sample's randomness fixed by its place in the stream; a resumed
        run continues at its global step (``datamodules.streaming``)."""
        trainer = getattr(self, "trainer", None)
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        stream = ObjectStream(self._train_view(self.train_source, True), self.hparams.batch_size, self.hparams.seed,
                              start_batch=start)
        return self._loader(stream, self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._train_view(self.val_source, False), self.hparams.batch_size)

    def importance_dataset(self, length: int) -> Subset:
        """``length`` unaugmented training objects (a seeded choice) with simulated clicks,
        for MAS importance."""
        view = self._train_view(self.train_source, False)
        pick = np.random.default_rng(0).permutation(len(view))[:length] if length < len(view) else np.arange(len(view))
        return Subset(view, pick.tolist())

    def test_datasets(self) -> list[EvalObjects]:
        return [EvalObjects(s) for s in self.test_sources]

    def test_dataloader(self) -> list[DataLoader]:
        return [DataLoader(ds, batch_size=1, num_workers=self.hparams.num_workers) for ds in self.test_datasets()]
