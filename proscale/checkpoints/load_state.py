"""Loading proscale-named weights into a model, and the report of what fitted.

`load_converted` compares every tensor with `model.state_dict()` and loads all or (non-strict)
what fits; `build_loaded_model` builds the model a ModelConfig describes and loads into it.
Converting other namings to ours happens before (proscale.checkpoints.loader.convert_state_dict).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from proscale.checkpoints.errors import CheckpointError
from proscale.checkpoints.state_dict import as_tensor


@dataclass
class LoadReport:
    """What a load did. `mismatched` holds (key, checkpoint shape, model shape)."""

    source: str
    path: str | None = None
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # dropped on purpose (training-only buffers, ...)
    filled: list[str] = field(default_factory=list)  # not in the file, set to their default (BN counters)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        where = f" from {self.path}" if self.path else ""
        lines = [f"checkpoint{where} ({self.source} naming): {self.loaded} tensors loaded"
                 + ("" if self.ok else ", PROBLEMS below")]
        for title, items in (("missing (in the model, not in the checkpoint)", self.missing),
                             ("unexpected (in the checkpoint, not in the model)", self.unexpected)):
            if items:
                lines.append(f"  {title}: {len(items)}")
                lines += [f"    {k}" for k in _abbrev(items)]
        if self.mismatched:
            lines.append(f"  shape mismatch: {len(self.mismatched)}")
            lines += [f"    {k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched[:20]]
            if len(self.mismatched) > 20:
                lines.append(f"    ... and {len(self.mismatched) - 20} more")
        if self.filled:
            lines.append(f"  set to defaults (not stored in this format): {len(self.filled)} "
                         f"({', '.join(sorted({k.rsplit('.', 1)[-1] for k in self.filled}))})")
        if self.ignored:
            lines.append(f"  ignored: {len(self.ignored)} ({', '.join(_abbrev(self.ignored, 6))})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _abbrev(keys: list[str], limit: int = 20) -> list[str]:
    return list(keys[:limit]) + ([f"... and {len(keys) - limit} more"] if len(keys) > limit else [])


def _is_bn_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_converted(model: nn.Module, converted: Mapping[str, Any], source: str, ignored: Iterable[str] = (),
                   unmapped: Iterable[str] = (), strict: bool = True, path: str | None = None) -> LoadReport:
    """Loads a proscale-named state into `model`; returns the LoadReport.

    converted: {proscale key: tensor or numpy array}. source: the naming it was converted from
    ("proscale", "detectron2", "hf"). ignored / unmapped: file keys the conversion dropped on
    purpose / could not name (the latter count as unexpected). Other namings do not store
    BatchNorm's step counter consistently (detectron2's FrozenBN has none), so for them a
    missing counter is reset to 0 and one the model lacks is ignored.
    With `strict`, any missing, unexpected or shape-mismatched key raises CheckpointError naming
    `path` and the keys, and the model is left unchanged; otherwise what fits is loaded.
    """
    report = LoadReport(source=source, path=path, ignored=list(ignored))
    target = model.state_dict()
    foreign = source != "proscale"
    to_load: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        if key not in target:
            (report.ignored if foreign and _is_bn_counter(key) else report.unexpected).append(key)
            continue
        tensor = as_tensor(value, key)
        if tuple(tensor.shape) != tuple(target[key].shape):
            report.mismatched.append((key, tuple(tensor.shape), tuple(target[key].shape)))
            continue
        to_load[key] = tensor
    report.unexpected += [k for k in unmapped if k not in report.unexpected]
    for key in target:
        if key in converted:
            continue
        (report.filled if foreign and _is_bn_counter(key) else report.missing).append(key)
    _add_notes(model, report)
    if strict and not report.ok:
        raise CheckpointError(f"{path or 'checkpoint'} does not fit the model:\n{report}")
    with torch.no_grad():
        model.load_state_dict(to_load, strict=False)
        for key in report.filled:  # reset, so a re-load gives the same model
            target[key].zero_()
    report.loaded = len(to_load)
    return report


def _add_notes(model: nn.Module, report: LoadReport) -> None:
    if report.source == "detectron2":
        enc = getattr(getattr(model, "pixel_decoder", None), "encoder", None)
        trc = getattr(enc, "trc", None)
        if trc is not None and trc.layout not in ("official", "official_conv"):
            report.notes.append(f"TRC layout is {trc.layout!r}; the authors' released weights were trained "
                                f"with the 'official' layout")
    if any(k.startswith("backbone.out_norms.") for k in report.unexpected):
        report.notes.append("backbone.out_norms (detectron2's backbone.norm{i}): the checkpoint normalises each "
                            "output stage; build the model with backbone.out_norms=true (the Swin presets do)")
    if any(k.startswith("backbone.out_norms.") for k in report.missing):
        report.notes.append("backbone.out_norms: the model normalises each output stage but the checkpoint has "
                            "no such norms; build it with backbone.out_norms=false")


def build_loaded_model(cfg, converted: Mapping[str, Any], source: str, ignored: Iterable[str] = (),
                       unmapped: Iterable[str] = (), strict: bool = True,
                       path: str | None = None) -> tuple[nn.Module, LoadReport]:
    """(the model `cfg` describes, MaskFormer for a ModelConfig or DeformableDETR for a DetrConfig,
    carrying the converted weights, in eval mode on the CPU; LoadReport).
    The arguments after `cfg` are those of `load_converted`."""
    from proscale.config import DetrConfig
    from proscale.models.detr import build_detr
    from proscale.models.maskformer import build_maskformer

    # Every weight comes from the file: never let timm fetch pretrained backbone weights for it
    # (the config keeps saying how the backbone was initialised for training).
    pretrained, cfg.backbone.pretrained = cfg.backbone.pretrained, ""
    try:
        model = build_detr(cfg) if isinstance(cfg, DetrConfig) else build_maskformer(cfg)
    finally:
        cfg.backbone.pretrained = pretrained
    report = load_converted(model, converted, source, ignored, unmapped, strict=strict, path=path)
    return model.eval(), report
