"""FLOPs per component of a Deformable-DETR detector (fvcore's convention, as analysis/flops.py
counts Mask2Former: a meta-device copy runs once under the FlopCounter, MSDA in its grid_sample
form).

Components (leaves sum to the total):
  backbone
  input_proj          1x1 conv + GN of res3, res4, res5
  extra_levels        the 3x3 stride-2 conv(s) + GN making the stride-64 level
  encoder.stage1..L   the encoder layers of each stage of the plan (stage s sees the s coarsest levels)
  encoder.trc         Token Re-Calibration
  two_stage           encoder proposals: enc_output + norm, the proposal heads on every token, pos_trans
  decoder             the decoder layers (self-attention, MSDA cross-attention, FFN)
  heads               class and box heads of the decoder's predictions (also when refining boxes)
  other               position encodings, masks, normalisation (about 0)
Aggregates: encoder (its stages and TRC), total.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from proscale.analysis.flop_counter import FlopCounter, encoder_layer_flops_per_token, meta_copy
from proscale.analysis.flop_report import FlopReport
from proscale.models.ms_deform_attn import use_msda_backend


def detr_components(levels: int) -> dict[str, str]:
    """Component -> row label, in table order, for a detector with `levels` encoder levels."""
    strides = [8 * 2 ** (levels - 1 - i) for i in range(levels)]  # coarse to fine
    labels = {"backbone": "backbone", "input_proj": "input projections (1x1 conv + GN)",
              "extra_levels": "extra level(s) (3x3 s2 conv + GN)", "encoder": "encoder"}
    for s in range(1, levels + 1):
        labels[f"encoder.stage{s}"] = f"  stage {s} (strides {'+'.join(map(str, strides[:s]))})"
    labels.update({"encoder.trc": "  TRC", "two_stage": "two-stage proposals", "decoder": "decoder layers",
                   "heads": "class + box heads", "other": "other (positions, masks)", "total": "total"})
    return labels


AGGREGATES = {"encoder": "encoder.", "total": ""}


def _book(model: nn.Module, counter: FlopCounter):
    """Forward hooks that put each component's label on top of counter.scope (innermost wins).
    Returns (handles, encoder layer labels, layer index -> (batch, tokens))."""
    handles, seen = [], {}

    def scope(module: nn.Module, label, layer_index: int | None = None):
        def pre(mod, args):
            counter.scope.append(label() if callable(label) else label)
            if layer_index is not None:
                seen[layer_index] = (int(args[0].shape[0]), int(args[0].shape[1]))

        def post(mod, args, output):  # returns None: the module's output stays as it is
            counter.scope.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))

    scope(model.backbone, "backbone")
    for i, proj in enumerate(model.input_proj):
        scope(proj, "input_proj" if i < 3 else "extra_levels")
    stages = model.encoder.stage_levels()
    labels = []
    for i, layer in enumerate(model.encoder.layers):
        labels.append(f"encoder.stage{stages[i]}#{i}")
        scope(layer, labels[-1], layer_index=i)
    if model.encoder.trc is not None:
        scope(model.encoder.trc, "encoder.trc")
    scope(model.decoder, "decoder")
    # A head run while the queries are made (two-stage) belongs to the proposals.
    head_label = lambda: "two_stage" if counter.scope and counter.scope[-1] == "two_stage" else "heads"  # noqa: E731
    for head in list(model.class_embed) + list(model.bbox_embed):
        scope(head, head_label)
    inner = model.queries

    def queries(*args, **kwargs):
        counter.scope.append("two_stage" if model.two_stage else "other")
        try:
            return inner(*args, **kwargs)
        finally:
            counter.scope.pop()

    model.queries = queries
    return handles, labels, seen


def count_detr_flops(model: nn.Module, size: tuple[int, int] = (800, 1333), batch: int = 1,
                     name: str | None = None) -> FlopReport:
    """FLOPs of one inference forward of a DeformableDETR on (batch, 3, H, W), H and W padded
    to its size_divisibility. The model is not run: a meta-device copy is."""
    div = int(model.cfg.size_divisibility or 1)
    padded = tuple(-(-int(s) // div) * div for s in size)
    meta = meta_copy(model).eval()
    counter = FlopCounter(root="other")
    handles, labels, seen = _book(meta, counter)
    try:
        with torch.no_grad(), use_msda_backend(meta, "pure"), counter:
            meta(torch.zeros(batch, 3, *padded, device="meta"))
    finally:
        for h in handles:
            h.remove()
    L = meta.num_levels
    names = detr_components(L)
    leaves = [k for k in names if k not in AGGREGATES]
    flops = dict.fromkeys(leaves, 0)
    for label, n in counter.flops.items():
        key = label.split("#")[0]
        flops[key if key in flops else "other"] += int(n)
    for agg, prefix in AGGREGATES.items():
        flops[agg] = sum(flops[k] for k in leaves if k.startswith(prefix))
    flops = {k: flops[k] for k in names}
    layers = []
    for i, layer in enumerate(meta.encoder.layers):
        if i in seen:
            a = layer.self_attn
            b, n = seen[i]
            layers.append({"index": i, "stage": int(labels[i].split("#")[0][len("encoder.stage"):]), "levels": a.n_levels,
                           "tokens": n, "flops": int(counter.flops.get(labels[i], 0)),
                           "analytic": b * n * encoder_layer_flops_per_token(a.d_model, a.n_levels, a.n_heads, a.n_points,
                                                                             layer.linear1.out_features)})
    cfg = model.cfg
    h, w = padded
    tokens = [-(-h // s) * -(-w // s) for s in (8 * 2 ** (L - 1 - i) for i in range(L))]
    info = {"family": "detection", "backbone": cfg.backbone.name, "plan": list(cfg.encoder.plan), "trc": cfg.encoder.trc,
            "two_stage": cfg.decoder.two_stage, "box_refine": cfg.decoder.box_refine, "tokens": tokens,
            "queries": cfg.decoder.num_queries}
    by_op: dict[str, Counter] = {}
    for label, ops in counter.by_op.items():
        by_op.setdefault(label.split("#")[0], Counter()).update(ops)
    return FlopReport(name=name or type(model).__name__, size=(int(size[0]), int(size[1])), padded_size=padded,
                      batch=batch, gflops={k: v / 1e9 for k, v in flops.items()}, flops=flops, layers=layers,
                      model_info=info, by_operator={k: dict(v) for k, v in by_op.items() if v},
                      unsupported={k.split("#")[0]: dict(v) for k, v in counter.unsupported.items() if v})


def format_detr_table(reports: list[FlopReport]) -> str:
    """Markdown table of detector reports (same number of levels), GFLOPs per component; each
    report after the first gets a ratio column against the first."""
    names = detr_components(len(reports[0].model_info["plan"]))
    digits = 2 if max(r.gflops["total"] for r in reports) >= 10 else 4
    head = ["component"] + [f"{r.name} GFLOPs" for r in reports] + [f"{r.name}/{reports[0].name}" for r in reports[1:]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for key, label in names.items():
        if key == "two_stage" and all(r.flops.get(key, 0) == 0 for r in reports):
            continue
        cells = [label] + [f"{r.gflops.get(key, 0.0):,.{digits}f}" for r in reports]
        a = reports[0].flops.get(key, 0)
        cells += [f"{r.flops.get(key, 0) / a:.3f}" if a else "-" for r in reports[1:]]
        if key == "total":
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for r in reports:
        i = r.model_info
        share = r.flops["encoder"] / r.flops["total"] if r.flops["total"] else 0.0
        notes.append(f"{r.name}: input {r.size[0]}x{r.size[1]} (padded {r.padded_size[0]}x{r.padded_size[1]}), "
                     f"plan {tuple(i['plan'])}, TRC {'on' if i['trc'] else 'off'}, two-stage {i['two_stage']}, "
                     f"box refine {i['box_refine']}, {i['queries']} queries, tokens per level (coarse to fine) "
                     f"{'/'.join(f'{t:,}' for t in i['tokens'])}; encoder = {100 * share:.1f}% of the total")
    notes.append("fvcore convention: 1 multiply-add = 1 FLOP; MSDA counted in its grid_sample form "
                 "(4 per sampled value); norms 5 per element, FrozenBN/softmax/element-wise ops 0.")
    for r in reports:
        if r.unsupported:
            notes.append(f"{r.name}: UNSUPPORTED operators counted as 0: {r.unsupported}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)
