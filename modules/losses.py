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


def near_click_weights(clicks: torch.Tensor, hw: tuple[int, int], radius: float, weight: float) -> torch.Tensor:
    """Per-pixel loss weights ``(B, 1, H, W)``: ``1 + weight`` within ``radius`` px of any click,
    1 elsewhere (the training loss cares most where a user corrected)."""
    near = encode_clicks(clicks, hw, radius, "disk").amax(dim=1, keepdim=True)
    return 1.0 + weight * near
