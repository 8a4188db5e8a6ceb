"""Checkpoints of a training run in ``<default_root_dir>/checkpoints``."""
from __future__ import annotations

import os

from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from modules.environment import differences, environment
from modules.errors import check


def checkpoint_dir(trainer) -> str:
    return os.path.join(trainer.default_root_dir, "checkpoints")


class RunCheckpoint(ModelCheckpoint):
    """``step{N}.ckpt`` every ``every_n_train_steps`` steps and ``last.ckpt`` (what
    ``fit --ckpt_path last`` resumes from), in ``dirpath`` (default: the run's
    ``<default_root_dir>/checkpoints``), so that one shared config serves every run.

    Args:
        dirpath: where the checkpoints go (default: beside the run).
        every_n_train_steps: steps between checkpoints.
        keep: how many of the latest ``step{N}.ckpt`` stay (``None``: all, for looking back at
            any step; a 6000-step real-photo run is then 25 files of 72 MB).
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 250, keep: int | None = None):
        check(keep is None or keep >= 1, f"RunCheckpoint keep={keep}: expected a count >= 1, or null to keep every checkpoint")
        latest = {} if keep is None else {"monitor": "step", "mode": "max"}
        super().__init__(dirpath=dirpath, filename="step{step:05d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_train_steps, save_last=True, save_top_k=-1 if keep is None else keep,
                         enable_version_counter=False, **latest)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = checkpoint_dir(trainer)
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer, pl_module) -> None:
        """The end of training is saved too (``step{N}.ckpt`` and ``last.ckpt``): for a length
        that is no multiple of ``every_n_train_steps`` Lightning keeps the last multiple's weights
        in ``last.ckpt`` (800 steps every 250: step 750's)."""
        if self._should_skip_saving_checkpoint(trainer):
            return super().on_train_end(trainer, pl_module)
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


class RunEnvironment(Callback):
    """Keeps the run's environment (``modules.environment``: CPU, thread count, library
    versions) in every checkpoint and says in one line what differs when a run resumes elsewhere:
    CPU kernels sum in an order that depends on the thread count and the CPU, and library
    versions change augmentation and kernels, so the weights then differ from an uninterrupted
    run's (1 against 2 threads changed 115 of 144 tensors of the evolution initial model within 3
    steps; OpenCV 4.14 against 5.0, 117 of 140 tensors of the initial model within 200 steps).
    ``OMP_NUM_THREADS`` and ``constraints.txt`` reproduce a run made with another count or
    versions."""

    def state_dict(self) -> dict:
        return environment()

    def load_state_dict(self, state_dict: dict) -> None:
        changed = differences(state_dict, environment())
        if changed:
            threads = state_dict.get("cpu_threads")
            print(f"note: the checkpoint was written in another environment ({'; '.join(changed)}): the weights will "
                  f"not be bitwise those of an uninterrupted run (OMP_NUM_THREADS={threads} and `make venv` with "
                  "constraints.txt reproduce the threads and libraries; the CPU must match too)", flush=True)
