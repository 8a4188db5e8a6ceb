"""Feature-alignment training of paper B (sec. 3.3-3.4, Eq. 7-11), as pure functions.

Each training pair is an object of the new dataset ``B`` (its pseudo mask) and an object of the
earlier data ``A`` (ground truth, or an earlier stage's pseudo mask). The
``EvolutionModule`` (``modules.evolution_module``) only wires these together.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modules.ipt import prototype


def feature_alignment_terms(
    features_a: torch.Tensor,
    mask_a: torch.Tensor,
    features_b: torch.Tensor,
    mask_b: torch.Tensor,
    binary_b: torch.Tensor,
    min_probability: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two terms of Eq. 7 per pair: ``A = ||c_a - c_b||^2`` (global prototypes, Eq. 1 over
    each object's mask) and ``B = sum_i 1 / M'_b,i ||F_b,i - c_a||^2`` over the pseudo mask's
    pixels, with squared Euclidean distances (Eq. 2). ``M'_b`` (the binary predictor's
    probabilities) weighs the pixels and is not trained by this loss (detached; floored at
    ``min_probability``); ``B`` is averaged over the mask's pixels so that it does not grow with
    object size. Also returns which pairs have both masks non-empty at this resolution.

    ``features_*`` ``(N, C, h, w)``; ``mask_*`` ``(N, h, w)`` object weights; ``binary_b``
    ``(N, h, w)``.
    """
    c_a, c_b = prototype(features_a, mask_a), prototype(features_b, mask_b)
    global_term = ((c_a - c_b) ** 2).sum(dim=1)
    pixel = ((features_b - c_a[:, :, None, None]) ** 2).sum(dim=1)
    weights = mask_b / binary_b.detach().clamp_min(min_probability)
    pixel_term = (pixel * weights).sum(dim=(1, 2)) / mask_b.sum(dim=(1, 2)).clamp_min(1e-6)
    present = (mask_a.sum(dim=(1, 2)) > 0) & (mask_b.sum(dim=(1, 2)) > 0)
    return global_term, pixel_term, present


def feature_alignment_loss(global_term: torch.Tensor, pixel_term: torch.Tensor, present: torch.Tensor, known: torch.Tensor,
                           unknown_terms: Sequence[str] = ("global",)) -> torch.Tensor:
    """Eq. 7 (``A + B``) for pairs of a known class, Eq. 8 for the others: the paper's ``A``
    alone by default; Table 5 compares ``("global", "pixel")`` and ``("pixel",)``. Mean over the
    pairs whose masks are present."""
    unknown = sum(t for name, t in (("global", global_term), ("pixel", pixel_term)) if name in unknown_terms)
    per_pair = torch.where(known, global_term + pixel_term, unknown if torch.is_tensor(unknown) else global_term * 0)
    return per_pair[present].mean() if present.any() else per_pair.sum() * 0


def max_squares_known(binary: torch.Tensor, class_probabilities: torch.Tensor) -> torch.Tensor:
    """Eq. 9, ``-1/2 sum_i sum_c (p^{i,c})^2``, per object (mean over pixels): the pixel-level
    class distribution is the background ``1 - M'_b,i`` and, for each class ``c`` of the
    classifier, ``M'_b,i q_c`` (``binary``: ``(N, h, w)`` foreground probabilities; the
    classifier's softmax ``q``: ``(N, n + 1)``). It pushes pixels to one side and the object to
    one class."""
    squares = binary**2 * (class_probabilities**2).sum(dim=1)[:, None, None] + (1 - binary) ** 2
    return -0.5 * squares.flatten(1).mean(dim=1)


def max_squares_unknown(binary: torch.Tensor) -> torch.Tensor:
    """Eq. 10, ``sum_i -p_i^2 - (1 - p_i)^2``, per object (mean over pixels) on the binary
    predictor's foreground probabilities ``(N, h, w)``."""
    return -(binary**2 + (1 - binary) ** 2).flatten(1).mean(dim=1)


def max_squares_loss(binary: torch.Tensor, class_probabilities: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Eq. 9 for objects judged a known class, Eq. 10 for the others, averaged over the batch."""
    return torch.where(known, max_squares_known(binary, class_probabilities), max_squares_unknown(binary)).mean()


def replay_weight(progress: float, final: float = 0.1) -> float:
    """Weight of the earlier data's loss: moves linearly from 1 to ``final`` over the stage
    (``progress`` in [0, 1]; the paper decays it to 0.1, sec. 4.1.3)."""
    return 1.0 - (1.0 - final) * min(max(progress, 0.0), 1.0)


def freeze_norm_statistics(model: nn.Module) -> None:
    """Every normalisation layer of ``model`` in eval mode: it normalises with the running
    statistics of the data it was trained on and stops updating them (its affine parameters still
    train). Without this, a stage's batches move the statistics towards the new domain, and the
    earlier data are normalised with a mix at test time."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.eval()


def expand_classifier(classifier: nn.Linear, seed: int = 0) -> nn.Linear:
    """``n`` -> ``n + 1`` outputs: the first ``n`` copied, the extra "unknown" one freshly
    initialised (sec. 3.3) as ``nn.Linear`` does, U(-1/sqrt(in), 1/sqrt(in)), from ``seed``:
    the global generator would make the stage differ from run to run."""
    grown = nn.Linear(classifier.in_features, classifier.out_features + 1).to(classifier.weight.device)
    bound = classifier.in_features ** -0.5
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        grown.weight[:-1].copy_(classifier.weight)
        grown.bias[:-1].copy_(classifier.bias)
        grown.weight[-1].copy_((torch.rand(classifier.in_features, generator=g) * 2 - 1) * bound)
        grown.bias[-1].copy_((torch.rand((), generator=g) * 2 - 1) * bound)
    return grown


def known_class(class_logits: torch.Tensor, n_known: int, threshold: float = 0.5) -> torch.Tensor:
    """The classifier's verdict per object: a known class id when its softmax probability is the
    largest of the ``n_known + 1`` outputs and at least ``threshold``, else -1 (unknown)."""
    probs = F.softmax(class_logits, dim=1)
    best, idx = probs.max(dim=1)
    known = (idx < n_known) & (best >= threshold)
    return torch.where(known, idx, torch.full_like(idx, -1))
