"""Checkpoints of a training run in ``<default_root_dir>/checkpoints``."""
from __future__ import annotations

import os

import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint


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


class ThreadCount(Callback):
    """Keeps torch's CPU thread count in every checkpoint and says so when a run resumes with
    another count: CPU kernels sum in an order that depends on it, so the weights then differ
    from an uninterrupted run's (1 against 2 threads changed 115 of 144 tensors of the evolution
    initial model within 3 steps). Set ``OMP_NUM_THREADS`` to reproduce a run made with another
    count."""

    def state_dict(self) -> dict:
        return {"cpu_threads": torch.get_num_threads()}

    def load_state_dict(self, state_dict: dict) -> None:
        saved, now = state_dict.get("cpu_threads"), torch.get_num_threads()
        if saved is not None and saved != now:
            print(f"note: the checkpoint was written with {saved} CPU threads and resumes with {now}: "
                  f"the weights will not be bitwise those of an uninterrupted run (OMP_NUM_THREADS={saved} would be)",
                  flush=True)
