"""DRIONS-DB optic discs: one object per fundus image, the filled expert contour.

Layout (``root`` = the DRIONS-DB folder)::

    images/image_NNN.jpg
    experts_anotation/anotExpert1_NNN.txt   one "x , y" contour point per line

``expert`` picks the annotator (1 or 2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from datamodules.datasets.base import IndexedObjects, ObjectRef, Target, fill_polygons, polygon_area, require_dir, require_file
from modules.errors import UserError

OPTIC_DISC = 1


def read_contour(path: Path) -> np.ndarray:
    """The ``(N, 2)`` float x, y points of a DRIONS annotation file."""
    points = []
    for n, line in enumerate(require_file(path, "DRIONS annotation").read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            x, y = (float(v) for v in line.split(","))
        except ValueError:
            raise UserError(f"DRIONS annotation '{path}' line {n}: '{line.strip()}' (expected 'x , y')") from None
        points.append((x, y))
    if len(points) < 3:
        raise UserError(f"DRIONS annotation '{path}': {len(points)} points (expected a contour of at least 3)")
    return np.array(points)


class DRIONSObjects(IndexedObjects):
    """DRIONS-DB optic discs (layout in the module docstring)."""

    name = "drions"
    class_names = {OPTIC_DISC: "optic_disc"}

    def __init__(self, root: str | Path, expert: int = 1, min_area: int = 0):
        self.expert = expert
        super().__init__(root, min_area)

    def index(self) -> Iterable[ObjectRef]:
        ann_dir = require_dir(self.root / "experts_anotation", "DRIONS annotation folder")
        for image in sorted(require_dir(self.root / "images", "DRIONS image folder").glob("image_*.jpg")):
            number = image.stem.split("_")[-1]
            path = ann_dir / f"anotExpert{self.expert}_{number}.txt"
            contour = read_contour(path)
            area = polygon_area(contour)
            yield ObjectRef(image, path, None, OPTIC_DISC, area)

    def target(self, ref: ObjectRef, shape: tuple[int, int]) -> Target:
        mask = fill_polygons([read_contour(ref.annotation)], shape)
        return Target(mask, np.zeros(shape, bool))
