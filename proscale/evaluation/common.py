"""What the evaluators share: category tables, the panoptic PNG codec, array helpers.

Evaluators accumulate per-image results on each rank and combine them in `evaluate()`.
These helpers work the same with and without torch.distributed, so a single-process run
needs no special casing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image


def merge_by_image(per_rank: Iterable[dict]) -> dict:
    """Merges {image_id: value} dicts from several ranks.

    DistributedSampler pads the data set with repeated images so every rank gets the same
    count; keying by image id makes the repeats count once.
    """
    merged: dict = {}
    for d in per_rank:
        merged.update(d)
    return merged


# ----------------------------------------------------------------------------- categories
def category_table(categories: Iterable[Any]) -> list[dict]:
    """Normalises categories to [{"id", "name", "isthing"}] in contiguous-index order.

    Accepts proscale.data.metadata.Category objects (attributes) or COCO json dicts (keys);
    position in the input is the contiguous index. A missing `isthing` means thing, as in an
    instances json (every category there is a thing).
    """
    table = []
    for c in categories:
        get = c.get if isinstance(c, dict) else (lambda k, d=None, c=c: getattr(c, k, d))
        table.append({"id": int(get("id")), "name": str(get("name", get("id"))),
                      "isthing": bool(get("isthing", True))})
    ids = [c["id"] for c in table]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate category ids: {ids}")
    return table


def metadata_value(metadata: Any, name: str) -> Any:
    """metadata.<name> (DatasetMetadata, or a dict with that key); None when absent or unset."""
    if metadata is None:
        return None
    return metadata.get(name) if isinstance(metadata, dict) else getattr(metadata, name, None)


def load_json(path_or_dict: str | os.PathLike | dict) -> dict:
    """A json file's content, or the dict itself when one is given (already loaded)."""
    if isinstance(path_or_dict, dict):
        return path_or_dict
    with open(path_or_dict) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- panoptic PNG
def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> int64 (H, W) segment ids, COCO panoptic: id = R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """int (H, W) segment ids -> uint8 (H, W, 3), the inverse of rgb_to_id."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256 ** 3:
        raise ValueError("segment ids must lie in [0, 256^3)")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def read_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """COCO panoptic PNG -> int64 (H, W) segment ids (0 = void)."""
    with Image.open(path) as im:
        return rgb_to_id(np.asarray(im.convert("RGB")))


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """Tensor (any device) or array-like -> numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)
