"""The click-by-click evaluation of one object (RITM's ``evaluate_sample``), played by the
simulated user on an :class:`~modules.session.InteractiveSession`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modules.clicks import Click
from modules.metrics import iou
from modules.session import InteractiveSession
from modules.simulate import next_click


@dataclass
class ObjectResult:
    clicks: list[Click]
    ious: np.ndarray  # (max_clicks,) IoU after click k at original resolution
    seconds: list[float]  # per prediction: clicks received -> probability ready
    user_clicks: int  # clicks until the target IoU was first reached (max_clicks when never): where the user stops
    first_mask: np.ndarray  # the first and the last predicted masks (bool, original resolution)
    last_mask: np.ndarray


def evaluate_object(
    session: InteractiveSession,
    gt: np.ndarray,
    ignore: np.ndarray | None = None,
    max_clicks: int = 20,
    threshold: float = 0.5,
    initial: list[Click] | None = None,
    target_iou: float = 0.9,
) -> ObjectResult:
    """Simulate ``max_clicks`` corrective clicks on one object and record the IoU after each.

    All clicks are made (no early stop) so that mIoU@k is defined for every k; NoC is read off
    the IoU curve, and ``user_clicks`` says where Algorithm 1's user, who stops at
    ``target_iou``, would have stopped. If a prediction is perfect, or the only errors left are
    pixels clicked before, no error is left to click on and the IoU is carried forward.
    ``initial`` clicks (paper B's three) are given together first: they count as that many
    clicks, the IoU before the last of them is 0 (nothing is predicted yet), and corrective
    clicks follow.
    """
    gt = gt.astype(bool)
    if not gt.any():
        raise ValueError("cannot evaluate an empty ground-truth mask")
    pred = first = np.zeros_like(gt)
    ious: list[float] = []
    if initial:
        if len(initial) > max_clicks:
            raise ValueError(f"{len(initial)} initial clicks exceed max_clicks={max_clicks}")
        pred = first = session.click(*initial) > threshold
        ious = [0.0] * (len(initial) - 1) + [iou(pred, gt, ignore)]
    while len(ious) < max_clicks:
        click = next_click(pred, gt, ignore, session.clicks)
        if click is None:
            ious.append(ious[-1])  # no clickable error left (only after a prediction: pred starts empty, gt is not)
            continue
        pred = session.click(click) > threshold
        first = pred if not ious else first
        ious.append(iou(pred, gt, ignore))
    reached = np.flatnonzero(np.asarray(ious) >= target_iou)
    return ObjectResult(list(session.clicks), np.asarray(ious), list(session.seconds),
                        int(reached[0]) + 1 if len(reached) else max_clicks, first, pred)
