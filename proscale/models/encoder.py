"""ONE deformable encoder for Mask2Former and PRO-SCALE, driven by a layer plan.

The tokens of the three scales are ordered coarse to fine: [res5, res4, res3].
A plan (P1, P2, P3) runs

    stage 1: P1 layers on  x = TRC(t5)                    (1 level)
    stage 2: P2 layers on  x = concat(x, TRC(t4))         (2 levels)
    stage 3: P3 layers on  x = concat(x, t3)              (3 levels)

so early layers see only the coarse tokens (progressive token length scaling, Aich et al.,
arXiv 2404.14657; docs/method.md, "PRO-SCALE: stages and the layer plan"). Mask2Former's
encoder is the plan (0, 0, 6) without TRC: all tokens join before the first layer
(docs/method.md, "Equivalence with Mask2Former"). Each layer has its own weights and samples
only the levels that are already in the sequence.
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


TRC_LAYOUTS = ("spatial", "official", "official_conv")


class TokenRecalibration(nn.Module):
    """TRC: gates coarse tokens with a score computed from the fine (res3) tokens.

    One score op shared by res5 and res4 (docs/method.md, "Token Re-Calibration (TRC)"). The
    res3 tokens are resized bilinearly to the gated scale's map size, scored, and
    `sigmoid(temperature * score)` scales each token. The layouts differ in how the res3 tokens
    become a map and the resized map becomes one score per token:

    - "spatial": a transpose makes the real (B, C, H3, W3) map, and `score` = Linear(C -> 1)
      reads each position's C channels (what the paper describes).
    - "official": a raw `view(B, C, H3, W3)` (no transpose) makes the map and a raw
      `reshape(B, h*w, C)` turns the resized map back into rows, which `score` = Linear(C -> 1)
      reads: rows mix space and channels. The authors' Linear-TRC weights were trained so.
    - "official_conv": the same raw view, but `score` = Conv2d(C, 1, 1) reads the resized
      (B, C, h, w) map along its dim 1, one score per map position in row-major order: how the
      authors' 1x1-conv TRC variant gates (a different grouping from "official"). Its weight
      is (1, C, 1, 1), as in their checkpoints.
    """

    def __init__(self, d_model: int, temperature: float = 1.0, layout: str = "spatial"):
        super().__init__()
        if layout not in TRC_LAYOUTS:
            raise ValueError(f"trc_layout must be one of {TRC_LAYOUTS}, got {layout!r}")
        self.score = nn.Conv2d(d_model, 1, 1) if layout == "official_conv" else nn.Linear(d_model, 1)
        self.temperature, self.layout = temperature, layout

    def forward(self, tokens: torch.Tensor, size: tuple[int, int], t3: torch.Tensor,
                size3: tuple[int, int]) -> torch.Tensor:
        """tokens: (B, h*w, C) to gate; t3: (B, H3*W3, C) -> (B, h*w, C)."""
        B, N3, C = t3.shape
        (h, w), (h3, w3) = size, size3
        if self.layout == "spatial":
            fine = t3.transpose(1, 2).reshape(B, C, h3, w3)
        else:
            fine = t3.reshape(B, C, h3, w3)  # the raw view: memory order, no transpose
        fine = F.interpolate(fine, size=(h, w), mode="bilinear", align_corners=False)
        if self.layout == "spatial":
            score = self.score(fine.flatten(2).transpose(1, 2))  # (B, h*w, 1)
        elif self.layout == "official":
            score = self.score(fine.reshape(B, h * w, C))  # raw reshape: (B, h*w, 1)
        else:
            score = self.score(fine).flatten(2).transpose(1, 2)  # (B, 1, h, w) -> (B, h*w, 1)
        return tokens * torch.sigmoid(self.temperature * score)


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
        # Built once per input size: no per-call host-to-device copies (see constant_cache.py).
        key = (spatial_shapes, like.device, like.dtype)
        return self._ref_cache.get(key, lambda: reference_points(spatial_shapes, like.device, like.dtype))

    def forward(self, tokens: list[torch.Tensor], pos: list[torch.Tensor], spatial_shapes: SpatialShapes) -> torch.Tensor:
        t5, t4, t3 = tokens
        full_ref = self._reference_points(tuple(spatial_shapes), t3)
        counts = [h * w for h, w in spatial_shapes]
        x = None
        joined = []  # each scale's tokens as they joined the sequence: TRC(t5), TRC(t4), t3
        layers = iter(self.layers)
        for stage, n_layers in enumerate(self.plan):
            new = tokens[stage]
            if self.trc is not None and stage < 2:
                new = self.trc(new, spatial_shapes[stage], t3, spatial_shapes[2])
            joined.append(new)
            x = new if x is None else torch.cat((x, new), dim=1)
            if n_layers == 0:
                continue
            levels = stage + 1
            shapes = tuple(spatial_shapes[:levels])
            n = sum(counts[:levels])
            # Pixel centres do not depend on which levels are sampled: slice the full table.
            ref = full_ref[:, :n, :levels]
            p = torch.cat(pos[:levels], dim=1) if levels > 1 else pos[0]
            # RESIDUAL adds back the gated input tokens of the scales present, not the stage's
            # input sequence (whose res5 part is already the stage-1 output): docs/method.md, "RESIDUAL".
            residual = None
            if self.cfg.residual and stage < 2:
                residual = torch.cat(joined, dim=1) if levels > 1 else joined[0]
            for _ in range(n_layers):
                x = next(layers)(x, p, ref, shapes)
                if residual is not None:
                    x = x + residual
        return x
