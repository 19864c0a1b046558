"""Deformable DETR with a baseline or PRO-SCALE encoder: normalise and pad (with a padding
mask) -> backbone res3..res5 + extra stride-2 conv levels -> input projections -> the plan-driven
encoder over L levels (models/encoder.py, the same module Mask2Former uses) -> deformable
decoder -> class and box heads (docs/detection.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from proscale.config import DetrConfig
from proscale.models.backbone import TimmBackbone, build_backbone
from proscale.models.detr.decoder import DeformableDecoder
from proscale.models.detr.heads import box_from_reference, box_head, class_head
from proscale.models.detr.position import box_sine_encoding, masked_sine_encoding
from proscale.models.detr.two_stage import token_proposals
from proscale.models.encoder import DeformableEncoder
from proscale.models.image_batch import normalize_and_pad, padding_mask

BACKBONE_LEVELS = ("res3", "res4", "res5")  # strides 8, 16, 32: fine to coarse, as input_proj is indexed


def freeze_stem(backbone: TimmBackbone) -> int:
    """Fixes every backbone parameter outside the stride >= 8 stages (the stem and the first
    stage, e.g. ResNet's conv1 / bn1 / layer1). Returns how many tensors were frozen."""
    info = backbone.body.feature_info.get_dicts()
    trainable = {d["module"].split(".")[0] for d in info if d["reduction"] >= 8}
    frozen = 0
    for name, p in backbone.body.named_parameters():
        if name.split(".")[0] not in trainable:
            p.requires_grad_(False)
            frozen += 1
    return frozen


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) padding mask -> (B, 2): the (width, height) fraction of the map that is image."""
    return torch.stack(((~mask[:, 0, :]).sum(1) / mask.shape[2], (~mask[:, :, 0]).sum(1) / mask.shape[1]), -1)


class DeformableDETR(nn.Module):
    """forward(images): a (B, 3, H, W) tensor or a list of (3, H_i, W_i) tensors, RGB in 0-255.
    Returns
        {"pred_logits": (B, Q, K) class logits (sigmoid, no background class),
         "pred_boxes": (B, Q, 4) (cx, cy, w, h) in [0, 1] of each image (not of the padded batch),
         "aux_outputs": [{"pred_logits", "pred_boxes"}] * (decoder layers - 1),
         "enc_outputs": {"pred_logits": (B, S, K), "pred_boxes": (B, S, 4)} (two-stage only),
         "image_sizes": [(H_i, W_i)], "padded_size": (Hp, Wp)}

    Levels are coarse to fine everywhere (level_embed, encoder tokens, MSDA weights); the
    input projections are indexed in backbone order: res3, res4, res5, then the extra convs.
    The class and box heads are one module per prediction with box refinement, else one shared.
    """

    def __init__(self, backbone: TimmBackbone, cfg: DetrConfig):
        super().__init__()
        enc, dec = cfg.encoder, cfg.decoder
        d = enc.d_model
        L = len(enc.plan)
        if L < len(BACKBONE_LEVELS):
            raise ValueError(f"a detector encoder plan needs >= 3 levels (res5, res4, res3 and extra "
                             f"stride-64+ levels, coarse to fine), got {tuple(enc.plan)}")
        self.cfg = cfg
        self.backbone = backbone
        channels = backbone.out_channels
        proj = [nn.Sequential(nn.Conv2d(channels[name], d, 1), nn.GroupNorm(32, d)) for name in BACKBONE_LEVELS]
        in_ch = channels["res5"]
        for _ in range(L - len(BACKBONE_LEVELS)):  # extra coarser levels: 3x3 stride-2 convs
            proj.append(nn.Sequential(nn.Conv2d(in_ch, d, 3, stride=2, padding=1), nn.GroupNorm(32, d)))
            in_ch = d
        self.input_proj = nn.ModuleList(proj)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight)
            nn.init.zeros_(p[0].bias)
        self.level_embed = nn.Parameter(torch.empty(L, d))
        nn.init.normal_(self.level_embed)
        self.encoder = DeformableEncoder(enc)
        self.decoder = DeformableDecoder(dec, d, L)
        self.num_levels, self.two_stage, self.box_refine = L, dec.two_stage, dec.box_refine
        if dec.two_stage:  # queries from the encoder's best proposals
            self.enc_output = nn.Linear(d, d)
            self.enc_output_norm = nn.LayerNorm(d)
            self.pos_trans = nn.Linear(2 * d, 2 * d)
            self.pos_trans_norm = nn.LayerNorm(2 * d)
        else:  # learned queries: position (first d) and content (last d); reference point from the position
            self.query_embed = nn.Embedding(dec.num_queries, 2 * d)
            self.reference_points = nn.Linear(d, 2)
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
        n_pred = dec.layers + (1 if dec.two_stage else 0)  # + the encoder's proposal head
        n_heads = n_pred if dec.box_refine else 1
        self.class_embed = nn.ModuleList(class_head(d, cfg.num_classes) for _ in range(n_heads))
        self.bbox_embed = nn.ModuleList(box_head(d) for _ in range(n_heads))
        for name, value in (("pixel_mean", cfg.pixel_mean), ("pixel_std", cfg.pixel_std)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.class_embed[0].out_features

    def heads(self, i: int) -> tuple[nn.Module, nn.Module]:
        """(class head, box head) of prediction i (decoder layer i; `layers` = two-stage encoder)."""
        k = min(i, len(self.class_embed) - 1)
        return self.class_embed[k], self.bbox_embed[k]

    @property
    def size_divisibility(self) -> int:
        return self.cfg.size_divisibility

    def preprocess(self, images) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise and pad -> ((B, 3, Hp, Wp) float, [(H_i, W_i)])."""
        return normalize_and_pad(images, self.pixel_mean, self.pixel_std, self.cfg.size_divisibility)

    def levels(self, features: dict[str, torch.Tensor], pad: torch.Tensor):
        """Backbone features + image padding mask (B, Hp, Wp) -> per level, coarse to fine:
        projected maps (B, C, H_l, W_l) and padding masks (B, H_l, W_l)."""
        maps = [self.input_proj[i](features[name]) for i, name in enumerate(BACKBONE_LEVELS)]
        src = features["res5"]
        for proj in self.input_proj[len(BACKBONE_LEVELS):]:
            src = proj(src)
            maps.append(src)
        maps = maps[::-1]
        masks = [F.interpolate(pad[None].float(), size=m.shape[-2:])[0].bool() for m in maps]
        return maps, masks

    def forward_encoder(self, maps: list[torch.Tensor], masks: list[torch.Tensor]):
        """Levels (coarse to fine) -> (memory (B, S, C), padding mask (B, S), shapes, valid ratios (B, L, 2))."""
        shapes = tuple((m.shape[-2], m.shape[-1]) for m in maps)
        d = maps[0].shape[1]
        tokens = [m.flatten(2).transpose(1, 2) for m in maps]
        pos = [masked_sine_encoding(mk, d // 2).to(m.dtype).flatten(2).transpose(1, 2)
               + self.level_embed[lvl].view(1, 1, -1) for lvl, (m, mk) in enumerate(zip(maps, masks))]
        flat_mask = torch.cat([mk.flatten(1) for mk in masks], 1)
        valid_ratios = torch.stack([valid_ratio(mk) for mk in masks], 1).to(maps[0].dtype)
        memory = self.encoder(tokens, pos, shapes, padding_mask=flat_mask, valid_ratios=valid_ratios)
        return memory, flat_mask, shapes, valid_ratios

    def queries(self, memory: torch.Tensor, flat_mask: torch.Tensor, shapes) -> tuple:
        """-> (tgt (B, Q, C), query_pos (B, Q, C), reference (B, Q, 2 or 4), enc_outputs or None)."""
        B, _, d = memory.shape
        if not self.two_stage:
            query_pos, tgt = self.query_embed.weight.split(d, dim=1)
            query_pos = query_pos[None].expand(B, -1, -1)
            return tgt[None].expand(B, -1, -1), query_pos, self.reference_points(query_pos).sigmoid(), None
        if memory.shape[1] < self.cfg.decoder.num_queries:
            raise ValueError(f"two-stage: the image gives {memory.shape[1]} encoder tokens, fewer than the "
                             f"{self.cfg.decoder.num_queries} proposals to keep (decoder.num_queries): "
                             "use larger images")
        proposals, usable = token_proposals(flat_mask, shapes)
        obj = self.enc_output_norm(self.enc_output(memory.masked_fill(~usable, 0.0)))
        cls_head, box_head_ = self.heads(len(self.decoder.layers))
        enc_logits = cls_head(obj)
        enc_box_logits = box_head_(obj) + proposals
        # Rank the proposals by their first class's logit, as Deformable DETR does.
        top = torch.topk(enc_logits[..., 0], self.cfg.decoder.num_queries, dim=1).indices
        top_logits = torch.gather(enc_box_logits, 1, top[..., None].expand(-1, -1, 4)).detach()
        pos_tgt = self.pos_trans_norm(self.pos_trans(box_sine_encoding(top_logits, d // 2)))
        query_pos, tgt = pos_tgt.split(d, dim=2)
        enc_outputs = {"pred_logits": enc_logits, "pred_boxes": enc_box_logits.sigmoid()}
        return tgt, query_pos, top_logits.sigmoid(), enc_outputs

    def forward(self, images) -> dict:
        x, sizes = self.preprocess(images)
        pad = padding_mask(sizes, tuple(x.shape[-2:]), x.device)
        maps, masks = self.levels(self.backbone(x), pad)
        memory, flat_mask, shapes, valid_ratios = self.forward_encoder(maps, masks)
        tgt, query_pos, reference, enc_outputs = self.queries(memory, flat_mask, shapes)
        refine = [self.heads(i)[1] for i in range(len(self.decoder.layers))] if self.box_refine else None
        hidden, references = self.decoder(tgt, query_pos, reference, memory, shapes, flat_mask, valid_ratios, refine)
        preds = []
        for i, (h, ref) in enumerate(zip(hidden, references)):
            cls_head, box_head_ = self.heads(i)
            preds.append({"pred_logits": cls_head(h), "pred_boxes": box_from_reference(box_head_(h), ref)})
        out = dict(preds[-1], aux_outputs=preds[:-1], image_sizes=sizes, padded_size=tuple(x.shape[-2:]))
        if enc_outputs is not None:
            out["enc_outputs"] = enc_outputs
        return out


def build_detr(cfg: DetrConfig) -> DeformableDETR:
    backbone = build_backbone(cfg.backbone)
    if cfg.freeze_stem:
        freeze_stem(backbone)
    return DeformableDETR(backbone, cfg)
