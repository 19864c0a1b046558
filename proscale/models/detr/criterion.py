"""Deformable DETR's set loss: Hungarian matching on class + box costs, then a sigmoid focal
class loss over all queries and L1 + generalized-IoU box losses on the matched ones, for the
final prediction, every auxiliary one and (two-stage) the encoder proposals.

Losses are normalised by the number of target boxes (averaged over processes), so the trainer
scales them as it scales Mask2Former's mask losses (keys not starting with "loss_ce").
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from proscale.config import LossConfig
from proscale.distributed import all_reduce_tensor
from proscale.models.detr.targets import box_targets

_SUFFIX = re.compile(r"_(\d+|enc)$")
_BIG_COST = 1e8  # finite stand-in for NaN / inf costs (linear_sum_assignment rejects them)


def xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


class BoxMatcher(nn.Module):
    """One-to-one assignment of Q queries to N target boxes per image, minimising
    cost_class * focal(p_class) + cost_bbox * L1(cx, cy, w, h) - cost_giou * GIoU."""

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, target: dict) -> torch.Tensor:
        """logits (Q, K), boxes (Q, 4) of one image -> (Q, N) cost."""
        p = logits.float().sigmoid()[:, target["labels"]]  # (Q, N)
        # The focal loss of predicting the target class minus that of not predicting it.
        pos = self.alpha * (1 - p) ** self.gamma * -(p + 1e-8).log()
        neg = (1 - self.alpha) * p ** self.gamma * -(1 - p + 1e-8).log()
        tb = target["boxes"]
        cost = (self.cost_class * (pos - neg) + self.cost_bbox * torch.cdist(boxes.float(), tb, p=1)
                - self.cost_giou * generalized_box_iou(xyxy(boxes.float()), xyxy(tb)))
        return torch.nan_to_num(cost, nan=_BIG_COST, posinf=_BIG_COST, neginf=-_BIG_COST)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """-> per image (query indices, target indices), int64 (M,) each, on the CPU."""
        out = []
        for b, target in enumerate(targets):
            if len(target["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty))
                continue
            cost = self.cost_matrix(outputs["pred_logits"][b], outputs["pred_boxes"][b], target).cpu()
            rows, cols = linear_sum_assignment(cost.numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out


class DetrCriterion(nn.Module):
    """forward(outputs, targets) -> unweighted losses {"loss_focal", "loss_bbox", "loss_giou"},
    the same keys suffixed `_i` for aux prediction i and `_enc` for the two-stage proposals
    (class-agnostic: every target counts as class 0, as Deformable DETR trains them).
    `weight(key)` gives a key's weight; targets carry "labels" and "masks" (or "boxes", xyxy
    pixels) at each image's size, which `outputs["image_sizes"]` gives. `object_classes`: the
    labels that are objects (a panoptic data set's things); None: all."""

    def __init__(self, num_classes: int, matcher: BoxMatcher, cfg: LossConfig | None = None,
                 object_classes: Sequence[int] | None = None):
        super().__init__()
        self.object_classes = None if object_classes is None else [int(c) for c in object_classes]
        self.cfg = cfg = cfg or LossConfig()
        self.num_classes, self.matcher = num_classes, matcher
        self.base_weights = {"loss_focal": cfg.class_weight, "loss_bbox": cfg.bbox_weight, "loss_giou": cfg.giou_weight}
        self.weight_dict: dict[str, float] = dict(self.base_weights)

    def weight(self, key: str) -> float:
        return self.base_weights[_SUFFIX.sub("", key)]

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weight(k) * v for k, v in losses.items())

    def _losses(self, outputs: dict, targets: list[dict], num_boxes: float, suffix: str) -> dict:
        indices = self.matcher(outputs, targets)
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        onehot = torch.zeros_like(logits)
        labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
        onehot[batch_idx, query_idx, labels.to(logits.device)] = 1.0
        focal = sigmoid_focal_loss(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma, reduction="sum")
        src = boxes[batch_idx, query_idx]
        tgt = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)]).to(src)
        l1 = (src - tgt).abs().sum()
        giou = (1 - torch.diag(generalized_box_iou(xyxy(src), xyxy(tgt)))).sum() if len(src) else src.sum()
        return {f"loss_focal{suffix}": focal / num_boxes, f"loss_bbox{suffix}": l1 / num_boxes,
                f"loss_giou{suffix}": giou / num_boxes}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        targets = box_targets(targets, outputs["image_sizes"], self.object_classes)
        n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=outputs["pred_logits"].device)
        num_boxes = max(all_reduce_tensor(n, "mean").item(), 1.0)
        with torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False):
            losses = self._losses(outputs, targets, num_boxes, "")
            if self.cfg.deep_supervision:
                for i, aux in enumerate(outputs.get("aux_outputs") or []):
                    losses.update(self._losses(aux, targets, num_boxes, f"_{i}"))
            if "enc_outputs" in outputs:
                agnostic = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
                losses.update(self._losses(outputs["enc_outputs"], agnostic, num_boxes, "_enc"))
        for k in losses:
            self.weight_dict.setdefault(k, self.weight(k))
        return losses

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, cfg={self.cfg}"


def build_detr_criterion(num_classes: int, cfg: LossConfig | None = None,
                         object_classes: Sequence[int] | None = None) -> DetrCriterion:
    """The matcher uses the loss weights as its costs (class 2, L1 5, GIoU 2 by default)."""
    cfg = cfg or LossConfig()
    matcher = BoxMatcher(cfg.class_weight, cfg.bbox_weight, cfg.giou_weight, cfg.focal_alpha, cfg.focal_gamma)
    return DetrCriterion(num_classes, matcher, cfg, object_classes)
