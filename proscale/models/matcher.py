"""Hungarian matching of predicted queries to ground-truth masks (DETR / Mask2Former).

For every image a (Q, N) cost matrix is built from a class cost and two mask costs, and
`scipy.optimize.linear_sum_assignment` picks the one-to-one assignment of lowest total cost.
Mask costs are computed on the same P uniformly random points for predictions and targets
(normalised coordinates of the padded image), so the stride-4 logits and the full-size
target masks need not share a resolution; the targets must however be padded to the
batch's padded size (see `criterion.pad_targets`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from proscale.models.point_sampling import point_sample

# Finite stand-in for NaN / inf costs: linear_sum_assignment rejects non-finite matrices; a
# non-finite prediction then still gets matched and the loss reports the problem instead.
_BIG_COST = 1e8


def batch_sigmoid_ce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid binary cross-entropy of every prediction against every target.

    BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x), so the pairwise mean over points is
    two matrix products instead of a loop over (query, target) pairs.

    Args:
        logits: (Q, P) predicted mask logits at the points.
        targets: (N, P) target mask values in [0, 1] at the same points.
    Returns:
        (Q, N) cost.
    """
    num_points = logits.shape[1]
    pos = F.softplus(-logits)  # loss where the target is 1
    neg = F.softplus(logits)  # loss where the target is 0
    return (pos @ targets.T + neg @ (1 - targets).T) / num_points


def batch_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice coefficient (with +1 smoothing) of every prediction vs every target.

    Args:
        logits: (Q, P) predicted mask logits.
        targets: (N, P) target mask values in [0, 1].
    Returns:
        (Q, N) cost.
    """
    probs = logits.sigmoid()
    numerator = 2 * (probs @ targets.T)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets, per image.

    cost = cost_class * (-p(target class)) + cost_mask * BCE + cost_dice * (1 - Dice)
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    def cost_matrix(
        self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, target: dict, coords: torch.Tensor
    ) -> torch.Tensor:
        """Cost of every query against every target of one image.

        Args:
            pred_logits: (Q, K+1) class logits.
            pred_masks: (Q, h, w) mask logits.
            target: {"labels": int64 (N,), "masks": bool/float (N, H, W)} (padded size).
            coords: (P, 2) points (x, y) in [0, 1], shared by predictions and targets.
        Returns:
            (Q, N) float32 cost.
        """
        device = pred_logits.device
        prob = pred_logits.float().softmax(-1)
        cost_class = -prob[:, target["labels"].to(device)]  # (Q, N)
        # Sample all Q (resp. N) maps as channels of one image: no (Q, P, 2) copy of the points.
        pts = coords[None]
        out_mask = point_sample(pred_masks.float()[None], pts)[0]  # (Q, P)
        tgt_mask = point_sample(target["masks"].to(device, torch.float32)[None], pts)[0]  # (N, P)
        cost_mask = batch_sigmoid_ce_cost(out_mask, tgt_mask)
        cost_dice = batch_dice_cost(out_mask, tgt_mask)
        cost = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
        return cost

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w)}.
            targets: B dicts {"labels": int64 (N_b,), "masks": (N_b, H, W)}, masks padded to
                the batch's padded size.
        Returns:
            B pairs (pred_idx, tgt_idx) of int64 CPU tensors of length min(Q, N_b):
            query pred_idx[i] is matched to target tgt_idx[i].
        """
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        device = pred_logits.device
        indices = []
        # Costs in fp32 even under AMP: fp16 BCE/dice sums over 12k points lose the ranking.
        with torch.autocast(device_type=device.type, enabled=False):
            for b, target in enumerate(targets):
                n = len(target["labels"])
                if n == 0:
                    empty = torch.empty(0, dtype=torch.int64)
                    indices.append((empty, empty.clone()))
                    continue
                coords = torch.rand(self.num_points, 2, device=device)
                cost = self.cost_matrix(pred_logits[b], pred_masks[b], target, coords)
                cost = torch.nan_to_num(cost, nan=_BIG_COST, posinf=_BIG_COST, neginf=-_BIG_COST)
                rows, cols = linear_sum_assignment(cost.cpu().numpy())
                indices.append(
                    (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
                )
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )
