"""User simulation: where a user would click (paper A, sec. 3.3).

Test time: RITM's protocol, deterministic. Train time: stage (a) random initial clicks;
stage (b), iterative clicks, reuses :func:`next_click` on the model's own predictions.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from modules.clicks import Click

CLICKER = "ritm-not-clicked"  # the test-time simulated user, recorded in every results file's protocol
# (before 2026-11-25 it could click a pixel again; results written by it have no ``clicker``)


def _inner_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every mask pixel to the nearest non-mask pixel or image border."""
    padded = np.pad(mask.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist[1:-1, 1:-1]


def next_click(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None,
               clicked: Sequence[Click] = ()) -> Click | None:
    """The next corrective click for prediction ``pred`` against ground truth ``gt``.

    False negatives call for a positive click, false positives for a negative one. The click
    goes to the interior-most pixel (maximum of the distance transform) of the error region
    that reaches deepest, as in RITM's ``Clicker``; ties go to the first pixel in row-major
    order, so the simulator is deterministic. Pixels marked ``ignore`` are neither errors nor
    clickable, and, as RITM's ``not_clicked_map`` does, neither are the pixels of the earlier
    clicks ``clicked`` (the user does not click the same pixel twice). Returns ``None`` when no
    clickable error is left.
    """
    pred = pred.astype(bool)
    gt = gt.astype(bool)
    valid = np.ones_like(gt) if ignore is None else ~ignore.astype(bool)
    fn = gt & ~pred & valid
    fp = ~gt & pred & valid
    if not fn.any() and not fp.any():
        return None
    fn_dist = _inner_distance(fn)
    fp_dist = _inner_distance(fp)
    for c in clicked:
        fn_dist[c.y, c.x] = fp_dist[c.y, c.x] = 0
    if fn_dist.max() == 0 and fp_dist.max() == 0:
        return None
    positive = fn_dist.max() > fp_dist.max()
    dist = fn_dist if positive else fp_dist
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return Click(int(y), int(x), bool(positive))


def _pick(rng: np.random.Generator, region: np.ndarray, n: int) -> list[tuple[int, int]]:
    ys, xs = np.nonzero(region)
    if n <= 0 or len(ys) == 0:
        return []
    idx = rng.choice(len(ys), size=min(n, len(ys)), replace=False)
    return [(int(ys[i]), int(xs[i])) for i in idx]


def sample_initial_clicks(
    mask: np.ndarray,
    rng: np.random.Generator,
    instances: np.ndarray | None = None,
    ignore: np.ndarray | None = None,
    max_positive: int = 5,
    max_negative: int = 5,
    margin: int = 3,
    band: tuple[int, int] = (5, 20),
) -> list[Click]:
    """Stage (a) of train-time simulation: 1..``max_positive`` positives uniformly on the
    object (at least ``margin`` px from its border where possible), 0..``max_negative``
    negatives drawn from three strategies (paper A, sec. 3.3; ITIS / Xu et al.):
    a band around the object, other objects (``instances`` > 0 outside this one), and
    anywhere in the background.
    """
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("cannot sample clicks on an empty mask")
    valid = np.ones_like(mask) if ignore is None else ~ignore.astype(bool)
    inner = _inner_distance(mask)
    positive_region = (inner > margin) & valid
    if not positive_region.any():
        positive_region = mask & valid if (mask & valid).any() else mask
    clicks = [Click(y, x, True) for y, x in _pick(rng, positive_region, int(rng.integers(1, max_positive + 1)))]

    background = ~mask & valid
    outer = _inner_distance(~mask)
    strategies = [
        background & (outer > margin) & (outer <= rng.integers(band[0], band[1] + 1)),  # around the object
        background & (instances > 0) & (outer > margin) if instances is not None else None,  # other objects
        background & (outer > margin),  # anywhere in the background
    ]
    strategies = [s for s in strategies if s is not None and s.any()]
    n_negative = int(rng.integers(0, max_negative + 1))
    if strategies and n_negative:
        # split the negatives between the strategies at random
        counts = rng.multinomial(n_negative, np.ones(len(strategies)) / len(strategies))
        taken: set[tuple[int, int]] = set()
        for region, k in zip(strategies, counts):
            for yx in _pick(rng, region, int(k)):
                if yx not in taken:
                    taken.add(yx)
                    clicks.append(Click(yx[0], yx[1], False))
    return clicks


def three_click_protocol(
    mask: np.ndarray, rng: np.random.Generator | None = None, jitter: int = 0, margin: int = 3
) -> list[Click]:
    """Paper B's interaction (IOG, sec. 3.1): two negative clicks at the diagonal corners of the
    object's bounding box, ``margin`` px outside it (clipped to the image), and one positive
    click at the object's interior-most pixel. Deterministic unless ``rng`` and ``jitter`` are
    given (training: every click moves by up to ``jitter`` px; the positive one stays on the
    object).
    """
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("cannot place the three clicks on an empty mask")
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    y0, x0, y1, x1 = ys.min() - margin, xs.min() - margin, ys.max() + margin, xs.max() + margin
    inner = _inner_distance(mask)
    fy, fx = np.unravel_index(int(np.argmax(inner)), inner.shape)
    if rng is not None and jitter > 0:
        y0, x0, y1, x1 = (v + int(rng.integers(-jitter, jitter + 1)) for v in (y0, x0, y1, x1))
        near = mask & ((np.arange(h)[:, None] - fy) ** 2 + (np.arange(w)[None] - fx) ** 2 <= jitter**2)
        fy, fx = _pick(rng, near, 1)[0]
    clip = lambda v, n: int(min(max(v, 0), n - 1))  # noqa: E731
    return [Click(int(fy), int(fx), True), Click(clip(y0, h), clip(x0, w), False), Click(clip(y1, h), clip(x1, w), False)]


def perturb_mask(mask: np.ndarray, rng: np.random.Generator, max_blobs: int = 3) -> np.ndarray:
    """A plausible imperfect prediction of ``mask``: its boundary moved in or out by a few
    pixels, parts cut away, and blobs added around it (a previous mask to be corrected, made
    without running a model)."""
    mask = mask.astype(bool)
    h, w = mask.shape
    size = max(2, int(np.sqrt(mask.sum())))
    out = mask.astype(np.uint8)
    k = int(rng.integers(1, max(2, size // 8) + 1)) * 2 + 1
    if rng.random() < 0.5:
        out = (cv2.dilate if rng.random() < 0.5 else cv2.erode)(out, np.ones((k, k), np.uint8))
    ys, xs = np.nonzero(mask)
    for _ in range(int(rng.integers(1, max_blobs + 1))):
        i = int(rng.integers(len(ys)))
        centre = (int(xs[i] + rng.integers(-size // 3, size // 3 + 1)), int(ys[i] + rng.integers(-size // 3, size // 3 + 1)))
        axes = (int(rng.integers(2, max(3, size // 3))), int(rng.integers(2, max(3, size // 3))))
        cv2.ellipse(out, centre, axes, float(rng.uniform(0, 180)), 0, 360, int(rng.random() < 0.5), -1)
    return out.astype(bool)


def corrective_clicks(previous: np.ndarray, gt: np.ndarray, n: int, ignore: np.ndarray | None = None
                      ) -> tuple[list[Click], np.ndarray]:
    """Up to ``n`` corrective clicks on ``previous``, each answered as a perfect model would
    (the clicked error region takes the ground truth); returns the clicks and the mask before
    the last of them."""
    pred = previous.astype(bool).copy()
    before = pred.copy()
    gt = gt.astype(bool)
    clicks: list[Click] = []
    for _ in range(n):
        click = next_click(pred, gt, ignore)
        if click is None:
            break
        errors = (pred != gt) if ignore is None else (pred != gt) & ~ignore.astype(bool)
        _, regions = cv2.connectedComponents(errors.astype(np.uint8))
        before = pred.copy()
        pred[regions == regions[click.y, click.x]] = click.positive
        clicks.append(click)
    return clicks, before
