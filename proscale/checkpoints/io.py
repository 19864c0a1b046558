"""Writing checkpoints: `atomic_save(obj, path)` and `save_model(model, path)`.

`atomic_save` goes through proscale.fileio.atomic_write: `path` holds either the old file or
the complete new one, never half of one. `save_model` stores the weights with the model config,
so that `proscale.checkpoints.load_model` rebuilds the model from the file alone.

The readers live beside this module (safe_load, loader); their names are importable from here
too, as the training engine does:
    from proscale.checkpoints.io import CheckpointError, load_checkpoint, safe_load, save_model
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from proscale.checkpoints.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from proscale.checkpoints.loader import load_checkpoint
from proscale.checkpoints.safe_load import SAFETENSORS_META_PREFIX, checkpoint_format, safe_load
from proscale.fileio import atomic_write
from proscale.models.pretrained import safetensors_bytes


def atomic_save(obj: Any, path: str | os.PathLike, *, fmt: str | None = None) -> Path:
    """Serialises `obj` to `path` atomically; returns the path.

    fmt: "torch" (torch.save), "pickle" (protocol 4, detectron2 style) or "safetensors"
    (`obj` a flat {name: tensor} dict, or {"model": {...}, "config": ..., ...} whose other
    entries go into the metadata as JSON). Default: chosen by the suffix, torch otherwise.
    If serialisation fails, the temp file is removed and an existing `path` is left untouched.
    """
    path = Path(path)
    fmt = fmt or checkpoint_format(path, default="torch")
    writers = {"torch": lambda f: torch.save(obj, f), "pickle": lambda f: pickle.dump(obj, f, protocol=4),
               "safetensors": lambda f: f.write(_safetensors_bytes(obj))}
    if fmt not in writers:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    return atomic_write(path, writers[fmt])


def _safetensors_bytes(obj: Mapping) -> bytes:
    metadata = None
    tensors = obj
    if isinstance(obj.get("model"), Mapping):
        tensors = obj["model"]
        metadata = {SAFETENSORS_META_PREFIX + k: json.dumps(v) for k, v in obj.items() if k != "model"}
    return safetensors_bytes(tensors, metadata)


def save_model(model: nn.Module, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Writes {"model": state_dict, "config": to_dict(model.cfg), "proscale_version", **extra} atomically.

    The suffix picks the format: .pt/.pth (torch) or .safetensors (config in the metadata).
    """
    import proscale
    from proscale.config import plain, to_dict

    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise CheckpointError("the model has no .cfg; build it with proscale.build_model to save a whole-model "
                              "checkpoint")
    obj: dict[str, Any] = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                           "config": plain(to_dict(cfg)), "proscale_version": proscale.__version__}
    if extra:
        obj.update(extra)
    fmt = checkpoint_format(Path(path), default="torch")
    if fmt == "pickle":
        raise CheckpointError(f"{path}: save proscale checkpoints as .pt or .safetensors (use convert --to "
                              f"detectron2 for a .pkl)")
    return atomic_save(obj, path, fmt=fmt)


__all__ = ["atomic_save", "save_model", "CheckpointError", "CorruptCheckpointError", "UnsafeCheckpointError",
           "load_checkpoint", "safe_load"]
