"""Checkpoints of a training run in ``<default_root_dir>/checkpoints``."""
from __future__ import annotations

import os

from pytorch_lightning.callbacks import ModelCheckpoint


def checkpoint_dir(trainer) -> str:
    return os.path.join(trainer.default_root_dir, "checkpoints")


class RunCheckpoint(ModelCheckpoint):
    """``step{N}.ckpt`` every ``every_n_train_steps`` steps and ``last.ckpt`` (what
    ``fit --ckpt_path last`` resumes from), all kept, in ``dirpath`` (default: the run's
    ``<default_root_dir>/checkpoints``), so that one shared config serves every run.

    Args:
        dirpath: where the checkpoints go (default: beside the run).
        every_n_train_steps: steps between checkpoints.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 250):
        super().__init__(dirpath=dirpath, filename="step{step:05d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_train_steps, save_last=True, save_top_k=-1,
                         enable_version_counter=False)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = checkpoint_dir(trainer)
        super().setup(trainer, pl_module, stage)
