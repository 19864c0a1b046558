"""The components a MaskFormer's FLOPs are booked to, the report of one count, and its table.

Components (leaves sum to the total):
  backbone
  pixel_decoder.input_proj        1x1 conv + GN of res5, res4, res3
  pixel_decoder.encoder.stage1/2/3  the encoder layers of each stage of the plan
  pixel_decoder.trc               Token Re-Calibration (score linear + the resize of res3)
  pixel_decoder.fpn.lateral       1x1 conv + GN on res2 and the bilinear upsample of res3's output
  pixel_decoder.fpn.output        the stride-4 3x3 conv + GN (Mask2Former) or LPE
  pixel_decoder.mask_features     1x1 conv
  pixel_decoder.other             anything else inside the pixel decoder (0 by design)
  transformer_decoder             masked-attention decoder, heads and mask einsums
  other                           normalisation and padding (0)
Aggregates: pixel_decoder, pixel_decoder.encoder, pixel_decoder.fpn and total, each the sum of
the leaves under its prefix.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# Every component in table order (aggregates above their parts) -> its row label.
LABELS = {
    "backbone": "backbone",
    "pixel_decoder": "pixel decoder",
    "pixel_decoder.input_proj": "  input projections (1x1 conv + GN)",
    "pixel_decoder.encoder": "  encoder layers",
    "pixel_decoder.encoder.stage1": "    stage 1 (res5)",
    "pixel_decoder.encoder.stage2": "    stage 2 (res5+res4)",
    "pixel_decoder.encoder.stage3": "    stage 3 (res5+res4+res3)",
    "pixel_decoder.trc": "  TRC",
    "pixel_decoder.fpn": "  FPN step",
    "pixel_decoder.fpn.lateral": "    lateral 1x1 + upsample",
    "pixel_decoder.fpn.output": "    stride-4 output (3x3 conv or LPE)",
    "pixel_decoder.mask_features": "  mask features (1x1 conv)",
    "pixel_decoder.other": "  other",
    "transformer_decoder": "transformer decoder",
    "other": "other (normalise, pad)",
    "total": "total",
}
# Aggregates: name -> prefix of the leaves it sums.
AGGREGATES = {
    "pixel_decoder": "pixel_decoder.",
    "pixel_decoder.encoder": "pixel_decoder.encoder.",
    "pixel_decoder.fpn": "pixel_decoder.fpn.",
    "total": "",
}
ORDER = tuple(LABELS)
LEAVES = tuple(k for k in ORDER if k not in AGGREGATES)

# The stride-4 output's row label, by ModelConfig.encoder.output.
_OUTPUT_LABELS = {"conv": "3x3 conv + GN + ReLU", "lpe": "LPE (max-pool + GN + ReLU)"}


def component_totals(booked: dict[str, int]) -> dict[str, int]:
    """FLOPs booked per leaf (a key that is no leaf counts as "other") -> every component in
    ORDER, the aggregates summed from their leaves."""
    flops = dict.fromkeys(LEAVES, 0)
    for key, n in booked.items():
        flops[key if key in flops else "other"] += int(n)
    for agg, prefix in AGGREGATES.items():
        flops[agg] = sum(flops[k] for k in LEAVES if k.startswith(prefix))
    return {k: flops[k] for k in ORDER}


@dataclass
class FlopReport:
    """FLOPs of one model at one input size.

    gflops / flops: component -> GFLOPs / exact FLOPs, for the leaves (LEAVES) and the
    aggregates (pixel_decoder, pixel_decoder.encoder, pixel_decoder.fpn, total).
    layers: one entry per encoder layer: stage, levels, tokens (x batch), counted FLOPs and the
    analytic tokens * encoder_layer_flops_per_token(...).
    """

    name: str
    size: tuple[int, int]  # the input size asked for
    padded_size: tuple[int, int]  # what the model runs (padded to its size_divisibility)
    batch: int
    gflops: dict[str, float] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    model_info: dict = field(default_factory=dict)  # plan, trc, output, tokens per level, backbone
    by_operator: dict[str, dict[str, int]] = field(default_factory=dict)  # component -> op -> FLOPs
    zero_ops: dict[str, dict[str, int]] = field(default_factory=dict)  # component -> op -> calls counted 0
    unsupported: dict[str, dict[str, int]] = field(default_factory=dict)  # component -> op -> calls (holes)

    def leaves_sum(self) -> int:
        return sum(self.flops[k] for k in LEAVES)

    def describe(self) -> str:
        info = self.model_info
        parts = [f"{self.name}: input {self.size[0]}x{self.size[1]}"]
        if tuple(self.padded_size) != tuple(self.size):
            parts[0] += f" (padded {self.padded_size[0]}x{self.padded_size[1]})"
        parts.append(f"batch {self.batch}")
        if info:
            parts.append(f"backbone {info.get('backbone')}")
            parts.append(f"plan {tuple(info.get('plan', ()))}")
            parts.append(f"TRC {'on (' + str(info.get('trc_layout')) + ')' if info.get('trc') else 'off'}")
            parts.append(f"output {info.get('output')}")
            tokens = info.get("tokens")
            if tokens:
                parts.append("tokens res5/res4/res3 " + "/".join(f"{t:,}" for t in tokens))
        return ", ".join(parts)

    def table(self, other: "FlopReport | None" = None) -> str:
        return format_table([self] + ([other] if other is not None else []))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _fmt(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _row_label(key: str, reports: list[FlopReport]) -> str:
    """LABELS[key], with one report: the output kind and each stage's layers x tokens spelled out."""
    label = LABELS[key]
    if len(reports) != 1:
        return label
    report = reports[0]
    output = report.model_info.get("output")
    if key == "pixel_decoder.fpn.output" and output:
        return "    stride-4 output: " + _OUTPUT_LABELS.get(output, output)
    if key.startswith("pixel_decoder.encoder.stage"):
        stage = int(key[-1])
        layers = [lay for lay in report.layers if lay["stage"] == stage]
        if not layers:
            return label + ": 0 layers"
        return label + f": {len(layers)} layer{'s' if len(layers) > 1 else ''} x {layers[0]['tokens']:,} tokens"
    return label


def format_table(reports: list[FlopReport]) -> str:
    """Markdown table, GFLOPs per component; with two reports a ratio column (second/first)."""
    largest = max(r.gflops["total"] for r in reports)
    digits = 2 if largest >= 10 else 4
    head = ["component"] + [f"{r.name} GFLOPs" for r in reports]
    if len(reports) == 2:
        head.append(f"{reports[1].name}/{reports[0].name}")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for key in ORDER:
        if key == "pixel_decoder.other" and all(r.flops[key] == 0 for r in reports):
            continue
        cells = [_row_label(key, reports)]
        cells += [_fmt(r.gflops[key], digits) for r in reports]
        if len(reports) == 2:
            a, b = reports[0].flops[key], reports[1].flops[key]
            cells.append(f"{b / a:.3f}" if a else ("-" if b == 0 else "n/a"))
        if key == "total":
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [r.describe() for r in reports]
    notes.append("fvcore convention: 1 multiply-add = 1 FLOP; MSDA counted in its grid_sample form "
                 "(4 per sampled value); norms 5 per element, FrozenBN/softmax/element-wise ops 0.")
    for r in reports:
        holes = {c: dict(ops) for c, ops in r.unsupported.items() if ops}
        if holes:
            notes.append(f"{r.name}: UNSUPPORTED operators counted as 0: {holes}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)
