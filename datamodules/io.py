"""Reading images and masks from disk with one-line errors that name the file."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from modules.errors import UserError


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB ``(H, W, 3)``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image '{path}' does not exist")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"image '{path}' cannot be decoded (expected a JPEG/PNG/BMP image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as its uint8 values ``(H, W)`` (first channel of colour masks)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"mask '{path}' does not exist")
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise UserError(f"mask '{path}' cannot be decoded (expected a PNG/BMP mask)")
    return m[..., 0] if m.ndim == 3 else m
