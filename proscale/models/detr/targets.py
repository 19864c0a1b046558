"""Box targets from the data: the data sets give instance masks (COCO instances, the panoptic
things, the synthetic data), so a box is the tight box of its mask after augmentation."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """bool (N, H, W) -> (N, 4) float (x0, y0, x1, y1) in pixels, the pixel edges of each mask's
    extent (x1 = last column + 1); an empty mask gives (0, 0, 0, 0)."""
    n = masks.shape[0]
    if n == 0:
        return torch.zeros(0, 4, device=masks.device)
    cols = masks.any(1)  # (N, W)
    rows = masks.any(2)  # (N, H)
    w, h = cols.shape[1], rows.shape[1]
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x0 = torch.where(cols, xs, w).min(1).values
    x1 = torch.where(cols, xs, -1).max(1).values + 1
    y0 = torch.where(rows, ys, h).min(1).values
    y1 = torch.where(rows, ys, -1).max(1).values + 1
    boxes = torch.stack((x0, y0, x1, y1), 1).float()
    return torch.where(masks.flatten(1).any(1)[:, None], boxes, torch.zeros_like(boxes))


def box_targets(targets: list[dict], image_sizes: list[tuple[int, int]],
                classes: Sequence[int] | None = None) -> list[dict]:
    """[{"labels": (N,), "masks": bool (N, H_i, W_i) or "boxes": (N, 4) xyxy pixels}] ->
    [{"labels": (M,), "boxes": (M, 4) (cx, cy, w, h) normalised by the image size}], dropping
    empty instances (masks cropped away by augmentation) and, when `classes` is given, labels
    outside it (a panoptic data set's stuff segments are not objects)."""
    out = []
    for t, (h, w) in zip(targets, image_sizes):
        xyxy = t["boxes"].float() if "boxes" in t else mask_boxes(t["masks"][:, :h, :w])
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        if classes is not None:
            keep &= torch.isin(t["labels"], torch.as_tensor(list(classes), dtype=t["labels"].dtype,
                                                            device=t["labels"].device))
        xyxy = xyxy[keep] / xyxy.new_tensor([w, h, w, h])
        cxcywh = torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1)
        out.append({"labels": t["labels"][keep], "boxes": cxcywh})
    return out
