"""One evolution stage of paper B (sec. 3.3) as a LightningModule.

It trains an :class:`InteractiveSegmentationModule` (the ``model``, from the previous stage's
weights) on pairs: an object of the new dataset with its pseudo mask (``b``) and an object of
the earlier data (``a``), and from the second stage on an object of an earlier stage with its
pseudo mask (``c``, replayed at ``a``'s weight). All go through the network in one batch, so that
normalisation sees the domains together as at test time. The mask loss of each object is the model's own
(``InteractiveSegmentationModule.mask_loss``, the one it was trained with), the other terms are
``modules.evolution``'s; this class only wires them, and logs every term's magnitude at every step.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from modules.evolution import (expand_classifier, feature_alignment_loss, feature_alignment_terms,
                               freeze_norm_statistics, max_squares_loss, replay_weight)
from modules.interactive import InteractiveSegmentationModule, aux_losses, poly_lr_factor
from modules.io import atomic_write


class EvolutionModule(pl.LightningModule):
    """Evolve ``model`` on one new dataset (Eq. 11 per pair, plus the heads' supervision).

    Args:
        model: hyperparameters of the :class:`InteractiveSegmentationModule` being evolved
            (with ``num_classes`` = known classes + 1).
        known_classes: ``n``, the classes of the initial dataset; output ``n`` is "unknown".
        feature_alignment: add Eq. 7/8 and the maximum-squares loss (the FA module); without
            it the stage is plain self-training on the pseudo masks.
        alignment_features: the features Eq. 7/8 align: the backbone's deepest (the paper's),
            unit-normalised per pixel (``deep_unit``, so each squared distance lies in [0, 4]) or
            raw (``deep``, the paper's literal: here ~100 for the global and ~1000 for the pixel
            term at the start of a stage against a BCE of ~0.3, which wiped out the source:
            3-click mIoU 77.1 -> 14.6 after the fundus stage), or the ``decoder``'s (stride 4).
        alignment_weight: weight of Eq. 7/8 in Eq. 11 (paper: 1).
        max_squares_weight: weight of Eq. 9/10 in Eq. 11 (paper: 1).
        unknown_terms: Eq. 8's terms for pairs of an unknown class (Table 5): ``global`` (the
            paper's), ``pixel``, or both.
        corrective_clicks: also train with 0..``max_iterative_clicks`` simulated corrective clicks
            after the three (the model is benchmarked with them too).
        lr: SGD learning rate (polynomial decay over the stage).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        poly_power: power of the learning-rate decay.
        replay_final_weight: the earlier data's loss weight moves linearly from 1 to this.
        warmup: share of the stage's steps over which the learning rate rises linearly from 0
            (on cells within the run-to-run spread: the source's dip after the first epoch comes
            from the new domain's batches, not the step size; README).
        freeze_norm: keep the normalisation statistics of the previous model through the stage
            (``modules.evolution.freeze_norm_statistics``); off, they follow the stage's batches
            as in any training.
    """

    def __init__(self, model: dict, known_classes: int, feature_alignment: bool = True,
                 alignment_features: str = "deep_unit", alignment_weight: float = 1.0, max_squares_weight: float = 1.0,
                 unknown_terms: tuple[str, ...] = ("global",), corrective_clicks: bool = True, lr: float = 0.002,
                 momentum: float = 0.9, weight_decay: float = 5e-4, poly_power: float = 0.9,
                 replay_final_weight: float = 0.1, warmup: float = 0.0, freeze_norm: bool = False):
        super().__init__()
        self.save_hyperparameters()
        if alignment_features not in ("deep_unit", "deep", "decoder"):
            raise ValueError(f"alignment_features='{alignment_features}': expected deep_unit, deep or decoder")
        self.model = InteractiveSegmentationModule(**model)

    @classmethod
    def from_previous(cls, previous: InteractiveSegmentationModule, known_classes: int, seed: int = 0,
                      **kwargs) -> "EvolutionModule":
        """A stage that starts from ``previous``'s weights; after the initial stage the
        classifier gains the "unknown" output (drawn from ``seed``)."""
        hparams = dict(previous.hparams)
        classifier = previous.net.classifier
        if classifier.out_features == known_classes:
            previous.net.classifier = expand_classifier(classifier, seed)
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
        c = batch.get("c")  # an earlier stage's object (``PairedObjects(stages=...)``), replayed as ``a`` is
        model, h = self.model, self.hparams
        n = len(a["image"])
        rng = np.random.default_rng([torch.initial_seed(), self.global_step])  # the step's jitter and clicks
        parts = [a, b] + ([c] if c is not None else [])
        both = {k: torch.cat([p[k] for p in parts]) for k in ("image", "mask", "ignore", "clicks")}
        clicks, prev = model.iterative_clicks(both, model.initial_clicks(both, rng), rng, late=h.corrective_clicks)
        if h.freeze_norm:  # after iterative_clicks, which puts the model back in training mode
            freeze_norm_statistics(model)
        out = model.outputs(both["image"], clicks, prev)  # one batch: normalisation sees every domain together
        rows = lambda i: slice(i * n, (i + 1) * n)  # noqa: E731 (part i's rows of the batch)
        heads = lambda i: {k: out[k][rows(i)] for k in ("binary", "classes")}  # noqa: E731
        valid = ~both["ignore"]
        split = lambda t: (t[:n], t[n:2 * n])  # noqa: E731 (the pair, for Eq. 7-10)

        def mask_loss(i: int, with_class: bool) -> torch.Tensor:
            """The model's own mask loss on part ``i`` (the one it was trained with), plus the
            binary predictor's BCE and, on data with true classes, the classifier's."""
            s, p = rows(i), parts[i]
            aux = aux_losses(heads(i), p["mask"], valid[s], p["class_id"])
            return model.mask_loss(out["logits"][s], p["mask"], valid[s], clicks[s]) + \
                (aux["binary_bce"] + aux["class_ce"] if with_class else aux["binary_bce"])

        loss_a, loss_b = mask_loss(0, with_class=True), mask_loss(1, with_class=False)  # b: a pseudo mask, a verdict
        weight = replay_weight(self._progress(), h.replay_final_weight)
        loss = weight * loss_a + loss_b
        logs = {"loss_a": loss_a, "loss_b": loss_b, "replay_weight": weight}
        if c is not None:  # an earlier stage's pseudo mask, at the replay's weight
            logs["loss_c"] = loss_c = mask_loss(2, with_class=False)
            loss = loss + weight * loss_c
        if h.feature_alignment:
            known = b["pair_class"] >= 0
            feats = out["features"] if h.alignment_features == "decoder" else out["deep"]
            if h.alignment_features == "deep_unit":
                feats = F.normalize(feats, dim=1)
            feats_a, feats_b = split(feats)
            hw = feats_b.shape[-2:]
            down = lambda m: F.adaptive_avg_pool2d(m.float(), hw)[:, 0]  # noqa: E731 (area-weighted object mask)
            heads_b = heads(1)
            binary_b = torch.sigmoid(F.interpolate(heads_b["binary"], size=hw, mode="bilinear", align_corners=False))[:, 0]
            global_term, pixel_term, present = feature_alignment_terms(feats_a, down(a["mask"] * valid[:n]), feats_b,
                                                                       down(b["mask"]), binary_b)
            alignment = feature_alignment_loss(global_term, pixel_term, present, known, h.unknown_terms)
            squares = max_squares_loss(torch.sigmoid(heads_b["binary"])[:, 0], F.softmax(heads_b["classes"], dim=1), known)
            loss = loss + h.alignment_weight * alignment + h.max_squares_weight * squares
            logs.update({"alignment": alignment, "alignment_global": global_term[present].mean() if present.any() else 0.0,
                         "alignment_pixel": pixel_term[present & known].mean() if (present & known).any() else 0.0,
                         "max_squares": squares, "known_pairs": known.float().mean()})
        self.log_dict({f"evolve/{k}": v for k, v in logs.items()}, batch_size=n)
        self.log("evolve/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: poly_lr_factor(s, total, h.poly_power, round(h.warmup * total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, path: str | Path) -> Path:
        """Write the evolved model as a plain :class:`InteractiveSegmentationModule` checkpoint
        (atomically), which every other command (benchmark, adaptation) reads."""
        checkpoint = {"state_dict": self.model.state_dict(), "hyper_parameters": dict(self.model.hparams),
                      "pytorch-lightning_version": pl.__version__}
        return atomic_write(path, lambda f: torch.save(checkpoint, f), mode="wb")
