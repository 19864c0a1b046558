"""COCO instance segmentation data set (things only).

Layout under `root` (`split="val"` finds `val2017` when only that exists):
    annotations/instances_{split}.json   images, annotations, categories
    {split}/<image file_name>            the RGB images

A `segmentation` is decoded with pycocotools in any COCO form: a list of polygons
[[x0, y0, x1, y1, ...], ...], an uncompressed RLE {"size": [h, w], "counts": [int, ...]} or a
compressed RLE {"size": [h, w], "counts": "<string>"}. `iscrowd` annotations are left out of the
targets (they mark regions the evaluator ignores).
"""
from __future__ import annotations

import os
import warnings
from collections import defaultdict

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from proscale.data.coco_panoptic import resolve_split
from proscale.data.errors import AnnotationError
from proscale.data.files import (check_size, finish_sample, image_tensor, load_json,
                                 read_image, require_dir, require_keys)
from proscale.data.metadata import DatasetMetadata, categories_from_coco


def decode_segmentation(seg: object, height: int, width: int, path: str, **ids) -> np.ndarray:
    """bool (height, width) mask of one COCO `segmentation` (polygons or RLE)."""
    if isinstance(seg, list):
        if any(not isinstance(p, list) or len(p) % 2 for p in seg):
            raise AnnotationError(path, "polygon must be a flat list of x, y pairs", **ids)
        # Fewer than 3 points cover no area; COCO has a few such stubs beside real polygons.
        polys = [[float(v) for v in p] for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise AnnotationError(path, "RLE segmentation needs 'size' and 'counts'", **ids)
        if [int(v) for v in seg["size"]] != [height, width]:
            raise AnnotationError(path, f"RLE size {seg['size']} differs from the image size "
                                        f"[{height}, {width}]", **ids)
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, height, width)
        elif isinstance(counts, (str, bytes)):  # compressed RLE
            rle = {"size": [height, width],
                   "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise AnnotationError(path, "RLE 'counts' must be a list or a string", **ids)
    else:
        raise AnnotationError(path, f"segmentation must be polygons or RLE, got {type(seg).__name__}",
                              **ids)
    try:
        with warnings.catch_warnings():  # pycocotools' numpy-2 __array__ deprecation noise
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = mask_utils.decode(rle)
    except Exception as e:  # pycocotools raises bare exceptions on corrupt RLE
        raise AnnotationError(path, f"cannot decode segmentation: {e}", **ids) from e
    return mask.astype(bool)


class CocoInstancesDataset(Dataset):
    """Samples as INTERFACES.md describes: image uint8 (3, H, W), labels (N,), masks (N, H, W)."""

    def __init__(self, root: str, split: str = "train", transforms=None, *,
                 keep_crowd: bool = False, name: str = "coco-instances"):
        root = os.path.abspath(root)
        split = resolve_split(root, "annotations/instances_{split}.json", split)
        self.root, self.split, self.transforms, self.keep_crowd = root, split, transforms, keep_crowd
        self.json_file = os.path.join(root, "annotations", f"instances_{split}.json")
        self.image_dir = os.path.join(root, split)
        data = load_json(self.json_file, "instances annotation file")
        require_keys(data, ("images", "annotations", "categories"), self.json_file, "instances JSON")
        require_dir(self.image_dir, "image")
        self.metadata = DatasetMetadata(
            categories=categories_from_coco(data["categories"], self.json_file),
            name=name, image_root=self.image_dir, instances_json=self.json_file)
        self.records = self._parse(data)

    def _parse(self, data: dict) -> list[dict]:
        path = self.json_file
        known = self.metadata.dataset_id_to_contiguous
        by_image = defaultdict(list)
        images = []
        for entry in data["images"]:
            require_keys(entry, ("id", "file_name", "height", "width"), path, "image entry",
                         image_id=entry.get("id"))
            images.append(entry)
        image_ids = {e["id"] for e in images}
        for ann in data["annotations"]:
            ids = {"image_id": ann.get("image_id"), "annotation_id": ann.get("id")}
            require_keys(ann, ("image_id", "category_id", "segmentation"), path, "annotation", **ids)
            if ann["image_id"] not in image_ids:
                raise AnnotationError(path, "annotation refers to an image missing from 'images'", **ids)
            if ann["category_id"] not in known:
                raise AnnotationError(path, f"unknown category id {ann['category_id']}", **ids)
            by_image[ann["image_id"]].append(ann)
        return [{"image": e, "annotations": by_image[e["id"]]} for e in images]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        info, anns = self.records[index]["image"], self.records[index]["annotations"]
        image_id = info["id"]
        h, w = int(info["height"]), int(info["width"])
        image_path = os.path.join(self.image_dir, info["file_name"])
        image = read_image(image_path, image_id=image_id)
        check_size(image_path, image.shape, (h, w), "image",
                   reference=f"the height/width in {self.json_file}", image_id=image_id)
        if not self.keep_crowd:
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        masks = np.zeros((len(anns), h, w), dtype=bool)
        for k, ann in enumerate(anns):
            masks[k] = decode_segmentation(ann["segmentation"], h, w, self.json_file,
                                           image_id=image_id, annotation_id=ann.get("id"))
        labels = [self.metadata.contiguous(a["category_id"]) for a in anns]
        sample = {
            "image": image_tensor(image),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(masks),
        }
        sample = finish_sample(sample, self.transforms)
        sample.update(image_id=image_id, file_name=image_path, height=h, width=w)
        return sample
