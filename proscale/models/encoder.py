"""ONE deformable encoder for Mask2Former and PRO-SCALE, driven by a layer plan.

The tokens of the three scales are ordered coarse to fine: [res5, res4, res3].
A plan (P1, P2, P3) runs

    stage 1: P1 layers on  x = TRC(t5)                    (1 level)
    stage 2: P2 layers on  x = concat(x, TRC(t4))         (2 levels)
    stage 3: P3 layers on  x = concat(x, t3)              (3 levels)

so early layers see only the coarse tokens (progressive token length scaling, Aich et al.,
arXiv 2404.14657). Mask2Former's encoder is the plan (0, 0, 6) without TRC: all tokens join
before the first layer. Each layer has its own weights and samples only the levels that are
already in the sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from proscale.config import EncoderConfig
from proscale.models.constant_cache import ConstantCache
from proscale.models.ms_deform_attn import MSDeformAttn, SpatialShapes


class EncoderLayer(nn.Module):
    """Post-norm layer: x = LN1(x + MSDA(x + pos, ref, x)); x = LN2(x + FFN(x))."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: SpatialShapes) -> torch.Tensor:
        """x, pos: (B, N, C); reference_points: (1, N, L, 2) -> (B, N, C)."""
        x = self.norm1(x + self.dropout1(self.self_attn(x + pos, reference_points, x, spatial_shapes)))
        x = self.norm2(x + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(x))))))
        return x


class TokenRecalibration(nn.Module):
    """TRC: gates coarse tokens with a score computed from the fine (res3) tokens.

    One `Linear(C -> 1)` shared by res5 and res4. The res3 tokens are resized bilinearly to the
    gated scale's map size, scored, and `sigmoid(temperature * score)` scales each token.

    layout="spatial": tokens (B, N3, C) become a (B, C, H3, W3) map by a transpose (what the
    paper describes). layout="official": by a raw `view(B, C, H3, W3)` and back by a raw
    `reshape(B, N, C)`, which mixes space and channels: the authors' released weights were
    trained that way, so it is needed to reproduce them.
    """

    def __init__(self, d_model: int, temperature: float = 1.0, layout: str = "spatial"):
        super().__init__()
        if layout not in ("spatial", "official"):
            raise ValueError(f"trc_layout must be 'spatial' or 'official', got {layout!r}")
        self.score = nn.Linear(d_model, 1)
        self.temperature, self.layout = temperature, layout

    def forward(self, tokens: torch.Tensor, size: tuple[int, int], t3: torch.Tensor,
                size3: tuple[int, int]) -> torch.Tensor:
        """tokens: (B, H*W, C) to gate; t3: (B, H3*W3, C) -> (B, H*W, C)."""
        B, N3, C = t3.shape
        (h, w), (h3, w3) = size, size3
        if self.layout == "spatial":
            fine = t3.transpose(1, 2).reshape(B, C, h3, w3)
        else:
            fine = t3.reshape(B, C, h3, w3)
        fine = F.interpolate(fine, size=(h, w), mode="bilinear", align_corners=False)
        if self.layout == "spatial":
            fine = fine.flatten(2).transpose(1, 2)
        else:
            fine = fine.reshape(B, h * w, C)
        gate = torch.sigmoid(self.temperature * self.score(fine))  # (B, H*W, 1)
        return tokens * gate


def reference_points(spatial_shapes: SpatialShapes, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, N, L, 2) pixel centres ((j+0.5)/W_l, (i+0.5)/H_l) of every token, repeated over the L levels."""
    points = []
    for h, w in spatial_shapes:
        y, x = torch.meshgrid(
            (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h,
            (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w,
            indexing="ij",
        )
        points.append(torch.stack((x.reshape(-1), y.reshape(-1)), -1))
    ref = torch.cat(points, 0)[None, :, None, :].expand(1, -1, len(spatial_shapes), 2)
    return ref.to(dtype).contiguous()


class DeformableEncoder(nn.Module):
    """Runs the layer plan over [res5, res4, res3] tokens.

    forward(tokens, pos, spatial_shapes):
        tokens: [t5, t4, t3], each (B, H_l*W_l, C) input projections (no position added)
        pos: [p5, p4, p3], each (B, H_l*W_l, C) position encoding + level embedding
        spatial_shapes: ((H5, W5), (H4, W4), (H3, W3)) Python ints
    returns (B, N5+N4+N3, C), coarse to fine.
    """

    num_levels = 3

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if len(cfg.plan) != 3 or min(cfg.plan) < 0 or sum(cfg.plan) == 0:
            raise ValueError(f"encoder plan must be three layer counts >= 0 with at least one layer, got {cfg.plan}")
        self.cfg = cfg
        self.plan = tuple(int(p) for p in cfg.plan)
        # Layer i of stage s attends over s+1 levels; weights are never shared.
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.d_model, stage + 1, cfg.n_heads, cfg.n_points, cfg.ffn_dim, cfg.dropout)
            for stage, count in enumerate(self.plan)
            for _ in range(count)
        )
        self.trc = TokenRecalibration(cfg.d_model, cfg.trc_temperature, cfg.trc_layout) if cfg.trc else None
        self._ref_cache = ConstantCache()

    def stage_levels(self) -> list[int]:
        """Number of levels each layer sees, in order."""
        return [stage + 1 for stage, count in enumerate(self.plan) for _ in range(count)]

    def _reference_points(self, spatial_shapes: SpatialShapes, like: torch.Tensor) -> torch.Tensor:
        # Built once per input size: no per-call host-to-device copies (see shared/notes/GPU.md).
        key = (spatial_shapes, like.device, like.dtype)
        return self._ref_cache.get(key, lambda: reference_points(spatial_shapes, like.device, like.dtype))

    def forward(self, tokens: list[torch.Tensor], pos: list[torch.Tensor], spatial_shapes: SpatialShapes) -> torch.Tensor:
        t5, t4, t3 = tokens
        full_ref = self._reference_points(tuple(spatial_shapes), t3)
        counts = [h * w for h, w in spatial_shapes]
        x = None
        layers = iter(self.layers)
        for stage, n_layers in enumerate(self.plan):
            new = tokens[stage]
            if self.trc is not None and stage < 2:
                new = self.trc(new, spatial_shapes[stage], t3, spatial_shapes[2])
            x = new if x is None else torch.cat((x, new), dim=1)
            if n_layers == 0:
                continue
            levels = stage + 1
            shapes = tuple(spatial_shapes[:levels])
            n = sum(counts[:levels])
            # Pixel centres do not depend on which levels are sampled: slice the full table.
            ref = full_ref[:, :n, :levels]
            p = torch.cat(pos[:levels], dim=1) if levels > 1 else pos[0]
            stage_input = x
            for _ in range(n_layers):
                x = next(layers)(x, p, ref, shapes)
                if self.cfg.residual and stage < 2:
                    x = x + stage_input
        return x
