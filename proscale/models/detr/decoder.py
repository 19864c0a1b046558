"""Deformable DETR's decoder: object queries attend to each other, then sample the encoder's
levels around their reference point (or box) with deformable attention.

Shapes: B batch, Q queries, C channels, S encoder tokens of L levels (coarse to fine).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from proscale.config import DetrDecoderConfig
from proscale.models.detr.heads import inverse_sigmoid
from proscale.models.ms_deform_attn import MSDeformAttn, SpatialShapes


class DecoderLayer(nn.Module):
    """Post-norm: x = LN1(x + SelfAttn(x + pos, x + pos, x)); x = LN2(x + MSDA(x + pos, ref, memory));
    x = LN3(x + FFN(x))."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, query_pos: torch.Tensor, reference: torch.Tensor, memory: torch.Tensor,
                spatial_shapes: SpatialShapes, memory_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """x, query_pos: (B, Q, C); reference: (B, Q, L, 2 or 4); memory: (B, S, C);
        memory_padding_mask: (B, S) True on padding, or None -> (B, Q, C)."""
        q = x + query_pos
        x = self.norm1(x + self.dropout1(self.self_attn(q, q, x, need_weights=False)[0]))
        attn = self.cross_attn(x + query_pos, reference, memory, spatial_shapes, memory_padding_mask)
        x = self.norm2(x + self.dropout2(attn))
        return self.norm3(x + self.dropout4(self.linear2(self.dropout3(F.relu(self.linear1(x))))))


class DeformableDecoder(nn.Module):
    """forward(tgt, query_pos, reference, memory, spatial_shapes, padding_mask, valid_ratios, refine)

        tgt, query_pos: (B, Q, C) query content and position
        reference: (B, Q, 2) points or (B, Q, 4) boxes (cx, cy, w, h), in [0, 1] of each image
        memory: (B, S, C) encoder output; padding_mask: (B, S) bool (True on padding) or None
        valid_ratios: (B, L, 2) (width, height) fraction of each level's map that is image
        refine: None, or one box head per layer (iterative box refinement)
    returns (hidden states of every layer, [(B, Q, C)] * layers; the reference each layer's
    predictions are relative to, [(B, Q, 2 or 4)] * layers).
    """

    def __init__(self, cfg: DetrDecoderConfig, d_model: int, n_levels: int):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_levels, cfg.n_heads, cfg.n_points, cfg.ffn_dim, cfg.dropout)
            for _ in range(cfg.layers)
        )

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, reference: torch.Tensor, memory: torch.Tensor,
                spatial_shapes: SpatialShapes, padding_mask: torch.Tensor | None, valid_ratios: torch.Tensor,
                refine: Sequence[nn.Module] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        x = tgt
        hidden, references = [], []
        for i, layer in enumerate(self.layers):
            # The reference is relative to the image; each level samples it inside its valid part.
            ratios = valid_ratios if reference.shape[-1] == 2 else torch.cat((valid_ratios, valid_ratios), -1)
            x = layer(x, query_pos, reference[:, :, None] * ratios[:, None], memory, spatial_shapes, padding_mask)
            hidden.append(x)
            references.append(reference)
            if refine is not None:
                delta = refine[i](x)
                if reference.shape[-1] == 4:
                    new = delta + inverse_sigmoid(reference)
                else:
                    new = torch.cat((delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]), -1)
                # The next layer starts from this layer's boxes, without a gradient through them.
                reference = new.sigmoid().detach()
        return hidden, references
