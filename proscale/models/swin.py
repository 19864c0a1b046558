"""timm's Swin, made to compute what the original Swin (and so Mask2Former's D2SwinTransformer) does.

Two differences at sizes other than timm's 224x224, both in the shifted-window attention:
  1. Order. The original pads each map to whole windows first, then rolls it by the shift and
     builds the shift mask on the padded size; timm (1.0) rolls first, then pads. Where a map is
     not a multiple of the window (e.g. 200x272 at 800x1088), the windows hold other tokens.
  2. Shift. timm turns the shift off, once, for every stage whose map at its `img_size` (224) is
     no larger than the window: stage 4 (7x7) never shifts, whatever the input. The original
     shifts every second block of every stage.
`make_original_swin_(body)` replaces each block's window attention with the original order and
keeps the window and shift as configured (timm's `always_partition`). tests/test_backbone_swin.py
compares the result with transformers' Swin (another implementation of the original).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _original_window_attention(self, x: torch.Tensor) -> torch.Tensor:
    """Shifted-window attention of one block in the original order: pad, roll, attend, unroll, crop.

    x: (B, H, W, C) after the block's first LayerNorm -> (B, H, W, C)."""
    from timm.models.swin_transformer import window_partition, window_reverse

    b, h, w, c = x.shape
    wh, ww = self.window_size
    x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))  # zeros at the bottom / right
    hp, wp = x.shape[1], x.shape[2]
    shift = tuple(self.shift_size)
    mask = None
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        mask = self.get_attn_mask(x)  # regions of the padded, rolled map (the original's mask_matrix)
    windows = window_partition(x, self.window_size).view(-1, wh * ww, c)
    windows = self.attn(windows, mask=mask).view(-1, wh, ww, c)
    x = window_reverse(windows, self.window_size, hp, wp)
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


def make_original_swin_(body: nn.Module) -> nn.Module:
    """Every timm SwinTransformerBlock in `body` computes its window attention as the original
    Swin does (module docstring). The blocks must be built with `always_partition=True`."""
    from timm.models.swin_transformer import SwinTransformerBlock

    for block in body.modules():
        if isinstance(block, SwinTransformerBlock):
            if not block.always_partition:
                raise ValueError("build the timm Swin with always_partition=True (keeps every shift)")
            block._attn = types.MethodType(_original_window_attention, block)
    return body
