"""The report's images: loss curves and GFLOPs bars (matplotlib, PNG), and overlays of the val
predictions of both models beside the input and the ground truth.

    plot_loss_curves(runs, path)              OUT/plots/loss_curves.png
    plot_gflops(models, measure, path)        OUT/plots/gflops_per_component.png
    write_overlays(cfg, models, folder, n)    OUT/overlays/val_<id>.png and overview.png
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from proscale.fileio import atomic_write
from proscale.predictor import Predictor
from proscale.quickstart.config import QuickstartConfig, run_dir, val_dataset
from proscale.visualize import draw_ground_truth, draw_panoptic, read_metrics, save_png, to_rgb_array

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


# ------------------------------------------------------------------------------------ plots
def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (chosen here, not at import, so that
    importing the quickstart leaves a notebook's backend alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    pyplot().close(fig)
    return path


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average over `window` values (the first value repeated before the start)."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) < window:
        return v
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, v[0]), v])
    return np.convolve(padded, kernel, mode="valid")


def plot_loss_curves(runs: dict[str, tuple[str, Path]], path: Path,
                     terms: tuple[str, ...] = ("loss_ce", "loss_mask", "loss_dice")) -> Path:
    """runs: key -> (display name, metrics.jsonl). Left: total loss; right: the final layer's
    loss terms, by default class / mask / dice (solid: the first model, dashed: the second)."""
    plt = pyplot()
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
        ax1.plot(it, smooth([r["loss"] for r in records], window), color=colors[n], lw=2, label=name)
        for m, term in enumerate(terms):
            if all(term in r for r in records):
                ax2.plot(it, smooth([r[term] for r in records], window), color=term_colors[m],
                         ls=styles[n % len(styles)], lw=1.8, label=f"{name}: {term[5:]}")
    ax1.set(title="total loss (weighted, all decoder layers)", xlabel="iteration", ylabel="loss", yscale="log")
    ax2.set(title="final decoder layer, unweighted", xlabel="iteration", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_gflops(models, measure: dict, path: Path) -> Path:
    """Left: GFLOPs per component, one bar per model. Right: the whole model split into
    backbone / pixel decoder / transformer decoder (stacked)."""
    plt = pyplot()
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
    return save_figure(fig, path)


# --------------------------------------------------------------------------------- overlays
def upscale(array: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, ...) -> (factor * H, factor * W, ...), nearest neighbour (labels stay labels)."""
    if factor == 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def titled(panel: np.ndarray, title: str, height: int = 18) -> np.ndarray:
    """(H, W, 3) uint8 -> (H + height, W, 3) with `title` centred above."""
    h, w = panel.shape[:2]
    canvas = Image.new("RGB", (w, h + height), (255, 255, 255))
    canvas.paste(Image.fromarray(panel), (0, height))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), title)
    draw.text(((w - (right - left)) // 2, (height - (bottom - top)) // 2 - top), title, fill=(0, 0, 0))
    return np.asarray(canvas)


def side_by_side(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """(H_i, W_i, 3) panels -> one (max H_i, sum W_i + gaps, 3) row, white-padded below."""
    h = max(p.shape[0] for p in panels)
    spacer = np.full((h, gap, 3), 255, dtype=np.uint8)
    out = []
    for n, p in enumerate(panels):
        if p.shape[0] < h:
            p = np.concatenate([p, np.full((h - p.shape[0], p.shape[1], 3), 255, np.uint8)])
        out += ([spacer] if n else []) + [p]
    return np.concatenate(out, axis=1)


def overlay_rows(dataset, count: int, out_dir: Path, panels) -> list[Path]:
    """For the first `count` samples of `dataset`: one row, the input upscaled to about 256 px
    then `panels(sample, image, factor)` (the upscaled image and its integer factor), saved as
    val_<id>.png. Returns the rows' PNGs, then the overview (all rows stacked) last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for index in range(min(count, len(dataset))):
        sample = dataset[index]
        h, w = sample["image"].shape[-2:]
        factor = max(1, int(round(256 / max(h, w))))
        image = upscale(to_rgb_array(sample["image"]), factor)
        row = side_by_side([titled(image, "input")] + panels(sample, image, factor))
        rows.append(row)
        paths.append(save_png(row, out_dir / f"val_{int(sample['image_id']):06d}.png"))
    if rows:
        paths.append(save_overview(rows, out_dir))
    return paths


def write_overlays(cfg: QuickstartConfig, models, out_dir: Path, count: int) -> list[Path]:
    """For the first `count` val images: input | ground truth | each model's panoptic result,
    upscaled (nearest for the segment maps) so that labels are readable. Returns the rows' PNGs,
    then the overview (all rows stacked) last."""
    dataset = val_dataset(cfg)
    predictors = {key: Predictor(run_dir(cfg, key) / "model_final.pt", device=cfg.device, tasks=("panoptic",))
                  for key, _, _ in models}

    def panels(sample, image, factor):
        masks = upscale(sample["masks"].numpy().transpose(1, 2, 0), factor).transpose(2, 0, 1)  # (N, fH, fW)
        big = {"image": image, "labels": sample["labels"], "masks": torch.from_numpy(np.ascontiguousarray(masks))}
        out = [titled(draw_ground_truth(big, dataset.metadata), "ground truth")]
        for key, name, _ in models:
            p = predictors[key]
            pan = p.predict(sample["image"])["panoptic"]
            seg = upscale(pan["panoptic_seg"].numpy(), factor)
            out.append(titled(draw_panoptic(image, seg, pan["segments_info"], p.metadata), name))
        return out

    return overlay_rows(dataset, count, out_dir, panels)


def save_overview(rows: list[np.ndarray], out_dir: Path) -> Path:
    """OUT_DIR/overview.png: the overlay rows (H_i, W_i, 3) uint8 stacked with white gaps."""
    width = max(r.shape[1] for r in rows)
    gap = np.full((6, width, 3), 255, np.uint8)
    stacked = np.concatenate([x for n, r in enumerate(rows) for x in ([gap] if n else []) + [r]], axis=0)
    return save_png(stacked, out_dir / "overview.png")
