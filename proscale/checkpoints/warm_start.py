"""Starting a training run from weights trained elsewhere: `proscale train --init FILE`.

    report = warm_start(model, "model_final.pt", class_names=["cat", "dog"])
    print(report.table())

Any file `load_model` reads (a proscale checkpoint, a detectron2 .pkl, a PRO-SCALE release .pth,
a transformers folder or .safetensors) and any model built from a preset:
- every tensor whose name and shape fit is copied;
- the class head (K+1 rows: K classes and "no object") follows the classes: with class names on
  both sides, each class found by name gets its trained row and the others a fresh one; without
  names, the same class count keeps every row and another count keeps only "no object";
- an encoder with another layer plan is warm-started layer by layer (docs/upgrade.md): a layer
  that sees the first k levels (coarse to fine) takes a trained layer's weights, with the
  sampling offsets and attention weights of those k levels. This is how a trained Mask2Former
  (plan (0,0,6)) becomes a PRO-SCALE model without training it from scratch. A TRC the file
  does not have starts as a near pass-through gate (0.9 for every token), so that the layers
  first see the tokens they were trained on;
- everything else keeps its fresh initialisation, and the report says what and why.
Unlike --resume, nothing of the file's optimiser, schedule or iteration is used.
"""
from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from proscale.checkpoints.errors import CheckpointError
from proscale.checkpoints.from_hf import class_metadata_from_hf
from proscale.checkpoints.loader import convert_state_dict, read_weights
from proscale.checkpoints.state_dict import as_tensor

ENCODER_LAYER = re.compile(r"^pixel_decoder\.encoder\.layers\.(\d+)\.(.+)$")
CLASS_HEAD = "transformer_decoder.class_embed."
LAYER_MAPS = ("first", "depth")
TRC_START_GATE = 0.9  # sigmoid(temperature * bias) of a TRC the file does not have


@dataclass
class InitReport:
    """What `warm_start` did with each tensor. Lists hold (model key, why) pairs."""

    path: str
    source: str
    loaded: list[str] = field(default_factory=list)  # copied as they are
    mapped: list[tuple[str, str]] = field(default_factory=list)  # built from other tensors of the file
    reinitialised: list[tuple[str, str]] = field(default_factory=list)  # in the file, but not used as is
    fresh: list[str] = field(default_factory=list)  # not in the file: the model's own initialisation
    skipped: list[tuple[str, str]] = field(default_factory=list)  # file keys not used
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """One line per model component: how many tensors were loaded, mapped, re-initialised,
        left fresh, and the file keys skipped; then the reasons."""
        rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
        for col, keys in enumerate((self.loaded, [k for k, _ in self.mapped], [k for k, _ in self.reinitialised],
                                    self.fresh, [k for k, _ in self.skipped])):
            for key in keys:
                rows[_component(key)][col] += 1
        head = f"{'component':<32}{'loaded':>8}{'mapped':>8}{'re-init':>8}{'fresh':>8}{'skipped':>8}"
        lines = [f"--init {self.path} ({self.source} naming)", head, "-" * len(head)]
        lines += [f"{name:<32}" + "".join(f"{n:>8}" for n in counts) for name, counts in sorted(rows.items())]
        reasons = defaultdict(list)
        for key, why in self.mapped + self.reinitialised + self.skipped:
            reasons[why].append(key)
        for why, keys in reasons.items():
            lines.append(f"  {len(keys)} x {why}" + (f": {keys[0]}" + (" ..." if len(keys) > 1 else "")))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _component(key: str) -> str:
    """The report's row of a key: its first two names (e.g. pixel_decoder.encoder)."""
    return ".".join(key.split(".")[:2])


def source_layer(i: int, n: int, m: int, how: str = "first") -> int:
    """The layer of an m-layer encoder that warm-starts layer i of an n-layer one.

    "first": min(i, m - 1) (n=7, m=6: 0,1,2,3,4,5,5: each layer keeps its trained place in the
    stack); "depth": relative depth i / n, rounded down (0,0,1,2,3,4,5). docs/upgrade.md compares them.
    """
    if how == "depth":
        return min(m - 1, (i * m) // n)
    if how == "first":
        return min(i, m - 1)
    raise ValueError(f"init_layer_map must be one of {LAYER_MAPS}, got {how!r}")


def _level_slice(t: torch.Tensor, name: str, heads: int, points: int, src_levels: int, levels: int) -> torch.Tensor:
    """The rows of a sampling-offsets / attention-weights Linear (weight (out, C) or bias (out,))
    for the first `levels` of `src_levels`. Rows are ordered (head, level, point[, xy])."""
    per = 2 if "sampling_offsets" in name else 1
    rest = t.shape[1:]
    v = t.reshape(heads, src_levels, points * per, *rest)[:, :levels]
    return v.reshape(heads * levels * points * per, *rest).clone()


def _encoder_layers(model: nn.Module) -> list[nn.Module]:
    enc = getattr(getattr(model, "pixel_decoder", None), "encoder", None)
    return list(enc.layers) if enc is not None else []


def _file_class_names(weights) -> list[str] | None:
    meta = weights.metadata
    if meta is None and weights.hf_config is not None:
        meta = class_metadata_from_hf(weights.hf_config)
    cats = (meta or {}).get("categories")
    return [str(c["name"]) for c in cats] if cats else None


def warm_start(model: nn.Module, path: str | os.PathLike, *, class_names: list[str] | None = None,
               layer_map: str = "first") -> InitReport:
    """Loads what fits of the weights file `path` into `model` (module docstring); returns the
    InitReport. class_names: the model's classes (contiguous order), to map the head by name."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--init {path}: no such file or folder")
    weights = read_weights(path)
    try:
        converted, source, ignored, unmapped = convert_state_dict(weights.state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    state = {k: as_tensor(v, k) for k, v in converted.items()}
    report = InitReport(str(path), source)
    report.skipped += [(k, "dropped by the converter (training-only)") for k in ignored]
    report.skipped += [(k, "no proscale name") for k in unmapped]
    target = model.state_dict()
    new: dict[str, torch.Tensor] = {}

    encoder_keys = _map_encoder(model, state, target, new, report, layer_map)
    head_keys = _map_class_head(state, target, new, report, class_names, _file_class_names(weights))
    used = encoder_keys | head_keys
    for key, value in state.items():
        if key in used:
            continue
        if key not in target:
            report.skipped.append((key, "not in this model"))
        elif tuple(value.shape) != tuple(target[key].shape):
            report.skipped.append((key, f"shape {tuple(value.shape)} in the file, {tuple(target[key].shape)} here"))
        else:
            new[key] = value
            report.loaded.append(key)
    done = set(new) | {k for k, _ in report.reinitialised}
    report.fresh = [k for k in target if k not in done and not k.endswith("num_batches_tracked")]
    if not new:
        raise CheckpointError(f"--init {path}: no tensor of the file fits this model ({len(state)} in the file)")
    with torch.no_grad():
        model.load_state_dict(new, strict=False)
    if encoder_keys:
        _trc_pass_through(model, report, state)
    return report


def _map_encoder(model, state, target, new, report, how) -> set[str]:
    """Encoder layers of another plan: each model layer from `source_layer`'s, level rows sliced.
    Returns the file keys it consumed (none when the plans are the same)."""
    layers = _encoder_layers(model)
    src: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        m = ENCODER_LAYER.match(key)
        if m:
            src[int(m.group(1))][m.group(2)] = value
    if not layers or not src:
        return set()
    levels = [layer.self_attn.n_levels for layer in layers]
    heads, points = layers[0].self_attn.n_heads, layers[0].self_attn.n_points
    src_ids = sorted(src)

    def src_levels(i: int) -> int:
        return src[i]["self_attn.attention_weights.bias"].numel() // (heads * points)

    if len(src_ids) == len(layers) and all(src_levels(i) == lv for i, lv in zip(src_ids, levels)):
        return set()  # same plan: plain copy
    consumed = {f"pixel_decoder.encoder.layers.{i}.{name}" for i in src_ids for name in src[i]}
    for j, lv in enumerate(levels):
        i = src_ids[source_layer(j, len(layers), len(src_ids), how)]
        sl = src_levels(i)
        for name, value in src[i].items():
            key = f"pixel_decoder.encoder.layers.{j}.{name}"
            if key not in target:
                continue
            if "sampling_offsets" in name or "attention_weights" in name:
                if lv > sl:
                    report.reinitialised.append((key, f"layer {i} of the file sees {sl} levels, this one {lv}"))
                    continue
                value = _level_slice(value, name, heads, points, sl, lv)
            if tuple(value.shape) != tuple(target[key].shape):
                report.reinitialised.append((key, f"shape {tuple(value.shape)} in the file, {tuple(target[key].shape)} here"))
                continue
            new[key] = value
            report.mapped.append((key, f"encoder layer from file layer {i} ({how} map; first {lv} of {sl} levels)"))
    report.notes.append(f"encoder: {len(src_ids)} file layers -> {len(layers)} layers seeing {levels} levels "
                        f"(init_layer_map={how})")
    return consumed


def _map_class_head(state, target, new, report, names, file_names) -> set[str]:
    """The K+1-row class head, row by row (module docstring). Returns the file keys it consumed."""
    keys = [k for k in target if k.startswith(CLASS_HEAD)]
    if not keys or not all(k in state for k in keys):
        return set()
    k_file, k_model = state[keys[0]].shape[0] - 1, target[keys[0]].shape[0] - 1
    if state[keys[0]].shape[1:] != target[keys[0]].shape[1:]:
        return set()  # another width: the generic shape check reports it
    if names and file_names and len(file_names) == k_file:
        if list(names) == list(file_names):
            return set()  # the same classes: plain copy
        rows = {c: file_names.index(c) for c in names if c in file_names}
        how = f"{len(rows)} of {k_model} classes found by name in the file's {k_file}"
    elif k_file == k_model:
        report.notes.append(f"class head: {k_model} classes in both, no names to compare: kept as trained")
        return set()
    else:
        rows = {}
        how = f"{k_file} classes in the file, {k_model} here, no names to map them"
    for key in keys:
        row = target[key].clone()  # the model's fresh initialisation
        for c, i in rows.items():
            row[names.index(c)] = state[key][i]
        row[-1] = state[key][-1]  # "no object"
        new[key] = row
        report.reinitialised.append((key, f"class head re-initialised: {how}; 'no object' kept"))
    report.notes.append(f"class head: {how}")
    return set(keys)


def _trc_pass_through(model, report, state) -> None:
    """A TRC absent from the file starts gating every token by TRC_START_GATE: the warm-started
    layers first see (nearly) the tokens they were trained on, and the score can still learn."""
    enc = model.pixel_decoder.encoder
    trc = getattr(enc, "trc", None)
    if trc is None or any(k.startswith("pixel_decoder.encoder.trc.") for k in state):
        return
    with torch.no_grad():
        trc.score.weight.zero_()
        trc.score.bias.fill_(math.log(TRC_START_GATE / (1 - TRC_START_GATE)) / trc.temperature)
    report.notes.append(f"TRC: not in the file; starts as a gate of {TRC_START_GATE} for every token")
