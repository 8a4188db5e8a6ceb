"""Loading trained modules with one-line errors for bad files."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

from modules.errors import UserError
from modules.interactive import InteractiveSegmentationModule


def load_module(path: str | Path) -> InteractiveSegmentationModule:
    """Load an :class:`InteractiveSegmentationModule` checkpoint on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist (train one with `make train-init`)")
    try:
        return InteractiveSegmentationModule.load_from_checkpoint(path, map_location="cpu")
    except Exception as e:  # noqa: BLE001 (any failure means the file is not a usable checkpoint)
        if isinstance(e, (pickle.UnpicklingError, EOFError, RuntimeError)) and "weights_only" in str(e) or \
                isinstance(e, (pickle.UnpicklingError, EOFError)):
            reason = "not a PyTorch checkpoint (truncated, or another kind of file)"
        else:
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        raise UserError(f"checkpoint '{path}' cannot be loaded: {reason}") from e


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
