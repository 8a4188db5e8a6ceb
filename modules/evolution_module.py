"""One evolution stage of paper B (sec. 3.3) as a LightningModule.

It trains an :class:`InteractiveSegmentationModule` (the ``model``, from the previous stage's
weights) on pairs: an object of the new dataset with its pseudo mask (``b``) and an object of
the earlier data (``a``). The losses are ``modules.evolution``'s; this class only wires them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from modules.evolution import expand_classifier, feature_alignment_loss, max_squares_loss, replay_weight
from modules.interactive import InteractiveSegmentationModule, aux_losses, poly_lr_factor
from modules.io import atomic_write
from modules.losses import masked_bce


class EvolutionModule(pl.LightningModule):
    """Evolve ``model`` on one new dataset (Eq. 11 per pair, plus the heads' supervision).

    Args:
        model: hyperparameters of the :class:`InteractiveSegmentationModule` being evolved
            (with ``num_classes`` = known classes + 1).
        known_classes: ``n``, the classes of the initial dataset; output ``n`` is "unknown".
        feature_alignment: add Eq. 7/8 and the maximum-squares loss (the FA module); without
            it the stage is plain self-training on the pseudo masks.
        lr: SGD learning rate (polynomial decay over the stage).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        poly_power: power of the learning-rate decay.
        replay_final_weight: the earlier data's loss weight decays linearly to this.
    """

    def __init__(self, model: dict, known_classes: int, feature_alignment: bool = True, lr: float = 0.002,
                 momentum: float = 0.9, weight_decay: float = 5e-4, poly_power: float = 0.9,
                 replay_final_weight: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.model = InteractiveSegmentationModule(**model)

    @classmethod
    def from_previous(cls, previous: InteractiveSegmentationModule, known_classes: int, **kwargs) -> "EvolutionModule":
        """A stage that starts from ``previous``'s weights; after the initial stage the
        classifier gains the "unknown" output."""
        hparams = dict(previous.hparams)
        classifier = previous.net.classifier
        if classifier.out_features == known_classes:
            previous.net.classifier = expand_classifier(classifier)
        elif classifier.out_features != known_classes + 1:
            raise ValueError(f"classifier has {classifier.out_features} outputs; expected {known_classes} or {known_classes + 1}")
        hparams["num_classes"] = known_classes + 1
        stage = cls(hparams, known_classes, **kwargs)
        stage.model.load_state_dict(previous.state_dict())
        return stage

    def _progress(self) -> float:
        total = self.trainer.estimated_stepping_batches
        return self.global_step / total if math.isfinite(total) and total > 0 else 0.0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        a, b = batch["a"], batch["b"]
        model = self.model
        rng = np.random.default_rng([torch.initial_seed(), self.global_step])  # the step's click jitter
        out_a = model.outputs(a["image"], model.initial_clicks(a, rng))
        out_b = model.outputs(b["image"], model.initial_clicks(b, rng))
        valid_a = ~a["ignore"]
        loss_a = masked_bce(out_a["logits"], a["mask"], valid_a) + sum(aux_losses(out_a, a["mask"], valid_a, a["class_id"]).values())
        loss_b = masked_bce(out_b["logits"], b["mask"]) + aux_losses(out_b, b["mask"], ~b["ignore"], b["class_id"])["binary_bce"]
        weight = replay_weight(self._progress(), self.hparams.replay_final_weight)
        loss = weight * loss_a + loss_b
        logs = {"loss_a": loss_a, "loss_b": loss_b, "replay_weight": weight}
        if self.hparams.feature_alignment:
            known = b["pair_class"] >= 0
            feats_a = F.normalize(out_a["features"], dim=1)
            feats_b = F.normalize(out_b["features"], dim=1)
            hw = feats_b.shape[-2:]
            down = lambda m: F.adaptive_avg_pool2d(m.float(), hw)[:, 0]  # noqa: E731 (area-weighted object mask)
            binary_b = torch.sigmoid(F.interpolate(out_b["binary"], size=hw, mode="bilinear", align_corners=False))[:, 0]
            logs["feature_alignment"] = feature_alignment_loss(feats_a, down(a["mask"] * valid_a), feats_b, down(b["mask"]),
                                                               binary_b, known)
            logs["max_squares"] = max_squares_loss(torch.sigmoid(out_b["binary"]), known)
            loss = loss + logs["feature_alignment"] + logs["max_squares"]
        self.log_dict({f"evolve/{k}": v for k, v in logs.items()}, batch_size=len(b["image"]))
        self.log("evolve/loss", loss, prog_bar=True, batch_size=len(b["image"]))
        return loss

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: poly_lr_factor(s, total, h.poly_power))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, path: str | Path) -> Path:
        """Write the evolved model as a plain :class:`InteractiveSegmentationModule` checkpoint
        (atomically), which every other command (benchmark, adaptation) reads."""
        checkpoint = {"state_dict": self.model.state_dict(), "hyper_parameters": dict(self.model.hparams),
                      "pytorch-lightning_version": pl.__version__}
        return atomic_write(path, lambda f: torch.save(checkpoint, f), mode="wb")
