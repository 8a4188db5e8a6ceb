"""PASCAL VOC 2012 and its SBD augmentation: one sample per object instance, class id kept.

VOC (``root`` = ``VOC2012/``)::

    JPEGImages/<id>.jpg
    SegmentationObject/<id>.png   palette PNG: 0 background, k instance, 255 void
    SegmentationClass/<id>.png    palette PNG: class 1..20 per pixel, 255 void
    ImageSets/Segmentation/{train,val}.txt

SBD (``root`` = ``benchmark_RELEASE/dataset/``)::

    img/<id>.jpg
    inst/<id>.mat                 GTinst.Segmentation (0 background, k instance),
                                  GTinst.Categories (class of instance k, 1..20)
    {train,val}.txt

Combine both by listing both in the data config (``train: [{dataset: voc, ...}, {dataset: sbd, ...}]``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import scipy.io
from datamodules.datasets.base import (
    IndexedObjects, ObjectRef, Target, instance_areas, instance_target, read_split_list, require_file)
from datamodules.io import read_mask
from modules.errors import UserError

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOID = 255


def majority(values: np.ndarray) -> int:
    vals, counts = np.unique(values, return_counts=True)
    return int(vals[np.argmax(counts)])


class VOCObjects(IndexedObjects):
    """PASCAL VOC 2012 instances of ``split`` (layout in the module docstring)."""

    name = "voc"
    class_names = dict(enumerate(VOC_CLASSES))

    def __init__(self, root: str | Path, split: Literal["train", "val", "trainval"] = "train", min_area: int = 0):
        self.split = split
        super().__init__(root, min_area)

    def index(self) -> Iterable[ObjectRef]:
        for image_id in read_split_list(self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt"):
            inst_path = self.root / "SegmentationObject" / f"{image_id}.png"
            inst = read_mask(inst_path)
            cls = read_mask(self.root / "SegmentationClass" / f"{image_id}.png")
            if cls.shape != inst.shape:
                raise UserError(f"mask '{inst_path}' and its SegmentationClass differ in size")
            for k, area in instance_areas(inst, exclude=(0, VOID)).items():
                yield ObjectRef(self.root / "JPEGImages" / f"{image_id}.jpg", inst_path, k,
                                majority(cls[inst == k]), area)

    def target(self, ref: ObjectRef, shape: tuple[int, int]) -> Target:
        inst = read_mask(ref.annotation)
        return instance_target(inst, ref.key, inst == VOID)


def read_sbd_instances(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(instance map, class of instance k at [k - 1])`` of an SBD ``inst/*.mat``."""
    try:
        gt = scipy.io.loadmat(str(require_file(path, "SBD annotation")))["GTinst"][0, 0]
        return gt["Segmentation"].astype(np.int32), np.asarray(gt["Categories"]).ravel().astype(int)
    except (ValueError, KeyError, IndexError, TypeError, OSError, scipy.io.matlab.MatReadError) as e:
        raise UserError(f"SBD annotation '{path}' cannot be read (expected GTinst.Segmentation/Categories): {e}") from e


class SBDObjects(IndexedObjects):
    """SBD instances of ``split`` (layout in the module docstring)."""

    name = "sbd"
    class_names = dict(enumerate(VOC_CLASSES))

    def __init__(self, root: str | Path, split: Literal["train", "val"] = "train", min_area: int = 0):
        self.split = split
        super().__init__(root, min_area)

    def index(self) -> Iterable[ObjectRef]:
        for image_id in read_split_list(self.root / f"{self.split}.txt"):
            path = self.root / "inst" / f"{image_id}.mat"
            inst, categories = read_sbd_instances(path)
            for k, area in instance_areas(inst, exclude=(0, VOID)).items():
                if k > len(categories):
                    raise UserError(f"SBD annotation '{path}': instance {k} has no entry in GTinst.Categories")
                yield ObjectRef(self.root / "img" / f"{image_id}.jpg", path, k, int(categories[k - 1]), area)

    def target(self, ref: ObjectRef, shape: tuple[int, int]) -> Target:
        inst, _ = read_sbd_instances(ref.annotation)
        return instance_target(inst, ref.key, inst == VOID)
