"""What a data set asks of a model: segments per image and object sizes, from the annotations
alone (no image or mask is read), and the warnings they call for.

    stats = segment_stats(dataset)       # COCO panoptic or instances records; None for others
    print(stats.describe())
    for w in size_warnings(stats, num_queries=100, train_size=1024): print(w)

A Mask2Former model predicts at most `num_queries` segments per image: an image with more loses
the rest whatever the training does. Objects much smaller than a stride-8 cell of the finest
encoder level, at the size the model trains on, are hard to find (the mask head works at stride 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SMALL_SIDE = 8.0  # pixels at the training size: one cell of the stride-8 level


@dataclass
class SegmentStats:
    """Per image: segment count and image side (sqrt(H W)); per segment: sqrt(area) in pixels."""

    counts: list[int] = field(default_factory=list)
    image_sides: list[float] = field(default_factory=list)
    segment_sides: list[float] = field(default_factory=list)  # paired with segment_image_sides
    segment_image_sides: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.counts, q)) if self.counts else 0.0

    def scaled_sides(self, train_size: int) -> np.ndarray:
        """Segment sides with each image scaled to side `train_size` (0: at the images' own size)."""
        sides = np.array(self.segment_sides, dtype=np.float64)
        return sides * train_size / np.array(self.segment_image_sides) if train_size > 0 else sides

    def small_fraction(self, train_size: int) -> float:
        """Fraction of segments under SMALL_SIDE pixels across at the training size (see scaled_sides)."""
        return float((self.scaled_sides(train_size) < SMALL_SIDE).mean()) if self.segment_sides else 0.0

    def summary(self) -> dict:
        """Segments per image: mean, median, 95th percentile, max, images."""
        if not self.counts:
            return {"images": 0}
        return {"mean": float(np.mean(self.counts)), "median": self.percentile(50), "p95": self.percentile(95),
                "max": int(max(self.counts)), "images": len(self.counts)}

    def describe(self) -> str:
        if not self.counts:
            return "segments per image: no annotated image"
        return (f"segments per image: mean {np.mean(self.counts):.1f}, median {self.percentile(50):.0f}, "
                f"95th percentile {self.percentile(95):.0f}, max {max(self.counts)} ({len(self.counts)} images)")


def segment_stats(dataset) -> SegmentStats | None:
    """From a COCO panoptic (`records[i]["annotation"]["segments_info"]`) or instances
    (`records[i]["annotations"]`) data set, crowd regions excluded; None for other kinds."""
    while not hasattr(dataset, "records") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset  # through SkipBadSamples and loader wrappers
    records = getattr(dataset, "records", None)
    if not records or not isinstance(records[0], dict):
        return None
    stats = SegmentStats()
    for rec in records:
        if not isinstance(rec, dict):
            continue
        image = rec.get("image") if isinstance(rec.get("image"), dict) else {}
        h, w = _number(image.get("height")), _number(image.get("width"))
        side = math.sqrt(h * w) if h and w and h > 0 and w > 0 else None
        if "annotation" in rec:
            ann = rec["annotation"] if isinstance(rec["annotation"], dict) else {}
            segments = ann.get("segments_info")
        elif "annotations" in rec:
            segments = rec["annotations"]
        else:
            return None
        # A malformed record (the loader reports it) counts what it can.
        segments = [s for s in segments if isinstance(s, dict) and not s.get("iscrowd")] \
            if isinstance(segments, list) else []
        stats.counts.append(len(segments))
        if side is None:
            continue
        stats.image_sides.append(side)
        for seg in segments:
            area = _number(seg.get("area"))
            if area and area > 0:
                stats.segment_sides.append(math.sqrt(area))
                stats.segment_image_sides.append(side)
    return stats


def _number(value) -> float | None:
    """A finite int / float from an annotation field, else None (bools and junk included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def size_warnings(stats: SegmentStats, num_queries: int, train_size: int = 0) -> list[str]:
    """`train_size`: the image side the model trains at (0: the images' own size). Warnings for images with more segments than the model's queries, and for objects far
    smaller than the stride-8 level at the training size, each with the override that helps."""
    out = []
    if stats.counts:
        over = sum(c > num_queries for c in stats.counts)
        if over:
            need = int(max(stats.counts))
            suggest = max(need, int(math.ceil(1.5 * stats.percentile(95))))
            out.append(f"{over} of {len(stats.counts)} images have more segments than the model's {num_queries} "
                       f"queries (max {need}): the extra segments can never be predicted; use more queries, "
                       f"e.g. decoder.num_queries={suggest}")
    small = stats.small_fraction(train_size)
    if small > 0.25:
        where = f"the training size {train_size}" if train_size > 0 else "the images' own size"
        mult = SMALL_SIDE / max(1e-6, float(np.median(stats.scaled_sides(train_size))))
        base = train_size if train_size > 0 else float(np.median(stats.image_sides))
        bigger = int(math.ceil(base * max(1.0, mult) / 32) * 32)
        out.append(f"{small:.0%} of the segments are smaller than {SMALL_SIDE:.0f} px across at {where} "
                   f"(one cell of the stride-8 level): train on larger images (about {bigger} px)")
    return out
