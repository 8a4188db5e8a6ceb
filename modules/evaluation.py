"""The click-by-click evaluation of one object (RITM's ``evaluate_sample``)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from modules.clicks import Click
from modules.metrics import iou
from modules.simulate import next_click

Predictor = Callable[[list[Click]], np.ndarray]
"""Maps all clicks so far (original image coordinates) to a foreground probability map."""


@dataclass
class ObjectResult:
    clicks: list[Click]
    ious: np.ndarray  # (max_clicks,) IoU after click k at original resolution
    seconds: list[float] = field(default_factory=list)  # per click: click received -> prediction ready


def evaluate_object(
    predict: Predictor,
    gt: np.ndarray,
    ignore: np.ndarray | None = None,
    max_clicks: int = 20,
    threshold: float = 0.5,
    initial: list[Click] | None = None,
) -> ObjectResult:
    """Simulate ``max_clicks`` corrective clicks on one object and record the IoU after each.

    All clicks are made (no early stop) so that mIoU@k is defined for every k; NoC is read off
    the IoU curve. If a prediction is perfect, no error is left to click on and the IoU is
    carried forward. ``seconds`` times ``predict`` alone, which is what the user waits for.
    ``initial`` clicks (paper B's three) are given together first: they count as that many
    clicks, the IoU before the last of them is 0 (nothing is predicted yet), and corrective
    clicks follow.
    """
    gt = gt.astype(bool)
    if not gt.any():
        raise ValueError("cannot evaluate an empty ground-truth mask")
    pred = np.zeros_like(gt)
    clicks: list[Click] = []
    ious: list[float] = []
    seconds: list[float] = []
    if initial:
        if len(initial) > max_clicks:
            raise ValueError(f"{len(initial)} initial clicks exceed max_clicks={max_clicks}")
        clicks = list(initial)
        start = time.perf_counter()
        pred = predict(clicks) > threshold
        seconds.append(time.perf_counter() - start)
        ious = [0.0] * (len(clicks) - 1) + [iou(pred, gt, ignore)]
    for _ in range(max_clicks - len(ious)):
        click = next_click(pred, gt, ignore)
        if click is None:
            ious.append(ious[-1])  # only reachable after a prediction: pred starts empty, gt is not
            continue
        clicks.append(click)
        start = time.perf_counter()
        prob = predict(clicks)
        seconds.append(time.perf_counter() - start)
        pred = prob > threshold
        ious.append(iou(pred, gt, ignore))
    return ObjectResult(clicks, np.asarray(ious), seconds)
