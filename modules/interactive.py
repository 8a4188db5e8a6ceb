"""The initial interactive-segmentation model as a LightningModule (paper A, sec. 3.1, 3.3).

It only wires the pure pieces together: the network (``modules.deeplab``), click encoding
(``modules.clicks``), user simulation (``modules.simulate``), the loss (``modules.losses``)
and the click-by-click evaluation (``modules.evaluation``).
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryJaccardIndex

from modules.clicks import Click, clicks_to_tensor, encode_clicks, scale_clicks
from modules.deeplab import DeepLabV3Plus
from modules.evaluation import ObjectResult, evaluate_object
from modules.losses import masked_bce
from modules.simulate import next_click, three_click_protocol

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = -1


def network_size(hw: tuple[int, int], max_side: int, multiple: int = 32) -> tuple[int, int]:
    """The network resolution for an image: long side at most ``max_side``, both sides
    rounded to ``multiple`` so every encoder stride divides them."""
    scale = min(1.0, max_side / max(hw))
    return tuple(max(multiple, int(round(s * scale / multiple)) * multiple) for s in hw)  # type: ignore[return-value]


def poly_lr_factor(step: int, total: int, power: float) -> float:
    """Polynomial decay ``(1 - step / total) ** power`` (DeepLab's schedule)."""
    return max(0.0, 1.0 - step / max(1, total)) ** power


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
        max_iterative_clicks: stage (b) adds 0..this many simulated clicks per batch.
        iterative_start: fraction of training after which stage (b) begins.
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
        aspp_channels: int = 128,
        decoder_channels: int = 128,
        pretrained: bool = False,
        click_radius: float = 3.0,
        click_encoding: Literal["disk", "gaussian"] = "disk",
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        poly_power: float = 0.9,
        max_iterative_clicks: int = 3,
        iterative_start: float = 0.3,
        eval_max_side: int = 512,
        eval_max_clicks: int = 20,
        click_protocol: Literal["corrective", "three_click"] = "corrective",
        three_click_jitter: int = 5,
        num_classes: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = DeepLabV3Plus(backbone, 5, output_stride, aspp_rates, aspp_channels, decoder_channels=decoder_channels,
                                 pretrained=pretrained, num_classes=num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.click_hooks: list[Callable[["ImagePredictor", torch.Tensor], None]] = []  # test-time adaptation
        self.current_predictor: ImagePredictor | None = None
        self.mas_importance: dict[str, torch.Tensor] | None = None  # set from <ckpt>.mas.pt for adaptation
        self.train_iou = BinaryJaccardIndex(ignore_index=IGNORE_INDEX)
        self.val_iou = BinaryJaccardIndex(ignore_index=IGNORE_INDEX)

    # -- the network on image + clicks ------------------------------------------------------
    def network_input(self, image: torch.Tensor, clicks: torch.Tensor) -> torch.Tensor:
        """5-channel input: normalised RGB (``image`` in [0, 1]) and the two click maps;
        ``clicks`` are in the coordinates of ``image``."""
        maps = encode_clicks(clicks.to(image), image.shape[-2:], self.hparams.click_radius, self.hparams.click_encoding)
        return torch.cat([(image - self.mean) / self.std, maps], dim=1)

    def forward(self, image: torch.Tensor, clicks: torch.Tensor) -> torch.Tensor:
        """Foreground logits ``(B, 1, H, W)``."""
        return self.net(self.network_input(image, clicks))

    def outputs(self, image: torch.Tensor, clicks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything paper B reads off the network: ``logits`` ``(B, 1, H, W)``, decoder
        ``features`` (stride 4), and with ``num_classes`` the ``binary`` predictor's logits
        (deepest stride) and the ``classes`` logits."""
        feats = self.net.encode(self.network_input(image, clicks))
        features = self.net.decode_features(feats)
        out = {"logits": self.net.predict_head(features, image.shape[-2:]), "features": features}
        if self.hparams.num_classes > 0:
            out["binary"], out["classes"] = self.net.aux_heads(feats)
        return out

    # -- training (sec. 3.1, 3.3) -------------------------------------------------------------
    def initial_clicks(self, batch: dict) -> torch.Tensor:
        """The clicks a training sample starts with: the dataset's random ones (``corrective``)
        or paper B's three, placed on the (augmented) mask (``three_click``)."""
        if self.hparams.click_protocol == "corrective":
            return batch["clicks"]
        clicks = torch.zeros_like(batch["clicks"])
        for b, mask in enumerate(batch["mask"][:, 0].bool().cpu().numpy()):
            three = three_click_protocol(mask, np.random.default_rng(np.random.randint(0, 2**31)),
                                         self.hparams.three_click_jitter)
            clicks[b, :3] = clicks_to_tensor(three).to(clicks)
        return clicks

    def _add_iterative_clicks(self, batch: dict, clicks: torch.Tensor) -> torch.Tensor:
        """Stage (b): predict, add the simulated next click, repeat 0..max times."""
        clicks = clicks.clone()
        if self.global_step < self.hparams.iterative_start * self._total_steps() or self.hparams.max_iterative_clicks == 0:
            return clicks
        rounds = int(np.random.randint(0, self.hparams.max_iterative_clicks + 1))
        if rounds == 0:
            return clicks
        gt = batch["mask"][:, 0].bool().cpu().numpy()
        ignore = batch["ignore"][:, 0].cpu().numpy()
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for _ in range(rounds):
                pred = (self(batch["image"], clicks) > 0)[:, 0].cpu().numpy()
                for b in range(len(pred)):
                    free = (clicks[b, :, 2] == 0).nonzero()
                    click = next_click(pred[b], gt[b], ignore[b])
                    if click is not None and len(free):
                        clicks[b, free[0, 0]] = clicks_to_tensor([click])[0]
        self.train(was_training)
        return clicks

    def _step(self, batch: dict, clicks: torch.Tensor, metric: BinaryJaccardIndex, stage: str) -> torch.Tensor:
        out = self.outputs(batch["image"], clicks)
        logits = out["logits"]
        valid = ~batch["ignore"]
        loss = masked_bce(logits, batch["mask"], valid)
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

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, self._add_iterative_clicks(batch, self.initial_clicks(batch)), self.train_iou, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, self.initial_clicks(batch), self.val_iou, "val")

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
    def predictor(self, image: torch.Tensor) -> "ImagePredictor":
        """A predictor for one image ``(1, 3, H, W)`` in [0, 1] (see :class:`ImagePredictor`)."""
        return ImagePredictor(self, image, network_size(tuple(image.shape[-2:]), self.hparams.eval_max_side))

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> ObjectResult:
        """Click-by-click evaluation of one benchmark object (batch size 1)."""
        gt = batch["mask"][0].cpu().numpy()
        ignore = batch["ignore"][0].cpu().numpy()
        predictor = self.predictor(batch["image"])
        predictor.hooks = list(self.click_hooks)
        self.current_predictor = predictor  # read by sequence adaptation after the object
        initial = three_click_protocol(gt) if self.hparams.click_protocol == "three_click" else None
        return evaluate_object(predictor, gt, ignore, self.hparams.eval_max_clicks, initial=initial)


class ImagePredictor:
    """Interactive prediction on one image, as a user session sees it.

    Called with all clicks so far (original coordinates) it returns the foreground probability
    at the original resolution. ``hooks`` run first on every click with the clicks at network
    resolution: that is where image adaptation takes its gradient steps. ``previous`` keeps the
    last prediction (network resolution) as the target of Eq. 4's second term.
    With ``cache`` set, the frozen part of the network runs once per click and its output is
    reused by every adaptation step: ``encoder`` when only the decoder adapts, ``decoder`` when
    only the 1x1 head does.
    """

    def __init__(self, module: InteractiveSegmentationModule, image: torch.Tensor, net_hw: tuple[int, int]):
        self.module = module
        self.hw = tuple(image.shape[-2:])
        self.net_hw = net_hw
        self.net_image = F.interpolate(image, size=net_hw, mode="bilinear", align_corners=False) if net_hw != self.hw else image
        self.hooks: list[Callable[[ImagePredictor, torch.Tensor], None]] = []
        self.previous: torch.Tensor | None = None  # (1, 1, h, w) probabilities at network resolution
        self.cache: Literal["none", "encoder", "decoder"] = "none"
        self._cache: tuple[bytes, list[torch.Tensor] | torch.Tensor] | None = None

    def net_clicks(self, clicks: list[Click]) -> torch.Tensor:
        """Clicks as a ``(1, N, 3)`` tensor in network coordinates."""
        return scale_clicks(clicks_to_tensor(clicks)[None].to(self.net_image.device), self.hw, self.net_hw)

    def _frozen_features(self, clicks: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """What the adapted layers take as input, computed once per click set when cached:
        encoder features (``cache='encoder'``) or decoder features (``cache='decoder'``)."""
        net = self.module.net
        key = self.cache.encode() + clicks.cpu().numpy().tobytes()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                feats = net.encode(self.module.network_input(self.net_image, clicks))
                self._cache = (key, net.decode_features(feats) if self.cache == "decoder" else feats)
        return self._cache[1]

    def logits(self, clicks: torch.Tensor) -> torch.Tensor:
        """Logits ``(1, 1, h, w)`` at network resolution (differentiable unless under no_grad)."""
        net = self.module.net
        if self.cache == "none":
            return net(self.module.network_input(self.net_image, clicks))
        feats = self._frozen_features(clicks)
        if self.cache == "decoder":
            return net.predict_head(feats, self.net_hw)
        return net.decode(feats, self.net_hw)

    def __call__(self, clicks: list[Click]) -> np.ndarray:
        c = self.net_clicks(clicks)
        for hook in self.hooks:
            hook(self, c)
        with torch.no_grad():
            logits = self.logits(c)
        self.previous = logits.sigmoid()
        full = F.interpolate(logits, size=self.hw, mode="bilinear", align_corners=False) if self.hw != self.net_hw else logits
        return full[0, 0].sigmoid().cpu().numpy()
