"""Images in, one normalised, padded batch out (shared by the segmentation and detection models)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_and_pad(images, pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
                      size_divisibility: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """images: a (B, 3, H, W) tensor or a list of (3, H_i, W_i) tensors, RGB in 0-255.
    pixel_mean / pixel_std: (3, 1, 1). Each image is normalised, then padded with zeros at the
    bottom/right to (Hp, Wp), multiples of `size_divisibility`.
    Returns ((B, 3, Hp, Wp) float, [(H_i, W_i)])."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        images = list(images)
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    div = size_divisibility
    hp = -(-max(h for h, _ in sizes) // div) * div
    wp = -(-max(w for _, w in sizes) // div) * div
    batch = []
    for im in images:
        x = (im.to(pixel_mean.device, torch.float32) - pixel_mean) / pixel_std
        batch.append(F.pad(x, (0, wp - x.shape[-1], 0, hp - x.shape[-2])))
    return torch.stack(batch), sizes


def padding_mask(sizes: list[tuple[int, int]], padded: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(B, Hp, Wp) bool, True on the padding added to each image of size (H_i, W_i)."""
    mask = torch.ones((len(sizes), *padded), dtype=torch.bool, device=device)
    for i, (h, w) in enumerate(sizes):
        mask[i, :h, :w] = False
    return mask
