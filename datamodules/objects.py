"""Object samples and the two views every dataset is read through.

A dataset only implements ``get_sample(index) -> Sample`` (RITM's split); augmentation,
click sampling and tensor conversion live here, shared by all datasets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import albumentations as A
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


class ObjectSource(Protocol):
    name: str

    def __len__(self) -> int: ...

    def get_sample(self, index: int) -> Sample: ...


def train_transform(crop: int) -> A.Compose:
    """Scale/rotate, flip and colour jitter; masks follow the image exactly."""
    return A.Compose(
        [
            A.Affine(scale=(0.75, 1.35), rotate=(-25, 25), translate_percent=(-0.1, 0.1), p=0.8),
            A.HorizontalFlip(),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.8),
            A.RandomResizedCrop(size=(crop, crop), scale=(0.6, 1.0), ratio=(0.8, 1.25), p=1.0),
        ]
    )


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


class TrainObjects(Dataset):
    """Augmented crops with stage-(a) simulated clicks, ready to batch.

    ``click_capacity`` reserves room for iterative clicks added in the training step.
    """

    def __init__(
        self,
        source: ObjectSource,
        crop: int,
        max_positive: int = 5,
        max_negative: int = 5,
        click_capacity: int = 16,
        augment: bool = True,
    ):
        self.source = source
        self.augment = augment
        self.resize = A.Compose([A.Resize(crop, crop)])
        self.transform = train_transform(crop) if augment else self.resize
        self.max_positive = max_positive
        self.max_negative = max_negative
        self.click_capacity = click_capacity

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        s = self.source.get_sample(index)
        inst = s.instances if s.instances is not None else np.zeros(s.mask.shape, np.int32)
        # augmented: a fresh draw each visit (workers are seeded by Lightning); else fixed per index
        rng = np.random.default_rng(np.random.randint(0, 2**31) if self.augment else index)
        masks = [s.mask.astype(np.uint8), s.ignore.astype(np.uint8), inst]
        for transform in [self.transform] * 5 + [self.resize]:  # small objects can be cropped away
            out = transform(image=s.image, masks=masks)
            mask, ignore, instances = (np.asarray(m) for m in out["masks"])
            if (mask > 0).sum() >= 16:
                break
        if not mask.any():
            raise ValueError(f"{s.name}: empty object mask")
        mask = mask > 0
        clicks = sample_initial_clicks(mask, rng, instances=instances, ignore=ignore > 0,
                                       max_positive=self.max_positive, max_negative=self.max_negative)
        return {
            "image": image_to_tensor(out["image"]),
            "mask": torch.from_numpy(mask)[None].float(),
            "ignore": torch.from_numpy(ignore > 0)[None],
            "clicks": clicks_to_tensor(clicks, self.click_capacity),
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
