"""Rooftop aerial images with one polygon per roof.

The Rooftop dataset (Sun et al., CVPR 2014) has no single public file format, so this is
the layout accepted (``root`` = the dataset folder)::

    images/<id>.{png,jpg}
    polygons/<id>.json     {"polygons": [[[x, y], [x, y], ...], ...]}   one polygon per roof

Every polygon is an object; the other roofs of the image are its negatives.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from datamodules.datasets.base import IndexedObjects, ObjectRef, Target, fill_polygons, polygon_area, require_dir, require_file
from modules.errors import UserError

ROOF = 1


def read_polygons(path: Path) -> list[np.ndarray]:
    try:
        polygons = json.loads(require_file(path, "rooftop annotation").read_text())["polygons"]
        out = [np.asarray(p, dtype=float).reshape(-1, 2) for p in polygons]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"rooftop annotation '{path}': {e} (expected {{\"polygons\": [[[x, y], ...], ...]}})") from e
    if any(len(p) < 3 for p in out):
        raise UserError(f"rooftop annotation '{path}': a polygon has fewer than 3 points")
    return out


class RooftopObjects(IndexedObjects):
    """Rooftop polygons (layout in the module docstring)."""

    name = "rooftop"
    class_names = {ROOF: "roof"}

    def index(self) -> Iterable[ObjectRef]:
        ann_dir = require_dir(self.root / "polygons", "rooftop annotation folder")
        images = require_dir(self.root / "images", "rooftop image folder")
        for image in sorted(p for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")):
            path = ann_dir / f"{image.stem}.json"
            for k, polygon in enumerate(read_polygons(path)):
                area = polygon_area(polygon)
                yield ObjectRef(image, path, k, ROOF, area)

    def target(self, ref: ObjectRef, shape: tuple[int, int]) -> Target:
        polygons = read_polygons(ref.annotation)
        mask = fill_polygons([polygons[ref.key]], shape)
        instances = np.zeros(shape, np.int32)
        for k, polygon in enumerate(polygons):
            if k != ref.key:
                instances[fill_polygons([polygon], shape) & ~mask] = k + 1
        return Target(mask, np.zeros(shape, bool), instances)
