"""What a data set is about: its categories and where its ground truth lives.

Inside the model classes are contiguous indices 0..K-1, ordered as the data set lists its
categories; dataset ids (e.g. COCO's 1..200 with gaps) appear only in files. `DatasetMetadata`
holds both and the maps between them, plus the ground-truth paths an evaluator reads.
"""
from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass, field, replace

import numpy as np

from proscale.data.errors import AnnotationError, Problem, raise_first_error

IGNORE_LABEL = 255


@dataclass(frozen=True)
class Category:
    id: int  # dataset id as written in the files
    name: str
    isthing: bool = True
    color: tuple[int, int, int] | None = None  # RGB 0-255; filled from `palette` when None


def palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct, deterministic RGB colours (golden-ratio hue walk, alternating brightness)."""
    colors = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        sat = 0.65 + 0.25 * ((i // 2) % 2)
        val = 0.95 - 0.3 * (i % 2)
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        colors.append((int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5)))
    return colors


@dataclass
class DatasetMetadata:
    """Categories ordered by contiguous index, plus the ground truth an evaluator needs.

    Paths are absolute strings or None where the data set has no such ground truth.
    """

    categories: list[Category]
    name: str = ""
    image_root: str | None = None
    panoptic_json: str | None = None  # COCO panoptic annotations
    panoptic_root: str | None = None  # folder of panoptic PNGs (id = R + 256 G + 256^2 B)
    instances_json: str | None = None  # COCO instances annotations (things only)
    sem_seg_root: str | None = None  # folder of label PNGs, one per image, same stem
    sem_seg_values: str = "dataset_id"  # label PNG values: "dataset_id" or "contiguous"
    reduce_zero_label: bool = False  # ADE20K: raw 0 -> ignore, raw v -> v - 1 before lookup
    ignore_label: int = IGNORE_LABEL
    _id_to_index: dict[int, int] = field(init=False, repr=False, compare=False)
    _tables: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        colors = palette(len(self.categories))
        self.categories = [
            c if c.color is not None else replace(c, color=colors[i])
            for i, c in enumerate(self.categories)
        ]
        self._id_to_index = {}
        for i, c in enumerate(self.categories):
            if c.id in self._id_to_index:
                raise AnnotationError(self.panoptic_json or self.instances_json or self.name,
                                      "duplicate category id", kind="duplicate_category_id",
                                      category_id=c.id)
            self._id_to_index[c.id] = i

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def colors(self) -> list[tuple[int, int, int]]:
        return [c.color for c in self.categories]

    @property
    def thing_classes(self) -> list[int]:
        """Contiguous indices of thing categories."""
        return [i for i, c in enumerate(self.categories) if c.isthing]

    @property
    def stuff_classes(self) -> list[int]:
        """Contiguous indices of stuff categories."""
        return [i for i, c in enumerate(self.categories) if not c.isthing]

    @property
    def dataset_id_to_contiguous(self) -> dict[int, int]:
        return dict(self._id_to_index)

    @property
    def contiguous_to_dataset_id(self) -> dict[int, int]:
        return {i: c.id for i, c in enumerate(self.categories)}

    def contiguous(self, dataset_id: int) -> int:
        """Contiguous index of a dataset category id; KeyError when unknown."""
        return self._id_to_index[dataset_id]

    def dataset_id(self, index: int) -> int:
        return self.categories[index].id

    def sem_seg_lut(self) -> np.ndarray:
        """uint8 (256,): raw label-PNG value -> contiguous index, 255 = ignore (or unknown)."""
        return self._sem_seg_tables()[0]

    def sem_seg_known(self) -> np.ndarray:
        """bool (256,): which raw label-PNG values are valid (a category or ignore)."""
        return self._sem_seg_tables()[1]

    def _sem_seg_tables(self) -> tuple[np.ndarray, np.ndarray]:
        if self._tables is None:
            self._tables = self._build_sem_seg_tables()
        return self._tables

    def _build_sem_seg_tables(self) -> tuple[np.ndarray, np.ndarray]:
        lut = np.full(256, self.ignore_label, dtype=np.uint8)
        known = np.zeros(256, dtype=bool)
        for raw in range(256):
            value = raw
            if self.reduce_zero_label:
                # ADE20K stores "other" as 0; it becomes ignore and the rest shift down by one.
                if raw == 0:
                    known[raw] = True
                    continue
                value = raw - 1 if raw != self.ignore_label else raw
            if value == self.ignore_label:
                known[raw] = True
                continue
            if self.sem_seg_values == "contiguous":
                index = value if value < self.num_classes else None
            else:
                index = self._id_to_index.get(value)
            if index is not None:
                lut[raw] = index
                known[raw] = True
        return lut, known

    def sem_seg_path(self, file_name: str) -> str:
        """The label PNG of an image: `sem_seg_root/<image stem>.png`."""
        if self.sem_seg_root is None:
            raise ValueError(f"data set {self.name!r} has no semantic ground truth folder")
        stem = os.path.splitext(os.path.basename(file_name))[0]
        return os.path.join(self.sem_seg_root, stem + ".png")


def is_int(v: object) -> bool:
    """A JSON integer (bools are not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_categories(entries: object, path: str) -> tuple[list[Category], list[Problem]]:
    """Categories from a COCO `categories` list, and every problem with it.

    Keeps the list's order (= contiguous order); `isthing` defaults to True (instances JSONs
    omit it); `color` is kept when given. A bad entry is left out of the list.
    """
    if not isinstance(entries, list) or not entries:
        return [], [Problem.make("schema", path, "'categories' must be a non-empty list")]
    out, problems, seen = [], [], set()
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry or "name" not in entry:
            problems.append(Problem.make("schema", path, f"category #{k} lacks 'id' or 'name'",
                                         category_index=k))
            continue
        cid = entry["id"]
        if not is_int(cid):
            problems.append(Problem.make("schema", path, f"category #{k} id must be an integer, "
                                         f"got {type(cid).__name__}", category_index=k))
            continue
        bad = []
        name = entry["name"]
        if not isinstance(name, (str, int, float)) or isinstance(name, bool):
            bad.append(f"name must be a string, got {type(name).__name__}")
        isthing = entry.get("isthing", 1)
        if isthing not in (0, 1) or not isinstance(isthing, (int, bool)):
            bad.append(f"isthing must be 0 or 1, got {isthing!r}"[:120])
        color = entry.get("color")
        if color is not None and not (isinstance(color, list) and len(color) == 3
                                      and all(is_int(v) and 0 <= v <= 255 for v in color)):
            bad.append("color must be [r, g, b] with integers 0..255")
        for message in bad:
            problems.append(Problem.make("schema", path, f"category {message}", category_id=cid))
        if cid in seen:
            problems.append(Problem.make("duplicate_category_id", path, "duplicate category id",
                                         category_id=cid))
            continue
        seen.add(cid)
        if not bad:
            out.append(Category(id=cid, name=str(name), isthing=bool(isthing),
                                color=None if color is None else tuple(color)))
    return out, problems


def categories_from_coco(entries: object, path: str) -> list[Category]:
    """Categories from a COCO `categories` list; the first problem raises its DataError."""
    categories, problems = check_categories(entries, path)
    raise_first_error(problems)
    return categories
