"""Typed errors for bad data on disk, and the `Problem` records the validator lists.

Every message starts with the offending file's path and names the image / annotation /
segment id when one is involved, so a user can go straight to the broken record.

A loader raises the first *error* it meets as a `DataError`; `proscale validate-data` lists
every `Problem` (errors, warnings and notes) that the same checks find. `DataError.kind` and
`Problem.kind` share one vocabulary (see `KINDS`), so a report and a training-time failure
name a problem the same way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

ERROR, WARNING, NOTE = "error", "warning", "note"

# kind -> (severity, what it means). Errors are what the loaders refuse; warnings what they
# accept but is probably a mistake; notes what they silently fix (so a user knows).
KINDS: dict[str, tuple[str, str]] = {
    "missing_file": (ERROR, "a file or folder the layout requires does not exist"),
    "missing_image": (ERROR, "an image listed by the annotations does not exist"),
    "missing_png": (ERROR, "a panoptic / label PNG does not exist"),
    "corrupt_image": (ERROR, "an image cannot be decoded (corrupt, truncated, not an image)"),
    "corrupt_png": (ERROR, "a panoptic / label PNG cannot be decoded or has an unusable mode"),
    "invalid_json": (ERROR, "an annotation file is not valid JSON or not a JSON object"),
    "schema": (ERROR, "a JSON record lacks a key or has a value of the wrong type"),
    "unknown_category": (ERROR, "a category id (or label value) the categories do not list"),
    "unknown_image_id": (ERROR, "an annotation refers to an image id missing from 'images'"),
    "duplicate_image_id": (ERROR, "two entries of 'images' share an id"),
    "duplicate_annotation_id": (ERROR, "two annotations share an id (panoptic: an image id)"),
    "duplicate_segment_id": (ERROR, "a segment id is repeated (or 0) within one image"),
    "duplicate_category_id": (ERROR, "two categories share an id"),
    "png_segment_not_in_json": (ERROR, "the PNG has a segment id that segments_info lacks"),
    "json_segment_not_in_png": (ERROR, "a listed segment has no pixel in the PNG (zero area)"),
    "size_mismatch": (ERROR, "image, PNG and annotation height/width disagree"),
    "empty_annotation": (WARNING, "an annotation or label map covers no pixel"),
    "degenerate_polygon": (WARNING, "a polygon has under 3 points or zero area"),
    "out_of_bounds": (WARNING, "a polygon reaches outside the image (it is clipped)"),
    "bad_bbox": (WARNING, "a bbox is malformed, has zero area or leaves the image"),
    "area_mismatch": (WARNING, "a segment's 'area' differs from its pixel count in the PNG"),
    "image_too_small": (WARNING, "an image side is below the network stride (32 px)"),
    "extreme_aspect_ratio": (WARNING, "an image is more than 10 times wider than tall or v.v."),
    "unannotated_image": (WARNING, "an image has no annotation record (it is not loaded)"),
    "unreferenced_file": (NOTE, "a file in a data folder that no record uses"),
    "converted_mode": (NOTE, "grayscale / RGBA / 16-bit / palette ... image converted to RGB"),
    "exif_orientation": (NOTE, "an image has an EXIF orientation (how it was resolved)"),
}


@dataclass
class Problem:
    """One finding about a data set: kind (a KINDS key), severity ("error" | "warning" |
    "note"), the file it is about, the ids of the record (image_id, annotation_id,
    segment_id, category_id, ...) and a message without the path."""

    kind: str
    severity: str
    path: str
    ids: dict = field(default_factory=dict)
    message: str = ""

    @classmethod
    def make(cls, kind: str, path: str | os.PathLike, message: str, *, severity: str | None = None,
             **ids: object) -> "Problem":
        """A Problem with the kind's default severity; ids that are None are left out."""
        return cls(kind, severity or KINDS[kind][0], str(path),
                   {k: v for k, v in ids.items() if v is not None}, message)

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR

    def __str__(self) -> str:
        return _format(self.path, self.message, self.ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "severity": self.severity, "path": self.path,
                "ids": {k: _plain(v) for k, v in self.ids.items()}, "message": self.message}

    def to_error(self) -> "DataError":
        """The DataError subclass a loader raises for this problem: MissingFileError for a
        missing file, AnnotationError for a problem in a JSON file, ImageError for one in an
        image / PNG (undecodable, wrong size), AnnotationError otherwise."""
        cls = (MissingFileError if self.kind.startswith("missing_")
               else AnnotationError if self.path.endswith(".json")
               else ImageError if self.kind in ("corrupt_image", "corrupt_png", "size_mismatch")
               else AnnotationError)
        err = cls(self.path, self.message, kind=self.kind, **self.ids)
        err.problems = [self]
        return err


def _plain(v: object) -> object:
    return v if isinstance(v, (int, float, str, bool)) or v is None else repr(v)


def _format(path: str, message: str, ids: dict) -> str:
    where = ", ".join(f"{k}={v}" for k, v in ids.items())
    return (f"{path}: {message}" if path else message) + (f" ({where})" if where else "")


def _rebuild(cls, path, problem, kind, ids, problems):
    err = cls(path, problem, kind=kind, **ids)
    err.problems = problems
    return err


class DataError(ValueError):
    """A data set file is missing, unreadable, or inconsistent with its annotations.

    `path`, `problem` (the message without the path), `ids`, `kind` (a KINDS key) and
    `problems` (every Problem found when the error was raised, this one first) are kept as
    attributes. `DataError("a whole message")` also works, as torch's DataLoader rebuilds a
    worker's exception from its message alone.
    """

    default_kind = "schema"

    def __init__(self, path: str | os.PathLike, problem: str | None = None, *,
                 kind: str | None = None, **ids: object):
        if problem is None:  # one-argument form: the whole message
            path, problem = "", str(path)
        self.path = str(path)
        self.problem = problem
        self.kind = kind or self.default_kind
        self.ids = {k: v for k, v in ids.items() if v is not None}
        self.problems = [Problem(self.kind, ERROR, self.path, dict(self.ids), problem)]
        super().__init__(_format(self.path, problem, self.ids))

    def __reduce__(self):  # keep path / ids / kind across processes
        return _rebuild, (type(self), self.path, self.problem, self.kind, self.ids, self.problems)


class MissingFileError(DataError, FileNotFoundError):
    """A file or folder the data set layout requires does not exist."""

    default_kind = "missing_file"


class AnnotationError(DataError):
    """An annotation file is malformed or disagrees with itself or with the images/PNGs."""

    default_kind = "schema"


class ImageError(DataError):
    """An image or label PNG cannot be decoded or has the wrong size / mode."""

    default_kind = "corrupt_image"


def raise_first_error(problems: list[Problem]) -> None:
    """Raises the first error among `problems` as its DataError (with all of them attached)."""
    for p in problems:
        if p.is_error:
            err = p.to_error()
            err.problems = [p] + [q for q in problems if q is not p]
            raise err
