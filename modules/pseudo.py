"""Paper B's pseudo masks (sec. 3.2), the pipeline of an evolution stage as pure functions: the
model's coarse mask of one object from the user's clicks, refined by the interactive-prototype
module (``modules.ipt``) in a window around the clicks that is zoomed to the network's
resolution, and the classifier's verdict on the object's class (:func:`pseudo_label`); the same
for a dataset (:func:`pseudo_masks`); the rows of the paper's Table 3 (:data:`TABLE3`) and their
quality against the ground truth (:func:`pseudo_mask_miou`), a measurement nothing trains on."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from modules.clicks import Click, clicks_in_view
from modules.errors import check
from modules.evolution import known_class
from modules.ipt import IPT_COMPONENTS, click_window, refine_pseudo_mask
from modules.metrics import bootstrap_interval, iou
from modules.session import network_size


@dataclass(frozen=True)
class PseudoLabelling:
    """How a stage makes its pseudo masks.

    Args:
        ipt: refine the coarse masks with IPT (otherwise train on the coarse ones).
        window: run on a window around the clicks zoomed to the network's resolution (the paper's
            crops); otherwise on the whole image.
        context: the window's margin around the clicks, as a share of their span.
        components: IPT's prototypes (paper B's Table 3 rows).
        vote: combine the label maps by vote (Eq. 5-6); otherwise the weighted sum of Table 3.
        m, n, centre_weight, edge_weight, points, kernel, iterations, radius: IPT's parameters
            (sec. 4.1.2).
        known_threshold: the classifier's minimum probability for a known class.
    """

    ipt: bool = True
    window: bool = True
    context: float = 0.25
    components: tuple[str, ...] = IPT_COMPONENTS
    vote: bool = True
    m: float = 0.70
    n: float = 0.75
    centre_weight: float = 0.3
    edge_weight: float = 0.7
    points: int = 3
    kernel: int = 5
    iterations: int = 3
    radius: float = 10.0
    known_threshold: float = 0.5

    def __post_init__(self):
        unknown = set(self.components) - set(IPT_COMPONENTS)
        check(not unknown, f"pseudo.components: unknown {sorted(unknown)} (expected some of {list(IPT_COMPONENTS)})")
        for key in ("m", "n", "known_threshold"):
            check(0.0 < getattr(self, key) <= 1.0, f"pseudo.{key}={getattr(self, key)}: expected a value in (0, 1]")
        for key, low in (("context", 0), ("points", 0), ("kernel", 1), ("iterations", 0)):
            check(getattr(self, key) >= low, f"pseudo.{key}={getattr(self, key)}: expected >= {low}")
        check(self.radius > 0, f"pseudo.radius={self.radius}: expected > 0")

    def ipt_options(self) -> dict:
        return {k: getattr(self, k) for k in ("m", "n", "centre_weight", "edge_weight", "points", "kernel",
                                              "iterations", "radius", "components")} | {"vote_maps": self.vote}


def _resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if mask.shape == tuple(hw):
        return mask.astype(bool)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.interpolate(t, size=tuple(hw), mode="bilinear", align_corners=False)[0, 0] > 0.5).numpy()


@torch.no_grad()
def pseudo_label(model, image: torch.Tensor, clicks: list[Click], known_classes: int, rng: np.random.Generator,
                 options: PseudoLabelling = PseudoLabelling()) -> tuple[np.ndarray, np.ndarray, int]:
    """The coarse and the refined pseudo mask ``(H, W)`` of one object of ``image``
    ``(1, 3, H, W)`` from its ``clicks`` (the positive one first), and the classifier's verdict
    (a known class id, or -1). Nothing here reads a ground-truth mask."""
    hw = tuple(image.shape[-2:])
    y0, y1, x0, x1 = click_window([(c.y, c.x) for c in clicks], hw, options.context) if options.window else (0, hw[0], 0, hw[1])
    crop = image[..., y0:y1, x0:x1]
    net_hw = network_size((y1 - y0, x1 - x0), max(network_size(hw, model.hparams.eval_max_side)), upscale=options.window)
    net_image = F.interpolate(crop, size=net_hw, mode="bilinear", align_corners=False)
    net_clicks = clicks_in_view(clicks, (y0, y1, x0, x1), net_hw).to(image.device)
    out = model.outputs(net_image, net_clicks)
    probability = out["logits"].sigmoid()[0, 0].cpu().numpy()
    coarse = probability > 0.5
    refined = coarse
    if options.ipt and coarse.any():
        up = lambda t: F.interpolate(t, size=net_hw, mode="bilinear", align_corners=False)  # noqa: E731
        positive = next(c for c in net_clicks[0].tolist() if c[2] > 0)
        click = (min(max(round(positive[0]), 0), net_hw[0] - 1), min(max(round(positive[1]), 0), net_hw[1] - 1))
        refined = refine_pseudo_mask(F.normalize(up(out["features"]), dim=1)[0].cpu(), coarse,
                                     torch.sigmoid(up(out["binary"]))[0, 0].cpu().numpy(), click, rng,
                                     coarse_probability=probability, **options.ipt_options())["mask"]

    def back(mask: np.ndarray) -> np.ndarray:
        full = np.zeros(hw, bool)
        full[y0:y1, x0:x1] = _resize_mask(mask, (y1 - y0, x1 - x0))
        return full

    verdict = int(known_class(out["classes"], known_classes, options.known_threshold)[0])
    return back(coarse), back(refined), verdict


def pseudo_masks(model, images: Iterable[torch.Tensor], interactions: Sequence[list[Click]], known_classes: int,
                 options: PseudoLabelling, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """:func:`pseudo_label` of every object: ``images`` yields each one's ``(3, H, W)`` image, in
    the order of ``interactions``; object ``i`` draws IPT's points from ``[seed, i]``. Returns the
    coarse masks, the refined masks and the verdicts."""
    model.eval()
    coarse, refined, verdicts = [], [], []
    for i, (image, clicks) in enumerate(zip(images, interactions)):
        c, r, v = pseudo_label(model, image[None].to(model.device), clicks, known_classes, np.random.default_rng([seed, i]),
                               options)
        coarse.append(c)
        refined.append(r)
        verdicts.append(v)
    return coarse, refined, verdicts


TABLE3 = {  # paper B, Table 3: which prototypes, whether the label maps vote; and where IPT looks
    "coarse": {"components": (), "vote": True},
    "global": {"components": ("global",), "vote": False},
    "centre": {"components": ("centre",), "vote": False},
    "edge": {"components": ("edge",), "vote": False},
    "global+centre+edge": {"components": IPT_COMPONENTS, "vote": False},
    "global+merged, vote": {"components": IPT_COMPONENTS, "vote": True},
    "coarse, whole image": {"components": (), "vote": True, "window": False},
    "global+merged, vote, whole image": {"components": IPT_COMPONENTS, "vote": True, "window": False},
}


def table3_options(options: PseudoLabelling) -> dict[str, PseudoLabelling]:
    """``options`` changed into each row of :data:`TABLE3` (the first six in the window around
    the clicks, the paper's crops, whatever ``options.window`` says)."""
    return {row: replace(options, **({"window": True} | change), ipt=bool(change["components"]))
            for row, change in TABLE3.items()}


def pseudo_mask_miou(masks: dict[str, Sequence[np.ndarray]], truths: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict:
    """mIoU of each named set of pseudo masks against the ground truth ``(mask, ignore)`` of the
    same objects, with its bootstrap 95 % interval (paper B's Table 3), and ``n_objects``."""
    out = {}
    for name, ms in masks.items():
        ious = [iou(m, gt, ignore) if (m.any() or gt.any()) else 1.0 for m, (gt, ignore) in zip(ms, truths)]
        out[name] = {"miou": float(np.mean(ious)), "ci95": bootstrap_interval(np.asarray(ious))}
    return out | {"n_objects": len(truths)}
