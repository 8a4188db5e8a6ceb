"""DeepLabV3+ on any timm backbone (paper A, sec. 3.1 and 4.6).

The decoder is built from the backbone's ``feature_info``; no channel count is hard-coded.
``encode`` and ``decode`` are separate so that test-time adaptation can cache encoder
features and adapt the decoder alone.
"""
from __future__ import annotations

from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from modules.errors import UserError


def _conv_bn_relu(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pool branch."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, cout, 1)] + [_conv_bn_relu(cin, cout, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(cin, cout, 1))
        self.project = nn.Sequential(_conv_bn_relu(cout * (len(rates) + 2), cout, 1), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (Chen et al. 2018): ASPP on the deepest feature, decoder at stride 4.

    Args:
        backbone: any timm model name that supports ``features_only``.
        in_chans: input channels (RGB + positive/negative click maps = 5).
        output_stride: 8 or 16, the encoder's deepest stride (dilated convolutions beyond).
        aspp_rates: dilation rates of ASPP's three 3x3 branches.
        pretrained: load timm's ImageNet weights (needs network access); the first conv is
            adapted to ``in_chans`` by timm.
        num_classes: with ``> 0``, paper B's two extra heads on the deepest backbone feature: a
            binary pixel predictor (1x1 conv) and an object classifier (linear on the pooled
            feature) with this many outputs (``n`` known classes, ``n + 1`` once evolving).
        guide_channels: with ``> 0``, the last this many input channels (the click maps and
            the previous mask) also enter the decoder directly, max-pooled to its stride, so a
            click reaches the prediction near it without crossing the whole encoder.
        decoder_stride: 4 (DeepLabV3+) or 2: a refinement at stride 2 on the backbone's stride-2
            feature, for boundaries a pixel or two sharper.
        channels_last: weights and input in the channels-last memory layout, which oneDNN's CPU
            convolutions run faster (the same numbers up to float rounding).
    """

    def __init__(
        self,
        backbone: str = "resnet10t",
        in_chans: int = 5,
        output_stride: int = 16,
        aspp_rates: Sequence[int] = (6, 12, 18),
        aspp_channels: int = 128,
        low_level_channels: int = 48,
        decoder_channels: int = 128,
        pretrained: bool = False,
        num_classes: int = 0,
        guide_channels: int = 0,
        decoder_stride: int = 4,
        channels_last: bool = False,
    ):
        super().__init__()
        self.guide_channels, self.channels_last = guide_channels, channels_last
        if output_stride not in (8, 16):
            raise UserError(f"output_stride={output_stride}: expected 8 or 16")
        if decoder_stride not in (2, 4):
            raise UserError(f"decoder_stride={decoder_stride}: expected 2 or 4")
        if not timm.is_model(backbone):
            raise UserError(f"unknown backbone '{backbone}': not a timm model name (see timm.list_models())")
        probe = timm.create_model(backbone, features_only=True, pretrained=False)
        reductions = probe.feature_info.reduction()
        del probe
        if 4 not in reductions or (decoder_stride == 2 and 2 not in reductions):
            raise UserError(f"backbone '{backbone}' has no stride-{4 if 4 not in reductions else 2} feature "
                            f"(strides {reductions})")
        indices = ([reductions.index(2)] if decoder_stride == 2 else []) + [reductions.index(4), len(reductions) - 1]
        self.encoder = timm.create_model(
            backbone,
            features_only=True,
            in_chans=in_chans,
            output_stride=output_stride,
            out_indices=tuple(indices),
            pretrained=pretrained,
        )
        *fine_ch, low_ch, deep_ch = self.encoder.feature_info.channels()
        self.aspp = ASPP(deep_ch, aspp_channels, aspp_rates)
        self.low_proj = _conv_bn_relu(low_ch, low_level_channels, 1)
        self.decoder = nn.Sequential(
            _conv_bn_relu(aspp_channels + low_level_channels + guide_channels, decoder_channels),
            _conv_bn_relu(decoder_channels, decoder_channels),
        )
        head_channels = decoder_channels
        if decoder_stride == 2:
            self.coarse_proj = _conv_bn_relu(decoder_channels, 32, 1)
            self.fine_proj = _conv_bn_relu(fine_ch[0], 16, 1)
            self.refine = _conv_bn_relu(32 + 16 + guide_channels, 32)
            head_channels = 32
        self.head = nn.Conv2d(head_channels, 1, 1)
        if num_classes > 0:
            self.binary = nn.Conv2d(deep_ch, 1, 1)
            self.classifier = nn.Linear(deep_ch, num_classes)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The backbone's features the decoder reads: ``low`` (stride 4), ``deep`` (the
        deepest), with ``decoder_stride`` 2 ``fine`` (stride 2), and with ``guide_channels`` the
        guide maps (the input's last channels) at those strides (``guide4``, ``guide2``)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        *fine, low, deep = self.encoder(x)
        feats = {"low": low, "deep": deep}
        if fine:
            feats["fine"] = fine[0]
        if self.guide_channels:
            guide = x[:, -self.guide_channels:]
            feats["guide4"] = F.adaptive_max_pool2d(guide, low.shape[-2:])
            if fine:
                feats["guide2"] = F.adaptive_max_pool2d(guide, fine[0].shape[-2:])
        return feats

    def decode_features(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoder features at the decoder's stride (the pixel embedding prototype methods use)."""
        low, deep = feats["low"], feats["deep"]
        context = F.interpolate(self.aspp(deep), size=low.shape[-2:], mode="bilinear", align_corners=False)
        out = self.decoder(torch.cat([context, self.low_proj(low), *([feats["guide4"]] if "guide4" in feats else [])], dim=1))
        if "fine" not in feats:
            return out
        fine = feats["fine"]
        up = F.interpolate(self.coarse_proj(out), size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return self.refine(torch.cat([up, self.fine_proj(fine), *([feats["guide2"]] if "guide2" in feats else [])], dim=1))

    def decode(self, feats: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return self.predict_head(self.decode_features(feats), size)

    def predict_head(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The 1x1 classifier on decoder features, upsampled to ``size``."""
        return F.interpolate(self.head(features), size=size, mode="bilinear", align_corners=False)

    def aux_heads(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Paper B's heads: binary-predictor logits ``(B, 1, h, w)`` at the deepest stride and
        class logits ``(B, num_classes)``."""
        deep = feats["deep"]
        return self.binary(deep), self.classifier(deep.mean(dim=(2, 3)))

    def cached_modules(self, cache: str) -> list[nn.Module]:
        """The modules whose output a cached test-time adaptation computes once per click:
        ``encoder`` (``encode``'s features) or ``decoder`` (``decode_features``' output)."""
        decoder = [self.aspp, self.low_proj, self.decoder] + [getattr(self, n) for n in ("coarse_proj", "fine_proj", "refine")
                                                              if hasattr(self, n)]
        return {"none": [], "encoder": [self.encoder], "decoder": [self.encoder, *decoder]}[cache]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Foreground logits ``(B, 1, H, W)`` at the input resolution."""
        return self.decode(self.encode(x), x.shape[-2:])
