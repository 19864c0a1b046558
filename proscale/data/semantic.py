"""Semantic segmentation data set: an image folder beside a label-PNG folder (ADE20K style).

Layout under `root` (`split="train"` / `"val"` also find ADE20K's `training` / `validation`):
    images/{split}/<stem>.jpg|.png       RGB images
    annotations/{split}/<stem>.png        single-channel labels, 255 = ignore
    categories.json                       {"categories": [{"id", "name", "isthing"?, "color"?}],
                                           "reduce_zero_label": bool (optional, default false)}
  or, for ADE20K (ADEChallengeData2016), its objectInfo150.txt: 150 classes, and
  reduce_zero_label=True (label 0 "other" -> 255 ignore, label v -> v - 1).

A category's `id` is its label value after the zero-label reduction. Targets: "sem_seg" int64
(H, W) of contiguous indices (255 = ignore), and one mask per class present, as Mask2Former
trains semantic segmentation with the same set-prediction loss.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from proscale.data.errors import (AnnotationError, DataError, MissingFileError, Problem,
                                  raise_first_error)
from proscale.data.files import (decode_image, decode_label_png, finish_sample,
                                 image_shape_problems, image_tensor, load_json, require_dir,
                                 require_file, size_problem)
from proscale.data.metadata import Category, DatasetMetadata, categories_from_coco

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_ALIASES = {"train": "training", "val": "validation", "training": "train", "validation": "val"}


def _ade20k_categories(path: str) -> list[Category]:
    """Categories from ADE20K's objectInfo150.txt (tab-separated: Idx Ratio Train Val Name)."""
    cats = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(path, f"cannot read categories: {e}", kind="invalid_json") from e
    for line_no, line in enumerate(lines):
        cols = line.rstrip("\n").split("\t")
        if line_no == 0 or not line.strip():
            continue  # header
        idx = cols[0].strip()
        if len(cols) < 5 or not (idx.isascii() and idx.isdigit()):
            raise AnnotationError(path, f"line {line_no + 1} is not 'Idx Ratio Train Val Name'")
        # Label v is stored as v; after reducing the zero label it is v - 1.
        cats.append(Category(id=int(idx) - 1, name=cols[4].split(";")[0].strip(), isthing=False))
    return cats


def load_semantic_categories(root: str) -> tuple[list[Category], bool]:
    """(categories, reduce_zero_label) from categories.json or ADE20K's objectInfo150.txt."""
    json_path = os.path.join(root, "categories.json")
    ade_path = os.path.join(root, "objectInfo150.txt")
    if os.path.isfile(json_path):
        data = load_json(json_path, "categories file")
        if "categories" not in data:
            raise AnnotationError(json_path, "lacks key 'categories'")
        if not isinstance(data.get("reduce_zero_label", False), bool):
            raise AnnotationError(json_path, "'reduce_zero_label' must be true or false")
        entries = data["categories"]
        if isinstance(entries, list):
            entries = [{"isthing": 0, **c} if isinstance(c, dict) else c for c in entries]
        return categories_from_coco(entries, json_path), bool(data.get("reduce_zero_label", False))
    if os.path.isfile(ade_path):
        return _ade20k_categories(ade_path), True
    raise MissingFileError(json_path, "semantic data set needs categories.json (or ADE20K's "
                                      "objectInfo150.txt) to name its classes")


def sem_seg_problems(raw: np.ndarray, metadata: DatasetMetadata, path: str,
                     **ids) -> list[Problem]:
    """unknown_category when raw label values are neither a category nor ignore."""
    known = metadata.sem_seg_known()
    bad = np.unique(raw[~known[raw]])
    if not bad.size:
        return []
    return [Problem.make("unknown_category", path, f"label value(s) {bad.tolist()[:10]} are "
                         f"neither a category nor the ignore label {metadata.ignore_label}", **ids)]


def read_sem_seg(path: str, metadata: DatasetMetadata, **ids) -> np.ndarray:
    """uint8 (H, W) contiguous class indices (255 = ignore) from a label PNG."""
    raw = decode_label_png(path, **ids)[0]
    raise_first_error(sem_seg_problems(raw, metadata, path, **ids))
    return metadata.sem_seg_lut()[raw]


class SemanticDataset(Dataset):
    """Samples: image uint8 (3, H, W), sem_seg int64 (H, W), labels (N,), masks (N, H, W).

    An image without its label PNG raises at construction, or with `defer_errors=True` when
    that sample is loaded. `check_sample(i)` lists every problem of sample i."""

    def __init__(self, root: str, split: str = "train", transforms=None, *,
                 categories: list[Category] | None = None, reduce_zero_label: bool | None = None,
                 name: str = "semantic", defer_errors: bool = False):
        root = os.path.abspath(root)
        if not os.path.isdir(os.path.join(root, "images", split)) and split in SPLIT_ALIASES:
            if os.path.isdir(os.path.join(root, "images", SPLIT_ALIASES[split])):
                split = SPLIT_ALIASES[split]
        self.root, self.split, self.transforms = root, split, transforms
        self.image_dir = require_dir(os.path.join(root, "images", split), "image")
        self.label_dir = require_dir(os.path.join(root, "annotations", split), "label PNG")
        if categories is None:
            categories, found_reduce = load_semantic_categories(root)
            reduce_zero_label = found_reduce if reduce_zero_label is None else reduce_zero_label
        self.metadata = DatasetMetadata(
            categories=list(categories), name=name, image_root=self.image_dir,
            sem_seg_root=self.label_dir, sem_seg_values="dataset_id",
            reduce_zero_label=bool(reduce_zero_label))
        names = sorted(f for f in os.listdir(self.image_dir) if f.lower().endswith(IMAGE_EXTENSIONS)
                       and os.path.isfile(os.path.join(self.image_dir, f)))
        if not names:
            raise MissingFileError(self.image_dir, "no images found")
        self.files = []
        self.problems: list[Problem] = []
        for k, f in enumerate(names):
            label = os.path.join(self.label_dir, os.path.splitext(f)[0] + ".png")
            try:  # the same problem check_sample reports, so the validator lists it once
                require_file(label, "label PNG", kind="missing_png", image_id=k, file_name=f)
            except DataError as e:
                self.problems += e.problems
                if not defer_errors:
                    raise
            self.files.append((os.path.join(self.image_dir, f), label))

    def __len__(self) -> int:
        return len(self.files)

    def check_sample(self, index: int) -> tuple[dict | None, list[Problem]]:
        """Reads sample `index` and lists every problem with it; returns ({"image": uint8
        (H, W, 3), "sem_seg": uint8 (H, W) contiguous (255 = ignore)} or None, problems)."""
        image_path, label_path = self.files[index]
        ids = {"image_id": index, "file_name": os.path.basename(image_path)}
        problems: list[Problem] = []
        raw = image = None
        try:
            raw, notes = decode_label_png(label_path, **ids)
            problems += notes + sem_seg_problems(raw, self.metadata, label_path, **ids)
        except DataError as e:
            problems += e.problems
        try:
            image, notes = decode_image(image_path, None if raw is None else raw.shape[:2], **ids)
            problems += notes + image_shape_problems(image_path, *image.shape[:2], **ids)
        except DataError as e:
            problems += e.problems
        if raw is None or image is None:
            return None, problems
        p = size_problem(label_path, raw.shape, image.shape[:2], "label PNG", **ids)
        if p is not None:
            problems.append(p)
        sem = self.metadata.sem_seg_lut()[raw]
        if not (sem != self.metadata.ignore_label).any():
            problems.append(Problem.make("empty_annotation", label_path, "label PNG has no "
                                         "labelled pixel (all ignore)", **ids))
        return {"image": image, "sem_seg": sem}, problems

    def __getitem__(self, index: int) -> dict:
        raw, problems = self.check_sample(index)
        raise_first_error(problems)
        image, sem = raw["image"], raw["sem_seg"]
        image_path = self.files[index][0]
        classes = [int(c) for c in np.unique(sem) if c != self.metadata.ignore_label]
        sample = {
            "image": image_tensor(image),
            "sem_seg": torch.from_numpy(sem.astype(np.int64)),
            "labels": torch.tensor(classes, dtype=torch.int64),
            "masks": torch.from_numpy(sem[None] == np.array(classes, dtype=np.uint8)[:, None, None]),
        }
        sample = finish_sample(sample, self.transforms)
        sample.update(image_id=index, file_name=image_path,
                      height=image.shape[0], width=image.shape[1])
        return sample
