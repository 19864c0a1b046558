"""Pictures of predictions and ground truth, and the loss curve of a run.

Every draw_* function takes an RGB image (uint8 (H, W, 3) array, (3, H, W) tensor or PIL image)
and returns a uint8 (H, W, 3) array: segments tinted with their category colour (things get a
per-instance shade), outlined, and labelled with the category name (and score).

    draw_panoptic(image, out["panoptic"]["panoptic_seg"], out["panoptic"]["segments_info"], metadata)
    draw_instances(image, masks, labels, scores, metadata, score_threshold=0.5)
    draw_semantic(image, sem_seg, metadata)           # (K, H, W) scores or (H, W) labels
    draw_boxes(image, boxes, labels, scores, metadata, score_threshold=0.3)   # detections, (x0, y0, x1, y1)
    draw_ground_truth(sample, metadata)               # a data set sample (image, masks, labels)
    plot_losses("runs/x/metrics.jsonl", "runs/x/loss.png")
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from proscale.fileio import atomic_write

VOID_COLOR = (0, 0, 0)


def to_rgb_array(image: Any) -> np.ndarray:
    """uint8 (H, W, 3) from an (H, W, 3) array, a (3, H, W) tensor or a PIL image."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] == 3:
            image = image.permute(1, 2, 0)
        image = image.numpy()
    elif hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _shade(color: Sequence[int], key: int) -> np.ndarray:
    """A deterministic variation of `color` for instance `key` (things of one class differ)."""
    rng = np.random.default_rng(key * 7919 + 17)
    jitter = rng.integers(-50, 51, size=3)
    return np.clip(np.asarray(color, dtype=np.int64) + jitter, 0, 255).astype(np.uint8)


def _boundaries(ids: np.ndarray) -> np.ndarray:
    """bool (H, W): pixels whose right or lower neighbour belongs to another segment."""
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    return edge


def _compose(image: np.ndarray, ids: np.ndarray, colors: dict[int, np.ndarray], labels: dict[int, str],
             alpha: float) -> np.ndarray:
    """Tints each segment id (> 0) of `ids` with its colour, outlines segments, writes labels."""
    out = image.astype(np.float32)
    palette = np.zeros((max([int(ids.max(initial=0))] + list(colors)) + 1, 3), dtype=np.float32)
    for seg_id, color in colors.items():
        palette[seg_id] = color
    painted = ids > 0
    out[painted] = (1 - alpha) * out[painted] + alpha * palette[ids[painted]]
    out[_boundaries(ids)] = 255.0
    pil = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for seg_id, text in labels.items():
        ys, xs = np.nonzero(ids == seg_id)
        if len(ys) == 0:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), text)
        tw, th = right - left, bottom - top
        # Centred on the segment, kept inside the picture.
        x = min(max(int(np.median(xs)) - tw // 2, 0), max(ids.shape[1] - tw, 0))
        y = min(max(int(np.median(ys)) - th // 2, 0), max(ids.shape[0] - th, 0))
        draw.text((x, y), text, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(pil)


def draw_panoptic(image: Any, panoptic_seg: Any, segments_info: Iterable[dict], metadata, alpha: float = 0.55,
                  show_labels: bool = True) -> np.ndarray:
    """Panoptic result (contiguous category ids) over the image."""
    image = to_rgb_array(image)
    ids = _np(panoptic_seg).astype(np.int64)
    colors, labels = {}, {}
    for s in segments_info:
        cat = metadata.categories[int(s["category_id"])]
        colors[int(s["id"])] = _shade(cat.color, int(s["id"])) if s.get("isthing", cat.isthing) else np.asarray(cat.color)
        if show_labels:
            score = f" {s['score']:.2f}" if "score" in s else ""
            labels[int(s["id"])] = cat.name + score
    return _compose(image, ids, colors, labels, alpha)


def draw_instances(image: Any, masks: Any, labels: Any, scores: Any | None, metadata,
                   score_threshold: float = 0.5, alpha: float = 0.55, show_labels: bool = True) -> np.ndarray:
    """Instances above `score_threshold` (highest score painted last, on top)."""
    image = to_rgb_array(image)
    masks, labels = _np(masks).astype(bool), _np(labels).astype(np.int64)
    scores = np.ones(len(labels)) if scores is None else _np(scores).astype(np.float64)
    ids = np.zeros(image.shape[:2], dtype=np.int64)
    colors, names = {}, {}
    order = [i for i in np.argsort(scores, kind="stable") if scores[i] >= score_threshold]
    for n, i in enumerate(order, start=1):
        ids[masks[i]] = n
        cat = metadata.categories[int(labels[i])]
        colors[n] = _shade(cat.color, n)
        if show_labels:
            names[n] = f"{cat.name} {scores[i]:.2f}"
    return _compose(image, ids, colors, names, alpha)


def draw_boxes(image: Any, boxes: Any, labels: Any, scores: Any | None, metadata,
               score_threshold: float = 0.3, width: int = 2, show_labels: bool = True) -> np.ndarray:
    """Detections above `score_threshold` as outlined boxes in their category colour, each labelled
    "name score" (highest score drawn last, on top). boxes: (N, 4) (x0, y0, x1, y1) pixels."""
    pil = Image.fromarray(to_rgb_array(image))
    draw = ImageDraw.Draw(pil)
    boxes, labels = _np(boxes).astype(np.float64).reshape(-1, 4), _np(labels).astype(np.int64)
    scores = np.ones(len(labels)) if scores is None else _np(scores).astype(np.float64)
    for n, i in enumerate(i for i in np.argsort(scores, kind="stable") if scores[i] >= score_threshold):
        cat = metadata.categories[int(labels[i])]
        color = tuple(int(c) for c in _shade(cat.color, n + 1))
        x0, y0, x1, y1 = boxes[i]
        draw.rectangle((x0, y0, max(x1 - 1, x0), max(y1 - 1, y0)), outline=color, width=width)
        if show_labels:
            draw.text((x0 + 2, y0 + 1), f"{cat.name} {scores[i]:.2f}", fill=(255, 255, 255), stroke_width=1,
                      stroke_fill=(0, 0, 0))
    return np.asarray(pil)


def draw_semantic(image: Any, sem_seg: Any, metadata, alpha: float = 0.55, show_labels: bool = True,
                  ignore_label: int = 255) -> np.ndarray:
    """Semantic result: (K, H, W) class scores (argmax taken) or (H, W) labels."""
    image = to_rgb_array(image)
    sem = _np(sem_seg)
    labels = sem.argmax(0) if sem.ndim == 3 else sem.astype(np.int64)
    ids = np.where(labels == ignore_label, 0, labels + 1)  # 0 = unpainted
    present = [int(c) for c in np.unique(labels) if c != ignore_label and 0 <= c < metadata.num_classes]
    colors = {c + 1: np.asarray(metadata.categories[c].color) for c in present}
    names = {c + 1: metadata.categories[c].name for c in present} if show_labels else {}
    return _compose(image, ids, colors, names, alpha)


def draw_ground_truth(sample: dict, metadata, alpha: float = 0.55) -> np.ndarray:
    """A data set sample's targets ("masks" (N, H, W), "labels" (N,)) over its "image"."""
    masks, labels = _np(sample["masks"]).astype(bool), _np(sample["labels"])
    ids = np.zeros(masks.shape[1:], dtype=np.int64)
    segments = []
    for n, (mask, label) in enumerate(zip(masks, labels), start=1):
        ids[mask] = n
        segments.append({"id": n, "category_id": int(label), "isthing": metadata.categories[int(label)].isthing})
    return draw_panoptic(sample["image"], ids, segments, metadata, alpha)


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Writes a uint8 image through a temporary file and a rename."""
    return atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl (training lines and evaluation lines)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics: str | os.PathLike, out_png: str | os.PathLike, keys: Sequence[str] | None = None,
                title: str | None = None) -> Path:
    """Loss curves from a run's metrics.jsonl (default keys: the total loss and the final-layer
    class / mask / dice losses), with the evaluation PQ on a second axis when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    keys = list(keys) if keys else [k for k in ("loss", "loss_ce", "loss_mask", "loss_dice") if any(k in r for r in train)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key in keys:
        pts = [(r["iteration"], r[key]) for r in train if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    pq = [(r["iteration"], r["eval"]["panoptic"]["PQ"]) for r in evals
          if r["eval"].get("panoptic", {}).get("PQ") is not None]
    if pq:
        ax2 = ax.twinx()
        ax2.plot(*zip(*pq), "k--o", label="PQ (val)")
        ax2.set_ylabel("PQ")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left" if pq else "best")
    ax.set_title(title or Path(metrics).parent.name)
    fig.tight_layout()
    out_png = atomic_write(out_png, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return out_png


__all__ = ["draw_panoptic", "draw_instances", "draw_semantic", "draw_ground_truth", "plot_losses", "save_png",
           "read_metrics", "to_rgb_array"]
