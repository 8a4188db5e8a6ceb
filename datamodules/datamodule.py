"""LightningDataModule over object sources: training crops, validation, benchmark sets."""
from __future__ import annotations

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from datamodules.objects import EvalObjects, ObjectSource, TrainObjects
from datamodules.synthetic import SyntheticObjects


class InteractiveDataModule(pl.LightningDataModule):
    """Streams the embedded procedural domains (see ``datamodules.synthetic``).

    Training and validation draw from ``train_domain`` under different seeds; the benchmark
    (``test``) draws ``test_length`` objects from every domain in ``test_domains`` under
    ``test_seed``, so the source images it reports are held out from training.

    Args:
        train_domain: domain the initial model is trained on.
        train_length: scenes per training epoch (drawn lazily, never stored).
        val_length: validation objects.
        test_domains: domains the benchmark evaluates, in order.
        test_length: objects per benchmark domain.
        image_size: side of the rendered images.
        crop_size: side of the training crops.
        batch_size: training batch size.
        num_workers: dataloader worker processes.
        min_area: objects smaller than this (pixels) are not used as targets.
        max_positive: at most this many random positive clicks per training sample.
        max_negative: at most this many random negative clicks per training sample.
        click_capacity: click slots per training sample (random + iterative clicks).
    """

    def __init__(
        self,
        train_domain: str = "source",
        train_length: int = 20000,
        val_length: int = 64,
        test_domains: list[str] = ["source", "fundus", "rooftop"],  # noqa: B006 (jsonargparse needs a literal default)
        test_length: int = 100,
        image_size: int = 128,
        crop_size: int = 128,
        batch_size: int = 8,
        num_workers: int = 1,
        train_seed: int = 0,
        val_seed: int = 1,
        test_seed: int = 2,
        min_area: int = 64,
        max_positive: int = 5,
        max_negative: int = 5,
        click_capacity: int = 16,
    ):
        super().__init__()
        self.save_hyperparameters()

    def _source(self, domain: str, length: int, seed: int) -> ObjectSource:
        return SyntheticObjects(domain, length, seed, self.hparams.image_size, self.hparams.min_area)

    def _train_view(self, source: ObjectSource, augment: bool) -> TrainObjects:
        h = self.hparams
        return TrainObjects(source, h.crop_size, h.max_positive, h.max_negative, h.click_capacity, augment=augment)

    def _loader(self, dataset, shuffle: bool, batch_size: int) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                          persistent_workers=workers > 0, drop_last=shuffle)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return self._loader(self._train_view(self._source(h.train_domain, h.train_length, h.train_seed), True), True, h.batch_size)

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        return self._loader(self._train_view(self._source(h.train_domain, h.val_length, h.val_seed), False), False, h.batch_size)

    def importance_dataset(self, length: int) -> TrainObjects:
        """Unaugmented training-domain samples with simulated clicks (for MAS importance)."""
        h = self.hparams
        return self._train_view(self._source(h.train_domain, length, h.train_seed), False)

    def test_datasets(self) -> list[EvalObjects]:
        h = self.hparams
        return [EvalObjects(self._source(d, h.test_length, h.test_seed)) for d in h.test_domains]

    def test_dataloader(self) -> list[DataLoader]:
        return [DataLoader(ds, batch_size=1, num_workers=self.hparams.num_workers) for ds in self.test_datasets()]
