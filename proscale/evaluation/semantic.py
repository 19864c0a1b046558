"""Semantic segmentation metrics from a confusion matrix: mIoU, fwIoU, mACC, pixel accuracy.

Per class c (over pixels whose ground truth is not `ignore_label`):
    IoU_c = TP / (TP + FP + FN),  ACC_c = TP / (TP + FN)
mIoU averages IoU over the classes present in the ground truth or the predictions (others are
undefined and left out); mACC over classes present in the ground truth; fwIoU weights IoU by
ground-truth frequency; pACC = correct pixels / labelled pixels. All in percent.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from proscale.distributed import all_reduce_tensor
from proscale.evaluation.common import to_numpy


class SemanticEvaluator:
    """Accumulates a confusion matrix over images (and ranks) and reduces it to the metrics.

    Rows are ground-truth classes 0..K-1; columns are predicted classes plus one last column
    for predictions outside 0..K-1 (they count as misses, never as anyone's false positive).
    Under torch.distributed the matrices are summed over ranks; images repeated by
    DistributedSampler's padding count twice (a handful of images at most).
    """

    def __init__(self, num_classes: int, ignore_label: int = 255, class_names: Sequence[str] | None = None):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError("class_names must have num_classes entries")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.reset()

    @classmethod
    def from_metadata(cls, metadata: Any) -> "SemanticEvaluator":
        """From a DatasetMetadata: its categories (names, count) and ignore label."""
        names = [getattr(c, "name", str(i)) for i, c in enumerate(metadata.categories)]
        return cls(len(names), getattr(metadata, "ignore_label", 255), names)

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def process(self, pred: Any, gt: Any) -> None:
        """Adds one image.

        Args:
            pred: float (K, H, W) class scores (the semantic post-processing output; argmax is
                taken) or int (H, W) predicted labels.
            gt: int (H, W) ground-truth labels; `ignore_label` (and anything outside 0..K-1)
                is not scored.
        """
        pred = to_numpy(pred)
        if pred.ndim == 3:
            pred = pred.argmax(0)
        pred = pred.astype(np.int64)
        gt = to_numpy(gt).astype(np.int64)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
        K = self.num_classes
        valid = (gt >= 0) & (gt < K) & (gt != self.ignore_label)
        p = pred[valid]
        p = np.where((p >= 0) & (p < K), p, K)
        self.confusion += np.bincount(gt[valid] * (K + 1) + p, minlength=K * (K + 1)).reshape(K, K + 1)

    def evaluate(self) -> dict[str, Any]:
        """Sums over ranks; returns the same dict on every rank:
        {"mIoU", "fwIoU", "mACC", "pACC", "per_class_IoU": {name: IoU or NaN},
         "per_class_ACC": {name: ACC or NaN}} (percent; NaN = class absent, left out of means)."""
        conf = all_reduce_tensor(torch.from_numpy(self.confusion), "sum").numpy().astype(np.float64)
        K = self.num_classes
        tp = np.diag(conf[:, :K])
        pos_gt = conf.sum(1)  # includes misses into the extra column
        pos_pred = conf[:, :K].sum(0)
        union = pos_gt + pos_pred - tp
        iou_valid = union > 0
        acc_valid = pos_gt > 0
        iou = np.divide(tp, union, out=np.full(K, np.nan), where=iou_valid)
        acc = np.divide(tp, pos_gt, out=np.full(K, np.nan), where=acc_valid)
        total = pos_gt.sum()

        def mean(x: np.ndarray, m: np.ndarray) -> float:
            return 100 * float(x[m].mean()) if m.any() else math.nan

        return {
            "mIoU": mean(iou, iou_valid),
            "fwIoU": 100 * float((iou[iou_valid] * pos_gt[iou_valid]).sum() / total) if total else math.nan,
            "mACC": mean(acc, acc_valid),
            "pACC": 100 * float(tp.sum() / total) if total else math.nan,
            "per_class_IoU": {n: 100 * float(v) for n, v in zip(self.class_names, iou)},
            "per_class_ACC": {n: 100 * float(v) for n, v in zip(self.class_names, acc)},
        }


def semantic_from_panoptic(panoptic_seg: Any, segments_info: Iterable[Mapping],
                           category_to_label: Mapping[int, int] | None = None,
                           ignore_label: int = 255) -> np.ndarray:
    """Semantic labels from a panoptic map (e.g. a COCO panoptic PNG decoded with rgb_to_id).

    Args:
        panoptic_seg: int (H, W) segment ids, 0 = void.
        segments_info: [{"id", "category_id"}]; crowd segments keep their class.
        category_to_label: data-set category id -> contiguous label; None when the
            category ids already are the labels.
        ignore_label: the label of void and of unlisted segment ids.
    Returns:
        int64 (H, W) labels.
    """
    pan = to_numpy(panoptic_seg).astype(np.int64)
    ids, inverse = np.unique(pan, return_inverse=True)
    seg_label = {int(s["id"]): (category_to_label[s["category_id"]] if category_to_label is not None
                                else int(s["category_id"])) for s in segments_info}
    lut = np.array([seg_label.get(int(i), ignore_label) if i != 0 else ignore_label for i in ids], dtype=np.int64)
    return lut[inverse.reshape(pan.shape)]
