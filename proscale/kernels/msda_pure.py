"""MSDA reference in pure PyTorch: one grid_sample per level (back end "pure").

This is the definition the other back ends are tested against, and the form exports and FLOP
counters see: its graph holds only standard operators (GridSample in ONNX), and the bilinear
sampling is counted as 4 FLOPs per sampled value (docs/flops.md).

Shapes: B batch, Nq queries, S = sum of H_l * W_l over levels, M heads, D channels per head,
L levels, P sampling points per head and level.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_pure(
    value: torch.Tensor,
    spatial_shapes: tuple[tuple[int, int], ...],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Bilinear sampling of every level + attention-weighted sum (the grid_sample form).

    Args:
        value: (B, S, M, D) projected values, levels concatenated in `spatial_shapes` order.
        spatial_shapes: ((H_0, W_0), ...) of the L levels, Python ints.
        sampling_locations: (B, Nq, M, L, P, 2) as (x, y) in [0, 1] of each level's map.
        attention_weights: (B, Nq, M, L, P), softmaxed over L * P.
    Returns:
        (B, Nq, M * D)
    """
    B, S, M, D = value.shape
    _, Nq, _, L, P, _ = sampling_locations.shape
    out_dtype = value.dtype
    # One compute dtype for grid_sample (it needs input and grid alike): the widest of the three,
    # so bf16 values with fp32 locations sample at fp32 locations.
    cd = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    value, sampling_locations, attention_weights = (t.to(cd) for t in (value, sampling_locations, attention_weights))
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    # grid_sample works on [-1, 1] with align_corners=False, i.e. pixel centres at (i+0.5)/W.
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(B * M, D, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*M, Nq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Nq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (B*M, D, Nq)
    return out.view(B, M * D, Nq).transpose(1, 2).contiguous().to(out_dtype)
