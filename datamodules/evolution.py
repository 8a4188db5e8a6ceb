"""Data of an evolution stage (paper B, sec. 3.1-3.4).

A stage sees its new dataset only through the users' clicks: :func:`record_interactions` is the
(simulated) user, the one place that reads the new dataset's masks, and writes the clicks to a
file; the stage then reads the images through :class:`MaskFree`, which has no masks to give,
plus that file. Its pseudo masks (:class:`PseudoLabelled`) are the stage's supervision, paired
with objects of the earlier data (:class:`PairedObjects`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from datamodules.objects import ObjectSource, Sample, TrainObjects
from modules.clicks import Click
from modules.io import atomic_write, atomic_write_text
from modules.simulate import three_click_protocol


class MaskFree:
    """A source seen as images only: ``get_image`` and nothing that returns a mask."""

    def __init__(self, source: ObjectSource):
        self._source = source
        self.name = source.name

    def __len__(self) -> int:
        return len(self._source)

    def get_image(self, index: int) -> np.ndarray:
        return self._source.get_image(index)


def record_interactions(source: ObjectSource, path: str | Path) -> list[list[Click]]:
    """The simulated users: paper B's three clicks on every object of ``source``, written to
    ``path`` (JSON, atomically) and returned. Reused when ``path`` already holds them."""
    path = Path(path)
    if path.is_file():
        return read_interactions(path, len(source))
    log = [three_click_protocol(source.get_sample(i).mask) for i in range(len(source))]
    rows = [[[c.y, c.x, 1 if c.positive else -1] for c in clicks] for clicks in log]
    atomic_write_text(path, json.dumps({"dataset": source.name, "clicks": rows}))
    return log


def read_interactions(path: str | Path, expected: int) -> list[list[Click]]:
    rows = json.loads(Path(path).read_text())["clicks"]
    if len(rows) != expected:
        raise ValueError(f"{path}: clicks for {len(rows)} objects, expected {expected} (delete it to record afresh)")
    return [[Click(int(y), int(x), lab > 0) for y, x, lab in clicks] for clicks in rows]


def save_pseudo_masks(path: str | Path, coarse: list[np.ndarray], refined: list[np.ndarray], pair_class: list[int]) -> Path:
    """Store a stage's pseudo masks (before and after IPT) and classifier verdicts atomically."""
    arrays = {f"coarse_{i}": m for i, m in enumerate(coarse)} | {f"refined_{i}": m for i, m in enumerate(refined)}
    return atomic_write(path, lambda f: np.savez_compressed(f, pair_class=np.asarray(pair_class), **arrays), mode="wb")


def load_pseudo_masks(path: str | Path) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """What :func:`save_pseudo_masks` stored: coarse masks, refined masks, classifier verdicts."""
    with np.load(path) as z:
        pair_class = z["pair_class"]
        return ([z[f"coarse_{i}"] for i in range(len(pair_class))], [z[f"refined_{i}"] for i in range(len(pair_class))],
                pair_class)


class PseudoLabelled:
    """An object source of images with pseudo masks in place of ground truth (objects whose
    pseudo mask is empty are left out)."""

    def __init__(self, images: MaskFree, masks: list[np.ndarray], name: str | None = None):
        self.images = images
        self.keep = [i for i, m in enumerate(masks) if m.any()]
        self.masks = masks
        self.name = name or images.name

    def __len__(self) -> int:
        return len(self.keep)

    def get_image(self, index: int) -> np.ndarray:
        return self.images.get_image(self.keep[index])

    def get_sample(self, index: int) -> Sample:
        i = self.keep[index]
        mask = self.masks[i].astype(bool)
        return Sample(self.images.get_image(i), mask, np.zeros_like(mask), None, f"{self.name}/{i}")


class PairedObjects(Dataset):
    """Training pairs of sec. 3.3: every new object (``b``, with ``pair_class`` the classifier's
    verdict, -1 for unknown) with an earlier object (``a``) of the same class when the class is
    known and one exists, any earlier object otherwise."""

    def __init__(self, new: TrainObjects, pair_class: list[int], earlier: TrainObjects, earlier_class: list[int]):
        if len(pair_class) != len(new):
            raise ValueError(f"{len(pair_class)} class verdicts for {len(new)} new objects")
        self.new, self.earlier = new, earlier
        self.pair_class = [int(c) for c in pair_class]
        self.by_class: dict[int, list[int]] = {}
        for j, c in enumerate(earlier_class):
            if c >= 0:
                self.by_class.setdefault(int(c), []).append(j)

    def __len__(self) -> int:
        return len(self.new)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(np.random.randint(0, 2**31))
        b = self.new[index]
        b["pair_class"] = self.pair_class[index]
        pool = self.by_class.get(b["pair_class"])
        if not pool:  # no earlier object of that class: a class-agnostic pair (Eq. 8)
            b["pair_class"], pool = -1, range(len(self.earlier))
        j = int(rng.choice(pool))
        return {"a": self.earlier[j], "b": b}
