import json
import os
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# small enough for 2 CPU cores: 64 px images, narrow decoder, a few steps
TINY_MODEL = ["--model.backbone", "resnet10t", "--model.aspp_channels", "32", "--model.decoder_channels", "32"]
def synthetic(domain: str, length: int, seed: int = 2) -> str:
    """A data entry of 64 px synthetic scenes (CLI syntax)."""
    return f"{{dataset: synthetic, domain: {domain}, length: {length}, seed: {seed}, size: 64}}"


TINY_DATA = ["--data.train", f"[{synthetic('source', 200, 0)}]", "--data.val", f"[{synthetic('source', 4, 1)}]",
             "--data.crop_size", "64", "--data.batch_size", "2", "--data.num_workers", "0", "--data.min_area", "16"]


def tiny_fit_args(root: Path, steps: int = 3, config: str = "configs/train_init.yaml") -> list[str]:
    return [
        "fit", "--config", str(ROOT / config),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(root),
        "--trainer.callbacks", json.dumps([{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                                            "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True}}]),
        "--trainer.enable_progress_bar", "false",
        *TINY_MODEL, *TINY_DATA,
    ]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A checkpoint trained for a few steps through the real CLI (in-process)."""
    from lightning_app.cli import main

    root = tmp_path_factory.mktemp("train")
    assert main(tiny_fit_args(root)) == 0
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


@pytest.fixture(scope="session")
def tiny_ckpt_with_importance(tiny_ckpt) -> Path:
    """``tiny_ckpt`` with its MAS importance, computed through the CLI."""
    from lightning_app.cli import main

    assert main(["importance", "--ckpt", str(tiny_ckpt), "--samples", "4"]) == 0
    assert Path(str(tiny_ckpt) + ".mas.pt").is_file()
    return tiny_ckpt


class StopAt(pl.Callback):
    """Ends training after ``step`` steps: a run interrupted half-way."""

    def __init__(self, step: int = 1):
        self.step = step

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if trainer.global_step >= self.step:
            trainer.should_stop = True
