"""COCO mask AP through pycocotools' COCOeval ("segm"), and box AP ("bbox", `iou_type="bbox"`,
fed by `process_boxes`).

Ground truth comes from an instances json (polygons or RLE, iscrowd respected) or is derived
from COCO panoptic ground truth: every thing segment becomes an instance (RLE from the PNG,
iscrowd kept), so a panoptic data set also gets mask AP. Only the processed images are
evaluated, so a partial pass gives the AP of that subset.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from proscale.distributed import all_gather_object
from proscale.evaluation.common import (
    category_table, load_json, merge_by_image, metadata_value, read_panoptic_png, to_numpy,
)

_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_masks(masks: Any) -> list[dict]:
    """bool (N, H, W) -> N COCO RLEs {"size": [H, W], "counts": str} (str so they serialise to json)."""
    masks = to_numpy(masks).astype(np.uint8)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got {masks.shape}")
    if len(masks) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def _coco_from_dataset(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


class InstanceEvaluator:
    """COCO mask AP (percent) of instance predictions.

    Ground truth, first that is given: `instances_json` (path or dict); else `panoptic_json` +
    `panoptic_png_dir` (things only). Both can come from `metadata` (DatasetMetadata's
    `instances_json`, else `panoptic_json` + `panoptic_root`). `categories` (Category
    objects or COCO dicts, contiguous-index order) maps model labels to data-set ids; default:
    the metadata's, else the json's categories.

    Usage: reset(); process(...) per image on each rank; evaluate() on every rank.
    """

    def __init__(self, metadata: Any = None, *, instances_json: str | os.PathLike | dict | None = None,
                 panoptic_json: str | os.PathLike | dict | None = None,
                 panoptic_png_dir: str | os.PathLike | None = None,
                 categories: Iterable[Any] | None = None, iou_type: str = "segm"):
        if iou_type not in ("segm", "bbox"):
            raise ValueError(f"iou_type must be 'segm' (mask AP) or 'bbox' (box AP), got {iou_type!r}")
        self.iou_type = iou_type
        if instances_json is None and panoptic_json is None:
            instances_json = metadata_value(metadata, "instances_json")
            panoptic_json = metadata_value(metadata, "panoptic_json")
        if panoptic_png_dir is None:
            panoptic_png_dir = metadata_value(metadata, "panoptic_root")
        categories = categories if categories is not None else metadata_value(metadata, "categories")

        if instances_json is not None:
            self._from_panoptic = False
            self._coco_gt = _coco_from_dataset(load_json(instances_json))
            if categories is None:  # contiguous order = the json's order, as the loaders use
                categories = self._coco_gt.dataset["categories"]
            self.categories = category_table(categories)
            self._thing_ids = {c["id"] for c in self.categories} & set(self._coco_gt.getCatIds())
            self._images = {int(i["id"]): i for i in self._coco_gt.dataset["images"]}
        elif panoptic_json is not None:
            if panoptic_png_dir is None:
                raise ValueError("panoptic ground truth needs panoptic_png_dir")
            self._from_panoptic = True
            gt = load_json(panoptic_json)
            self.categories = category_table(categories if categories is not None else gt["categories"])
            self._thing_ids = {c["id"] for c in self.categories if c["isthing"]}
            self._images = {int(i["id"]): i for i in gt["images"]}
            self._pan_anns = {int(a["image_id"]): a for a in gt["annotations"]}
            self._png_dir = Path(panoptic_png_dir)
        else:
            raise ValueError("InstanceEvaluator needs instances_json or panoptic_json (+ panoptic_png_dir)")
        self._contiguous_to_id = [c["id"] for c in self.categories]
        self.reset()

    def reset(self) -> None:
        self._preds: dict[int, list[dict]] = {}  # image_id -> detections (RLE)
        self._gts: dict[int, list[dict]] = {}  # image_id -> derived ground truth (panoptic only)

    def process(self, image_id: int, masks: Any, scores: Any, labels: Any) -> None:
        """Records one image's instances.

        Args:
            image_id: the data set's image id.
            masks: bool (N, H, W) at the original image size.
            scores: (N,) confidences.
            labels: int (N,) contiguous class indices; classes that are not things are dropped.
        """
        image_id = int(image_id)
        if image_id not in self._images:
            raise KeyError(f"image id {image_id} is not in the ground truth")
        scores = to_numpy(scores, np.float64).reshape(-1)
        labels = to_numpy(labels, np.int64).reshape(-1)
        masks = to_numpy(masks)
        if not (len(masks) == len(scores) == len(labels)):
            raise ValueError(f"masks {masks.shape}, scores {scores.shape}, labels {labels.shape} disagree on N")
        cat_ids = [self._contiguous_to_id[int(l)] for l in labels]
        keep = [i for i, c in enumerate(cat_ids) if c in self._thing_ids]
        rles = encode_masks(masks[keep]) if len(masks) else []
        self._preds[image_id] = [{"image_id": image_id, "category_id": cat_ids[i], "segmentation": r,
                                  "score": float(scores[i])} for i, r in zip(keep, rles)]
        if self._from_panoptic:
            self._gts[image_id] = self._panoptic_gt(image_id)

    def process_boxes(self, image_id: int, boxes: Any, scores: Any, labels: Any) -> None:
        """Records one image's detections (box AP, iou_type="bbox").

        Args:
            image_id: the data set's image id.
            boxes: (N, 4) (x0, y0, x1, y1) in pixels of the original image.
            scores: (N,) confidences.
            labels: int (N,) contiguous class indices; classes that are not things are dropped.
        """
        image_id = int(image_id)
        if image_id not in self._images:
            raise KeyError(f"image id {image_id} is not in the ground truth")
        boxes = to_numpy(boxes, np.float64).reshape(-1, 4)
        scores = to_numpy(scores, np.float64).reshape(-1)
        labels = to_numpy(labels, np.int64).reshape(-1)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"boxes {boxes.shape}, scores {scores.shape}, labels {labels.shape} disagree on N")
        cat_ids = [self._contiguous_to_id[int(l)] for l in labels]
        self._preds[image_id] = [
            {"image_id": image_id, "category_id": cat_ids[i], "score": float(scores[i]),
             "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}
            for i, (x0, y0, x1, y1) in enumerate(boxes) if cat_ids[i] in self._thing_ids]
        if self._from_panoptic:
            self._gts[image_id] = self._panoptic_gt(image_id)

    def _panoptic_gt(self, image_id: int) -> list[dict]:
        """Instances (RLE, iscrowd kept) of one image's thing segments."""
        ann = self._pan_anns[image_id]
        pan = read_panoptic_png(self._png_dir / ann["file_name"])
        segs = [s for s in ann["segments_info"] if s["category_id"] in self._thing_ids]
        out = []
        for s in segs:
            mask = pan == s["id"]
            area = int(mask.sum())
            if area == 0:
                continue
            rle = encode_masks(mask[None])[0]
            out.append({"image_id": image_id, "category_id": s["category_id"], "segmentation": rle,
                        "area": area, "bbox": mask_util.toBbox(rle).tolist(),
                        "iscrowd": int(s.get("iscrowd", 0))})
        return out

    def evaluate(self) -> dict[str, Any]:
        """Gathers all ranks' images; returns the same dict on every rank.

        {"AP", "AP50", "AP75", "APs", "APm", "APl" (percent; NaN where COCO finds no ground truth
         to score, e.g. no small objects), "per_class": {name: AP}, "num_images"}
        """
        gathered = all_gather_object((self._preds, self._gts))
        preds = merge_by_image(p for p, _ in gathered)
        gts = merge_by_image(g for _, g in gathered)
        img_ids = sorted(preds)
        results: dict[str, Any] = {k: math.nan for k in _STAT_NAMES}
        results["per_class"], results["num_images"] = {}, len(img_ids)
        if not img_ids:
            return results

        # Sorted by id: COCOeval sorts catIds, and the per-class precision follows that order.
        cats = sorted(({"id": c["id"], "name": c["name"]} for c in self.categories if c["id"] in self._thing_ids),
                      key=lambda c: c["id"])
        images = [self._images[i] for i in img_ids]
        if self._from_panoptic:
            anns = [dict(a, id=k) for k, a in enumerate((a for i in img_ids for a in gts[i]), start=1)]
            coco_gt = _coco_from_dataset({"images": images, "categories": cats, "annotations": anns})
        else:
            coco_gt = self._coco_gt
        # Built by hand rather than COCO.loadRes, which fails on an empty list. Ids start at 1:
        # COCOeval reads id 0 as "unmatched".
        dets = []
        for k, d in enumerate((d for i in img_ids for d in preds[i]), start=1):
            if "segmentation" in d:
                dets.append(dict(d, id=k, iscrowd=0, area=float(mask_util.area(d["segmentation"])),
                                 bbox=mask_util.toBbox(d["segmentation"]).tolist()))
            else:  # a box detection (process_boxes)
                dets.append(dict(d, id=k, iscrowd=0, area=d["bbox"][2] * d["bbox"][3]))
        coco_dt = _coco_from_dataset({"images": images, "categories": cats, "annotations": dets})

        ev = COCOeval(coco_gt, coco_dt, self.iou_type)
        ev.params.imgIds = img_ids
        ev.params.catIds = [c["id"] for c in cats]
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for k, v in zip(_STAT_NAMES, ev.stats[:6]):
            results[k] = 100 * float(v) if v >= 0 else math.nan
        # precision: (IoU thresholds, recall points, categories, area ranges, max dets); -1 = undefined.
        precision = ev.eval["precision"]
        for k, cat in enumerate(cats):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            results["per_class"][cat["name"]] = 100 * float(p.mean()) if p.size else math.nan
        return results
