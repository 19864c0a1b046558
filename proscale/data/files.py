"""Reading data set files with errors that name the file: JSON, RGB images, label PNGs.

Images come out as uint8 RGB whatever is stored: grayscale, RGBA / LA (alpha dropped),
palette, CMYK, 16-bit (scaled to 8 bits), float. An EXIF orientation is applied, as cameras
and annotation tools show the picture, unless the annotation's height/width match the stored
pixels and not the turned ones (then the annotation was drawn on the stored pixels). The
`decode_*` functions also return what they converted, as `Problem` notes for the validator.
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch
from PIL import Image

from proscale.data.errors import (AnnotationError, DataError, ImageError, MissingFileError,
                                  Problem)
from proscale.data.transforms import drop_empty

EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the array operation that shows the picture upright (as
# PIL.ImageOps.exif_transpose does; tests check the two agree).
_ORIENT = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1),
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1], 8: lambda a: np.rot90(a, 1),
}
_ORIENT_NAMES = {2: "mirrored", 3: "rotated 180", 4: "flipped", 5: "transposed",
                 6: "rotated 90 clockwise", 7: "transversed", 8: "rotated 90 counter-clockwise"}


def require_file(path: str, what: str, *, kind: str = "missing_file", **ids: object) -> str:
    if not os.path.isfile(path):
        raise MissingFileError(path, f"{what} not found", kind=kind, **ids)
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
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too deep
        raise AnnotationError(path, f"not valid JSON: {e}", kind="invalid_json") from e
    except OSError as e:
        raise AnnotationError(path, f"cannot read {what}: {e}", kind="invalid_json") from e
    if not isinstance(data, dict):
        raise AnnotationError(path, f"expected a JSON object at the top level, got "
                                    f"{type(data).__name__}", kind="invalid_json")
    return data


def _open(path: str, what: str, missing_kind: str, corrupt_kind: str, **ids) -> Image.Image:
    """A fully decoded PIL image; anything Pillow raises becomes an ImageError."""
    require_file(path, what, kind=missing_kind, **ids)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, palette transparency ...
            with Image.open(path) as img:
                img.load()
                img.info.setdefault("_orientation", _read_orientation(img))
                return img
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many types on bad bytes
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ImageError(path, f"cannot decode {what}: {reason}", kind=corrupt_kind, **ids) from e


def _read_orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a corrupt EXIF block is no reason to drop the image
        return 1
    return value if value in _ORIENT else 1


def _to_rgb(img: Image.Image, path: str, what: str, **ids) -> tuple[np.ndarray, list[Problem]]:
    """uint8 (H, W, 3) of any Pillow mode, and a note when it was not RGB already."""
    mode = img.mode
    if mode == "RGB":
        return np.array(img), []
    try:
        if mode == "I" or mode.startswith("I;16"):
            # 16-bit (Pillow opens 16-bit PNG / TIFF as I;16 or I): scale 0..65535 to 0..255.
            a = np.asarray(img).astype(np.int64).clip(0, 65535)
            gray = ((a * 255 + 32767) // 65535).astype(np.uint8)
            rgb, how = np.repeat(gray[..., None], 3, axis=2), f"16-bit ({mode}) scaled to 8 bits"
        elif mode == "F":
            a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
            if a.size and a.max() <= 1.0:
                a = a * 255.0  # a [0, 1] float image
            gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
            rgb, how = np.repeat(gray[..., None], 3, axis=2), "32-bit float (F) clipped to 0..255"
        else:
            if mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            rgb = np.array(img.convert("RGB"))
            how = {"L": "grayscale (L)", "1": "1-bit (1)", "P": "palette (P)", "LA": "grayscale "
                   "with alpha (LA), alpha dropped", "RGBA": "RGBA, alpha dropped",
                   "PA": "palette with alpha (PA), alpha dropped"}.get(mode, f"mode {mode}")
    except Exception as e:  # noqa: BLE001 - modes Pillow cannot convert (e.g. 'La')
        raise ImageError(path, f"cannot convert {what} of mode {mode} to RGB: {e}",
                         kind="corrupt_image", **ids) from e
    return rgb, [Problem.make("converted_mode", path, f"{what} is {how}; converted to RGB", **ids)]


def decode_image(path: str, expected_size: tuple[int, int] | None = None,
                 **ids) -> tuple[np.ndarray, list[Problem]]:
    """(uint8 (H, W, 3) RGB, notes on what was converted).

    expected_size: the (H, W) the annotations give, used only to decide whether an EXIF
    orientation that swaps H and W was in effect when they were drawn (see module doc).
    """
    img = _open(path, "image", "missing_image", "corrupt_image", **ids)
    rgb, notes = _to_rgb(img, path, "image", **ids)
    orientation = img.info.get("_orientation", 1)
    if orientation != 1:
        raw = rgb.shape[:2]
        turned = _ORIENT[orientation](rgb)
        how = f"EXIF orientation {orientation} ({_ORIENT_NAMES[orientation]})"
        if (expected_size is not None and tuple(raw) == tuple(expected_size)
                and turned.shape[:2] != tuple(expected_size)):
            notes.append(Problem.make(
                "exif_orientation", path, f"{how} not applied: the annotation's size "
                f"{expected_size[0]}x{expected_size[1]} (HxW) matches the stored pixels", **ids))
        else:
            rgb = np.ascontiguousarray(turned)
            notes.append(Problem.make(
                "exif_orientation", path, f"{how} applied: stored {raw[0]}x{raw[1]}, loaded "
                f"{rgb.shape[0]}x{rgb.shape[1]} (HxW)", **ids))
    return rgb, notes


def read_image(path: str, expected_size: tuple[int, int] | None = None, **ids) -> np.ndarray:
    """uint8 (H, W, 3) RGB; see `decode_image`."""
    return decode_image(path, expected_size, **ids)[0]


def decode_panoptic_png(path: str, **ids) -> tuple[np.ndarray, list[Problem]]:
    """(int64 (H, W) segment ids, notes) from an RGB PNG: id = R + 256 G + 256^2 B.

    RGBA (alpha dropped) and palette PNGs are read through their colours."""
    img = _open(path, "panoptic PNG", "missing_png", "corrupt_png", **ids)
    notes = []
    if img.mode in ("RGBA", "P", "PA"):
        notes.append(Problem.make("converted_mode", path, f"panoptic PNG is mode {img.mode}; "
                                  f"segment ids read from its RGB colours", **ids))
        img = img.convert("RGBA").convert("RGB")
    elif img.mode != "RGB":
        raise ImageError(path, f"panoptic PNG must be RGB, got mode {img.mode}",
                         kind="corrupt_png", **ids)
    rgb = np.asarray(img).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2], notes


def read_panoptic_png(path: str, **ids) -> np.ndarray:
    """int64 (H, W) segment ids from an RGB PNG: id = R + 256 G + 256^2 B."""
    return decode_panoptic_png(path, **ids)[0]


def decode_label_png(path: str, **ids) -> tuple[np.ndarray, list[Problem]]:
    """(uint8 (H, W) raw label values, notes) from a single-channel (L, P or 16-bit) PNG."""
    img = _open(path, "label PNG", "missing_png", "corrupt_png", **ids)
    if img.mode in ("L", "P"):
        # P images keep their index values (not the palette colours), as ADE20K-style tools expect.
        return np.asarray(img, dtype=np.uint8), []
    if img.mode == "I" or img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ImageError(path, f"{img.mode} label PNG has values outside 0..255 "
                                   f"({a.min()}..{a.max()})", kind="corrupt_png", **ids)
        return a.astype(np.uint8), [Problem.make("converted_mode", path, f"label PNG is "
                                                 f"{img.mode}; values 0..255 read as 8-bit", **ids)]
    raise ImageError(path, f"label PNG must be single-channel (L or P), got mode {img.mode}",
                     kind="corrupt_png", **ids)


def size_problem(path: str, shape: tuple[int, ...], expected: tuple[int, int], what: str,
                 reference: str = "the image's", **ids) -> Problem | None:
    """A size_mismatch Problem when shape[:2] (H, W) differs from `expected`."""
    if tuple(shape[:2]) == tuple(expected):
        return None
    return Problem.make("size_mismatch", path, f"{what} is {shape[0]}x{shape[1]} (HxW) but "
                        f"{reference} size is {expected[0]}x{expected[1]}", **ids)


MIN_SIDE = 32  # the network's largest stride: smaller images are all padding at res5
MAX_ASPECT = 10.0


def image_shape_problems(path: str, height: int, width: int, **ids) -> list[Problem]:
    """Warnings for images smaller than the stride or with an extreme aspect ratio."""
    out = []
    if min(height, width) < MIN_SIDE:
        out.append(Problem.make("image_too_small", path, f"image is {height}x{width} (HxW), "
                                f"a side below the network stride {MIN_SIDE}", **ids))
    if min(height, width) > 0 and max(height, width) > MAX_ASPECT * min(height, width):
        out.append(Problem.make("extreme_aspect_ratio", path, f"image is {height}x{width} (HxW), "
                                f"aspect ratio over {MAX_ASPECT:g}:1", **ids))
    return out


def image_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) array -> uint8 (3, H, W) tensor."""
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array).copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def finish_sample(sample: dict, transforms) -> dict:
    """Applies transforms and drops masks left empty (INTERFACES.md sample layout)."""
    if transforms is not None:
        sample = transforms(sample)
    return drop_empty(sample)
