"""Object samples and the two views every dataset is read through.

A dataset only implements ``get_sample(index) -> Sample`` (RITM's split); augmentation,
click sampling and tensor conversion live here, shared by all datasets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from modules.clicks import clicks_to_tensor
from modules.simulate import sample_initial_clicks


@dataclass
class Sample:
    """One object of one image at its original resolution."""

    image: np.ndarray  # H, W, 3 uint8 RGB
    mask: np.ndarray  # H, W bool, the object
    ignore: np.ndarray  # H, W bool, pixels that count neither way
    instances: np.ndarray | None  # H, W int, other objects (> 0) for negative clicks
    name: str
    class_id: int = -1  # the dataset's class of the object, -1 when it has none


class ObjectSource(Protocol):
    name: str

    def __len__(self) -> int: ...

    def get_sample(self, index: int) -> Sample: ...

    def get_image(self, index: int) -> np.ndarray: ...


def pad_to(crop: int) -> A.PadIfNeeded:
    """Zero padding up to ``crop x crop`` (masks padded with 0: background, not ignore)."""
    return A.PadIfNeeded(crop, crop, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0)


def train_transform(crop: int, max_side: int | None = None) -> A.Compose:
    """Scale/rotate, flip and colour jitter; masks follow the image exactly.

    Without ``max_side`` (images drawn at the network's size) a random resized crop of
    ``crop`` px ends the pipeline. With it (photos of any size), the image is first brought
    to the evaluation scale (long side ``max_side``, as ``eval_max_side`` does at test time)
    and padded to at least ``crop``; the crop around the object follows (:func:`object_window`).
    """
    common = [
        A.Affine(scale=(0.75, 1.35), rotate=(-25, 25), translate_percent=(-0.1, 0.1), p=0.8),
        A.HorizontalFlip(),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.8),
    ]
    if max_side is None:
        return A.Compose([*common, A.RandomResizedCrop(size=(crop, crop), scale=(0.6, 1.0), ratio=(0.8, 1.25), p=1.0)])
    return A.Compose([A.LongestMaxSize(max_side), *common, pad_to(crop)])


def object_window(mask: np.ndarray, crop: int, rng: np.random.Generator) -> tuple[slice, slice]:
    """A random ``crop x crop`` window of an image at least that large that contains a random
    pixel of ``mask`` (anywhere in the window), or a random window when the mask is empty."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(ys):
        k = rng.integers(len(ys))
        y0 = rng.integers(max(0, ys[k] - crop + 1), min(ys[k], h - crop) + 1)
        x0 = rng.integers(max(0, xs[k] - crop + 1), min(xs[k], w - crop) + 1)
    else:
        y0, x0 = rng.integers(h - crop + 1), rng.integers(w - crop + 1)
    return slice(int(y0), int(y0) + crop), slice(int(x0), int(x0) + crop)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


class TrainObjects(Dataset):
    """Augmented crops with stage-(a) simulated clicks, ready to batch.

    ``click_capacity`` reserves room for iterative clicks added in the training step.
    ``max_side`` selects the pipeline for photos of any size (see :func:`train_transform`).
    """

    def __init__(
        self,
        source: ObjectSource,
        crop: int,
        max_positive: int = 5,
        max_negative: int = 5,
        click_capacity: int = 16,
        augment: bool = True,
        max_side: int | None = None,
    ):
        self.source = source
        self.augment = augment
        self.crop = crop
        self.max_side = max_side
        self.resize = A.Compose([A.Resize(crop, crop)] if max_side is None else [A.LongestMaxSize(max_side), pad_to(crop)])
        self.transform = train_transform(crop, max_side) if augment else self.resize
        self.max_positive = max_positive
        self.max_negative = max_negative
        self.click_capacity = click_capacity

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        """Augmented: a fresh draw each visit (dataloader workers are seeded by Lightning);
        without augmentation the same sample every time."""
        return self.sample(index, np.random.randint(0, 2**31) if self.augment else index)

    def sample(self, index: int, seed: int | list[int]) -> dict:
        """Object ``index`` with its augmentation and clicks drawn from ``seed``."""
        s = self.source.get_sample(index)
        inst = s.instances if s.instances is not None else np.zeros(s.mask.shape, np.int32)
        rng = np.random.default_rng(seed)
        self.transform.set_random_seed(int(rng.integers(2**31)))
        masks = [s.mask.astype(np.uint8), s.ignore.astype(np.uint8), inst]
        for transform in [self.transform] * 5 + [self.resize]:  # small objects can be cropped away
            out = transform(image=s.image, masks=masks)
            image, (mask, ignore, instances) = out["image"], (np.asarray(m) for m in out["masks"])
            if self.max_side is not None:  # the crop around the object
                window = object_window(mask > 0, self.crop, rng)
                image, mask, ignore, instances = (a[window] for a in (image, mask, ignore, instances))
            if (mask > 0).sum() >= 16:
                break
        if not mask.any():
            raise ValueError(f"{s.name}: empty object mask")
        mask = mask > 0
        clicks = sample_initial_clicks(mask, rng, instances=instances, ignore=ignore > 0,
                                       max_positive=self.max_positive, max_negative=self.max_negative)
        return {
            "image": image_to_tensor(image),
            "mask": torch.from_numpy(mask)[None].float(),
            "ignore": torch.from_numpy(ignore > 0)[None],
            "clicks": clicks_to_tensor(clicks, self.click_capacity),
            "class_id": s.class_id,
        }


class EvalObjects(Dataset):
    """Samples at original resolution for the click-by-click benchmark (batch size 1)."""

    def __init__(self, source: ObjectSource):
        self.source = source
        self.name = source.name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        s = self.source.get_sample(index)
        if not s.mask.any():
            raise ValueError(f"{s.name}: empty object mask")
        return {
            "image": image_to_tensor(s.image),
            "mask": torch.from_numpy(s.mask.astype(bool)),
            "ignore": torch.from_numpy(s.ignore.astype(bool)),
            "index": index,
            "name": s.name,
        }
