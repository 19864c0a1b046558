"""Which images may share a forward pass without changing each other's results.

MaskFormer pads a batch with zeros at the bottom/right to a multiple of `size_divisibility`
(32) of the largest image. Its backbone convolutions, the deformable encoder (reference points
are normalised by the padded map) and the masked-attention decoder all see that padding, so an
image padded further than it would be alone gets other results (0.5 in the class logits of a
random tiny model, measured). Images whose own padded size is the same go through the model
exactly as they would one at a time: batching them changes nothing but the speed.

    padded_shape((70, 90), 32)                           -> (96, 96)
    group_by_padded_shape([(70, 90), (80, 96), (120, 90)], 32, batch_size=8) -> [[0, 1], [2]]
"""
from __future__ import annotations

from typing import Sequence


def padded_shape(size: Sequence[int], divisibility: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of `divisibility` (what MaskFormer pads one image to)."""
    h, w = int(size[0]), int(size[1])
    d = max(int(divisibility), 1)
    return -(-h // d) * d, -(-w // d) * d


def group_by_padded_shape(sizes: Sequence[Sequence[int]], divisibility: int,
                          batch_size: int | None = None) -> list[list[int]]:
    """Indices of `sizes` ((H, W) of each image as fed to the model) in groups of at most
    `batch_size` (None: no limit) whose images pad to the same shape; groups in the order of
    their first image, indices ascending inside each."""
    groups: dict[tuple[int, int], list[list[int]]] = {}
    order: list[list[int]] = []
    for i, size in enumerate(sizes):
        chunks = groups.setdefault(padded_shape(size, divisibility), [])
        if not chunks or (batch_size is not None and len(chunks[-1]) >= batch_size):
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(i)
    return order
