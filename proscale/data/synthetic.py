"""Built-in synthetic panoptic data, written to disk in COCO panoptic format.

Each image is a landscape of 2-3 stuff bands (sky on top, water, ground at the bottom) split by
wavy boundaries, with 1-4 shapes (things) on it that may occlude one another. Colours are random;
the class shows in the shape (circle, square, triangle, star, ring) and, for stuff, in the
texture and position (sky: smooth vertical gradient at the top; water: horizontal ripples;
ground: grainy noise at the bottom). So a small network can learn it, but must use shape.

    generate_synthetic("data/synth", num_train=64, num_val=16, image_size=(128, 128), seed=0)

writes (the COCO panoptic layout `CocoPanopticDataset` reads, plus optional extras):
    annotations/panoptic_{train,val}.json     panoptic_{train,val}/<id>.png
    annotations/instances_{train,val}.json    {train,val}/<id>.jpg
    panoptic_semseg_{train,val}/<id>.png      (contiguous class per pixel, 255 = void)
Same arguments -> byte-identical files (each image draws from its own seeded generator).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from proscale.data.metadata import Category
from proscale.fileio import atomic_write

THING_SHAPES = ("circle", "square", "triangle", "star", "ring")
SYNTHETIC_CATEGORIES: list[Category] = [
    Category(1, "circle", True, (220, 20, 60)),
    Category(2, "square", True, (0, 0, 230)),
    Category(3, "triangle", True, (0, 160, 60)),
    Category(4, "star", True, (250, 170, 30)),
    Category(5, "ring", True, (160, 40, 200)),
    # Stuff ids are not contiguous with the things', as in COCO, so the id maps get exercised.
    Category(101, "sky", False, (135, 206, 235)),
    Category(102, "water", False, (30, 90, 160)),
    Category(103, "ground", False, (140, 110, 70)),
]
_STUFF = {c.name: c for c in SYNTHETIC_CATEGORIES if not c.isthing}
# Stuff bands from top to bottom.
_LAYOUTS = (("sky", "ground"), ("sky", "water", "ground"), ("sky", "water"), ("water", "ground"))


@dataclass
class SyntheticParams:
    """What makes the task harder. Sizes are fractions of min(H, W)."""

    min_things: int = 1
    max_things: int = 4
    min_radius: float = 0.09  # 128 px images: radius >= 11.5 px, i.e. shapes >= ~20 px across
    max_radius: float = 0.2
    max_occlusion: float = 0.3  # a new shape may hide at most this much of an earlier one
    texture: float = 1.0  # strength of the background textures (noise, ripples)
    thing_noise: float = 6.0  # per-pixel noise std on shapes (0-255 scale)
    min_contrast: float = 70.0  # min RGB distance between a shape and what lies beneath it
    min_stuff_area: int = 16  # smaller visible stuff pieces become void (ignored by PQ)
    # Colour follows the class: a segment's colour is its category's `color` plus
    # class_color_jitter * (uniform RGB - 127.5). Off: colours are uniformly random and the class
    # shows only in the shape (things) or the texture and position (stuff).
    class_colors: bool = False
    class_color_jitter: float = 0.25


DIFFICULTY = {
    "easy": SyntheticParams(min_things=1, max_things=3, min_radius=0.12, max_radius=0.22,
                            max_occlusion=0.15, texture=0.5, thing_noise=3.0, min_contrast=90.0),
    "medium": SyntheticParams(),
    "hard": SyntheticParams(min_things=2, max_things=7, min_radius=0.06, max_radius=0.2,
                            max_occlusion=0.5, texture=1.6, thing_noise=12.0, min_contrast=40.0),
}


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    if shape == "square":
        pts = [(r, a) for a in (0.25 * math.pi, 0.75 * math.pi, 1.25 * math.pi, 1.75 * math.pi)]
    elif shape == "triangle":
        pts = [(1.15 * r, -0.5 * math.pi + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        pts = [(r if k % 2 == 0 else 0.45 * r, -0.5 * math.pi + k * math.pi / 5) for k in range(10)]
    else:
        raise ValueError(shape)
    return [(cx + d * math.cos(a + angle), cy + d * math.sin(a + angle)) for d, a in pts]


def _draw_shape(shape: str, size: tuple[int, int], cx: float, cy: float, r: float,
                angle: float) -> np.ndarray:
    """bool (H, W) mask of one shape."""
    h, w = size
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if shape in ("circle", "ring"):
        rr = 0.9 * r if shape == "circle" else r
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=1)
        if shape == "ring":  # the hole shows the background, which belongs to the stuff below
            ri = 0.5 * r
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _segment_color(category: Category, p: "SyntheticParams", rng: np.random.Generator) -> np.ndarray:
    """A random colour, or with p.class_colors the category's colour plus some jitter."""
    if not p.class_colors:
        return _random_color(rng)
    jitter = p.class_color_jitter * (rng.uniform(0, 255, size=3) - 127.5)
    return np.clip(np.asarray(category.color, dtype=np.float64) + jitter, 0, 255)


def _stuff_texture(name: str, base: np.ndarray, h: int, w: int, strength: float,
                   rng: np.random.Generator) -> np.ndarray:
    """float (H, W, 3) full-image texture of one stuff class (only its band is kept)."""
    y = np.arange(h, dtype=np.float64)[:, None]
    x = np.arange(w, dtype=np.float64)[None, :]
    if name == "sky":  # smooth: brightens towards the horizon
        shade = 0.8 + 0.4 * y / h + 0 * x
        tex = base[None, None] * shade[..., None] + rng.normal(0, 2, (h, w, 1))
    elif name == "water":  # horizontal ripples
        period = rng.uniform(4, 8)
        ripple = np.sin(2 * math.pi * y / period + 0.6 * np.sin(2 * math.pi * x / rng.uniform(20, 40)))
        tex = base[None, None] + (30 * strength * ripple)[..., None] + rng.normal(0, 3, (h, w, 1))
    else:  # ground: grainy 2x2-pixel noise
        grain = rng.normal(0, 25 * strength, ((h + 1) // 2, (w + 1) // 2, 1))
        tex = base[None, None] + np.repeat(np.repeat(grain, 2, 0), 2, 1)[:h, :w]
    return tex


def _stuff_layout(h: int, w: int, rng: np.random.Generator) -> tuple[tuple[str, ...], np.ndarray]:
    """Band names (top to bottom) and int (H, W) band index per pixel."""
    names = _LAYOUTS[int(rng.integers(len(_LAYOUTS)))]
    n = len(names)
    x = np.arange(w, dtype=np.float64)
    y = np.arange(h, dtype=np.float64)[:, None]
    band = np.zeros((h, w), dtype=np.int64)
    previous = None
    for k in range(1, n):
        lo, hi = (0.3, 0.7) if n == 2 else ((0.2, 0.42) if k == 1 else (0.58, 0.8))
        base = rng.uniform(lo, hi) * h
        amp = rng.uniform(0.02, 0.07) * h
        freq = rng.uniform(0.5, 2.0)
        edge = (base + amp * np.sin(2 * math.pi * freq * x / w + rng.uniform(0, 2 * math.pi))
                + 0.4 * amp * np.sin(2 * math.pi * 2.7 * freq * x / w + rng.uniform(0, 2 * math.pi)))
        if previous is not None:  # keep bands apart so none vanishes
            edge = np.maximum(edge, previous + 0.12 * h)
        band += (y >= edge[None, :]).astype(np.int64)
        previous = edge
    return names, band


def _render(h: int, w: int, p: SyntheticParams, rng: np.random.Generator):
    """(image uint8 (H, W, 3), segment-id map int64 (H, W), segments_info list)."""
    names, band = _stuff_layout(h, w, rng)
    image = np.zeros((h, w, 3), dtype=np.float64)
    colors = []
    for k, name in enumerate(names):
        base = _segment_color(_STUFF[name], p, rng)
        for _ in range(20):  # neighbouring bands must differ in colour
            if not colors or np.linalg.norm(base - colors[-1]) >= 50:
                break
            base = _segment_color(_STUFF[name], p, rng)
        colors.append(base)
        tex = _stuff_texture(name, base, h, w, p.texture, rng)
        image[band == k] = tex[band == k]

    # Things, drawn in order: later ones occlude earlier ones.
    things = []  # (category, visible mask)
    side = min(h, w)
    for _ in range(int(rng.integers(p.min_things, p.max_things + 1))):
        for _attempt in range(30):
            shape = THING_SHAPES[int(rng.integers(len(THING_SHAPES)))]
            r = rng.uniform(p.min_radius, p.max_radius) * side
            cx = rng.uniform(0.6 * r, w - 0.6 * r)
            cy = rng.uniform(0.6 * r, h - 0.6 * r)
            mask = _draw_shape(shape, (h, w), cx, cy, r, rng.uniform(0, 2 * math.pi))
            if mask.sum() < 0.5 * (p.min_radius * side) ** 2:
                continue
            if all((vis & mask).sum() <= p.max_occlusion * vis.sum() for _, vis in things):
                break
        else:
            continue  # no placement that keeps earlier shapes visible enough
        under = image[mask].mean(0)
        category = SYNTHETIC_CATEGORIES[THING_SHAPES.index(shape)]
        color = _segment_color(category, p, rng)
        for _ in range(30):
            if np.linalg.norm(color - under) >= p.min_contrast:
                break
            color = _segment_color(category, p, rng)
        # Gentle shading along a random direction plus noise: a flat fill would be too easy.
        yy, xx = np.nonzero(mask)
        direction = rng.uniform(0, 2 * math.pi)
        ramp = ((xx - cx) * math.cos(direction) + (yy - cy) * math.sin(direction)) / r
        image[yy, xx] = (color[None] * (1 + 0.12 * ramp[:, None])
                         + rng.normal(0, p.thing_noise, (len(yy), 1)))
        for _, vis in things:
            vis &= ~mask
        things.append((shape, mask.copy()))

    ids = np.zeros((h, w), dtype=np.int64)
    segments = []
    thing_cover = np.zeros((h, w), dtype=bool)
    for k, (shape, vis) in enumerate(things):
        thing_cover |= vis
        cat = SYNTHETIC_CATEGORIES[THING_SHAPES.index(shape)]
        # Ids span all three PNG channels (e.g. 3 * 1000 + 2 = 3002 -> R=186, G=11).
        segments.append((cat.id * 1000 + k + 1, cat, vis))
    for k, name in enumerate(names):
        vis = (band == k) & ~thing_cover
        if vis.sum() >= p.min_stuff_area:
            cat = _STUFF[name]
            segments.append((cat.id * 1000 + 1, cat, vis))
    info = []
    for seg_id, cat, vis in segments:
        ids[vis] = seg_id
        ys, xs = np.nonzero(vis)
        x0, y0 = int(xs.min()), int(ys.min())
        info.append({"id": seg_id, "category_id": cat.id, "iscrowd": 0, "area": int(vis.sum()),
                     "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]})
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), ids, info


def _ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def _categories_json(things_only: bool = False) -> list[dict]:
    return [{"id": c.id, "name": c.name, "isthing": int(c.isthing), "color": list(c.color),
             "supercategory": "shape" if c.isthing else "background"}
            for c in SYNTHETIC_CATEGORIES if c.isthing or not things_only]


def _write_split(root: str, split: str, split_code: int, count: int, size: tuple[int, int],
                 seed: int, params: SyntheticParams, image_format: str) -> None:
    h, w = size
    dirs = {k: os.path.join(root, k) for k in
            (split, f"panoptic_{split}", f"panoptic_semseg_{split}", "annotations")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    contiguous = {c.id: i for i, c in enumerate(SYNTHETIC_CATEGORIES)}
    thing_ids = {c.id for c in SYNTHETIC_CATEGORIES if c.isthing}
    images, pan_anns, inst_anns = [], [], []
    for index in range(count):
        image_id = index + 1
        # One generator per image: an image depends only on (seed, split, index).
        rng = np.random.default_rng([seed, split_code, index])
        image, ids, info = _render(h, w, params, rng)
        stem = f"{image_id:06d}"
        file_name = f"{stem}.{image_format}"
        path = os.path.join(dirs[split], file_name)
        if image_format == "jpg":
            # 4:4:4 keeps colour edges sharp on small shapes.
            Image.fromarray(image).save(path, quality=95, subsampling=0)
        else:
            Image.fromarray(image).save(path)
        Image.fromarray(_ids_to_rgb(ids)).save(os.path.join(dirs[f"panoptic_{split}"], stem + ".png"))
        semseg = np.full((h, w), 255, dtype=np.uint8)
        for seg in info:
            semseg[ids == seg["id"]] = contiguous[seg["category_id"]]
        Image.fromarray(semseg).save(os.path.join(dirs[f"panoptic_semseg_{split}"], stem + ".png"))
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        pan_anns.append({"image_id": image_id, "file_name": stem + ".png", "segments_info": info})
        for seg in info:
            if seg["category_id"] not in thing_ids:
                continue
            rle = mask_utils.encode(np.asfortranarray((ids == seg["id"]).astype(np.uint8)))
            inst_anns.append({"id": len(inst_anns) + 1, "image_id": image_id,
                              "category_id": seg["category_id"], "iscrowd": 0,
                              "area": seg["area"], "bbox": seg["bbox"],
                              "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
    info_block = {"description": "proscale synthetic shapes", "seed": seed,
                  "image_size": [h, w], "params": vars(params)}
    _dump(os.path.join(dirs["annotations"], f"panoptic_{split}.json"),
          {"info": info_block, "images": images, "annotations": pan_anns,
           "categories": _categories_json()})
    _dump(os.path.join(dirs["annotations"], f"instances_{split}.json"),
          {"info": info_block, "images": images, "annotations": inst_anns,
           "categories": _categories_json(things_only=True)})


def _dump(path: str, data: dict) -> None:
    atomic_write(path, json.dumps(data, separators=(",", ":")))


def generate_synthetic(out_dir: str, num_train: int, num_val: int,
                       image_size: int | tuple[int, int] = (128, 128), seed: int = 0, *,
                       difficulty: str = "medium", params: SyntheticParams | None = None,
                       image_format: str = "jpg", **overrides) -> str:
    """Writes the synthetic data set under out_dir and returns its absolute path.

    difficulty: "easy" | "medium" | "hard" picks a SyntheticParams; `params` replaces it and
    keyword `overrides` (e.g. max_things=2) change single fields. image_format: "jpg" or "png".
    """
    if params is None:
        if difficulty not in DIFFICULTY:
            raise ValueError(f"unknown difficulty {difficulty!r}: expected one of {sorted(DIFFICULTY)}")
        params = DIFFICULTY[difficulty]
    params = replace(params, **overrides)
    if params.min_things < 0 or params.max_things < params.min_things:
        raise ValueError(f"need 0 <= min_things <= max_things, got {params}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if min(size) < 32:
        raise ValueError(f"image_size {size} is too small (min side 32)")
    root = os.path.abspath(out_dir)
    _write_split(root, "train", 0, num_train, size, seed, params, image_format)
    _write_split(root, "val", 1, num_val, size, seed, params, image_format)
    return root
