"""Learning from corrections at test time (paper A, sec. 3.2, Eq. 2-4), as pure functions.

The Lightning callbacks in ``callbacks.adaptation`` only decide *when* these run.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
from torch import nn

from modules.losses import masked_bce


def correction_targets(clicks: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The label vector ``c`` of Eq. 2 as maps: target 1/0 at positive/negative click pixels,
    ``valid`` marks the corrected pixels (all others are ignored). ``clicks``: ``(B, N, 3)``."""
    b = clicks.shape[0]
    target = clicks.new_zeros(b, 1, *hw)
    valid = torch.zeros(b, 1, *hw, dtype=torch.bool, device=clicks.device)
    for i in range(b):
        rows = clicks[i][clicks[i, :, 2] != 0]
        ys = rows[:, 0].round().long().clamp(0, hw[0] - 1)
        xs = rows[:, 1].round().long().clamp(0, hw[1] - 1)
        valid[i, 0, ys, xs] = True
        target[i, 0, ys, xs] = (rows[:, 2] > 0).to(target.dtype)
    return target, valid


def mas_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], importance: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 3: ``sum Omega * (theta - theta*)^2`` over the given parameters."""
    total = None
    for name, p in params.items():
        term = (importance[name] * (p - anchor[name]) ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("mas_penalty needs at least one parameter")
    return total


def add_mas_gradient(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                     importance: dict[str, torch.Tensor], gamma: float) -> None:
    """Add the gradient of ``gamma * mas_penalty`` to ``p.grad`` in place:
    ``2 * gamma * Omega * (theta - theta*)``. Same result as backpropagating the penalty, without
    building a graph over every parameter (the expensive part of a test-time step)."""
    with torch.no_grad():
        for name, p in params.items():
            g = (2.0 * gamma) * importance[name] * (p - anchor[name])
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)


def adaptation_loss(logits: torch.Tensor, clicks: torch.Tensor, previous: torch.Tensor | None, lam: float) -> torch.Tensor:
    """Eq. 4 without its MAS term: ``lam * GCE(corrections) + (1 - lam) * CE(previous prediction)``.

    ``logits`` and ``clicks`` share one resolution; ``previous`` is the binary mask predicted
    before the latest correction (``None`` before the first prediction: the term is dropped).
    The MAS term ``gamma * L_F`` enters through :func:`add_mas_gradient` (or :func:`mas_penalty`).
    """
    target, valid = correction_targets(clicks, logits.shape[-2:])
    loss = lam * masked_bce(logits, target, valid)
    if previous is not None and lam < 1:
        loss = loss + (1 - lam) * masked_bce(logits, previous.to(logits.dtype))
    return loss


def select_parameters(model: nn.Module, which: str) -> dict[str, nn.Parameter]:
    """The parameters that adapt: ``all``, ``decoder`` (everything outside ``net.encoder``),
    or a regular expression matched against parameter names."""
    named = dict(model.named_parameters())
    if which == "all":
        chosen = named
    elif which == "decoder":
        chosen = {n: p for n, p in named.items() if not n.startswith("net.encoder.")}
    else:
        try:
            pattern = re.compile(which)
        except re.error as e:
            raise ValueError(f"parameters='{which}': not 'all', 'decoder' or a valid regular expression ({e})") from e
        chosen = {n: p for n, p in named.items() if pattern.search(n)}
    if not chosen:
        raise ValueError(f"parameters='{which}' selects no parameter of the model")
    return chosen


def mas_importance(
    model: nn.Module, outputs: Callable[[object], torch.Tensor], batches: Iterable[object], normalise: bool = True
) -> dict[str, torch.Tensor]:
    """Memory Aware Synapses (Aljundi et al. 2018): per parameter, the mean over samples of
    ``|d ||f(x)||^2 / d theta|``, with ``f`` the predicted foreground probabilities (mean over
    pixels). ``normalise`` scales the importances to mean 1 over all parameters, so that
    ``gamma`` reads as the strength of an average-weighted L2 pull towards the initial weights.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        probs = outputs(batch)  # (B, 1, H, W)
        probs.pow(2).mean(dim=(1, 2, 3)).sum().backward()
        for n, p in params.items():
            if p.grad is not None:
                total[n] += p.grad.abs()
        count += probs.shape[0]
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError("MAS importance needs at least one sample")
    importance = {n: t / count for n, t in total.items()}
    if normalise:
        mean = torch.cat([t.flatten() for t in importance.values()]).mean().clamp_min(1e-12)
        importance = {n: t / mean for n, t in importance.items()}
    return importance
