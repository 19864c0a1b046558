"""detectron2 naming (Mask2Former model zoo `.pkl`, the PRO-SCALE release `.pth`) <-> proscale naming.

    from_detectron2(state) -> proscale state dict      (numpy arrays become tensors)
    to_detectron2(state)   -> detectron2 state dict    (to export, and to make test fixtures)
    infer_config(state)    -> ModelConfig              (layer plan, TRC, LPE, backbone, sizes)

What maps (official -> proscale):
  sem_seg_head.pixel_decoder.transformer.level_embed          -> pixel_decoder.level_embed
  sem_seg_head.pixel_decoder.transformer.encoder.layers.i.*   -> pixel_decoder.encoder.layers.i.*
  sem_seg_head.pixel_decoder.transformer.encoder.token_excite.ops.{weight,bias}
                                                              -> pixel_decoder.encoder.trc.score.*
      (a Linear (1, C) or a 1x1 conv (1, C, 1, 1), kept as they are: the conv gates differently
      and infer_config gives it the "official_conv" TRC layout)
  sem_seg_head.pixel_decoder.{input_proj,adapter_1,layer_1,mask_features}.* -> pixel_decoder.* (same)
  sem_seg_head.predictor.*                                    -> transformer_decoder.* (same names)
  ResNet: backbone.stem.conv1[.norm] -> backbone.body.conv1 / bn1; backbone.res{2..5}.b.conv{k}[.norm]
      -> backbone.body.layer{1..4}.b.conv{k} / bn{k}; .shortcut[.norm] -> .downsample.0 / .1
      (Mask2Former's R50 strides in the 3x3 conv, as timm's does; FrozenBN has no step counter)
  Swin (D2SwinTransformer): backbone.patch_embed.* -> backbone.body.patch_embed.*;
      backbone.layers.i.blocks.j.* -> backbone.body.layers_i.blocks.j.*;
      backbone.layers.i.downsample.* -> backbone.body.layers_{i+1}.downsample.* (the original Swin
      merges patches at the end of a stage, timm at the start of the next; same 2x2 order);
      backbone.norm{i}.* (the LayerNorm on output stage i) -> backbone.out_norms.{i}.*
Ignored: criterion.empty_weight (a loss constant), Swin relative_position_index / attn_mask
(rebuilt by timm), pixel_mean / pixel_std.
Not mappable: backbone.absolute_pos_embed (Swin with ape=True; none of Mask2Former's Swins).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np
import torch

from proscale.checkpoints.errors import CheckpointError
from proscale.checkpoints.state_dict import as_tensor
from proscale.checkpoints.state_dict import detect_source

PD, PD_D2 = "pixel_decoder.", "sem_seg_head.pixel_decoder."
DEC, DEC_D2 = "transformer_decoder.", "sem_seg_head.predictor."
BODY = "backbone.body."

IGNORED_D2 = (
    re.compile(r"^criterion\.empty_weight$"),
    re.compile(r"^(pixel_mean|pixel_std)$"),
    re.compile(r"^backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index$"),
    re.compile(r"^backbone\.layers\.\d+\.blocks\.\d+\.attn_mask$"),
    re.compile(r"^backbone\.layers\.\d+\.blocks\.\d+\.attn\.attn_mask$"),
)

Rule = tuple[re.Pattern, Callable[[re.Match], str]]


def _rules(pairs: list[tuple[str, Callable[[re.Match], str]]]) -> list[Rule]:
    return [(re.compile(p), f) for p, f in pairs]


# official -> proscale
_FROM_D2 = _rules([
    # pixel decoder
    (r"^sem_seg_head\.pixel_decoder\.transformer\.level_embed$", lambda m: PD + "level_embed"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.(.+)$",
     lambda m: f"{PD}encoder.layers.{m[1]}.{m[2]}"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.token_excite\.ops(?:\.0)?\.(weight|bias)$",
     lambda m: f"{PD}encoder.trc.score.{m[1]}"),
    (r"^sem_seg_head\.pixel_decoder\.((?:input_proj|adapter_1|layer_1|mask_features)\..+)$", lambda m: PD + m[1]),
    # transformer decoder: Mask2Former's predictor names are ours
    (r"^sem_seg_head\.predictor\.(.+)$", lambda m: DEC + m[1]),
    # ResNet
    (r"^backbone\.stem\.conv1\.weight$", lambda m: BODY + "conv1.weight"),
    (r"^backbone\.stem\.conv1\.norm\.(\w+)$", lambda m: f"{BODY}bn1.{m[1]}"),
    (r"^backbone\.res([2-5])\.(\d+)\.conv(\d)\.weight$",
     lambda m: f"{BODY}layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"),
    (r"^backbone\.res([2-5])\.(\d+)\.conv(\d)\.norm\.(\w+)$",
     lambda m: f"{BODY}layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}"),
    (r"^backbone\.res([2-5])\.(\d+)\.shortcut\.weight$", lambda m: f"{BODY}layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"),
    (r"^backbone\.res([2-5])\.(\d+)\.shortcut\.norm\.(\w+)$",
     lambda m: f"{BODY}layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}"),
    # Swin
    (r"^backbone\.patch_embed\.(.+)$", lambda m: f"{BODY}patch_embed.{m[1]}"),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$", lambda m: f"{BODY}layers_{m[1]}.blocks.{m[2]}.{m[3]}"),
    (r"^backbone\.layers\.(\d+)\.downsample\.(.+)$", lambda m: f"{BODY}layers_{int(m[1]) + 1}.downsample.{m[2]}"),
    (r"^backbone\.norm([0-3])\.(weight|bias)$", lambda m: f"backbone.out_norms.{m[1]}.{m[2]}"),
])

# proscale -> official
_TO_D2 = _rules([
    (r"^pixel_decoder\.level_embed$", lambda m: PD_D2 + "transformer.level_embed"),
    (r"^pixel_decoder\.encoder\.layers\.(\d+)\.(.+)$", lambda m: f"{PD_D2}transformer.encoder.layers.{m[1]}.{m[2]}"),
    (r"^pixel_decoder\.encoder\.trc\.score\.(weight|bias)$",
     lambda m: f"{PD_D2}transformer.encoder.token_excite.ops.{m[1]}"),
    (r"^pixel_decoder\.((?:input_proj|adapter_1|layer_1|mask_features)\..+)$", lambda m: PD_D2 + m[1]),
    (r"^transformer_decoder\.(.+)$", lambda m: DEC_D2 + m[1]),
    (r"^backbone\.body\.conv1\.weight$", lambda m: "backbone.stem.conv1.weight"),
    (r"^backbone\.body\.bn1\.(\w+)$", lambda m: f"backbone.stem.conv1.norm.{m[1]}"),
    (r"^backbone\.body\.layer([1-4])\.(\d+)\.conv(\d)\.weight$",
     lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
    (r"^backbone\.body\.layer([1-4])\.(\d+)\.bn(\d)\.(\w+)$",
     lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (r"^backbone\.body\.layer([1-4])\.(\d+)\.downsample\.0\.weight$",
     lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.weight"),
    (r"^backbone\.body\.layer([1-4])\.(\d+)\.downsample\.1\.(\w+)$",
     lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
    (r"^backbone\.body\.patch_embed\.(.+)$", lambda m: f"backbone.patch_embed.{m[1]}"),
    (r"^backbone\.body\.layers_(\d+)\.blocks\.(\d+)\.(.+)$", lambda m: f"backbone.layers.{m[1]}.blocks.{m[2]}.{m[3]}"),
    (r"^backbone\.body\.layers_(\d+)\.downsample\.(.+)$", lambda m: f"backbone.layers.{int(m[1]) - 1}.downsample.{m[2]}"),
    (r"^backbone\.out_norms\.([0-3])\.(weight|bias)$", lambda m: f"backbone.norm{m[1]}.{m[2]}"),
])


def _rename(key: str, rules: list[Rule]) -> str | None:
    for pattern, fn in rules:
        m = pattern.match(key)
        if m:
            return fn(m)
    return None


def _normalise_d2_key(key: str) -> str:
    # Backbone-only detectron2 pickles (e.g. R-50.pkl converted from torchvision) drop "backbone.".
    if re.match(r"^(stem|res[2-5])\.", key):
        return "backbone." + key
    return key


def from_detectron2_report(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """official state -> (proscale state, ignored keys, unmappable keys)."""
    out: dict[str, torch.Tensor] = {}
    ignored, unmapped = [], []
    for raw_key, value in state.items():
        key = _normalise_d2_key(raw_key)
        if any(p.match(key) for p in IGNORED_D2):
            ignored.append(raw_key)
            continue
        if key.endswith("num_batches_tracked"):  # a torch BN counter from a re-saved file: harmless
            ignored.append(raw_key)
            continue
        new = _rename(key, _FROM_D2)
        if new is None:
            unmapped.append(raw_key)
            continue
        tensor = as_tensor(value, raw_key)
        if new in out:
            raise CheckpointError(f"two checkpoint keys map to {new} (one is {raw_key})")
        out[new] = tensor
    return out, ignored, unmapped


def from_detectron2(state: Mapping[str, Any], strict: bool = True) -> dict[str, torch.Tensor]:
    """Official detectron2 names -> proscale names. With `strict`, keys that cannot be mapped
    (e.g. Swin's backbone.absolute_pos_embed) raise CheckpointError naming them; otherwise they are dropped."""
    out, _, unmapped = from_detectron2_report(state)
    if strict and unmapped:
        raise CheckpointError(f"{len(unmapped)} detectron2 keys have no proscale counterpart: "
                              f"{', '.join(unmapped[:10])}{' ...' if len(unmapped) > 10 else ''}")
    return out


def swin_relative_position_index(window: int) -> torch.Tensor:
    """(window^2, window^2) index into a ((2w-1)^2, heads) bias table (Swin's definition)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


def to_detectron2(state: Mapping[str, Any], numpy: bool = False) -> dict[str, Any]:
    """proscale names -> official detectron2 names (what the Mask2Former / PRO-SCALE code loads).

    BatchNorm step counters are dropped; Swin gets the relative_position_index buffers its
    original code stores; its output norms (out_norms.i) become backbone.norm{i}. numpy=True
    returns numpy arrays (the model zoo .pkl layout).
    Raises CheckpointError for keys with no official name (e.g. a backbone detectron2 lacks).
    """
    out: dict[str, Any] = {}
    unmapped = []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = _rename(key, _TO_D2)
        if new is None:
            unmapped.append(key)
            continue
        tensor = as_tensor(value, key).detach().cpu()
        out[new] = tensor
        if new.endswith("attn.relative_position_bias_table"):
            window = (int(round(tensor.shape[0] ** 0.5)) + 1) // 2
            out[new.replace("relative_position_bias_table", "relative_position_index")] = \
                swin_relative_position_index(window)
    if unmapped:
        raise CheckpointError(f"{len(unmapped)} keys have no detectron2 name: "
                              f"{', '.join(unmapped[:10])}{' ...' if len(unmapped) > 10 else ''}")
    if numpy:
        out = {k: v.numpy() for k, v in out.items()}
    return out


# --------------------------------------------------------------------------------------------
# Config inference
# --------------------------------------------------------------------------------------------
_RESNETS = {  # (bottleneck, blocks per stage) -> timm name
    (False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50", (True, (3, 4, 23, 3)): "resnet101", (True, (3, 8, 36, 3)): "resnet152",
}
_SWINS = {  # (embed dim, depths, window) -> timm name
    (96, (2, 2, 6, 2), 7): "swin_tiny_patch4_window7_224",
    (96, (2, 2, 18, 2), 7): "swin_small_patch4_window7_224",
    (128, (2, 2, 18, 2), 7): "swin_base_patch4_window7_224",
    (128, (2, 2, 18, 2), 12): "swin_base_patch4_window12_384",
    (192, (2, 2, 18, 2), 7): "swin_large_patch4_window7_224",
    (192, (2, 2, 18, 2), 12): "swin_large_patch4_window12_384",
}


def _indices(state: Mapping[str, Any], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in state if (m := rx.match(k))})


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"cannot infer the model: the checkpoint has no {key}")
    return tuple(np.shape(state[key]))


def infer_backbone(state: Mapping[str, Any], base=None):
    """BackboneConfig from proscale-named backbone weights (ResNet or Swin from timm)."""
    from proscale.config import BackboneConfig

    bb = BackboneConfig() if base is None else BackboneConfig(**vars(base))
    if f"{BODY}layer1.0.conv1.weight" in state:
        blocks = tuple(len(_indices(state, rf"^backbone\.body\.layer{s}\.(\d+)\.")) for s in range(1, 5))
        bottleneck = any(k.startswith(f"{BODY}layer1.0.conv3.") for k in state)
        name = _RESNETS.get((bottleneck, blocks))
        if name is None:
            raise CheckpointError(f"unknown ResNet layout ({'bottleneck' if bottleneck else 'basic'} blocks "
                                  f"{blocks}); pass a preset")
        if base is None or "resnet" not in base.name:  # detectron2 ResNets use FrozenBN (no step counters)
            bb.freeze_bn = not any(k.startswith(BODY) and k.endswith("num_batches_tracked") for k in state)
        bb.name = name
        return bb
    if f"{BODY}patch_embed.proj.weight" in state:
        dim = _shape(state, f"{BODY}patch_embed.proj.weight")[0]
        depths = tuple(len(_indices(state, rf"^backbone\.body\.layers_{s}\.blocks\.(\d+)\.")) for s in range(4))
        table = _shape(state, f"{BODY}layers_0.blocks.0.attn.relative_position_bias_table")[0]
        window = (int(round(table ** 0.5)) + 1) // 2
        name = _SWINS.get((dim, depths, window))
        if name is None:
            raise CheckpointError(f"unknown Swin layout (embed {dim}, depths {depths}, window {window}); pass a preset")
        if "swin" not in bb.name:
            bb.drop_path_rate = 0.3
        bb.name, bb.freeze_bn = name, False
        bb.out_norms = "backbone.out_norms.0.weight" in state  # the original Swin's per-stage output norms
        return bb
    raise CheckpointError("cannot infer the backbone (neither a ResNet nor a Swin); pass a preset")


def infer_encoder(state: Mapping[str, Any], base=None, trc_layout: str | None = None):
    """EncoderConfig from proscale-named pixel-decoder weights.

    Each layer's `attention_weights` has n_heads * levels * n_points rows, so the widths give the
    number of levels each layer sees: (3,3,3) has 3 layers each of 1, 2 and 3 levels (rows 32, 64,
    96 at 8 heads x 4 points), Mask2Former 6 layers of 3 levels. n_heads is not in the weights:
    it comes from `base` (8, the released models, by default).
    """
    from proscale.config import EncoderConfig

    enc = EncoderConfig() if base is None else EncoderConfig(**vars(base))
    layers = _indices(state, r"^pixel_decoder\.encoder\.layers\.(\d+)\.")
    if not layers:
        raise CheckpointError("cannot infer the encoder: no pixel_decoder.encoder.layers.* weights")
    if layers != list(range(len(layers))):
        raise CheckpointError(f"encoder layers are not numbered 0..N-1: {layers}")
    rows = [_shape(state, f"{PD}encoder.layers.{i}.self_attn.attention_weights.weight")[0] for i in layers]
    widths = sorted(set(rows))
    base_unit = enc.n_heads * enc.n_points
    if len(widths) > 1:
        # Several widths: their ratios are the level counts (1:2:3, 1:2, 2:3, 1:3).
        unit = None
        for cand in (widths[0], widths[0] // 2, widths[0] // 3):
            if cand and all(w % cand == 0 and 1 <= w // cand <= 3 for w in widths):
                unit = cand
                break
    elif widths[0] % base_unit == 0 and 1 <= widths[0] // base_unit <= 3:
        unit = base_unit
    else:  # one width, not a multiple of heads x points: a Mask2Former-style all-levels encoder
        unit = widths[0] // 3 if widths[0] % 3 == 0 else None
    if not unit:
        raise CheckpointError(f"cannot read a layer plan from attention widths {rows}; pass a preset")
    levels = [r // unit for r in rows]
    if levels != sorted(levels):
        raise CheckpointError(f"encoder layers see {levels} levels: not a progressive plan")
    enc.plan = tuple(levels.count(n) for n in (1, 2, 3))
    if unit % enc.n_heads:
        raise CheckpointError(f"attention widths {rows} do not fit {enc.n_heads} heads; pass a preset")
    enc.n_points = unit // enc.n_heads
    enc.d_model = _shape(state, f"{PD}level_embed")[1]
    enc.ffn_dim = _shape(state, f"{PD}encoder.layers.0.linear1.weight")[0]
    had_trc = enc.trc
    enc.trc = f"{PD}encoder.trc.score.weight" in state
    if enc.trc and not had_trc:
        enc.trc_temperature = 0.1  # the released configuration
    if trc_layout is not None:
        enc.trc_layout = trc_layout
    elif base is None and enc.trc:
        enc.trc_layout = "official"  # released weights were trained with it
    if enc.trc:
        # The weight's shape tells the authors' two TRC variants apart: a (1, C, 1, 1) 1x1 conv
        # scores the raw-viewed map along its channels, which only "official_conv" computes; a
        # (1, C) Linear cannot be loaded into it (docs/method.md, "Token Re-Calibration (TRC)").
        if len(_shape(state, f"{PD}encoder.trc.score.weight")) == 4:
            enc.trc_layout = "official_conv"
        elif enc.trc_layout == "official_conv":
            enc.trc_layout = "official"
    enc.output = "conv" if f"{PD}layer_1.weight" in state else "lpe"
    return enc


def infer_decoder(state: Mapping[str, Any], base=None):
    from proscale.config import DecoderConfig

    dec = DecoderConfig() if base is None else DecoderConfig(**vars(base))
    dec.num_queries, dec.hidden_dim = _shape(state, f"{DEC}query_feat.weight")
    dec.dec_layers = len(_indices(state, r"^transformer_decoder\.transformer_ffn_layers\.(\d+)\."))
    dec.dim_feedforward = _shape(state, f"{DEC}transformer_ffn_layers.0.linear1.weight")[0]
    last = _indices(state, r"^transformer_decoder\.mask_embed\.layers\.(\d+)\.")[-1]
    dec.mask_dim = _shape(state, f"{DEC}mask_embed.layers.{last}.weight")[0]
    if dec.hidden_dim % dec.nheads:
        raise CheckpointError(f"decoder width {dec.hidden_dim} does not fit {dec.nheads} heads; pass a preset")
    return dec


def infer_config(state: Mapping[str, Any], base=None, trc_layout: str | None = None):
    """A ModelConfig that fits the weights (proscale or detectron2 names).

    From the weights: backbone (ResNet-18..152, Swin T/S/B/L), encoder plan, d_model, FFN width,
    n_points, TRC on/off, LPE or conv, decoder queries / layers / widths, number of classes.
    Not in the weights, so taken from `base` (default: the released settings): attention heads
    (8), TRC temperature (0.1 when TRC is present), TRC layout ("official" by default; a 1x1-conv
    TRC weight (1, C, 1, 1) always gives "official_conv", a Linear one never does), residual
    (off), pixel mean / std, drop-path.
    """
    from proscale.config import ModelConfig

    if detect_source(state) == "detectron2":
        state = from_detectron2(state, strict=False)
    cfg = ModelConfig() if base is None else ModelConfig(**vars(base))
    cfg.backbone = infer_backbone(state, cfg.backbone if base is not None else None)
    cfg.encoder = infer_encoder(state, cfg.encoder if base is not None else None, trc_layout)
    cfg.decoder = infer_decoder(state, cfg.decoder if base is not None else None)
    cfg.num_classes = _shape(state, f"{DEC}class_embed.weight")[0] - 1
    return cfg
