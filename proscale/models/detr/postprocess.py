"""Deformable DETR's inference: the k highest (query, class) sigmoid scores per image, their
boxes scaled to the original image size."""
from __future__ import annotations

import torch
from torchvision.ops import box_convert


@torch.no_grad()
def detections(outputs: dict, target_sizes: list[tuple[int, int]], topk: int = 100) -> list[dict]:
    """outputs: the model's {"pred_logits": (B, Q, K), "pred_boxes": (B, Q, 4) (cx, cy, w, h)
    in [0, 1] of each image}; target_sizes: [(H, W)] to scale each image's boxes to.
    Returns per image {"scores": (k,), "labels": (k,) int64, "boxes": (k, 4) (x0, y0, x1, y1)
    pixels, "queries": (k,) int64}, highest score first; a query may appear with several classes."""
    logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
    B, Q, K = logits.shape
    k = min(topk, Q * K)
    scores, flat = logits.sigmoid().view(B, -1).topk(k, dim=1)
    queries, labels = flat // K, flat % K
    results = []
    for b, (h, w) in enumerate(target_sizes):
        xyxy = box_convert(boxes[b, queries[b]], "cxcywh", "xyxy") * boxes.new_tensor([w, h, w, h])
        results.append({"scores": scores[b], "labels": labels[b], "boxes": xyxy, "queries": queries[b]})
    return results
