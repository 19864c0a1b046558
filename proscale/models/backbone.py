"""Backbones from timm (`features_only`), returning res2..res5 (strides 4, 8, 16, 32)."""
from __future__ import annotations

import timm
import torch
from torch import nn

from proscale.config import BackboneConfig
from proscale.models.swin import make_original_swin_


class TimmBackbone(nn.Module):
    """Wraps a timm `features_only` model. `pretrained=True` lets timm fetch the weights (it
    needs the model hub); False builds random weights and downloads nothing.

    forward: (B, 3, H, W) normalised images -> {"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)}
    out_norms: a LayerNorm over the channels of each output map (`out_norms.i`), as the original
    Swin's output stages have (detectron2's backbone.norm{i}).
    """

    def __init__(self, name: str, pretrained: bool = False, freeze_bn: bool = False, drop_path_rate: float = 0.0,
                 out_norms: bool = False):
        super().__init__()
        kwargs = {"features_only": True, "pretrained": pretrained}
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        swin = "swin" in name
        if swin:
            # Accept any input size that is a multiple of 32 (windows are padded inside), and keep
            # every window shift: the original Swin's windows (models/swin.py).
            kwargs.update(strict_img_size=False, always_partition=True)
        body = timm.create_model(name, **kwargs)
        reductions = body.feature_info.reduction()
        wanted = [reductions.index(r) for r in (4, 8, 16, 32)]
        if len(reductions) != 4:
            body = timm.create_model(name, out_indices=tuple(wanted), **kwargs)
        self.body = make_original_swin_(body) if swin else body
        self.channels = body.feature_info.channels()
        self.names = ("res2", "res3", "res4", "res5")
        # Swin / ConvNeXt-style timm models may return channels-last maps.
        self.channels_last = getattr(body, "output_fmt", "NCHW") == "NHWC"
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels) if out_norms else None
        if freeze_bn:
            timm.layers.freeze_batch_norm_2d(self.body)

    @property
    def out_channels(self) -> dict[str, int]:
        return dict(zip(self.names, self.channels))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x)
        if self.out_norms is not None:  # LayerNorm over channels: on (B, H, W, C) maps
            feats = [f if self.channels_last else f.permute(0, 2, 3, 1) for f in feats]
            feats = [norm(f).permute(0, 3, 1, 2) for norm, f in zip(self.out_norms, feats)]
        elif self.channels_last:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return dict(zip(self.names, feats))


def build_backbone(cfg: BackboneConfig) -> TimmBackbone:
    return TimmBackbone(cfg.name, pretrained=cfg.pretrained, freeze_bn=cfg.freeze_bn, drop_path_rate=cfg.drop_path_rate,
                        out_norms=cfg.out_norms)
