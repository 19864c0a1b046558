"""The `save_pretrained` folder: `config.json` + `model.safetensors`, the layout transformers and
timm users know.

    model.save_pretrained("m2f_coco/")                  # any MaskFormer built by proscale
    model = proscale.from_pretrained("m2f_coco/")       # proscale.checkpoints.loader reads it back

config.json holds {"format": "proscale", "format_version": 1, "proscale_version",
"model": the ModelConfig as a dict, "metadata": {"name", "categories": [{"id", "name", "isthing",
"color"}]} (when known), "inference": test-time settings (when known)}. model.safetensors holds
the state dict and nothing else, so reading it runs no code. Both files are written atomically,
the weights first: a folder with a config.json is complete.

The model writes the folder (here, beside the models); reading it is the one loading path's
job (proscale.checkpoints.loader), which also reads transformers' folders.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from proscale.config import plain, to_dict
from proscale.fileio import atomic_write

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "proscale"
FORMAT_VERSION = 1  # raise when a reader of version N could misread the folder


def safetensors_bytes(state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors serialisation of `state` (CPU, contiguous; tensors sharing storage are
    copied, which safetensors requires)."""
    from safetensors.torch import save

    out, seen = {}, set()
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"safetensors holds only tensors; {name!r} is a {type(t).__name__}")
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return save(out, metadata=metadata)


def pretrained_config(cfg, metadata: Mapping | None = None, inference: Mapping | None = None) -> dict:
    """The config.json dict of a model built from ModelConfig `cfg`."""
    import proscale

    out: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION,
                           "proscale_version": proscale.__version__, "model": plain(to_dict(cfg))}
    if metadata:
        out["metadata"] = plain(metadata)
    if inference:
        out["inference"] = plain(inference)
    return out


def write_pretrained(folder: str | os.PathLike, state: Mapping[str, torch.Tensor], config: Mapping) -> Path:
    """Writes `folder`/model.safetensors, then `folder`/config.json (both atomically); returns the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder}: exists and is not a folder (save_pretrained writes a folder)")
    atomic_write(folder / WEIGHTS_NAME, safetensors_bytes(state, {"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return folder


class SavePretrainedMixin:
    """`save_pretrained(folder)` for a module that has `.cfg` (its ModelConfig) and, optionally,
    `.metadata` (the class metadata dict that proscale.checkpoints.load_model attaches)."""

    def save_pretrained(self, folder: str | os.PathLike, metadata: Mapping | None = None,
                        inference: Mapping | None = None) -> Path:
        """Writes config.json + model.safetensors into `folder` (created if needed); returns it.

        metadata: {"name", "categories": [{"id", "name", "isthing", "color"}]} (default: the
        model's own `.metadata`, if any). inference: test settings ({"min_size_test",
        "max_size_test", "object_mask_threshold", ...}) that the Predictor should use."""
        cfg = getattr(self, "cfg", None)
        if cfg is None:
            raise ValueError("the model has no .cfg; build it with proscale.build_model to save it")
        metadata = metadata if metadata is not None else getattr(self, "metadata", None)
        return write_pretrained(folder, self.state_dict(), pretrained_config(cfg, metadata, inference))
