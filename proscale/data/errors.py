"""Typed errors for bad data on disk.

Every message starts with the offending file's path and names the image / annotation /
segment id when one is involved, so a user can go straight to the broken record.
"""
from __future__ import annotations

import os


class DataError(ValueError):
    """A data set file is missing, unreadable, or inconsistent with its annotations."""

    def __init__(self, path: str | os.PathLike, problem: str, **ids: object):
        self.path = str(path)
        self.problem = problem
        self.ids = {k: v for k, v in ids.items() if v is not None}
        where = ", ".join(f"{k}={v}" for k, v in self.ids.items())
        super().__init__(f"{self.path}: {problem}" + (f" ({where})" if where else ""))


class MissingFileError(DataError, FileNotFoundError):
    """A file or folder the data set layout requires does not exist."""


class AnnotationError(DataError):
    """An annotation file is malformed or disagrees with itself or with the images/PNGs."""


class ImageError(DataError):
    """An image or label PNG cannot be decoded or has the wrong size / mode."""
