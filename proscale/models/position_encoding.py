"""2-D sine position encoding (DETR's form, normalised coordinates)."""
from __future__ import annotations

import math

import torch
from torch import nn

from proscale.models.constant_cache import ConstantCache


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of (y, x) on an all-valid map.

    Each axis gets `num_pos_feats` channels: y first, then x. With `normalize`, coordinates
    (1..H, 1..W) are divided by their maximum and scaled to [0, scale].
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats, self.temperature, self.normalize, self.scale = num_pos_feats, temperature, normalize, scale
        self._cache = ConstantCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) (only its size, device and dtype are used) -> (B, 2 * num_pos_feats, H, W)."""
        B, _, H, W = x.shape
        pos = self._cache.get((H, W, x.device, x.dtype), lambda: self._encode(H, W, x.device).to(x.dtype))
        return pos.expand(B, -1, -1, -1)

    def _encode(self, H: int, W: int, device: torch.device) -> torch.Tensor:
        y = torch.arange(1, H + 1, dtype=torch.float32, device=device)[:, None].expand(H, W)
        x = torch.arange(1, W + 1, dtype=torch.float32, device=device)[None, :].expand(H, W)
        if self.normalize:
            eps = 1e-6
            y = y / (H + eps) * self.scale
            x = x / (W + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x[:, :, None] / dim_t
        pos_y = y[:, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, 0::2].sin(), pos_x[:, :, 1::2].cos()), dim=3).flatten(2)
        pos_y = torch.stack((pos_y[:, :, 0::2].sin(), pos_y[:, :, 1::2].cos()), dim=3).flatten(2)
        return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)[None]
