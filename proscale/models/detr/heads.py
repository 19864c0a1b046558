"""Prediction heads and box-coordinate helpers of Deformable DETR."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them: (..., in_dim) -> (..., out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms kept >= eps."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_from_reference(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A box head's output relative to a reference -> (..., 4) boxes (cx, cy, w, h) in [0, 1].

    delta: (..., 4) logits offsets; reference: (..., 2) points or (..., 4) boxes in [0, 1]. A
    point moves only the centre; the size is then the head's output alone."""
    ref = inverse_sigmoid(reference)
    if reference.shape[-1] == 4:
        return (delta + ref).sigmoid()
    return torch.cat((delta[..., :2] + ref, delta[..., 2:]), -1).sigmoid()


def class_head(d_model: int, num_classes: int, prior: float = 0.01) -> nn.Linear:
    """Linear(d -> K) whose sigmoid starts at `prior` for every class (focal loss init)."""
    head = nn.Linear(d_model, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - prior) / prior))
    return head


def box_head(d_model: int) -> MLP:
    """3-layer MLP -> 4 box logits; starts at the reference centre with small boxes."""
    head = MLP(d_model, d_model, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    with torch.no_grad():
        head.layers[-1].bias[2:] = -2.0
    return head
