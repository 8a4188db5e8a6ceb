"""The interactive-prototype (IPT) module of paper B (sec. 3.2, Eq. 1-6), as pure functions.

It refines the coarse pseudo mask the model predicts from the user's three clicks, using the
pixel features ``F``: three prototypes (global average, centre points, edge) each give a
confidence map; the global one and the merged centre/edge one are thresholded at a fraction of
their mean confidence inside the coarse mask; the coarse mask and the two label maps vote.
Nothing here updates a model. Features are ``(C, H, W)`` tensors, masks ``(H, W)`` arrays.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch


def prototype(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 1: ``c = (1 / Z) sum_i Q_i F_i`` with ``Z = sum_i Q_i``. ``features`` ``(..., C, H, W)``,
    ``weights`` ``(..., H, W)``; returns ``(..., C)`` (zeros where ``Z`` is 0)."""
    z = weights.sum(dim=(-2, -1)).clamp_min(1e-6)
    return (features * weights.unsqueeze(-3)).sum(dim=(-2, -1)) / z.unsqueeze(-1)


def squared_distance(c: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``||c - F_i||^2`` for every pixel; ``c`` ``(C,)``, ``features`` ``(C, H, W)``."""
    return ((features - c[:, None, None]) ** 2).sum(dim=0)


def prototype_confidence(features: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``exp(-d(c, F_i)) / (exp(-d(c, F_i)) + exp(-d(c_bar, F_i)))`` with ``c`` from ``Q``
    and ``c_bar`` from ``1 - Q``, written as the (overflow-free) logistic of the distance gap."""
    c, c_bar = prototype(features, q), prototype(features, 1 - q)
    return torch.sigmoid(squared_distance(c_bar, features) - squared_distance(c, features))


def mean_confidence(confidence: torch.Tensor, mask: np.ndarray) -> float:
    """Eq. 4: the mean confidence over the pixels of the coarse pseudo mask."""
    m = torch.as_tensor(mask, dtype=confidence.dtype)
    return float((confidence * m).sum() / m.sum().clamp_min(1.0))


def edge_mask(mask: np.ndarray, kernel: int = 5, iterations: int = 3) -> np.ndarray:
    """The edge band of ``mask``: the mask minus its erosion (``kernel`` x ``kernel``, ``iterations``
    times, as the paper's OpenCV call). A mask the erosion removes entirely is all edge."""
    mask = mask.astype(bool)
    eroded = cv2.erode(mask.astype(np.uint8), np.ones((kernel, kernel), np.uint8), iterations=iterations) > 0
    return mask & ~eroded if eroded.any() else mask


def centre_points(mask: np.ndarray, click: tuple[int, int], rng: np.random.Generator, points: int = 3,
                  radius: float = 10.0) -> np.ndarray:
    """``Q`` of the centre-point prototype: the user's positive click plus ``points`` pixels of the
    coarse mask drawn at random within ``radius`` of it (fewer when there are fewer)."""
    h, w = mask.shape
    y, x = click
    yy, xx = np.mgrid[0:h, 0:w]
    near = mask.astype(bool) & ((yy - y) ** 2 + (xx - x) ** 2 <= radius**2)
    near[y, x] = False
    q = np.zeros((h, w), np.float32)
    q[y, x] = 1.0
    ys, xs = np.nonzero(near)
    if len(ys):
        pick = rng.choice(len(ys), size=min(points, len(ys)), replace=False)
        q[ys[pick], xs[pick]] = 1.0
    return q


def vote(*label_maps: np.ndarray) -> np.ndarray:
    """Eq. 5-6: a pixel is foreground when at least two of the three label maps say so."""
    return np.sum([m.astype(np.int32) for m in label_maps], axis=0) >= 2


IPT_COMPONENTS = ("global", "centre", "edge")


def refine_pseudo_mask(
    features: torch.Tensor,
    coarse: np.ndarray,
    binary: np.ndarray,
    click: tuple[int, int],
    rng: np.random.Generator,
    m: float = 0.70,
    n: float = 0.75,
    centre_weight: float = 0.3,
    edge_weight: float = 0.7,
    points: int = 3,
    kernel: int = 5,
    iterations: int = 3,
    radius: float = 10.0,
    components: Sequence[str] = IPT_COMPONENTS,
    vote_maps: bool = True,
    coarse_probability: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The IPT module on one object: ``features`` ``(C, H, W)``, the ``coarse`` pseudo mask
    ``M_p``, the binary predictor's probabilities ``binary`` (binarised at 0.5: ``M_b``) and the
    user's positive ``click``, all at one resolution.

    - global prototype, ``Q = M_p * M_b``; label map ``M_c = P_g > m * k_g``;
    - centre-point (``points`` + the click) and edge (:func:`edge_mask`) prototypes, merged
      ``P_m = centre_weight * P_c + edge_weight * P_e``; label map ``M_m = P_m > n * k_m``;
    - the refined mask is the vote of ``M_p``, ``M_c`` and ``M_m`` (Eq. 5-6).

    ``components`` and ``vote_maps`` give the rows of paper B's Table 3: without voting, the
    final mask is ``0.8 * coarse + 0.2 * mean(confidences of the components) > 0.5`` (the paper's
    weighted sum; ``coarse_probability`` is the coarse prediction before thresholding).
    Returns ``mask`` (refined), ``global`` (``M_c``) and ``merged`` (``M_m``). An empty coarse
    mask has nothing to refine and comes back empty.
    """
    coarse = coarse.astype(bool)
    points, kernel, iterations = int(points), int(kernel), int(iterations)  # configs may give floats
    unknown = set(components) - set(IPT_COMPONENTS)
    if unknown:
        raise ValueError(f"IPT components {sorted(unknown)} unknown: expected some of {IPT_COMPONENTS}")
    if not coarse.any():
        empty = np.zeros_like(coarse)
        return {"mask": empty, "global": empty, "merged": empty}
    f = features.float()
    mp = torch.as_tensor(coarse, dtype=f.dtype)
    maps = {}
    if "global" in components:
        maps["global"] = prototype_confidence(f, mp * torch.as_tensor(np.asarray(binary) > 0.5, dtype=f.dtype))
    if "centre" in components:
        maps["centre"] = prototype_confidence(f, torch.as_tensor(centre_points(coarse, click, rng, points, radius)))
    if "edge" in components:
        maps["edge"] = prototype_confidence(f, torch.as_tensor(edge_mask(coarse, kernel, iterations), dtype=f.dtype))
    if not vote_maps:
        prob = coarse.astype(np.float32) if coarse_probability is None else np.asarray(coarse_probability, np.float32)
        others = np.mean([p.numpy() for p in maps.values()], axis=0) if maps else prob
        mask = 0.8 * prob + 0.2 * others > 0.5
        return {"mask": mask, "global": mask, "merged": mask}
    label_global = (maps["global"] > m * mean_confidence(maps["global"], coarse)).numpy() if "global" in maps else coarse
    if "centre" in maps or "edge" in maps:
        merged = sum(w * maps[k] for k, w in (("centre", centre_weight), ("edge", edge_weight)) if k in maps)
        label_merged = (merged > n * mean_confidence(merged, coarse)).numpy()
    else:
        label_merged = coarse
    return {"mask": vote(coarse, label_global, label_merged), "global": label_global, "merged": label_merged}


def click_window(clicks: Sequence[tuple[int, int]], hw: tuple[int, int], context: float = 0.25) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: the box spanned by the clicks (paper B's two corner clicks bound the
    object), grown by ``context`` of its size on every side, inside the image: the region IPT
    works on, zoomed to the network's resolution, so that its 5x5 erosion is a thin band of the
    object as at the paper's 512 px crops (sec. 4.1.3)."""
    ys, xs = [c[0] for c in clicks], [c[1] for c in clicks]
    h, w = hw
    dy, dx = (max(ys) - min(ys) + 1) * context, (max(xs) - min(xs) + 1) * context
    y0, y1 = max(0, int(min(ys) - dy)), min(h, int(np.ceil(max(ys) + dy)) + 1)
    x0, x1 = max(0, int(min(xs) - dx)), min(w, int(np.ceil(max(xs) + dx)) + 1)
    return y0, y1, x0, x1
