"""What every on-disk dataset shares: an object index built once, samples decoded lazily.

A dataset lists its objects (:class:`ObjectRef`: image file, annotation file, instance key,
class id, area) when it is opened; masks are only decoded again, one object at a time, in
``get_sample``. Objects below ``min_area`` pixels are dropped from the index and counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Iterable

import cv2
import numpy as np

from datamodules.io import read_image
from datamodules.objects import Sample
from modules.errors import UserError

UNKNOWN_CLASS = -1


@dataclass(frozen=True)
class ObjectRef:
    """One object: where its image and annotation are, and what the index knows of it."""

    image: Path
    annotation: Path
    key: Hashable  # which object of the annotation (instance id, annotator/region, ...)
    class_id: int
    area: int


@dataclass
class Target:
    """What an annotation gives for one object, at the image's resolution."""

    mask: np.ndarray  # bool
    ignore: np.ndarray  # bool, void / crowd / boundary band
    instances: np.ndarray | None = None  # int, the other objects (> 0), for negative clicks


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{what} '{path}' does not exist (expected a folder)")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist")
    return path


def read_split_list(path: Path) -> list[str]:
    """Image ids of a split file, one per line (VOC / SBD ``train.txt``)."""
    return [line.split()[0] for line in require_file(path, "split list").read_text().splitlines() if line.strip()]


def instance_areas(instances: np.ndarray, exclude: Iterable[int] = (0,)) -> dict[int, int]:
    """Pixel count of every id in an instance map, without the ``exclude`` ids."""
    ids, counts = np.unique(instances, return_counts=True)
    skip = set(exclude)
    return {int(i): int(c) for i, c in zip(ids, counts) if int(i) not in skip}


def instance_target(instances: np.ndarray, key: int, ignore: np.ndarray) -> Target:
    """Object ``key`` of an instance map; the other instances outside ``ignore`` are the
    objects negative clicks may land on."""
    mask = instances == key
    return Target(mask, ignore, np.where(mask | ignore, 0, instances).astype(np.int32))


def fill_polygons(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the filled ``(N, 2)`` x, y polygons."""
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(p).astype(np.int32) for p in polygons], 1)
    return mask.astype(bool)


def polygon_area(polygon: np.ndarray) -> int:
    """Pixel area of an ``(N, 2)`` x, y polygon (as ``fill_polygons`` rounds it)."""
    return int(cv2.contourArea(np.round(polygon).astype(np.float32)))


class IndexedObjects:
    """Base of the on-disk datasets: subclasses implement ``index`` and ``target``.

    Args:
        root: the dataset's folder, in its official layout.
        min_area: objects smaller than this (pixels) are skipped and counted in ``skipped``.
    """

    name = "dataset"
    class_names: dict[int, str] = {}

    def __init__(self, root: str | Path, min_area: int = 0):
        self.root = require_dir(Path(root).expanduser(), f"{self.name} root")
        self.min_area = min_area
        everything = list(self.index())
        self.objects = [o for o in everything if o.area >= min_area]
        self.skipped = len(everything) - len(self.objects)
        self.example_skipped = next((o for o in everything if o.area < min_area), None)
        if not self.objects:
            raise UserError(f"{self.name} at '{self.root}': no object of at least {min_area} px "
                            f"({len(everything)} smaller ones)")

    def index(self) -> Iterable[ObjectRef]:
        raise NotImplementedError

    def target(self, ref: ObjectRef, shape: tuple[int, int]) -> Target:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.objects)

    def class_of(self, index: int) -> int:
        return self.objects[index].class_id

    def key_of(self, index: int):
        """Which object of its annotation file object ``index`` is (e.g. a COCO annotation id)."""
        return self.objects[index].key

    def skip_notes(self) -> list[str]:
        """What else the index skipped, one phrase each, for :meth:`describe`."""
        return []

    def describe(self) -> str:
        images = len({o.image for o in self.objects})
        skips = ", ".join([f"{self.skipped} below min_area={self.min_area} px skipped", *self.skip_notes()])
        return f"{self.name}: {len(self.objects)} objects in {images} images ({skips})"

    def get_image(self, index: int) -> np.ndarray:
        """The image of object ``index`` alone: its annotation is not opened."""
        return read_image(self.objects[index].image)

    def get_sample(self, index: int) -> Sample:
        ref = self.objects[index]
        image = read_image(ref.image)
        t = self.target(ref, image.shape[:2])
        if t.mask.shape != image.shape[:2]:
            raise UserError(f"annotation '{ref.annotation}' is {t.mask.shape[1]}x{t.mask.shape[0]} but image "
                            f"'{ref.image}' is {image.shape[1]}x{image.shape[0]} (expected the same size)")
        key = "-".join(map(str, ref.key)) if isinstance(ref.key, tuple) else ref.key
        name = f"{self.name}/{ref.image.stem}" + ("" if key is None else f"/{key}")
        return Sample(image, t.mask.astype(bool), t.ignore.astype(bool), t.instances, name, ref.class_id)
