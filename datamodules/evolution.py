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
from modules.clicks import Click, clicks_to_rows, rows_to_clicks
from modules.errors import UserError
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


def record_interactions(source: ObjectSource, path: str | Path, clicks_file: str | Path | None = None) -> list[list[Click]]:
    """The users' clicks on every object of ``source``, written to ``path`` (JSON, atomically)
    and returned; reused when ``path`` already holds them. Without ``clicks_file`` the users are
    simulated: paper B's three clicks (the one read of the dataset's masks). With it, real
    clicks: the annotation app's ``<out>.clicks.json``, one entry per object of ``source`` in
    the same order."""
    path = Path(path)
    if path.is_file():
        return read_interactions(path, len(source))
    if clicks_file is None:
        log = [three_click_protocol(source.get_sample(i).mask) for i in range(len(source))]
    else:
        try:
            objects = json.loads(Path(clicks_file).read_text())["objects"]
            by_id = {o["annotation_id"]: rows_to_clicks(o["clicks"]) for o in objects}
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"clicks file '{clicks_file}' cannot be read as the annotation app's clicks ({e})") from e
        if len(by_id) != len(source) or not hasattr(source, "key_of") or \
                set(by_id) != {source.key_of(i) for i in range(len(source))}:
            raise UserError(f"clicks file '{clicks_file}' is not about the stage's objects: give the stage the app's "
                            f"COCO file ({{dataset: coco, root: IMAGES, annotations: FILE, images: .}})")
        log = [by_id[source.key_of(i)] for i in range(len(source))]
        if not all(any(c.positive for c in clicks) for clicks in log):
            raise UserError(f"clicks file '{clicks_file}': every object needs a positive click")
    rows = [clicks_to_rows(clicks) for clicks in log]
    atomic_write_text(path, json.dumps({"dataset": source.name, "clicks": rows}))
    return log


def read_interactions(path: str | Path, expected: int) -> list[list[Click]]:
    try:
        rows = json.loads(Path(path).read_text())["clicks"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"interactions file '{path}' is not one this program wrote ({e}): delete it to record afresh") from e
    if len(rows) != expected:
        raise UserError(f"interactions file '{path}' has clicks for {len(rows)} objects, but the stage's dataset has "
                        f"{expected}: delete it to record afresh")
    return [rows_to_clicks(clicks) for clicks in rows]


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
    """An object source of images with pseudo masks in place of ground truth, and the
    classifier's verdict as their class (objects whose pseudo mask is empty are left out)."""

    def __init__(self, images: MaskFree, masks: list[np.ndarray], verdicts: list[int] | np.ndarray | None = None,
                 name: str | None = None):
        self.images = images
        self.keep = [i for i, m in enumerate(masks) if m.any()]
        self.masks = masks
        self.verdicts = [-1] * len(masks) if verdicts is None else [int(v) for v in verdicts]
        self.name = name or images.name

    def class_of(self, index: int) -> int:
        return self.verdicts[self.keep[index]]

    def __len__(self) -> int:
        return len(self.keep)

    def get_image(self, index: int) -> np.ndarray:
        return self.images.get_image(self.keep[index])

    def get_sample(self, index: int) -> Sample:
        i = self.keep[index]
        mask = self.masks[i].astype(bool)
        return Sample(self.images.get_image(i), mask, np.zeros_like(mask), None, f"{self.name}/{i}", self.verdicts[i])


class PairedObjects(Dataset):
    """Training pairs of sec. 3.3: every new object (``b``, with ``pair_class`` the classifier's
    verdict, -1 for unknown) with an earlier object (``a``) of the same class when the class is
    known (drawn at random from the whole earlier pool: up to ``tries`` draws, the earlier
    objects' classes read on demand), any earlier object otherwise. With ``stages`` (the earlier
    stages' pseudo-labelled objects), each item also holds ``c``: one of them, drawn with each
    earlier stage equally likely, so that a stage of 400 objects is replayed as often beside a
    source pool of 20,000 as in the stage after it."""

    def __init__(self, new: TrainObjects, pair_class: list[int], earlier: TrainObjects, tries: int = 32,
                 stages: list[TrainObjects] | None = None):
        if len(pair_class) != len(new):
            raise ValueError(f"{len(pair_class)} class verdicts for {len(new)} new objects")
        self.new, self.earlier, self.tries, self.stages = new, earlier, tries, [s for s in stages or [] if len(s)]
        self.pair_class = [int(c) for c in pair_class]

    def __len__(self) -> int:
        return len(self.new)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(np.random.randint(0, 2**31))  # dataloader workers are seeded
        b = self.new[index]
        wanted = self.pair_class[index]
        j = int(rng.integers(len(self.earlier)))
        if wanted >= 0:
            for _ in range(self.tries):
                if self.earlier.source.class_of(j) == wanted:
                    break
                j = int(rng.integers(len(self.earlier)))
            else:
                wanted = -1  # no earlier object of that class found: a class-agnostic pair (Eq. 8)
        b["pair_class"] = wanted
        item = {"a": self.earlier[j], "b": b}
        if self.stages:
            stage = self.stages[int(rng.integers(len(self.stages)))]
            item["c"] = stage[int(rng.integers(len(stage)))]
        return item
