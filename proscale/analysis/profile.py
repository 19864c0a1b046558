"""Time per component beside the GFLOPs of the same components: `proscale bench --profile`.

The components are those of `proscale flops` (flop_report.py): input projections, each encoder
stage, TRC, the FPN step's lateral (+ upsample and add) and stride-4 output, mask features, and
for the whole model backbone / pixel decoder / transformer decoder. Two more rows hold what no
FLOP count sees: `pixel_decoder.other` (position encodings, token flatten / transpose / concat /
split, the channels-last conversion: pixel decoder time minus its parts) and `other`
(normalise and pad).

How it is timed. One inference forward of the whole model (eval mode, `torch.inference_mode`)
with forward pre/post hooks that read `time.perf_counter()` around each component (on CUDA
after a synchronise; the hooks are free next to the components they time). Every model runs
`repeats` forwards after `warmup`, the models taking turns round by round, so that a machine
that gets busier or calmer during the run shifts all columns alike; each cell is the median
over rounds.

Reading the table. `ms/GFLOP` is each component's cost per FLOP. `above FLOPs` assigns the gap
between a model's time ratio and its FLOP ratio: with the baseline's average rate over the
group (pixel decoder, or the whole model) as the price of a GFLOP, a component's time above
`rate x its GFLOPs` is what it costs beyond its FLOPs. Summed over the group's rows this is
exactly `time - FLOP ratio x baseline time` (0 for the baseline itself). The pixel decoder's rows
use the baseline pixel decoder's rate, the whole model's rows (backbone, pixel decoder as one,
transformer decoder, other, total) the baseline model's; the "pixel decoder" row shows its own gap.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

# Component -> row label, table order. Groups (whose rows sum to them) are pixel_decoder and total.
LABELS = {
    "backbone": "backbone",
    "pixel_decoder": "pixel decoder",
    "pixel_decoder.input_proj": "  input projections",
    "pixel_decoder.encoder.stage1": "  encoder stage 1 (res5)",
    "pixel_decoder.encoder.stage2": "  encoder stage 2 (res5+res4)",
    "pixel_decoder.encoder.stage3": "  encoder stage 3 (all levels)",
    "pixel_decoder.trc": "  TRC",
    "pixel_decoder.fpn.lateral": "  FPN lateral + upsample",
    "pixel_decoder.fpn.output": "  FPN stride-4 output (conv / LPE)",
    "pixel_decoder.mask_features": "  mask features",
    "pixel_decoder.other": "  other (pos. enc., layouts, concat)",
    "transformer_decoder": "transformer decoder",
    "other": "other (normalise, pad)",
    "total": "total",
}
PD_PARTS = tuple(k for k in LABELS if k.startswith("pixel_decoder.") and k != "pixel_decoder.other")
MODEL_PARTS = ("backbone", "pixel_decoder", "transformer_decoder")
GROUPS = {"pixel_decoder": PD_PARTS + ("pixel_decoder.other",), "total": MODEL_PARTS + ("other",)}


class _StageClock:
    """Forward hooks that add each labelled module's wall time (inclusive) to `self.ms`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ms: dict[str, float] = defaultdict(float)
        self._open: list[tuple[str, float]] = []
        self.handles: list = []

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self, label: str) -> None:
        self._open.append((label, self._now()))

    def stop(self) -> None:
        label, t0 = self._open.pop()
        self.ms[label] += (self._now() - t0) * 1000

    def watch(self, module: nn.Module, label: str) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda mod, args: self.start(label)))
        self.handles.append(module.register_forward_hook(lambda mod, args, out: self.stop(), always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@contextlib.contextmanager
def _clocked(model: nn.Module, clock: _StageClock):
    """Hooks on a MaskFormer's components (see LABELS); FPN's own body is timed by wrapping
    `forward_fpn` (the merge runs in it, outside any submodule), restored afterwards."""
    pd = model.pixel_decoder
    clock.watch(model.backbone, "backbone")
    clock.watch(pd, "pixel_decoder")
    for proj in pd.input_proj:
        clock.watch(proj, "pixel_decoder.input_proj")
    plan = tuple(pd.encoder.plan)
    stages = [s + 1 for s, n in enumerate(plan) for _ in range(n)]
    for layer, stage in zip(pd.encoder.layers, stages):
        clock.watch(layer, f"pixel_decoder.encoder.stage{stage}")
    if getattr(pd.encoder, "trc", None) is not None:
        clock.watch(pd.encoder.trc, "pixel_decoder.trc")
    clock.watch(pd.layer_1, "pixel_decoder.fpn.output")
    clock.watch(pd.mask_features, "pixel_decoder.mask_features")
    clock.watch(model.transformer_decoder, "transformer_decoder")
    inner = pd.forward_fpn

    def forward_fpn(*args, **kwargs):
        clock.start("fpn_call")
        try:
            return inner(*args, **kwargs)
        finally:
            clock.stop()

    pd.forward_fpn = forward_fpn
    try:
        yield
    finally:
        clock.remove()
        del pd.forward_fpn  # the instance attribute; the class method shows again


def _leaves(ms: dict[str, float], total: float) -> dict[str, float]:
    """Raw hook times of one forward -> every row of LABELS (the 'other' rows by difference)."""
    out = {k: ms.get(k, 0.0) for k in LABELS}
    out["pixel_decoder.fpn.lateral"] = (ms.get("fpn_call", 0.0) - out["pixel_decoder.fpn.output"]
                                        - out["pixel_decoder.mask_features"])
    out["pixel_decoder.other"] = out["pixel_decoder"] - sum(out[k] for k in PD_PARTS)
    out["total"] = total
    out["other"] = total - sum(out[k] for k in MODEL_PARTS)
    return out


@dataclass
class ProfileReport:
    """Per-component median ms and GFLOPs of several models, measured in turns in one process."""

    device: str
    size: tuple[int, int]
    batch: int
    dtype: str
    threads: int
    repeats: int
    columns: list[str] = field(default_factory=list)
    ms: dict[str, dict[str, float]] = field(default_factory=dict)  # column -> component -> median ms
    gflops: dict[str, dict[str, float]] = field(default_factory=dict)  # column -> component -> GFLOPs
    # column -> group -> the column's time over the baseline's in each round (the models take
    # turns, so a round's two times saw the same machine): the spread behind the median ratio.
    round_ratios: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def above_flops(self, column: str, group: str = "pixel_decoder") -> dict[str, float]:
        """component -> ms above the FLOP-proportional time at the baseline's rate over `group`
        ("pixel_decoder" or "total"), for the group and its rows (module docstring)."""
        base = self.columns[0]
        g = self.gflops[base][group]
        rate = self.ms[base][group] / g if g else 0.0
        return {k: self.ms[column][k] - rate * self.gflops[column].get(k, 0.0) for k in GROUPS[group] + (group,)}

    def table(self) -> str:
        base, cols = self.columns[0], self.columns
        head = ["component"] + [f"{c} GFLOPs" for c in cols] + [f"{c} ms" for c in cols]
        head += [f"{c}/{base} FLOPs" for c in cols[1:]] + [f"{c}/{base} time" for c in cols[1:]]
        head += [f"{c} ms/GFLOP" for c in cols] + [f"{c} ms above FLOPs" for c in cols[1:]]
        # The pixel decoder's rows (and its own row) at the baseline pixel decoder's rate, the
        # whole model's rows at the baseline model's rate.
        above = {c: {**self.above_flops(c, "total"), **self.above_flops(c, "pixel_decoder")} for c in cols[1:]}
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for key, label in LABELS.items():
            cells = [label]
            digits = 2 if max(self.gflops[c]["total"] for c in cols) >= 10 else 4
            cells += [f"{self.gflops[c].get(key, 0.0):.{digits}f}" for c in cols]
            cells += [f"{self.ms[c][key]:.1f}" for c in cols]
            for what in ("gflops", "ms"):
                for c in cols[1:]:
                    a, b = getattr(self, what)[base].get(key, 0.0), getattr(self, what)[c].get(key, 0.0)
                    cells.append(f"{b / a:.2f}x" if a > 0 else "-")
            for c in cols:
                g = self.gflops[c].get(key, 0.0)
                cells.append(f"{self.ms[c][key] / g:.1f}" if g > 0 else "-")
            cells += [f"{above[c][key]:+.1f}" for c in cols[1:]]
            if key in ("pixel_decoder", "total"):
                cells = [f"**{x}**" for x in cells]
            lines.append("| " + " | ".join(cells) + " |")
        title = (f"profile: device {self.device}, {self.size[0]}x{self.size[1]}, batch {self.batch}, {self.dtype}, "
                 f"{self.threads} threads, inference, median of {self.repeats} interleaved rounds")
        return title + "\n" + "\n".join(lines)

    def spread(self) -> str:
        """One line per compared model: the range of its per-round time ratios."""
        base, lines = self.columns[0], []
        for c, groups in self.round_ratios.items():
            ranges = "; ".join(f"{LABELS[g]} {min(r):.2f}-{max(r):.2f}x" for g, r in groups.items() if r)
            lines.append(f"{c}/{base} time ratio per round (min-max of {self.repeats}): {ranges}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def profile_models(models: dict[str, nn.Module], images: torch.Tensor, dtype: torch.dtype = torch.float32,
                   warmup: int = 1, repeats: int = 5) -> ProfileReport:
    """Times every component of each MaskFormer in `models` (name -> model, eval mode, on the
    images' device), in turns, and counts its FLOPs (analysis/flops.py) at the same size."""
    from proscale.analysis.flops import count_flops

    for name, model in models.items():
        if not all(hasattr(model, a) for a in ("backbone", "pixel_decoder", "transformer_decoder")):
            raise TypeError(f"{name}: the profile times a MaskFormer's components (backbone, pixel decoder, "
                            f"transformer decoder); {type(model).__name__} is not one (detectors: not yet)")
    device = images.device
    report = ProfileReport(str(device), tuple(images.shape[-2:]), images.shape[0], str(dtype).replace("torch.", ""),
                           torch.get_num_threads(), repeats, list(models))
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    enabled = dtype != torch.float32

    def one(model: nn.Module) -> dict[str, float]:
        clock = _StageClock(device)
        with _clocked(model, clock), torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                                             enabled=enabled):
            t0 = clock._now()
            model(images)
            total = (clock._now() - t0) * 1000
        return _leaves(clock.ms, total)

    for name, model in models.items():
        for _ in range(warmup):
            one(model)
    for _ in range(repeats):
        for name, model in models.items():
            samples[name].append(one(model))
    base = next(iter(models))
    for name in list(models)[1:]:
        report.round_ratios[name] = {g: [s[g] / b[g] for s, b in zip(samples[name], samples[base]) if b[g] > 0]
                                     for g in ("pixel_decoder", "total")}
    for name, model in models.items():
        ms = {k: statistics.median(s[k] for s in samples[name]) for k in LABELS}
        # The two 'other' rows from the medians, so that every group's rows sum to its median.
        ms["pixel_decoder.other"] = ms["pixel_decoder"] - sum(ms[k] for k in PD_PARTS)
        ms["other"] = ms["total"] - sum(ms[k] for k in MODEL_PARTS)
        report.ms[name] = ms
        counted = count_flops(model, tuple(images.shape[-2:]), images.shape[0], name=name).gflops
        report.gflops[name] = {k: counted[k] for k in LABELS if k in counted}
    return report
