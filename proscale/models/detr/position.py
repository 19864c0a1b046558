"""Sine encodings of Deformable DETR: of a padded feature map (positions counted over the valid
pixels only) and of a box (the two-stage query encoding)."""
from __future__ import annotations

import math

import torch


def _frequencies(num_feats: int, temperature: float, device: torch.device) -> torch.Tensor:
    """(num_feats,) divisors temperature^(2 * floor(i / 2) / num_feats): pairs share a frequency."""
    i = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / num_feats)


def _interleave(x: torch.Tensor) -> torch.Tensor:
    """(..., F) angles -> (..., F): sin of the even channels and cos of the odd ones, interleaved."""
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def masked_sine_encoding(padding_mask: torch.Tensor, num_feats: int, temperature: float = 10000.0,
                         scale: float = 2 * math.pi) -> torch.Tensor:
    """padding_mask: (B, H, W) bool, True on padding -> (B, 2 * num_feats, H, W), y channels first.

    Each valid pixel's row (column) is its count of valid pixels above (left of) it, inclusive,
    minus 0.5, divided by the column's (row's) valid count and scaled to [0, scale]: the image
    spans [0, scale] whatever padding its batch needed. Padded pixels get values beyond it.
    """
    valid = (~padding_mask).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps = 1e-6
    y = (y - 0.5) / (y[:, -1:, :] + eps) * scale
    x = (x - 0.5) / (x[:, :, -1:] + eps) * scale
    dim_t = _frequencies(num_feats, temperature, padding_mask.device)
    pos_y = _interleave(y[..., None] / dim_t)
    pos_x = _interleave(x[..., None] / dim_t)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def box_sine_encoding(box_logits: torch.Tensor, num_feats: int, temperature: float = 10000.0,
                      scale: float = 2 * math.pi) -> torch.Tensor:
    """box_logits: (B, Q, 4) unnormalised (cx, cy, w, h) logits -> (B, Q, 4 * num_feats).

    Each sigmoid coordinate in [0, 1] is scaled to [0, scale] and encoded with `num_feats`
    sine/cosine channels, in the order cx, cy, w, h."""
    coords = box_logits.sigmoid().float() * scale
    dim_t = _frequencies(num_feats, temperature, box_logits.device)
    return _interleave(coords[..., None] / dim_t).flatten(2).to(box_logits.dtype)
