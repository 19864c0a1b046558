"""The whole model: normalise, pad to /32, backbone -> pixel decoder -> transformer decoder."""
from __future__ import annotations

import torch
from torch import nn

from proscale.config import ModelConfig
from proscale.models.backbone import build_backbone
from proscale.models.image_batch import normalize_and_pad
from proscale.models.pixel_decoder import build_pixel_decoder
from proscale.models.transformer_decoder import build_transformer_decoder


class MaskFormer(nn.Module):
    """Mask2Former, with a baseline or PRO-SCALE encoder in its pixel decoder.

    forward(images): images is a (B, 3, H, W) tensor or a list of (3, H_i, W_i) tensors, RGB in
    0-255 (uint8 or float). Each image is normalised, then the batch is padded with zeros at the
    bottom/right to (Hp, Wp), multiples of `size_divisibility`. Returns
        {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, Hp/4, Wp/4),
         "aux_outputs": [{"pred_logits", "pred_masks"}] * dec_layers,
         "image_sizes": [(H_i, W_i)], "padded_size": (Hp, Wp)}
    """

    def __init__(self, backbone: nn.Module, pixel_decoder: nn.Module, transformer_decoder: nn.Module,
                 pixel_mean, pixel_std, size_divisibility: int = 32, cfg: ModelConfig | None = None):
        super().__init__()
        self.backbone, self.pixel_decoder, self.transformer_decoder = backbone, pixel_decoder, transformer_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.size_divisibility = size_divisibility
        self.cfg = cfg

    @property
    def num_classes(self) -> int:
        return self.transformer_decoder.class_embed.out_features - 1

    def preprocess(self, images) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise and pad -> ((B, 3, Hp, Wp) float, [(H_i, W_i)])."""
        return normalize_and_pad(images, self.pixel_mean, self.pixel_std, self.size_divisibility)

    def forward(self, images) -> dict:
        x, sizes = self.preprocess(images)
        features = self.backbone(x)
        mask_features, maps = self.pixel_decoder(features)
        out = self.transformer_decoder(maps, mask_features)
        out["image_sizes"] = sizes
        out["padded_size"] = tuple(x.shape[-2:])
        return out


def build_maskformer(cfg: ModelConfig) -> MaskFormer:
    backbone = build_backbone(cfg.backbone)
    pixel_decoder = build_pixel_decoder(backbone.out_channels, cfg.encoder, cfg.decoder.mask_dim)
    decoder = build_transformer_decoder(cfg.encoder.d_model, cfg.num_classes, cfg.decoder)
    return MaskFormer(backbone, pixel_decoder, decoder, cfg.pixel_mean, cfg.pixel_std, cfg.size_divisibility, cfg)
