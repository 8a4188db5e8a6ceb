"""``importance``: MAS parameter importance of a checkpoint on its training data.

Stored beside the checkpoint (``<ckpt>.mas.pt``) with the checkpoint's digest, so that an
importance file never silently serves another checkpoint.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from rich.progress import track
from torch.utils.data import DataLoader

from datamodules.datamodule import InteractiveDataModule
from lightning_app.checkpoints import file_digest, load_module
from modules.adaptation import mas_importance
from modules.errors import UserError
from modules.io import atomic_write


def importance_path(ckpt: str | Path) -> Path:
    """Where the MAS importance of a checkpoint is stored: beside it."""
    ckpt = Path(ckpt)
    return ckpt.with_name(ckpt.name + ".mas.pt")


MAS_DEFINITION = "aljundi2018: mean |d sum(logits^2) / d theta| over samples, unnormalised"
"""What the stored numbers are; a file computed under another definition is recomputed."""


def compute_importance(ckpt: str, samples: int = 200) -> Path:
    """Compute MAS importance for ``ckpt`` on ``samples`` objects of its training domain.

    Args:
        ckpt: checkpoint of an InteractiveSegmentationModule (its saved data config says
            which training data it saw).
        samples: number of training objects (one gradient each).
    """
    if samples < 1:
        raise UserError(f"samples={samples}: expected at least 1")
    path = importance_path(ckpt)
    digest = file_digest(ckpt) if Path(ckpt).is_file() else None
    if digest and path.exists():
        try:
            old = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 (an unreadable file is recomputed)
            old = {}
        if (old.get("checkpoint_sha256_16"), old.get("samples"), old.get("definition")) == (digest, samples, MAS_DEFINITION):
            print(f"MAS importance of {ckpt} is up to date: {path}")
            return path
    module = load_module(ckpt).eval()  # a missing or corrupt checkpoint stops here, in one line
    saved = torch.load(ckpt, map_location="cpu", weights_only=False).get("datamodule_hyper_parameters")
    if saved is None:
        raise UserError(f"checkpoint '{ckpt}' has no data config: train it with `python -m lightning_app fit`")
    accepted = inspect.signature(InteractiveDataModule).parameters  # LightningCLI adds private keys
    data = InteractiveDataModule(**{k: v for k, v in saved.items() if k in accepted})
    loader = DataLoader(data.importance_dataset(samples), batch_size=1, num_workers=0)
    batches = track(loader, description="MAS importance", total=len(loader))
    importance = mas_importance(module, lambda b: module(b["image"], b["clicks"]), batches)
    payload = {"importance": importance, "checkpoint_sha256_16": digest, "samples": samples, "definition": MAS_DEFINITION}
    atomic_write(path, lambda f: torch.save(payload, f), mode="wb")
    print(f"MAS importance of {ckpt} ({samples} samples): {path}")
    return path


def load_importance(ckpt: str | Path, digest: str | None = None) -> dict[str, torch.Tensor] | None:
    """The importance stored in ``<ckpt>.mas.pt``, ``None`` when there is none; an error when it
    was computed for another version of the checkpoint (``digest``: the checkpoint's
    ``file_digest`` when the caller has it already)."""
    path = importance_path(ckpt)
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any failure means the file is unusable)
        raise UserError(f"MAS importance '{path}' cannot be read ({type(e).__name__}): delete it and recompute it with "
                        f"`python -m lightning_app importance --ckpt {ckpt}`") from e
    if payload.get("definition") != MAS_DEFINITION:
        raise UserError(f"MAS importance '{path}' was computed under an older definition: recompute it with "
                        f"`python -m lightning_app importance --ckpt {ckpt}`")
    if payload.get("checkpoint_sha256_16") != (digest or file_digest(ckpt)):
        raise UserError(f"MAS importance '{path}' belongs to another version of '{ckpt}': recompute it with "
                        f"`python -m lightning_app importance --ckpt {ckpt}`")
    return payload["importance"]
