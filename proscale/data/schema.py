"""Structure checks of COCO panoptic / instances JSON, shared by the loaders and the validator.

`index_coco(data, path, task)` walks the whole file once and returns a `CocoIndex`: the
well-formed categories, images and annotations, plus every `Problem` found. Problems that
belong to one image (a bad annotation of it, a repeated id) are also filed under that image
id, so a loader can refuse that sample alone; the others concern the file (`fatal`) or a
record no sample uses. Checks that need the pixels (sizes, PNG ids, masks) run per sample in
the data sets' `check_sample`.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field

from proscale.data.errors import Problem
from proscale.data.metadata import Category, check_categories, is_int


def is_number(v: object) -> bool:
    """A finite JSON number (bools are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _type(v: object) -> str:
    return "null" if v is None else type(v).__name__


@dataclass
class CocoIndex:
    path: str
    categories: list[Category] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # all, in file order
    fatal: bool = False  # the file cannot be used at all (top level, categories)
    images: dict = field(default_factory=dict)  # image id -> first entry with that id
    image_order: list = field(default_factory=list)  # ids in file order
    by_image: dict = field(default_factory=lambda: defaultdict(list))  # image id -> problems
    annotations: dict = field(default_factory=lambda: defaultdict(list))  # image id -> anns

    def add(self, problem: Problem, image_id: object = None) -> None:
        self.problems.append(problem)
        if image_id is not None:
            self.by_image[image_id].append(problem)


def valid_file_name(name: object) -> bool:
    """A non-empty relative path without NUL (what the loaders will join to their folder)."""
    return isinstance(name, str) and bool(name) and not os.path.isabs(name) and "\x00" not in name


def _check_file_name(entry: dict, path: str, what: str, ids: dict) -> Problem | None:
    name = entry.get("file_name")
    if "file_name" not in entry:
        return Problem.make("schema", path, f"{what} lacks key 'file_name'", **ids)
    if not isinstance(name, str) or not name:
        return Problem.make("schema", path, f"{what} 'file_name' must be a non-empty string, got "
                                            f"{_short(name)}", **ids)
    if os.path.isabs(name) or "\x00" in name:
        return Problem.make("schema", path, f"{what} 'file_name' must be a relative path, got "
                                            f"{_short(name)}", **ids)
    return None


def index_coco(data: dict, path: str, task: str) -> CocoIndex:
    """Checks a COCO JSON object; task "panoptic" or "instances"."""
    index = CocoIndex(path)
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        index.add(Problem.make("schema", path, f"{task} JSON lacks key(s) {missing}"))
        index.fatal = True
    for key in ("images", "annotations"):
        if key in data and not isinstance(data[key], list):
            index.add(Problem.make("schema", path, f"'{key}' must be a list, got "
                                                   f"{_type(data[key])}"))
            index.fatal = True
    if "categories" in data:
        index.categories, problems = check_categories(data["categories"], path)
        for p in problems:
            index.add(p)
        index.fatal |= bool(problems)
    if index.fatal:
        return index
    _index_images(index, data["images"], need_size=task == "instances")
    known = {c.id for c in index.categories}
    if task == "panoptic":
        _index_panoptic(index, data["annotations"], known)
    else:
        _index_instances(index, data["annotations"], known)
    return index


def _index_images(index: CocoIndex, entries: list, need_size: bool) -> None:
    path = index.path
    for k, e in enumerate(entries):
        if not isinstance(e, dict):
            index.add(Problem.make("schema", path, f"image entry must be an object, got {_type(e)}",
                                   image_index=k))
            continue
        image_id = e.get("id")
        if not is_int(image_id):
            what = "lacks key 'id'" if "id" not in e else f"'id' must be an integer, got {_short(image_id)}"
            index.add(Problem.make("schema", path, f"image entry {what}", image_index=k))
            continue
        if image_id in index.images:
            index.add(Problem.make("duplicate_image_id", path, "two image entries share this id",
                                   image_id=image_id), image_id)
            continue
        index.images[image_id] = e
        index.image_order.append(image_id)
        p = _check_file_name(e, path, "image entry", {"image_id": image_id})
        if p:
            index.add(p, image_id)
        for key in ("height", "width"):
            if key not in e:
                if need_size:
                    index.add(Problem.make("schema", path, f"image entry lacks key '{key}'",
                                           image_id=image_id), image_id)
            elif not is_int(e[key]) or e[key] <= 0:
                index.add(Problem.make("schema", path, f"image '{key}' must be a positive integer, "
                                                       f"got {_short(e[key])}", image_id=image_id),
                          image_id)


def _common_annotation_checks(index: CocoIndex, ann: dict, k: int, ids: dict) -> object:
    """The image id of an annotation when it names a known image, else None (problem filed)."""
    path = index.path
    image_id = ann.get("image_id")
    if not is_int(image_id):
        what = ("lacks key 'image_id'" if "image_id" not in ann
                else f"'image_id' must be an integer, got {_short(image_id)}")
        index.add(Problem.make("schema", path, f"annotation {what}", annotation_index=k,
                               **{k2: v for k2, v in ids.items() if k2 != "image_id"}))
        return None
    if image_id not in index.images:
        index.add(Problem.make("unknown_image_id", path, "annotation refers to an image missing "
                                                         "from 'images'", **ids))
        return None
    return image_id


def _check_iscrowd(index: CocoIndex, record: dict, image_id, what: str, ids: dict) -> None:
    v = record.get("iscrowd", 0)
    if v not in (0, 1) or not isinstance(v, (int, bool)):
        index.add(Problem.make("schema", index.path, f"{what} 'iscrowd' must be 0 or 1, got "
                                                     f"{_short(v)}", **ids), image_id)


def _check_area(index: CocoIndex, record: dict, image_id, what: str, ids: dict) -> None:
    if "area" in record and not (is_number(record["area"]) and record["area"] >= 0):
        index.add(Problem.make("schema", index.path, f"{what} 'area' must be a number >= 0, got "
                                                     f"{_short(record['area'])}", **ids), image_id)


def _index_panoptic(index: CocoIndex, anns: list, known: set) -> None:
    path = index.path
    for k, ann in enumerate(anns):
        if not isinstance(ann, dict):
            index.add(Problem.make("schema", path, f"annotation must be an object, got {_type(ann)}",
                                   annotation_index=k))
            continue
        image_id = _common_annotation_checks(index, ann, k, {"image_id": ann.get("image_id")})
        if image_id is None:
            continue
        ids = {"image_id": image_id}
        if index.annotations[image_id]:
            index.add(Problem.make("duplicate_annotation_id", path, "a second panoptic annotation "
                                                                    "for this image", **ids), image_id)
            continue
        index.annotations[image_id].append(ann)
        p = _check_file_name(ann, path, "annotation", ids)
        if p:
            index.add(p, image_id)
        segments = ann.get("segments_info")
        if not isinstance(segments, list):
            what = ("lacks key 'segments_info'" if "segments_info" not in ann
                    else f"'segments_info' must be a list, got {_type(segments)}")
            index.add(Problem.make("schema", path, f"annotation {what}", **ids), image_id)
            continue
        seen = set()
        for j, seg in enumerate(segments):
            if not isinstance(seg, dict):
                index.add(Problem.make("schema", path, f"segment must be an object, got {_type(seg)}",
                                       image_id=image_id, segment_index=j), image_id)
                continue
            sid, cid = seg.get("id"), seg.get("category_id")
            sids = {"image_id": image_id, "segment_id": sid if is_int(sid) else None}
            if not is_int(sid):
                what = "lacks key 'id'" if "id" not in seg else f"'id' must be an integer, got {_short(sid)}"
                index.add(Problem.make("schema", path, f"segment {what}", image_id=image_id,
                                       segment_index=j), image_id)
            elif sid <= 0 or sid >= 256 ** 3:
                index.add(Problem.make("schema", path, "segment id must be in 1..16777215 (0 is "
                                                       "void)", **sids), image_id)
            elif sid in seen:
                index.add(Problem.make("duplicate_segment_id", path, "segment id repeated within "
                                                                     "the image", **sids), image_id)
            else:
                seen.add(sid)
            if not is_int(cid):
                what = ("lacks key 'category_id'" if "category_id" not in seg
                        else f"'category_id' must be an integer, got {_short(cid)}")
                index.add(Problem.make("schema", path, f"segment {what}", **sids), image_id)
            elif cid not in known:
                index.add(Problem.make("unknown_category", path, f"unknown category id {cid}",
                                       **sids, category_id=cid), image_id)
            _check_iscrowd(index, seg, image_id, "segment", sids)
            _check_area(index, seg, image_id, "segment", sids)
    for image_id in index.image_order:
        if not index.annotations.get(image_id):
            index.add(Problem.make("unannotated_image", path, "image has no panoptic annotation "
                                                              "and is not loaded", image_id=image_id))


def _index_instances(index: CocoIndex, anns: list, known: set) -> None:
    path = index.path
    seen = {}
    for k, ann in enumerate(anns):
        if not isinstance(ann, dict):
            index.add(Problem.make("schema", path, f"annotation must be an object, got {_type(ann)}",
                                   annotation_index=k))
            continue
        aid = ann.get("id")
        ids = {"image_id": ann.get("image_id") if is_int(ann.get("image_id")) else None,
               "annotation_id": aid if is_int(aid) else None}
        image_id = _common_annotation_checks(index, ann, k, ids)
        if image_id is None:
            continue
        ok = True
        if not is_int(aid):
            what = "lacks key 'id'" if "id" not in ann else f"'id' must be an integer, got {_short(aid)}"
            index.add(Problem.make("schema", path, f"annotation {what}", image_id=image_id,
                                   annotation_index=k), image_id)
        elif aid in seen:
            index.add(Problem.make("duplicate_annotation_id", path, f"annotation id also used by an "
                                   f"annotation of image {seen[aid]}", **ids), image_id)
            ok = False
        else:
            seen[aid] = image_id
        cid = ann.get("category_id")
        if not is_int(cid):
            what = ("lacks key 'category_id'" if "category_id" not in ann
                    else f"'category_id' must be an integer, got {_short(cid)}")
            index.add(Problem.make("schema", path, f"annotation {what}", **ids), image_id)
            ok = False
        elif cid not in known:
            index.add(Problem.make("unknown_category", path, f"unknown category id {cid}", **ids,
                                   category_id=cid), image_id)
            ok = False
        seg = ann.get("segmentation")
        if "segmentation" not in ann:
            index.add(Problem.make("schema", path, "annotation lacks key 'segmentation'", **ids),
                      image_id)
            ok = False
        elif not isinstance(seg, (list, dict)):
            index.add(Problem.make("schema", path, f"segmentation must be polygons or RLE, got "
                                                   f"{_type(seg)}", **ids), image_id)
            ok = False
        _check_iscrowd(index, ann, image_id, "annotation", ids)
        _check_area(index, ann, image_id, "annotation", ids)
        if ok:
            index.annotations[image_id].append(ann)


def bbox_problems(bbox: object, height: int, width: int, path: str, tolerance: float = 1.0,
                  **ids) -> list[Problem]:
    """bad_bbox warnings for a COCO [x, y, w, h] box on a height x width image."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        return [Problem.make("bad_bbox", path, f"bbox must be [x, y, w, h] numbers, got "
                                               f"{_short(bbox)}", **ids)]
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return [Problem.make("bad_bbox", path, f"bbox {bbox} has zero area", **ids)]
    if x < -tolerance or y < -tolerance or x + w > width + tolerance or y + h > height + tolerance:
        return [Problem.make("bad_bbox", path, f"bbox {bbox} leaves the {height}x{width} (HxW) "
                                               f"image", **ids)]
    return []
