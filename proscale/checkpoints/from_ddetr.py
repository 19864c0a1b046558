"""Deformable DETR weights -> proscale's DeformableDETR: Hugging Face transformers'
`DeformableDetrForObjectDetection` and the original fundamentalvision/Deformable-DETR
checkpoints (`checkpoint["model"]`).

Both keep levels fine to coarse (level 0 = stride 8); proscale keeps them coarse to fine (the
encoder's token order, models/encoder.py), so the level axis of every deformable attention's
`sampling_offsets` / `attention_weights` and the rows of `level_embed` are reversed. Input
projections stay in backbone order in all three. Heads: without box refinement both share one
class head and one box head over the layers (we store one); with it, each prediction has its
own. The copies of the heads the decoder holds (`*.decoder.bbox_embed`, `*.decoder.class_embed`)
are the same tensors: checked and dropped (or used, where a file kept only the copy). The
backbone maps when it is a ResNet with torchvision/timm names: HF's timm wrapper
(`model.backbone.model.`) or the original `backbone.0.body.`.

    cfg = config_from_hf_detr(hf_model.config)               # -> DetrConfig
    state, ignored, unmapped = convert_ddetr_state_dict(hf_model.state_dict(), cfg)
    model = load_ddetr_model(hf_model)                       # our model, eval mode
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from proscale.checkpoints.errors import CheckpointError
from proscale.checkpoints.load_state import build_loaded_model
from proscale.checkpoints.state_dict import rename
from proscale.config import BackboneConfig, DetrConfig, DetrDecoderConfig, EncoderConfig

# The prediction heads: the same names in both namings.
_HEADS: list[tuple[str, str]] = [
    (r"class_embed\.(\d+)\.(weight|bias)", r"class_embed.\1.\2"),
    (r"bbox_embed\.(\d+)\.layers\.(\d)\.(weight|bias)", r"bbox_embed.\1.layers.\2.\3"),
]
# Hugging Face names (full match) -> ours.
_HF: list[tuple[str, str]] = [
    # In memory `model.backbone.model.`; in files (save_pretrained, the Hub) `model.backbone.conv_encoder.model.`.
    (r"model\.backbone\.(?:conv_encoder\.)?model\.(.+)", r"backbone.body.\1"),
    (r"model\.input_proj\.(\d+)\.([01])\.(weight|bias)", r"input_proj.\1.\2.\3"),
    (r"model\.level_embed", r"level_embed"),
    (r"model\.encoder\.layers\.(\d+)\.self_attn\.(\w+)\.(weight|bias)", r"encoder.layers.\1.self_attn.\2.\3"),
    (r"model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.norm1.\2"),
    # The FFN is `mlp.fc1/2` in memory, `fc1/2` in files; the self-attention output `o_proj` / `out_proj`.
    (r"model\.encoder\.layers\.(\d+)\.(?:mlp\.)?fc([12])\.(weight|bias)", r"encoder.layers.\1.linear\2.\3"),
    (r"model\.encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.norm2.\2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.(?:o|out)_proj\.(weight|bias)",
     r"decoder.layers.\1.self_attn.out_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"decoder.layers.\1.norm1.\2"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.(\w+)\.(weight|bias)", r"decoder.layers.\1.cross_attn.\2.\3"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.(weight|bias)", r"decoder.layers.\1.norm2.\2"),
    (r"model\.decoder\.layers\.(\d+)\.(?:mlp\.)?fc([12])\.(weight|bias)", r"decoder.layers.\1.linear\2.\3"),
    (r"model\.decoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"decoder.layers.\1.norm3.\2"),
    (r"model\.query_position_embeddings\.weight", r"query_embed.weight"),
    (r"model\.reference_points\.(weight|bias)", r"reference_points.\1"),
    (r"model\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.(weight|bias)", r"\1.\2"),
    *_HEADS,
]
# The original repository's names -> ours (its decoder layer: norm2 after self-attention,
# norm1 after cross-attention; nn.MultiheadAttention keeps in_proj as ours does).
_ORIGINAL: list[tuple[str, str]] = [
    (r"backbone\.0\.body\.(.+)", r"backbone.body.\1"),
    (r"input_proj\.(\d+)\.([01])\.(weight|bias)", r"input_proj.\1.\2.\3"),
    (r"transformer\.level_embed", r"level_embed"),
    (r"transformer\.encoder\.layers\.(\d+)\.(self_attn\.\w+|norm[12]|linear[12])\.(weight|bias)",
     r"encoder.layers.\1.\2.\3"),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     r"decoder.layers.\1.self_attn.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm2\.(weight|bias)", r"decoder.layers.\1.norm1.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.cross_attn\.(\w+)\.(weight|bias)", r"decoder.layers.\1.cross_attn.\2.\3"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm1\.(weight|bias)", r"decoder.layers.\1.norm2.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.(linear[12]|norm3)\.(weight|bias)", r"decoder.layers.\1.\2.\3"),
    (r"query_embed\.weight", r"query_embed.weight"),
    (r"transformer\.reference_points\.(weight|bias)", r"reference_points.\1"),
    (r"transformer\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.(weight|bias)", r"\1.\2"),
    *_HEADS,
]
# The decoder's references to the top-level heads, and BatchNorm step counters: not weights.
_COPIES = re.compile(r"(model|transformer)\.decoder\.(class_embed|bbox_embed)\.(.+)")
_HF_QKV = re.compile(r"model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def detect_naming(state: Mapping[str, Any]) -> str:
    """"hf" (transformers) or "original" (fundamentalvision/Deformable-DETR), from the key names."""
    if any(k.startswith("model.encoder.layers.") for k in state):
        return "hf"
    if any(k.startswith("transformer.encoder.layers.") for k in state):
        return "original"
    raise CheckpointError("not a Deformable DETR state dict: no 'model.encoder.layers.*' (Hugging Face) or "
                          "'transformer.encoder.layers.*' (original) keys")


def _reverse_levels(t: torch.Tensor, n_heads: int, n_levels: int) -> torch.Tensor:
    """sampling_offsets / attention_weights weight (M*L*P*k, C) or bias (M*L*P*k,): flip the L axis."""
    shape = t.shape
    return t.reshape(n_heads, n_levels, -1, *shape[1:]).flip(1).reshape(shape)


def convert_ddetr_state_dict(state: Mapping[str, torch.Tensor], cfg: DetrConfig,
                             naming: str = "auto") -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """A Deformable DETR state dict (HF or original names) -> (our state dict, ignored keys,
    unmapped keys). `cfg` (the model it is for) gives the heads, levels and whether the
    per-layer heads are shared. Head copies that disagree with the heads raise CheckpointError."""
    naming = detect_naming(state) if naming == "auto" else naming
    rules = [(re.compile(a), b) for a, b in (_HF if naming == "hf" else _ORIGINAL)]
    out: dict[str, torch.Tensor] = {}
    ignored, unmapped, copies = [], [], {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            ignored.append(key)
            continue
        m = _COPIES.fullmatch(key)
        if m:
            copies[f"{m.group(2)}.{m.group(3)}"] = (key, value)
            continue
        m = _HF_QKV.fullmatch(key) if naming == "hf" else None
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        name = rename(key, rules)
        if name is None:
            unmapped.append(key)
        else:
            out[name] = value
    for (layer, kind), parts in qkv.items():
        out[f"decoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"], 0)
    for name, (key, value) in copies.items():  # the decoder's copies must be the heads themselves
        if name not in out:  # a file that stored tied weights once (save_pretrained) may keep only the copy
            out[name] = value
            continue
        if not torch.equal(out[name], value):
            raise CheckpointError(f"{key} differs from {name}: this checkpoint's decoder heads are not "
                                  "the model's heads")
        ignored.append(key)
    # Shared heads: keep prediction 0's, after checking the others are the same tensors.
    if not cfg.decoder.box_refine:
        for key in [k for k in out if re.match(r"(class_embed|bbox_embed)\.[1-9]\d*\.", k)]:
            first = re.sub(r"^(\w+)\.\d+\.", r"\1.0.", key)
            if first not in out or not torch.equal(out[key], out[first]):
                raise CheckpointError(f"{key} differs from {first}, but without box refinement the heads are shared "
                                      f"(set decoder.box_refine=true for this checkpoint)")
            ignored.append(key)
            del out[key]
    # Levels each layer samples: a decoder layer all L, an encoder layer those of its stage (all L
    # in the plain plan these checkpoints have; another plan's shapes are reported when loading).
    L = len(cfg.encoder.plan)
    encoder_levels = [s + 1 for s, n in enumerate(cfg.encoder.plan) for _ in range(n)]
    pattern = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(?:self_attn|cross_attn)\."
                         r"(?:sampling_offsets|attention_weights)\.\w+")
    for key in list(out):
        m = pattern.fullmatch(key)
        if m and m.group(1) == "decoder":
            out[key] = _reverse_levels(out[key], cfg.decoder.n_heads, L)
        elif m and int(m.group(2)) < len(encoder_levels):
            levels = encoder_levels[int(m.group(2))]
            if out[key].shape[0] % (cfg.encoder.n_heads * levels) == 0:
                out[key] = _reverse_levels(out[key], cfg.encoder.n_heads, levels)
    if "level_embed" in out:
        out["level_embed"] = out["level_embed"].flip(0)
    return out, sorted(ignored), sorted(unmapped)


def _get(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


def config_from_hf_detr(hf_config: Any) -> DetrConfig:
    """transformers' DeformableDetrConfig (object or dict) -> DetrConfig. The backbone must be
    transformers' timm wrapper (TimmBackboneConfig) for its weights to map; transformers
    replaces every BatchNorm by a frozen one, so freeze_bn is on."""
    bb = _get(hf_config, "backbone_config")
    bb = bb.to_dict() if hasattr(bb, "to_dict") else (bb or {})
    if bb.get("model_type") != "timm_backbone" or not bb.get("backbone"):
        raise CheckpointError(f"backbone type {bb.get('model_type')!r} is not transformers' timm wrapper: "
                              "its weights have no proscale names")
    if _get(hf_config, "position_embedding_type", "sine") != "sine":
        raise CheckpointError("only the sine position embedding is supported")
    L = int(_get(hf_config, "num_feature_levels"))
    two_stage = bool(_get(hf_config, "two_stage"))
    return DetrConfig(
        num_classes=int(_get(hf_config, "num_labels", len(_get(hf_config, "id2label") or {}) or 91)),
        backbone=BackboneConfig(bb["backbone"], freeze_bn=True),
        encoder=EncoderConfig(plan=(0,) * (L - 1) + (int(_get(hf_config, "encoder_layers")),),
                              d_model=int(_get(hf_config, "d_model")), n_heads=int(_get(hf_config, "encoder_attention_heads")),
                              n_points=int(_get(hf_config, "encoder_n_points")), ffn_dim=int(_get(hf_config, "encoder_ffn_dim")),
                              dropout=float(_get(hf_config, "dropout"))),
        decoder=DetrDecoderConfig(
            num_queries=int(_get(hf_config, "two_stage_num_proposals" if two_stage else "num_queries")),
            layers=int(_get(hf_config, "decoder_layers")), n_heads=int(_get(hf_config, "decoder_attention_heads")),
            n_points=int(_get(hf_config, "decoder_n_points")), ffn_dim=int(_get(hf_config, "decoder_ffn_dim")),
            dropout=float(_get(hf_config, "dropout")), box_refine=bool(_get(hf_config, "with_box_refine")),
            two_stage=two_stage),
    )


def load_ddetr_model(source: Any, cfg: DetrConfig | None = None, strict: bool = True):
    """Our DeformableDETR (eval mode) carrying the weights of a transformers
    DeformableDetrForObjectDetection object (cfg from its config), or of an original
    Deformable-DETR state dict (then pass `cfg`: those checkpoints carry argparse args, not a config)."""
    if isinstance(source, Mapping):
        if cfg is None:
            raise CheckpointError("an original Deformable-DETR state dict needs cfg= (e.g. get_preset('ddetr_r50'))")
        state = source
    else:
        state = source.state_dict()
        cfg = cfg or config_from_hf_detr(source.config)
    converted, ignored, unmapped = convert_ddetr_state_dict(state, cfg)
    model, _ = build_loaded_model(cfg, converted, "deformable-detr", ignored, unmapped, strict=strict)
    return model
