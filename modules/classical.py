"""Classical click-seeded segmentation, the anchor every learned variant is measured against: a
method a user with no trained model could run on a CPU."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from modules.clicks import Click
from modules.errors import check


@dataclass(frozen=True)
class RandomWalker:
    """Grady's random walker (2006, scikit-image) seeded by the clicks: disks of
    ``seed_radius`` px around positive clicks are the object's seeds, around negative ones (and,
    with ``border_background``, the image border away from positive clicks) the background's.
    Runs at a long side of at most ``max_side`` px on the image in CIE Lab; the object
    probability is brought back to the image's resolution.

    Args:
        beta: edge sensitivity (scikit-image's ``beta``; larger: boundaries matter more).
        seed_radius: seed disk radius, in pixels of the working resolution.
        max_side: working resolution's long side.
        border_background: the image border seeds the background (the usual assumption of
            click benchmarks for methods that need both labels from the first click).
        mode: scikit-image's solver: ``bf`` (a direct sparse solve, fastest at these sizes) or
            ``cg_j`` (conjugate gradient).
    """

    beta: float = 90.0
    seed_radius: int = 3
    max_side: int = 256
    border_background: bool = True
    mode: str = "bf"

    def __post_init__(self):
        check(self.beta > 0, f"random_walker.beta={self.beta}: expected > 0")
        check(self.seed_radius >= 1, f"random_walker.seed_radius={self.seed_radius}: expected >= 1")
        check(self.max_side >= 16, f"random_walker.max_side={self.max_side}: expected >= 16")
        check(self.mode in ("bf", "cg_j"), f"random_walker.mode={self.mode!r}: expected 'bf' or 'cg_j'")

    def __call__(self, image: np.ndarray, clicks: list[Click]) -> np.ndarray:
        """Object probability ``(H, W)`` of ``image`` (uint8 RGB) given the clicks so far."""
        from skimage.segmentation import random_walker

        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA) if scale < 1 else image
        lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float64) / 255.0
        labels = np.zeros((sh, sw), np.int32)
        if self.border_background:
            labels[0, :] = labels[-1, :] = labels[:, 0] = labels[:, -1] = 2
        positives = np.zeros((sh, sw), np.uint8)
        for c in clicks:
            centre = (min(sw - 1, int((c.x + 0.5) * scale)), min(sh - 1, int((c.y + 0.5) * scale)))
            if c.positive:
                cv2.circle(positives, centre, self.seed_radius * 3, 1, -1)  # keeps the border off a positive click
        labels[positives > 0] = 0
        for c in clicks:
            centre = (min(sw - 1, int((c.x + 0.5) * scale)), min(sh - 1, int((c.y + 0.5) * scale)))
            disk = np.zeros((sh, sw), np.uint8)
            cv2.circle(disk, centre, self.seed_radius, 1, -1)
            labels[disk > 0] = 1 if c.positive else 2
        if not (labels == 1).any():
            return np.zeros((h, w), np.float32)
        if not (labels == 2).any():
            return np.ones((h, w), np.float32)
        prob = random_walker(lab, labels, beta=self.beta, mode=self.mode, channel_axis=-1,
                             return_full_prob=True)[0].astype(np.float32)
        return cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR) if scale < 1 else prob


class ClassicalSession:
    """An interactive session (the interface of ``modules.session.InteractiveSession`` that the
    benchmark uses) run by a classical method on the image itself: no network, nothing learnt."""

    def __init__(self, method, image: np.ndarray):
        import time

        self._time = time.perf_counter
        self.method, self.image = method, image
        self.clicks: list[Click] = []
        self.seconds: list[float] = []
        self.history: list[np.ndarray] = []

    def click(self, *clicks: Click) -> np.ndarray:
        start = self._time()
        self.clicks.extend(clicks)
        prob = self.method(self.image, self.clicks)
        self.history.append(prob)
        self.seconds.append(self._time() - start)
        return prob

    def undo(self) -> np.ndarray | None:
        if self.history:
            self.history.pop()
            self.clicks.pop()
        return self.history[-1] if self.history else None

    def finish(self, upto: int | None = None) -> None:
        pass

    @property
    def probability(self) -> np.ndarray | None:
        return self.history[-1] if self.history else None
