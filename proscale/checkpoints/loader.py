"""From a weights file to a model: the one path every command takes.

    model, info = load_model("model_final_94dc52.pkl")          # builds the model the file describes
    report = load_checkpoint(model, "other.pt", strict=False)   # loads a file into a model you built

`load_model` accepts, and takes the model config from:
  a proscale checkpoint (.pt / .safetensors: save_model, training)   its stored "config"
  a proscale save_pretrained folder (config.json + model.safetensors) its config.json's "model"
  a detectron2 Mask2Former .pkl, a PRO-SCALE release .pth            the keys (from_detectron2.infer_config)
  a transformers save_pretrained folder, or a .safetensors in one    its config.json (+ preprocessor_config.json),
                                                                    else the keys
  Deformable DETR weights (transformers' folder, or an original      transformers' config.json; an original
  fundamentalvision/Deformable-DETR .pth)                            checkpoint needs preset= (e.g. ddetr_r50)
`preset=` (a name or a ModelConfig) replaces that config; then `num_classes=` and `overrides=`
apply. The Predictor and `proscale eval / predict / convert / export` build their models with it.
`from_pretrained(folder)` is `load_model` for folders, returning the model alone (as
transformers' and timm's do); class metadata found in the file is on `model.metadata`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from proscale.checkpoints.errors import CheckpointError
from proscale.checkpoints.from_ddetr import config_from_hf_detr, convert_ddetr_state_dict
from proscale.checkpoints.from_detectron2 import from_detectron2_report, infer_config
from proscale.checkpoints.from_hf import (class_metadata_from_hf, config_from_hf, map_hf_state_dict,
                                          read_hf_folder, read_hf_json)
from proscale.checkpoints.load_state import LoadReport, build_loaded_model, load_converted
from proscale.checkpoints.safe_load import safe_load
from proscale.checkpoints.state_dict import SOURCES, detect_source, extract_state_dict
from proscale.config import DetrConfig, ModelConfig, apply_overrides, model_config_from_dict
from proscale.distributed import resolve_device
from proscale.models import pretrained as pretrained_format
from proscale.presets import get_preset

# TRC layout of weights whose file does not say: the authors' release (detectron2 naming) was
# trained with the "official" layout; anything else gets proscale's default.
RELEASE_TRC_LAYOUT = {"detectron2": "official"}
CLASS_HEAD = "transformer_decoder.class_embed.weight"  # (num_classes + 1, hidden): the class count


def convert_state_dict(state: Mapping[str, Any], source: str = "auto",
                       cfg: Any = None) -> tuple[dict[str, Any], str, list[str], list[str]]:
    """Any supported naming -> (proscale-named state, source, ignored keys, unmappable keys).

    detectron2 / HF values come back as tensors; proscale-named values pass through untouched
    (`load_converted` turns numpy arrays into tensors). Deformable DETR weights need the
    DetrConfig of the model they go into (`cfg`): it says whether the heads are shared.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "auto":
        source = detect_source(state)
    if source == "proscale":
        return dict(state), source, [], []
    if source == "deformable-detr":
        if not isinstance(cfg, DetrConfig):
            raise CheckpointError("Deformable DETR weights go into a detector: pass preset= (e.g. ddetr_r50, "
                                  "or --preset on the command line)")
        converted, ignored, unmapped = convert_ddetr_state_dict(state, cfg)
        return converted, source, ignored, unmapped
    if source == "detectron2":
        converted, ignored, unmapped = from_detectron2_report(state)
    else:
        converted, ignored, unmapped = map_hf_state_dict(state)
    return dict(converted), source, list(ignored), list(unmapped)


def load_checkpoint(model: nn.Module, path_or_state: str | os.PathLike | Mapping[str, Any], strict: bool = True,
                    source: str = "auto") -> LoadReport:
    """Loads weights into `model` from a file or an already loaded dict, in any supported naming.

    path_or_state: a path (see `safe_load`), a checkpoint dict ({"model": state, ...}) or a
    state dict. source: "auto", "proscale", "detectron2" or "hf".
    Compares every tensor with `model.state_dict()`. With `strict`, any missing, unexpected or
    shape-mismatched key raises CheckpointError naming them, and the model is left unchanged;
    otherwise the keys that fit are loaded and the report lists the rest.
    """
    path = None
    if isinstance(path_or_state, (str, os.PathLike)):
        path = str(path_or_state)
        obj = safe_load(path_or_state)
    else:
        obj = path_or_state
    where = path or "checkpoint"
    state = extract_state_dict(obj, where)
    try:
        converted, source, ignored, unmapped = convert_state_dict(state, source, getattr(model, "cfg", None))
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return load_converted(model, converted, source, ignored, unmapped, strict=strict, path=path)


@dataclass
class CheckpointInfo:
    """What `load_model` found besides the weights."""

    path: str
    source: str  # the naming of the weights: "proscale", "detectron2", "hf" or "deformable-detr"
    config: ModelConfig  # what the model was built from (also `model.cfg`)
    report: LoadReport
    metadata: dict | None = None  # class metadata {"name", "categories": [{"id", "name", "isthing", ...}]}
    train_config: dict | None = None  # the training config a `proscale train` checkpoint stores


@dataclass
class WeightsFile:
    """A weights file as read: its state dict (file naming) and what describes the model."""

    state: dict[str, Any]
    stored_config: ModelConfig | None = None  # a proscale checkpoint's "config"
    hf_config: dict | None = None  # transformers' config.json
    preprocessor: dict | None = None  # transformers' preprocessor_config.json
    metadata: dict | None = None
    train_config: dict | None = None


def _stored_config(obj: Mapping[str, Any], where: str) -> ModelConfig | None:
    data = obj.get("config")
    if data is None:
        return None
    if dataclasses.is_dataclass(data):
        return data
    try:
        return model_config_from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: stored config does not fit this proscale version: {e}") from None


def _read_pretrained(folder: Path, config: dict) -> WeightsFile:
    """A proscale save_pretrained folder (proscale.models.pretrained), its config.json already parsed."""
    where = folder / pretrained_format.CONFIG_NAME
    version = config.get("format_version")
    if not isinstance(version, int) or version > pretrained_format.FORMAT_VERSION:
        raise CheckpointError(f"{where}: format_version {version!r}: this proscale reads versions up to "
                              f"{pretrained_format.FORMAT_VERSION} (written by proscale "
                              f"{config.get('proscale_version', '?')}; upgrade proscale)")
    weights = folder / pretrained_format.WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {pretrained_format.WEIGHTS_NAME} beside config.json")
    state = extract_state_dict(safe_load(weights), str(weights))
    stored = _stored_config({"config": config.get("model")}, str(where))
    if stored is None:
        raise CheckpointError(f"{where}: no \"model\" entry (the model config)")
    inference = dict(config.get("inference") or {})
    data = {k: inference.pop(k) for k in ("min_size_test", "max_size_test") if k in inference}
    train_config = {"data": data, "test": inference} if data or inference else None
    return WeightsFile(state, stored_config=stored, metadata=config.get("metadata"), train_config=train_config)


def _read_folder(path: Path) -> WeightsFile:
    config_path = path / pretrained_format.CONFIG_NAME
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON: {e}") from None
    if config is None:
        raise CheckpointError(f"{path}: no config.json (neither a proscale nor a Hugging Face save_pretrained "
                              f"folder)")
    if isinstance(config, dict) and config.get("format") == pretrained_format.FORMAT:
        return _read_pretrained(path, config)
    hf_config, state, preprocessor = read_hf_folder(path)  # transformers' save_pretrained
    return WeightsFile(state, hf_config=hf_config, preprocessor=preprocessor)


def read_weights(path: Path) -> WeightsFile:
    """A weights file or a save_pretrained folder (proscale's or transformers') as read: its state dict
    (file naming), and whatever describes the model (stored config, config.json, class metadata)."""
    if path.is_dir():
        return _read_folder(path)
    obj = safe_load(path)
    state = extract_state_dict(obj, str(path))
    return WeightsFile(state, stored_config=_stored_config(obj, str(path)), metadata=obj.get("metadata"),
                        train_config=obj.get("train_config"))


def _model_config(weights: WeightsFile, converted: Mapping[str, Any], source: str, path: Path,
                  preset: str | ModelConfig | None) -> ModelConfig:
    """The config to build: `preset`, else the file's stored config, else transformers'
    config.json (in the folder, or beside a .safetensors), else inferred from the weights."""
    if preset is not None:
        cfg = get_preset(preset) if isinstance(preset, str) else copy.deepcopy(preset)
        if CLASS_HEAD in converted:  # the classes the weights were trained on, unless num_classes= says
            cfg.num_classes = int(converted[CLASS_HEAD].shape[0]) - 1
        return cfg
    if weights.stored_config is not None:
        return weights.stored_config
    if source == "hf" and weights.hf_config is None and path.is_file():
        weights.hf_config, weights.preprocessor = read_hf_json(path.parent)
    if weights.hf_config is not None:
        try:
            return config_from_hf(weights.hf_config, preprocessor=weights.preprocessor)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    try:
        return infer_config(converted, trc_layout=RELEASE_TRC_LAYOUT.get(source, "spatial"))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _ddetr_config(weights: _WeightsFile, path: Path, preset, num_classes: int | None,
                  overrides: Iterable[str]) -> DetrConfig:
    """The DetrConfig for Deformable DETR weights: `preset`, else transformers' config.json;
    the class count from the class head unless `num_classes` says; then the overrides (before
    converting: whether heads are shared depends on them)."""
    if preset is not None:
        cfg = get_preset(preset) if isinstance(preset, str) else copy.deepcopy(preset)
        head = weights.state.get("class_embed.0.weight")
        if head is not None:
            cfg.num_classes = int(head.shape[0])
    else:
        if weights.hf_config is None and path.is_file():
            weights.hf_config, weights.preprocessor = read_hf_json(path.parent)
        if weights.hf_config is None:
            raise CheckpointError("Deformable DETR weights without transformers' config.json: pass preset= "
                                  "(e.g. ddetr_r50; --preset on the command line)")
        cfg = config_from_hf_detr(weights.hf_config)
    if not isinstance(cfg, DetrConfig):
        raise CheckpointError(f"Deformable DETR weights need a detection preset, got {type(cfg).__name__}")
    if num_classes is not None:
        cfg.num_classes = num_classes
    apply_overrides(cfg, list(overrides))
    return cfg


def load_model(path: str | os.PathLike, *, preset: str | ModelConfig | None = None, overrides: Iterable[str] = (),
               num_classes: int | None = None, device: str | torch.device = "cpu", strict: bool = True,
               source: str = "auto") -> tuple[nn.Module, CheckpointInfo]:
    """(MaskFormer in eval mode on `device`, CheckpointInfo) from any weights file (module docstring).

    preset: a preset name or ModelConfig to build instead of the file's config (the class count
    still comes from the weights unless `num_classes` is given). overrides: dotted config
    overrides ("encoder.trc_layout=spatial"), applied last. device: "cpu", "cuda", "auto", ...
    strict: every tensor must fit (else CheckpointError naming the file and the keys); False
    loads what fits and lists the rest in `info.report`. source: the naming ("auto": detected).
    """
    path = Path(path)
    weights = read_weights(path)
    try:
        if source == "deformable-detr" or (source == "auto" and detect_source(weights.state) == "deformable-detr"):
            cfg = _ddetr_config(weights, path, preset, num_classes, overrides)
            converted, source, ignored, unmapped = convert_state_dict(weights.state, "deformable-detr", cfg)
        else:
            converted, source, ignored, unmapped = convert_state_dict(weights.state, source)
            cfg = None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if cfg is None:
        cfg = _model_config(weights, converted, source, path, preset)
        if num_classes is not None:
            cfg.num_classes = num_classes
        apply_overrides(cfg, list(overrides))
    model, report = build_loaded_model(cfg, converted, source, ignored, unmapped, strict=strict, path=str(path))
    metadata = weights.metadata
    if metadata is None and weights.hf_config is not None:
        metadata = class_metadata_from_hf(weights.hf_config)
    if metadata and len(metadata.get("categories") or ()) == cfg.num_classes:
        model.metadata = metadata  # save_pretrained writes it back
    info = CheckpointInfo(str(path), source, cfg, report, metadata, weights.train_config)
    return model.to(resolve_device(device)), info


def from_pretrained(folder: str | os.PathLike, *, device: str | torch.device = "cpu", **kwargs) -> nn.Module:
    """The MaskFormer (eval mode) in a save_pretrained folder: proscale's (config.json +
    model.safetensors, `model.save_pretrained`) or transformers' Mask2Former (e.g. what
    `proscale convert --to hf` writes). Local folders only: the model hub is never contacted.
    Other keyword arguments are `load_model`'s (preset=, overrides=, num_classes=, strict=)."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder (use load_model for weight files)" if folder.exists() else \
            "no such folder (from_pretrained reads a local save_pretrained folder; the model hub is not used)"
        raise CheckpointError(f"{folder}: {what}")
    return load_model(folder, device=device, **kwargs)[0]
