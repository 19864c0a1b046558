"""Panoptic quality (PQ = SQ x RQ), written from the COCO panoptic definition (Kirillov et al.).

For each category, a predicted segment and a ground-truth segment match when IoU > 0.5
(segments do not overlap, so a match is unique). Then

    PQ = sum of matched IoUs / (TP + FP/2 + FN/2),  SQ = sum IoU / TP,  RQ = TP / (TP + FP/2 + FN/2)

Void and crowd, as COCO defines them:
- void is ground-truth id 0 (and any id the ground truth does not list). Void pixels are removed
  from a prediction's area before its IoU is taken, and a prediction mostly on void is no FP;
- a crowd region (iscrowd=1) is never matched and never an FN; an unmatched prediction whose
  area is more than half void + crowd of its own category is no FP.
Categories with no TP, FP or FN in the whole set are left out of the averages.

`pq_compute_single` works on one image in data-set category ids (as in the files);
`PanopticEvaluator` feeds it model outputs (contiguous ids) against the COCO panoptic ground
truth on disk, image by image, and averages over the data set (and over ranks).
"""
from __future__ import annotations

import io
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping

import numpy as np
from PIL import Image

from proscale.distributed import all_gather_object, gather_object, get_rank
from proscale.evaluation.common import (
    category_table, id_to_rgb, load_json, merge_by_image, metadata_value, read_panoptic_png, to_numpy,
)
from proscale.fileio import atomic_write

# gt_id * OFFSET + pred_id is unique for ids < 256^3 (the PNG encoding's range) and fits int64.
_OFFSET = 256 ** 3


@dataclass
class PQStat:
    """Per-category counts over one image or many: IoU summed over TPs, TP, FP, FN."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: "PQStat") -> "PQStat":
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self

    @property
    def count(self) -> int:
        return self.tp + self.fp + self.fn

    def pq_sq_rq(self) -> tuple[float, float, float]:
        """(PQ, SQ, RQ) as fractions in [0, 1]; 0 where undefined (as panopticapi does per class)."""
        denom = self.tp + 0.5 * self.fp + 0.5 * self.fn
        sq = self.iou / self.tp if self.tp else 0.0
        rq = self.tp / denom if denom else 0.0
        return sq * rq, sq, rq


def pq_compute_single(pred_seg: Any, pred_segments: Iterable[Mapping], gt_seg: Any,
                      gt_segments: Iterable[Mapping],
                      categories: Collection[int] | None = None) -> dict[int, PQStat]:
    """PQ counts for one image.

    Args:
        pred_seg: int (H, W) predicted segment ids, 0 = no prediction.
        pred_segments: [{"id", "category_id"}] for the ids in pred_seg (data-set category ids).
            Listed segments without pixels are skipped (they can neither match nor be an FP).
        gt_seg: int (H, W) ground-truth segment ids, 0 = void.
        gt_segments: [{"id", "category_id", "iscrowd" (default 0)}]. Ids present in gt_seg but
            not listed are treated as void.
        categories: the valid category ids (e.g. a dict keyed by id); None skips the check.
    Returns:
        {category_id: PQStat} for the categories that occur in this image.
    """
    pred = to_numpy(pred_seg).astype(np.int64)
    gt = to_numpy(gt_seg).astype(np.int64)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred_seg {pred.shape} and gt_seg {gt.shape} must be the same (H, W)")
    pred_info = {int(s["id"]): s for s in pred_segments}
    gt_info = {int(s["id"]): s for s in gt_segments}
    if 0 in pred_info or 0 in gt_info:
        raise ValueError("segment id 0 is reserved for void")
    if categories is not None:
        for s in (*pred_info.values(), *gt_info.values()):
            if s["category_id"] not in categories:
                raise ValueError(f"unknown category id {s['category_id']}")
    if gt.size and (gt.min() < 0 or gt.max() >= _OFFSET or pred.min() < 0 or pred.max() >= _OFFSET):
        raise ValueError("segment ids must lie in [0, 256^3)")

    # One sort of the joint (gt, pred) ids gives every intersection, and the areas as its sums.
    keys, counts = np.unique(gt * _OFFSET + pred, return_counts=True)
    inter: dict[tuple[int, int], int] = defaultdict(int)
    pred_area: dict[int, int] = defaultdict(int)
    gt_area: dict[int, int] = defaultdict(int)
    for k, n in zip(keys.tolist(), counts.tolist()):
        g, p = divmod(k, _OFFSET)
        g = g if g in gt_info else 0  # unlisted ground-truth ids are void
        inter[g, p] += n
        pred_area[p] += n
        gt_area[g] += n
    unknown = set(pred_area) - set(pred_info) - {0}
    if unknown:
        raise ValueError(f"predicted segment ids {sorted(unknown)} are in pred_seg but not in pred_segments")

    stats: dict[int, PQStat] = defaultdict(PQStat)
    gt_matched, pred_matched = set(), set()
    for (g, p), n in inter.items():
        if g == 0 or p == 0:
            continue
        gs, ps = gt_info[g], pred_info[p]
        if gs.get("iscrowd", 0) or gs["category_id"] != ps["category_id"]:
            continue
        # Void pixels of the ground truth do not count against the prediction.
        union = pred_area[p] + gt_area[g] - n - inter.get((0, p), 0)
        iou = n / union
        if iou > 0.5:
            st = stats[gs["category_id"]]
            st.tp += 1
            st.iou += iou
            gt_matched.add(g)
            pred_matched.add(p)

    crowd_by_cat: dict[int, list[int]] = defaultdict(list)
    for g, gs in gt_info.items():
        if g in gt_matched:
            continue
        if gs.get("iscrowd", 0):
            crowd_by_cat[gs["category_id"]].append(g)
        else:
            stats[gs["category_id"]].fn += 1

    for p, ps in pred_info.items():
        area = pred_area.get(p, 0)
        if p in pred_matched or area == 0:
            continue
        cat = ps["category_id"]
        # A prediction lying mostly on void or on a crowd region of its class is not penalised.
        ignored = inter.get((0, p), 0) + sum(inter.get((g, p), 0) for g in crowd_by_cat.get(cat, ()))
        if ignored / area > 0.5:
            continue
        stats[cat].fp += 1
    return dict(stats)


def pq_summary(stats: Mapping[int, PQStat], categories: Iterable[Mapping]) -> dict[str, Any]:
    """Averages per-category counts into the reported numbers (percent).

    Args:
        stats: {category_id: PQStat} summed over the data set.
        categories: [{"id", "name", "isthing"}] (see common.category_table).
    Returns:
        {"PQ", "SQ", "RQ", "N", "PQ_th", ..., "N_th", "PQ_st", ..., "N_st",
         "per_class": {name: {"id", "isthing", "PQ", "SQ", "RQ", "TP", "FP", "FN"}}}.
        An average over no category is NaN, with N = 0 telling why.
    """
    out: dict[str, Any] = {}
    per_class: dict[str, dict] = {}
    groups: dict[str, list[tuple[float, float, float]]] = {"": [], "_th": [], "_st": []}
    for c in categories:
        st = stats.get(c["id"], PQStat())
        pq, sq, rq = st.pq_sq_rq()
        per_class[c["name"]] = {"id": c["id"], "isthing": c["isthing"], "PQ": 100 * pq, "SQ": 100 * sq,
                                "RQ": 100 * rq, "TP": st.tp, "FP": st.fp, "FN": st.fn}
        if st.count == 0:
            continue
        groups[""].append((pq, sq, rq))
        groups["_th" if c["isthing"] else "_st"].append((pq, sq, rq))
    for suffix, vals in groups.items():
        n = len(vals)
        for i, key in enumerate(("PQ", "SQ", "RQ")):
            out[key + suffix] = 100 * sum(v[i] for v in vals) / n if n else math.nan
        out["N" + suffix] = n
    out["per_class"] = per_class
    return out


def format_pq_table(results: Mapping[str, Any]) -> str:
    """The All / Things / Stuff summary as a small text table."""
    lines = [f"{'':8s}{'PQ':>8s}{'SQ':>8s}{'RQ':>8s}{'N':>6s}"]
    for label, sfx in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        lines.append(f"{label:8s}{results['PQ' + sfx]:8.2f}{results['SQ' + sfx]:8.2f}"
                     f"{results['RQ' + sfx]:8.2f}{results['N' + sfx]:6d}")
    return "\n".join(lines)


class PanopticEvaluator:
    """PQ / SQ / RQ of model outputs against COCO panoptic ground truth on disk.

    Build it from a data set's metadata (DatasetMetadata: `categories`, `panoptic_json`,
    `panoptic_root`) or from
    explicit `gt_json` (path or loaded dict), `gt_png_dir` and `categories` (Category objects
    or COCO category dicts in contiguous-index order; default: the json's categories).
    With `output_dir`, `evaluate()` also writes the predictions in COCO panoptic format there:
    `predictions.json` and `predictions/<file_name>.png` (rank 0 only).

    Usage: reset(); process(...) per image on each rank; evaluate() on every rank.
    """

    def __init__(self, metadata: Any = None, *, gt_json: str | os.PathLike | dict | None = None,
                 gt_png_dir: str | os.PathLike | None = None, categories: Iterable[Any] | None = None,
                 output_dir: str | os.PathLike | None = None):
        gt_json = gt_json if gt_json is not None else metadata_value(metadata, "panoptic_json")
        gt_png_dir = gt_png_dir if gt_png_dir is not None else metadata_value(metadata, "panoptic_root")
        if gt_json is None or gt_png_dir is None:
            raise ValueError("PanopticEvaluator needs the ground truth json and PNG folder "
                             "(from metadata or gt_json=/gt_png_dir=)")
        gt = load_json(gt_json)
        if categories is None:
            categories = metadata_value(metadata, "categories") or gt["categories"]
        self.categories = category_table(categories)
        self._contiguous_to_id = [c["id"] for c in self.categories]
        self._isthing = {c["id"]: c["isthing"] for c in self.categories}
        self._gt_anns = {int(a["image_id"]): a for a in gt["annotations"]}
        self.gt_png_dir = Path(gt_png_dir)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.reset()

    def reset(self) -> None:
        self._stats: dict[int, dict[int, PQStat]] = {}  # image_id -> {category_id: PQStat}
        self._predictions: dict[int, dict] = {}  # image_id -> json entry + PNG bytes (output_dir only)

    def process(self, image_id: int, panoptic_seg: Any, segments_info: Iterable[Mapping]) -> None:
        """Scores one image.

        Args:
            image_id: the data set's image id (finds the ground truth).
            panoptic_seg: int (H, W) segment ids at the original image size, 0 = void.
            segments_info: [{"id", "category_id" (contiguous index), ...}] as
                proscale.models.postprocess returns them.
        """
        image_id = int(image_id)
        ann = self._gt_anns.get(image_id)
        if ann is None:
            raise KeyError(f"image id {image_id} is not in the panoptic ground truth")
        pred = to_numpy(panoptic_seg).astype(np.int64)
        segments = [{"id": int(s["id"]), "category_id": self._contiguous_to_id[int(s["category_id"])]}
                    for s in segments_info]
        gt = read_panoptic_png(self.gt_png_dir / ann["file_name"])
        if gt.shape != pred.shape:
            raise ValueError(f"image {image_id}: prediction {pred.shape} vs ground truth {gt.shape}; "
                             "panoptic_seg must be at the original image size")
        self._stats[image_id] = pq_compute_single(pred, segments, gt, ann["segments_info"], self._isthing)
        if self.output_dir is not None:
            self._predictions[image_id] = self._encode_prediction(image_id, ann["file_name"], pred, segments)

    def evaluate(self) -> dict[str, Any]:
        """Gathers all ranks' images and returns the same result dict on every rank.

        Returns pq_summary's dict (percent) plus "num_images".
        """
        per_image = merge_by_image(all_gather_object(self._stats))
        total: dict[int, PQStat] = defaultdict(PQStat)
        for stats in per_image.values():
            for cat, st in stats.items():
                total[cat] += st
        results = pq_summary(total, self.categories)
        results["num_images"] = len(per_image)
        if self.output_dir is not None:
            gathered = gather_object(self._predictions)
            if get_rank() == 0:
                self._write_predictions(merge_by_image(gathered))
        return results

    # ------------------------------------------------------------------ writing predictions
    def _encode_prediction(self, image_id: int, file_name: str, pred: np.ndarray, segments: list[dict]) -> dict:
        # PNG bytes are kept (not written) so that rank 0 alone writes every file.
        buf = io.BytesIO()
        Image.fromarray(id_to_rgb(pred)).save(buf, format="PNG")
        ids, counts = np.unique(pred, return_counts=True)
        area = dict(zip(ids.tolist(), counts.tolist()))
        infos = [{"id": s["id"], "category_id": s["category_id"], "iscrowd": 0, "area": area.get(s["id"], 0)}
                 for s in segments]
        png_name = os.path.splitext(file_name)[0] + ".png"
        return {"image_id": image_id, "file_name": png_name, "segments_info": infos, "png": buf.getvalue()}

    def _write_predictions(self, predictions: dict[int, dict]) -> None:
        png_dir = self.output_dir / "predictions"
        png_dir.mkdir(parents=True, exist_ok=True)
        annotations = []
        for image_id in sorted(predictions):
            p = dict(predictions[image_id])
            atomic_write(png_dir / p["file_name"], p.pop("png"))
            annotations.append(p)
        cats = [{"id": c["id"], "name": c["name"], "isthing": int(c["isthing"])} for c in self.categories]
        payload = json.dumps({"annotations": annotations, "categories": cats}).encode()
        atomic_write(self.output_dir / "predictions.json", payload)
