"""Stage 6, the report: OUT/report.md and OUT/report.html, with PNG plots and overlays.

    write_report(cfg, plan, evals, measure) -> {"report_md", "report_html", "table", "rows", ...}

Inputs are what the earlier stages left in OUT: the plan, the evaluation results per model, the
GFLOPs / latency measurement, the runs' metrics.jsonl, train_time.json and final checkpoints.
Outputs:
    OUT/report.md, OUT/report.html     the comparison table (the paper's Table 1 in miniature:
                                       encoder = pixel decoder GFLOPs, total GFLOPs, latency, PQ,
                                       AP, mIoU and PRO-SCALE / Mask2Former ratios), GFLOPs per
                                       component, latency spread, settings, targets
    OUT/plots/*.png, OUT/overlays/*.png    proscale/quickstart/figures.py
    OUT/report.json                    the fingerprint of the inputs: unchanged inputs keep the report
The HTML embeds its images, so it can be mailed or opened anywhere on its own.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from pathlib import Path

from proscale.analysis.flop_report import LABELS, ORDER
from proscale.fileio import atomic_write, read_json, write_json
from proscale.presets import get_preset
from proscale.quickstart.config import MODELS, QuickstartConfig, run_dir
from proscale.quickstart.figures import plot_gflops, plot_loss_curves, write_overlays
from proscale.quickstart.tables import TABLE_HEAD, comparison_rows, duration, seed_cells, table_cells, targets
from proscale.report_html import markdown_table, markdown_to_html, text_table

# The paper's headline, PRO-SCALE (3,3,3) against Mask2Former with ResNet-50 on COCO: the share
# of GFLOPs it saves in the encoder (the paper's word for the whole pixel decoder) and in total.
PAPER_CUT = {"pixel_decoder": 0.52, "total": 0.27}
# Our own count of the same two R50 models at 800x1088 (fvcore convention, GFLOPs), as
# docs/flops.md lists it: `proscale flops --preset m2f_r50 --vs proscale_r50_333` reproduces it.
OUR_R50_GFLOPS = {"m2f_r50": {"backbone": 70.90, "pixel_decoder": 122.23, "total": 218.42},
                  "proscale_r50_333": {"backbone": 70.90, "pixel_decoder": 61.18, "total": 157.37}}


def write_report(cfg: QuickstartConfig, plan: dict, evals: dict, measure: dict) -> dict:
    """Writes the report unless OUT/report.json says it exists for these very inputs. Returns
    {"report_md", "report_html", "table" (text), "rows", "targets", "plots", "overlays",
    "status": "written" | "kept"}."""
    out = Path(cfg.out)
    rows = comparison_rows(MODELS, evals, measure)
    md_path, html_path = out / "report.md", out / "report.html"
    loss_png, gflops_png = out / "plots" / "loss_curves.png", out / "plots" / "gflops_per_component.png"
    summary = {"report_md": str(md_path), "report_html": str(html_path), "table": text_table(TABLE_HEAD,
               table_cells(rows)), "rows": rows, "targets": targets(rows), "plots": [str(loss_png), str(gflops_png)]}
    # The report depends only on these inputs (and the runs they name): unchanged -> kept.
    stamp_path = out / "report.json"
    results = {k: [[r["seed"], r.get("metrics"), r.get("train_seconds")] for r in runs] for k, runs in evals.items()}
    fingerprint = hashlib.sha256(json.dumps([plan, results, measure, settings_key(cfg)], sort_keys=True,
                                            default=str).encode()).hexdigest()
    stamp = read_json(stamp_path)
    if (stamp and stamp.get("fingerprint") == fingerprint
            and all(p.is_file() for p in (md_path, html_path, loss_png, gflops_png))):
        summary.update(status="kept", overlays=sorted(str(p) for p in (out / "overlays").glob("*.png")))
        return summary
    plot_loss_curves({k: (f"{n} (seed {cfg.seed})", run_dir(cfg, k) / "metrics.jsonl") for k, n, _ in MODELS},
                     loss_png)
    plot_gflops(MODELS, measure, gflops_png)
    overlay_paths = write_overlays(cfg, MODELS, out / "overlays", cfg.num_overlays)
    overview = overlay_paths[-1] if overlay_paths else None
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")

    images = {loss_png: "loss curves", gflops_png: "GFLOPs per component", **({overview: "overlays"} if overview else {})}
    link = {alt: f"![{alt}]({path.relative_to(out).as_posix()})" for path, alt in images.items()}
    load = measure.get("loadavg_before")
    md = ["# proscale quickstart: Mask2Former vs PRO-SCALE on synthetic panoptic data\n",
          f"Generated {now} by `proscale quickstart --out {cfg.out}`. Device: {measure['device']}, "
          f"{measure['threads']} threads" + (f", load average {load[0]:.1f} when measured" if load else "") + ".\n"]
    md += comparison_section(cfg, rows, measure)
    md += ["## GFLOPs per component\n", component_table(measure) + "\n", link["GFLOPs per component"] + "\n"]
    md += ["## Latency\n", latency_table(measure) + "\n", latency_note(cfg, measure) + "\n"]
    md += ["## Training\n", training_text(cfg, plan, rows, evals) + "\n", link["loss curves"] + "\n"]
    md += ["## Predictions on val images\n",
           "Columns: input, ground truth, " + ", ".join(n for _, n, _ in MODELS)
           + f" (panoptic, seed {cfg.seed}; labels with class scores).\n"]
    if overview is not None:
        md.append(link["overlays"] + "\n")
    md += ["## Settings\n", "\n".join(f"- {s}" for s in settings_lines(cfg, plan, evals)) + "\n"]
    md_text = "\n".join(md)
    atomic_write(md_path, md_text)
    atomic_write(html_path, markdown_to_html(md_text, out, images, title="proscale quickstart report"))
    write_json(stamp_path, {"fingerprint": fingerprint, "written": now})
    summary.update(status="written", overlays=[str(p) for p in overlay_paths])
    return summary


def settings_key(cfg: QuickstartConfig) -> dict:
    """The quickstart settings the report shows (a change rewrites it)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "budget_minutes", "workers")}


# --------------------------------------------------------------------------------- sections
def comparison_section(cfg: QuickstartConfig, rows: list[dict], measure: dict) -> list[str]:
    """The comparison table, its cost ratios beside the paper's and our R50 count, and the targets."""
    base, ours = rows[0], rows[-1]
    enc_ratio = ours["encoder_gflops"] / base["encoder_gflops"]
    tot_ratio = ours["total_gflops"] / base["total_gflops"]
    backbone_share = measure["flops"][MODELS[0][0]]["gflops"]["backbone"] / base["total_gflops"]
    r50_base, r50_ours = OUR_R50_GFLOPS["m2f_r50"], OUR_R50_GFLOPS["proscale_r50_333"]
    r50_enc_cut = 1 - r50_ours["pixel_decoder"] / r50_base["pixel_decoder"]
    r50_tot_cut = 1 - r50_ours["total"] / r50_base["total"]
    r50_backbone_share = r50_base["backbone"] / r50_base["total"]
    goals = [[g, m, {True: "yes", False: "**no**", None: "n/a"}[ok]] for g, m, ok in targets(rows)]
    return [
        "## Comparison\n",
        f"Val split: {cfg.num_val} images, {cfg.image_size}x{cfg.image_size}. Encoder = the whole pixel decoder "
        "(as the paper uses the word). GFLOPs: fvcore convention (1 multiply-add = 1 FLOP), batch 1. Latency: "
        "median of repeated inference runs, both models interleaved in one process. PQ / AP / mIoU in percent: "
        f"mean ± sample standard deviation over {len(cfg.seed_list)} trainings per model (seeds "
        f"{', '.join(map(str, cfg.seed_list))}; each seed's numbers under Training); the last row gives cost ratios and "
        "the differences of the means in points, ± their standard error.\n",
        markdown_table(TABLE_HEAD, table_cells(rows)) + "\n",
        f"PRO-SCALE's encoder needs **{enc_ratio:.1%}** of the baseline's GFLOPs (**{1 - enc_ratio:.0%} less**) "
        f"and the whole model **{tot_ratio:.1%}** ({1 - tot_ratio:.0%} less). The paper reports "
        f"-{PAPER_CUT['pixel_decoder']:.0%} encoder and -{PAPER_CUT['total']:.0%} total GFLOPs for PRO-SCALE (3,3,3) "
        f"against Mask2Former with ResNet-50 on COCO; our own count of those two models at 800x1088 (this "
        f"convention, `proscale flops --preset m2f_r50 --vs proscale_r50_333`) gives -{r50_enc_cut:.1%} and "
        f"-{r50_tot_cut:.1%}. The pixel-decoder ratio is a property of the method (token counts and LPE), the "
        "whole-model ratio depends on how much of the model the backbone is (here "
        f"{backbone_share:.0%} of the baseline's GFLOPs; {r50_backbone_share:.0%} for R50 at 800x1088 in our "
        "count).\n",
        "### Targets\n",
        markdown_table(["goal", "measured", "met"], goals) + "\n",
        f"The PRO-SCALE model here ({model_summary(MODELS[-1][2])}) is the setting `proscale tradeoff` recommends "
        "for this data. That command trains encoder variants (plans, LPE or the 3x3 conv, TRC on or off) x seeds "
        "and says from its runs where each gap comes from; docs/tradeoff.md has its result on this data, the "
        "released (3,3,3) with LPE included. Run it on your own data to choose the setting to ship.\n",
    ]


def component_table(measure: dict) -> str:
    """GFLOPs per component (proscale.analysis.flops order and labels) of each model, and the ratio."""
    keys = [k for k, _, _ in MODELS]
    head = ["component"] + [f"{n} GFLOPs" for _, n, _ in MODELS] + [f"{MODELS[-1][1]} / {MODELS[0][1]}"]
    lines = []
    for comp in ORDER:
        vals = [measure["flops"][k]["gflops"].get(comp, 0.0) for k in keys]
        if comp in ("pixel_decoder.other", "other") and not any(vals):
            continue
        label = LABELS.get(comp, comp).replace("  ", "&nbsp;&nbsp;")  # keeps the labels' indentation in HTML
        lines.append([label] + [f"{v:.4f}" for v in vals]
                     + [f"{vals[-1] / vals[0]:.3f}" if vals[0] else ("-" if not vals[-1] else "n/a")])
    return markdown_table(head, lines)


def latency_table(measure: dict) -> str:
    """Median (p10-p90) latency of the pixel decoder and the whole model at each measured size,
    with the ratio of medians beside the GFLOPs ratio."""
    keys = [k for k, _, _ in MODELS]
    head = ["input", "component (inference)"] + [f"{n} ms, median (p10-p90)" for _, n, _ in MODELS] + \
        ["ratio of medians", "GFLOPs ratio"]
    lines = []
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
            lines.append(cells)
    return markdown_table(head, lines)


def encoder_tokens(side: int) -> int:
    """Encoder tokens (res5 + res4 + res3) of a side x side input padded to /32."""
    p = -(-side // 32) * 32
    return sum((p // s) ** 2 for s in (32, 16, 8))


def latency_note(cfg: QuickstartConfig, measure: dict) -> str:
    runs = measure["latency_ms"]["model/infer"][MODELS[0][0]]["runs"]
    load = measure.get("loadavg_before")
    layers = [sum(get_preset(p).encoder.plan) for _, _, p in MODELS]
    return (f"Batch 1, fp32, after warm-up; {runs} runs per cell at the training size"
            + (", fewer at the larger size (the same trained models on a larger random input; the fewer the "
               f"tokens ({encoder_tokens(cfg.image_size)} at {cfg.image_size}x{cfg.image_size}), the more fixed "
               "per-layer costs weigh against the arithmetic PRO-SCALE saves, and it runs "
               f"{layers[-1]} encoder layers to the baseline's {layers[0]})" if measure.get("larger") else "")
            + ". On a shared or busy machine the spread (p10-p90) widens; the ratio of medians measured side by "
            "side is the robust number." + (f" Load average during the measurement: {load[0]:.1f} on "
                                            f"{measure.get('cpu_count')} cores." if load else ""))


def training_text(cfg: QuickstartConfig, plan: dict, rows: list[dict], evals: dict) -> str:
    """Every training run: its seed, metrics, iterations and time."""
    head, lines = seed_cells(rows, evals)
    total = sum(r.get("train_seconds") or 0.0 for runs in evals.values() for r in runs)
    return (markdown_table(head, lines) + "\n\n"
            f"{len(lines)} trainings of {plan['iterations']} iterations (batch {plan['batch_size']}), "
            f"{duration(total)} of single-threaded training in all, run side by side on one process per core. "
            "Each run is single-threaded: its numbers do not depend on the machine's load or core count.")


def model_summary(preset: str) -> str:
    """One line on a preset's architecture (backbone, encoder plan, TRC, output block, decoder)."""
    c = get_preset(preset)
    e, d = c.encoder, c.decoder
    trc = f"on ({e.trc_layout}, T={e.trc_temperature:g})" if e.trc else "off"
    enc = f"plan {tuple(e.plan)}, TRC {trc}, stride-4 output {'LPE' if e.output == 'lpe' else '3x3 conv'}"
    return (f"`{preset}`: backbone {c.backbone.name} (random init), d_model {e.d_model}, {e.n_heads} heads, "
            f"FFN {e.ffn_dim}; {enc}; decoder {d.dec_layers} layers, {d.num_queries} queries")


def settings_lines(cfg: QuickstartConfig, plan: dict, evals: dict) -> list[str]:
    """The data, models, training, inference and metrics, one list item each."""
    t = cfg.recipe.train_config(preset=MODELS[0][2], data="", output_dir="")  # the small recipe as run
    return [
        f"Data: `proscale.data.generate_synthetic` seed {cfg.seed}, {cfg.num_train} train / {cfg.num_val} val, "
        f"{cfg.image_size}x{cfg.image_size}, difficulty `{cfg.difficulty}` with "
        f"{plan['data']['synthetic'] or 'no overrides'}"
        + (f" (**not supported by the installed generator, left out: {plan['data']['synthetic_unsupported']}**)"
           if plan["data"].get("synthetic_unsupported") else "")
        + "; 5 thing classes (shapes: circle, square, triangle, star, ring) and 3 stuff classes (sky, water, ground).",
        *[f"{n}: {model_summary(p)}." for _, n, p in MODELS],
        f"Training (both models, every seed; the `small` recipe, proscale/recipes/small.yaml): AdamW lr {t.solver.lr:g} ({t.solver.schedule} "
        f"schedule, {t.solver.warmup_iters} warm-up iterations), weight decay {t.solver.weight_decay:g}, gradient clip "
        f"{t.solver.clip_grad:g}, batch {t.batch_size}, {plan['iterations']} iterations, seeds {', '.join(map(str, cfg.seed_list))}, "
        f"horizontal flips; losses: class {t.loss.class_weight:g} (no-object {t.loss.no_object_weight:g}), mask BCE 5, "
        f"dice 5 on {t.loss.points_fraction:g} x H x W sampled points; deep supervision.",
        f"Inference: object-mask threshold {t.test.object_mask_threshold:g} "
        f"and overlap threshold {t.test.overlap_threshold:g} (Mask2Former's COCO "
        "setting is 0.8 / 0.8: a model trained for minutes is rarely that confident).",
        "Metrics: PQ from proscale.evaluation (COCO panoptic definition), mask AP with pycocotools on the thing "
        "classes, mIoU from the semantic inference (sum over queries of class probability x mask).",
    ]
