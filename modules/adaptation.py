"""Learning from corrections at test time (paper A, sec. 3.2, Eq. 2-4, Algorithm 1).

The equations are pure functions; :class:`Adapter` carries out image adaptation (IA), sequence
adaptation (SA) or both on a model, and an :class:`~modules.session.InteractiveSession` calls it:
before every prediction (IA's steps) and when an image is finished (IA's reset, SA's step).
Nothing here knows about Lightning; the benchmark's callbacks and the annotation app drive the
same objects.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, Iterable, Literal

import numpy as np
import torch
from torch import nn

from modules.errors import UserError, check
from modules.losses import masked_bce

if TYPE_CHECKING:
    from modules.session import Box, InteractiveSession

Cache = Literal["none", "encoder", "decoder"]


# -- Eq. 2-4 and MAS ----------------------------------------------------------------------------
def correction_targets(clicks: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The label vector ``c`` of Eq. 2 as maps: target 1/0 at positive/negative click pixels,
    ``valid`` marks the corrected pixels (all others are ignored). ``clicks``: ``(B, N, 3)``;
    clicks outside ``hw`` (outside a zoom-in view) label nothing."""
    b = clicks.shape[0]
    target = clicks.new_zeros(b, 1, *hw)
    valid = torch.zeros(b, 1, *hw, dtype=torch.bool, device=clicks.device)
    for i in range(b):
        rows = clicks[i][clicks[i, :, 2] != 0]
        ys, xs = rows[:, 0].round().long(), rows[:, 1].round().long()
        inside = (ys >= 0) & (ys < hw[0]) & (xs >= 0) & (xs < hw[1])
        rows, ys, xs = rows[inside], ys[inside], xs[inside]
        valid[i, 0, ys, xs] = True
        target[i, 0, ys, xs] = (rows[:, 2] > 0).to(target.dtype)
    return target, valid


def corrections_respected(logits: torch.Tensor, clicks: torch.Tensor) -> bool:
    """Whether every clicked pixel is predicted with its label (the paper's "the updated model
    respects the user corrections")."""
    target, valid = correction_targets(clicks, logits.shape[-2:])
    return bool(((logits > 0) == (target > 0.5))[valid].all())


def adaptation_loss(logits: torch.Tensor, clicks: torch.Tensor, previous: torch.Tensor | None, lam: float) -> torch.Tensor:
    """Eq. 4 without its MAS term: ``lam * GCE(corrections) + (1 - lam) * CE(previous mask)``.

    ``logits`` and ``clicks`` share one resolution; ``previous`` is the binary mask ``p``
    predicted before the latest correction (``None``: the term is dropped). The MAS term
    ``gamma * L_F`` enters through :func:`add_mas_gradient` (or :func:`mas_penalty`).
    """
    target, valid = correction_targets(clicks, logits.shape[-2:])
    loss = lam * masked_bce(logits, target, valid)
    if previous is not None and lam < 1:
        loss = loss + (1 - lam) * masked_bce(logits, previous.to(logits.dtype))
    return loss


def mas_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], importance: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 3: ``sum Omega * (theta - theta*)^2`` over the given parameters."""
    return sum((importance[n] * (p - anchor[n]) ** 2).sum() for n, p in params.items())


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


def mas_importance(model: nn.Module, outputs: Callable[[object], torch.Tensor], batches: Iterable[object]) -> dict[str, torch.Tensor]:
    """Memory Aware Synapses (Aljundi et al. 2018, Eq. 2-4): per parameter, the mean over samples
    of ``|d ||F(x)||_2^2 / d theta|`` with ``F`` the network's output, here the foreground logits
    at every pixel of the network's input resolution (so ``Omega`` grows with that resolution;
    ``gamma`` is tuned for it). No normalisation."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for batch in batches:
        out = outputs(batch)  # (B, 1, H, W) logits
        for i in range(out.shape[0]):  # one gradient per sample: the absolute values do not add up linearly
            model.zero_grad(set_to_none=True)
            out[i].pow(2).sum().backward(retain_graph=i < out.shape[0] - 1)
            for n, p in params.items():
                if p.grad is not None:
                    total[n] += p.grad.abs()
            count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError("MAS importance needs at least one sample")
    return {n: t / count for n, t in total.items()}


def select_parameters(model: nn.Module, which: str) -> dict[str, nn.Parameter]:
    """The parameters that adapt: ``all``, ``decoder`` (everything outside the encoder),
    ``head`` (the final 1x1 classifier), ``norm`` (the affine parameters of normalisation
    layers), or a regular expression over parameter names."""
    named = dict(model.named_parameters())
    if which == "all":
        chosen = named
    elif which == "decoder":
        encoder = {id(p) for p in model.net.encoder.parameters()}
        chosen = {n: p for n, p in named.items() if id(p) not in encoder}
    elif which == "head":
        head = {id(p) for p in model.net.head.parameters()}
        chosen = {n: p for n, p in named.items() if id(p) in head}
    elif which == "norm":
        norms = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for p in m.parameters()}
        chosen = {n: p for n, p in named.items() if id(p) in norms}
    else:
        try:
            pattern = re.compile(which)
        except re.error as e:
            raise UserError(f"parameters='{which}': not 'all', 'decoder', 'head', 'norm' or a valid regular expression ({e})") from e
        chosen = {n: p for n, p in named.items() if pattern.search(n)}
    if not chosen:
        raise UserError(f"parameters='{which}' selects no parameter of the model")
    return chosen


# -- the two kinds of adaptation ----------------------------------------------------------------
@dataclass(frozen=True)
class ImageAdaptation:
    """IA (sec. 3.2.1, Algorithm 1): after every click, up to ``steps`` Adam steps on Eq. 4 with
    all the image's clicks as labels, then the prediction; the weights go back to where the
    image started once it is finished.

    Args:
        steps: gradient steps per click (paper: 10).
        lr: Adam learning rate (paper: 1e-6; 1e-5 for DRIONS-DB).
        lam: weight of the corrections against the previous prediction ``p`` (paper: 1).
        gamma: weight of the MAS penalty (paper: 1).
        parameters: which parameters adapt (see :func:`select_parameters`).
        cache: compute the frozen part once per click and adapt on its output: ``encoder``
            (the adapted parameters must lie outside the encoder) or ``decoder`` (only the 1x1
            head may adapt).
        until_respected: stop a click's steps as soon as every clicked pixel is predicted with
            its label (no step at all when it already is).
        anchor: ``theta*`` of the MAS term: the ``checkpoint``'s weights, or with SA the
            sequence's weights at the start of the image (``image``).
    """

    steps: int = 10
    lr: float = 1e-6
    lam: float = 1.0
    gamma: float = 1.0
    parameters: str = "all"
    cache: Cache = "none"
    until_respected: bool = False
    anchor: Literal["checkpoint", "image"] = "checkpoint"

    def __post_init__(self):
        check(self.steps >= 1, f"image.steps={self.steps}: expected at least 1")
        check(self.lr > 0, f"image.lr={self.lr}: expected a positive learning rate")
        check(0 <= self.lam <= 1, f"image.lam={self.lam}: expected a value in [0, 1]")
        check(self.gamma >= 0, f"image.gamma={self.gamma}: expected a value >= 0")
        check(self.cache in ("none", "encoder", "decoder"), f"image.cache='{self.cache}': expected none, encoder or decoder")
        check(self.anchor in ("checkpoint", "image"), f"image.anchor='{self.anchor}': expected checkpoint or image")


@dataclass(frozen=True)
class SequenceAdaptation:
    """SA (sec. 3.2.2): after every finished image, one Adam step on Eq. 4 with all its clicks in
    the loss; the weights carry over to the next image.

    What the network sees in that step (``inputs``): ``guidance`` is the paper's, a random
    ``guidance_ratio`` of the clicks and no previous mask; ``states`` replays ``states`` of the
    inputs the network had while the user clicked (the first click alone, then ``states - 1``
    later click states drawn at random, each with the mask predicted before it): a model that
    reads its previous mask (RITM) is then adapted where it is used, on corrections, not only
    on first clicks.

    Args:
        lr: Adam learning rate (paper: 1e-6; 1e-5 for DRIONS-DB).
        lam: weight of the corrections against the final predicted mask (paper: 0.5).
        gamma: weight of the MAS penalty (paper: 2).
        parameters: which parameters adapt (see :func:`select_parameters`).
        inputs: ``guidance`` (the paper's) or ``states`` (see above).
        guidance_ratio: fraction of the clicks given as guidance (at least one; ``guidance``).
        states: click states replayed per step (``states``): the first, and ``states - 1`` drawn
            among the later ones.
        seed: seed of the guidance subsampling and the state draw.
        synchronize: under DDP, average the gradients of all ranks in every step (one sequence
            of weights learnt from every rank's images); otherwise each rank adapts along its
            own share of the sequence.
        optimizer: ``adam`` (the paper's) or ``sgd``. Adam's step is invariant to the gradient's
            scale: an image the model already segments moves the weights about as far as one it
            fails on; SGD's step is the gradient's (``configs/adapt/sa_sgd.yaml``: the tuning
            data's choice against in-domain drift).
    """

    lr: float = 1e-6
    lam: float = 0.5
    gamma: float = 2.0
    parameters: str = "all"
    inputs: Literal["guidance", "states"] = "guidance"
    guidance_ratio: float = 0.5
    states: int = 2
    seed: int = 0
    synchronize: bool = False
    optimizer: Literal["adam", "sgd"] = "adam"

    def __post_init__(self):
        check(self.lr > 0, f"sequence.lr={self.lr}: expected a positive learning rate")
        check(self.optimizer in ("adam", "sgd"), f"sequence.optimizer='{self.optimizer}': expected adam or sgd")
        check(0 <= self.lam <= 1, f"sequence.lam={self.lam}: expected a value in [0, 1]")
        check(self.gamma >= 0, f"sequence.gamma={self.gamma}: expected a value >= 0")
        check(0 < self.guidance_ratio <= 1, f"sequence.guidance_ratio={self.guidance_ratio}: expected a value in (0, 1]")
        check(self.inputs in ("guidance", "states"), f"sequence.inputs='{self.inputs}': expected guidance or states")
        check(self.states >= 1, f"sequence.states={self.states}: expected at least 1")


def sequence_optimizer(params: Iterable[torch.Tensor], sa: SequenceAdaptation) -> torch.optim.Optimizer:
    """SA's optimizer, kept for the whole sequence."""
    if sa.optimizer == "sgd":
        return torch.optim.SGD(params, lr=sa.lr)
    return torch.optim.Adam(params, lr=sa.lr)


def settings(cls, values: dict, where: str):
    """``cls(**values)`` with a one-line error naming an unknown key."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown} (expected some of {sorted(known)})")
    return cls(**values)


def snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def restore(params: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])


def finite(params: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params.values())


class Adapter:
    """IA, SA or both (sec. 3.2.3) on one model over a sequence of images.

    IA+SA is one composition: each image starts from the sequence's weights, IA adapts inside
    it, the image's end restores the sequence's weights and SA takes its step from them.

    A step whose loss, gradients or resulting weights are not finite is rolled back and counted
    in ``rollbacks`` (a learning rate that blows the weights up is reported, not scored).

    Args:
        model: the interactive model (an ``InteractiveSegmentationModule``).
        image: IA's settings, or ``None``.
        sequence: SA's settings, or ``None``.
        importance: MAS importance per parameter name (needed when a gamma is > 0).
        rank: the process's rank (seeds SA's guidance subsampling).
        reduce_gradients: called on SA's parameters before each SA step when
            ``sequence.synchronize`` (DDP: average the gradients across ranks).
    """

    def __init__(self, model: nn.Module, image: ImageAdaptation | None = None, sequence: SequenceAdaptation | None = None,
                 importance: dict[str, torch.Tensor] | None = None, rank: int = 0,
                 reduce_gradients: Callable[[Iterable[torch.Tensor]], None] | None = None):
        self.model, self.image, self.sequence = model, image, sequence
        self.reduce_gradients = reduce_gradients
        self.ia_params = select_parameters(model, image.parameters) if image else {}
        self.sa_params = select_parameters(model, sequence.parameters) if sequence else {}
        if image and image.cache != "none":
            frozen = {id(p) for m in model.net.cached_modules(image.cache) for p in m.parameters()}
            inside = [n for n, p in self.ia_params.items() if id(p) in frozen]
            if inside:
                raise UserError(f"image.cache={image.cache} cannot adapt '{inside[0]}' (selected by "
                                f"parameters='{image.parameters}'): it is inside the cached part")
        adapted = self.ia_params | self.sa_params
        needs_importance = (image and image.gamma > 0) or (sequence and sequence.gamma > 0)
        if needs_importance and importance is None:
            raise UserError("MAS importance missing for this checkpoint: compute it with "
                            "`python -m lightning_app importance --ckpt CKPT` (or set gamma: 0)")
        self.importance = {n: importance[n].to(p.device) for n, p in adapted.items()} if needs_importance else None
        self.checkpoint = snapshot(adapted)  # theta*: the weights the checkpoint came with
        self.sa_optimizer = sequence_optimizer(self.sa_params.values(), sequence) if sequence else None
        self.rng = np.random.default_rng([sequence.seed if sequence else 0, rank])
        self.rollbacks = 0
        self.ia_steps = 0
        self._click_start: dict[str, torch.Tensor] | None = None  # IA's weights before the latest click
        self._sequence_before: dict[str, torch.Tensor] | None = None  # SA's weights before its latest step

    # -- the session's calls ---------------------------------------------------------------------
    def begin(self, session: "InteractiveSession") -> None:
        """A new image: only the adapted parameters take gradients; IA starts from the current
        weights with a fresh optimizer."""
        adapted = {id(p) for p in (self.ia_params | self.sa_params).values()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in adapted)
        if self.image:
            self.image_start = snapshot(self.ia_params)
            self.ia_optimizer = torch.optim.Adam(self.ia_params.values(), lr=self.image.lr)

    def begin_again(self) -> None:
        """Back to the image's start (``undo``: the remaining clicks' steps are replayed)."""
        if self.image:
            restore(self.ia_params, self.image_start)
            self.ia_optimizer = torch.optim.Adam(self.ia_params.values(), lr=self.image.lr)
            self._click_start = None

    def on_click(self, session: "InteractiveSession") -> None:
        """IA's steps for the latest click (Algorithm 1, lines 12-14)."""
        if not self.image:
            return
        ia = self.image
        clicks = session.net_clicks()
        previous = (session.previous_probability() > 0.5).float() if ia.lam < 1 else None
        anchor = self.image_start if ia.anchor == "image" else self.checkpoint
        before = self._click_start = snapshot(self.ia_params)
        with torch.enable_grad():
            for _ in range(ia.steps):
                self.ia_optimizer.zero_grad(set_to_none=True)
                logits = session.logits(cache=ia.cache)
                if ia.until_respected and corrections_respected(logits.detach(), clicks):
                    break
                if not self._step(self.ia_optimizer, self.ia_params, adaptation_loss(logits, clicks, previous, ia.lam),
                                  ia.gamma, anchor, before):
                    break
                self.ia_steps += 1

    def end(self, session: "InteractiveSession", upto: int | None = None) -> None:
        """The image is finished: IA's weights go back to the image's start, then SA takes one
        step on the first ``upto`` clicks (all by default: Algorithm 1's user stops at the
        target IoU, and SA learns from the clicks made until then)."""
        if self.image:
            restore(self.ia_params, self.image_start)
        n = len(session.clicks) if upto is None else min(upto, len(session.clicks))
        if not self.sequence or n == 0:  # nothing to learn from (an image left without accepting)
            return
        sa = self.sequence
        self._sequence_before = snapshot(self.sa_params)
        with torch.enable_grad():
            self.sa_optimizer.zero_grad(set_to_none=True)
            states = self._sa_states(session, n)
            loss = 0
            for view, keep, after in states:  # each state as the network saw it: in its own view
                with session.seen_in(view):
                    clicks = session.net_clicks()[:, :n]
                    previous = (session.probability_after(n) > 0.5).float()
                    prev = session.probability_after(after) if after is not None else False
                    loss = loss + adaptation_loss(session.logits(clicks=clicks[:, keep], prev=prev), clicks, previous, sa.lam)
            self._step(self.sa_optimizer, self.sa_params, loss / len(states), sa.gamma,
                       self.checkpoint, self._sequence_before, reduce=sa.synchronize)

    def _sa_states(self, session: "InteractiveSession", n: int) -> list[tuple["Box", torch.Tensor, int | None]]:
        """The inputs of SA's step on the image's first ``n`` clicks, as (view, which clicks,
        after how many clicks the previous-mask input was predicted, ``None`` for none)."""
        sa = self.sequence
        if sa.inputs == "guidance":  # no previous-mask input: the network propagates the sparse guidance by appearance
            k = max(1, int(round(sa.guidance_ratio * n)))
            return [(session.view, torch.as_tensor(np.sort(self.rng.choice(n, size=k, replace=False))), None)]
        calls = [i for i, c in enumerate(session.counts) if c <= n] or [0]
        later = calls[1:]
        drawn = sorted(self.rng.choice(later, size=min(sa.states - 1, len(later)), replace=False)) if later else []
        return [(session.views[i], torch.arange(min(session.counts[i], n)), session.counts[i - 1] if i else None)
                for i in [calls[0], *drawn]]

    def recover(self) -> bool:
        """A prediction came out non-finite: undo the most recent adaptation (IA's steps for the
        latest click, else SA's latest step) and count a rollback. ``False`` when nothing is
        left to undo."""
        if self._click_start is not None:
            restore(self.ia_params, self._click_start)
            self.ia_optimizer.state.clear()
            self._click_start = None
        elif self._sequence_before is not None:
            restore(self.sa_params, self._sequence_before)
            self.sa_optimizer.state.clear()
            self._sequence_before = None
            if self.image:
                self.image_start = snapshot(self.ia_params)
        else:
            return False
        self.rollbacks += 1
        return True

    # -- one guarded step ------------------------------------------------------------------------
    def _step(self, optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor], loss: torch.Tensor, gamma: float,
              anchor: dict[str, torch.Tensor], before: dict[str, torch.Tensor], reduce: bool = False) -> bool:
        """Backward, the MAS gradient, the step; rolled back to ``before`` (and ``False``
        returned) when anything is not finite."""
        if torch.isfinite(loss):
            loss.backward()
            if gamma > 0:
                add_mas_gradient(params, anchor, self.importance, gamma)
            if reduce and self.reduce_gradients is not None:
                self.reduce_gradients([p for p in params.values()])
            if all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params.values()):
                optimizer.step()
                if finite(params):
                    return True
        restore(params, before)
        optimizer.state.clear()
        self.rollbacks += 1
        return False
