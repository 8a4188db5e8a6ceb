"""Losses as plain functions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from modules.clicks import encode_clicks


def masked_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-wise binary cross-entropy averaged over ``valid`` pixels (paper A, Eq. 1).

    ``valid`` (bool, broadcastable) drops pixels from the loss, e.g. ignore regions; with
    sparse ``valid`` this is Eq. 2, the loss over corrected pixels only. ``weight``
    (broadcastable) scales each pixel's term; the mean stays over the valid pixels.
    """
    loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    if weight is not None:
        loss = loss * weight
    if valid is None:
        return loss.mean()
    valid = valid.expand_as(loss).to(loss.dtype)
    return (loss * valid).sum() / valid.sum().clamp_min(1.0)


def normalized_focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                          weight: torch.Tensor | None = None, gamma: float = 2.0) -> torch.Tensor:
    """Normalized focal loss (Sofiiuk et al., AdaptIS 2019; RITM trains with it): per image, the
    pixel-wise BCE weighted by the focal factor ``(1 - p_t) ** gamma`` and divided by that factor's
    sum over the image (detached), so the loss keeps the scale of a mean while well-classified
    pixels fade out and the hard ones (a boundary, a corrected region) carry it. ``valid`` and
    ``weight`` act as in ``masked_bce`` (``weight`` also enters the normaliser); with ``gamma = 0``
    and no ``weight`` it is ``masked_bce`` averaged per image."""
    logits = logits.float()
    target = target.to(logits.dtype).expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)  # the probability given to the true label
    focal = (1.0 - p_t) ** gamma
    scale = torch.ones_like(bce) if weight is None else weight.to(bce.dtype).expand_as(bce)
    if valid is not None:
        scale = scale * valid.expand_as(bce).to(bce.dtype)
    dims = tuple(range(1, bce.dim()))
    norm = (scale * focal).sum(dims).detach().clamp_min(1e-8)
    return ((scale * focal * bce).sum(dims) / norm).mean()


def near_click_weights(clicks: torch.Tensor, hw: tuple[int, int], radius: float, weight: float) -> torch.Tensor:
    """Per-pixel loss weights ``(B, 1, H, W)``: ``1 + weight`` within ``radius`` px of any click,
    1 elsewhere (the training loss cares most where a user corrected)."""
    near = encode_clicks(clicks, hw, radius, "disk").amax(dim=1, keepdim=True)
    return 1.0 + weight * near
