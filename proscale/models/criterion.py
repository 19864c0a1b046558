"""Set criterion of Mask2Former: Hungarian matching, then class / mask / dice losses.

After matching (see `matcher.py`), every query gets a class target (its matched target's
label, or "no object" = K), and every matched query a mask target. Mask losses are computed
on P importance-sampled points per matched mask (PointRend), not on every pixel. The same
losses are applied to the final prediction and, with deep supervision, to every
intermediate decoder prediction in `aux_outputs` (keys suffixed `_0` .. `_{n-1}`).

Targets are full-resolution masks of the *padded* image (4x the logits' size): sampling uses
normalised coordinates, so their resolution may differ from the logits', but their extent
must be the padded extent. `SetCriterion.forward` pads them itself (zeros at the bottom /
right) when `outputs["padded_size"]` is given; `pad_targets` does the same for other callers.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from proscale.config import LossConfig
from proscale.distributed import all_reduce_tensor
from proscale.models.matcher import HungarianMatcher
from proscale.models.point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

LOSS_NAMES = ("loss_ce", "loss_mask", "loss_dice")
_AUX_SUFFIX = re.compile(r"_\d+$")


def pad_targets(targets: list[dict], padded_size: tuple[int, int]) -> list[dict]:
    """Zero-pad every target's masks at the bottom / right to the batch's padded size.

    Args:
        targets: dicts with "masks" (N, H, W) (bool or float), H <= Hp, W <= Wp; other keys
            are passed through unchanged.
        padded_size: (Hp, Wp).
    Returns:
        new dicts whose "masks" are (N, Hp, Wp), same dtype.
    """
    hp, wp = int(padded_size[0]), int(padded_size[1])
    out = []
    for t in targets:
        masks = t["masks"]
        h, w = masks.shape[-2:]
        if h > hp or w > wp:
            raise ValueError(f"target masks {h}x{w} larger than the padded size {hp}x{wp}")
        if (h, w) != (hp, wp):
            padded = masks.new_zeros((*masks.shape[:-2], hp, wp))
            padded[..., :h, :w] = masks
            masks = padded
        out.append({**t, "masks": masks})
    return out


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Sigmoid BCE averaged over points, summed over masks, divided by `num_masks`.

    Args:
        logits: (M, P) mask logits at the points; targets: (M, P) values in [0, 1].
    Returns:
        scalar.
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """1 - soft Dice (+1 smoothing) per mask, summed over masks, divided by `num_masks`.

    Args:
        logits: (M, P) mask logits at the points; targets: (M, P) values in [0, 1].
    Returns:
        scalar.
    """
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


class SetCriterion(nn.Module):
    """Mask2Former's losses for the final and (with deep supervision) every aux output.

    `forward` returns *unweighted* losses; `weight_dict` maps every key to its weight and
    `total_loss(losses)` gives the weighted sum to back-propagate.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, cfg: LossConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or LossConfig()
        self.num_classes = num_classes
        self.matcher = matcher
        # Class weights for cross-entropy: 1 for the K classes, no_object_weight for index K.
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = cfg.no_object_weight
        self.register_buffer("empty_weight", empty_weight)
        self.base_weights = {
            "loss_ce": cfg.class_weight,
            "loss_mask": cfg.mask_weight,
            "loss_dice": cfg.dice_weight,
            "loss_distill": cfg.distill_weight,  # added by the training step when distilling (models/distill.py)
        }
        # Filled for the aux keys (loss_ce_0 ...) on the first forward that produces them;
        # `weight(key)` resolves any suffix without it.
        self.weight_dict: dict[str, float] = dict(self.base_weights)

    def weight(self, key: str) -> float:
        """Weight of a loss key; `loss_ce_3` weighs as `loss_ce`."""
        return self.base_weights[_AUX_SUFFIX.sub("", key)]

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the losses returned by `forward`."""
        return sum(self.weight(k) * v for k, v in losses.items())

    # ---- individual losses --------------------------------------------------------------

    def loss_labels(self, pred_logits: torch.Tensor, targets: list[dict], indices) -> torch.Tensor:
        """Cross-entropy over all B * Q queries; unmatched ones target "no object" (K).

        Args:
            pred_logits: (B, Q, K+1).
        Returns:
            scalar (weighted mean, torch's `weight=` convention: divided by the sum of the
            weights of the targets).
        """
        logits = pred_logits.float()
        b, q = logits.shape[:2]
        target_classes = torch.full((b, q), self.num_classes, dtype=torch.int64, device=logits.device)
        batch_idx, src_idx = _src_permutation(indices)
        if len(batch_idx):
            device = logits.device
            matched = [t["labels"].to(device)[j.to(device)] for t, (_, j) in zip(targets, indices)]
            target_classes[batch_idx.to(device), src_idx.to(device)] = torch.cat(matched)
        return F.cross_entropy(logits.transpose(1, 2), target_classes, weight=self.empty_weight)

    def loss_masks(
        self, pred_masks: torch.Tensor, targets: list[dict], indices, num_masks: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE and Dice losses on importance-sampled points of the matched masks.

        Args:
            pred_masks: (B, Q, h, w) mask logits.
            targets: masks (N_b, Hp, Wp), padded size.
        Returns:
            (loss_mask, loss_dice) scalars.
        """
        batch_idx, src_idx = _src_permutation(indices)
        if len(batch_idx) == 0:
            # No target in the batch: zero losses still connected to the graph, so every
            # parameter gets a (zero) gradient, which DDP needs.
            zero = pred_masks.sum() * 0.0
            return zero, zero.clone()
        device = pred_masks.device
        src_masks = pred_masks[batch_idx.to(device), src_idx.to(device)].float()[:, None]  # (M,1,h,w)
        # Only the matched masks travel to the device and get converted to float.
        tgt_masks = [t["masks"][j.to(t["masks"].device)].to(device) for t, (_, j) in zip(targets, indices)]
        tgt_masks = torch.cat(tgt_masks).float()[:, None]  # (M, 1, Hp, Wp)
        with torch.no_grad():
            # Points are chosen from the prediction (its uncertain boundary), not learned.
            coords = get_uncertain_point_coords_with_randomness(
                src_masks,
                calculate_uncertainty,
                self.cfg.num_points,
                self.cfg.oversample_ratio,
                self.cfg.importance_sample_ratio,
            )
            point_labels = point_sample(tgt_masks, coords)[:, 0]  # (M, P)
        point_logits = point_sample(src_masks, coords)[:, 0]  # (M, P)
        return (
            sigmoid_ce_loss(point_logits, point_labels, num_masks),
            dice_loss(point_logits, point_labels, num_masks),
        )

    def _losses_for(self, outputs: dict, targets: list[dict], num_masks: float, suffix: str) -> dict:
        indices = self.matcher(outputs, targets)
        loss_mask, loss_dice = self.loss_masks(outputs["pred_masks"], targets, indices, num_masks)
        return {
            "loss_ce" + suffix: self.loss_labels(outputs["pred_logits"], targets, indices),
            "loss_mask" + suffix: loss_mask,
            "loss_dice" + suffix: loss_dice,
        }

    # ---- forward ------------------------------------------------------------------------

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Unweighted losses of a batch.

        Args:
            outputs: model output (INTERFACES.md): "pred_logits" (B, Q, K+1), "pred_masks"
                (B, Q, Hp/4, Wp/4), optional "aux_outputs" (list of the same two keys) and
                "padded_size" (Hp, Wp).
            targets: B dicts {"labels": int64 (N_b,), "masks": bool/float (N_b, H_b, W_b)},
                H_b, W_b <= Hp, Wp; zero-padded here at the bottom / right to "padded_size"
                (without it, to the largest target: right only if the model padded the
                images to exactly that size).
        Returns:
            {"loss_ce", "loss_mask", "loss_dice"} and, with deep supervision, the same keys
            suffixed `_i` for aux output i. Each a float32 scalar.
        """
        padded_size = outputs.get("padded_size")
        if padded_size is None:
            # Fall back to the largest target: right when the collate step padded them already.
            sizes = [t["masks"].shape[-2:] for t in targets]
            padded_size = (max(s[0] for s in sizes), max(s[1] for s in sizes)) if sizes else None
        if padded_size is not None:
            targets = pad_targets(targets, padded_size)
        num_masks = self._num_masks(targets, outputs["pred_logits"].device)

        # Losses in fp32 even under AMP (the inputs are cast too): BCE / Dice sums over
        # thousands of points are not safe in fp16.
        with torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False):
            losses = self._losses_for(outputs, targets, num_masks, "")
            if self.cfg.deep_supervision:
                for i, aux in enumerate(outputs.get("aux_outputs") or []):
                    losses.update(self._losses_for(aux, targets, num_masks, f"_{i}"))
        for k in losses:
            self.weight_dict.setdefault(k, self.weight(k))
        return losses

    @staticmethod
    def _num_masks(targets: list[dict], device: torch.device) -> float:
        """Target masks per rank, averaged over ranks, at least 1 (the loss normaliser)."""
        n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        return max(all_reduce_tensor(n, "mean").item(), 1.0)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, cfg={self.cfg}"


def _src_permutation(indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-image matches to (batch index, query index) int64 tensors of length M."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


def build_criterion(num_classes: int, cfg: LossConfig | None = None) -> SetCriterion:
    """Matcher with the loss weights as matching costs, on `cfg.num_points` points."""
    cfg = cfg or LossConfig()
    matcher = HungarianMatcher(
        cost_class=cfg.class_weight,
        cost_mask=cfg.mask_weight,
        cost_dice=cfg.dice_weight,
        num_points=cfg.num_points,
    )
    return SetCriterion(num_classes, matcher, cfg)
