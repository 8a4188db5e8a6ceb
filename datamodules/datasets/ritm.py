"""The interactive benchmarks in RITM's layout: one image folder, one mask folder.

==========  =====================  ==============================================
dataset     folders                masks
==========  =====================  ==============================================
grabcut     data_GT/, boundary_GT/ ``<id>.bmp``: > 128 object, 128 band to ignore
berkeley    images/, masks/        ``<id>[a-z]?.png``: > 0 object; several masks per image
davis       img/, gt/              ``<id>.png``: > 0 object (palette PNGs: the index)
coco_mval   img/, gt/              ``<id>.png``: > 0 object
==========  =====================  ==============================================

A mask finds its image by its name, trailing letters stripped (``239007a`` -> ``239007``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import numpy as np

from datamodules.datasets.base import IndexedObjects, ObjectRef, Target, UNKNOWN_CLASS, require_dir
from datamodules.io import read_mask
from modules.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
IGNORE_VALUE = 128  # GrabCut's unknown band


def mask_target(mask_values: np.ndarray, ignore_band: bool = False) -> Target:
    """RITM's rule: object where the mask's value (``datamodules.io.read_mask``: palette index,
    gray value, or largest colour channel) is > 0; GrabCut (``ignore_band``): 128 is the band
    to ignore and > 128 the object."""
    if ignore_band:
        return Target(mask_values > IGNORE_VALUE, mask_values == IGNORE_VALUE)
    return Target(mask_values > 0, np.zeros(mask_values.shape, bool))


class MaskFolderObjects(IndexedObjects):
    """Images and binary masks in two folders; each mask is one object."""

    images_dir = "images"
    masks_dir = "masks"
    ignore_band = False

    def index(self) -> Iterable[ObjectRef]:
        image_dir = require_dir(self.root / self.images_dir, f"{self.name} image folder")
        images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        mask_dir = require_dir(self.root / self.masks_dir, f"{self.name} mask folder")
        for path in sorted(p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            stem = path.stem if path.stem in images else re.sub(r"[a-z]+$", "", path.stem)
            if stem not in images:
                raise UserError(f"mask '{path}' has no image '{stem}.*' in '{image_dir}'")
            t = mask_target(read_mask(path), self.ignore_band)
            yield ObjectRef(images[stem], path, path.stem if path.stem != stem else None, UNKNOWN_CLASS,
                            int(t.mask.sum()))

    def target(self, ref: ObjectRef, shape: tuple[int, int]) -> Target:
        return mask_target(read_mask(ref.annotation), self.ignore_band)


class GrabCutObjects(MaskFolderObjects):
    name, images_dir, masks_dir, ignore_band = "grabcut", "data_GT", "boundary_GT", True


class BerkeleyObjects(MaskFolderObjects):
    name, images_dir, masks_dir = "berkeley", "images", "masks"


class DavisObjects(MaskFolderObjects):
    name, images_dir, masks_dir = "davis", "img", "gt"


class COCOMValObjects(MaskFolderObjects):
    name, images_dir, masks_dir = "coco_mval", "img", "gt"
