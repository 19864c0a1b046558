"""The weights inside a loaded checkpoint: where they sit, which naming they use, their values as tensors.

Shared by the converters (from_detectron2, from_hf) and the loaders; it imports no converter,
so any of them may use it.

Namings (`SOURCES`): "proscale" (our module names), "detectron2" (Mask2Former's model zoo and
the authors' PRO-SCALE release), "hf" (transformers' Mask2FormerForUniversalSegmentation) and
"deformable-detr" (transformers' DeformableDetrForObjectDetection and the original
fundamentalvision/Deformable-DETR checkpoints; converted by checkpoints/from_ddetr.py).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from proscale.checkpoints.errors import CheckpointError

SOURCES = ("auto", "proscale", "detectron2", "hf", "deformable-detr")

# Top-level module names of each naming; a key starting with one of them votes for that naming.
PROSCALE_PREFIXES = ("backbone.body.", "pixel_decoder.", "transformer_decoder.")
DETECTRON2_PREFIXES = ("sem_seg_head.", "backbone.stem.", "backbone.res", "backbone.patch_embed.",
                       "backbone.layers.", "stem.", "res2.")
HF_PREFIXES = ("model.pixel_level_module.", "model.transformer_module.", "pixel_level_module.",
               "transformer_module.", "class_predictor.")
DDETR_PREFIXES = ("transformer.encoder.", "transformer.decoder.", "model.encoder.layers.", "model.decoder.layers.")


def rename(key: str, rules: Iterable[tuple[re.Pattern, str]]) -> str | None:
    """The key's new name from the first (pattern, target) rule that matches all of it
    (`target` may use the pattern's groups, as in re.Match.expand), or None if none does."""
    for pattern, target in rules:
        m = pattern.fullmatch(key)
        if m:
            return m.expand(target)
    return None


def as_tensor(value: Any, key: str) -> torch.Tensor:
    """One state-dict value as a tensor: tensors pass through, numpy arrays / scalars are copied
    (detectron2 pickles hold numpy arrays), Python numbers become 0-d tensors.
    Raises CheckpointError naming `key` for anything else (object arrays, strings, ...)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.dtype == object:
            raise CheckpointError(f"{key}: holds Python objects, not numbers")
        return torch.from_numpy(np.array(arr, copy=True))
    if isinstance(value, (int, float, bool)):
        return torch.tensor(value)
    raise CheckpointError(f"{key}: expected a tensor or array, got {type(value).__name__}")


def extract_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, Any]:
    """The weights in a loaded checkpoint: obj["model"], obj["state_dict"] or obj itself,
    without a DataParallel / DDP "module." prefix. `where` names the file in errors."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a dict of weights, got {type(obj).__name__}")
    for key in ("model", "state_dict"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            # Lightning-style nesting: {"model": {"state_dict": ...}}.
            if key == "model" and isinstance(inner.get("state_dict"), Mapping):
                inner = inner["state_dict"]
            obj = inner
            break
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def detect_source(state: Mapping[str, Any]) -> str:
    """"proscale", "detectron2", "hf" or "deformable-detr": the naming most keys of `state` use.
    Raises CheckpointError (showing the first keys) when no key matches any naming."""
    keys = list(state)
    score = {
        "proscale": sum(k.startswith(PROSCALE_PREFIXES) for k in keys),
        "detectron2": sum(k.startswith(DETECTRON2_PREFIXES) for k in keys),
        "hf": sum(k.startswith(HF_PREFIXES) for k in keys),
        "deformable-detr": sum(k.startswith(DDETR_PREFIXES) for k in keys),
    }
    best = max(score, key=score.get)
    if score[best] == 0:
        sample = ", ".join(keys[:5])
        raise CheckpointError(f"cannot tell the naming of this checkpoint (first keys: {sample}); pass source=")
    return best
