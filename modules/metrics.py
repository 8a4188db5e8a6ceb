"""Interactive-segmentation metrics (paper A, sec. 4; RITM's NoC protocol)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def iou(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Intersection over union of two binary masks, pixels marked ``ignore`` excluded."""
    pred = pred.astype(bool)
    gt = gt.astype(bool)
    if ignore is not None:
        keep = ~ignore.astype(bool)
        pred, gt = pred & keep, gt & keep
    union = np.count_nonzero(pred | gt)
    if union == 0:
        raise ValueError("IoU undefined: ground truth and prediction are both empty")
    return np.count_nonzero(pred & gt) / union


def clicks_to_reach(ious: np.ndarray, threshold: float, max_clicks: int = 20) -> np.ndarray:
    """Per object, the first click count (1-based) whose IoU reaches ``threshold``;
    ``max_clicks`` when it is never reached. ``ious``: ``(objects, clicks)``."""
    ious = np.asarray(ious, dtype=float)[:, :max_clicks]
    reached = ious >= threshold
    first = np.argmax(reached, axis=1) + 1
    return np.where(reached.any(axis=1), first, max_clicks)


def noc(ious: np.ndarray, threshold: float, max_clicks: int = 20) -> float:
    """NoC@threshold: mean number of clicks to reach the IoU, capped at ``max_clicks``."""
    return float(clicks_to_reach(ious, threshold, max_clicks).mean())


def failures(ious: np.ndarray, threshold: float, max_clicks: int = 20) -> int:
    """Objects that never reach ``threshold`` within ``max_clicks`` clicks."""
    return int((~(np.asarray(ious)[:, :max_clicks] >= threshold).any(axis=1)).sum())


def miou_at_click(ious: np.ndarray) -> list[float]:
    """mIoU after k clicks, k = 1..max_clicks (mean over objects)."""
    return [float(v) for v in np.asarray(ious, dtype=float).mean(axis=0)]


def threshold_key(t: float) -> str:
    """How a threshold is named in results: 0.85 -> "85"."""
    return f"{round(t * 100):d}"


def bootstrap_interval(values: np.ndarray, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values`` (rows resampled; a 2-D array gives
    one interval per column, as ``[[lo, ...], [hi, ...]]``)."""
    values = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[idx].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return [lo.tolist(), hi.tolist()] if values.ndim > 1 else [float(lo), float(hi)]


def summarize(
    ious: np.ndarray, thresholds: Sequence[float] = (0.8, 0.85, 0.9), max_clicks: int = 20
) -> dict:
    """The ``results.json`` entry for one dataset and variant (timing added by the caller): NoC
    and failures per threshold, mIoU after every click, each NoC with its bootstrap 95%
    interval over objects."""
    ious = np.asarray(ious, dtype=float)
    if ious.ndim != 2 or ious.shape[1] < max_clicks:
        raise ValueError(f"expected per-object IoUs of shape (objects, {max_clicks}), got {ious.shape}")
    return {
        "noc": {threshold_key(t): noc(ious, t, max_clicks) for t in thresholds},
        "noc_ci95": {threshold_key(t): bootstrap_interval(clicks_to_reach(ious, t, max_clicks)) for t in thresholds},
        "failures": {threshold_key(t): failures(ious, t, max_clicks) for t in thresholds},
        "miou_at_click": miou_at_click(ious[:, :max_clicks]),
        "n_objects": int(ious.shape[0]),
    }


def repeated_clicks(clicks: Sequence, radius: float = 2.0) -> int:
    """How many clicks land within ``radius`` px of an earlier click of the same sign (the user
    correcting the same error again: a model that did not listen)."""
    seen: list = []
    repeats = 0
    for c in clicks:
        repeats += any(p.positive == c.positive and (p.y - c.y) ** 2 + (p.x - c.x) ** 2 <= radius**2 for p in seen)
        seen.append(c)
    return repeats


def sequence_drift(ious: np.ndarray, click: int = 4, window: int = 100) -> dict:
    """Mean IoU after ``click`` clicks over the first and the last ``window`` objects of a
    sequence (``window`` shrinks to half the sequence when it is shorter): whether sequence
    adaptation keeps improving or degrades over a long sequence."""
    values = np.asarray(ious, dtype=float)[:, click - 1]
    w = max(1, min(window, len(values) // 2))
    return {"click": click, "window": w, "first": float(values[:w].mean()), "last": float(values[-w:].mean())}
