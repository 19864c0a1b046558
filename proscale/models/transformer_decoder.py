"""Masked-attention transformer decoder with class and mask heads (Cheng et al., Mask2Former).

Layer l cross-attends to level l % 3 of [res5, res4, res3], restricted to where the previous
prediction's mask is on (sigmoid >= 0.5), then self-attends, then runs an FFN (post-norm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from proscale.config import DecoderConfig
from proscale.kernels.linear import Linear, linear, linear_relu, use_onednn
from proscale.models.position_encoding import PositionEmbeddingSine


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class CrossAttentionLayer(nn.Module):
    """Masked cross-attention, post-norm. The weights are nn.MultiheadAttention's (same state-dict
    keys); the forward is written out so that the memory's key / value projections run through
    `linear` (oneDNN at CPU inference) on batch-first tokens, and the mask reaches SDPA once per
    image, broadcast over the heads (no (B*heads, Q, HW) copy)."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, allowed, pos, query_pos):
        """tgt, query_pos: (Q, B, C); memory, pos: (B, HW, C); allowed: (B, Q, HW) bool, True where
        a query may attend -> (Q, B, C)."""
        attn = self.multihead_attn
        Q, B, C = tgt.shape
        h = attn.num_heads
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        q = linear(_with_pos(tgt, query_pos), w_q, b_q).view(Q, B, h, C // h).permute(1, 2, 0, 3)
        k = linear(_with_pos(memory, pos), w_k, b_k).view(B, -1, h, C // h).transpose(1, 2)
        v = linear(memory, w_v, b_v).view(B, -1, h, C // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # (B, h, Q, C/h)
        out = linear(out.permute(2, 0, 1, 3).reshape(Q, B, C), attn.out_proj.weight, attn.out_proj.bias)
        return self.norm(tgt + out)


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos):
        q = k = _with_pos(tgt, query_pos)
        return self.norm(tgt + self.self_attn(q, k, tgt, need_weights=False)[0])


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int):
        super().__init__()
        self.linear1 = Linear(d_model, dim_feedforward)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt):
        return self.norm(tgt + self.linear2(linear_relu(self.linear1, tgt)))


class MLP(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = linear_relu(layer, x) if i < len(self.layers) - 1 else layer(x)
        return x


def mask_logits(embed: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
    """embed (B, Q, C) . mask_features (B, C, H, W) -> (B, Q, H, W): the mask einsum.

    For fp32 CPU inference it is a 1x1 convolution per image with the embeddings as weights,
    through oneDNN (see proscale/kernels/linear.py for why), on channels-last features; the
    result is channels-last too: ~3x faster than the einsum on the development CPU
    (benchmarks/cpu_kernels.py)."""
    if not use_onednn(mask_features, embed):
        return torch.einsum("bqc,bchw->bqhw", embed, mask_features)
    out = [F.conv2d(mask_features[b:b + 1], embed[b, :, :, None, None]) for b in range(embed.shape[0])]
    return out[0] if len(out) == 1 else torch.cat(out)


class MaskedAttentionDecoder(nn.Module):
    """forward(maps, mask_features):
        maps: [res5, res4, res3] pixel-decoder outputs, (B, C_l, H_l, W_l)
        mask_features: (B, mask_dim, H/4, W/4)
    returns {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4), "aux_outputs": [...] * dec_layers}
    """

    num_levels = 3

    def __init__(self, in_channels: int, num_classes: int, cfg: DecoderConfig):
        super().__init__()
        d, n = cfg.hidden_dim, cfg.nheads
        self.num_layers = cfg.dec_layers
        self.pe_layer = PositionEmbeddingSine(d // 2, normalize=True)
        self.transformer_self_attention_layers = nn.ModuleList(SelfAttentionLayer(d, n) for _ in range(cfg.dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(d, n) for _ in range(cfg.dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(d, cfg.dim_feedforward) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(cfg.num_queries, d)  # learnable query features
        self.query_embed = nn.Embedding(cfg.num_queries, d)  # learnable query positions
        self.level_embed = nn.Embedding(self.num_levels, d)
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, d, 1) if in_channels != d else nn.Identity() for _ in range(self.num_levels)
        )
        for proj in self.input_proj:
            if isinstance(proj, nn.Conv2d):
                nn.init.kaiming_uniform_(proj.weight, a=1)
                nn.init.zeros_(proj.bias)
        self.class_embed = Linear(d, num_classes + 1)
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)
        for layers in (self.transformer_self_attention_layers, self.transformer_cross_attention_layers,
                       self.transformer_ffn_layers):
            for p in layers.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def forward(self, maps: list[torch.Tensor], mask_features: torch.Tensor) -> dict:
        B = mask_features.shape[0]
        # The 10 mask products read mask_features in one layout: (B, C, H*W) for the einsum,
        # channels-last for oneDNN (how inference hands it over), and under autocast of the
        # autocast dtype: cast and laid out once here, not per product (bf16: 10 x 51 ms; docs/speed.md).
        device = mask_features.device.type
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device) and mask_features.is_floating_point():
            mask_features = mask_features.to(torch.get_autocast_dtype(device))
        onednn = use_onednn(mask_features, self.query_feat.weight)
        mask_features = mask_features.contiguous(memory_format=torch.channels_last if onednn else torch.contiguous_format)
        src, pos, sizes = [], [], []  # memory and its position encoding, (B, HW, C) per level
        for i in range(self.num_levels):
            sizes.append(tuple(maps[i].shape[-2:]))
            pos.append(self.pe_layer(maps[i]).flatten(2).transpose(1, 2))
            # At inference the maps are channels-last views of the encoder's tokens: no copy.
            src.append(self.input_proj[i](maps[i]).flatten(2).transpose(1, 2) + self.level_embed.weight[i])
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, B, 1)  # (Q, B, C)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, B, 1)

        predictions = []
        cls, masks, allowed = self.predict(output, mask_features, sizes[0])
        predictions.append((cls, masks))
        for i in range(self.num_layers):
            level = i % self.num_levels
            output = self.transformer_cross_attention_layers[i](output, src[level], allowed, pos[level], query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            cls, masks, allowed = self.predict(output, mask_features, sizes[(i + 1) % self.num_levels])
            predictions.append((cls, masks))
        return {
            "pred_logits": predictions[-1][0],
            "pred_masks": predictions[-1][1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in predictions[:-1]],
        }

    def predict(self, output: torch.Tensor, mask_features: torch.Tensor, attn_size: tuple[int, int]):
        """output (Q, B, C) -> class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4), and where
        each query may attend at the next level's size, (B, Q, h*w) bool: inside its mask
        (sigmoid >= 0.5), or everywhere if its mask is empty (it would attend to nothing)."""
        x = self.decoder_norm(output).transpose(0, 1)
        cls = self.class_embed(x)
        masks = mask_logits(self.mask_embed(x), mask_features)
        attn = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
        allowed = ~(attn.sigmoid().flatten(2) < 0.5).detach()
        return cls, masks, allowed | ~allowed.any(-1, keepdim=True)


def build_transformer_decoder(in_channels: int, num_classes: int, cfg: DecoderConfig) -> MaskedAttentionDecoder:
    return MaskedAttentionDecoder(in_channels, num_classes, cfg)
