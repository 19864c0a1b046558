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

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from proscale.data.coco_panoptic import resolve_split
from proscale.data.errors import DataError, Problem, raise_first_error
from proscale.data.files import (decode_image, finish_sample, image_shape_problems,
                                 image_tensor, load_json, require_dir, size_problem)
from proscale.data.metadata import DatasetMetadata
from proscale.data.schema import (bbox_problems, index_coco, is_int, is_number,
                                  valid_file_name)

MAX_UNCHECKED_PIXELS = 1 << 26
_EDGE = 1.0  # polygons may reach this far (px) past the image border without a warning


def _rle_string_counts(counts: bytes) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string, or None when it is malformed.

    The same decoding as pycocotools' rleFrString, done here first because the C code reads
    past the end of a truncated string and writes past its buffer on bad run lengths."""
    out: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n or k > 6:
                return None
            c = counts[p] - 48
            if not 0 <= c <= 63:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        if x < 0:
            return None
        out.append(x)
    return out


def _clip_polygon(xy: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """(K, 2) polygon clipped to the box [x0, x1] x [y0, y1] (Sutherland-Hodgman)."""
    def clip(pts, inside, cross):
        out = []
        for i in range(len(pts)):
            cur, prev = pts[i], pts[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(cross(prev, cur))
                out.append(cur)
            elif inside(prev):
                out.append(cross(prev, cur))
        return out

    def at_x(x):
        return lambda a, b: (x, a[1] + (b[1] - a[1]) * (x - a[0]) / (b[0] - a[0]))

    def at_y(y):
        return lambda a, b: (a[0] + (b[0] - a[0]) * (y - a[1]) / (b[1] - a[1]), y)

    pts = [tuple(p) for p in xy.tolist()]
    for inside, cross in ((lambda p: p[0] >= x0, at_x(x0)), (lambda p: p[0] <= x1, at_x(x1)),
                          (lambda p: p[1] >= y0, at_y(y0)), (lambda p: p[1] <= y1, at_y(y1))):
        if not pts:
            break
        pts = clip(pts, inside, cross)
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


def _polygons_rle(seg: list, height: int, width: int, path: str, ids: dict,
                  problems: list[Problem]) -> object | None:
    """pycocotools RLE of a polygon list; warnings go to `problems`; None = no area."""
    polys = []
    for j, poly in enumerate(seg):
        if not isinstance(poly, list) or len(poly) % 2 or not all(is_number(v) for v in poly):
            problems.append(Problem.make("schema", path, "polygon must be a flat list of x, y "
                                         "number pairs", **ids, polygon_index=j))
            return None
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        with np.errstate(all="ignore"):  # shoelace area; inf/nan for huge coordinates is fine
            area = 0.5 * abs(float(np.dot(xy[:, 0], np.roll(xy[:, 1], 1))
                                   - np.dot(xy[:, 1], np.roll(xy[:, 0], 1)))) if len(xy) >= 3 else 0.0
        if len(xy) < 3 or area == 0:
            # COCO has a few such stubs beside real polygons; they cover nothing.
            problems.append(Problem.make("degenerate_polygon", path, f"polygon has {len(xy)} "
                                         f"point(s) and area {area:g}; it covers no pixel",
                                         **ids, polygon_index=j))
            continue
        if (xy[:, 0].min() < -_EDGE or xy[:, 1].min() < -_EDGE or xy[:, 0].max() > width + _EDGE
                or xy[:, 1].max() > height + _EDGE):
            problems.append(Problem.make("out_of_bounds", path, f"polygon reaches "
                                         f"({xy[:, 0].min():g}..{xy[:, 0].max():g}, "
                                         f"{xy[:, 1].min():g}..{xy[:, 1].max():g}) (x, y) outside "
                                         f"the {height}x{width} (HxW) image", **ids,
                                         polygon_index=j))
            # pycocotools clips what lies just outside itself, but its work grows with the
            # coordinates (and overflows on huge ones): cut far-out polygons to a margin first.
            m = max(height, width) + 64
            if (np.abs(xy) > np.array([width + m, height + m])).any():
                xy = _clip_polygon(np.clip(xy, -1e12, 1e12), -m, -m, width + m, height + m)
                if len(xy) < 3:
                    continue
        polys.append(xy.flatten().tolist())
    if not polys:
        return None
    return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))


def _rle(seg: dict, height: int, width: int, path: str, ids: dict,
         problems: list[Problem]) -> object | None:
    size, counts = seg.get("size"), seg.get("counts")
    if "counts" not in seg or "size" not in seg:
        problems.append(Problem.make("schema", path, "RLE segmentation needs 'size' and 'counts'",
                                     **ids))
        return None
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)):
        problems.append(Problem.make("schema", path, "RLE 'size' must be [height, width]", **ids))
        return None
    if size != [height, width]:
        problems.append(Problem.make("size_mismatch", path, f"RLE size {size} differs from the "
                                     f"image size [{height}, {width}]", **ids))
        return None
    if isinstance(counts, list):  # uncompressed RLE
        if not all(is_int(v) and v >= 0 for v in counts):
            problems.append(Problem.make("schema", path, "RLE 'counts' must be integers >= 0",
                                         **ids))
            return None
        runs = counts
    elif isinstance(counts, str):  # compressed RLE
        try:
            raw = counts.encode("ascii")
        except UnicodeEncodeError:
            raw = b"\xff"
        runs = _rle_string_counts(raw)
        if runs is None:
            problems.append(Problem.make("schema", path, "RLE 'counts' is not a valid compressed "
                                         "RLE string", **ids))
            return None
    else:
        problems.append(Problem.make("schema", path, "RLE 'counts' must be a list or a string",
                                     **ids))
        return None
    if sum(runs) != height * width:
        problems.append(Problem.make("schema", path, f"RLE counts cover {sum(runs)} pixels, not "
                                     f"{height}x{width} = {height * width}", **ids))
        return None
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": raw}


def segmentation_mask(seg: object, height: int, width: int, path: str,
                      **ids) -> tuple[np.ndarray | None, list[Problem]]:
    """(bool (height, width) mask or None when it cannot be decoded, problems) of one COCO
    `segmentation`: polygons or RLE. Never raises for bad input."""
    problems: list[Problem] = []
    ids = {k: v for k, v in ids.items() if v is not None}
    if isinstance(seg, list):
        rle = _polygons_rle(seg, height, width, path, ids, problems)
    elif isinstance(seg, dict):
        rle = _rle(seg, height, width, path, ids, problems)
    else:
        problems.append(Problem.make("schema", path, f"segmentation must be polygons or RLE, got "
                                     f"{type(seg).__name__}", **ids))
        return None, problems
    if any(p.is_error for p in problems):
        return None, problems
    if rle is None:
        mask = np.zeros((height, width), dtype=bool)
    else:
        try:
            with warnings.catch_warnings():  # pycocotools' numpy-2 __array__ deprecation noise
                warnings.simplefilter("ignore", DeprecationWarning)
                mask = mask_utils.decode(rle).astype(bool)
        except Exception as e:  # noqa: BLE001 - pycocotools raises bare exceptions
            problems.append(Problem.make("schema", path, f"cannot decode segmentation: {e}", **ids))
            return None, problems
    if not mask.any():
        problems.append(Problem.make("empty_annotation", path, "segmentation covers no pixel",
                                     **ids))
    return mask, problems


def decode_segmentation(seg: object, height: int, width: int, path: str, **ids) -> np.ndarray:
    """bool (height, width) mask of one COCO `segmentation` (polygons or RLE); an error raises
    its DataError (AnnotationError or ImageError) naming `path` and the ids."""
    mask, problems = segmentation_mask(seg, height, width, path, **ids)
    raise_first_error(problems)
    return mask


class CocoInstancesDataset(Dataset):
    """Samples as INTERFACES.md describes: image uint8 (3, H, W), labels (N,), masks (N, H, W).

    `defer_errors`, `.problems` and `check_sample` as in CocoPanopticDataset."""

    def __init__(self, root: str, split: str = "train", transforms=None, *,
                 keep_crowd: bool = False, name: str = "coco-instances", defer_errors: bool = False):
        root = os.path.abspath(root)
        split = resolve_split(root, "annotations/instances_{split}.json", split)
        self.root, self.split, self.transforms, self.keep_crowd = root, split, transforms, keep_crowd
        self.json_file = os.path.join(root, "annotations", f"instances_{split}.json")
        self.image_dir = os.path.join(root, split)
        data = load_json(self.json_file, "instances annotation file")
        index = index_coco(data, self.json_file, "instances")
        self.problems: list[Problem] = index.problems
        raise_first_error([p for p in index.problems if index.fatal or not defer_errors])
        require_dir(self.image_dir, "image")
        self.metadata = DatasetMetadata(
            categories=index.categories,
            name=name, image_root=self.image_dir, instances_json=self.json_file)
        self.records = [{"image": index.images[i], "annotations": index.annotations.get(i, []),
                         "problems": [p for p in index.by_image.get(i, ()) if p.is_error]}
                        for i in index.image_order]

    def __len__(self) -> int:
        return len(self.records)

    def check_sample(self, index: int) -> tuple[dict | None, list[Problem]]:
        """Reads sample `index` and lists every problem with it; returns ({"image": uint8
        (H, W, 3), "masks": [bool (H, W) per annotation, None where undecodable]} or None,
        problems). Problems of kind "error" are what `__getitem__` raises."""
        record = self.records[index]
        info, anns = record["image"], record["annotations"]
        problems = list(record["problems"])
        image_id = info["id"]
        h, w = info.get("height"), info.get("width")
        expected = (h, w) if is_int(h) and is_int(w) and h > 0 and w > 0 else None
        image = None
        if valid_file_name(info.get("file_name")):
            image_path = os.path.join(self.image_dir, info["file_name"])
            try:
                image, notes = decode_image(image_path, expected, image_id=image_id)
                problems += notes
                if expected is not None:
                    problems.append(size_problem(
                        image_path, image.shape, expected, "image",
                        reference=f"the height/width in {self.json_file}", image_id=image_id))
                problems += image_shape_problems(image_path, *image.shape[:2], image_id=image_id)
            except DataError as e:
                problems += e.problems
        masks = []
        # Decode masks at the annotated size only where that size is real (the image has it)
        # or small enough to allocate: a typo of 10^9 in 'height' must not take all memory.
        if expected is not None and (image is not None and image.shape[:2] == expected
                                     or image is None and h * w <= MAX_UNCHECKED_PIXELS):
            for ann in anns:
                ids = {"image_id": image_id, "annotation_id": ann.get("id")}
                mask, found = segmentation_mask(ann["segmentation"], h, w, self.json_file, **ids)
                masks.append(mask)
                problems += found
                if "bbox" in ann:
                    problems += bbox_problems(ann["bbox"], h, w, self.json_file, **ids)
        problems = [p for p in problems if p is not None]
        if image is None or expected is None:
            return None, problems
        return {"image": image, "masks": masks}, problems

    def __getitem__(self, index: int) -> dict:
        raw, problems = self.check_sample(index)
        raise_first_error(problems)
        info, anns = self.records[index]["image"], self.records[index]["annotations"]
        h, w = int(info["height"]), int(info["width"])
        keep = [k for k, a in enumerate(anns) if self.keep_crowd or not a.get("iscrowd", 0)]
        masks = np.zeros((len(keep), h, w), dtype=bool)
        for j, k in enumerate(keep):
            masks[j] = raw["masks"][k]
        labels = [self.metadata.contiguous(anns[k]["category_id"]) for k in keep]
        sample = {
            "image": image_tensor(raw["image"]),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(masks),
        }
        sample = finish_sample(sample, self.transforms)
        sample.update(image_id=info["id"], file_name=os.path.join(self.image_dir, info["file_name"]),
                      height=h, width=w)
        return sample
