"""The quickstart's report: OUT/report.md and OUT/report.html, with PNG plots and overlays.

    write_report(cfg, plan, evals, measure) -> {"report_md", "report_html", "table", "rows", ...}

Inputs are what the quickstart stages left in OUT (proscale.quickstart): the plan, the evaluation
results per model, the GFLOPs / latency measurement, the runs' metrics.jsonl and checkpoints.
Outputs:
    OUT/report.md, OUT/report.html     the comparison table (the paper's Table 1 in miniature:
                                       encoder = pixel decoder GFLOPs, total GFLOPs, latency, PQ,
                                       AP, mIoU and PRO-SCALE / Mask2Former ratios), GFLOPs per
                                       component, latency spread, settings, targets
    OUT/plots/loss_curves.png          training losses of both models
    OUT/plots/gflops_per_component.png GFLOPs per component as bars
    OUT/overlays/val_<id>.png          input | ground truth | both models' panoptic predictions
    OUT/overlays/overview.png          the same rows stacked
The HTML embeds its images, so it can be mailed or opened anywhere on its own.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import html
import json
import math
import os
from pathlib import Path

import numpy as np

from proscale.fileio import atomic_write

# What the issue asks of the quickstart (checked and stated in the report, never relaxed here).

TARGET_PQ = 60.0
TARGET_PQ_GAP = 2.0
TARGET_PIXEL_DECODER_RATIO = 0.55

# Why PRO-SCALE trails here when it does (measured while choosing the quickstart recipe on this
# data with class colours; single seeds, 100 val images).
GAP_NOTE = (
    "Where a PQ gap comes from: the Light Pixel Embedding. In development runs on this data (96 px, batch 8, "
    "lr 1e-3, 300 iterations) the baseline with LPE in place of its stride-4 3x3 conv scored 84.5 PQ like "
    "PRO-SCALE (84.1), while PRO-SCALE's (3,3,3) encoder with TRC but the 3x3 conv kept scored 89.8 like the "
    "baseline (90.5). The loss is in mask precision (SQ), not recognition (RQ): LPE has no learned spatial step "
    "at stride 4, so boundaries must come from the backbone's stride-4 features, which a from-scratch model "
    "learns slowly and which weigh more at 64-128 px than at COCO's 800 px. The gap shrank with training, input "
    "size and learning rate (96 px: 6.4 PQ after 300 iterations, 3.9 after 600; 128 px, batch 4: 2.7 after 900 "
    "at lr 1e-3, 0.9-1.6 after 700-800 at lr 2e-3 with warm-up, the quickstart's recipe): a run cut short by "
    "the time budget shows more of it (`--iterations 800` or a larger `--budget-minutes` gives the full recipe).")

# The paper's headline (PROSCALE.md section 5, R50 at 800x1088): pixel decoder ("encoder") -52%,
# whole model -27%.
PAPER = {"pixel_decoder_ratio": 61.2 / 122.2, "total_ratio": 157 / 218}


# ------------------------------------------------------------------------------- the numbers
def _metric(evals: dict, key: str, task: str, name: str) -> float | None:
    value = ((evals.get(key) or {}).get("metrics") or {}).get(task, {}).get(name)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def comparison_rows(models, evals: dict, measure: dict) -> list[dict]:
    """One dict per model: the table's numbers (None where missing)."""
    rows = []
    for key, name, preset in models:
        g = measure["flops"][key]["gflops"]
        lat = measure["latency_ms"]
        rows.append({
            "key": key, "name": name, "preset": preset,
            "encoder_gflops": g["pixel_decoder"], "total_gflops": g["total"],
            "encoder_ms": lat["pixel_decoder/infer"][key]["median"], "model_ms": lat["model/infer"][key]["median"],
            "PQ": _metric(evals, key, "panoptic", "PQ"), "PQ_th": _metric(evals, key, "panoptic", "PQ_th"),
            "PQ_st": _metric(evals, key, "panoptic", "PQ_st"), "SQ": _metric(evals, key, "panoptic", "SQ"),
            "RQ": _metric(evals, key, "panoptic", "RQ"), "AP": _metric(evals, key, "instance", "AP"),
            "mIoU": _metric(evals, key, "semantic", "mIoU"),
        })
    return rows


def _f(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(a, b) -> str:
    return "n/a" if a is None or b is None or a == 0 else f"{b / a:.2f}x"


def _delta(a, b) -> str:
    return "n/a" if a is None or b is None else f"{b - a:+.1f}"


def _gdigits(rows) -> int:
    return 2 if max(r["total_gflops"] for r in rows) >= 10 else 3


TABLE_HEAD = ["model", "encoder GFLOPs", "total GFLOPs", "encoder ms", "model ms",
              "PQ", "PQ_th", "PQ_st", "AP", "mIoU"]


def table_cells(rows: list[dict]) -> list[list[str]]:
    """The comparison table as text cells: one line per model, then PRO-SCALE vs the baseline
    (ratios for cost, differences in points for quality)."""
    d = _gdigits(rows)
    lines = []
    for r in rows:
        lines.append([r["name"], _f(r["encoder_gflops"], d), _f(r["total_gflops"], d), _f(r["encoder_ms"], 2),
                      _f(r["model_ms"], 2), _f(r["PQ"]), _f(r["PQ_th"]), _f(r["PQ_st"]), _f(r["AP"]), _f(r["mIoU"])])
    base = rows[0]
    for r in rows[1:]:
        lines.append([f"{r['name']} / {base['name']}",
                      _ratio(base["encoder_gflops"], r["encoder_gflops"]),
                      _ratio(base["total_gflops"], r["total_gflops"]),
                      _ratio(base["encoder_ms"], r["encoder_ms"]), _ratio(base["model_ms"], r["model_ms"]),
                      _delta(base["PQ"], r["PQ"]), _delta(base["PQ_th"], r["PQ_th"]),
                      _delta(base["PQ_st"], r["PQ_st"]), _delta(base["AP"], r["AP"]),
                      _delta(base["mIoU"], r["mIoU"])])
    return lines


def markdown_table(head: list[str], lines: list[list[str]], align_first_left: bool = True) -> str:
    out = ["| " + " | ".join(head) + " |",
           "|" + ("---|" if align_first_left else "---:|") + "---:|" * (len(head) - 1)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def text_table(head: list[str], lines: list[list[str]]) -> str:
    """Fixed-width table for the terminal."""
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines])


def targets(rows: list[dict]) -> list[tuple[str, str, bool | None]]:
    """(what, measured, met) for each goal of the quickstart."""
    base, ours = rows[0], rows[-1]
    out = []
    for r in rows:
        met = None if r["PQ"] is None else r["PQ"] >= TARGET_PQ
        out.append((f"{r['name']}: PQ >= {TARGET_PQ:g}", _f(r["PQ"]), met))
    gap = None if base["PQ"] is None or ours["PQ"] is None else base["PQ"] - ours["PQ"]
    out.append((f"{ours['name']} within {TARGET_PQ_GAP:g} PQ of {base['name']}",
                "n/a" if gap is None else f"{-gap:+.1f} PQ", None if gap is None else gap <= TARGET_PQ_GAP))
    ratio = ours["encoder_gflops"] / base["encoder_gflops"]
    out.append((f"{ours['name']} pixel-decoder GFLOPs <= {TARGET_PIXEL_DECODER_RATIO:.0%} of {base['name']}'s",
                f"{ratio:.1%}", ratio <= TARGET_PIXEL_DECODER_RATIO))
    return out


# ------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    _plt().close(fig)
    return path


def _smooth(values: list[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) < window:
        return v
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, v[0]), v])
    return np.convolve(padded, kernel, mode="valid")


def plot_loss_curves(runs: dict[str, tuple[str, Path]], path: Path) -> Path:
    """runs: key -> (display name, metrics.jsonl). Left: total loss; right: the final layer's
    class / mask / dice losses (solid: the first model, dashed: the second)."""
    from proscale.visualize import read_metrics

    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    colors = ["tab:blue", "tab:orange", "tab:olive", "tab:gray"]
    term_colors = ["tab:green", "tab:red", "tab:purple"]
    styles = ["-", "--", ":", "-."]
    for n, (key, (name, metrics)) in enumerate(runs.items()):
        records = [r for r in read_metrics(metrics) if "loss" in r] if Path(metrics).is_file() else []
        if not records:
            continue
        it = [r["iteration"] for r in records]
        window = max(1, len(records) // 15)
        ax1.plot(it, [r["loss"] for r in records], color=colors[n], alpha=0.25, lw=1)
        ax1.plot(it, _smooth([r["loss"] for r in records], window), color=colors[n], lw=2, label=name)
        for m, term in enumerate(("loss_ce", "loss_mask", "loss_dice")):
            if all(term in r for r in records):
                ax2.plot(it, _smooth([r[term] for r in records], window), color=term_colors[m],
                         ls=styles[n % len(styles)], lw=1.8, label=f"{name}: {term[5:]}")
    ax1.set(title="total loss (weighted, all decoder layers)", xlabel="iteration", ylabel="loss", yscale="log")
    ax2.set(title="final decoder layer, unweighted", xlabel="iteration", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# Components shown in the bars (leaves of proscale.analysis.flops), with short names.
BAR_COMPONENTS = (
    ("backbone", "backbone"),
    ("pixel_decoder.input_proj", "input proj."),
    ("pixel_decoder.encoder.stage1", "enc. stage 1"),
    ("pixel_decoder.encoder.stage2", "enc. stage 2"),
    ("pixel_decoder.encoder.stage3", "enc. stage 3"),
    ("pixel_decoder.trc", "TRC"),
    ("pixel_decoder.fpn.lateral", "FPN lateral"),
    ("pixel_decoder.fpn.output", "FPN 3x3 conv / LPE"),
    ("pixel_decoder.mask_features", "mask features"),
    ("transformer_decoder", "transformer decoder"),
)


def plot_gflops(models, measure: dict, path: Path) -> Path:
    """Left: GFLOPs per component, one bar per model. Right: the whole model split into
    backbone / pixel decoder / transformer decoder (stacked)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100, gridspec_kw={"width_ratios": [2.2, 1]})
    keys = [k for k, _, _ in models]
    names = [n for _, n, _ in models]
    comps = [(c, label) for c, label in BAR_COMPONENTS
             if any(measure["flops"][k]["gflops"].get(c, 0) > 0 for k in keys)]
    x = np.arange(len(comps))
    width = 0.8 / len(keys)
    colors = ["tab:blue", "tab:orange", "tab:green"]
    for n, key in enumerate(keys):
        vals = [measure["flops"][key]["gflops"].get(c, 0.0) for c, _ in comps]
        bars = ax1.bar(x + (n - (len(keys) - 1) / 2) * width, vals, width, label=names[n], color=colors[n])
        for b, v in zip(bars, vals):
            if v > 0:
                ax1.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7,
                             rotation=90, xytext=(0, 2), textcoords="offset points")
    ax1.set_xticks(x, [label for _, label in comps], rotation=30, ha="right", fontsize=8)
    ax1.set_ylabel("GFLOPs (1 multiply-add = 1 FLOP)")
    ax1.set_yscale("log")
    top = max(measure["flops"][k]["gflops"].get(c, 0.0) for k in keys for c, _ in comps)
    ax1.set_ylim(top=top * 6)  # room for the value labels
    ax1.set_title("GFLOPs per component (log scale)")
    ax1.grid(axis="y", alpha=0.3, which="both")
    ax1.legend(fontsize=8)
    parts = (("backbone", "backbone", "0.75"), ("pixel_decoder", "pixel decoder (encoder)", "tab:red"),
             ("transformer_decoder", "transformer decoder", "tab:cyan"))
    bottom = np.zeros(len(keys))
    for comp, label, color in parts:
        vals = np.array([measure["flops"][k]["gflops"].get(comp, 0.0) for k in keys])
        ax2.bar(names, vals, 0.6, bottom=bottom, label=label, color=color)
        bottom += vals
    for n, key in enumerate(keys):
        pd = measure["flops"][key]["gflops"]["pixel_decoder"]
        ax2.annotate(f"total {measure['flops'][key]['gflops']['total']:.3g}\npixel dec. {pd:.3g}",
                     (n, bottom[n]), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax2.set_ylim(0, bottom.max() * 1.75)
    ax2.set_title("whole model")
    ax2.set_ylabel("GFLOPs")
    ax2.legend(fontsize=8, loc="upper right")
    ax2.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"input {measure['size'][0]}x{measure['size'][1]}, batch 1", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------- overlays
def _upscale(array: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def _titled(panel: np.ndarray, title: str, height: int = 18) -> np.ndarray:
    from PIL import Image, ImageDraw

    h, w = panel.shape[:2]
    canvas = Image.new("RGB", (w, h + height), (255, 255, 255))
    canvas.paste(Image.fromarray(panel), (0, height))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), title)
    draw.text(((w - (right - left)) // 2, (height - (bottom - top)) // 2 - top), title, fill=(0, 0, 0))
    return np.asarray(canvas)


def _row(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
    h = max(p.shape[0] for p in panels)
    spacer = np.full((h, gap, 3), 255, dtype=np.uint8)
    out = []
    for n, p in enumerate(panels):
        if p.shape[0] < h:
            p = np.concatenate([p, np.full((h - p.shape[0], p.shape[1], 3), 255, np.uint8)])
        out += ([spacer] if n else []) + [p]
    return np.concatenate(out, axis=1)


def write_overlays(cfg, models, out_dir: Path, count: int) -> list[Path]:
    """For the first `count` val images: input | ground truth | each model's panoptic result,
    upscaled (nearest for the segment maps) so that labels are readable."""
    import torch

    from proscale.predictor import Predictor
    from proscale.quickstart import run_dir, val_dataset
    from proscale.visualize import draw_ground_truth, draw_panoptic, save_png, to_rgb_array

    dataset = val_dataset(cfg)
    predictors = {key: Predictor(run_dir(cfg, key) / "model_final.pt", device=cfg.device if cfg.device != "auto"
                                 else "auto", tasks=("panoptic",)) for key, _, _ in models}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for index in range(min(count, len(dataset))):
        sample = dataset[index]
        h, w = sample["image"].shape[-2:]
        factor = max(1, int(round(256 / max(h, w))))
        image = _upscale(to_rgb_array(sample["image"]), factor)
        masks = _upscale(sample["masks"].numpy().transpose(1, 2, 0), factor).transpose(2, 0, 1)
        big = {"image": image, "labels": sample["labels"], "masks": torch.from_numpy(np.ascontiguousarray(masks))}
        panels = [_titled(image, "input"), _titled(draw_ground_truth(big, dataset.metadata), "ground truth")]
        for key, name, _ in models:
            p = predictors[key]
            pan = p.predict(sample["image"])["panoptic"]
            seg = _upscale(pan["panoptic_seg"].numpy(), factor)
            panels.append(_titled(draw_panoptic(image, seg, pan["segments_info"], p.metadata), name))
        row = _row(panels)
        rows.append(row)
        paths.append(save_png(row, out_dir / f"val_{int(sample['image_id']):06d}.png"))
    if rows:
        width = max(r.shape[1] for r in rows)
        gap = np.full((6, width, 3), 255, np.uint8)
        stacked = np.concatenate([x for n, r in enumerate(rows) for x in ([gap] if n else []) + [r]], axis=0)
        paths.append(save_png(stacked, out_dir / "overview.png"))
    return paths


# ----------------------------------------------------------------------------------- report
def _model_summary(preset: str) -> str:
    from proscale.presets import get_preset

    c = get_preset(preset)
    e, d = c.encoder, c.decoder
    trc = f"on ({e.trc_layout}, T={e.trc_temperature:g})" if e.trc else "off"
    enc = f"plan {tuple(e.plan)}, TRC {trc}, stride-4 output {'LPE' if e.output == 'lpe' else '3x3 conv'}"
    return (f"`{preset}`: backbone {c.backbone.name} (random init), d_model {e.d_model}, {e.n_heads} heads, "
            f"FFN {e.ffn_dim}; {enc}; decoder {d.dec_layers} layers, {d.num_queries} queries")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _tokens(side: int) -> int:
    """Encoder tokens (res5 + res4 + res3) of a side x side input padded to /32."""
    p = -(-side // 32) * 32
    return sum((p // s) ** 2 for s in (32, 16, 8))


def _img_md(path: Path, out: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(out).as_posix()})"


def _img_html(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_report(cfg, plan: dict, evals: dict, measure: dict) -> dict:
    from proscale.quickstart import MODELS, run_dir

    out = Path(cfg.out)
    models = MODELS
    rows = comparison_rows(models, evals, measure)
    head, lines = TABLE_HEAD, table_cells(rows)
    md_path, html_path = out / "report.md", out / "report.html"
    loss_png, gflops_png = out / "plots" / "loss_curves.png", out / "plots" / "gflops_per_component.png"
    summary = {"report_md": str(md_path), "report_html": str(html_path), "table": text_table(head, lines),
               "rows": rows, "targets": targets(rows), "plots": [str(loss_png), str(gflops_png)]}
    # The report depends only on these inputs (and the runs they name): unchanged -> kept.
    stamp_path = out / "report.json"
    fingerprint = hashlib.sha256(json.dumps([plan, evals, measure, _settings_key(cfg)], sort_keys=True,
                                            default=str).encode()).hexdigest()
    stamp = _read_json(stamp_path)
    overlays_kept = sorted(str(p) for p in (out / "overlays").glob("*.png"))
    if (stamp and stamp.get("fingerprint") == fingerprint and all(p.is_file() for p in (md_path, html_path, loss_png,
                                                                                        gflops_png))):
        summary.update(status="kept", overlays=overlays_kept)
        return summary
    plot_loss_curves({k: (n, run_dir(cfg, k) / "metrics.jsonl") for k, n, _ in models}, loss_png)
    plot_gflops(models, measure, gflops_png)
    overlay_paths = write_overlays(cfg, models, out / "overlays", cfg.num_overlays)
    overview = overlay_paths[-1] if overlay_paths else None

    from proscale.analysis.flops import LABELS, ORDER

    keys = [k for k, _, _ in models]
    comp_head = ["component"] + [f"{n} GFLOPs" for _, n, _ in models] + [f"{models[-1][1]} / {models[0][1]}"]
    comp_lines = []
    for comp in ORDER:
        vals = [measure["flops"][k]["gflops"].get(comp, 0.0) for k in keys]
        if comp in ("pixel_decoder.other", "other") and not any(vals):
            continue
        label = LABELS.get(comp, comp).replace("  ", "&nbsp;&nbsp;")
        comp_lines.append([label] + [f"{v:.4f}" for v in vals]
                          + [f"{vals[-1] / vals[0]:.3f}" if vals[0] else ("-" if not vals[-1] else "n/a")])
    lat_head = ["input", "component (inference)"] + [f"{n} ms, median (p10-p90)" for _, n, _ in models] + \
        ["ratio of medians", "GFLOPs ratio"]
    lat_lines = []
    for m in [measure] + list(measure.get("larger") or []):
        lat = m["latency_ms"]
        for row_key, comp, label in (("pixel_decoder/infer", "pixel_decoder", "pixel decoder (encoder)"),
                                     ("model/infer", "total", "whole model")):
            cells = [f"{m['size'][0]}x{m['size'][1]}", label]
            for k in keys:
                t = lat[row_key][k]
                cells.append(f"{t['median']:.2f} ({t['p10']:.2f}-{t['p90']:.2f})")
            cells.append(f"{lat[row_key][keys[-1]]['median'] / lat[row_key][keys[0]]['median']:.2f}x")
            g = [m["flops"][k]["gflops"][comp] for k in keys]
            cells.append(f"{g[-1] / g[0]:.2f}x")
            lat_lines.append(cells)
    goals = targets(rows)
    inference = (evals.get(keys[0]) or {}).get("inference", {})
    base, ours = rows[0], rows[-1]
    enc_ratio = ours["encoder_gflops"] / base["encoder_gflops"]
    backbone_share = measure["flops"][keys[0]]["gflops"]["backbone"] / base["total_gflops"]
    tot_ratio = ours["total_gflops"] / base["total_gflops"]
    train_secs = {k: _train_seconds(run_dir(cfg, k)) for k in keys}
    load = measure.get("loadavg_before")
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")

    md = []
    md.append("# proscale quickstart: Mask2Former vs PRO-SCALE on synthetic panoptic data\n")
    md.append(f"Generated {now} by `proscale quickstart --out {cfg.out}`. Device: {measure['device']}, "
              f"{measure['threads']} threads" + (f", load average {load[0]:.1f} when measured" if load else "") + ".\n")
    md.append("## Comparison\n")
    md.append(f"Val split: {cfg.num_val} images, {cfg.image_size}x{cfg.image_size}. Encoder = the whole pixel decoder "
              "(as the paper uses the word). GFLOPs: fvcore convention (1 multiply-add = 1 FLOP), batch 1. Latency: "
              "median of repeated inference runs, both models interleaved in one process. PQ / AP / mIoU in percent; "
              "the last row gives cost ratios and quality differences (points).\n")
    md.append(markdown_table(head, lines) + "\n")
    md.append(f"PRO-SCALE's encoder needs **{enc_ratio:.1%}** of the baseline's GFLOPs (**{1 - enc_ratio:.0%} less**) "
              f"and the whole model **{tot_ratio:.1%}** ({1 - tot_ratio:.0%} less). The paper reports "
              f"{PAPER['pixel_decoder_ratio']:.0%} and {PAPER['total_ratio']:.0%} for ResNet-50 at 800x1088: the "
              "pixel-decoder ratio is a property of the method (token counts and LPE), the whole-model ratio depends "
              f"on how much of the model the backbone is (here {backbone_share:.0%} of the baseline's GFLOPs, 33% for "
              "R50 at 800x1088).\n")
    md.append("### Targets\n")
    md.append(markdown_table(["goal", "measured", "met"],
                             [[g, m, {True: "yes", False: "**no**", None: "n/a"}[ok]] for g, m, ok in goals]) + "\n")
    if base["PQ"] is not None and ours["PQ"] is not None and base["PQ"] - ours["PQ"] > TARGET_PQ_GAP:
        md.append(GAP_NOTE + "\n")
    md.append("## GFLOPs per component\n")
    md.append(markdown_table(comp_head, comp_lines) + "\n")
    md.append(_img_md(gflops_png, out, "GFLOPs per component") + "\n")
    md.append("## Latency\n")
    md.append(markdown_table(lat_head, lat_lines) + "\n")
    runs = measure["latency_ms"]["model/infer"][keys[0]]["runs"]
    md.append(f"Batch 1, fp32, after warm-up; {runs} runs per cell at the training size"
              + (", fewer at the larger size (the same trained models on a larger random input; the fewer the "
                 f"tokens ({_tokens(cfg.image_size)} at {cfg.image_size}x{cfg.image_size}), the more fixed per-layer "
                 "costs weigh against the arithmetic PRO-SCALE saves, and it runs 9 encoder layers to the "
                 "baseline's 6)" if measure.get("larger") else "")
              + ". On a shared or busy machine the spread (p10-p90) widens; the ratio of medians measured side by "
              "side is the robust number." + (f" Load average during the measurement: {load[0]:.1f} on "
                                              f"{measure.get('cpu_count')} cores." if load else "") + "\n")
    md.append("## Training\n")
    md.append(markdown_table(
        ["model", "preset", "iterations", "batch", "training time"],
        [[n, f"`{p}`", str(plan["iterations"]), str(plan["batch_size"]),
          _duration(train_secs[k])] for k, n, p in models]) + "\n")
    md.append(_img_md(loss_png, out, "loss curves") + "\n")
    md.append("## Predictions on val images\n")
    md.append("Columns: input, ground truth, " + ", ".join(n for _, n, _ in models)
              + " (panoptic; labels with class scores).\n")
    if overview is not None:
        md.append(_img_md(overview, out, "overlays") + "\n")
    md.append("## Settings\n")
    settings = [
        f"Data: `proscale.data.generate_synthetic` seed {cfg.seed}, {cfg.num_train} train / {cfg.num_val} val, "
        f"{cfg.image_size}x{cfg.image_size}, difficulty `{cfg.difficulty}` with "
        f"{plan['data']['synthetic'] or 'no overrides'}"
        + (f" (**not supported by the installed generator, left out: {plan['data']['synthetic_unsupported']}**)"
           if plan["data"].get("synthetic_unsupported") else "")
        + "; 5 thing classes (shapes: circle, square, triangle, star, ring) and 3 stuff classes (sky, water, ground).",
        *[f"{n}: {_model_summary(p)}." for _, n, p in models],
        f"Training (both): AdamW lr {cfg.lr:g} ({cfg.schedule} schedule), weight decay {cfg.weight_decay:g}, "
        f"gradient clip {cfg.clip_grad:g}, batch {cfg.batch_size}, {plan['iterations']} iterations ({plan['reason']}), "
        f"seed {cfg.seed}, horizontal flips; losses: class {cfg.class_weight:g} (no-object {cfg.no_object_weight:g}), "
        f"mask BCE 5, dice 5 on {cfg.points_fraction:g} x H x W sampled points; deep supervision.",
        f"Inference: object-mask threshold {inference.get('object_mask_threshold', cfg.object_mask_threshold):g} "
        f"and overlap threshold {inference.get('overlap_threshold', cfg.overlap_threshold):g} (Mask2Former's COCO "
        "setting is 0.8 / 0.8: a model trained for minutes is rarely that confident).",
        "Metrics: PQ from proscale.evaluation (COCO panoptic definition), mask AP with pycocotools on the thing "
        "classes, mIoU from the semantic inference (sum over queries of class probability x mask).",
    ]
    md.append("\n".join(f"- {s}" for s in settings) + "\n")
    md_text = "\n".join(md)
    _write_text(md_path, md_text)
    _write_text(html_path, _html(md_text, out, {loss_png: "loss curves", gflops_png: "GFLOPs per component",
                                                **({overview: "overlays"} if overview else {})}))
    _write_text(stamp_path, json.dumps({"fingerprint": fingerprint, "written": now}))
    summary.update(status="written", overlays=[str(p) for p in overlay_paths])
    return summary


def _settings_key(cfg) -> dict:
    """The quickstart settings the report shows (a change rewrites it)."""
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "budget_minutes", "threads")}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _train_seconds(run: Path) -> float | None:
    try:
        times = json.loads((run / "train_time.json").read_text())
    except (OSError, ValueError):
        return None
    return float(sum(times)) if times else None


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


# ------------------------------------------------------------------------- markdown -> HTML
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f2f2f2}td:not(:first-child){text-align:right}tr:nth-child(even){background:#fafafa}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}code{background:#f4f4f4;padding:0 3px}"""


def _inline(text: str) -> str:
    """The few inline markdown forms the report uses: `code` and **bold**."""
    import re

    text = html.escape(text, quote=False).replace("&amp;nbsp;", "&nbsp;")
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _html(md_text: str, out: Path, images: dict[Path, str]) -> str:
    """A self-contained HTML page from the report's markdown (headings, paragraphs, lists,
    tables, images embedded as data URIs)."""
    import re

    by_rel = {p.relative_to(out).as_posix(): (p, alt) for p, alt in images.items()}
    body, table, items = [], [], []

    def flush():
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|[-:| ]+\|", r)]
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            body.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells[0]) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
                        + "</table>")
            table.clear()
        if items:
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in md_text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        m = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip())
        if m:
            path, alt = by_rel.get(m.group(2), (out / m.group(2), m.group(1)))
            body.append(_img_html(path, alt) if path.is_file() else f"<p>(missing {html.escape(m.group(2))})</p>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush()
    title = "proscale quickstart report"
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style>"
            f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n")
