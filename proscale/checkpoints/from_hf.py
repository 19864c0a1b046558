"""Hugging Face transformers' Mask2Former -> proscale.

`Mask2FormerForUniversalSegmentation` (transformers) is an independent implementation of the
Mask2Former baseline; its weights map one to one onto `build_model("m2f_*")` models except for
the decoder self-attention, whose separate q/k/v projections become one `in_proj` of
`nn.MultiheadAttention`. The backbone maps when it is transformers' timm wrapper
(`TimmBackboneConfig`: its `_backbone.` is our `backbone.body.`) or transformers' Swin
(`SwinConfig`, the official Mask2Former Swin checkpoints: proscale.checkpoints.hf_swin). Its
own ResNet has other names and is reported as unmapped.

    model = load_hf_model(hf_model)                              # a transformers model object
    state = convert_hf_state_dict(hf_model.state_dict())         # plain dict in, plain dict out
    cfg = config_from_hf(hf_model.config)                        # -> ModelConfig

Files and save_pretrained folders load through `proscale.checkpoints.load_model`, which uses
the readers here (read_hf_folder, config_from_hf). Nothing here imports transformers: a state
dict and a `config.json` are enough.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

from proscale.checkpoints.errors import CheckpointError
from proscale.checkpoints.hf_swin import swin_backbone_name, swin_from_hf
from proscale.checkpoints.load_state import build_loaded_model
from proscale.checkpoints.safe_load import safe_load
from proscale.checkpoints.state_dict import extract_state_dict, rename
from proscale.config import BackboneConfig, DecoderConfig, EncoderConfig, ModelConfig

_PIX = "model.pixel_level_module."
_DEC = "model.transformer_module."

# Buffers of transformers' training criterion (derived from the config), not model weights.
IGNORED_KEYS = ("criterion.empty_weight",)

# (HF pattern, our name template) for one-to-one renames; patterns are matched in full.
_RENAMES: list[tuple[re.Pattern, str]] = [
    (re.compile(pattern), target)
    for pattern, target in [
        # Backbone: transformers' TimmBackbone wrapper holds the timm features_only model as `_backbone`.
        (_PIX + r"encoder\._backbone\.(.+)", r"backbone.body.\1"),
        # Pixel decoder.
        (_PIX + r"decoder\.level_embed", r"pixel_decoder.level_embed"),
        (_PIX + r"decoder\.input_projections\.(\d)\.([01])\.(weight|bias)", r"pixel_decoder.input_proj.\1.\2.\3"),
        (_PIX + r"decoder\.encoder\.layers\.(\d+)\.self_attn\."
         r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
         r"pixel_decoder.encoder.layers.\1.self_attn.\2.\3"),
        (_PIX + r"decoder\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)",
         r"pixel_decoder.encoder.layers.\1.norm1.\2"),
        (_PIX + r"decoder\.encoder\.layers\.(\d+)\.fc([12])\.(weight|bias)",
         r"pixel_decoder.encoder.layers.\1.linear\2.\3"),
        (_PIX + r"decoder\.encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)",
         r"pixel_decoder.encoder.layers.\1.norm2.\2"),
        (_PIX + r"decoder\.adapter_1\.0\.weight", r"pixel_decoder.adapter_1.weight"),  # lateral 1x1 conv
        (_PIX + r"decoder\.adapter_1\.1\.(weight|bias)", r"pixel_decoder.adapter_1.norm.\1"),
        (_PIX + r"decoder\.layer_1\.0\.weight", r"pixel_decoder.layer_1.weight"),  # stride-4 3x3 conv
        (_PIX + r"decoder\.layer_1\.1\.(weight|bias)", r"pixel_decoder.layer_1.norm.\1"),
        (_PIX + r"decoder\.mask_projection\.(weight|bias)", r"pixel_decoder.mask_features.\1"),
        # Transformer decoder.
        (_DEC + r"queries_embedder\.weight", r"transformer_decoder.query_embed.weight"),
        (_DEC + r"queries_features\.weight", r"transformer_decoder.query_feat.weight"),
        (_DEC + r"level_embed\.weight", r"transformer_decoder.level_embed.weight"),
        (_DEC + r"input_projections\.(\d)\.(weight|bias)", r"transformer_decoder.input_proj.\1.\2"),
        (_DEC + r"decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
         r"transformer_decoder.transformer_self_attention_layers.\1.self_attn.out_proj.\2"),
        (_DEC + r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)",
         r"transformer_decoder.transformer_self_attention_layers.\1.norm.\2"),
        (_DEC + r"decoder\.layers\.(\d+)\.cross_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
         r"transformer_decoder.transformer_cross_attention_layers.\1.multihead_attn.\2"),
        (_DEC + r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(weight|bias)",
         r"transformer_decoder.transformer_cross_attention_layers.\1.norm.\2"),
        (_DEC + r"decoder\.layers\.(\d+)\.fc([12])\.(weight|bias)",
         r"transformer_decoder.transformer_ffn_layers.\1.linear\2.\3"),
        (_DEC + r"decoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)",
         r"transformer_decoder.transformer_ffn_layers.\1.norm.\2"),
        (_DEC + r"decoder\.layernorm\.(weight|bias)", r"transformer_decoder.decoder_norm.\1"),
        (_DEC + r"decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.(weight|bias)",
         r"transformer_decoder.mask_embed.layers.\1.\2"),
        (r"class_predictor\.(weight|bias)", r"transformer_decoder.class_embed.\1"),
    ]
]
# Decoder self-attention: HF keeps q/k/v as three Linear layers; nn.MultiheadAttention stacks them
# as in_proj = [q; k; v] (it scales q by head_dim**-0.5 after projection, as HF does).
_SELF_QKV = re.compile(_DEC + r"decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


class UnmappedKeysError(ValueError):
    """Raised by `convert_hf_state_dict(strict=True)`; `.keys` lists the Hugging Face keys with no target."""

    def __init__(self, keys: list[str]):
        self.keys = list(keys)
        shown = ", ".join(self.keys[:20]) + (f", ... ({len(self.keys)} in all)" if len(self.keys) > 20 else "")
        super().__init__(f"{len(self.keys)} Hugging Face Mask2Former keys have no proscale name: {shown}")


class Conversion(NamedTuple):
    """(state, ignored, unmapped): the order of from_detectron2_report, so the loader treats both alike."""

    state_dict: dict[str, torch.Tensor]  # proscale names
    ignored: list[str]  # HF keys deliberately skipped (IGNORED_KEYS: training-loss buffers)
    unmapped: list[str]  # HF keys with no proscale counterpart (a non-timm backbone, an unknown module...)


def map_hf_state_dict(hf_state: Mapping[str, torch.Tensor]) -> Conversion:
    """Renames every key it can and reports the rest; never raises on unknown keys.

    Accepts a `Mask2FormerForUniversalSegmentation` state dict or a bare `Mask2FormerModel` one
    (keys without the `model.` prefix, and no class head).
    """
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    ignored: list[str] = []
    qkv: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    prefixed = {("model." + k if k.startswith("pixel_level_module.") else k): k for k in hf_state}
    swin, swin_used, swin_ignored = swin_from_hf({k: hf_state[v] for k, v in prefixed.items()})
    out.update(swin)
    ignored += sorted(prefixed[k] for k in swin_ignored)
    skip = {prefixed[k] for k in swin_used | swin_ignored}
    for original, value in hf_state.items():
        if original in skip:
            continue
        if original in IGNORED_KEYS:
            ignored.append(original)
            continue
        key = "model." + original if original.startswith(("pixel_level_module.", "transformer_module.")) else original
        m = _SELF_QKV.fullmatch(key)
        if m:
            layer, part, kind = m.groups()
            qkv.setdefault((layer, kind), {})[part] = (original, value)
            continue
        name = rename(key, _RENAMES)
        if name is None:
            unmapped.append(original)
        else:
            out[name] = value
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:  # a lone q/k/v projection cannot be stacked
            unmapped.extend(key for key, _ in parts.values())
            continue
        name = f"transformer_decoder.transformer_self_attention_layers.{layer}.self_attn.in_proj_{kind}"
        out[name] = torch.cat([parts[p][1] for p in "qkv"], dim=0)
    return Conversion(out, ignored, sorted(unmapped))


def convert_hf_state_dict(hf_state: Mapping[str, torch.Tensor], strict: bool = True) -> dict[str, torch.Tensor]:
    """Hugging Face `Mask2FormerForUniversalSegmentation` state dict -> proscale MaskFormer state dict.

    With `strict`, any key that has no proscale name raises UnmappedKeysError listing them all
    (use `map_hf_state_dict` to get the partial result and the list instead). Training-loss
    buffers (IGNORED_KEYS) are skipped either way.
    """
    result = map_hf_state_dict(hf_state)
    if strict and result.unmapped:
        raise UnmappedKeysError(result.unmapped)
    return result.state_dict


def _as_dict(hf_config: Any) -> dict:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"expected a Mask2FormerConfig or its dict, got {type(hf_config).__name__}")


def config_from_hf(hf_config: Any, backbone: BackboneConfig | None = None,
                   preprocessor: Mapping | None = None) -> ModelConfig:
    """ModelConfig matching a transformers `Mask2FormerConfig` (object or `config.json` dict).

    preprocessor: a `preprocessor_config.json` dict; its image_mean / image_std (scaled to
    0-255 as its rescale_factor says) become the pixel mean / std.

    The backbone comes from a `timm_backbone` sub-config (name, frozen BatchNorm) or a `swin` one
    (the timm Swin of that layout, with output norms); for any other backbone type pass
    `backbone=` explicitly (its weights will not convert). Options proscale
    does not implement (pre-norm decoder, non-ReLU activation, forced decoder input projection,
    other strides) raise ValueError instead of building a model that would silently differ.
    """
    c = _as_dict(hf_config)
    get = c.get
    problems = []
    if get("pre_norm", False):
        problems.append("pre_norm=True (proscale's decoder is post-norm)")
    if get("activation_function", "relu") != "relu":
        problems.append(f"activation_function={get('activation_function')!r} (proscale uses relu)")
    if get("enforce_input_projection", False) and get("feature_size", 256) == get("hidden_dim", 256):
        problems.append("enforce_input_projection=True with feature_size == hidden_dim")
    if get("common_stride", 4) != 4 or list(get("feature_strides", (4, 8, 16, 32))) != [4, 8, 16, 32]:
        problems.append("strides other than common_stride 4 and feature_strides (4, 8, 16, 32)")
    if backbone is None:
        bb = get("backbone_config") or {}
        bb = _as_dict(bb) if not isinstance(bb, Mapping) else bb
        if bb.get("model_type") == "swin":
            name, swin_problems = swin_backbone_name(bb)
            problems += swin_problems
            if name:
                backbone = BackboneConfig(name=name, pretrained="", out_norms=True,
                                          drop_path_rate=float(bb.get("drop_path_rate", 0.0)))
        elif bb.get("model_type") == "timm_backbone" and bb.get("backbone"):
            if bb.get("output_stride") not in (None, 32):
                problems.append(f"backbone output_stride={bb.get('output_stride')} (proscale needs strides 4..32)")
            backbone = BackboneConfig(name=bb["backbone"], pretrained="",
                                      freeze_bn=bool(bb.get("freeze_batch_norm_2d", False)))
        else:
            problems.append(f"backbone type {bb.get('model_type')!r} is neither transformers' timm wrapper nor "
                            "its Swin: pass backbone=BackboneConfig(...) (its weights will not convert)")
    if problems:
        raise ValueError("Mask2Former config not supported by proscale: " + "; ".join(problems))
    heads = int(get("num_attention_heads", 8))
    id2label = get("id2label")
    num_classes = int(get("num_labels") or (len(id2label) if id2label else 0))
    if num_classes <= 0:
        raise ValueError("the Hugging Face config has no labels (id2label / num_labels)")
    cfg = ModelConfig(
        num_classes=num_classes,
        backbone=backbone,
        encoder=EncoderConfig(
            plan=(0, 0, int(get("encoder_layers", 6))), d_model=int(get("feature_size", 256)), n_heads=heads,
            n_points=4, ffn_dim=int(get("encoder_feedforward_dim", 1024)), dropout=float(get("dropout", 0.0)),
        ),
        decoder=DecoderConfig(
            num_queries=int(get("num_queries", 100)), hidden_dim=int(get("hidden_dim", 256)), nheads=heads,
            dim_feedforward=int(get("dim_feedforward", 2048)),
            # transformers counts the query-only prediction as a layer: decoder_layers=10 builds 9.
            dec_layers=int(get("decoder_layers", 10)) - 1,
            mask_dim=int(get("mask_feature_size", 256)),
        ),
    )
    if preprocessor and preprocessor.get("image_mean") and preprocessor.get("image_std"):
        rescale = preprocessor.get("do_rescale", True)
        scale = 1.0 / float(preprocessor.get("rescale_factor", 1 / 255)) if rescale else 1.0
        cfg.pixel_mean = tuple(float(m) * scale for m in preprocessor["image_mean"])
        cfg.pixel_std = tuple(float(s) * scale for s in preprocessor["image_std"])
    return cfg


def read_hf_json(folder: str | Path) -> tuple[dict | None, dict | None]:
    """(config.json, preprocessor_config.json) of a save_pretrained folder as dicts; None where absent."""
    folder = Path(folder)
    found = []
    for name in ("config.json", "preprocessor_config.json"):
        path = folder / name
        try:
            found.append(json.loads(path.read_text()) if path.is_file() else None)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    return found[0], found[1]


def hf_weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a save_pretrained folder: model.safetensors, its shards, or pytorch_model.bin."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        return [folder / f for f in sorted(set(weight_map.values()))]
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                          f"(not a Hugging Face save_pretrained folder)")


def read_hf_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """(config.json dict, state dict, preprocessor_config.json dict or None) of a save_pretrained
    folder; the weights are read with `safe_load` (no code from the files)."""
    config, preprocessor = read_hf_json(folder)
    if config is None:
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face save_pretrained folder)")
    state: dict[str, torch.Tensor] = {}
    for path in hf_weight_files(folder):
        state.update(extract_state_dict(safe_load(path), str(path)))
    return config, state, preprocessor


def class_metadata_from_hf(hf_config: Any) -> dict | None:
    """{"categories": [{"id", "name"}, ...]} from the config's id2label (contiguous ids), or None.
    A folder proscale wrote (`proscale convert --to hf`) carries the whole class metadata (ids,
    is-thing flags, colours) as "proscale_metadata": that is used when it has one entry per label."""
    config = _as_dict(hf_config)
    id2label = config.get("id2label")
    ours = config.get("proscale_metadata")
    if isinstance(ours, Mapping) and id2label and len(ours.get("categories") or ()) == len(id2label):
        return dict(ours)
    if not id2label:
        return None
    return {"name": "", "categories": [{"id": int(i), "name": str(id2label[i])}
                                       for i in sorted(id2label, key=int)]}


def load_hf_model(source: Any, cfg: ModelConfig | None = None, strict: bool = True):
    """A proscale MaskFormer (eval mode) carrying the weights of a transformers Mask2Former.

    source: a `save_pretrained` folder (config.json + model.safetensors or pytorch_model.bin),
    or a `Mask2FormerForUniversalSegmentation` object. `cfg` defaults to `config_from_hf` of its
    config (pixel mean/std from preprocessor_config.json when present). With `strict`, unmapped
    Hugging Face keys and proscale weights left unset raise CheckpointError; BatchNorm
    `num_batches_tracked` counters are the only entries allowed to differ (FrozenBN on one side
    has none). `proscale.checkpoints.load_model(folder)` reads a folder the same way and also
    returns the LoadReport.
    """
    preprocessor, where = None, None
    if isinstance(source, (str, Path)):
        hf_config, hf_state, preprocessor = read_hf_folder(source)
        where = str(source)
    else:
        hf_config, hf_state = source.config, source.state_dict()
    if cfg is None:
        cfg = config_from_hf(hf_config, preprocessor=preprocessor)
    converted = map_hf_state_dict(hf_state)
    model, _ = build_loaded_model(cfg, converted.state_dict, "hf", converted.ignored, converted.unmapped,
                                  strict=strict, path=where)
    return model
