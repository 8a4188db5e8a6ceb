"""One image being segmented interactively: the object the benchmark, the Lightning test step and
the annotation app all drive.

An :class:`InteractiveSession` holds the model, one image, the user's clicks and the prediction
after each of them. ``click`` adds clicks and returns the new foreground probability at the
image's resolution, ``undo`` takes the last click back, ``finish`` ends the image. Test-time
adaptation (``modules.adaptation.Adapter``: IA, SA or both) acts through the session: IA's steps
before each prediction (or, with ``defer``, right after it, while the user looks at the mask),
IA's reset and SA's step when the image is finished.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from modules.clicks import Click, clicks_in_view, label_clicked_pixels, scale_clicks
from modules.errors import UserError

if TYPE_CHECKING:
    from modules.adaptation import Adapter, Cache
    from modules.interactive import InteractiveSegmentationModule


Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), ends excluded


def network_size(hw: tuple[int, int], max_side: int, multiple: int = 32, upscale: bool = False) -> tuple[int, int]:
    """The network resolution for an image: long side at most ``max_side`` (exactly
    ``max_side`` with ``upscale``), both sides rounded to ``multiple`` so every encoder stride
    divides them."""
    scale = max_side / max(hw) if upscale else min(1.0, max_side / max(hw))
    return tuple(max(multiple, int(round(s * scale / multiple)) * multiple) for s in hw)  # type: ignore[return-value]


@dataclass(frozen=True)
class ZoomIn:
    """RITM's zoom-in at inference (Sofiiuk et al., "Reviving iterative training with mask
    guidance", sec. 3.3; f-BRS before it): after the first ``skip_clicks`` clicks the network
    sees a crop around the predicted object and the positive clicks, grown by
    ``expansion_ratio`` (at least ``min_crop_size`` px a side), resized so its long side is
    ``target_size`` (default: the model's ``eval_max_side``); the prediction is pasted back,
    background outside the crop. The crop follows the object only when a click falls outside
    it or the new box overlaps it by less than ``recompute_iou``.
    """

    skip_clicks: int = 1
    expansion_ratio: float = 1.4
    min_crop_size: int = 128
    recompute_iou: float = 0.5
    target_size: int | None = None

    def __post_init__(self):
        if self.skip_clicks < 0 or self.expansion_ratio < 1 or self.min_crop_size < 1 or not 0 <= self.recompute_iou <= 1 \
                or (self.target_size is not None and self.target_size < 32):
            raise UserError(f"zoom_in: {self}: expected skip_clicks >= 0, expansion_ratio >= 1, min_crop_size >= 1, "
                            "recompute_iou in [0, 1], target_size >= 32")


@dataclass(frozen=True)
class TestTimeAugmentation:
    """Each prediction averaged over transformed copies of the network's input (RITM's predictor
    averages an image and its mirror, ``with_flip``): ``flip`` adds the left-right mirror, each
    of ``scales`` the view at that long side (px; e.g. a coarser scale, which answers a first
    click on a large object better). Logits are averaged at the network resolution. It acts on
    what the user sees (and on the next click's previous-mask input); the adaptation's gradient
    steps use the plain network.
    """

    flip: bool = True
    scales: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.flip, bool) or not isinstance(self.scales, (list, tuple)) \
                or not all(isinstance(s, int) and s >= 32 for s in self.scales):
            raise UserError(f"tta: {self}: expected flip true or false and scales a list of long sides >= 32 px")
        object.__setattr__(self, "scales", tuple(self.scales))


@dataclass(frozen=True)
class ClickLabels:
    """The clicks as labels on the mask the user sees: every pixel within ``radius`` px (image
    resolution) of a click takes its label, a later click over an earlier one
    (:func:`~modules.clicks.label_clicked_pixels`); 0 shows the network's output alone. A user
    who clicks a pixel has labelled it, and the mask says so even where the network's boundary
    does not move by one pixel (at radius 1, the clicked pixel and its four neighbours). The
    network's own prediction stays its previous-mask input and what adaptation reads.
    """

    radius: float = 1.0

    def __post_init__(self):
        if isinstance(self.radius, bool) or not isinstance(self.radius, (int, float)) or not 0 <= self.radius <= 16:
            raise UserError(f"click_labels: radius {self.radius!r}: expected a number of pixels in [0, 16]")


def flip_clicks(clicks: torch.Tensor, width: int) -> torch.Tensor:
    """Clicks ``(..., N, 3)`` mirrored left-right in an image ``width`` px wide."""
    out = clicks.clone()
    out[..., 1] = width - 1 - clicks[..., 1]
    return out


def object_roi(mask: np.ndarray, clicks: list[Click], expansion_ratio: float, min_crop_size: int) -> Box:
    """The zoom-in crop: the bounding box of ``mask`` (``(H, W)`` bool) and the positive clicks,
    grown about its centre by ``expansion_ratio`` to at least ``min_crop_size`` a side, inside
    the image."""
    mask = mask.copy()
    for c in clicks:
        if c.positive:
            mask[c.y, c.x] = True
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return 0, h, 0, w
    box = []
    for lo, hi, size in ((rows[0], rows[-1], h), (cols[0], cols[-1], w)):
        centre, extent = 0.5 * (lo + hi + 1), max(expansion_ratio * (hi - lo + 1), min_crop_size)
        a = int(round(min(max(centre - extent / 2, 0), max(size - extent, 0))))
        box += [a, min(size, a + int(round(extent)))]
    return box[0], box[1], box[2], box[3]


def box_iou(a: Box, b: Box) -> float:
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[2], b[2]))
    union = (a[1] - a[0]) * (a[3] - a[2]) + (b[1] - b[0]) * (b[3] - b[2]) - inter
    return inter / union if union else 0.0


class InteractiveSession:
    """Interactive segmentation of one image ``(1, 3, H, W)`` in [0, 1].

    The network sees the image at ``network_size(H, W, eval_max_side)`` (with ``zoom_in``: a crop
    of it, the ``view``); probabilities are returned at ``(H, W)``. ``history`` keeps the
    probability (network resolution of the view it was made in, ``views``) after every ``click``
    call (``counts``: how many clicks there were then): the previous-mask input of the next
    prediction, the ``p`` of Eq. 4, and what ``undo`` goes back to.

    Args:
        model: the interactive model (weights are used as they are; an ``adapter`` changes them).
        image: the image, float in [0, 1].
        adapter: test-time adaptation, or ``None`` for fixed weights.
        defer: run IA's steps for a click after its prediction instead of before (the app: the
            mask comes back at the speed of one forward pass; the steps take the user's
            thinking time and are in place for the next click).
        zoom_in: RITM's zoom-in (:class:`ZoomIn`), or ``None`` for the whole image always.
        tta: test-time augmentation of every prediction (:class:`TestTimeAugmentation`), or ``None``.
        click_labels: the clicks as labels on the returned probabilities (:class:`ClickLabels`),
            or ``None`` for the network's output alone.
    """

    def __init__(self, model: "InteractiveSegmentationModule", image: torch.Tensor, adapter: "Adapter | None" = None,
                 defer: bool = False, zoom_in: ZoomIn | None = None, tta: TestTimeAugmentation | None = None,
                 click_labels: ClickLabels | None = None):
        self.model, self.adapter, self.defer, self.zoom_in, self.tta = model, adapter, defer, zoom_in, tta
        self.click_labels = click_labels
        self.hw = tuple(image.shape[-2:])
        self.image = image.to(model.device)
        self.whole: Box = (0, self.hw[0], 0, self.hw[1])
        self._set_view(self.whole)
        self.clicks: list[Click] = []
        self.history: list[torch.Tensor] = []
        self.views: list[Box] = []  # the view each history entry was predicted in
        self.counts: list[int] = []  # clicks after each click() call
        self.seconds: list[float] = []  # per click() call: clicks received -> probability ready
        self.pending = False  # IA's deferred steps for the latest click not run yet
        if adapter is not None:
            adapter.begin(self)

    # -- the view the network sees -----------------------------------------------------------------
    def _set_view(self, view: Box) -> None:
        """Let the network see ``view`` of the image (the whole image, or a zoom-in crop)."""
        if getattr(self, "view", None) == view:
            return
        y0, y1, x0, x1 = self.view = view
        max_side = self.model.hparams.eval_max_side
        if view == self.whole:
            self.net_hw = network_size(self.hw, max_side)
        else:
            self.net_hw = network_size((y1 - y0, x1 - x0), self.zoom_in.target_size or max_side, upscale=True)
        crop = self.image[..., y0:y1, x0:x1]
        self.net_image = F.interpolate(crop, size=self.net_hw, mode="bilinear", align_corners=False) \
            if self.net_hw != tuple(crop.shape[-2:]) else crop
        self._no_click: torch.Tensor | None = None
        self._cache: tuple[tuple, list[torch.Tensor] | torch.Tensor] | None = None

    @contextmanager
    def seen_in(self, view: Box):
        """Let the network see ``view`` for a while (SA replays a click state in the view its
        prediction was made in), then the current view again."""
        current = self.view
        self._set_view(view)
        try:
            yield
        finally:
            self._set_view(current)

    def _update_view(self) -> None:
        """Zoom-in's crop for the latest click, from the prediction before it and the clicks."""
        zoom = self.zoom_in
        if zoom is None or len(self.clicks) <= zoom.skip_clicks or not self.history:
            self._set_view(self.whole)
            return
        roi = object_roi(self.probability > 0.5, self.clicks, zoom.expansion_ratio, zoom.min_crop_size)
        y0, y1, x0, x1 = self.view
        outside = any(not (y0 <= c.y < y1 and x0 <= c.x < x1) for c in self.clicks[self.counts[-2] if len(self.counts) > 1 else 0:])
        if self.view == self.whole or outside or box_iou(roi, self.view) < zoom.recompute_iou:
            self._set_view(roi)

    def _in_view(self, i: int) -> torch.Tensor:
        """History entry ``i`` as seen in the current view (at its network resolution)."""
        if self.views[i] == self.view:
            return self.history[i]
        y0, y1, x0, x1 = self.view
        full = torch.from_numpy(self.full_resolution(self.history[i], self.views[i]))[None, None].to(self.net_image.device)
        return F.interpolate(full[..., y0:y1, x0:x1], size=self.net_hw, mode="bilinear", align_corners=False)

    # -- what the network and the adaptation read ------------------------------------------------
    def net_clicks(self, clicks: list[Click] | None = None) -> torch.Tensor:
        """Clicks (default: all so far) as a ``(1, N, 3)`` tensor in network coordinates of the view."""
        return clicks_in_view(self.clicks if clicks is None else clicks, self.view, self.net_hw).to(self.net_image.device)

    def _prev_input(self) -> torch.Tensor | None:
        """The previous-mask input of the latest click's prediction: the prediction before it
        (nothing before the first click, as in training)."""
        return self._in_view(len(self.counts) - 2) if len(self.counts) >= 2 else None

    def previous_probability(self) -> torch.Tensor:
        """``p`` of Eq. 4 for the latest click: the prediction before it; before the first click,
        the prediction without clicks (Algorithm 1, line 5)."""
        prev = self._prev_input()
        if prev is not None:
            return prev
        if self._no_click is None:
            with torch.no_grad():
                self._no_click = self.model(self.net_image, self.net_clicks([])).sigmoid()
        return self._no_click

    def probability_after(self, n: int) -> torch.Tensor:
        """The prediction after the first ``n`` clicks (in the current view; clicks given
        together count as one prediction)."""
        return self._in_view(max([i for i, c in enumerate(self.counts) if c <= n], default=0))

    def logits(self, clicks: torch.Tensor | None = None, prev: bool | torch.Tensor = True, cache: "Cache" = "none") -> torch.Tensor:
        """Foreground logits ``(1, 1, h, w)`` at network resolution for ``clicks`` (network
        coordinates; default all) and, with ``prev``, the previous-mask input of the latest click
        (or ``prev`` itself when it is a mask).
        Differentiable unless called under ``no_grad``. With ``cache``, the frozen part of the
        network (``encoder`` or everything up to the ``decoder`` features) runs once per input
        and is reused by every adaptation step."""
        model, net = self.model, self.model.net
        clicks = self.net_clicks() if clicks is None else clicks
        prev_mask = prev if isinstance(prev, torch.Tensor) else self._prev_input() if prev else None
        if cache == "none":
            return model(self.net_image, clicks, prev_mask)
        if isinstance(prev, torch.Tensor):
            raise ValueError("a cached prediction takes the latest click's previous mask, not an explicit one")
        key = (cache, self.view, clicks.cpu().numpy().tobytes(), None if prev_mask is None else id(self.history[len(self.counts) - 2]))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                feats = net.encode(model.network_input(self.net_image, clicks, prev_mask))
                self._cache = (key, net.decode_features(feats) if cache == "decoder" else feats)
        if cache == "decoder":
            return net.predict_head(self._cache[1], self.net_hw)
        return net.decode(self._cache[1], self.net_hw)

    # -- the user's actions ------------------------------------------------------------------------
    def click(self, *clicks: Click) -> np.ndarray:
        """Add one click (or several given together, e.g. paper B's three) and return the
        foreground probability ``(H, W)``."""
        start = time.perf_counter()
        self.adapt()  # a deferred click's steps, if the user was faster than them
        self.clicks.extend(clicks)
        self.counts.append(len(self.clicks))
        self._update_view()
        if self.adapter is not None and not self.defer:
            self.adapter.on_click(self)
        prob = self._predict()
        self.pending = self.adapter is not None and self.defer
        self.seconds.append(time.perf_counter() - start)
        return prob

    def adapt(self) -> None:
        """Run IA's deferred steps for the latest click (the app calls this while the user looks
        at the mask; ``click`` runs it first if it has not run)."""
        if self.pending:
            self.pending = False
            self.adapter.on_click(self)

    def undo(self) -> np.ndarray | None:
        """Take the last click (the last ``click`` call) back; the probability before it
        (``None`` when no click is left). IA's weights go back to the image's start and its
        steps for the remaining clicks are replayed, so the weights are those the remaining
        clicks alone lead to."""
        if not self.counts:
            return None
        self.pending = False
        self.counts.pop()
        self.history.pop()
        self.views.pop()
        del self.clicks[self.counts[-1] if self.counts else 0:]
        if self.adapter is not None and self.adapter.image is not None:
            self.adapter.begin_again()
            clicks, counts = self.clicks, self.counts
            for i, n in enumerate(counts):
                self.clicks, self.counts = clicks[:n], counts[: i + 1]
                self._set_view(self.views[i])
                if not self.defer or i < len(counts) - 1:
                    self.adapter.on_click(self)
            self.clicks, self.counts = clicks, counts
            self.pending = self.defer and bool(counts)
        self._set_view(self.views[-1] if self.views else self.whole)
        return self.probability

    def finish(self, upto: int | None = None) -> None:
        """The image is done: IA's weights go back to the image's start; SA learns from the
        first ``upto`` clicks (default all)."""
        self.pending = False
        if self.adapter is not None:
            self.adapter.end(self, upto)

    # -- predictions -------------------------------------------------------------------------------
    def _predict(self) -> np.ndarray:
        cache = self.adapter.image.cache if self.adapter is not None and self.adapter.image is not None else "none"
        predict = self.augmented if self.tta is not None else lambda: self.logits(cache=cache)
        with torch.no_grad():
            logits = predict()
            while not bool(torch.isfinite(logits).all()) and self.adapter is not None and self.adapter.recover():
                self._cache = None
                logits = predict()
        prob = logits.sigmoid()
        self.history.append(prob)
        self.views.append(self.view)
        return self.shown(-1)

    def augmented(self) -> torch.Tensor:
        """The latest click's logits averaged over the transformed inputs ``tta`` asks for
        (:class:`TestTimeAugmentation`); each scale and its mirror go through the network as one
        batch of two (about 15 % faster on a CPU than one after the other)."""
        clicks, prev = self.net_clicks(), self._prev_input()
        outputs = []
        for hw in [self.net_hw] + [network_size(self.net_hw, side, upscale=True) for side in self.tta.scales]:
            image, c, p = self.net_image, clicks, prev
            if hw != self.net_hw:
                image = F.interpolate(image, size=hw, mode="bilinear", align_corners=False)
                c = scale_clicks(clicks, self.net_hw, hw)
                p = None if prev is None else F.interpolate(prev, size=hw, mode="bilinear", align_corners=False)
            if self.tta.flip:
                out = self.model(torch.cat([image, image.flip(-1)]), torch.cat([c, flip_clicks(c, hw[1])]),
                                 None if p is None else torch.cat([p, p.flip(-1)]))
                outputs += [out[:1], out[1:].flip(-1)]
            else:
                outputs.append(self.model(image, c, p))
        return torch.stack([o if o.shape[-2:] == self.net_hw else
                            F.interpolate(o, size=self.net_hw, mode="bilinear", align_corners=False) for o in outputs]).mean(0)

    def full_resolution(self, prob: torch.Tensor, view: Box) -> np.ndarray:
        """A probability map at the network resolution of ``view`` brought to the image's
        ``(H, W)`` (background outside the view)."""
        y0, y1, x0, x1 = view
        if tuple(prob.shape[-2:]) != (y1 - y0, x1 - x0):
            prob = F.interpolate(torch.logit(prob.clamp(1e-6, 1 - 1e-6)), size=(y1 - y0, x1 - x0), mode="bilinear",
                                 align_corners=False).sigmoid()
        prob = prob[0, 0].cpu().numpy()
        if view == self.whole:
            return prob
        full = np.zeros(self.hw, prob.dtype)
        full[y0:y1, x0:x1] = prob
        return full

    def shown(self, i: int) -> np.ndarray:
        """History entry ``i`` as the user sees it: at the image's ``(H, W)``, with the clicks
        made until then as labels (``click_labels``)."""
        prob = self.full_resolution(self.history[i], self.views[i])
        if self.click_labels is None:
            return prob
        return label_clicked_pixels(prob, self.clicks[:self.counts[i]], self.click_labels.radius)

    @property
    def probability(self) -> np.ndarray | None:
        """The latest probability ``(H, W)`` as the user sees it, ``None`` before the first click."""
        return self.shown(-1) if self.history else None
