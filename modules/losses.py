"""Losses as plain functions."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-wise binary cross-entropy averaged over ``valid`` pixels (paper A, Eq. 1).

    ``valid`` (bool, broadcastable) drops pixels from the loss, e.g. ignore regions; with
    sparse ``valid`` this is Eq. 2, the loss over corrected pixels only.
    """
    loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    if valid is None:
        return loss.mean()
    valid = valid.expand_as(loss).to(loss.dtype)
    return (loss * valid).sum() / valid.sum().clamp_min(1.0)
