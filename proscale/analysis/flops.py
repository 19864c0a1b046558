"""FLOPs per component, in fvcore's convention: `proscale flops --preset A [--vs B]`.

The per-operator convention is in flop_counter.py (and docs/flops.md), the components and the
report in flop_report.py; this file counts a model and holds the command.

How it is counted. The model is copied onto the meta device (shapes only, no arithmetic: an
R50 at 800x1088 takes about a second on a CPU) and the copy's own forward runs once under a
FlopCounter, a TorchDispatchMode that applies the formulas to every ATen operator; forward
hooks attribute each operator to the innermost component it runs in. Every MSDeformAttn of the
copy runs with backend "pure" (the grid_sample reference, proscale/kernels/msda_pure.py), so
the count does not depend on which MSDA back end (fused gather, Triton) the model would run.
`flops_fvcore.fvcore_count` recounts with fvcore's own JIT tracer; the tests check both agree.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict

import torch
from torch import nn

from proscale import build_model
from proscale.analysis.detr_flops import count_detr_flops, format_detr_table
from proscale.analysis.flop_counter import FlopCounter, encoder_layer_flops_per_token, meta_copy
from proscale.analysis.flop_report import LABELS, ORDER, FlopReport, component_totals, format_table
from proscale.models.detr import DeformableDETR
from proscale.models.ms_deform_attn import use_msda_backend

# What other modules (the quickstart report, docs/flops.md) import from here.
__all__ = ["LABELS", "ORDER", "FlopReport", "add_parser", "count_flops", "count_preset",
           "encoder_layer_flops_per_token", "format_table", "padded_size", "parse_size"]


def padded_size(model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) padded up to the model's size_divisibility, as the model pads its input."""
    div = int(getattr(model, "size_divisibility", 32) or 1)
    return tuple(-(-int(s) // div) * div for s in size)


def _model_info(model: nn.Module, padded: tuple[int, int]) -> dict:
    info: dict = {}
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        enc = cfg.encoder
        info.update(backbone=cfg.backbone.name, plan=list(enc.plan), trc=enc.trc,
                    trc_layout=enc.trc_layout if enc.trc else None, output=enc.output, residual=enc.residual)
    else:
        plan = getattr(getattr(getattr(model, "pixel_decoder", None), "encoder", None), "plan", None)
        if plan is not None:
            info["plan"] = list(plan)
    h, w = padded
    info["tokens"] = [math.ceil(h / s) * math.ceil(w / s) for s in (32, 16, 8)]
    return info


_meta_copy = meta_copy  # the name earlier versions used here


def _book_components(model: nn.Module, counter: FlopCounter):
    """Hooks on `model` (a MaskFormer, changed in place: pass a copy) that keep the label of the
    component running on top of counter.scope. Encoder layer i is labelled
    "pixel_decoder.encoder.stage{s}#{i}".

    Returns (hook handles, the encoder layers' labels, a dict the hooks fill with
    layer index -> (batch, tokens) of its input x (B, N, C)).
    """
    handles = []
    tokens_seen: dict[int, tuple[int, int]] = {}

    def scope(module: nn.Module, label: str, layer_index: int | None = None):
        def pre(mod, args):
            counter.scope.append(label)
            if layer_index is not None:
                tokens_seen[layer_index] = (int(args[0].shape[0]), int(args[0].shape[1]))

        def post(mod, args, output):
            counter.scope.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))

    pd = model.pixel_decoder
    scope(model.backbone, "backbone")
    scope(pd, "pixel_decoder.other")
    for proj in pd.input_proj:
        scope(proj, "pixel_decoder.input_proj")
    encoder = pd.encoder
    plan = tuple(getattr(encoder, "plan", ()))
    stages = [s + 1 for s, n in enumerate(plan) for _ in range(n)]
    layer_labels = []
    for i, layer in enumerate(encoder.layers):
        stage = stages[i] if i < len(stages) else layer.self_attn.n_levels
        layer_labels.append(f"pixel_decoder.encoder.stage{stage}#{i}")
        scope(layer, layer_labels[-1], layer_index=i)
    if getattr(encoder, "trc", None) is not None:
        scope(encoder.trc, "pixel_decoder.trc")
    if hasattr(pd, "forward_fpn"):
        # The merge (upsample + add) runs in PixelDecoder.forward_fpn itself: book it to the lateral.
        inner = pd.forward_fpn

        def forward_fpn(*args, **kwargs):
            counter.scope.append("pixel_decoder.fpn.lateral")
            try:
                return inner(*args, **kwargs)
            finally:
                counter.scope.pop()

        pd.forward_fpn = forward_fpn
    scope(pd.adapter_1, "pixel_decoder.fpn.lateral")
    scope(pd.layer_1, "pixel_decoder.fpn.output")
    scope(pd.mask_features, "pixel_decoder.mask_features")
    scope(model.transformer_decoder, "transformer_decoder")
    return handles, layer_labels, tokens_seen


def _component(label: str) -> str:
    """Scope label -> component ("pixel_decoder.encoder.stage3#4" -> "pixel_decoder.encoder.stage3")."""
    return label.split("#")[0]


def _by_component(per_label: dict[str, Counter]) -> dict[str, dict[str, int]]:
    """label -> op -> n into component -> op -> n (empty components dropped)."""
    out: dict[str, Counter] = defaultdict(Counter)
    for label, ops in per_label.items():
        out[_component(label)].update(ops)
    return {k: dict(v) for k, v in out.items() if v}


def count_flops(model: nn.Module, size: tuple[int, int] = (800, 1088), batch: int = 1,
                name: str | None = None) -> FlopReport:
    """Counts the FLOPs of one inference forward (eval mode) of a MaskFormer on a (batch, 3, H, W)
    input, H and W padded to the model's size_divisibility.

    The model itself is not run or changed: a meta-device copy is (see the module docstring).
    """
    if not all(hasattr(model, a) for a in ("backbone", "pixel_decoder", "transformer_decoder")):
        raise TypeError("count_flops expects a proscale MaskFormer (backbone, pixel_decoder, transformer_decoder)")
    padded = padded_size(model, size)
    meta = _meta_copy(model).eval()
    counter = FlopCounter(root="other")
    handles, layer_labels, tokens_seen = _book_components(meta, counter)
    images = torch.zeros(batch, 3, *padded, device="meta")
    try:
        with torch.no_grad(), use_msda_backend(meta, "pure"), counter:
            meta(images)
    finally:
        for h in handles:
            h.remove()

    booked: Counter = Counter()
    for label, n in counter.flops.items():
        booked[_component(label)] += n
    flops = component_totals(booked)

    layers = []
    for i, layer in enumerate(meta.pixel_decoder.encoder.layers):
        if i not in tokens_seen:
            continue
        attn = layer.self_attn
        per_token = encoder_layer_flops_per_token(attn.d_model, attn.n_levels, attn.n_heads, attn.n_points,
                                                  layer.linear1.out_features)
        b, n = tokens_seen[i]
        layers.append({"index": i, "stage": int(_component(layer_labels[i])[-1]), "levels": int(attn.n_levels),
                       "tokens": n, "flops": int(counter.flops.get(layer_labels[i], 0)),
                       "analytic": b * n * per_token})

    return FlopReport(
        name=name or type(model).__name__,
        size=(int(size[0]), int(size[1])),
        padded_size=padded,
        batch=batch,
        gflops={k: v / 1e9 for k, v in flops.items()},
        flops=flops,
        layers=layers,
        model_info=_model_info(model, padded),
        by_operator=_by_component(counter.by_op),
        zero_ops=_by_component(counter.zero_ops),
        unsupported=_by_component(counter.unsupported),
    )


def count_preset(preset: str, size: tuple[int, int] = (800, 1088), batch: int = 1, num_classes: int | None = None,
                 overrides: list[str] | None = None, name: str | None = None) -> FlopReport:
    """Builds `preset` directly on the meta device (no weights are allocated) and counts it."""
    with torch.device("meta"):
        model = build_model(preset, num_classes=num_classes, overrides=overrides)
    label = name or (preset + ("[" + ",".join(overrides) + "]" if overrides else ""))
    if isinstance(model, DeformableDETR):
        return count_detr_flops(model, size, batch, name=label)
    return count_flops(model, size, batch, name=label)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 800x1088, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("flops", help="per-component GFLOPs (fvcore convention), optionally vs another preset",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="proscale_r50_333")
    p.add_argument("--size", type=parse_size, default=(800, 1088), help="HxW input size (padded to /32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vs", default=None, action="append",
                   help="another preset, shown side by side with ratios (vs/preset); repeatable for detectors")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for --preset, e.g. encoder.plan=1,1,1 (repeatable)")
    p.add_argument("--vs-set", dest="vs_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for --vs (repeatable)")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_main)


def _main(args) -> int:
    first = count_preset(args.preset, args.size, args.batch, args.num_classes, args.overrides or None)
    reports = [first]
    for other in args.vs or []:
        reports.append(count_preset(other, args.size, args.batch, args.num_classes, args.vs_overrides or None))
    detection = [r.model_info.get("family") == "detection" for r in reports]
    if any(detection) and not all(detection):
        print("error: --preset and --vs must be both segmentation or both detection presets", file=sys.stderr)
        return 2
    if len(reports) > 2 and not all(detection):
        print("error: one --vs for segmentation presets", file=sys.stderr)
        return 2
    if args.json:
        out: dict = {"reports": [r.to_dict() for r in reports]}
        if len(reports) >= 2:
            a = reports[0]
            out["ratio"] = {b.name: {k: (b.flops[k] / a.flops[k] if a.flops[k] else None) for k in a.flops}
                            for b in reports[1:]}
            if len(reports) == 2:  # the single-comparison form
                out["ratio"] = out["ratio"][reports[1].name]
        print(json.dumps(out, indent=2))
    else:
        print(format_detr_table(reports) if all(detection) else format_table(reports))
    return 0
