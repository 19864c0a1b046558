"""Pixel decoder: input projections -> deformable encoder -> FPN step to stride 4 -> mask features.

Mask2Former's pixel decoder (docs/method.md, "The baseline: Mask2Former's pixel decoder") with
PRO-SCALE's two changes behind config switches: the plan-driven encoder (models/encoder.py) and
the Light Pixel Embedding in place of the stride-4 3x3 conv (docs/method.md, "Light Pixel
Embedding (LPE)").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from proscale.config import EncoderConfig
from proscale.models.encoder import DeformableEncoder
from proscale.models.position_encoding import PositionEmbeddingSine


class ConvNorm(nn.Conv2d):
    """Conv2d (no bias) followed by GroupNorm(32) and an optional ReLU; state-dict names
    `weight`, `norm.*` match detectron2's Conv2d-with-norm."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, relu: bool):
        super().__init__(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(32, out_ch)
        self.relu = relu
        nn.init.kaiming_uniform_(self.weight, a=1)  # "c2_xavier_fill"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(super().forward(x))
        return F.relu(x, inplace=True) if self.relu else x


class LightPixelEmbedding(nn.Module):
    """LPE: MaxPool(3, stride 1) -> GroupNorm(32) -> ReLU; replaces the 3x3 stride-4 conv, the
    most expensive op of the baseline pixel decoder (docs/method.md, "Light Pixel Embedding (LPE)").
    (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.norm = nn.GroupNorm(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.pool(x)), inplace=True)  # GroupNorm's backward needs no output


class PixelDecoder(nn.Module):
    """forward(features) with features {"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)}
    returns (mask_features (B, mask_dim, H/4, W/4), [res5, res4, res3] encoder maps (B, C, H_l, W_l)).

    Position encodings (sine, d/2 channels per axis) plus a learned per-level embedding go into
    the encoder's queries only; the tokens themselves are the bare input projections
    (docs/method.md, "Input projections and tokens").
    """

    def __init__(self, in_channels: dict[str, int], cfg: EncoderConfig, mask_dim: int = 256):
        super().__init__()
        d = cfg.d_model
        if len(cfg.plan) != 3:
            raise ValueError(f"Mask2Former's pixel decoder has 3 levels (res5, res4, res3): the encoder plan "
                             f"needs 3 layer counts, got {tuple(cfg.plan)}")
        self.in_features = ("res5", "res4", "res3")  # coarse to fine, the token order
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels[name], d, 1), nn.GroupNorm(32, d)) for name in self.in_features
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.level_embed = nn.Parameter(torch.empty(3, d))
        nn.init.normal_(self.level_embed)
        self.pe_layer = PositionEmbeddingSine(d // 2, normalize=True)
        self.encoder = DeformableEncoder(cfg)
        self.adapter_1 = ConvNorm(in_channels["res2"], d, 1, relu=False)  # lateral
        self.layer_1 = ConvNorm(d, d, 3, relu=True) if cfg.output == "conv" else LightPixelEmbedding(d)
        if cfg.output not in ("conv", "lpe"):
            raise ValueError(f"encoder output must be 'conv' or 'lpe', got {cfg.output!r}")
        self.mask_features = nn.Conv2d(d, mask_dim, 1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    def forward_encoder(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The multi-scale encoder outputs [res5, res4, res3], each (B, C, H_l, W_l)."""
        tokens, pos, shapes = [], [], []
        for lvl, name in enumerate(self.in_features):
            x = self.input_proj[lvl](features[name])
            B, C, h, w = x.shape
            shapes.append((h, w))
            tokens.append(x.flatten(2).transpose(1, 2))
            p = self.pe_layer(x).flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
            pos.append(p)
        y = self.encoder(tokens, pos, tuple(shapes))
        maps = y.split([h * w for h, w in shapes], dim=1)
        # (B, h*w, C) tokens seen as (B, C, h, w) maps without a copy: channels-last strides.
        return [m.unflatten(1, (h, w)).permute(0, 3, 1, 2) for m, (h, w) in zip(maps, shapes)]

    def forward_fpn(self, res2: torch.Tensor, res3_out: torch.Tensor) -> torch.Tensor:
        """Stride-4 map: lateral(res2) + upsampled res3 output, then the 3x3 conv or LPE, then mask features."""
        # The largest maps of the model. For inference, channels-last makes the convolutions and
        # above all the LPE max-pool several times faster on CPU (same values up to float
        # rounding). Training keeps the default layout: its mkldnn backward in channels-last
        # rounded differently under DDP than in one process (4e-6 vs 6e-8 after 3 steps).
        if not torch.is_grad_enabled():
            res2 = res2.contiguous(memory_format=torch.channels_last)
        y = self.adapter_1(res2)
        y = y + F.interpolate(res3_out, size=y.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_features(self.layer_1(y))

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = self.forward_encoder(features)
        return self.forward_fpn(features["res2"], maps[-1]), maps


def build_pixel_decoder(in_channels: dict[str, int], cfg: EncoderConfig, mask_dim: int = 256) -> PixelDecoder:
    return PixelDecoder(in_channels, cfg, mask_dim)
