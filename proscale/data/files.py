"""Reading data set files with errors that name the file: JSON, RGB images, label PNGs."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from proscale.data.errors import AnnotationError, ImageError, MissingFileError
from proscale.data.transforms import drop_empty


def require_file(path: str, what: str, **ids: object) -> str:
    if not os.path.isfile(path):
        raise MissingFileError(path, f"{what} not found", **ids)
    return path


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise MissingFileError(path, f"{what} folder not found")
    return path


def load_json(path: str, what: str = "annotation file") -> dict:
    """Parses a JSON object; a missing file or a decode error becomes a DataError."""
    require_file(path, what)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(path, f"not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise AnnotationError(path, f"expected a JSON object at the top level, got {type(data).__name__}")
    return data


def require_keys(data: dict, keys: tuple[str, ...], path: str, what: str = "file", **ids) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise AnnotationError(path, f"{what} lacks key(s) {missing}", **ids)


def _open(path: str, what: str, **ids) -> Image.Image:
    require_file(path, what, **ids)
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(path, f"cannot decode {what}: {e}", **ids) from e
    return img


def read_image(path: str, **ids) -> np.ndarray:
    """uint8 (H, W, 3) RGB. EXIF orientation is ignored, as COCO annotations assume."""
    return np.array(_open(path, "image", **ids).convert("RGB"))  # a writable copy for torch


def read_panoptic_png(path: str, **ids) -> np.ndarray:
    """int64 (H, W) segment ids from an RGB PNG: id = R + 256 G + 256^2 B."""
    img = _open(path, "panoptic PNG", **ids)
    if img.mode != "RGB":
        raise ImageError(path, f"panoptic PNG must be RGB, got mode {img.mode}", **ids)
    rgb = np.asarray(img).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def read_label_png(path: str, **ids) -> np.ndarray:
    """uint8 (H, W) raw label values from a single-channel (L or P) PNG."""
    img = _open(path, "label PNG", **ids)
    if img.mode not in ("L", "P"):
        raise ImageError(path, f"label PNG must be single-channel (L or P), got mode {img.mode}", **ids)
    # P images keep their index values (not the palette colours), as ADE20K-style tools expect.
    return np.asarray(img, dtype=np.uint8)


def check_size(path: str, shape: tuple[int, ...], expected: tuple[int, int], what: str,
               reference: str = "the image's", **ids) -> None:
    """Raises ImageError when shape[:2] (H, W) differs from `expected`."""
    if tuple(shape[:2]) != tuple(expected):
        raise ImageError(path, f"{what} is {shape[0]}x{shape[1]} (HxW) but {reference} size is "
                               f"{expected[0]}x{expected[1]}", **ids)


def image_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) array -> uint8 (3, H, W) tensor."""
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def finish_sample(sample: dict, transforms) -> dict:
    """Applies transforms and drops masks left empty (INTERFACES.md sample layout)."""
    if transforms is not None:
        sample = transforms(sample)
    return drop_empty(sample)
