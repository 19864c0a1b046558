"""Point sampling for mask losses and matching (PointRend, Kirillov et al. 2020).

Mask2Former computes its mask losses and matching costs on a few thousand points instead of
every pixel. Points are given in normalised image coordinates (x, y) in [0, 1] of the
*padded* image, so maps of different resolutions (stride-4 logits, full-size target masks)
can be sampled at the same physical locations.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def point_sample(input: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample `input` at normalised points (zero outside the map).

    Args:
        input: (N, C, H, W) maps.
        coords: (N, P, 2) points as (x, y) in [0, 1]; (0, 0) is the top-left corner of the
            top-left pixel, (1, 1) the bottom-right corner of the bottom-right pixel
            (grid_sample's align_corners=False convention: pixel centres at (i + 0.5) / W).
    Returns:
        (N, C, P) sampled values, in the promoted dtype of `input` and `coords` (fp16 / bf16
        maps with fp32 points are sampled in fp32: bf16 coordinates would be off by pixels).
    """
    if coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(f"coords must be (N, P, 2), got {tuple(coords.shape)}")
    dtype = torch.promote_types(input.dtype, coords.dtype)
    # grid_sample wants a (N, H_out, W_out, 2) grid in [-1, 1]; a (N, P, 1, 2) grid samples P points.
    grid = (2.0 * coords.to(dtype) - 1.0).unsqueeze(2)
    out = F.grid_sample(input.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(3)


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of binary mask logits: -|logit|, highest (0) on the decision boundary.

    Args:
        logits: (N, 1, ...) class-agnostic mask logits.
    Returns:
        same shape as `logits`.
    """
    return -logits.abs()


def get_uncertain_point_coords_with_randomness(
    logits: torch.Tensor,
    uncertainty_fn: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> torch.Tensor:
    """PointRend importance sampling of points biased towards uncertain regions.

    Draw k * P uniform random points (k = oversample_ratio), keep the beta * P most uncertain
    of them (beta = importance_sample_ratio), and fill the remaining (1 - beta) * P with fresh
    uniform random points so that the whole image still gets some coverage.

    Args:
        logits: (N, 1, H, W) mask logits (only used to rank points; no gradient needed).
        uncertainty_fn: maps (N, 1, P') point logits to (N, 1, P') uncertainties.
        num_points: P, points returned per mask.
        oversample_ratio: k >= 1.
        importance_sample_ratio: beta in [0, 1].
    Returns:
        (N, P, 2) point coordinates (x, y) in [0, 1], dtype float32.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    n = logits.shape[0]
    device = logits.device
    num_sampled = int(num_points * oversample_ratio)
    candidates = torch.rand(n, num_sampled, 2, device=device)
    uncertainties = uncertainty_fn(point_sample(logits.float(), candidates))  # (N, 1, kP)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainties[:, 0, :], k=num_uncertain, dim=1).indices  # (N, beta P)
    chosen = torch.gather(candidates, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        chosen = torch.cat([chosen, torch.rand(n, num_random, 2, device=device)], dim=1)
    return chosen
