"""transformers' Mask2Former as a benchmark peer: same config, random weights, same inputs.

`build_hf_peer(cfg)` returns a module with the surface `analysis.benchmark` times
(`preprocess`, `backbone`, `pixel_decoder`, `num_classes`, forward -> {"pred_logits",
"pred_masks", "padded_size"}), so both implementations run the same measured code paths.
Only the baseline encoder exists there: PRO-SCALE configs are refused.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from proscale.config import ModelConfig


class HFPeer(nn.Module):
    def __init__(self, hf_model: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.hf = hf_model
        self.cfg = cfg
        # Normalisation and /32 padding are ours on both sides: the same pixels go in.
        from proscale.models.maskformer import MaskFormer

        self._pre = MaskFormer(nn.Identity(), nn.Identity(), nn.Identity(), cfg.pixel_mean, cfg.pixel_std,
                               cfg.size_divisibility)
        level = hf_model.model.pixel_level_module
        self._backbone, self._decoder = level.encoder, level.decoder

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def preprocess(self, images):
        self._pre.to(next(self.hf.parameters()).device)
        return self._pre.preprocess(images)

    def backbone(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(("res2", "res3", "res4", "res5"), self._backbone(x).feature_maps))

    def pixel_decoder(self, feats: dict[str, torch.Tensor]):
        out = self._decoder([feats[k] for k in ("res2", "res3", "res4", "res5")])
        return out.mask_features, list(out.multi_scale_features)

    def forward(self, images) -> dict:
        x, sizes = self.preprocess(images)
        out = self.hf(pixel_values=x)
        aux = [{"pred_logits": a["class_queries_logits"], "pred_masks": a["masks_queries_logits"]}
               for a in (out.auxiliary_logits or [])]
        return {"pred_logits": out.class_queries_logits, "pred_masks": out.masks_queries_logits,
                "aux_outputs": aux, "image_sizes": sizes, "padded_size": tuple(x.shape[-2:])}


def hf_config_from(cfg: ModelConfig):
    """The transformers Mask2FormerConfig of a baseline proscale config (timm backbone)."""
    import transformers

    enc, dec = cfg.encoder, cfg.decoder
    if tuple(enc.plan)[:2] != (0, 0) or enc.trc or enc.output != "conv":
        raise ValueError("transformers' Mask2Former has only the baseline encoder; give a Mask2Former preset")
    backbone = transformers.TimmBackboneConfig(backbone=cfg.backbone.name, out_indices=[1, 2, 3, 4],
                                               freeze_batch_norm_2d=cfg.backbone.freeze_bn)
    return transformers.Mask2FormerConfig(
        backbone_config=backbone, feature_size=enc.d_model, mask_feature_size=dec.mask_dim, hidden_dim=dec.hidden_dim,
        encoder_feedforward_dim=enc.ffn_dim, encoder_layers=enc.plan[2], decoder_layers=dec.dec_layers + 1,
        num_attention_heads=enc.n_heads, dim_feedforward=dec.dim_feedforward, num_queries=dec.num_queries,
        num_labels=cfg.num_classes, output_auxiliary_logits=True)


def build_hf_peer(cfg: ModelConfig, num_classes: int | None = None) -> HFPeer:
    import transformers

    if num_classes is not None:
        cfg = dataclasses.replace(cfg, num_classes=num_classes)  # never the caller's config
    model = transformers.Mask2FormerForUniversalSegmentation(hf_config_from(cfg))
    return HFPeer(model, cfg)
