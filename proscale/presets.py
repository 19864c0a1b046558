"""Named model configs, registered as builders (in the spirit of timm's model registry).

A preset is a function returning a fresh ModelConfig, registered under its own name:

    @register_preset
    def m2f_r50() -> ModelConfig: ...

    list_presets("proscale_r50_*")   # ['proscale_r50_111', 'proscale_r50_222', 'proscale_r50_333']
    cfg = get_preset("m2f_r50")      # a new ModelConfig on every call; the caller may change it

Mask2Former and PRO-SCALE differ only in `encoder`: the layer plan, TRC and the output block.
The model family follows from the config's type: ModelConfig builds Mask2Former (segmentation),
DetrConfig builds Deformable DETR (detection; the `ddetr_*` presets, docs/detection.md).
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Callable

from proscale.config import BackboneConfig, DecoderConfig, DetrConfig, DetrDecoderConfig, EncoderConfig, ModelConfig

PresetBuilder = Callable[[], "ModelConfig | DetrConfig"]

# name -> builder. Filled only by `register_preset`, below in this file.
PRESETS: dict[str, PresetBuilder] = {}


def register_preset(fn: PresetBuilder) -> PresetBuilder:
    """Registers `fn` under `fn.__name__`; a name already taken is a ValueError (a silent
    replacement would change what an existing preset name builds)."""
    name = fn.__name__
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    PRESETS[name] = fn
    return fn


def list_presets(filter: str = "") -> list[str]:  # noqa: A002 - the name timm's list_models uses
    """Registered preset names matching the fnmatch pattern `filter` ("" = all), sorted."""
    names = sorted(PRESETS)
    return fnmatch.filter(names, filter) if filter else names


def get_preset(name: str) -> ModelConfig | DetrConfig:
    """A new ModelConfig built by preset `name`; an unknown name is a KeyError naming the
    closest registered ones."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=5)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose from {', '.join(list_presets())}"
        raise KeyError(f"unknown preset {name!r}; {hint}")
    return PRESETS[name]()


def proscale_encoder(plan: tuple[int, int, int], layout: str = "official", output: str = "lpe",
                     **kw) -> EncoderConfig:
    """PRO-SCALE as released: TRC (temperature 0.1) and LPE. `layout="official"` reproduces the
    authors' weights; use "spatial" for models trained from scratch (see models/encoder.py)."""
    return EncoderConfig(plan=plan, trc=True, trc_temperature=0.1, trc_layout=layout, output=output, **kw)


def _r50(encoder: EncoderConfig) -> ModelConfig:
    return ModelConfig(backbone=BackboneConfig("resnet50", freeze_bn=True), encoder=encoder)


def _swin_t(encoder: EncoderConfig) -> ModelConfig:
    # out_norms: the original Swin's per-stage output LayerNorms, which Mask2Former's Swin checkpoints carry.
    backbone = BackboneConfig("swin_tiny_patch4_window7_224", drop_path_rate=0.3, out_norms=True)
    return ModelConfig(backbone=backbone, encoder=encoder)


@register_preset
def m2f_r50() -> ModelConfig:
    """Mask2Former R50, COCO panoptic (133 classes)."""
    return _r50(EncoderConfig())


@register_preset
def proscale_r50_111() -> ModelConfig:
    """PRO-SCALE (1,1,1) R50."""
    return _r50(proscale_encoder((1, 1, 1)))


@register_preset
def proscale_r50_222() -> ModelConfig:
    """PRO-SCALE (2,2,2) R50."""
    return _r50(proscale_encoder((2, 2, 2)))


@register_preset
def proscale_r50_333() -> ModelConfig:
    """PRO-SCALE (3,3,3) R50, the released configuration."""
    return _r50(proscale_encoder((3, 3, 3)))


@register_preset
def m2f_swin_t() -> ModelConfig:
    """Mask2Former Swin-T, COCO panoptic (133 classes)."""
    return _swin_t(EncoderConfig())


@register_preset
def proscale_swin_t_111() -> ModelConfig:
    """PRO-SCALE (1,1,1) Swin-T."""
    return _swin_t(proscale_encoder((1, 1, 1)))


@register_preset
def proscale_swin_t_222() -> ModelConfig:
    """PRO-SCALE (2,2,2) Swin-T."""
    return _swin_t(proscale_encoder((2, 2, 2)))


@register_preset
def proscale_swin_t_333() -> ModelConfig:
    """PRO-SCALE (3,3,3) Swin-T."""
    return _swin_t(proscale_encoder((3, 3, 3)))


def _tiny(encoder: EncoderConfig) -> ModelConfig:
    """A small model that trains on the built-in synthetic data on a CPU in minutes.
    `encoder` is left as it is: its width is set on a copy."""
    return ModelConfig(
        num_classes=8,
        backbone=BackboneConfig("resnet18"),
        encoder=dataclasses.replace(encoder, d_model=64, n_heads=4, ffn_dim=256),
        decoder=DecoderConfig(num_queries=20, hidden_dim=64, nheads=4, dim_feedforward=256, dec_layers=3, mask_dim=64),
    )


@register_preset
def m2f_tiny() -> ModelConfig:
    """CPU preset: ResNet-18, 64 channels, 20 queries, 3 decoder layers; baseline encoder."""
    return _tiny(EncoderConfig())


@register_preset
def proscale_tiny_333() -> ModelConfig:
    """CPU preset: as m2f_tiny with the PRO-SCALE (3,3,3) encoder (spatial TRC layout)."""
    return _tiny(proscale_encoder((3, 3, 3), layout="spatial"))


def _nano(encoder: EncoderConfig) -> ModelConfig:
    """The tiny model on RegNetX-200MF (timm `regnetx_002`, 2.3M parameters): the backbone of a
    from-scratch ResNet-18 costs 8x the GFLOPs and ~2x the CPU time per step, and at 64-128 px
    inputs it would be ~75% of the whole model's GFLOPs, hiding the pixel decoder the comparison
    is about. `proscale quickstart` trains these."""
    return dataclasses.replace(_tiny(encoder), backbone=BackboneConfig("regnetx_002"))


@register_preset
def m2f_nano() -> ModelConfig:
    """CPU preset: as m2f_tiny on a RegNetX-200MF backbone; baseline encoder."""
    return _nano(EncoderConfig())


@register_preset
def proscale_nano_333() -> ModelConfig:
    """CPU preset: as m2f_nano with the PRO-SCALE (3,3,3) encoder (spatial TRC layout)."""
    return _nano(proscale_encoder((3, 3, 3), layout="spatial"))


@register_preset
def proscale_nano_331_conv() -> ModelConfig:
    """CPU preset: as m2f_nano with the PRO-SCALE (3,3,1) encoder and the 3x3 conv output instead
    of LPE (spatial TRC layout): 0.51x m2f_nano's pixel-decoder GFLOPs at 128 px. What
    `proscale tradeoff` recommends on the quickstart's 128 px data, where LPE's max-pool costs mask
    boundary quality (docs/tradeoff.md); `proscale quickstart` trains it."""
    return _nano(proscale_encoder((3, 3, 1), layout="spatial", output="conv"))


# ------------------------------------------------------------------------ detection (Deformable DETR)
def _ddetr_r50(encoder: EncoderConfig, **decoder) -> DetrConfig:
    """Deformable DETR R50 (COCO, 80 classes), frozen-BN ResNet-50 with its stem and res2 fixed:
    train it from ImageNet weights (backbone.pretrained=true)."""
    return DetrConfig(encoder=encoder, decoder=DetrDecoderConfig(**decoder))


def proscale_detr_encoder(plan: tuple[int, ...]) -> EncoderConfig:
    """PRO-SCALE over Deformable DETR's four levels (strides 64, 32, 16, 8): TRC in the spatial
    layout (temperature 0.1), Deformable DETR's dropout; there is no stride-4 output block."""
    return EncoderConfig(plan=plan, trc=True, trc_temperature=0.1, trc_layout="spatial", dropout=0.1)


@register_preset
def ddetr_r50() -> DetrConfig:
    """Deformable DETR R50, single stage, no box refinement (plan (0, 0, 0, 6))."""
    return _ddetr_r50(EncoderConfig(plan=(0, 0, 0, 6), dropout=0.1))


@register_preset
def ddetr_r50_twostage_refine() -> DetrConfig:
    """Deformable DETR R50 with iterative box refinement and two-stage proposals."""
    return _ddetr_r50(EncoderConfig(plan=(0, 0, 0, 6), dropout=0.1), box_refine=True, two_stage=True)


@register_preset
def proscale_ddetr_r50_2220() -> DetrConfig:
    """PRO-SCALE Deformable DETR R50, plan (2, 2, 2, 0): six layers, the stride-8 tokens join only
    the decoder's memory (TRC still scores them)."""
    return _ddetr_r50(proscale_detr_encoder((2, 2, 2, 0)))


@register_preset
def proscale_ddetr_r50_1113() -> DetrConfig:
    """PRO-SCALE Deformable DETR R50, plan (1, 1, 1, 3): six layers, three of them over all tokens."""
    return _ddetr_r50(proscale_detr_encoder((1, 1, 1, 3)))


@register_preset
def proscale_ddetr_r50_2222() -> DetrConfig:
    """PRO-SCALE Deformable DETR R50, plan (2, 2, 2, 2): eight layers, two over all tokens."""
    return _ddetr_r50(proscale_detr_encoder((2, 2, 2, 2)))


@register_preset
def proscale_ddetr_r50_2222_twostage_refine() -> DetrConfig:
    """As proscale_ddetr_r50_2222 with box refinement and two-stage proposals."""
    return _ddetr_r50(proscale_detr_encoder((2, 2, 2, 2)), box_refine=True, two_stage=True)


def _ddetr_nano(encoder: EncoderConfig) -> DetrConfig:
    """A CPU-sized Deformable DETR for the built-in synthetic data: RegNetX-200MF trained from
    scratch (so nothing of it is frozen), 64 channels, 4 heads, 3 decoder layers, 30 queries,
    box refinement."""
    return DetrConfig(
        num_classes=8,
        backbone=BackboneConfig("regnetx_002"),
        encoder=dataclasses.replace(encoder, d_model=64, n_heads=4, ffn_dim=256, dropout=0.0),
        decoder=DetrDecoderConfig(num_queries=30, layers=3, n_heads=4, ffn_dim=256, dropout=0.0, box_refine=True),
        freeze_stem=False,
    )


@register_preset
def ddetr_nano() -> DetrConfig:
    """CPU preset: Deformable DETR, plain encoder (0, 0, 0, 6)."""
    return _ddetr_nano(EncoderConfig(plan=(0, 0, 0, 6)))


@register_preset
def proscale_ddetr_nano_2222() -> DetrConfig:
    """CPU preset: as ddetr_nano with the PRO-SCALE (2, 2, 2, 2) encoder."""
    return _ddetr_nano(proscale_detr_encoder((2, 2, 2, 2)))


@register_preset
def proscale_ddetr_nano_1113() -> DetrConfig:
    """CPU preset: as ddetr_nano with the PRO-SCALE (1, 1, 1, 3) encoder."""
    return _ddetr_nano(proscale_detr_encoder((1, 1, 1, 3)))
