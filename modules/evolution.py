"""Feature-alignment training of paper B (sec. 3.3-3.4, Eq. 7-11), as pure functions.

Each training pair is an object of the new dataset ``B`` (its pseudo mask) and an object of the
earlier data ``A`` (ground truth, or an earlier stage's pseudo mask). The
``EvolutionModule`` (``modules.evolution_module``) only wires these together.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.ipt import prototype


def feature_alignment_loss(
    features_a: torch.Tensor,
    mask_a: torch.Tensor,
    features_b: torch.Tensor,
    mask_b: torch.Tensor,
    binary_b: torch.Tensor,
    known: torch.Tensor,
    min_probability: float = 0.05,
) -> torch.Tensor:
    """Eq. 7 for pairs of a known class, Eq. 8 for the others, averaged over the batch.

    ``features_*`` ``(B, C, h, w)``; ``mask_*`` ``(B, h, w)`` object weights at that resolution
    (``A``: ground truth, ``B``: pseudo mask); ``binary_b`` ``(B, h, w)`` the binary predictor's
    probabilities ``M'_b`` on ``B``; ``known`` ``(B,)`` bool. The prototypes are Eq. 1 over the
    masks. Squared distances are means over channels, and the pixel term of Eq. 7 (weights
    ``1 / M'_b``, floored at ``min_probability``) is a mean over the pseudo mask's pixels, so the
    loss does not grow with feature width or object size. Pairs whose masks are empty at this
    resolution are left out.
    """
    c_a, c_b = prototype(features_a, mask_a), prototype(features_b, mask_b)
    global_term = ((c_a - c_b) ** 2).mean(dim=1)
    pixel = ((features_b - c_a[:, :, None, None]) ** 2).mean(dim=1)
    weights = mask_b / binary_b.clamp_min(min_probability)
    pixel_term = (pixel * weights).sum(dim=(1, 2)) / mask_b.sum(dim=(1, 2)).clamp_min(1e-6)
    per_pair = global_term + known.to(pixel_term.dtype) * pixel_term
    present = (mask_a.sum(dim=(1, 2)) > 0) & (mask_b.sum(dim=(1, 2)) > 0)
    return per_pair[present].mean() if present.any() else per_pair.sum() * 0


def max_squares_loss(probability: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Maximum-squares loss on the binary predictor's probabilities ``(B, ...)``: Eq. 10,
    ``-(p^2 + (1 - p)^2)``, for unknown classes; Eq. 9 for known ones, which over the two classes
    (object, background) is half of that. Means over pixels, then over the batch."""
    squares = -(probability**2 + (1 - probability) ** 2).flatten(1).mean(dim=1)
    return torch.where(known, 0.5 * squares, squares).mean()


def replay_weight(progress: float, final: float = 0.1) -> float:
    """Weight of the earlier data's loss: decays linearly from 1 to ``final`` over the stage
    (``progress`` in [0, 1], sec. 4.1.3)."""
    return 1.0 - (1.0 - final) * min(max(progress, 0.0), 1.0)


def expand_classifier(classifier: nn.Linear) -> nn.Linear:
    """``n`` -> ``n + 1`` outputs: the first ``n`` copied, the extra "unknown" one freshly
    initialised (sec. 3.3)."""
    grown = nn.Linear(classifier.in_features, classifier.out_features + 1)
    with torch.no_grad():
        grown.weight[:-1].copy_(classifier.weight)
        grown.bias[:-1].copy_(classifier.bias)
    return grown


def known_class(class_logits: torch.Tensor, n_known: int, threshold: float = 0.5) -> torch.Tensor:
    """The classifier's verdict per object: a known class id when its softmax probability is the
    largest of the ``n_known + 1`` outputs and at least ``threshold``, else -1 (unknown)."""
    probs = F.softmax(class_logits, dim=1)
    best, idx = probs.max(dim=1)
    known = (idx < n_known) & (best >= threshold)
    return torch.where(known, idx, torch.full_like(idx, -1))
