"""proscale -> Hugging Face transformers' Mask2Former (`proscale convert --to hf`).

Writes a folder that `transformers.Mask2FormerForUniversalSegmentation.from_pretrained` loads:
config.json (a Mask2FormerConfig with transformers' Swin for a Swin backbone, else its timm
backbone wrapper, `TimmBackboneConfig`), model.safetensors (the inverse of from_hf's key map:
our `backbone.body.` is the wrapper's `model.pixel_level_module.encoder._backbone.`, a Swin maps
as proscale.checkpoints.hf_swin says, nn.MultiheadAttention's stacked in_proj of the decoder
self-attention is split into its q/k/v projections) and preprocessor_config.json (a
Mask2FormerImageProcessor with our pixel mean / std and test resize). Nothing here imports
transformers; tests/test_pretrained.py loads the folder with it and compares the outputs.

What transformers' Mask2Former can express, and so what is refused with CheckpointError:
  - only the baseline encoder: every layer over all three scales, no TRC, 3x3 conv output
    (plan (0, 0, N)); PRO-SCALE plans, TRC, LPE, RESIDUAL have no counterpart there;
  - one attention-head count for encoder and decoder, 4 sampling points;
  - a Swin with output norms (the Swin presets; transformers' SwinBackbone always has them), or a
    timm backbone with (B, C, H, W) outputs and no output norms (ResNet, RegNet, ...): the timm
    wrapper passes timm's maps on as they are and has no norms.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from proscale.checkpoints.errors import CheckpointError
from proscale.checkpoints.from_hf import map_hf_state_dict
from proscale.checkpoints.hf_swin import swin_hf_config, swin_to_hf
from proscale.checkpoints.state_dict import rename
from proscale.config import ModelConfig
from proscale.fileio import atomic_write
from proscale.models.pretrained import safetensors_bytes

_PIX = "model.pixel_level_module."
_DEC = "model.transformer_module."
_SELF = "transformer_decoder.transformer_self_attention_layers."

# (our pattern, HF template), matched in full; the inverse of from_hf._RENAMES.
_TO_HF: list[tuple[re.Pattern, str]] = [
    (re.compile(pattern), target)
    for pattern, target in [
        (r"backbone\.body\.(.+)", _PIX + r"encoder._backbone.\1"),
        (r"pixel_decoder\.level_embed", _PIX + "decoder.level_embed"),
        (r"pixel_decoder\.input_proj\.(\d)\.([01])\.(weight|bias)", _PIX + r"decoder.input_projections.\1.\2.\3"),
        (r"pixel_decoder\.encoder\.layers\.(\d+)\.self_attn\."
         r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
         _PIX + r"decoder.encoder.layers.\1.self_attn.\2.\3"),
        (r"pixel_decoder\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)",
         _PIX + r"decoder.encoder.layers.\1.self_attn_layer_norm.\2"),
        (r"pixel_decoder\.encoder\.layers\.(\d+)\.linear([12])\.(weight|bias)",
         _PIX + r"decoder.encoder.layers.\1.fc\2.\3"),
        (r"pixel_decoder\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)",
         _PIX + r"decoder.encoder.layers.\1.final_layer_norm.\2"),
        (r"pixel_decoder\.adapter_1\.weight", _PIX + "decoder.adapter_1.0.weight"),
        (r"pixel_decoder\.adapter_1\.norm\.(weight|bias)", _PIX + r"decoder.adapter_1.1.\1"),
        (r"pixel_decoder\.layer_1\.weight", _PIX + "decoder.layer_1.0.weight"),
        (r"pixel_decoder\.layer_1\.norm\.(weight|bias)", _PIX + r"decoder.layer_1.1.\1"),
        (r"pixel_decoder\.mask_features\.(weight|bias)", _PIX + r"decoder.mask_projection.\1"),
        (r"transformer_decoder\.query_embed\.weight", _DEC + "queries_embedder.weight"),
        (r"transformer_decoder\.query_feat\.weight", _DEC + "queries_features.weight"),
        (r"transformer_decoder\.level_embed\.weight", _DEC + "level_embed.weight"),
        (r"transformer_decoder\.input_proj\.(\d)\.(weight|bias)", _DEC + r"input_projections.\1.\2"),
        (r"transformer_decoder\.transformer_self_attention_layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
         _DEC + r"decoder.layers.\1.self_attn.out_proj.\2"),
        (r"transformer_decoder\.transformer_self_attention_layers\.(\d+)\.norm\.(weight|bias)",
         _DEC + r"decoder.layers.\1.self_attn_layer_norm.\2"),
        (r"transformer_decoder\.transformer_cross_attention_layers\.(\d+)\.multihead_attn\."
         r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)", _DEC + r"decoder.layers.\1.cross_attn.\2"),
        (r"transformer_decoder\.transformer_cross_attention_layers\.(\d+)\.norm\.(weight|bias)",
         _DEC + r"decoder.layers.\1.cross_attn_layer_norm.\2"),
        (r"transformer_decoder\.transformer_ffn_layers\.(\d+)\.linear([12])\.(weight|bias)",
         _DEC + r"decoder.layers.\1.fc\2.\3"),
        (r"transformer_decoder\.transformer_ffn_layers\.(\d+)\.norm\.(weight|bias)",
         _DEC + r"decoder.layers.\1.final_layer_norm.\2"),
        (r"transformer_decoder\.decoder_norm\.(weight|bias)", _DEC + r"decoder.layernorm.\1"),
        (r"transformer_decoder\.mask_embed\.layers\.(\d)\.(weight|bias)",
         _DEC + r"decoder.mask_predictor.mask_embedder.\1.0.\2"),
        (r"transformer_decoder\.class_embed\.(weight|bias)", r"class_predictor.\1"),
    ]
]
NO_OBJECT_WEIGHT = 0.1  # Mask2Former's class weight of "no object" (transformers' no_object_weight)
_SELF_IN_PROJ = re.compile(re.escape(_SELF) + r"(\d+)\.self_attn\.in_proj_(weight|bias)")


def hf_problems(cfg: ModelConfig) -> list[str]:
    """Why transformers' Mask2Former cannot hold a model of `cfg` (empty: it can)."""
    enc, dec, bb = cfg.encoder, cfg.decoder, cfg.backbone
    problems = []
    if tuple(enc.plan)[:2] != (0, 0) or enc.trc or enc.output != "conv" or enc.residual:
        problems.append(f"the encoder is PRO-SCALE (plan {tuple(enc.plan)}, TRC {'on' if enc.trc else 'off'}, "
                        f"output {enc.output}{', RESIDUAL' if enc.residual else ''}); transformers' Mask2Former has "
                        f"only the baseline: plan (0, 0, N), no TRC, the 3x3 conv output")
    if enc.n_heads != dec.nheads:
        problems.append(f"encoder and decoder heads differ ({enc.n_heads} vs {dec.nheads}); transformers has one "
                        f"num_attention_heads")
    if enc.n_points != 4:
        problems.append(f"{enc.n_points} sampling points (transformers' Mask2Former uses 4)")
    if "swin" in bb.name and not bb.out_norms:
        problems.append(f"backbone {bb.name} without output norms (backbone.out_norms=false); transformers' Swin "
                        f"always normalises its output stages")
    elif "swin" not in bb.name and bb.out_norms:
        problems.append("the backbone has output LayerNorms (backbone.out_norms), which transformers' timm "
                        "backbone wrapper lacks")
    if cfg.size_divisibility != 32:
        problems.append(f"size_divisibility {cfg.size_divisibility} (transformers' processor pads to 32)")
    return problems


def _class_names(cfg: ModelConfig, metadata: Mapping | None) -> list[str]:
    cats = (metadata or {}).get("categories") or []
    if len(cats) == cfg.num_classes:
        return [str(c["name"]) for c in cats]
    return [f"class_{i}" for i in range(cfg.num_classes)]


def hf_backbone_config(cfg: ModelConfig, body) -> dict:
    """The backbone_config of config.json: transformers' Swin for a timm Swin `body`, else its timm
    wrapper with the feature indices of res2..res5 (our body's out_indices)."""
    if "swin" in cfg.backbone.name:
        return swin_hf_config(body)
    return {"model_type": "timm_backbone", "backbone": cfg.backbone.name, "num_channels": 3, "features_only": True,
            "out_indices": list(body.feature_info.out_indices), "output_stride": None,
            "freeze_batch_norm_2d": bool(cfg.backbone.freeze_bn)}


def hf_config(cfg: ModelConfig, backbone_config: dict, metadata: Mapping | None = None) -> dict:
    """config.json of transformers' Mask2FormerForUniversalSegmentation for a baseline `cfg`.
    proscale's class metadata (is-thing flags, ids, colours) rides along as "proscale_metadata"."""
    enc, dec = cfg.encoder, cfg.decoder
    names = _class_names(cfg, metadata)
    config = {
        "architectures": ["Mask2FormerForUniversalSegmentation"],
        "model_type": "mask2former",
        "backbone_config": backbone_config,
        "feature_size": enc.d_model, "mask_feature_size": dec.mask_dim, "hidden_dim": dec.hidden_dim,
        "encoder_feedforward_dim": enc.ffn_dim, "activation_function": "relu", "encoder_layers": enc.plan[2],
        "decoder_layers": dec.dec_layers + 1,  # transformers counts the query-only prediction as a layer
        "num_attention_heads": enc.n_heads, "dropout": float(enc.dropout), "dim_feedforward": dec.dim_feedforward,
        "pre_norm": False, "enforce_input_projection": False, "common_stride": 4, "ignore_value": 255,
        "num_queries": dec.num_queries, "feature_strides": [4, 8, 16, 32], "use_auxiliary_loss": True,
        "no_object_weight": NO_OBJECT_WEIGHT,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)} if len(set(names)) == len(names) else None,
        "num_labels": cfg.num_classes,
    }
    if config["label2id"] is None:
        del config["label2id"]
    if metadata:
        config["proscale_metadata"] = json.loads(json.dumps(metadata))
    return config


def hf_preprocessor_config(cfg: ModelConfig, min_size_test: int = 800, max_size_test: int = 1333) -> dict:
    """preprocessor_config.json: a Mask2FormerImageProcessor that normalises as the model does
    (pixel mean / std over 0-255 -> image_mean / std over 0-1) and resizes as our test transform."""
    return {
        "image_processor_type": "Mask2FormerImageProcessor",
        "do_resize": min_size_test > 0,
        "size": {"shortest_edge": int(min_size_test), "longest_edge": int(max_size_test)},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [m / 255 for m in cfg.pixel_mean], "image_std": [s / 255 for s in cfg.pixel_std],
        "size_divisor": cfg.size_divisibility, "ignore_index": 255, "do_reduce_labels": False,
        "num_labels": cfg.num_classes,
    }


def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """proscale MaskFormer state dict -> transformers Mask2FormerForUniversalSegmentation names.
    Raises CheckpointError naming the keys that have no transformers name."""
    out, used = swin_to_hf(state)  # a Swin backbone: transformers' own Swin names
    unmapped = []
    for key, value in state.items():
        if key in used:
            continue
        m = _SELF_IN_PROJ.fullmatch(key)
        if m:  # nn.MultiheadAttention's [q; k; v] -> three Linear layers
            layer, kind = m.groups()
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"{_DEC}decoder.layers.{layer}.self_attn.{part}_proj.{kind}"] = chunk.clone()
            continue
        name = rename(key, _TO_HF)
        if name is None:
            unmapped.append(key)
        else:
            out[name] = value
    if unmapped:
        raise CheckpointError(f"{len(unmapped)} proscale keys have no transformers Mask2Former name: "
                              f"{', '.join(unmapped[:10])}{' ...' if len(unmapped) > 10 else ''}")
    if "class_predictor.weight" in out:  # transformers' loss buffer: class weights, "no object" down-weighted
        empty_weight = torch.ones(out["class_predictor.weight"].shape[0])
        empty_weight[-1] = NO_OBJECT_WEIGHT
        out["criterion.empty_weight"] = empty_weight
    return out


def save_hf_pretrained(model, folder: str | os.PathLike, metadata: Mapping | None = None,
                       min_size_test: int = 800, max_size_test: int = 1333) -> Path:
    """Writes `model` (a proscale MaskFormer with a baseline config) as a transformers
    save_pretrained folder: model.safetensors, preprocessor_config.json, config.json (last).
    Raises CheckpointError saying why when transformers' Mask2Former cannot express the model."""
    cfg = model.cfg
    problems = hf_problems(cfg)
    if problems:
        raise CheckpointError("transformers' Mask2Former cannot hold this model: " + "; ".join(problems)
                              + " (use save_pretrained / convert --to pretrained instead)")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hf_state = to_hf_state_dict(state)
    back = map_hf_state_dict(hf_state)  # the key maps must be each other's inverse: checked on every write
    if back.unmapped or back.state_dict.keys() != state.keys():
        raise CheckpointError(f"internal: the transformers key map does not invert from_hf's for keys "
                              f"{sorted(set(state) ^ set(back.state_dict))[:10] or back.unmapped[:10]}")
    backbone_config = hf_backbone_config(cfg, model.backbone.body)
    folder = Path(folder)
    atomic_write(folder / "model.safetensors", safetensors_bytes(hf_state, {"format": "pt"}))
    atomic_write(folder / "preprocessor_config.json",
                 json.dumps(hf_preprocessor_config(cfg, min_size_test, max_size_test), indent=2) + "\n")
    atomic_write(folder / "config.json", json.dumps(hf_config(cfg, backbone_config, metadata), indent=2) + "\n")
    return folder
