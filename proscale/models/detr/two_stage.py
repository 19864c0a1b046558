"""Two-stage Deformable DETR: every encoder token proposes a box around its own position; the
best-scoring proposals become the decoder's queries and reference boxes."""
from __future__ import annotations

import torch

from proscale.models.ms_deform_attn import SpatialShapes


def token_proposals(padding_mask: torch.Tensor, spatial_shapes: SpatialShapes) -> tuple[torch.Tensor, torch.Tensor]:
    """One anchor box per token, as logits, and which anchors are usable.

    padding_mask: (B, S) True on padding tokens; spatial_shapes: L levels, coarse to fine.
    A token at (i, j) of a level proposes centre ((j + 0.5) / valid W, (i + 0.5) / valid H) and
    side 0.05 * 2^k, k = 0 on the finest level (stride 8), 1 on the next, ... Returns
    (proposals (B, S, 4) inverse-sigmoid (cx, cy, w, h), +inf where unusable;
     usable (B, S, 1) bool: not padding and all four coordinates inside (0.01, 0.99)).
    """
    B = padding_mask.shape[0]
    L = len(spatial_shapes)
    boxes, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        pad = padding_mask[:, start:start + h * w].view(B, h, w)
        valid_h = (~pad[:, :, 0]).sum(1).float()
        valid_w = (~pad[:, 0, :]).sum(1).float()
        y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=pad.device),
                              torch.arange(w, dtype=torch.float32, device=pad.device), indexing="ij")
        centre = torch.stack((x, y), -1)[None] + 0.5  # (1, h, w, 2)
        centre = centre / torch.stack((valid_w, valid_h), -1).view(B, 1, 1, 2)
        size = torch.full_like(centre, 0.05 * 2.0 ** (L - 1 - lvl))
        boxes.append(torch.cat((centre, size), -1).view(B, h * w, 4))
        start += h * w
    proposals = torch.cat(boxes, 1)
    usable = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True) & ~padding_mask[..., None]
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(~usable, float("inf"))
    return proposals, usable
