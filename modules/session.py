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
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from modules.clicks import Click, clicks_to_tensor, scale_clicks

if TYPE_CHECKING:
    from modules.adaptation import Adapter, Cache
    from modules.interactive import InteractiveSegmentationModule


def network_size(hw: tuple[int, int], max_side: int, multiple: int = 32) -> tuple[int, int]:
    """The network resolution for an image: long side at most ``max_side``, both sides
    rounded to ``multiple`` so every encoder stride divides them."""
    scale = min(1.0, max_side / max(hw))
    return tuple(max(multiple, int(round(s * scale / multiple)) * multiple) for s in hw)  # type: ignore[return-value]


class InteractiveSession:
    """Interactive segmentation of one image ``(1, 3, H, W)`` in [0, 1].

    The network sees the image at ``network_size(H, W, eval_max_side)``; probabilities are
    returned at ``(H, W)``. ``history`` keeps the probability (network resolution) after every
    ``click`` call (``counts``: how many clicks there were then): the previous-mask input of the
    next prediction, the ``p`` of Eq. 4, and what ``undo`` goes back to.

    Args:
        model: the interactive model (weights are used as they are; an ``adapter`` changes them).
        image: the image, float in [0, 1].
        adapter: test-time adaptation, or ``None`` for fixed weights.
        defer: run IA's steps for a click after its prediction instead of before (the app: the
            mask comes back at the speed of one forward pass; the steps take the user's
            thinking time and are in place for the next click).
    """

    def __init__(self, model: "InteractiveSegmentationModule", image: torch.Tensor, adapter: "Adapter | None" = None,
                 defer: bool = False):
        self.model, self.adapter, self.defer = model, adapter, defer
        self.hw = tuple(image.shape[-2:])
        self.net_hw = network_size(self.hw, model.hparams.eval_max_side)
        image = image.to(model.device)
        self.net_image = F.interpolate(image, size=self.net_hw, mode="bilinear", align_corners=False) if self.net_hw != self.hw else image
        self.clicks: list[Click] = []
        self.history: list[torch.Tensor] = []
        self.counts: list[int] = []  # clicks after each click() call
        self.seconds: list[float] = []  # per click() call: clicks received -> probability ready
        self.pending = False  # IA's deferred steps for the latest click not run yet
        self._no_click: torch.Tensor | None = None
        self._cache: tuple[tuple, list[torch.Tensor] | torch.Tensor] | None = None
        if adapter is not None:
            adapter.begin(self)

    # -- what the network and the adaptation read ------------------------------------------------
    def net_clicks(self, clicks: list[Click] | None = None) -> torch.Tensor:
        """Clicks (default: all so far) as a ``(1, N, 3)`` tensor in network coordinates."""
        clicks = self.clicks if clicks is None else clicks
        return scale_clicks(clicks_to_tensor(clicks)[None].to(self.net_image.device), self.hw, self.net_hw)

    def _prev_input(self) -> torch.Tensor | None:
        """The previous-mask input of the latest click's prediction: the prediction before it
        (nothing before the first click, as in training)."""
        return self.history[len(self.counts) - 2] if len(self.counts) >= 2 else None

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
        """The prediction after the first ``n`` clicks (network resolution; clicks given
        together count as one prediction)."""
        i = max([i for i, c in enumerate(self.counts) if c <= n], default=0)
        return self.history[i]

    def logits(self, clicks: torch.Tensor | None = None, prev: bool = True, cache: "Cache" = "none") -> torch.Tensor:
        """Foreground logits ``(1, 1, h, w)`` at network resolution for ``clicks`` (network
        coordinates; default all) and, with ``prev``, the previous-mask input of the latest click.
        Differentiable unless called under ``no_grad``. With ``cache``, the frozen part of the
        network (``encoder`` or everything up to the ``decoder`` features) runs once per input
        and is reused by every adaptation step."""
        model, net = self.model, self.model.net
        clicks = self.net_clicks() if clicks is None else clicks
        prev_mask = self._prev_input() if prev else None
        if cache == "none":
            return model(self.net_image, clicks, prev_mask)
        key = (cache, clicks.cpu().numpy().tobytes(), None if prev_mask is None else id(prev_mask))
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
        del self.clicks[self.counts[-1] if self.counts else 0:]
        if self.adapter is not None and self.adapter.image is not None:
            self.adapter.begin_again()
            clicks, counts = self.clicks, self.counts
            for i, n in enumerate(counts):
                self.clicks, self.counts = clicks[:n], counts[: i + 1]
                if not self.defer or i < len(counts) - 1:
                    self.adapter.on_click(self)
            self.clicks, self.counts = clicks, counts
            self.pending = self.defer and bool(counts)
        return self.full_resolution(self.history[-1]) if self.history else None

    def finish(self, upto: int | None = None) -> None:
        """The image is done: IA's weights go back to the image's start; SA learns from the
        first ``upto`` clicks (default all)."""
        self.pending = False
        if self.adapter is not None:
            self.adapter.end(self, upto)

    # -- predictions -------------------------------------------------------------------------------
    def _predict(self) -> np.ndarray:
        cache = self.adapter.image.cache if self.adapter is not None and self.adapter.image is not None else "none"
        with torch.no_grad():
            logits = self.logits(cache=cache)
            while not bool(torch.isfinite(logits).all()) and self.adapter is not None and self.adapter.recover():
                self._cache = None
                logits = self.logits(cache=cache)
        prob = logits.sigmoid()
        self.history.append(prob)
        return self.full_resolution(prob)

    def full_resolution(self, prob: torch.Tensor) -> np.ndarray:
        """A probability map at network resolution brought to the image's ``(H, W)``."""
        if self.net_hw != self.hw:
            prob = F.interpolate(torch.logit(prob.clamp(1e-6, 1 - 1e-6)), size=self.hw, mode="bilinear",
                                 align_corners=False).sigmoid()
        return prob[0, 0].cpu().numpy()

    @property
    def probability(self) -> np.ndarray | None:
        """The latest probability ``(H, W)``, ``None`` before the first click."""
        return self.full_resolution(self.history[-1]) if self.history else None
