"""Click representation and click-map encoding (paper A, sec. 3.1).

Clicks travel as a float tensor ``(..., N, 3)`` of rows ``(y, x, label)`` with label
``+1`` (positive), ``-1`` (negative) or ``0`` (padding, ignored). One tensor layout for
datasets, training and evaluation keeps the encoding in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

ClickEncoding = Literal["disk", "gaussian"]


@dataclass(frozen=True)
class Click:
    """A user click at pixel ``(y, x)``; ``positive`` marks foreground."""

    y: int
    x: int
    positive: bool


def clicks_to_tensor(clicks: Sequence[Click], capacity: int | None = None) -> torch.Tensor:
    """Pack clicks into a ``(capacity, 3)`` tensor, padding with label 0."""
    capacity = len(clicks) if capacity is None else capacity
    if len(clicks) > capacity:
        raise ValueError(f"{len(clicks)} clicks do not fit a click tensor of capacity {capacity}")
    out = torch.zeros(capacity, 3)
    for i, c in enumerate(clicks):
        out[i] = torch.tensor([c.y, c.x, 1.0 if c.positive else -1.0])
    return out


def clicks_to_rows(clicks: Sequence[Click]) -> list[list[int]]:
    """Clicks as JSON rows ``[y, x, +1 | -1]`` (the files of interactions and annotations)."""
    return [[int(c.y), int(c.x), 1 if c.positive else -1] for c in clicks]


def rows_to_clicks(rows: Sequence[Sequence[float]]) -> list[Click]:
    """Inverse of :func:`clicks_to_rows`; tensor rows with label 0 (padding) are dropped."""
    return [Click(int(y), int(x), lab > 0) for y, x, lab in rows if lab != 0]


def label_clicked_pixels(prob: np.ndarray, clicks: Sequence[Click], radius: float) -> np.ndarray:
    """The user's clicks as labels on a probability map ``(H, W)``: every pixel within ``radius``
    px of a click takes the click's label (1 or 0), a later click over an earlier one; ``radius``
    0 leaves ``prob`` as it is. A copy is returned."""
    if radius <= 0 or not clicks:
        return prob
    prob = prob.copy()
    h, w = prob.shape
    r = int(np.floor(radius))
    for c in clicks:
        y0, y1, x0, x1 = max(0, c.y - r), min(h, c.y + r + 1), max(0, c.x - r), min(w, c.x + r + 1)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        prob[y0:y1, x0:x1][(yy - c.y) ** 2 + (xx - c.x) ** 2 <= radius ** 2] = float(c.positive)
    return prob


def scale_clicks(clicks: torch.Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> torch.Tensor:
    """Map click coordinates between resolutions (pixel centres stay centres)."""
    out = clicks.clone()
    sy = to_hw[0] / from_hw[0]
    sx = to_hw[1] / from_hw[1]
    out[..., 0] = (clicks[..., 0] + 0.5) * sy - 0.5
    out[..., 1] = (clicks[..., 1] + 0.5) * sx - 0.5
    return out


def clicks_in_view(clicks: Sequence[Click], view: tuple[int, int, int, int], net_hw: tuple[int, int]) -> torch.Tensor:
    """Clicks as a ``(1, N, 3)`` tensor in the coordinates of the crop ``view``
    ``(y0, y1, x0, x1)`` of an image, resized to ``net_hw`` (what the network sees of it)."""
    y0, y1, x0, x1 = view
    local = [Click(c.y - y0, c.x - x0, c.positive) for c in clicks]
    return scale_clicks(clicks_to_tensor(local)[None], (y1 - y0, x1 - x0), net_hw)


def encode_clicks(
    clicks: torch.Tensor, hw: tuple[int, int], radius: float = 3.0, mode: ClickEncoding = "disk"
) -> torch.Tensor:
    """Encode clicks ``(B, N, 3)`` as maps ``(B, 2, H, W)``: channel 0 positive, 1 negative.

    ``disk``: 1 inside a disk of ``radius`` pixels around each click (paper A).
    ``gaussian``: ``exp(-d^2 / (2 radius^2))``, max over clicks (paper B uses radius 10).
    """
    if mode not in ("disk", "gaussian"):
        raise ValueError(f"click encoding '{mode}' unknown: expected 'disk' or 'gaussian'")
    if clicks.dim() == 2:
        clicks = clicks[None]
    b = clicks.shape[0]
    h, w = hw
    maps = clicks.new_zeros(b * 2, h, w)
    sample, slot = (clicks[..., 2] != 0).nonzero(as_tuple=True)
    if len(sample) == 0:
        return maps.view(b, 2, h, w)
    rows = clicks[sample, slot]  # (K, 3): only the real clicks, not the padding
    dy2 = (torch.arange(h, dtype=clicks.dtype, device=clicks.device)[None] - rows[:, :1]) ** 2  # K, H
    dx2 = (torch.arange(w, dtype=clicks.dtype, device=clicks.device)[None] - rows[:, 1:2]) ** 2  # K, W
    d2 = dy2[:, :, None] + dx2[:, None, :]
    value = (d2 <= radius**2).to(clicks.dtype) if mode == "disk" else torch.exp(-d2 / (2.0 * radius**2))
    channel = sample * 2 + (rows[:, 2] < 0).long()  # channel 0 positive, 1 negative
    for k, c in enumerate(channel.tolist()):  # a max over each map's clicks (few: a loop beats scatter here)
        torch.maximum(maps[c], value[k], out=maps[c])
    return maps.view(b, 2, h, w)
