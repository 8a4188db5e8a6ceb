"""Reading images and masks from disk with one-line errors that name the file."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from modules.errors import UserError


def _decode(path: str | Path, kind: str, flags: int, formats: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{kind} '{path}' does not exist")
    data = cv2.imread(str(path), flags)
    if data is None:
        raise UserError(f"{kind} '{path}' cannot be decoded (expected a {formats} file)")
    return data


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB ``(H, W, 3)``."""
    return cv2.cvtColor(_decode(path, "image", cv2.IMREAD_COLOR, "JPEG/PNG/BMP image"), cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as its values ``(H, W)`` (first channel of colour masks)."""
    m = _decode(path, "mask", cv2.IMREAD_UNCHANGED, "PNG/BMP mask")
    return m[..., 0] if m.ndim == 3 else m
