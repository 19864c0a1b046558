"""Panoptic / instance / semantic inference from Mask2Former's query predictions.

Every function works on one image: class logits (Q, K+1) (index K = "no object") and mask
logits (Q, H, W). `postprocess` runs the batch: it first maps each image's stride-4 mask
logits back to its original size (`resize_mask_logits`), then runs the enabled tasks.
Output formats follow docs/INTERFACES.md; everything is at the original (height, width).
"""
from __future__ import annotations

from collections.abc import Iterable
import torch
import torch.nn.functional as F

from proscale.config import InferenceConfig


def resize_mask_logits(
    mask_logits: torch.Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
) -> torch.Tensor:
    """Map stride-4 logits of the padded batch back to the original image.

    Upsample to the padded input size, crop away the padding (bottom / right) of this image,
    and resize to the original (pre-transform) size, all bilinear (align_corners=False).

    Args:
        mask_logits: (Q, Hp/4, Wp/4) logits of one image.
        image_size: (h, w) of the image as fed to the model, before padding.
        padded_size: (Hp, Wp) of the padded batch.
        output_size: (H0, W0) original image size.
    Returns:
        (Q, H0, W0) float32 logits.
    """
    h, w = int(image_size[0]), int(image_size[1])
    hp, wp = int(padded_size[0]), int(padded_size[1])
    x = mask_logits.float()[None]
    x = F.interpolate(x, size=(hp, wp), mode="bilinear", align_corners=False)
    x = x[:, :, :h, :w]
    x = F.interpolate(x, size=(int(output_size[0]), int(output_size[1])), mode="bilinear", align_corners=False)
    return x[0]


def semantic_inference(cls_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class scores: sum over queries of p(class) * sigmoid(mask).

    Args:
        cls_logits: (Q, K+1); mask_logits: (Q, H, W).
    Returns:
        (K, H, W) float32 (not normalised over classes; argmax gives the label).
    """
    probs = cls_logits.float().softmax(-1)[:, :-1]  # "no object" does not vote
    return torch.einsum("qk,qhw->khw", probs, mask_logits.float().sigmoid())


def panoptic_inference(
    cls_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    thing_ids: Iterable[int] | None,
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> dict:
    """Non-overlapping segments from confident queries.

    Queries with a real class and probability > `object_mask_threshold` compete for each
    pixel by score * sigmoid(mask). A query keeps the pixels it wins inside its own mask
    (sigmoid >= 0.5), unless it won less than `overlap_threshold` of that mask (it is mostly
    occluded by better queries). Stuff queries of the same class share one segment; thing
    queries each get their own.

    Args:
        cls_logits: (Q, K+1); mask_logits: (Q, H, W).
        thing_ids: contiguous ids of thing classes (None: every class is a thing).
    Returns:
        {"panoptic_seg": int32 (H, W) segment ids (0 = void),
         "segments_info": [{"id", "category_id", "isthing", "score", "area"}]}
    """
    num_classes = cls_logits.shape[-1] - 1
    scores, labels = cls_logits.float().softmax(-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes = scores[keep], labels[keep]
    cur_masks = mask_logits.float()[keep].sigmoid()  # (Qk, H, W)
    h, w = mask_logits.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_logits.device)
    segments_info: list[dict] = []
    if cur_masks.shape[0] == 0:
        return {"panoptic_seg": panoptic_seg, "segments_info": segments_info}

    winner = (cur_scores[:, None, None] * cur_masks).argmax(0)  # (H, W) index into kept queries
    things = None if thing_ids is None else set(int(c) for c in thing_ids)
    stuff_segment: dict[int, dict] = {}  # class -> its (merged) segment
    for k in range(cur_masks.shape[0]):
        category = int(cur_classes[k])
        isthing = things is None or category in things
        own = cur_masks[k] >= 0.5
        original_area = int(own.sum())
        won = winner == k
        won_area = int(won.sum())
        mask = won & own
        if original_area == 0 or won_area == 0 or not bool(mask.any()):
            continue
        # Compared with the area won anywhere, as Mask2Former does: a query that wins pixels
        # outside its own mask is not penalised for them, only one mostly beaten inside it.
        if won_area / original_area < overlap_threshold:
            continue
        if not isthing and category in stuff_segment:
            panoptic_seg[mask] = stuff_segment[category]["id"]
            continue
        segment = {"id": len(segments_info) + 1, "category_id": category, "isthing": isthing,
                   "score": float(cur_scores[k]), "area": 0}
        panoptic_seg[mask] = segment["id"]
        segments_info.append(segment)
        if not isthing:
            stuff_segment[category] = segment
    # Areas from the final map: merged stuff and later segments can change earlier ones.
    if segments_info:
        areas = torch.bincount(panoptic_seg.flatten().long(), minlength=len(segments_info) + 1).tolist()
        for segment in segments_info:
            segment["area"] = int(areas[segment["id"]])
    return {"panoptic_seg": panoptic_seg, "segments_info": segments_info}


def instance_inference(
    cls_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    thing_ids: Iterable[int] | None = None,
    topk: int = 100,
) -> dict:
    """Top-k (query, class) pairs as instances, each with its query's binary mask.

    A query can yield several detections with different classes. With `thing_ids`, only
    thing classes compete for the k slots (Mask2Former takes the top k over all classes and
    then drops stuff; ranking things only keeps the same top detections and can add more,
    which cannot lower AP).
    Score = class probability * mean sigmoid(mask) inside the binary mask (logit > 0).

    Args:
        cls_logits: (Q, K+1); mask_logits: (Q, H, W).
        thing_ids: contiguous ids allowed as instance classes (None: all K).
        topk: maximum number of detections.
    Returns:
        {"masks": bool (N, H, W), "scores": float32 (N,), "labels": int64 (N,)}, sorted by
        descending class probability, N <= topk.
    """
    q, k1 = cls_logits.shape
    num_classes = k1 - 1
    device = cls_logits.device
    probs = cls_logits.float().softmax(-1)[:, :-1]  # (Q, K)
    if thing_ids is not None:
        allowed = torch.zeros(num_classes, dtype=torch.bool, device=device)
        ids = [int(c) for c in thing_ids]
        if ids:
            allowed[torch.tensor(ids, dtype=torch.int64, device=device)] = True
        class_idx = allowed.nonzero()[:, 0]  # (K',) candidate classes
    else:
        class_idx = torch.arange(num_classes, device=device)
    probs = probs[:, class_idx]  # (Q, K')
    if probs.numel() == 0:  # no thing class at all
        h, w = mask_logits.shape[-2:]
        return {"masks": torch.zeros((0, h, w), dtype=torch.bool, device=device),
                "scores": torch.zeros(0, device=device), "labels": torch.zeros(0, dtype=torch.int64, device=device)}
    n = min(int(topk), probs.numel())
    top_scores, flat_idx = probs.flatten().topk(n, sorted=True)
    query_idx = flat_idx // class_idx.numel()
    labels = class_idx[flat_idx % class_idx.numel()]

    logits = mask_logits.float()[query_idx]  # (N, H, W)
    masks = logits > 0
    mask_probs = logits.sigmoid()
    mask_scores = (mask_probs * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    return {"masks": masks, "scores": top_scores * mask_scores, "labels": labels.to(torch.int64)}


def postprocess(
    outputs: dict,
    batch_meta: list[dict],
    cfg: InferenceConfig | None = None,
    thing_ids: Iterable[int] | None = None,
) -> list[dict]:
    """Run the enabled tasks on every image of a batch.

    Args:
        outputs: model output (INTERFACES.md): "pred_logits" (B, Q, K+1), "pred_masks"
            (B, Q, Hp/4, Wp/4), "image_sizes" [(h_i, w_i)], "padded_size" (Hp, Wp).
        batch_meta: B dicts with the original "height" and "width" (missing: the input size).
        cfg: which tasks and thresholds.
        thing_ids: contiguous thing class ids (None: every class is a thing).
    Returns:
        B dicts with, as enabled, "panoptic" ({"panoptic_seg", "segments_info"}),
        "instances" ({"masks", "scores", "labels"}) and "sem_seg" (float32 (K, H0, W0)).
    """
    cfg = cfg or InferenceConfig()
    things = None if thing_ids is None else set(int(c) for c in thing_ids)
    pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
    padded_size = outputs.get("padded_size") or tuple(4 * s for s in pred_masks.shape[-2:])
    results = []
    for i, meta in enumerate(batch_meta):
        image_size = outputs["image_sizes"][i]
        original = (int(meta.get("height", image_size[0])), int(meta.get("width", image_size[1])))
        masks = resize_mask_logits(pred_masks[i], image_size, padded_size, original)
        cls = pred_logits[i].float()
        result = {}
        if cfg.panoptic_on:
            result["panoptic"] = panoptic_inference(
                cls, masks, things, cfg.object_mask_threshold, cfg.overlap_threshold
            )
        if cfg.instance_on:
            result["instances"] = instance_inference(cls, masks, things, cfg.test_topk_per_image)
        if cfg.semantic_on:
            result["sem_seg"] = semantic_inference(cls, masks)
        results.append(result)
    return results
