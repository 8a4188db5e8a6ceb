"""The initial interactive-segmentation model as a LightningModule (paper A, sec. 3.1, 3.3).

It only wires the pure pieces together: the network (``modules.deeplab``), click encoding
(``modules.clicks``), user simulation (``modules.simulate``), the loss (``modules.losses``)
and the click-by-click evaluation (``modules.evaluation``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryJaccardIndex

from modules.adaptation import Adapter
from modules.classical import ClassicalSession
from modules.clicks import clicks_to_tensor, encode_clicks
from modules.deeplab import DeepLabV3Plus
from modules.errors import check
from modules.evaluation import ObjectResult, evaluate_object
from modules.losses import masked_bce, near_click_weights, normalized_focal_loss
from modules.session import InteractiveSession
from modules.simulate import corrective_clicks, next_click, perturb_mask, three_click_protocol

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = -1


@dataclass(frozen=True)
class EvaluationProtocol:
    """How ``test_step`` plays an object: ``max_clicks`` simulated clicks, and the IoU at which
    Algorithm 1's user would stop (the clicks until then are what sequence adaptation learns)."""

    max_clicks: int = 20
    target_iou: float = 0.9


def poly_lr_factor(step: int, total: int, power: float, warmup: int = 0) -> float:
    """Polynomial decay ``(1 - step / total) ** power`` (DeepLab's schedule), after a linear
    warm-up over the first ``warmup`` steps."""
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return ramp * max(0.0, 1.0 - step / max(1, total)) ** power


def aux_losses(out: dict[str, torch.Tensor], mask: torch.Tensor, valid: torch.Tensor, class_id: torch.Tensor) -> dict[str, torch.Tensor]:
    """Paper B's extra supervision: BCE of the binary predictor (upsampled to the mask) and
    cross-entropy of the classifier on the objects that have a class (``class_id >= 0``)."""
    binary = F.interpolate(out["binary"], size=mask.shape[-2:], mode="bilinear", align_corners=False)
    losses = {"binary_bce": masked_bce(binary, mask, valid)}
    known = class_id >= 0
    losses["class_ce"] = F.cross_entropy(out["classes"][known], class_id[known]) if known.any() else out["classes"].sum() * 0
    return losses


class InteractiveSegmentationModule(pl.LightningModule):
    """DeepLabV3+ on RGB + click maps, trained with pixel-wise BCE on simulated clicks.

    Args:
        backbone: timm model name of the encoder.
        output_stride: encoder output stride, 8 or 16.
        aspp_rates: ASPP dilation rates (paper: 12, 24, 36 at stride 8).
        aspp_channels: ASPP width.
        decoder_channels: decoder width.
        pretrained: start the encoder from timm's ImageNet weights (needs network).
        click_radius: click disk radius (or Gaussian sigma) in pixels at network resolution.
        click_encoding: ``disk`` (paper A) or ``gaussian``.
        optimizer: ``sgd`` with momentum (the paper's) or ``adamw``.
        lr: learning rate.
        momentum: SGD momentum (AdamW: beta1).
        weight_decay: weight decay.
        poly_power: power of the polynomial learning-rate decay over ``max_steps``.
        prev_mask: give the network the previous prediction as a sixth input channel (RITM);
            ``False`` is the paper's five-channel input.
        click_skip: the click maps (and previous mask) enter the decoder too, at its strides.
        decoder_stride: 4 (DeepLabV3+) or 2 (a refinement on the stride-2 feature).
        channels_last: the network in the channels-last memory layout: on an AMD EPYC CPU 1.27x
            the training steps/s in bfloat16, 1.17x in 32-bit, 1.2-1.3x the inference speed.
        max_iterative_clicks: stage (b) adds 0..this many simulated corrective clicks per batch,
            each predicted by the current model from the clicks before it (and, with
            ``prev_mask``, from its previous prediction).
        iterative_start: fraction of training after which stage (b) begins.
        synthetic_corrections: share of training samples (with ``prev_mask``) that instead start
            from a synthetic previous mask (the ground truth perturbed) with 1..``max_iterative_clicks``
            corrective clicks against it: every such sample teaches a correction, without a
            forward pass to find it.
        first_click_share: share of training samples (after the two above) reduced to the
            benchmark's first click: one positive click at the object's interior-most pixel, no
            other click and no previous mask (0: the state is left to the random draws, where it
            is rare).
        click_loss_weight: pixels within ``click_loss_radius`` px of a click weigh ``1 + this``
            in the training loss (0: the paper's plain BCE).
        click_loss_radius: see ``click_loss_weight``.
        loss: ``bce`` (paper A, Eq. 1) or ``nfl``, the normalized focal loss RITM trains with
            (hard pixels carry the loss; ``modules.losses.normalized_focal_loss``).
        focal_gamma: the focal exponent of ``nfl``.
        eval_max_side: long side of the network input at evaluation (images are resized to
            it and predictions resized back to the original resolution).
        eval_max_clicks: clicks per object in the benchmark (the protocol's 20).
        click_protocol: ``corrective`` (paper A: random initial clicks in training, corrective
            clicks from the first on in the benchmark) or ``three_click`` (paper B: two
            bounding-box corners and one interior click, computed from the object's mask and
            jittered by ``three_click_jitter`` px in training; the benchmark gives them first,
            then corrective clicks).
        three_click_jitter: training jitter of the three clicks, in pixels.
        num_classes: with ``> 0``, the binary predictor and the object classifier of paper B
            (``modules.deeplab``), trained with BCE and cross-entropy on the training objects'
            class ids (objects without one, id -1, do not train the classifier).
    """

    def __init__(
        self,
        backbone: str = "resnet10t",
        output_stride: int = 16,
        aspp_rates: list[int] = [6, 12, 18],  # noqa: B006
        aspp_channels: int = 64,
        decoder_channels: int = 64,
        pretrained: bool = False,
        click_radius: float = 3.0,
        click_encoding: Literal["disk", "gaussian"] = "disk",
        optimizer: Literal["sgd", "adamw"] = "adamw",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        poly_power: float = 0.9,
        prev_mask: bool = True,
        click_skip: bool = True,
        decoder_stride: int = 4,
        channels_last: bool = False,
        max_iterative_clicks: int = 4,
        iterative_start: float = 0.2,
        synthetic_corrections: float = 0.5,
        first_click_share: float = 0.0,
        click_loss_weight: float = 5.0,
        click_loss_radius: float = 5.0,
        loss: Literal["bce", "nfl"] = "bce",
        focal_gamma: float = 2.0,
        eval_max_side: int = 512,
        eval_max_clicks: int = 20,
        click_protocol: Literal["corrective", "three_click"] = "corrective",
        three_click_jitter: int = 5,
        num_classes: int = 0,
    ):
        super().__init__()
        for key, share in {"synthetic_corrections": synthetic_corrections, "first_click_share": first_click_share}.items():
            check(0 <= share <= 1, f"model.{key}={share}: expected a share in [0, 1]")
        check(focal_gamma >= 0, f"model.focal_gamma={focal_gamma}: expected a number >= 0")
        self.save_hyperparameters()
        self.net = DeepLabV3Plus(backbone, 6 if prev_mask else 5, output_stride, aspp_rates, aspp_channels, decoder_channels=decoder_channels,
                                 pretrained=pretrained, num_classes=num_classes,
                                 guide_channels=(3 if prev_mask else 2) if click_skip else 0,
                                 decoder_stride=decoder_stride, channels_last=channels_last)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.mas_importance: dict[str, torch.Tensor] | None = None  # <ckpt>.mas.pt, read by test-time adaptation
        self.adapter: Adapter | None = None  # test-time adaptation of the benchmark (callbacks.adaptation)
        self.classical = None  # a classical method benchmarked in place of the network (modules.classical)
        self.zoom_in = None  # RITM's zoom-in at inference (modules.session.ZoomIn), set with the adapter
        self.tta = None  # test-time augmentation of predictions (modules.session.TestTimeAugmentation), likewise
        self.click_labels = None  # the clicks as labels on the shown mask (modules.session.ClickLabels), likewise
        self.protocol = EvaluationProtocol(max_clicks=eval_max_clicks)  # the benchmark's, set by the benchmark
        self.train_iou = BinaryJaccardIndex(ignore_index=IGNORE_INDEX)
        self.val_iou = BinaryJaccardIndex(ignore_index=IGNORE_INDEX)

    # -- the network on image + clicks ------------------------------------------------------
    def network_input(self, image: torch.Tensor, clicks: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised RGB (``image`` in [0, 1]), the two click maps (``clicks`` in the
        coordinates of ``image``) and, with ``prev_mask``, the previous foreground probability
        ``prev`` ``(B, 1, H, W)`` (zeros before the first prediction)."""
        maps = encode_clicks(clicks.to(image), image.shape[-2:], self.hparams.click_radius, self.hparams.click_encoding)
        channels = [(image - self.mean) / self.std, maps]
        if self.hparams.prev_mask:
            channels.append(torch.zeros_like(image[:, :1]) if prev is None else prev.to(image))
        return torch.cat(channels, dim=1)

    def forward(self, image: torch.Tensor, clicks: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Foreground logits ``(B, 1, H, W)``."""
        return self.net(self.network_input(image, clicks, prev))

    def outputs(self, image: torch.Tensor, clicks: torch.Tensor, prev: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Everything paper B reads off the network: ``logits`` ``(B, 1, H, W)``, decoder
        ``features`` (stride 4), the backbone's ``deep``est features, and with ``num_classes``
        the ``binary`` predictor's logits (deepest stride) and the ``classes`` logits."""
        feats = self.net.encode(self.network_input(image, clicks, prev))
        features = self.net.decode_features(feats)
        out = {"logits": self.net.predict_head(features, image.shape[-2:]), "features": features, "deep": feats["deep"]}
        if self.hparams.num_classes > 0:
            out["binary"], out["classes"] = self.net.aux_heads(feats)
        return out

    # -- training (sec. 3.1, 3.3) -------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.run_seed = torch.initial_seed()  # seed_everything's seed, the same when a run resumes

    def step_rng(self) -> np.random.Generator:
        """The randomness of one training step (its clicks; torch's generator, for dropout, is
        reseeded too), from the run's seed and the step: the same config and seed give the same
        model, also after a resume."""
        rng = np.random.default_rng([getattr(self, "run_seed", 0), self.global_step])
        torch.manual_seed(int(rng.integers(2**62)))
        return rng

    def initial_clicks(self, batch: dict, rng: np.random.Generator | None = None) -> torch.Tensor:
        """The clicks a training sample starts with: the dataset's random ones (``corrective``)
        or paper B's three, placed on the (augmented) mask (``three_click``), jittered by
        ``three_click_jitter`` px when ``rng`` is given (training) and exact otherwise."""
        if self.hparams.click_protocol == "corrective":
            return batch["clicks"]
        clicks = torch.zeros_like(batch["clicks"])
        for b, mask in enumerate(batch["mask"][:, 0].bool().cpu().numpy()):
            three = three_click_protocol(mask, rng, self.hparams.three_click_jitter if rng is not None else 0)
            clicks[b, :3] = clicks_to_tensor(three).to(clicks)
        return clicks

    def iterative_clicks(self, batch: dict, clicks: torch.Tensor, rng: np.random.Generator,
                         late: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stage (b) (sec. 3.3, ITIS/RITM): from the initial clicks, 0..``max_iterative_clicks``
        rounds of predicting and adding the simulated user's next corrective click (from
        ``iterative_start`` of training on, or when ``late``). Returns the clicks and the
        prediction before the last of them (the ``prev_mask`` input; zeros when no round ran,
        ``None`` without ``prev_mask``)."""
        clicks = clicks.clone()
        prev = torch.zeros_like(batch["mask"]) if self.hparams.prev_mask else None
        if late is None:
            late = self.global_step >= self.hparams.iterative_start * self._total_steps()
        rounds = int(rng.integers(0, self.hparams.max_iterative_clicks + 1)) if late else 0
        if rounds == 0:
            return clicks, prev
        gt = batch["mask"][:, 0].bool().cpu().numpy()
        ignore = batch["ignore"][:, 0].cpu().numpy()
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for _ in range(rounds):
                prob = self(batch["image"], clicks, prev).sigmoid()
                pred = (prob > 0.5)[:, 0].cpu().numpy()
                for b in range(len(pred)):
                    free = (clicks[b, :, 2] == 0).nonzero()
                    click = next_click(pred[b], gt[b], ignore[b])
                    if click is not None and len(free):
                        clicks[b, free[0, 0]] = clicks_to_tensor([click])[0]
                if prev is not None:
                    prev = prob
        self.train(was_training)
        return clicks, prev

    def mask_loss(self, logits: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor, clicks: torch.Tensor) -> torch.Tensor:
        """The model's training loss on its mask (``loss``: BCE or the normalized focal loss) over
        the valid pixels, weighted up within ``click_loss_radius`` of the clicks by
        ``click_loss_weight``."""
        h = self.hparams
        weight = near_click_weights(clicks, logits.shape[-2:], h.click_loss_radius, h.click_loss_weight) \
            if h.click_loss_weight > 0 else None
        if h.loss == "nfl":
            return normalized_focal_loss(logits, mask, valid, weight, h.focal_gamma)
        return masked_bce(logits, mask, valid, weight)

    def _step(self, batch: dict, clicks: torch.Tensor, prev: torch.Tensor | None, metric: BinaryJaccardIndex,
              stage: str) -> torch.Tensor:
        out = self.outputs(batch["image"], clicks, prev)
        logits = out["logits"]
        valid = ~batch["ignore"]
        loss = self.mask_loss(logits, batch["mask"], valid, clicks)
        if self.hparams.num_classes > 0:
            aux = aux_losses(out, batch["mask"], valid, batch["class_id"])
            for name, value in aux.items():
                self.log(f"{stage}/{name}", value, batch_size=len(logits))
            loss = loss + sum(aux.values())
        target = batch["mask"].long().masked_fill(~valid, IGNORE_INDEX)
        metric(logits.detach().sigmoid(), target)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(logits))
        self.log(f"{stage}/iou", metric, prog_bar=True, batch_size=len(logits), on_step=stage == "train", on_epoch=True)
        return loss

    def synthetic_corrections(self, batch: dict, clicks: torch.Tensor, prev: torch.Tensor, rng: np.random.Generator
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace a ``synthetic_corrections`` share of the samples by a perturbed ground truth as
        the previous mask, the sample's first positive click and corrective clicks against it."""
        share = self.hparams.synthetic_corrections
        if share <= 0 or prev is None:
            return clicks, prev
        clicks, prev = clicks.clone(), prev.clone()
        gts = batch["mask"][:, 0].bool().cpu().numpy()
        ignores = batch["ignore"][:, 0].cpu().numpy()
        for b in np.flatnonzero(rng.random(len(gts)) < share):
            fake = perturb_mask(gts[b], rng)
            extra, before = corrective_clicks(fake, gts[b], int(rng.integers(1, self.hparams.max_iterative_clicks + 1)),
                                              ignores[b])
            if not extra:
                continue
            first = clicks[b, :1].clone()
            clicks[b] = 0
            clicks[b, :1] = first
            clicks[b, 1:1 + len(extra)] = clicks_to_tensor(extra).to(clicks)
            prev[b, 0] = torch.from_numpy(before).to(prev)
        return clicks, prev

    def first_clicks(self, batch: dict, clicks: torch.Tensor, prev: torch.Tensor | None, rng: np.random.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replace a ``first_click_share`` of the samples by the simulated user's first click on
        an empty prediction (the benchmark's click 1) and no previous mask."""
        share = self.hparams.first_click_share
        if share <= 0:
            return clicks, prev
        clicks = clicks.clone()
        prev = None if prev is None else prev.clone()
        gts = batch["mask"][:, 0].bool().cpu().numpy()
        ignores = batch["ignore"][:, 0].cpu().numpy()
        for b in np.flatnonzero(rng.random(len(gts)) < share):
            first = next_click(np.zeros_like(gts[b]), gts[b], ignores[b])
            if first is None:
                continue
            clicks[b] = 0
            clicks[b, :1] = clicks_to_tensor([first]).to(clicks)
            if prev is not None:
                prev[b] = 0
        return clicks, prev

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        rng = self.step_rng()
        clicks, prev = self.iterative_clicks(batch, self.initial_clicks(batch, rng), rng)
        clicks, prev = self.synthetic_corrections(batch, clicks, prev, rng)
        clicks, prev = self.first_clicks(batch, clicks, prev, rng)
        return self._step(batch, clicks, prev, self.train_iou, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, self.initial_clicks(batch), None, self.val_iou, "val")

    def _total_steps(self) -> int:
        """Length of training in optimizer steps (the schedule and stage (b) depend on it)."""
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("set trainer.max_steps or max_epochs: the polynomial schedule needs a length")
        return int(total)

    def configure_optimizers(self):
        h = self.hparams
        if h.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=h.lr, betas=(h.momentum, 0.999), weight_decay=h.weight_decay)
        total = self._total_steps()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: poly_lr_factor(s, total, h.poly_power))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- evaluation at original resolution ---------------------------------------------------
    def session(self, image: torch.Tensor, defer: bool = False) -> InteractiveSession:
        """An interactive session on one image ``(1, 3, H, W)`` in [0, 1], adapting with
        ``adapter``, zooming in with ``zoom_in``, augmenting with ``tta`` and labelling the clicked
        pixels with ``click_labels`` when they are set (see
        :class:`~modules.session.InteractiveSession`); with ``classical`` set, that method's
        session instead."""
        if self.classical is not None:
            return ClassicalSession(self.classical, (image[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
        return InteractiveSession(self, image, self.adapter, defer, self.zoom_in, self.tta, self.click_labels)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> ObjectResult:
        """Click-by-click evaluation of one benchmark object (batch size 1); the image is
        finished where Algorithm 1's user would have stopped."""
        gt = batch["mask"][0].cpu().numpy()
        ignore = batch["ignore"][0].cpu().numpy()
        session = self.session(batch["image"])
        initial = three_click_protocol(gt) if self.hparams.click_protocol == "three_click" else None
        result = evaluate_object(session, gt, ignore, self.protocol.max_clicks, initial=initial,
                                 target_iou=self.protocol.target_iou)
        session.finish(upto=result.user_clicks)
        return result
