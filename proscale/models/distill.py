"""Feature distillation: pull a student's pixel-decoder outputs towards a trained teacher's.

Used to upgrade a trained Mask2Former to PRO-SCALE (docs/upgrade.md): the student is warm-started
from the teacher (proscale/checkpoints/warm_start.py), so everything after the pixel decoder
already expects the teacher's multi-scale maps and mask features; what changed is the encoder,
and this loss tells it directly what its outputs should be, on every training image, instead of
only through the set losses of the masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def feature_distill_loss(student: dict, teacher: dict) -> torch.Tensor:
    """Mean over the maps of their mean squared errors; a float32 scalar.

    student, teacher: {"mask_features": (B, D, H/4, W/4), "maps": [(B, C, H_l, W_l)] * L}
    (MaskFormer.forward_pixel_decoder), with equal shapes.
    """
    pairs = [(student["mask_features"], teacher["mask_features"])] + list(zip(student["maps"], teacher["maps"]))
    for s, t in pairs:
        if s.shape != t.shape:
            raise ValueError(f"distillation: student map {tuple(s.shape)} vs teacher map {tuple(t.shape)}; "
                             f"the teacher must have the student's widths and output strides")
    return torch.stack([F.mse_loss(s.float(), t.float().detach()) for s, t in pairs]).mean()


class FeatureTeacher(nn.Module):
    """A frozen model whose pixel-decoder outputs are the distillation targets.

    forward(images) -> {"mask_features", "maps"} of the teacher (no gradient, eval mode: the
    teacher's BatchNorm statistics and dropout never change).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FeatureTeacher":
        return super().train(False)  # always eval

    @torch.no_grad()
    def forward(self, images) -> dict:
        return self.model.forward_pixel_decoder(images)[0]
