"""COCO panoptic segmentation data set.

Layout under `root` (COCO names its splits train2017 / val2017; `split="val"` finds
`val2017` when only that exists):
    annotations/panoptic_{split}.json    images, annotations (one per image), categories
    panoptic_{split}/<name>.png           RGB PNG, segment id = R + 256 G + 256^2 B, 0 = void
                                          (detectron2's layout; the official COCO zip unpacks
                                          them to annotations/panoptic_{split}/, found as well)
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

from proscale.data.errors import DataError, MissingFileError, Problem, raise_first_error
from proscale.data.files import (decode_image, decode_panoptic_png, finish_sample,
                                 image_shape_problems, image_tensor, load_json, require_dir,
                                 size_problem)
from proscale.data.metadata import DatasetMetadata
from proscale.data.schema import bbox_problems, index_coco, is_int, valid_file_name


# Where the panoptic PNG folder may be, in the order looked at: detectron2's datasets/coco layout,
# then where panoptic_annotations_trainval2017.zip's inner panoptic_{split}2017.zip unpacks.
PNG_DIR_CANDIDATES = ("panoptic_{split}", os.path.join("annotations", "panoptic_{split}"))


def find_png_dir(root: str, split: str) -> str:
    """The panoptic PNG folder of `split` under `root` (PNG_DIR_CANDIDATES, first that exists).
    Raises MissingFileError naming every path looked at when none exists."""
    candidates = [os.path.join(root, c.format(split=split)) for c in PNG_DIR_CANDIDATES]
    for path in candidates:
        if os.path.isdir(path):
            return path
    raise MissingFileError(candidates[0], "panoptic PNG folder not found; looked for "
                           + " and ".join(candidates))


def resolve_split(root: str, pattern: str, split: str) -> str:
    """`split`, or `split + "2017"` when only the COCO-style name exists under root."""
    if os.path.exists(os.path.join(root, pattern.format(split=split))):
        return split
    alt = split + "2017"
    if os.path.exists(os.path.join(root, pattern.format(split=alt))):
        return alt
    return split


class CocoPanopticDataset(Dataset):
    """Samples as INTERFACES.md describes: image uint8 (3, H, W), labels (N,), masks (N, H, W).

    The JSON is checked whole at construction. By default its first error raises there;
    `defer_errors=True` raises only errors that concern the whole file, and a sample with a
    bad record raises its DataError when loaded (so `SkipBadSamples` can skip it). Every
    problem found stays in `.problems`; `check_sample(i)` lists those of sample i.
    """

    def __init__(self, root: str, split: str = "train", transforms=None, *,
                 keep_crowd: bool = False, name: str = "coco-panoptic", defer_errors: bool = False):
        root = os.path.abspath(root)
        split = resolve_split(root, "annotations/panoptic_{split}.json", split)
        self.root, self.split, self.transforms, self.keep_crowd = root, split, transforms, keep_crowd
        self.json_file = os.path.join(root, "annotations", f"panoptic_{split}.json")
        self.image_dir = os.path.join(root, split)
        data = load_json(self.json_file, "panoptic annotation file")
        index = index_coco(data, self.json_file, "panoptic")
        self.problems: list[Problem] = index.problems
        raise_first_error([p for p in index.problems if index.fatal or not defer_errors])
        self.png_dir = find_png_dir(root, split)
        require_dir(self.image_dir, "image")

        instances = os.path.join(root, "annotations", f"instances_{split}.json")
        semseg = os.path.join(root, f"panoptic_semseg_{split}")
        self.metadata = DatasetMetadata(
            categories=index.categories,
            name=name, image_root=self.image_dir,
            panoptic_json=self.json_file, panoptic_root=self.png_dir,
            instances_json=instances if os.path.isfile(instances) else None,
            sem_seg_root=semseg if os.path.isdir(semseg) else None,
            sem_seg_values="contiguous")
        # One record per annotation of a known image, in the JSON's annotation order.
        self.records = []
        for ann in data["annotations"]:
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            if not is_int(image_id) or not index.annotations.get(image_id) \
                    or index.annotations[image_id][0] is not ann:
                continue
            self.records.append({"image": index.images[image_id], "annotation": ann,
                                 "problems": [p for p in index.by_image.get(image_id, ())
                                              if p.is_error]})

    def __len__(self) -> int:
        return len(self.records)

    def check_sample(self, index: int) -> tuple[dict | None, list[Problem]]:
        """Reads sample `index` and lists every problem with it (JSON record, files, pixels).

        Returns ({"image": uint8 (H, W, 3), "ids": int64 (H, W)} or None when a file could not
        be read, problems). Problems of kind "error" are what `__getitem__` raises."""
        record = self.records[index]
        info, ann = record["image"], record["annotation"]
        problems = list(record["problems"])
        image_id = info["id"]
        expected = None
        if is_int(info.get("height")) and is_int(info.get("width")):
            expected = (info["height"], info["width"])
        image = ids = None
        image_path = png_path = None
        if valid_file_name(info.get("file_name")):
            image_path = os.path.join(self.image_dir, info["file_name"])
            try:
                image, notes = decode_image(image_path, expected, image_id=image_id)
                problems += notes
            except DataError as e:
                problems += e.problems
        if valid_file_name(ann.get("file_name")):
            png_path = os.path.join(self.png_dir, ann["file_name"])
            try:
                ids, notes = decode_panoptic_png(png_path, image_id=image_id)
                problems += notes
            except DataError as e:
                problems += e.problems
        if image is not None:
            if expected is not None:
                problems.append(size_problem(image_path, image.shape, expected, "image",
                                             reference=f"the height/width in {self.json_file}",
                                             image_id=image_id))
            problems += image_shape_problems(image_path, *image.shape[:2], image_id=image_id)
        if ids is not None:
            size = image.shape[:2] if image is not None else expected
            if size is not None:
                problems.append(size_problem(png_path, ids.shape, size, "panoptic PNG",
                                             image_id=image_id))
            segments = ann.get("segments_info")
            if isinstance(segments, list):
                problems += self._check_segments(png_path, ids, segments, image_id)
        problems = [p for p in problems if p is not None]
        if image is None or ids is None:
            return None, problems
        return {"image": image, "ids": ids}, problems

    def __getitem__(self, index: int) -> dict:
        raw, problems = self.check_sample(index)
        raise_first_error(problems)
        image, ids = raw["image"], raw["ids"]
        info, ann = self.records[index]["image"], self.records[index]["annotation"]
        segments = ann["segments_info"]
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
        sample.update(image_id=info["id"], file_name=os.path.join(self.image_dir, info["file_name"]),
                      height=image.shape[0], width=image.shape[1])
        return sample

    def _check_segments(self, png_path: str, ids: np.ndarray, segments: list,
                        image_id) -> list[Problem]:
        values, counts = np.unique(ids, return_counts=True)
        area = dict(zip(values.tolist(), counts.tolist()))
        present = set(area) - {0}
        listed = {s.get("id"): s for s in segments if isinstance(s, dict) and is_int(s.get("id"))}
        out = []
        for sid in sorted(present - set(listed)):
            out.append(Problem.make("png_segment_not_in_json", png_path,
                                    f"PNG has segment id {sid} that segments_info in "
                                    f"{self.json_file} does not list", image_id=image_id,
                                    segment_id=sid))
        for sid in sorted(set(listed) - present):
            out.append(Problem.make("json_segment_not_in_png", png_path,
                                    f"segment listed in {self.json_file} has no pixel in the PNG "
                                    f"(zero area)", image_id=image_id, segment_id=sid))
        h, w = ids.shape
        for sid, seg in listed.items():
            if sid not in present:
                continue
            if "area" in seg and isinstance(seg["area"], (int, float)) and seg["area"] != area[sid]:
                out.append(Problem.make("area_mismatch", self.json_file,
                                        f"segment 'area' is {seg['area']} but the PNG has "
                                        f"{area[sid]} pixels of it", image_id=image_id,
                                        segment_id=sid))
            if "bbox" in seg:
                out += bbox_problems(seg["bbox"], h, w, self.json_file, image_id=image_id,
                                     segment_id=sid)
        return out
