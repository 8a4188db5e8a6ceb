"""Data-config entries -> object sources.

An entry names a dataset and its arguments, plus four keys every dataset understands::

    {dataset: coco, root: /data/coco, split: val,      # the dataset and its own arguments
     classes: [donut], shuffle: 0, limit: 500, name: coco_donuts}

- ``classes``: keep only objects of these class ids or names (a class-specialisation sequence);
- ``shuffle``: a seed for a seeded object order (default: the dataset's file order);
- ``limit``: keep the first ``limit`` objects of that order;
- ``name``: what results are reported under (default: the dataset's name).

A missing ``root`` is read from the environment variable ``<DATASET>_ROOT`` (``COCO_ROOT``...).
An entry may set its own ``min_area`` (pixels; objects below it are skipped and counted).
A bare string is an entry without arguments: ``grabcut`` is ``{dataset: grabcut}``.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable

import numpy as np

from datamodules.datasets.bsds import BSDSObjects
from datamodules.datasets.cityscapes import CityscapesObjects
from datamodules.datasets.coco import COCOObjects
from datamodules.datasets.drions import DRIONSObjects
from datamodules.datasets.ritm import BerkeleyObjects, COCOMValObjects, DavisObjects, GrabCutObjects
from datamodules.datasets.rooftop import RooftopObjects
from datamodules.datasets.voc import SBDObjects, VOCObjects
from datamodules.objects import ObjectSource, Sample
from datamodules.synthetic import DOMAINS, SyntheticObjects, resolve_style
from modules.errors import UserError

DATASETS: dict[str, Callable[..., ObjectSource]] = {
    "synthetic": SyntheticObjects,
    "voc": VOCObjects,
    "sbd": SBDObjects,
    "coco": COCOObjects,
    "cityscapes": CityscapesObjects,
    "drions": DRIONSObjects,
    "rooftop": RooftopObjects,
    "grabcut": GrabCutObjects,
    "berkeley": BerkeleyObjects,
    "davis": DavisObjects,
    "coco_mval": COCOMValObjects,
    "bsds": BSDSObjects,
}
SELECTION_KEYS = ("dataset", "name", "classes", "shuffle", "limit")


class Selection:
    """A view of a source: some of its objects, in a given order, under a given name."""

    def __init__(self, source: ObjectSource, indices: list[int], name: str):
        self.source, self.indices, self.name = source, list(indices), name

    def __len__(self) -> int:
        return len(self.indices)

    def get_sample(self, index: int) -> Sample:
        return self.source.get_sample(self.indices[index])

    def get_image(self, index: int) -> np.ndarray:
        return self.source.get_image(self.indices[index])

    def class_of(self, index: int) -> int:
        return self.source.class_of(self.indices[index])

    def key_of(self, index: int):
        return self.source.key_of(self.indices[index])


class Concat:
    """Several sources read as one (e.g. VOC + SBD for training)."""

    def __init__(self, sources: list[ObjectSource]):
        self.sources = list(sources)
        self.name = "+".join(s.name for s in self.sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[ObjectSource, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[k], index - int(self.offsets[k])

    def get_sample(self, index: int) -> Sample:
        source, i = self._locate(index)
        return source.get_sample(i)

    def get_image(self, index: int) -> np.ndarray:
        source, i = self._locate(index)
        return source.get_image(i)

    def class_of(self, index: int) -> int:
        source, i = self._locate(index)
        return source.class_of(i)


def class_ids(source: ObjectSource, classes: list[int | str], where: str) -> set[int]:
    """Class ids of ``classes`` (ids, or names the dataset knows)."""
    names = {v: k for k, v in getattr(source, "class_names", {}).items()}
    ids = set()
    for c in classes:
        if isinstance(c, str) and not c.lstrip("-").isdigit():
            if c not in names:
                raise UserError(f"{where}: unknown class '{c}' for dataset '{source.name}' (expected one of {sorted(names)})")
            ids.add(names[c])
        else:
            ids.add(int(c))
    return ids


def select(source: ObjectSource, where: str, name: str | None = None, classes: list[int | str] | None = None,
           shuffle: int | None = None, limit: int | None = None) -> ObjectSource:
    """``source`` filtered by class, in a seeded order, cut to ``limit`` objects, renamed."""
    if classes is None and shuffle is None and limit is None:
        if name:
            source.name = name
        return source
    indices = np.arange(len(source))
    if classes is not None:
        if not hasattr(source, "class_of"):
            raise UserError(f"{where}: dataset '{source.name}' has no class ids, so 'classes' cannot filter it")
        wanted = class_ids(source, classes, where)
        indices = np.array([i for i in indices if source.class_of(int(i)) in wanted], dtype=int)
        if not len(indices):
            raise UserError(f"{where}: no object of classes {classes} in '{source.name}'")
    if shuffle is not None:
        indices = np.random.default_rng(shuffle).permutation(indices)
    if limit is not None:
        if limit < 1:
            raise UserError(f"{where}: limit={limit} (expected at least 1)")
        indices = indices[:limit]
    return Selection(source, indices.tolist(), name or source.name)


DEFAULT_MIN_AREA = 64
"""Objects below this many pixels are skipped unless a config says otherwise."""
LOSS_LIMIT = 0.5
"""With the default ``min_area``, a dataset that loses more than this share of its objects
(to tiny or empty masks: a mask read wrongly) is an error."""


def check_losses(source: ObjectSource, where: str, min_area: int) -> None:
    """One line naming an example when the default ``min_area`` drops most of a dataset."""
    skipped, kept = getattr(source, "skipped", 0), len(source)
    if skipped <= LOSS_LIMIT * (skipped + kept):
        return
    ref = source.example_skipped
    detail = f"object {ref.key!r}: {ref.area} px" if ref.key is not None else f"{ref.area} px"
    if ref.annotation.suffix.lower() in (".png", ".bmp", ".tif", ".tiff", ".jpg"):
        from datamodules.io import read_mask

        values = np.unique(read_mask(ref.annotation))
        detail += f"; values in the file: {values[:8].tolist()}{' ...' if len(values) > 8 else ''}"
    raise UserError(f"{where}: {source.name} loses {skipped} of {skipped + kept} objects to min_area={min_area} px, "
                    f"e.g. '{ref.annotation}' ({detail}): if its masks are right, set min_area for this entry")


def build_source(entry: str | dict[str, Any], where: str, min_area: int | None = None) -> ObjectSource:
    """The object source a data-config entry describes (see the module docstring). ``min_area``:
    the config's (``None``: :data:`DEFAULT_MIN_AREA`, and :func:`check_losses` applies unless the
    entry sets its own)."""
    spec = {"dataset": entry} if isinstance(entry, str) else dict(entry)
    dataset = spec.pop("dataset", None)
    if dataset not in DATASETS:
        raise UserError(f"{where}: dataset '{dataset}' is unknown (expected one of {sorted(DATASETS)})")
    factory = DATASETS[dataset]
    params = inspect.signature(factory).parameters
    chosen = {k: spec.pop(k) for k in SELECTION_KEYS[1:] if k in spec}
    unknown = sorted(set(spec) - set(params))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown} for dataset '{dataset}' "
                        f"(expected some of {sorted(set(params) | set(SELECTION_KEYS))})")
    if "root" in params and spec.get("root") is None:
        env = f"{dataset.upper()}_ROOT"
        if not os.environ.get(env):
            raise UserError(f"{where}: dataset '{dataset}' needs a root: set '{where}.root' or the environment "
                            f"variable {env}")
        spec["root"] = os.environ[env]
    strict = min_area is None and "min_area" not in spec
    if "min_area" in params:
        spec.setdefault("min_area", DEFAULT_MIN_AREA if min_area is None else min_area)
    missing = [k for k, v in params.items() if v.default is inspect.Parameter.empty and k not in spec]
    if missing:
        raise UserError(f"{where}: dataset '{dataset}' needs the key(s) {missing}")
    source = factory(**spec)
    if strict:
        check_losses(source, where, spec.get("min_area", DEFAULT_MIN_AREA))
    if hasattr(source, "describe"):
        print(source.describe())
    return select(source, where, **chosen)


def entry_identity(entry: str | dict[str, Any]) -> dict[str, Any]:
    """The entry with every default that shapes its images written out (a synthetic domain's
    renderer style): results recorded under another identity were made from other data."""
    spec = {"dataset": entry} if isinstance(entry, str) else dict(entry)
    if spec.get("dataset") == "synthetic" and spec.get("domain") in DOMAINS:
        style = resolve_style(spec["domain"], spec.pop("style", None))
        spec |= {"style": style} if style else {}
    return spec


def build_sources(entries: list[str | dict[str, Any]], where: str, min_area: int | None = None) -> list[ObjectSource]:
    if not entries:
        raise UserError(f"{where}: expected at least one dataset entry")
    return [build_source(e, f"{where}[{i}]", min_area) for i, e in enumerate(entries)]
