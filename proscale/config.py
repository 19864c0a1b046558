"""Dataclass configs: the model (ModelConfig, filled in by proscale.presets) and a training run
(TrainConfig: data and augmentation, solver, loss, inference).

A config is plain data: `to_dict` / `from_dict` round-trip it through YAML or a checkpoint,
and `apply_overrides(cfg, ["encoder.plan=3,3,3", ...])` sets dotted keys from the CLI.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # any timm model with features_only (resnet*, swin_*, convnext_*)
    # "" (random weights), "hub" (timm downloads them: needs the model hub), or a local file
    # (.safetensors / .pth / .bin) in timm's key names (torchvision's for ResNets): proscale/models/backbone.py
    pretrained: str = ""
    freeze_bn: bool = False  # FrozenBN, as detectron2's ResNets use
    freeze_at: int = 0  # parameters not trained: 0 none, 1 the stem, k = 2..5 the stem and res2..res{k}
    freeze: bool = False  # the whole backbone (freeze_at=5)
    drop_path_rate: float = 0.0
    # A LayerNorm on each output map (res2..res5), as the original Swin / detectron2's
    # D2SwinTransformer has (checkpoint keys backbone.norm0..3); the Swin presets turn it on.
    out_norms: bool = False


@dataclass
class EncoderConfig:
    """The deformable encoder. Mask2Former is plan (0, 0, 6), no TRC, conv output; Deformable
    DETR is plan (0, 0, 0, 6) over its four levels."""

    # Layers per stage, one stage per level, coarse to fine: stage s adds level s. Mask2Former
    # (3 levels): (res5 only, +res4, +res3); Deformable DETR (4 levels): strides (64, +32, +16, +8).
    plan: tuple[int, ...] = (0, 0, 6)
    trc: bool = False  # Token Re-Calibration gates every level but the finest before it joins
    trc_temperature: float = 1.0
    # "spatial" (as the paper describes), "official" (raw view, Linear score) or "official_conv"
    # (raw view, 1x1-conv score): docs/method.md, "Token Re-Calibration (TRC)"
    trc_layout: str = "spatial"
    residual: bool = False  # after each stage-1/2 layer, add back the gated input tokens present
    output: str = "conv"  # Mask2Former's stride-4 output block: "conv" (3x3 conv) or "lpe"; unused by detection
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


@dataclass
class DetrDecoderConfig:
    """Deformable DETR's decoder: self-attention among the queries, deformable cross-attention
    into the encoder's L levels, FFN (docs/detection.md). Its width is the encoder's d_model."""

    num_queries: int = 300  # in two-stage mode: the number of encoder proposals kept
    layers: int = 6  # predictions: one per layer (the last is the output, the others aux)
    n_heads: int = 8
    n_points: int = 4  # sampling points per head and level in the cross-attention
    ffn_dim: int = 1024
    dropout: float = 0.1
    # Iterative box refinement: each layer's box head refines the previous layer's boxes, which
    # become the next layer's reference boxes; the per-layer heads are then not shared.
    box_refine: bool = False
    # Two-stage: every encoder token proposes a box; the top `num_queries` by class score seed
    # the queries and their reference boxes (the encoder output is supervised too).
    two_stage: bool = False


@dataclass
class DetrConfig:
    """A Deformable-DETR detector with a baseline or PRO-SCALE encoder. Its levels, coarse to
    fine, are an extra stride-64 map (a 3x3 stride-2 conv on res5) and res5, res4, res3
    (strides 32, 16, 8): `encoder.plan` has one layer count per level. The plain encoder is
    (0, 0, 0, 6); a longer plan adds more stride-2 convs (strides 128, ...)."""

    num_classes: int = 80  # sigmoid classifier: no "no object" class
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig("resnet50", freeze_bn=True))
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(plan=(0, 0, 0, 6), dropout=0.1))
    decoder: DetrDecoderConfig = field(default_factory=DetrDecoderConfig)
    # Keep the backbone's stem and first stage fixed (as Deformable DETR trains its ResNets).
    freeze_stem: bool = True
    pixel_mean: tuple[float, float, float] = (123.675, 116.280, 103.530)  # RGB, 0-255
    pixel_std: tuple[float, float, float] = (58.395, 57.120, 57.375)
    size_divisibility: int = 32  # padding is masked out, so this changes speed, not results


@dataclass
class SolverConfig:
    """AdamW, lr schedule and clipping (Mask2Former's COCO recipe, docs/method.md, training recipe)."""

    optimizer: str = "adamw"  # "adamw" (the recipe) or "sgd" (plain gradient steps, e.g. for tests)
    lr: float = 1e-4
    momentum: float = 0.9  # SGD only
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
class TransformConfig:
    """Augmentation settings. `build_transforms` also accepts any object with these attributes
    (missing ones take these defaults), e.g. DataConfig."""

    augmentation: str = "lsj"  # "lsj" (COCO recipe), "resize" (multi-scale short side), "none"
    image_size: int = 1024  # LSJ target / crop size
    min_scale: float = 0.1
    max_scale: float = 2.0
    min_size_train: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    max_size_train: int = 1333
    crop_size: int = 0  # "resize" mode: random crop / pad to this size after resizing (0 = none)
    flip: bool = True
    min_size_test: int = 800  # 0 keeps test images at their own size; -1: from the training size (recipes)
    max_size_test: int = 1333  # -1: from min_size_test (recipes)
    pad_value: int = 128


@dataclass
class DataConfig(TransformConfig):
    """Which data, and how it is augmented (the TransformConfig fields, inherited so that the
    command-line keys stay flat: data.image_size=, data.augmentation=)."""

    train: tuple[str, ...] = ()  # data specs, e.g. "coco-panoptic:/data/coco"; several are concatenated
    val: str = ""  # data spec for periodic evaluation ("" = none)
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = 2
    # A training sample that fails to load (corrupt image, bad annotation record): False stops
    # with its error; True replaces it by the next one that loads and counts it in metrics.jsonl.
    skip_bad_samples: bool = False


@dataclass
class LossConfig:
    """Loss and matching weights (Mask2Former's COCO recipe, docs/method.md, training recipe)."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    # Most of the Q queries match nothing; down-weighting "no object" keeps them from
    # dominating the class loss.
    no_object_weight: float = 0.1
    # 12544 = 112 * 112 points: the same for the loss and the matcher. 0: derived from the data when
    # the run starts, points_fraction * (training image side)^2 within [64, 12544] (proscale/recipes).
    num_points: int = 12544
    points_fraction: float = 0.011962890625  # 12544 / 1024^2: Mask2Former's points at its 1024 crop
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    # Supervise every intermediate decoder prediction (aux_outputs) too.
    deep_supervision: bool = True
    # Distillation from a trained teacher (any weights file load_model reads, e.g. the Mask2Former
    # a PRO-SCALE model was upgraded from): the student's pixel-decoder outputs (multi-scale
    # encoder maps and mask features) are pulled towards the teacher's by a mean squared error
    # (models/distill.py). "" = off.
    distill_from: str = ""
    distill_weight: float = 1.0
    # Detection (Deformable DETR) only: class_weight weighs the sigmoid focal loss; the box
    # losses are L1 on (cx, cy, w, h) and generalized IoU; the matcher uses the same weights.
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class InferenceConfig:
    """Which tasks to run and their thresholds (Mask2Former's COCO panoptic test settings)."""

    panoptic_on: bool = True
    instance_on: bool = True
    # Off by default: (K, H, W) float probabilities per image are large (133 classes on COCO).
    semantic_on: bool = False
    # Panoptic: a query takes part only if its class is not "no object" and its class
    # probability exceeds this.
    object_mask_threshold: float = 0.8
    # Panoptic: a query keeps its segment only if at least this fraction of its own mask
    # (sigmoid >= 0.5) survives the per-pixel argmax over queries.
    overlap_threshold: float = 0.8
    # Instance: detections kept per image.
    test_topk_per_image: int = 100


@dataclass
class TrainConfig:
    """Everything a training run needs; saved with every checkpoint."""

    preset: str = "proscale_r50_333"
    recipe: str = ""  # the recipe this config started from (proscale/recipes/<name>.yaml); a record only
    model_overrides: tuple[str, ...] = ()  # dotted ModelConfig keys, e.g. "encoder.plan=2,2,2"
    # Start from these weights (a proscale checkpoint, detectron2 .pkl, PRO-SCALE .pth, transformers
    # folder or .safetensors): every tensor that fits is loaded, the class head is re-initialised
    # for other classes, a Mask2Former encoder is mapped onto a PRO-SCALE plan
    # (proscale/checkpoints/warm_start.py). Unlike --resume, the run starts at iteration 0.
    init: str = ""
    # Which trained encoder layer warm-starts which layer of another plan: "first" (layer i from
    # layer min(i, M - 1)) or "depth" (layer i of N from layer floor(i * M / N) of M). "first" kept
    # the upgraded PRO-SCALE closer to its Mask2Former in docs/upgrade.md.
    init_layer_map: str = "first"
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    test: InferenceConfig = field(default_factory=InferenceConfig)  # evaluation tasks and thresholds
    iterations: int = 368750  # optimizer steps
    batch_size: int = 16  # global: images per optimizer step over all processes and accumulation
    eval_period: int = 5000  # 0: evaluate only at the end (when there is validation data)
    checkpoint_period: int = 5000
    keep_last: int = 3  # periodic checkpoints kept (0 = all)
    log_period: int = 20
    seed: int = 0
    output_dir: str = "output"
    device: str = "auto"  # "auto", "cpu", "cuda"
    max_nonfinite: int = 20  # consecutive skipped (non-finite) steps before the run stops
    stop_after: int = 0  # stop with a checkpoint after this many iterations (a time-sliced job); 0 = off
    find_unused_parameters: bool = False  # DDP; needed only when a config leaves parameters unused
    progress: bool = True  # tqdm progress bar with ETA (rank 0, when stderr is a terminal)
    tensorboard: bool = True  # also log to OUT/tensorboard event files (when the tensorboard package is installed)


# ------------------------------------------------------------------------------ plain data
def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def plain(value: Any) -> Any:
    """JSON- and weights_only-safe: mappings with string keys and lists (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


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


def model_config_from_dict(data: dict) -> "ModelConfig | DetrConfig":
    """A stored model config (a checkpoint's "config") as the dataclass of its family: a
    DetrConfig (detection) is recognised by its detection-only fields, else a ModelConfig."""
    detection_only = {f.name for f in dataclasses.fields(DetrConfig)} - {f.name for f in dataclasses.fields(ModelConfig)}
    return from_dict(DetrConfig if detection_only & set(data) else ModelConfig, data)


def _parse_scalar(text: str, kind: type) -> Any:
    text = text.strip()
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    return kind(text)


def _parse(text: str, hint: Any) -> Any:
    """`text` as the field's declared type: bool, int, float, str, or a tuple of them
    (`tuple[int, ...]`, `tuple[float, float]`; items comma-separated, brackets optional)."""
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        items = [t for t in text.strip("()[] ").split(",") if t.strip()]
        kinds = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(items):
            raise ValueError(f"expected {len(kinds)} comma-separated values, got {text!r}")
        return tuple(_parse_scalar(t, k) for t, k in zip(items, kinds))
    return _parse_scalar(text, hint if hint in (bool, int, float) else str)


def get_key(cfg: Any, key: str) -> Any:
    """The value at a dotted key ("solver.lr"); KeyError for an unknown one."""
    node = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise KeyError(f"unknown config key {key!r}")
        node = getattr(node, part)
    return node


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Sets dotted keys in place: ["encoder.plan=3,3,3", "decoder.num_queries=50"]; each value
    is parsed as its field's declared type. Unknown keys and unparsable values raise."""
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
        if not dataclasses.is_dataclass(node) or last not in {f.name for f in dataclasses.fields(node)}:
            raise KeyError(f"unknown config key {key!r}")
        hint = get_type_hints(type(node))[last]
        if dataclasses.is_dataclass(hint):
            raise KeyError(f"{key!r} is a section, not a value: set its fields ({key}.<field>=...)")
        try:
            value = _parse(text, hint)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        setattr(node, last, value)
    return cfg
