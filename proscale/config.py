"""Dataclass configs for the model. Presets (proscale.presets) fill them in.

A config is plain data: `to_dict` / `from_dict` round-trip it through YAML or a checkpoint,
and `apply_overrides(cfg, ["encoder.plan=3,3,3", ...])` sets dotted keys from the CLI.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, get_type_hints


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # any timm model with features_only (resnet*, swin_*, convnext_*)
    pretrained: bool = False  # needs the model hub; tests and offline machines keep False
    freeze_bn: bool = False  # FrozenBN, as detectron2's ResNets use
    drop_path_rate: float = 0.0


@dataclass
class EncoderConfig:
    """The deformable encoder. Mask2Former is plan (0, 0, 6), no TRC, conv output."""

    plan: tuple[int, int, int] = (0, 0, 6)  # layers per stage: (res5 only, +res4, +res3)
    trc: bool = False  # Token Re-Calibration gates res5 and res4 before they join
    trc_temperature: float = 1.0
    trc_layout: str = "spatial"  # "spatial" (as the paper describes) or "official" (raw view)
    residual: bool = False  # add each early stage's input back after every layer of it
    output: str = "conv"  # stride-4 output block: "conv" (3x3 conv, Mask2Former) or "lpe"
    d_model: int = 256
    n_heads: int = 8
    n_points: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.0


@dataclass
class DecoderConfig:
    """Masked-attention transformer decoder."""

    num_queries: int = 100
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9  # predictions: 1 from the queries + 1 per layer
    mask_dim: int = 256


@dataclass
class ModelConfig:
    num_classes: int = 133
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    pixel_mean: tuple[float, float, float] = (123.675, 116.280, 103.530)  # RGB, 0-255
    pixel_std: tuple[float, float, float] = (58.395, 57.120, 57.375)
    size_divisibility: int = 32


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Builds dataclass `cls` from a (possibly partial) nested dict; unknown keys are an error."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise KeyError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    kwargs = {}
    for key, value in data.items():
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            value = from_dict(sub, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _parse(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, tuple):
        items = [t for t in text.strip("()[] ").split(",") if t.strip()]
        kind = type(current[0]) if current else float
        return tuple(kind(t.strip()) for t in items)
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    return text


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Sets dotted keys in place: ["encoder.plan=3,3,3", "decoder.num_queries=50"]."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        *path, last = key.strip().split(".")
        node = cfg
        for part in path:
            if not hasattr(node, part):
                raise KeyError(f"unknown config key {key!r}")
            node = getattr(node, part)
        if not dataclasses.is_dataclass(node) or not hasattr(node, last):
            raise KeyError(f"unknown config key {key!r}")
        setattr(node, last, _parse(text, getattr(node, last)))
    return cfg


@dataclass
class SolverConfig:
    """AdamW, lr schedule and clipping (Mask2Former's COCO recipe, PROSCALE.md section 4)."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_norm: float = 0.0  # norm layers (BN / GN / LN) are not decayed
    weight_decay_embed: float = 0.0  # nor embeddings (queries, level embeddings, position tables)
    backbone_multiplier: float = 0.1  # backbone lr = lr * this
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "step"  # "step" (x gamma at each milestone), "poly", "constant"
    steps: tuple[int, ...] = ()  # absolute milestones; empty: step_fractions of the iterations
    step_fractions: tuple[float, ...] = (0.88889, 0.96296)  # 327,778 and 355,092 of 368,750
    gamma: float = 0.1
    poly_power: float = 0.9  # ADE20K semantic recipe
    warmup_iters: int = 0  # linear warmup from warmup_factor * lr; the COCO recipe has none
    warmup_factor: float = 0.001
    clip_grad: float = 0.01  # full-model gradient L2 norm; 0 disables clipping
    amp: bool = True  # mixed precision on CUDA (the pixel decoder stays fp32); ignored on CPU
    amp_dtype: str = "float16"  # "float16" (with a GradScaler) or "bfloat16"
    accumulate: int = 1  # micro-batches per optimizer step (per process)


@dataclass
class DataConfig:
    """Which data and how it is augmented. The augmentation fields are those of
    proscale.data.transforms.TransformConfig (build_transforms reads them from here)."""

    train: tuple[str, ...] = ()  # data specs, e.g. "coco-panoptic:/data/coco"; several are concatenated
    val: str = ""  # data spec for periodic evaluation ("" = none)
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = 2
    # A training sample that fails to load (corrupt image, bad annotation record): False stops
    # with its error; True replaces it by the next one that loads and counts it in metrics.jsonl.
    skip_bad_samples: bool = False
    augmentation: str = "lsj"  # "lsj", "resize" or "none"
    image_size: int = 1024  # LSJ target / crop size
    min_scale: float = 0.1
    max_scale: float = 2.0
    min_size_train: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    max_size_train: int = 1333
    crop_size: int = 0
    flip: bool = True
    min_size_test: int = 800  # 0 keeps test images at their own size
    max_size_test: int = 1333
    pad_value: int = 128
