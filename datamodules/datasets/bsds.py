"""BSDS500 human region partitions as objects, for training on real photos.

Layout (``root`` = the BSDS500 folder)::

    images/{train,val,test}/<id>.jpg
    groundTruth/{train,val,test}/<id>.mat   cell array ``groundTruth``: one struct per
                                            annotator, ``Segmentation`` = regions 1..K

Every region of every chosen annotator's partition is an object (regions below
``min_area`` pixels, or below ``min_fraction`` of the image, are skipped); the annotator's
other regions are its negatives. ``min_fraction`` keeps object-like regions: the coarser
annotators' partitions hold whole objects, the finer ones parts and texture patches.

Some copies store portrait photos rotated to landscape while their ``.mat`` stays portrait
(51 of the 404 images in ``../shared/data/BSDS500``). Such an annotation is rotated to its
image, in the direction where its region boundaries agree with the image's edges
(:func:`annotation_rotation`); any other size mismatch is an error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
import scipy.io
from PIL import Image

from datamodules.datasets.base import (
    IndexedObjects, ObjectRef, Target, UNKNOWN_CLASS, instance_areas, instance_target, require_dir, require_file)
from datamodules.io import read_image
from modules.errors import UserError


def read_partitions(path: Path, rotation: int = 0) -> list[np.ndarray]:
    """Every annotator's region map of a BSDS ``groundTruth/*.mat``, rotated by
    ``rotation`` quarter turns (``np.rot90``)."""
    try:
        gt = scipy.io.loadmat(str(require_file(path, "BSDS annotation")))["groundTruth"]
        return [np.rot90(gt[0, i]["Segmentation"][0, 0].astype(np.int32), rotation) for i in range(gt.shape[1])]
    except (ValueError, KeyError, IndexError, TypeError, OSError, scipy.io.matlab.MatReadError) as e:
        raise UserError(f"BSDS annotation '{path}' cannot be read (expected groundTruth{{i}}.Segmentation): {e}") from e


def region_boundaries(regions: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour lies in another region."""
    edge = np.zeros(regions.shape, bool)
    edge[:, :-1] |= regions[:, 1:] != regions[:, :-1]
    edge[:-1] |= regions[1:] != regions[:-1]
    return edge


def annotation_rotation(regions: np.ndarray, image: np.ndarray) -> int:
    """Quarter turns (0, 1 or 3) that bring ``regions`` to ``image``'s orientation: 0 when the
    sizes agree; for a transposed size, the turn whose region boundaries fall on stronger
    image gradients. ``-1`` when no turn makes the sizes agree."""
    if regions.shape == image.shape[:2]:
        return 0
    if regions.shape != image.shape[1::-1]:
        return -1
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gradient = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    return max((1, 3), key=lambda k: float(gradient[region_boundaries(np.rot90(regions, k))].mean()))


class BSDSObjects(IndexedObjects):
    """BSDS500 regions of ``splits`` from ``annotators`` (all when ``None``, else their indices)
    covering at least ``min_fraction`` of their image."""

    name = "bsds"

    def __init__(self, root: str | Path, splits: list[str] = ["train", "val", "test"],  # noqa: B006
                 annotators: list[int] | None = None, min_area: int = 0, min_fraction: float = 0.0):
        if not 0.0 <= min_fraction < 1.0:
            raise UserError(f"bsds: min_fraction={min_fraction} (expected a share of the image in [0, 1))")
        self.splits, self.annotators, self.min_fraction = list(splits), annotators, min_fraction
        self.below_fraction = 0  # regions skipped by min_fraction
        self.rotation: dict[Path, int] = {}  # quarter turns per annotation file
        super().__init__(root, min_area)

    @staticmethod
    def _rotation(image: Path, path: Path, regions: np.ndarray) -> int:
        try:
            with Image.open(image) as im:
                size = im.size[::-1]
        except OSError as e:
            raise UserError(f"image '{image}' cannot be decoded (expected a JPEG image): {e}") from e
        if size == regions.shape:
            return 0
        rotation = annotation_rotation(regions, read_image(image))
        if rotation < 0:
            raise UserError(f"annotation '{path}' is {regions.shape[1]}x{regions.shape[0]} but image '{image}' is "
                            f"{size[1]}x{size[0]} (expected the same size)")
        return rotation

    def index(self) -> Iterable[ObjectRef]:
        for split in self.splits:
            gt_dir = require_dir(self.root / "groundTruth" / split, "BSDS annotation folder")
            for path in sorted(gt_dir.glob("*.mat")):
                image = self.root / "images" / split / f"{path.stem}.jpg"
                partitions = read_partitions(path)
                self.rotation[path] = self._rotation(image, path, partitions[0])
                for a in self.annotators if self.annotators is not None else range(len(partitions)):
                    if a >= len(partitions):
                        raise UserError(f"BSDS annotation '{path}' has {len(partitions)} annotators (asked for {a})")
                    for region, area in instance_areas(partitions[a]).items():
                        if area < self.min_fraction * partitions[a].size:
                            self.below_fraction += 1
                        else:
                            yield ObjectRef(image, path, (a, region), UNKNOWN_CLASS, area)

    def skip_notes(self) -> list[str]:
        return [f"{self.below_fraction} below min_fraction={self.min_fraction:g}"] if self.min_fraction else []

    def target(self, ref: ObjectRef, shape: tuple[int, int]) -> Target:
        annotator, region = ref.key
        regions = read_partitions(ref.annotation, self.rotation[ref.annotation])[annotator]
        return instance_target(regions, region, np.zeros(shape, bool))
