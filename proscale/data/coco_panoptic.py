"""COCO panoptic segmentation data set.

Layout under `root` (COCO names its splits train2017 / val2017; `split="val"` finds
`val2017` when only that exists):
    annotations/panoptic_{split}.json    images, annotations (one per image), categories
    panoptic_{split}/<name>.png           RGB PNG, segment id = R + 256 G + 256^2 B, 0 = void
    {split}/<image file_name>             the RGB images
    annotations/instances_{split}.json    optional, for instance evaluation (things only)
    panoptic_semseg_{split}/<stem>.png    optional, contiguous class per pixel (255 = ignore)

Each segment of `segments_info` becomes one target mask labelled with the contiguous index of
its category (order of the JSON's categories list); `iscrowd` segments are left out.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from proscale.data.errors import AnnotationError
from proscale.data.files import (check_size, finish_sample, image_tensor, load_json,
                                 read_image, read_panoptic_png, require_dir, require_keys)
from proscale.data.metadata import DatasetMetadata, categories_from_coco


def resolve_split(root: str, pattern: str, split: str) -> str:
    """`split`, or `split + "2017"` when only the COCO-style name exists under root."""
    if os.path.exists(os.path.join(root, pattern.format(split=split))):
        return split
    alt = split + "2017"
    if os.path.exists(os.path.join(root, pattern.format(split=alt))):
        return alt
    return split


class CocoPanopticDataset(Dataset):
    """Samples as INTERFACES.md describes: image uint8 (3, H, W), labels (N,), masks (N, H, W)."""

    def __init__(self, root: str, split: str = "train", transforms=None, *,
                 keep_crowd: bool = False, name: str = "coco-panoptic"):
        root = os.path.abspath(root)
        split = resolve_split(root, "annotations/panoptic_{split}.json", split)
        self.root, self.split, self.transforms, self.keep_crowd = root, split, transforms, keep_crowd
        self.json_file = os.path.join(root, "annotations", f"panoptic_{split}.json")
        self.png_dir = os.path.join(root, f"panoptic_{split}")
        self.image_dir = os.path.join(root, split)
        data = load_json(self.json_file, "panoptic annotation file")
        require_keys(data, ("images", "annotations", "categories"), self.json_file, "panoptic JSON")
        require_dir(self.png_dir, "panoptic PNG")
        require_dir(self.image_dir, "image")

        instances = os.path.join(root, "annotations", f"instances_{split}.json")
        semseg = os.path.join(root, f"panoptic_semseg_{split}")
        self.metadata = DatasetMetadata(
            categories=categories_from_coco(data["categories"], self.json_file),
            name=name, image_root=self.image_dir,
            panoptic_json=self.json_file, panoptic_root=self.png_dir,
            instances_json=instances if os.path.isfile(instances) else None,
            sem_seg_root=semseg if os.path.isdir(semseg) else None,
            sem_seg_values="contiguous")
        self.records = self._parse(data)

    def _parse(self, data: dict) -> list[dict]:
        """Checks the JSON once up front so a bad record fails at construction, not mid-epoch."""
        path = self.json_file
        images = {}
        for entry in data["images"]:
            require_keys(entry, ("id", "file_name"), path, "image entry", image_id=entry.get("id"))
            images[entry["id"]] = entry
        known = self.metadata.dataset_id_to_contiguous
        records = []
        for ann in data["annotations"]:
            require_keys(ann, ("image_id", "file_name", "segments_info"), path, "annotation",
                         image_id=ann.get("image_id"))
            image_id = ann["image_id"]
            if image_id not in images:
                raise AnnotationError(path, "annotation refers to an image missing from 'images'",
                                      image_id=image_id)
            seen = set()
            for seg in ann["segments_info"]:
                require_keys(seg, ("id", "category_id"), path, "segment", image_id=image_id,
                             segment_id=seg.get("id"))
                if seg["category_id"] not in known:
                    raise AnnotationError(path, f"unknown category id {seg['category_id']}",
                                          image_id=image_id, segment_id=seg["id"])
                if seg["id"] in seen or seg["id"] == 0:
                    raise AnnotationError(path, "segment id is 0 or repeated", image_id=image_id,
                                          segment_id=seg["id"])
                seen.add(seg["id"])
            records.append({"image": images[image_id], "annotation": ann})
        return records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        image_info, ann = self.records[index]["image"], self.records[index]["annotation"]
        image_id = image_info["id"]
        image_path = os.path.join(self.image_dir, image_info["file_name"])
        png_path = os.path.join(self.png_dir, ann["file_name"])
        image = read_image(image_path, image_id=image_id)
        if "height" in image_info and "width" in image_info:
            check_size(image_path, image.shape, (image_info["height"], image_info["width"]),
                       "image",
                       reference=f"the height/width in {self.json_file}", image_id=image_id)
        ids = read_panoptic_png(png_path, image_id=image_id)
        check_size(png_path, ids.shape, image.shape[:2], "panoptic PNG", image_id=image_id)

        segments = ann["segments_info"]
        self._check_segments(png_path, ids, segments, image_id)
        if not self.keep_crowd:
            segments = [s for s in segments if not s.get("iscrowd", 0)]
        seg_ids = np.array([s["id"] for s in segments], dtype=np.int64)
        masks = ids[None] == seg_ids[:, None, None]
        labels = [self.metadata.contiguous(s["category_id"]) for s in segments]

        sample = {
            "image": image_tensor(image),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(masks),
        }
        sample = finish_sample(sample, self.transforms)
        sample.update(image_id=image_id, file_name=image_path,
                      height=image.shape[0], width=image.shape[1])
        return sample

    def _check_segments(self, png_path: str, ids: np.ndarray, segments: list, image_id) -> None:
        present = set(np.unique(ids).tolist()) - {0}
        listed = {s["id"] for s in segments}
        extra, absent = sorted(present - listed), sorted(listed - present)
        if extra:
            raise AnnotationError(png_path, f"PNG has segment id {extra[0]} that segments_info in "
                                            f"{self.json_file} does not list",
                                  image_id=image_id, segment_id=extra[0])
        if absent:
            raise AnnotationError(png_path, f"segment listed in {self.json_file} has no pixel in "
                                            f"the PNG", image_id=image_id, segment_id=absent[0])
