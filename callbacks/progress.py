"""Progress of a long training run as plain lines (what a log file or CI shows; the rich bar
only draws in a terminal)."""
from __future__ import annotations

import sys
import time

import pytorch_lightning as pl
import torch


class ProgressLog(pl.Callback):
    """Every ``every`` seconds (and at the end) one line: step, loss, IoU, speed, time left.
    Silent in a terminal, where the progress bar shows the same.

    Args:
        every: seconds between lines.
        force: print even in a terminal.
    """

    def __init__(self, every: float = 60.0, force: bool = False):
        self.every, self.force = every, force

    def _active(self, trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero and (self.force or not sys.stdout.isatty())

    @staticmethod
    def _total(trainer: pl.Trainer) -> float:
        """The run's last step: ``max_steps``, or what ``max_epochs`` amounts to."""
        return trainer.max_steps if trainer.max_steps > 0 else float(trainer.estimated_stepping_batches)

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_time, self.start_step, self.last = time.monotonic(), trainer.global_step, float("-inf")
        if self._active(trainer):
            print(f"training from step {trainer.global_step} to {self._total(trainer):.0f} ({torch.get_num_threads()} CPU threads)", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        total = self._total(trainer)
        if self._active(trainer) and (now - self.last >= self.every or trainer.global_step >= total):
            self.last = now
            done = trainer.global_step - self.start_step
            rate = done / max(now - self.start_time, 1e-9)
            left = (total - trainer.global_step) / rate if rate > 0 else float("nan")
            metrics = trainer.callback_metrics
            shown = " · ".join(f"{k} {float(metrics[k]):.3f}" for k in ("train/loss", "train/iou_step", "val/iou",
                                                                        "evolve/loss") if k in metrics)
            print(f"step {trainer.global_step}/{total:.0f} · {shown} · {rate:.2f} steps/s · "
                  f"{left / 60:.1f} min left", flush=True)


class LearningRateLog(pl.callbacks.LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` that stays quiet when a run has no logger
    (``--trainer.logger false``) instead of stopping it."""

    def on_train_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)
