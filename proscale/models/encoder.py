"""ONE deformable encoder for Mask2Former, Deformable DETR and PRO-SCALE, driven by a layer plan.

The tokens of the L scales are ordered coarse to fine. For Mask2Former L = 3, [res5, res4, res3];
for Deformable DETR L = 4, [stride 64, 32, 16, 8]. A plan (P1, ..., PL) adds one finer level per
stage:

    stage 1: P1 layers on  x = TRC(t_1)                   (1 level, the coarsest)
    stage s: Ps layers on  x = concat(x, TRC(t_s))        (s levels)
    stage L: PL layers on  x = concat(x, t_L)             (all L levels; the finest is never gated)

so early layers see only the coarse tokens (progressive token length scaling, Aich et al.,
arXiv 2404.14657; docs/method.md, "PRO-SCALE: stages and the layer plan"). TRC scores the finest
level's tokens and gates every coarser level as it joins. The plain encoder is the plan
(0, ..., 0, 6) without TRC: all tokens join before the first layer (docs/method.md,
"Equivalence with Mask2Former"). Each layer has its own weights and samples only the levels
that are already in the sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from proscale.config import EncoderConfig
from proscale.kernels.linear import Linear, linear_relu
from proscale.models.constant_cache import ConstantCache
from proscale.models.ms_deform_attn import MSDeformAttn, SpatialShapes


class EncoderLayer(nn.Module):
    """Post-norm layer: x = LN1(x + MSDA(x + pos, ref, x)); x = LN2(x + FFN(x))."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = Linear(d_model, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = Linear(ffn_dim, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: SpatialShapes, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x, pos: (B, N, C); reference_points: (1 or B, N, L, 2); padding_mask: (B, N) or None -> (B, N, C)."""
        attn = self.self_attn(x + pos, reference_points, x, spatial_shapes, padding_mask)
        x = self.norm1(x + self.dropout1(attn))
        # ReLU fused into linear1 (oneDNN) or in place: (N, ffn_dim) is the layer's largest tensor.
        h = linear_relu(self.linear1, x)
        x = self.norm2(x + self.dropout3(self.linear2(self.dropout2(h))))
        return x


TRC_LAYOUTS = ("spatial", "official", "official_conv")


class TokenRecalibration(nn.Module):
    """TRC: gates coarse tokens with a score computed from the finest level's tokens (res3 in
    Mask2Former, stride 8 in Deformable DETR; "res3" below).

    One score op shared by all coarser levels (docs/method.md, "Token Re-Calibration (TRC)"). The
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
    """(1, N, L, 2) pixel centres ((j+0.5)/W_l, (i+0.5)/H_l) of every token, repeated over the L levels.

    For padded batches see `masked_reference_points`."""
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


def masked_reference_points(spatial_shapes: SpatialShapes, valid_ratios: torch.Tensor) -> torch.Tensor:
    """(B, N, L, 2) reference points of a padded batch, as Deformable DETR places them.

    valid_ratios: (B, L, 2), the (width, height) fraction of each level's map covered by the
    image. A token's centre is normalised by its own level's valid size, then scaled into each
    sampled level's valid part. With all ratios 1 this is `reference_points`.
    """
    points = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        y, x = torch.meshgrid(
            torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
            torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
            indexing="ij",
        )
        x = x.reshape(1, -1) / (valid_ratios[:, None, lvl, 0] * w)
        y = y.reshape(1, -1) / (valid_ratios[:, None, lvl, 1] * h)
        points.append(torch.stack((x, y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    """Runs the layer plan over L levels of tokens, coarse to fine (L = len(plan)).

    forward(tokens, pos, spatial_shapes, padding_mask=None, valid_ratios=None):
        tokens: L tensors (B, H_l*W_l, C), input projections (no position added), coarse to fine
        pos: L tensors (B, H_l*W_l, C), position encoding + level embedding
        spatial_shapes: ((H_1, W_1), ..., (H_L, W_L)) Python ints
        padding_mask: optional (B, N_1+...+N_L) bool, True at tokens that lie on padding; their
            values are never sampled (Deformable DETR's masking; Mask2Former passes None)
        valid_ratios: optional (B, L, 2) (width, height) fraction of each map that is image;
            places the reference points as Deformable DETR does (see masked_reference_points)
    returns (B, N_1+...+N_L, C), coarse to fine.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if len(cfg.plan) < 1 or min(cfg.plan) < 0 or sum(cfg.plan) == 0:
            raise ValueError(f"encoder plan must be layer counts >= 0 (one per level, coarse to fine) "
                             f"with at least one layer, got {cfg.plan}")
        self.cfg = cfg
        self.plan = tuple(int(p) for p in cfg.plan)
        self.num_levels = len(self.plan)
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
        # At least fp32 under autocast: a bf16 pixel centre is off by up to half a pixel.
        dtype = torch.promote_types(like.dtype, torch.float32)
        key = (spatial_shapes, like.device, dtype)
        return self._ref_cache.get(key, lambda: reference_points(spatial_shapes, like.device, dtype))

    def forward(self, tokens: list[torch.Tensor], pos: list[torch.Tensor], spatial_shapes: SpatialShapes,
                padding_mask: torch.Tensor | None = None, valid_ratios: torch.Tensor | None = None) -> torch.Tensor:
        L = self.num_levels
        if len(tokens) != L or len(pos) != L or len(spatial_shapes) != L:
            raise ValueError(f"the encoder plan {self.plan} has {L} levels, got {len(tokens)} token maps, "
                             f"{len(pos)} position maps and {len(spatial_shapes)} shapes")
        finest = tokens[-1]
        if valid_ratios is None:
            full_ref = self._reference_points(tuple(spatial_shapes), finest)
        else:
            full_ref = masked_reference_points(tuple(spatial_shapes),
                                               valid_ratios.to(torch.promote_types(finest.dtype, torch.float32)))
        counts = [h * w for h, w in spatial_shapes]
        x = None
        joined = []  # each scale's tokens as they joined the sequence: TRC(t_1), ..., TRC(t_L-1), t_L
        layers = iter(self.layers)
        for stage, n_layers in enumerate(self.plan):
            new = tokens[stage]
            if self.trc is not None and stage < L - 1:
                new = self.trc(new, spatial_shapes[stage], finest, spatial_shapes[-1])
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
            extra = (padding_mask[:, :n],) if padding_mask is not None else ()
            # RESIDUAL adds back the gated input tokens of the scales present, not the stage's
            # input sequence (whose coarsest part is already the stage-1 output): docs/method.md, "RESIDUAL".
            residual = None
            if self.cfg.residual and stage < L - 1:
                residual = torch.cat(joined, dim=1) if levels > 1 else joined[0]
            for _ in range(n_layers):
                x = next(layers)(x, p, ref, shapes, *extra)
                if residual is not None:
                    x = x + residual
        return x
