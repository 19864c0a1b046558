"""`build_dataset("kind:/path/root", split, transforms)`: the data sets the CLI can name.

    coco-panoptic:/data/coco     annotations/panoptic_{split}.json, panoptic_{split}/*.png (or
                                 annotations/panoptic_{split}/*.png, as the COCO zip unpacks),
                                 {split}/*.jpg (split "val" also finds val2017); see coco_panoptic
    coco-instances:/data/coco    annotations/instances_{split}.json, {split}/*.jpg; see coco_instances
    semantic:/data/ADEChallengeData2016
                                 images/{split}/*.jpg, annotations/{split}/*.png, plus
                                 categories.json or objectInfo150.txt; see semantic
    synthetic:/data/synth        the COCO panoptic layout written by
                                 proscale.data.synthetic.generate_synthetic
"""
from __future__ import annotations

import os

from torch.utils.data import Dataset

from proscale.data.coco_instances import CocoInstancesDataset
from proscale.data.coco_panoptic import CocoPanopticDataset
from proscale.data.errors import MissingFileError
from proscale.data.semantic import SemanticDataset

KINDS = ("coco-panoptic", "coco-instances", "semantic", "synthetic")


def parse_spec(spec: str) -> tuple[str, str]:
    """"kind:/path" -> (kind, path)."""
    kind, sep, root = spec.partition(":")
    if not sep or kind not in KINDS or not root:
        raise ValueError(f"data spec {spec!r} is not 'kind:/path' with kind one of {', '.join(KINDS)}")
    return kind, os.path.expanduser(root)


def build_dataset(spec: str, split: str, transforms=None, *, defer_errors: bool = False) -> Dataset:
    """The data set a spec names; every one has `.metadata` and INTERFACES.md samples.

    defer_errors: a bad record raises when its sample is loaded rather than here (only
    problems with a whole file still raise here); use it with `SkipBadSamples(skip=True)`.
    """
    kind, root = parse_spec(spec)
    if not os.path.isdir(root):
        raise MissingFileError(root, f"data root for {kind!r} not found")
    if kind == "coco-panoptic":
        return CocoPanopticDataset(root, split, transforms, defer_errors=defer_errors)
    if kind == "synthetic":
        if not os.path.isfile(os.path.join(root, "annotations", f"panoptic_{split}.json")):
            raise MissingFileError(os.path.join(root, "annotations", f"panoptic_{split}.json"),
                                   "synthetic data not generated here yet; run "
                                   "proscale.data.generate_synthetic(root, ...) first")
        return CocoPanopticDataset(root, split, transforms, name="synthetic",
                                   defer_errors=defer_errors)
    if kind == "coco-instances":
        return CocoInstancesDataset(root, split, transforms, defer_errors=defer_errors)
    return SemanticDataset(root, split, transforms, defer_errors=defer_errors)
