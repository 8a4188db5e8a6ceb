"""Test-time adaptation as Lightning callbacks (paper A, sec. 3.2, Algorithm 1).

- :class:`ImageAdaptation` (IA): after every click, ``steps`` Adam steps on Eq. 4, then the
  prediction; the weights return to where the image started once it is finished.
- :class:`SequenceAdaptation` (SA): after every finished image, one step on Eq. 4 with all its
  clicks in the loss and a random subsample of them as guidance; the weights carry over.
- Both together (IA+SA): IA restores the image's starting weights first (it is listed first),
  then SA takes its step from them, so IA always starts from the SA weights.

The benchmark runs them under ``Trainer(inference_mode=False)``; gradients are taken inside
``torch.enable_grad()``; the module stays in eval mode, so normalisation layers use their
running statistics (batch size 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist

from modules.adaptation import adaptation_loss, add_mas_gradient, select_parameters
from modules.errors import UserError


def importance_path(ckpt: str | Path) -> Path:
    """Where the MAS importance of a checkpoint is stored: beside it."""
    ckpt = Path(ckpt)
    return ckpt.with_name(ckpt.name + ".mas.pt")


class _Adaptation(pl.Callback):
    def __init__(self, lr: float, lam: float, gamma: float, parameters: str = "all"):
        if lr <= 0:
            raise UserError(f"lr={lr}: expected a positive learning rate")
        if not 0 <= lam <= 1:
            raise UserError(f"lam={lam}: expected a value in [0, 1]")
        if gamma < 0:
            raise UserError(f"gamma={gamma}: expected a value >= 0")
        self.lr, self.lam, self.gamma, self.parameters = lr, lam, gamma, parameters

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        try:
            self.params = select_parameters(pl_module, self.parameters)
        except ValueError as e:
            raise UserError(str(e)) from e
        self.names = list(self.params)
        if not getattr(pl_module, "_adaptation_configured", False):  # the first callback freezes all,
            for p in pl_module.parameters():  # each then frees its own subset: gradients reach only those
                p.requires_grad_(False)
            pl_module._adaptation_configured = True
        for p in self.params.values():
            p.requires_grad_(True)
        self.importance = None
        if self.gamma > 0:
            importance = pl_module.mas_importance
            if importance is None:
                raise UserError(
                    "MAS importance missing for this checkpoint: compute it with "
                    "`python -m lightning_app importance --ckpt CKPT` (or set gamma: 0)"
                )
            self.importance = {n: importance[n].to(p.device) for n, p in self.params.items()}
        # theta*: the weights the checkpoint came with (MAS pulls towards them)
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}

    def _backward(self, logits: torch.Tensor, clicks: torch.Tensor, previous: torch.Tensor | None) -> None:
        """Gradients of Eq. 4 into the adapted parameters (the MAS term added analytically)."""
        prev_mask = None if previous is None else (previous > 0.5).float()
        adaptation_loss(logits, clicks, prev_mask, self.lam).backward()
        if self.importance is not None:
            add_mas_gradient(self.params, self.anchor, self.importance, self.gamma)


class ImageAdaptation(_Adaptation):
    """IA: ``steps`` Adam steps on Eq. 4 after every click; weights reset after each image.

    Args:
        steps: gradient steps per click (paper: 10).
        lr: Adam learning rate.
        lam: weight of the corrections vs the previous prediction (paper: 1).
        gamma: weight of the MAS penalty (paper: 1).
        parameters: ``all``, ``decoder`` or a regular expression over parameter names.
        cache: compute the frozen part once per click and adapt on its cached output:
            ``encoder`` (the adapted parameters must lie outside the encoder) or ``decoder``
            (only the 1x1 head may adapt): the fast variants.
    """

    def __init__(self, steps: int = 10, lr: float = 1e-4, lam: float = 1.0, gamma: float = 1.0,
                 parameters: str = "all", cache: Literal["none", "encoder", "decoder"] = "none"):
        super().__init__(lr, lam, gamma, parameters)
        if steps < 1:
            raise UserError(f"steps={steps}: expected at least 1")
        self.steps, self.cache = steps, cache

    def setup(self, trainer, pl_module, stage) -> None:
        super().setup(trainer, pl_module, stage)
        adaptable = {
            "none": lambda n: True,
            "encoder": lambda n: not n.startswith("net.encoder."),
            "decoder": lambda n: n.startswith("net.head."),
        }[self.cache]
        cached = [n for n in self.names if not adaptable(n)]
        if cached:
            raise UserError(f"cache={self.cache} cannot adapt '{cached[0]}' (selected by parameters='{self.parameters}'): "
                            "it is inside the cached part")
        pl_module.click_hooks.append(self.on_click)

    def teardown(self, trainer, pl_module, stage) -> None:
        if self.on_click in pl_module.click_hooks:
            pl_module.click_hooks.remove(self.on_click)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.start = {n: p.detach().clone() for n, p in self.params.items()}
        self.optimizer = torch.optim.Adam(self.params.values(), lr=self.lr)

    def on_click(self, predictor, clicks: torch.Tensor) -> None:
        predictor.cache = self.cache
        if predictor.previous is None and self.lam < 1:  # Algorithm 1's p: the prediction before any click
            with torch.no_grad():
                predictor.previous = predictor.logits(clicks[:, :0]).sigmoid()
        with torch.enable_grad():
            for _ in range(self.steps):
                self.optimizer.zero_grad(set_to_none=True)
                self._backward(predictor.logits(clicks), clicks, predictor.previous)
                self.optimizer.step()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.start[n])


class SequenceAdaptation(_Adaptation):
    """SA: one Adam step on Eq. 4 after every finished image; the weights carry over.

    Args:
        lr: Adam learning rate.
        lam: weight of the corrections vs the predicted mask (paper: 0.5).
        gamma: weight of the MAS penalty (paper: 2).
        parameters: ``all``, ``decoder`` or a regular expression over parameter names.
        guidance_ratio: fraction of the image's clicks given to the network as guidance in the
            step (at least one; the loss always uses all of them), sec. 3.2.2.
        synchronize: under DDP, average the gradients of all ranks in every step, so one
            sequence of weights is learnt from all ranks' images; otherwise each rank adapts
            along its own share of the sequence.
        seed: seed of the guidance subsampling.
    """

    def __init__(self, lr: float = 1e-4, lam: float = 0.5, gamma: float = 2.0, parameters: str = "all",
                 guidance_ratio: float = 0.5, synchronize: bool = False, seed: int = 0):
        super().__init__(lr, lam, gamma, parameters)
        if not 0 < guidance_ratio <= 1:
            raise UserError(f"guidance_ratio={guidance_ratio}: expected a value in (0, 1]")
        self.guidance_ratio, self.synchronize, self.seed = guidance_ratio, synchronize, seed

    def setup(self, trainer, pl_module, stage) -> None:
        super().setup(trainer, pl_module, stage)
        self.optimizer = torch.optim.Adam(self.params.values(), lr=self.lr)
        self.rng = np.random.default_rng([self.seed, trainer.global_rank])

    def guidance(self, clicks: torch.Tensor) -> torch.Tensor:
        """A random subsample of ``clicks`` ``(1, N, 3)``, in their original order."""
        n = clicks.shape[1]
        k = max(1, int(round(self.guidance_ratio * n)))
        keep = np.sort(self.rng.choice(n, size=k, replace=False))
        return clicks[:, torch.as_tensor(keep)]

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        predictor = pl_module.current_predictor
        clicks = predictor.net_clicks(outputs.clicks)
        predictor.cache = "none"
        with torch.enable_grad():
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(predictor.logits(self.guidance(clicks)), clicks, predictor.previous)
            if self.synchronize and dist.is_available() and dist.is_initialized():
                world = dist.get_world_size()
                for p in self.params.values():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= world
            self.optimizer.step()
