"""timm's Swin (ours, `backbone.body.*` + `backbone.out_norms.*`) <-> transformers' SwinBackbone
inside Mask2Former (`model.pixel_level_module.encoder.*`): keys and backbone config.

    ours                                          transformers
    body.patch_embed.proj / .norm                 swin.embeddings.patch_embeddings.projection / swin.embeddings.norm
    body.layers_i.blocks.j.norm1 / norm2          swin.encoder.layers.i.blocks.j.layernorm_before / layernorm_after
    body.layers_i.blocks.j.attn.qkv (3C, C)       ... .attention.q_proj / k_proj / v_proj (C, C) each
    body.layers_i.blocks.j.attn.proj              ... .attention.o_proj
    body.layers_i.blocks.j.attn.relative_position_bias_table
                                                  ... .attention.relative_position_bias.relative_position_bias_table
    body.layers_i.blocks.j.mlp.fc1 / fc2          ... .mlp.fc1 / fc2
    body.layers_{i+1}.downsample.*                swin.encoder.layers.i.downsample.*  (merging ends stage i there)
    out_norms.i                                   hidden_states_norms.stage{i+1}
transformers' final `swin.layernorm` is not used by the backbone: written as identity, ignored when read.
Both compute the original Swin's windows (proscale.models.swin; transformers' SwinBackbone runs
with always_partition=True).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

ENC = "model.pixel_level_module.encoder."
BODY = "backbone.body."
# timm Swin names by (embed dim, depths, window); heads follow the name (Swin-T/S 3..24, B 4..32, L 6..48).
SWINS = {
    (96, (2, 2, 6, 2), 7): ("swin_tiny_patch4_window7_224", (3, 6, 12, 24)),
    (96, (2, 2, 18, 2), 7): ("swin_small_patch4_window7_224", (3, 6, 12, 24)),
    (128, (2, 2, 18, 2), 7): ("swin_base_patch4_window7_224", (4, 8, 16, 32)),
    (128, (2, 2, 18, 2), 12): ("swin_base_patch4_window12_384", (4, 8, 16, 32)),
    (192, (2, 2, 18, 2), 7): ("swin_large_patch4_window7_224", (6, 12, 24, 48)),
    (192, (2, 2, 18, 2), 12): ("swin_large_patch4_window12_384", (6, 12, 24, 48)),
}
_BLOCK_PARTS = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
                "attn.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_FROM_HF_PARTS = {v: k for k, v in _BLOCK_PARTS.items()}


def swin_to_hf(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(transformers-named Swin backbone tensors, the proscale keys used) from a proscale state dict."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, value in state.items():
        new = None
        if m := re.fullmatch(r"backbone\.body\.layers_(\d)\.blocks\.(\d+)\.(.+)\.(weight|bias)", key):
            stage, block, part, kind = m.groups()
            prefix = f"{ENC}swin.encoder.layers.{stage}.blocks.{block}."
            if part == "attn.qkv":
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}attention.{name}.{kind}"] = chunk.clone()
                used.add(key)
                continue
            if part in _BLOCK_PARTS:
                new = f"{prefix}{_BLOCK_PARTS[part]}.{kind}"
        elif m := re.fullmatch(r"backbone\.body\.layers_(\d)\.blocks\.(\d+)\.attn\.relative_position_bias_table", key):
            new = (f"{ENC}swin.encoder.layers.{m[1]}.blocks.{m[2]}.attention.relative_position_bias."
                   f"relative_position_bias_table")
        elif m := re.fullmatch(r"backbone\.body\.layers_(\d)\.downsample\.(.+)", key):
            new = f"{ENC}swin.encoder.layers.{int(m[1]) - 1}.downsample.{m[2]}"
        elif m := re.fullmatch(r"backbone\.body\.patch_embed\.proj\.(weight|bias)", key):
            new = f"{ENC}swin.embeddings.patch_embeddings.projection.{m[1]}"
        elif m := re.fullmatch(r"backbone\.body\.patch_embed\.norm\.(weight|bias)", key):
            new = f"{ENC}swin.embeddings.norm.{m[1]}"
        elif m := re.fullmatch(r"backbone\.out_norms\.(\d)\.(weight|bias)", key):
            new = f"{ENC}hidden_states_norms.stage{int(m[1]) + 1}.{m[2]}"
            if m[1] == "3":  # transformers' unused final norm: identity, so every key it expects is there
                width = value.shape[0]
                out[f"{ENC}swin.layernorm.{m[2]}"] = torch.ones(width) if m[2] == "weight" else torch.zeros(width)
        if new is not None:
            out[new] = value
            used.add(key)
    return out, used


def swin_from_hf(hf_state: Mapping[str, Any]) -> tuple[dict[str, Any], set[str], set[str]]:
    """(proscale-named Swin backbone tensors, transformers keys used, transformers keys ignored)."""
    out: dict[str, Any] = {}
    used: set[str] = set()
    ignored: set[str] = set()
    qkv: dict[tuple[str, str, str], dict[str, tuple[str, Any]]] = {}
    for key, value in hf_state.items():
        if not key.startswith(ENC + "swin.") and not key.startswith(ENC + "hidden_states_norms."):
            continue
        rest = key[len(ENC):]
        new = None
        if re.fullmatch(r"swin\.layernorm\.(weight|bias)", rest):
            ignored.add(key)
            continue
        if m := re.fullmatch(r"swin\.encoder\.layers\.(\d)\.blocks\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", rest):
            stage, block, part, kind = m.groups()
            qkv.setdefault((stage, block, kind), {})[part] = (key, value)
            continue
        if m := re.fullmatch(r"swin\.encoder\.layers\.(\d)\.blocks\.(\d+)\.(.+?)(\.weight|\.bias|)", rest):
            stage, block, part, kind = m.groups()
            if part in _FROM_HF_PARTS:
                new = f"{BODY}layers_{stage}.blocks.{block}.{_FROM_HF_PARTS[part]}{kind}"
        elif m := re.fullmatch(r"swin\.encoder\.layers\.(\d)\.downsample\.(.+)", rest):
            new = f"{BODY}layers_{int(m[1]) + 1}.downsample.{m[2]}"
        elif m := re.fullmatch(r"swin\.embeddings\.patch_embeddings\.projection\.(weight|bias)", rest):
            new = f"{BODY}patch_embed.proj.{m[1]}"
        elif m := re.fullmatch(r"swin\.embeddings\.norm\.(weight|bias)", rest):
            new = f"{BODY}patch_embed.norm.{m[1]}"
        elif m := re.fullmatch(r"hidden_states_norms\.stage([1-4])\.(weight|bias)", rest):
            new = f"backbone.out_norms.{int(m[1]) - 1}.{m[2]}"
        if new is not None:
            out[new] = value
            used.add(key)
    for (stage, block, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"{BODY}layers_{stage}.blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts[p][1] for p in "qkv"])
            used.update(k for k, _ in parts.values())
    return out, used, ignored


def swin_hf_config(body) -> dict:
    """transformers' SwinConfig (as a dict) of a timm features_only Swin `body`."""
    stages = [getattr(body, f"layers_{i}") for i in range(4)]
    block = stages[0].blocks[0]
    embed = int(body.patch_embed.proj.out_channels)
    return {
        "model_type": "swin", "image_size": 224, "patch_size": int(body.patch_embed.proj.kernel_size[0]),
        "num_channels": 3, "embed_dim": embed, "depths": [len(s.blocks) for s in stages],
        "num_heads": [int(s.blocks[0].attn.num_heads) for s in stages], "window_size": int(block.window_size[0]),
        "mlp_ratio": float(block.mlp.fc1.out_features / embed), "qkv_bias": block.attn.qkv.bias is not None,
        "hidden_act": "gelu", "use_absolute_embeddings": False, "layer_norm_eps": 1e-5, "drop_path_rate": 0.0,
        "out_features": ["stage1", "stage2", "stage3", "stage4"], "out_indices": [1, 2, 3, 4],
        "stage_names": ["stem", "stage1", "stage2", "stage3", "stage4"],
    }


def swin_backbone_name(bb: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """(timm name, problems) for a transformers SwinConfig dict; the name is None when it cannot map."""
    problems = []
    get = bb.get
    if get("use_absolute_embeddings", False):
        problems.append("Swin with absolute position embeddings")
    if int(get("patch_size", 4)) != 4 or float(get("mlp_ratio", 4.0)) != 4.0 or not get("qkv_bias", True):
        problems.append("Swin with patch size, MLP ratio or qkv bias other than 4 / 4 / on")
    if get("hidden_act", "gelu") != "gelu":
        problems.append(f"Swin activation {get('hidden_act')!r} (timm's is gelu)")
    if list(get("out_features") or []) != ["stage1", "stage2", "stage3", "stage4"]:
        problems.append(f"Swin out_features {get('out_features')} (Mask2Former uses stage1..stage4)")
    key = (int(get("embed_dim", 96)), tuple(get("depths", (2, 2, 6, 2))), int(get("window_size", 7)))
    found = SWINS.get(key)
    if found is None:
        problems.append(f"Swin layout (embed {key[0]}, depths {key[1]}, window {key[2]}) has no timm model")
    elif tuple(get("num_heads", found[1])) != found[1]:
        problems.append(f"Swin heads {tuple(get('num_heads'))} (timm's {found[0]} has {found[1]})")
    return (found[0] if found and not problems else None), problems
