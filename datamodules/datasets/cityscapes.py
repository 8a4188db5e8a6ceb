"""Cityscapes fine instances: ids >= 1000 in ``*_gtFine_instanceIds.png`` are ``class * 1000 + k``.

Layout (``root`` = the Cityscapes folder)::

    leftImg8bit/{split}/{city}/<name>_leftImg8bit.png
    gtFine/{split}/{city}/<name>_gtFine_instanceIds.png   16-bit PNG

Pixels of an instance class without an instance id (crowds such as a group of cars, ids
24..33 below 1000) and unlabelled pixels (id 0) are ignored, like COCO's crowd regions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from datamodules.datasets.base import IndexedObjects, ObjectRef, Target, instance_areas, instance_target, require_dir
from datamodules.io import read_mask

CLASSES = {24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus", 29: "caravan", 30: "trailer", 31: "train",
           32: "motorcycle", 33: "bicycle"}


def cityscapes_ignore(ids: np.ndarray) -> np.ndarray:
    """Unlabelled pixels and crowd regions of instance classes."""
    return (ids == 0) | ((ids < 1000) & np.isin(ids, list(CLASSES)))


class CityscapesObjects(IndexedObjects):
    """Cityscapes instances of ``split`` (layout in the module docstring)."""

    name = "cityscapes"
    class_names = CLASSES

    def __init__(self, root: str | Path, split: str = "train", min_area: int = 0):
        self.split = split
        super().__init__(root, min_area)

    def index(self) -> Iterable[ObjectRef]:
        gt_dir = require_dir(self.root / "gtFine" / self.split, "Cityscapes annotation folder")
        for path in sorted(gt_dir.glob("*/*_gtFine_instanceIds.png")):
            image = self.root / "leftImg8bit" / self.split / path.parent.name / path.name.replace(
                "_gtFine_instanceIds.png", "_leftImg8bit.png")
            ids = read_mask(path).astype(np.int32)
            for k, area in instance_areas(ids[ids >= 1000], exclude=()).items():
                yield ObjectRef(image, path, k, k // 1000, area)

    def target(self, ref: ObjectRef, shape: tuple[int, int]) -> Target:
        ids = read_mask(ref.annotation).astype(np.int32)
        return instance_target(np.where(ids >= 1000, ids, 0), ref.key, cityscapes_ignore(ids))
