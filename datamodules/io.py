"""Reading images and masks from disk with one-line errors that name the file."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from modules.errors import UserError


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB ``(H, W, 3)``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image '{path}' does not exist")
    data = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if data is None:
        raise UserError(f"image '{path}' cannot be decoded (expected a JPEG/PNG/BMP image)")
    return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)


def mask_values(im: Image.Image) -> np.ndarray:
    """A mask image's values ``(H, W)``, by what its mode stores:

    - ``P`` (palette, VOC / DAVIS): the palette indices, not the colours they are shown in;
    - ``1``, ``L``, ``I;16``, ``I``: the stored values (8-bit, 16-bit Cityscapes ids, ...);
    - ``RGB`` / ``RGBA`` / ``LA``: gray stored in colour channels (all equal) gives that gray
      value; otherwise the largest channel (RITM's rule: any non-black pixel is the object).
    """
    if im.mode == "P":
        return np.array(im)
    if im.mode in ("1", "L", "I;16", "I;16B", "I;16L", "I", "F"):
        return np.array(im).astype(np.int64 if im.mode.startswith("I") else np.uint8)
    rgb = np.array(im.convert("RGB"))
    return rgb[..., 0] if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all() else rgb.max(axis=2)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file's values ``(H, W)`` whatever its format (see :func:`mask_values`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"mask '{path}' does not exist")
    try:
        with Image.open(path) as im:
            return mask_values(im)
    except OSError as e:
        raise UserError(f"mask '{path}' cannot be decoded (expected a PNG/BMP mask): {e}") from e
