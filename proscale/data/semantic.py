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

from proscale.data.errors import AnnotationError, MissingFileError
from proscale.data.files import (check_size, finish_sample, image_tensor, load_json,
                                 read_image, read_label_png, require_dir, require_file)
from proscale.data.metadata import Category, DatasetMetadata, categories_from_coco

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_ALIASES = {"train": "training", "val": "validation", "training": "train", "validation": "val"}


def _ade20k_categories(path: str) -> list[Category]:
    """Categories from ADE20K's objectInfo150.txt (tab-separated: Idx Ratio Train Val Name)."""
    cats = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            cols = line.rstrip("\n").split("\t")
            if line_no == 0 or not line.strip():
                continue  # header
            if len(cols) < 5 or not cols[0].strip().isdigit():
                raise AnnotationError(path, f"line {line_no + 1} is not 'Idx Ratio Train Val Name'")
            # Label v is stored as v; after reducing the zero label it is v - 1.
            cats.append(Category(id=int(cols[0]) - 1, name=cols[4].split(";")[0].strip(),
                                 isthing=False))
    return cats


def load_semantic_categories(root: str) -> tuple[list[Category], bool]:
    """(categories, reduce_zero_label) from categories.json or ADE20K's objectInfo150.txt."""
    json_path = os.path.join(root, "categories.json")
    ade_path = os.path.join(root, "objectInfo150.txt")
    if os.path.isfile(json_path):
        data = load_json(json_path, "categories file")
        if "categories" not in data:
            raise AnnotationError(json_path, "lacks key 'categories'")
        entries = [{"isthing": 0, **c} if isinstance(c, dict) else c for c in data["categories"]]
        return categories_from_coco(entries, json_path), bool(data.get("reduce_zero_label", False))
    if os.path.isfile(ade_path):
        return _ade20k_categories(ade_path), True
    raise MissingFileError(json_path, "semantic data set needs categories.json (or ADE20K's "
                                      "objectInfo150.txt) to name its classes")


def read_sem_seg(path: str, metadata: DatasetMetadata, **ids) -> np.ndarray:
    """uint8 (H, W) contiguous class indices (255 = ignore) from a label PNG."""
    raw = read_label_png(path, **ids)
    known = metadata.sem_seg_known()
    bad = np.unique(raw[~known[raw]])
    if bad.size:
        raise AnnotationError(path, f"label value(s) {bad.tolist()[:10]} are neither a category "
                                    f"nor the ignore label {metadata.ignore_label}", **ids)
    return metadata.sem_seg_lut()[raw]


class SemanticDataset(Dataset):
    """Samples: image uint8 (3, H, W), sem_seg int64 (H, W), labels (N,), masks (N, H, W)."""

    def __init__(self, root: str, split: str = "train", transforms=None, *,
                 categories: list[Category] | None = None, reduce_zero_label: bool | None = None,
                 name: str = "semantic"):
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
        names = sorted(f for f in os.listdir(self.image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise MissingFileError(self.image_dir, "no images found")
        self.files = []
        for f in names:
            label = os.path.join(self.label_dir, os.path.splitext(f)[0] + ".png")
            require_file(label, f"label PNG for image {f}")
            self.files.append((os.path.join(self.image_dir, f), label))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        image_path, label_path = self.files[index]
        image = read_image(image_path, image_id=index)
        sem = read_sem_seg(label_path, self.metadata, image_id=index)
        check_size(label_path, sem.shape, image.shape[:2], "label PNG", image_id=index)
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
