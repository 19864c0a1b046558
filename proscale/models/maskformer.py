"""The whole model: normalise, pad to /32, backbone -> pixel decoder -> transformer decoder."""
from __future__ import annotations

import torch
from torch import nn

from proscale.config import ModelConfig
from proscale.models.backbone import build_backbone
from proscale.models.image_batch import normalize_and_pad
from proscale.models.pixel_decoder import build_pixel_decoder
from proscale.models.pretrained import SavePretrainedMixin
from proscale.models.transformer_decoder import build_transformer_decoder


class MaskFormer(SavePretrainedMixin, nn.Module):
    """Mask2Former, with a baseline or PRO-SCALE encoder in its pixel decoder.

    forward(images): images is a (B, 3, H, W) tensor or a list of (3, H_i, W_i) tensors, RGB in
    0-255 (uint8 or float). Each image is normalised, then the batch is padded with zeros at the
    bottom/right to (Hp, Wp), multiples of `size_divisibility`. Returns
        {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, Hp/4, Wp/4),
         "aux_outputs": [{"pred_logits", "pred_masks"}] * dec_layers,
         "image_sizes": [(H_i, W_i)], "padded_size": (Hp, Wp)}
    and, with `keep_features` set (distillation), "pixel_decoder": {"mask_features", "maps"} as
    `forward_pixel_decoder` returns them.
    save_pretrained(folder): config.json + model.safetensors (proscale.models.pretrained).
    """

    def __init__(self, backbone: nn.Module, pixel_decoder: nn.Module, transformer_decoder: nn.Module,
                 pixel_mean, pixel_std, size_divisibility: int = 32, cfg: ModelConfig | None = None):
        super().__init__()
        self.backbone, self.pixel_decoder, self.transformer_decoder = backbone, pixel_decoder, transformer_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.size_divisibility = size_divisibility
        self.cfg = cfg
        self.keep_features = False
        self.metadata: dict | None = None  # class names / is-thing flags, when loaded from a file that has them

    @property
    def num_classes(self) -> int:
        return self.transformer_decoder.class_embed.out_features - 1

    def preprocess(self, images) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise and pad -> ((B, 3, Hp, Wp) float, [(H_i, W_i)])."""
        return normalize_and_pad(images, self.pixel_mean, self.pixel_std, self.size_divisibility)

    def forward_pixel_decoder(self, images) -> tuple[dict, list[tuple[int, int]], tuple[int, int]]:
        """({"mask_features": (B, mask_dim, Hp/4, Wp/4), "maps": [res5, res4, res3] (B, C, H_l, W_l)},
        image sizes, padded size): the model up to the transformer decoder."""
        x, sizes = self.preprocess(images)
        mask_features, maps = self.pixel_decoder(self.backbone(x))
        return {"mask_features": mask_features, "maps": maps}, sizes, tuple(x.shape[-2:])

    def forward(self, images) -> dict:
        pixel, sizes, padded = self.forward_pixel_decoder(images)
        out = self.transformer_decoder(pixel["maps"], pixel["mask_features"])
        out["image_sizes"] = sizes
        out["padded_size"] = padded
        if self.keep_features:
            out["pixel_decoder"] = pixel
        return out


def build_maskformer(cfg: ModelConfig) -> MaskFormer:
    backbone = build_backbone(cfg.backbone)
    pixel_decoder = build_pixel_decoder(backbone.out_channels, cfg.encoder, cfg.decoder.mask_dim)
    decoder = build_transformer_decoder(cfg.encoder.d_model, cfg.num_classes, cfg.decoder)
    return MaskFormer(backbone, pixel_decoder, decoder, cfg.pixel_mean, cfg.pixel_std, cfg.size_divisibility, cfg)
