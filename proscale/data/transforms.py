"""Geometric transforms that move an image and its targets together.

A transform maps a sample dict to a sample dict:
    {"image": uint8 (3, H, W), "masks": bool (N, H, W), "labels": int64 (N,),
     "sem_seg": int64 (H, W) (optional, 255 = ignore)}
Other keys pass through untouched. Randomness comes from torch's global RNG, which the data
loader seeds per sample (see `collate.build_dataloader`), so an epoch replays exactly.

Training on COCO uses large-scale jitter (LSJ): flip, resize to a random 0.1-2.0 of 1024,
crop / pad to 1024x1024. Testing resizes the short side to 800 (long side at most 1333).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from proscale.config import TransformConfig
from proscale.data.metadata import IGNORE_LABEL

Sample = dict
Transform = Callable[[Sample], Sample]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize(sample: Sample, size: tuple[int, int]) -> Sample:
    """Resizes image (bilinear, antialiased), masks and sem_seg (nearest) to size = (h, w)."""
    h, w = size
    out = dict(sample)
    image = sample["image"]
    if tuple(image.shape[-2:]) == (h, w):
        return out
    out["image"] = F.interpolate(image[None], size=(h, w), mode="bilinear",
                                 align_corners=False, antialias=True)[0]
    # "nearest-exact" samples pixel centres, the same grid bilinear uses, so masks stay
    # aligned with the image ("nearest" would shift them by up to half an input pixel).
    masks = sample.get("masks")
    if masks is not None:
        if masks.shape[0] == 0:
            out["masks"] = masks.new_zeros((0, h, w))
        else:
            out["masks"] = F.interpolate(masks[None].to(torch.uint8), size=(h, w),
                                         mode="nearest-exact")[0].bool()
    sem_seg = sample.get("sem_seg")
    if sem_seg is not None:
        out["sem_seg"] = F.interpolate(sem_seg[None, None].to(torch.uint8), size=(h, w),
                                       mode="nearest-exact")[0, 0].long()
    return drop_empty(out)


def drop_empty(sample: Sample) -> Sample:
    """Removes masks (and their labels) that have no pixel left, e.g. after a crop."""
    masks = sample.get("masks")
    if masks is None or masks.shape[0] == 0:
        return sample
    keep = masks.flatten(1).any(1)
    if bool(keep.all()):
        return sample
    out = dict(sample)
    out["masks"] = masks[keep]
    out["labels"] = sample["labels"][keep]
    return out


class Compose:
    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class ResizeShortestEdge:
    """Resizes so the short side is `short` (a random choice when a list), long side <= max_size."""

    def __init__(self, short: int | Sequence[int], max_size: int):
        self.short = [short] if isinstance(short, int) else list(short)
        self.max_size = max_size

    def output_size(self, h: int, w: int, short: int) -> tuple[int, int]:
        scale = short / min(h, w)
        if max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))

    def __call__(self, sample: Sample) -> Sample:
        short = self.short[int(torch.randint(len(self.short), ()))] if len(self.short) > 1 else self.short[0]
        h, w = sample["image"].shape[-2:]
        return resize(sample, self.output_size(h, w, short))

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(short={self.short}, max_size={self.max_size})"


class RandomFlip:
    """Flips left-right (or up-down) with probability `prob`."""

    def __init__(self, prob: float = 0.5, horizontal: bool = True):
        self.prob = prob
        self.dim = -1 if horizontal else -2

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) >= self.prob:
            return sample
        out = dict(sample)
        for key in ("image", "masks", "sem_seg"):
            if sample.get(key) is not None:
                out[key] = sample[key].flip(self.dim)
        return out

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob}, {'horizontal' if self.dim == -1 else 'vertical'})"


class ScaleJitter:
    """LSJ resize: fit the image into target_size * s, s ~ U(min_scale, max_scale), keeping aspect."""

    def __init__(self, min_scale: float, max_scale: float, target_size: int | Sequence[int]):
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.target = _pair(target_size)

    def __call__(self, sample: Sample) -> Sample:
        s = self.min_scale + (self.max_scale - self.min_scale) * float(torch.rand(()))
        h, w = sample["image"].shape[-2:]
        scale = min(s * self.target[0] / h, s * self.target[1] / w)
        return resize(sample, (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))))

    def __repr__(self) -> str:
        return f"ScaleJitter({self.min_scale}, {self.max_scale}, target_size={self.target})"


class FixedSizeCrop:
    """Random crop to `size` where the image is larger; pads bottom/right to `size` if `pad`.

    Padding: image `pad_value`, masks False (no object), sem_seg `ignore_label`.
    Instances the crop removes entirely are dropped.
    """

    def __init__(self, size: int | Sequence[int], pad: bool = True, pad_value: int = 128,
                 ignore_label: int = IGNORE_LABEL):
        self.size = _pair(size)
        self.pad = pad
        self.pad_value = pad_value
        self.ignore_label = ignore_label

    def __call__(self, sample: Sample) -> Sample:
        th, tw = self.size
        h, w = sample["image"].shape[-2:]
        ch, cw = min(th, h), min(tw, w)
        y0 = int(torch.randint(h - ch + 1, ()))
        x0 = int(torch.randint(w - cw + 1, ()))
        out = dict(sample)
        for key in ("image", "masks", "sem_seg"):
            if sample.get(key) is not None:
                out[key] = sample[key][..., y0:y0 + ch, x0:x0 + cw]
        if self.pad and (ch, cw) != (th, tw):
            pad = (0, tw - cw, 0, th - ch)  # left, right, top, bottom
            out["image"] = F.pad(out["image"], pad, value=self.pad_value)
            if out.get("masks") is not None:
                out["masks"] = F.pad(out["masks"], pad, value=False)
            if out.get("sem_seg") is not None:
                out["sem_seg"] = F.pad(out["sem_seg"], pad, value=self.ignore_label)
        return drop_empty(out)

    def __repr__(self) -> str:
        return f"FixedSizeCrop(size={self.size}, pad={self.pad}, pad_value={self.pad_value})"


def build_transforms(train: bool, cfg: object | None = None) -> Compose:
    """The training or test pipeline described by `cfg` (TransformConfig-like)."""
    defaults = TransformConfig()

    def get(name):
        return getattr(cfg, name, getattr(defaults, name)) if cfg is not None else getattr(defaults, name)

    steps: list[Transform] = []
    if not train:
        if get("min_size_test") > 0:
            steps.append(ResizeShortestEdge(get("min_size_test"), get("max_size_test")))
        return Compose(steps)
    if get("flip"):
        steps.append(RandomFlip())
    mode = get("augmentation")
    if mode == "lsj":
        steps.append(ScaleJitter(get("min_scale"), get("max_scale"), get("image_size")))
        steps.append(FixedSizeCrop(get("image_size"), pad=True, pad_value=get("pad_value")))
    elif mode == "resize":
        sizes = get("min_size_train")
        steps.append(ResizeShortestEdge(sizes if not isinstance(sizes, int) else [sizes],
                                        get("max_size_train")))
        if get("crop_size") > 0:
            steps.append(FixedSizeCrop(get("crop_size"), pad=True, pad_value=get("pad_value")))
    elif mode != "none":
        raise ValueError(f"unknown augmentation {mode!r}: expected 'lsj', 'resize' or 'none'")
    return Compose(steps)
