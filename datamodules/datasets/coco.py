"""COCO instances through pycocotools: polygons and RLE, crowd regions ignored.

Layout (``root`` = the COCO folder)::

    annotations/instances_{train,val}2017.json
    {train,val}2017/<file_name>

or any COCO instances file (``annotations``) over an image folder (``images``, relative to
``root``), e.g. the annotation app's output: ``{dataset: coco, root: my_images, annotations:
annotations.json, images: .}``.

The annotation file is parsed once (pycocotools); masks are decoded per object in
``get_sample``, never all at once.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterable

import numpy as np
from pycocotools.coco import COCO

from datamodules.datasets.base import IndexedObjects, ObjectRef, Target, require_file
from modules.errors import UserError


class COCOObjects(IndexedObjects):
    """Non-crowd COCO instances of ``split`` (e.g. ``train2017``'s ``split: train``)."""

    name = "coco"

    def __init__(self, root: str | Path, split: str = "train", year: str = "2017", annotations: str | None = None,
                 images: str | None = None, min_area: int = 0):
        self.split, self.year, self.annotations, self.images = split, year, annotations, images
        super().__init__(root, min_area)

    def index(self) -> Iterable[ObjectRef]:
        path = require_file(Path(self.annotations) if self.annotations else
                            self.root / "annotations" / f"instances_{self.split}{self.year}.json", "COCO annotation file")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its timing
                self.coco = COCO(str(path))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"COCO annotation file '{path}' cannot be read: {e}") from e
        self.class_names = {c["id"]: c["name"] for c in self.coco.loadCats(self.coco.getCatIds())}
        images = self.root / (self.images if self.images is not None else f"{self.split}{self.year}")
        for image_id in sorted(self.coco.getImgIds()):
            info = self.coco.imgs[image_id]
            for ann in self.coco.imgToAnns[image_id]:
                if not ann.get("iscrowd", 0):
                    yield ObjectRef(images / info["file_name"], path, ann["id"], int(ann["category_id"]),
                                    int(round(ann["area"])))

    def _decode(self, ann: dict, shape: tuple[int, int]) -> np.ndarray:
        info = self.coco.imgs[ann["image_id"]]
        if (info["height"], info["width"]) != shape:
            raise UserError(f"COCO image {info['file_name']} is {shape[1]}x{shape[0]} but the annotation file says "
                            f"{info['width']}x{info['height']}")
        return self.coco.annToMask(ann).astype(bool)

    def target(self, ref: ObjectRef, shape: tuple[int, int]) -> Target:
        ann = self.coco.anns[ref.key]
        mask = self._decode(ann, shape)
        ignore = np.zeros(shape, bool)
        instances = np.zeros(shape, np.int32)
        for k, other in enumerate(self.coco.imgToAnns[ann["image_id"]], start=1):
            if other["id"] == ref.key:
                continue
            m = self._decode(other, shape)
            if other.get("iscrowd", 0):
                ignore |= m
            else:
                instances[m] = k
        return Target(mask, ignore & ~mask, np.where(mask, 0, instances))
