"""Named model configs. A preset is a function returning a ModelConfig; `get_preset(name)` looks it up.

Mask2Former and PRO-SCALE differ only in `encoder`: the layer plan, TRC and the output block.
"""
from __future__ import annotations

from typing import Callable

from proscale.config import BackboneConfig, DecoderConfig, EncoderConfig, ModelConfig

PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    PRESETS[fn.__name__] = fn
    return fn


def proscale_encoder(plan: tuple[int, int, int], layout: str = "official", **kw) -> EncoderConfig:
    """PRO-SCALE as released: TRC (temperature 0.1) and LPE. `layout="official"` reproduces the
    authors' weights; use "spatial" for models trained from scratch (see models/encoder.py)."""
    return EncoderConfig(plan=plan, trc=True, trc_temperature=0.1, trc_layout=layout, output="lpe", **kw)


def _r50(encoder: EncoderConfig) -> ModelConfig:
    return ModelConfig(backbone=BackboneConfig("resnet50", freeze_bn=True), encoder=encoder)


def _swin_t(encoder: EncoderConfig) -> ModelConfig:
    return ModelConfig(backbone=BackboneConfig("swin_tiny_patch4_window7_224", drop_path_rate=0.3), encoder=encoder)


@register
def m2f_r50() -> ModelConfig:
    """Mask2Former R50, COCO panoptic (133 classes)."""
    return _r50(EncoderConfig())


@register
def proscale_r50_111() -> ModelConfig:
    return _r50(proscale_encoder((1, 1, 1)))


@register
def proscale_r50_222() -> ModelConfig:
    return _r50(proscale_encoder((2, 2, 2)))


@register
def proscale_r50_333() -> ModelConfig:
    """PRO-SCALE (3,3,3) R50, the released configuration."""
    return _r50(proscale_encoder((3, 3, 3)))


@register
def m2f_swin_t() -> ModelConfig:
    return _swin_t(EncoderConfig())


@register
def proscale_swin_t_111() -> ModelConfig:
    return _swin_t(proscale_encoder((1, 1, 1)))


@register
def proscale_swin_t_222() -> ModelConfig:
    return _swin_t(proscale_encoder((2, 2, 2)))


@register
def proscale_swin_t_333() -> ModelConfig:
    return _swin_t(proscale_encoder((3, 3, 3)))


def _tiny(encoder: EncoderConfig) -> ModelConfig:
    """A small model that trains on the built-in synthetic data on a CPU in minutes."""
    enc = encoder
    enc.d_model, enc.n_heads, enc.ffn_dim = 64, 4, 256
    return ModelConfig(
        num_classes=8,
        backbone=BackboneConfig("resnet18"),
        encoder=enc,
        decoder=DecoderConfig(num_queries=20, hidden_dim=64, nheads=4, dim_feedforward=256, dec_layers=3, mask_dim=64),
    )


@register
def m2f_tiny() -> ModelConfig:
    """CPU preset: ResNet-18, 64 channels, 20 queries, 3 decoder layers; baseline encoder."""
    return _tiny(EncoderConfig())


@register
def proscale_tiny_333() -> ModelConfig:
    """CPU preset: as m2f_tiny with the PRO-SCALE (3,3,3) encoder (spatial TRC layout)."""
    return _tiny(proscale_encoder((3, 3, 3), layout="spatial"))


def _nano(encoder: EncoderConfig) -> ModelConfig:
    """The tiny model on RegNetX-200MF (timm `regnetx_002`, 2.3M parameters): the backbone of a
    from-scratch ResNet-18 costs 8x the GFLOPs and ~2x the CPU time per step, and at 64-128 px
    inputs it would be ~75% of the whole model's GFLOPs, hiding the pixel decoder the comparison
    is about. `proscale quickstart` trains these."""
    cfg = _tiny(encoder)
    cfg.backbone = BackboneConfig("regnetx_002")
    return cfg


@register
def m2f_nano() -> ModelConfig:
    """CPU preset: as m2f_tiny on a RegNetX-200MF backbone; baseline encoder."""
    return _nano(EncoderConfig())


@register
def proscale_nano_333() -> ModelConfig:
    """CPU preset: as m2f_nano with the PRO-SCALE (3,3,3) encoder (spatial TRC layout)."""
    return _nano(proscale_encoder((3, 3, 3), layout="spatial"))


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
